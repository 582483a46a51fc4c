//! The event hub: every event the agent (or the demo) publishes is numbered, folded into the
//! state new clients start from, kept for clients that reconnect, serialised once and fanned
//! out to every WebSocket client.
//!
//! One owner holds the [`Journal`], the [`StreamState`] and the serialised messages, so no lock
//! is ever held across work. It runs on a thread of its own, not as one task among the clients'
//! writers, so that a hundred busy writers cannot starve it and let its queue grow: [`Hub::publish`] only pushes onto an unbounded channel (it never
//! blocks and never waits for a client), and subscribing is a request to the owner, which makes
//! "the snapshot (or the missed events) then everything after it" exact: the owner is the only
//! sender of deltas, so nothing can fall between the two.
//!
//! Deltas reach clients through one `tokio::sync::broadcast` ring of pre-serialised messages
//! (cloning one is a reference count). A client that falls more than the ring behind is told so
//! by the ring (`Lagged`) and resubscribes from its last sequence number: it gets the missed
//! events from the journal when they are still there, else a fresh snapshot. The agent and the
//! other clients never wait for it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use switchyard_engine::cluster::{Cluster, Delta};
use switchyard_engine::input::Object;
use switchyard_engine::protocol::{
    Event, Journal, NodeChange, NodeEvent, Resume, Sequenced, ServerMessage, SourceInfo, StreamState, SyncEvent,
    SyncKind, WatchEvent, node_changes, watch_diff,
};

use crate::sync::SyncReport;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// How many events reconnecting clients can catch up on.
pub const JOURNAL_CAPACITY: usize = 10_000;
/// How many messages a client may fall behind the newest before it is resynchronised.
pub const CLIENT_QUEUE: usize = 4_096;

/// Sizes of the hub's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    pub journal: usize,
    pub client_queue: usize,
    /// Run the owner on a thread of its own (the default) rather than as a task of the runtime.
    pub owner_thread: bool,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig { journal: JOURNAL_CAPACITY, client_queue: CLIENT_QUEUE, owner_thread: true }
    }
}

/// The hub stopped (its owner ended): only when the agent is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the event hub has stopped")]
pub struct HubClosed;

/// One serialised message: its sequence number (the snapshot's own for a snapshot) and its JSON
/// text, shared by every client.
#[derive(Debug, Clone)]
pub struct Message {
    pub seq: u64,
    pub snapshot: bool,
    pub json: Utf8Bytes,
}

/// What a new (or resynchronised) client sends first, then the deltas of `deltas`.
#[derive(Debug)]
pub struct Subscription {
    /// One snapshot, or the events after the `since` asked for, in order (possibly none).
    pub backlog: Vec<Message>,
    /// Whether `backlog` resumes the asked sequence number (`false`: it is a snapshot).
    pub resumed: bool,
    /// The sequence number the client is at once it has sent `backlog`.
    pub seq: u64,
    /// Every event after `seq`, as the owner publishes it.
    pub deltas: broadcast::Receiver<Message>,
}

/// Counters for `/metrics` and the load test, and the health last published.
#[derive(Debug)]
pub struct HubStats {
    /// Events numbered and sent.
    pub published: AtomicU64,
    /// Clients connected now.
    pub clients: AtomicUsize,
    /// Times a client fell behind its queue and was resynchronised.
    pub resyncs: AtomicU64,
    /// The last sequence number.
    pub last_seq: AtomicU64,
    /// As the last health event said (healthy until one says otherwise).
    pub healthy: AtomicBool,
}

impl Default for HubStats {
    fn default() -> Self {
        HubStats {
            published: AtomicU64::new(0),
            clients: AtomicUsize::new(0),
            resyncs: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        }
    }
}

enum Command {
    Publish { time_ms: u64, event: Event },
    Subscribe { since: Option<u64>, reply: oneshot::Sender<Subscription> },
    Snapshot { reply: oneshot::Sender<Message> },
    State { reply: oneshot::Sender<Box<StreamState>> },
    Cluster { reply: oneshot::Sender<Arc<Cluster>> },
    Close,
}

/// A handle on the hub; clones share it. The owner ends when the last handle is dropped or
/// [`Hub::close`] is called.
#[derive(Clone)]
pub struct Hub {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<HubStats>,
    generation: watch::Receiver<u64>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("stats", &self.stats).finish()
    }
}

/// Milliseconds since the Unix epoch: the time of live events.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Hub {
    /// Starts the owner thread. `cluster` is the state before the first event (the demo's first
    /// cluster; empty for an agent, whose source publishes it).
    pub fn start(source: SourceInfo, cluster: Cluster, config: HubConfig) -> Hub {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(HubStats::default());
        let (generation_tx, generation) = watch::channel(0);
        let owner = Owner::new(StreamState::new(source, cluster), config, stats.clone(), generation_tx);
        if config.owner_thread {
            std::thread::spawn(move || owner.run(rx));
        } else {
            tokio::spawn(owner.run_async(rx));
        }
        Hub { tx, stats, generation }
    }

    /// Publishes an event stamped with the wall clock. Never blocks; callable from any thread.
    pub fn publish(&self, event: Event) {
        self.publish_at(now_ms(), event);
    }

    /// Publishes an event stamped `time_ms` (the demo's simulated time).
    pub fn publish_at(&self, time_ms: u64, event: Event) {
        // A closed hub means the runtime is going away: the event has no one to reach.
        let _ = self.tx.send(Command::Publish { time_ms, event });
    }

    /// Subscribes: a snapshot (`since: None`, or a number the journal no longer covers), or the
    /// events after `since`, then every later event.
    pub async fn subscribe(&self, since: Option<u64>) -> Result<Subscription, HubClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Subscribe { since, reply }).map_err(|_| HubClosed)?;
        rx.await.map_err(|_| HubClosed)
    }

    /// The current snapshot message, as `/api/v1/snapshot` serves it.
    pub async fn snapshot(&self) -> Result<Message, HubClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Snapshot { reply }).map_err(|_| HubClosed)?;
        rx.await.map_err(|_| HubClosed)
    }

    /// A copy of the folded state (for tests and tools; clients use [`Hub::subscribe`]).
    pub async fn state(&self) -> Result<StreamState, HubClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::State { reply }).map_err(|_| HubClosed)?;
        rx.await.map(|s| *s).map_err(|_| HubClosed)
    }

    /// The cluster as the published watch events made it (what `/api/v1/trace` answers
    /// against). Shared until the next watch event, so asking often costs nothing.
    pub async fn cluster(&self) -> Result<Arc<Cluster>, HubClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Cluster { reply }).map_err(|_| HubClosed)?;
        rx.await.map_err(|_| HubClosed)
    }

    /// Changes whenever a watch event changed the cluster (the value counts them).
    pub fn cluster_changes(&self) -> watch::Receiver<u64> {
        self.generation.clone()
    }

    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// Stops the hub: clients get the end of their stream (a close frame telling them to
    /// resume), later publishes go nowhere. For shutdown: open streams would otherwise keep the
    /// server's graceful shutdown waiting.
    pub fn close(&self) {
        let _ = self.tx.send(Command::Close);
    }
}

/// The owner task's state.
struct Owner {
    journal: Journal,
    capacity: usize,
    /// The serialised journal: the same events, in the same order, as sent.
    sent: VecDeque<Message>,
    state: StreamState,
    deltas: broadcast::Sender<Message>,
    /// The last snapshot serialised, reused until the next event.
    snapshot: Option<Message>,
    /// The cluster handed out, reused until the next watch event.
    cluster: Option<Arc<Cluster>>,
    generation: watch::Sender<u64>,
    stats: Arc<HubStats>,
}

impl Owner {
    fn new(state: StreamState, config: HubConfig, stats: Arc<HubStats>, generation: watch::Sender<u64>) -> Self {
        let (deltas, _) = broadcast::channel(config.client_queue.max(1));
        Owner {
            journal: Journal::new(config.journal),
            capacity: config.journal.max(1),
            sent: VecDeque::with_capacity(config.journal.min(1024)),
            state,
            deltas,
            snapshot: None,
            cluster: None,
            generation,
            stats,
        }
    }

    async fn run_async(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            if matches!(cmd, Command::Close) {
                return;
            }
            self.handle(cmd);
        }
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(cmd) = rx.blocking_recv() {
            if matches!(cmd, Command::Close) {
                return;
            }
            self.handle(cmd);
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Publish { time_ms, event } => self.publish(time_ms, event),
            Command::Subscribe { since, reply } => {
                let _ = reply.send(self.subscribe(since));
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::State { reply } => {
                let _ = reply.send(Box::new(self.state.clone()));
            }
            Command::Cluster { reply } => {
                let c = self.cluster.get_or_insert_with(|| Arc::new(self.state.cluster.clone()));
                let _ = reply.send(c.clone());
            }
            Command::Close => {}
        }
    }

    fn publish(&mut self, time_ms: u64, event: Event) {
        let e = self.journal.push(time_ms, event);
        self.state.apply(e);
        let seq = e.seq;
        let json = Utf8Bytes::from(event_json(e));
        match &e.event {
            Event::Watch(_) => {
                self.cluster = None;
                self.generation.send_modify(|g| *g += 1);
            }
            Event::Health(h) => self.stats.healthy.store(h.healthy, Ordering::Relaxed),
            _ => {}
        }
        let m = Message { seq, snapshot: false, json };
        // Trimmed in step with the journal, which keeps the same number of events.
        if self.sent.len() == self.capacity {
            self.sent.pop_front();
        }
        self.sent.push_back(m.clone());
        self.snapshot = None;
        // No receivers is fine: no client is connected.
        let _ = self.deltas.send(m);
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        self.stats.last_seq.store(seq, Ordering::Relaxed);
    }

    fn snapshot(&mut self) -> Message {
        if let Some(s) = &self.snapshot {
            return s.clone();
        }
        let json = Utf8Bytes::from(ServerMessage::Snapshot(self.state.snapshot()).to_json());
        let m = Message { seq: self.state.seq, snapshot: true, json };
        self.snapshot = Some(m.clone());
        m
    }

    fn subscribe(&mut self, since: Option<u64>) -> Subscription {
        // Subscribed before anything else is sent, so the receiver sees every later event.
        let deltas = self.deltas.subscribe();
        let last = self.journal.last_seq();
        if let Some(since) = since
            && let Resume::Events(events) = self.journal.since(since)
        {
            let first = events.first().map(|e| e.seq);
            let backlog: Vec<Message> = match first {
                None => Vec::new(),
                Some(first) => self.sent.iter().skip_while(|m| m.seq < first).cloned().collect(),
            };
            return Subscription { backlog, resumed: true, seq: last, deltas };
        }
        let snap = self.snapshot();
        Subscription { seq: snap.seq, backlog: vec![snap], resumed: false, deltas }
    }
}

/// `ServerMessage::Event(e).to_json()`, from a borrowed event (no copy of it).
fn event_json(e: &Sequenced) -> String {
    #[derive(serde::Serialize)]
    #[serde(tag = "type", rename_all = "camelCase")]
    enum Wire<'a> {
        Event(&'a Sequenced),
    }
    // As `ServerMessage::to_json`: plain values, string-keyed maps and enums cannot fail.
    serde_json::to_string(&Wire::Event(e)).unwrap_or_default()
}

/// What a new version of the source's cluster publishes: one re-list (`Reset`) the first time,
/// then one watch event per object that changed and one node event per node that changed.
pub fn cluster_events(old: &Cluster, new: &Cluster, first: bool) -> Vec<Event> {
    if first {
        let mut out = vec![Event::Watch(WatchEvent::Reset { objects: new.objects() })];
        out.extend(node_changes(old, new).into_iter().map(Event::Node));
        return out;
    }
    let mut out: Vec<Event> = watch_diff(old, new).into_iter().map(Event::Watch).collect();
    out.extend(node_changes(old, new).into_iter().map(Event::Node));
    out
}

/// What a change of a few objects publishes, as [`cluster_events`] would for the clusters before
/// and after it (deletions first, then the objects applied, then one node event per node), without
/// comparing two whole clusters.
pub fn delta_events(deltas: &[Delta]) -> Vec<Event> {
    let mut out = Vec::with_capacity(deltas.len());
    let mut applied = Vec::new();
    let mut nodes = Vec::new();
    for d in deltas {
        match (&d.before, &d.after) {
            (_, Some(o)) => applied.push(Event::Watch(WatchEvent::Applied { object: Box::new(o.clone()) })),
            (Some(o), None) => match o.reference() {
                Some(r) => out.push(Event::Watch(WatchEvent::Deleted { object: r })),
                // The proxy configuration is never deleted: it goes back to the default one.
                None => applied.push(Event::Watch(WatchEvent::Applied {
                    object: Box::new(Object::ProxyConfig(Default::default())),
                })),
            },
            (None, None) => {}
        }
        let change = match (&d.before, &d.after) {
            (None, Some(Object::Node(n))) => Some((&n.name, NodeChange::Joined)),
            (Some(Object::Node(n)), None) => Some((&n.name, NodeChange::Left)),
            (Some(Object::Node(n)), Some(Object::Node(_))) => Some((&n.name, NodeChange::Updated)),
            _ => None,
        };
        if let Some((name, change)) = change {
            nodes.push(NodeEvent { name: name.clone(), change });
        }
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(applied);
    out.extend(nodes.into_iter().map(Event::Node));
    out
}

/// A sync of the agent's loop as the stream tells it. `render` is the part of the sync spent
/// rendering (the rest is the kernel).
pub fn sync_event(node: &str, backend: &str, r: &SyncReport, render: Duration) -> SyncEvent {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    SyncEvent {
        node: node.to_string(),
        backend: backend.to_string(),
        kind: match r.kind {
            crate::sync::SyncKind::Full => SyncKind::Full,
            crate::sync::SyncKind::Partial => SyncKind::Partial,
        },
        ok: r.error.is_none(),
        duration_ms: ms(r.took.max(render)),
        render_ms: ms(render.min(r.took.max(render))),
        rules: r.rules,
        changed: r.changed,
        services: Vec::new(),
        services_omitted: 0,
        error: r.error.clone(),
    }
    .with_services(&r.services)
}

/// One client's view of the hub: the messages to send it, in order, with no gap and no
/// duplicate. Falling behind the shared queue resubscribes from the last message handed out.
pub struct ClientFeed {
    hub: Hub,
    pending: VecDeque<Message>,
    seq: u64,
    deltas: broadcast::Receiver<Message>,
    /// Set when the queue overflowed; cleared once resubscribed (kept across a cancelled
    /// [`ClientFeed::next`], so a gap can never slip through).
    lagged: bool,
}

impl ClientFeed {
    /// Opens a feed from `since` (see [`Hub::subscribe`]).
    pub async fn open(hub: &Hub, since: Option<u64>) -> Result<ClientFeed, HubClosed> {
        let sub = hub.subscribe(since).await?;
        hub.stats.clients.fetch_add(1, Ordering::Relaxed);
        Ok(ClientFeed {
            hub: hub.clone(),
            pending: sub.backlog.into(),
            seq: since.unwrap_or(0),
            deltas: sub.deltas,
            lagged: false,
        })
    }

    /// The next message to send. Cancel-safe.
    pub async fn next(&mut self) -> Result<Message, HubClosed> {
        loop {
            if self.lagged {
                let sub = self.hub.subscribe(Some(self.seq)).await?;
                self.pending = sub.backlog.into();
                self.deltas = sub.deltas;
                self.lagged = false;
                self.hub.stats.resyncs.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(m) = self.pending.pop_front() {
                self.seq = m.seq;
                return Ok(m);
            }
            match self.deltas.recv().await {
                // A snapshot resets the client, so older deltas may not follow it; a delta at or
                // below the client's position is one it already has.
                Ok(m) if m.seq <= self.seq => continue,
                Ok(m) => {
                    self.seq = m.seq;
                    return Ok(m);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.lagged = true,
                Err(broadcast::error::RecvError::Closed) => return Err(HubClosed),
            }
        }
    }

    /// The next message if one is ready now, without waiting (a writer batches these before
    /// flushing its socket once). `None` also after an overflow: [`ClientFeed::next`] resyncs.
    pub fn try_next(&mut self) -> Option<Message> {
        if self.lagged {
            return None;
        }
        if let Some(m) = self.pending.pop_front() {
            self.seq = m.seq;
            return Some(m);
        }
        loop {
            match self.deltas.try_recv() {
                Ok(m) if m.seq <= self.seq => continue,
                Ok(m) => {
                    self.seq = m.seq;
                    return Some(m);
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.lagged = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// The sequence number of the last message handed out.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for ClientFeed {
    fn drop(&mut self) {
        self.hub.stats.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::protocol::{Health, Mode};

    fn source() -> SourceInfo {
        SourceInfo { mode: Mode::Live, node: "n1".into(), backend: "none".into(), version: "test".into() }
    }

    fn health(n: u64) -> Event {
        Event::Health(Health { healthy: true, message: format!("h{n}") })
    }

    fn decode(m: &Message) -> ServerMessage {
        ServerMessage::from_json(m.json.as_str()).expect("a protocol message")
    }

    fn seq_of(m: &Message) -> u64 {
        match decode(m) {
            ServerMessage::Event(Sequenced { seq, .. }) => seq,
            ServerMessage::Snapshot(s) => panic!("a snapshot at {} where an event was expected", s.seq),
        }
    }

    /// The borrowed serialisation is the protocol's own.
    #[test]
    fn event_json_is_the_protocol_message() {
        let e = Sequenced { seq: 7, time_ms: 9, event: health(7) };
        assert_eq!(event_json(&e), ServerMessage::Event(e.clone()).to_json());
    }

    /// What the hub keeps does not grow with the size of syncs: after more syncs of thousands of
    /// services each than the snapshot keeps, the state holds `RECENT_SYNCS` sync events naming
    /// at most `SYNC_SERVICES_LISTED` services each, and the snapshot's syncs stay small.
    #[tokio::test]
    async fn syncs_of_many_services_are_kept_bounded() {
        use switchyard_engine::model::ObjectKey;
        use switchyard_engine::protocol::{RECENT_SYNCS, SYNC_SERVICES_LISTED};
        let services: Vec<ObjectKey> = (0..3_000).map(|i| ObjectKey::new("churn", format!("bulk-{i}"))).collect();
        let report = SyncReport {
            kind: crate::sync::SyncKind::Partial,
            at: Duration::ZERO,
            took: Duration::from_millis(500),
            error: None,
            wrote: true,
            consecutive_failures: 0,
            service_ports: 10_000,
            endpoints: 100_000,
            changed: 6_000,
            rules: 330_000,
            services,
        };
        let hub = Hub::start(source(), Cluster::default(), HubConfig { journal: 1_000, ..HubConfig::default() });
        let n = RECENT_SYNCS + 100;
        for i in 0..n {
            hub.publish_at(i as u64, Event::Sync(sync_event("n1", "nftables", &report, Duration::from_millis(200))));
        }
        let state = hub.state().await.expect("hub");
        assert_eq!(state.syncs.len(), RECENT_SYNCS);
        let named: usize = state
            .syncs
            .iter()
            .map(|e| match &e.event {
                Event::Sync(s) => {
                    assert_eq!(s.services.len() + s.services_omitted, 3_000, "each sync still counts them all");
                    s.services.len()
                }
                other => panic!("not a sync: {other:?}"),
            })
            .sum();
        assert_eq!(named, RECENT_SYNCS * SYNC_SERVICES_LISTED);
        let snapshot = hub.snapshot().await.expect("hub");
        assert!(snapshot.json.len() < RECENT_SYNCS * 2_000, "snapshot of {} bytes", snapshot.json.len());
    }

    /// A new client gets the snapshot, then every later event in order.
    #[tokio::test]
    async fn snapshot_then_deltas() {
        let hub = Hub::start(source(), Cluster::default(), HubConfig::default());
        for n in 1..=3 {
            hub.publish_at(n, health(n));
        }
        let mut feed = ClientFeed::open(&hub, None).await.expect("open");
        for n in 4..=6 {
            hub.publish_at(n, health(n));
        }
        let first = feed.next().await.expect("snapshot");
        let ServerMessage::Snapshot(s) = decode(&first) else { panic!("not a snapshot") };
        assert_eq!(s.seq, 3);
        assert_eq!(s.health.message, "h3");
        for n in 4..=6 {
            assert_eq!(seq_of(&feed.next().await.expect("event")), n);
        }
    }

    /// `since` inside the journal resumes exactly; outside it, a snapshot.
    #[tokio::test]
    async fn resume_or_snapshot() {
        let hub = Hub::start(
            source(),
            Cluster::default(),
            HubConfig { journal: 5, client_queue: 16, ..HubConfig::default() },
        );
        for n in 1..=8 {
            hub.publish_at(n, health(n));
        }
        let sub = hub.subscribe(Some(5)).await.expect("subscribe");
        assert!(sub.resumed);
        assert_eq!(sub.backlog.iter().map(seq_of).collect::<Vec<_>>(), vec![6, 7, 8]);
        let sub = hub.subscribe(Some(8)).await.expect("subscribe");
        assert!(sub.resumed && sub.backlog.is_empty());
        let sub = hub.subscribe(Some(2)).await.expect("subscribe");
        assert!(!sub.resumed, "event 3 is gone from a journal of 5");
        assert!(matches!(decode(&sub.backlog[0]), ServerMessage::Snapshot(s) if s.seq == 8));
        let sub = hub.subscribe(Some(99)).await.expect("subscribe");
        assert!(!sub.resumed, "a number from another run");
    }

    /// A client that falls behind its queue is resubscribed from where it was: no gap, no
    /// duplicate, while the publisher never waited.
    #[tokio::test]
    async fn a_lagging_client_catches_up_without_gaps() {
        let hub = Hub::start(
            source(),
            Cluster::default(),
            HubConfig { journal: 1_000, client_queue: 4, owner_thread: false },
        );
        let mut feed = ClientFeed::open(&hub, Some(0)).await.expect("open");
        for n in 1..=100 {
            hub.publish_at(n, health(n));
        }
        hub.snapshot().await.expect("hub");
        let mut got = Vec::new();
        while got.len() < 100 {
            got.push(seq_of(&feed.next().await.expect("event")));
        }
        assert_eq!(got, (1..=100).collect::<Vec<_>>());
        assert!(hub.stats().resyncs.load(Ordering::Relaxed) >= 1);
        // Too far behind for the journal too: a snapshot.
        let hub = Hub::start(
            source(),
            Cluster::default(),
            HubConfig { journal: 10, client_queue: 4, ..HubConfig::default() },
        );
        let mut feed = ClientFeed::open(&hub, Some(0)).await.expect("open");
        for n in 1..=50 {
            hub.publish_at(n, health(n));
        }
        // Commands are handled in order: once this answers, all 50 were sent.
        hub.snapshot().await.expect("hub");
        let m = feed.next().await.expect("message");
        assert!(m.snapshot && m.seq == 50, "{}", m.json.as_str());
    }
}
