//! The event stream between an agent (or the demo) and the dashboard: versioned, JSON, camelCase.
//!
//! On `/api/v1/events` the server sends one [`ServerMessage::Snapshot`] first, then one
//! [`ServerMessage::Event`] per change, each with the next sequence number. A client that
//! reconnects with `?since=SEQ` gets the events after `SEQ` from the [`Journal`], or a fresh snapshot
//! when it fell too far behind. The same types carry the demo scenario inside the browser, so the
//! dashboard cannot tell the demo from a live node except by [`SourceInfo::mode`].
//!
//! [`StreamState`] folds events into what a snapshot holds; the agent keeps one to answer new
//! clients and the dashboard keeps one as the core of its reducer.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, ObjectRef};
use crate::flow::{DestinationKind, SequenceDiagram};
use crate::input::Object;
use crate::model::{ObjectKey, Protocol};
use crate::trace::{Outcome, SocketAddr, Verdict};

/// Bumped on any change a client of the previous version would misread.
pub const VERSION: u32 = 1;

/// How many flows, syncs and timeline entries a snapshot carries.
pub const RECENT_FLOWS: usize = 200;
pub const RECENT_SYNCS: usize = 500;
pub const RECENT_TIMELINE: usize = 500;
/// How many services a sync event names; the others are only counted
/// ([`SyncEvent::services_omitted`]). Under churn a partial sync is for thousands of services, and
/// every sync event is kept twice, by the journal and by the snapshot's [`RECENT_SYNCS`]: naming
/// them all made the agent's memory grow with every sync until those 500 were full (about 200 KB
/// a sync at 1,000 endpoint changes/s over 10,000 Services, 100 MB at the bound).
pub const SYNC_SERVICES_LISTED: usize = 20;

/// Everything the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ServerMessage {
    Snapshot(Snapshot),
    Event(Sequenced),
}

impl ServerMessage {
    pub fn to_json(&self) -> String {
        // Every field is a plain value, a string-keyed map or an enum: serialisation cannot fail.
        serde_json::to_string(self).expect("protocol messages serialise")
    }

    /// Decodes one message, saying where it is wrong.
    pub fn from_json(text: &str) -> Result<Self, DecodeError> {
        serde_json::from_str(text).map_err(|e| DecodeError {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    }
}

/// A message that is not a message of this protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event stream message, line {line} column {column}: {message}")]
pub struct DecodeError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Where the stream comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceInfo {
    pub mode: Mode,
    /// The node whose kernel the agent programs.
    pub node: String,
    /// `nftables`, `iptables`, `ipvs` or `none`.
    pub backend: String,
    pub version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    Live,
    Demo,
}

/// What a new client starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    pub version: u32,
    /// The sequence number of the last event folded in; deltas continue from `seq + 1`.
    pub seq: u64,
    pub time_ms: u64,
    pub source: SourceInfo,
    /// Every object of the cluster, in a stable order.
    pub objects: Vec<Object>,
    pub flows: Vec<Sequenced>,
    pub syncs: Vec<Sequenced>,
    /// Watch, node and health events, for the timeline.
    pub timeline: Vec<Sequenced>,
    pub health: Health,
}

/// One event with its place in the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sequenced {
    pub seq: u64,
    /// Milliseconds since the Unix epoch (live) or since the scenario started (demo).
    pub time_ms: u64,
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum Event {
    Watch(WatchEvent),
    Sync(SyncEvent),
    Flow(Box<FlowEvent>),
    Node(NodeEvent),
    Health(Health),
}

/// A change the source saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase", deny_unknown_fields)]
pub enum WatchEvent {
    Applied {
        object: Box<Object>,
    },
    Deleted {
        object: ObjectRef,
    },
    /// A re-list: the cluster is exactly these objects now.
    Reset {
        objects: Vec<Object>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SyncKind {
    Full,
    Partial,
}

/// One sync of the node's kernel program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncEvent {
    pub node: String,
    pub backend: String,
    /// `syncKind` on the wire: `kind` is [`Event`]'s tag.
    #[serde(rename = "syncKind")]
    pub kind: SyncKind,
    pub ok: bool,
    /// Rendering plus applying.
    pub duration_ms: f64,
    /// Of which rendering.
    pub render_ms: f64,
    /// Rules and elements the node's program holds after the sync.
    pub rules: usize,
    /// Lines of the transaction sent to the kernel.
    pub changed: usize,
    /// The services the sync was for (empty for a full sync), at most [`SYNC_SERVICES_LISTED`]
    /// of them: see [`SyncEvent::with_services`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ObjectKey>,
    /// How many more services the sync was for than `services` names.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub services_omitted: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SyncEvent {
    /// Names the first [`SYNC_SERVICES_LISTED`] of `services` and counts the rest, so that a
    /// sync event's size does not grow with the number of services it was for.
    pub fn with_services(mut self, services: &[ObjectKey]) -> Self {
        let listed = services.len().min(SYNC_SERVICES_LISTED);
        self.services = services[..listed].to_vec();
        self.services_omitted = services.len() - listed;
        self
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeChange {
    Joined,
    Updated,
    Left,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeEvent {
    pub name: String,
    pub change: NodeChange,
}

/// The agent's health, as `/healthz` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Health {
    pub healthy: bool,
    /// Why not, or what the source is doing (`watching`, `re-listing`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Default for Health {
    fn default() -> Self {
        Health { healthy: true, message: String::new() }
    }
}

/// Where a flow was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FlowOrigin {
    /// A real connection in the node's conntrack table.
    Conntrack,
    /// The demo scenario's simulated traffic.
    Demo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FlowState {
    New,
    Destroyed,
}

/// One connection, explained by the tracer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowEvent {
    /// Stable for the life of the connection: its `New` and `Destroyed` events share it.
    pub id: u64,
    pub origin: FlowOrigin,
    pub state: FlowState,
    pub node: String,
    pub protocol: Protocol,
    /// The original direction as the client sent it.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The DNS name the client looked up first, for flows that start from a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub destination: DestinationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ObjectKey>,
    pub verdict: Verdict,
    /// The endpoint the connection reached (the reply tuple's source, for a real connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// Whether the endpoint saw the node's address instead of the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<bool>,
    /// Whether the tracer predicted this endpoint and masquerade; `None` when nothing was observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agrees: Option<bool>,
    /// Every outcome the tracer found, with its probability.
    #[serde(default)]
    pub outcomes: Vec<Outcome>,
    /// The path drawn as a sequence diagram, for the flows view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagram: Option<SequenceDiagram>,
}

/// The last events, by sequence number, so reconnecting clients can catch up.
#[derive(Debug, Clone)]
pub struct Journal {
    capacity: usize,
    events: VecDeque<Sequenced>,
    next: u64,
}

/// What a client that reconnects with a sequence number gets.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume<'a> {
    /// The events after its sequence number (possibly none).
    Events(Vec<&'a Sequenced>),
    /// It fell too far behind (or its number is from another run): start again from a snapshot.
    Snapshot,
}

impl Journal {
    pub fn new(capacity: usize) -> Self {
        Journal { capacity: capacity.max(1), events: VecDeque::new(), next: 1 }
    }

    /// Numbers the event and keeps it.
    pub fn push(&mut self, time_ms: u64, event: Event) -> &Sequenced {
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        let seq = self.next;
        self.next += 1;
        self.events.push_back(Sequenced { seq, time_ms, event });
        self.events.back().expect("just pushed")
    }

    /// The number of the last event pushed (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next - 1
    }

    pub fn since(&self, seq: u64) -> Resume<'_> {
        let last = self.last_seq();
        if seq > last {
            return Resume::Snapshot;
        }
        if seq == last {
            return Resume::Events(Vec::new());
        }
        match self.events.front() {
            Some(first) if first.seq <= seq + 1 => {
                let skip = (seq + 1 - first.seq) as usize;
                Resume::Events(self.events.iter().skip(skip).collect())
            }
            _ => Resume::Snapshot,
        }
    }
}

/// What a snapshot holds, kept up to date event by event.
#[derive(Debug, Clone)]
pub struct StreamState {
    pub source: SourceInfo,
    pub seq: u64,
    pub time_ms: u64,
    pub cluster: Cluster,
    pub flows: VecDeque<Sequenced>,
    pub syncs: VecDeque<Sequenced>,
    pub timeline: VecDeque<Sequenced>,
    pub health: Health,
}

impl StreamState {
    pub fn new(source: SourceInfo, cluster: Cluster) -> Self {
        StreamState {
            source,
            seq: 0,
            time_ms: 0,
            cluster,
            flows: VecDeque::new(),
            syncs: VecDeque::new(),
            timeline: VecDeque::new(),
            health: Health::default(),
        }
    }

    /// Starts from a snapshot the server sent.
    pub fn from_snapshot(s: Snapshot) -> Self {
        StreamState {
            source: s.source,
            seq: s.seq,
            time_ms: s.time_ms,
            cluster: Cluster::from_objects(s.objects),
            flows: s.flows.into(),
            syncs: s.syncs.into(),
            timeline: s.timeline.into(),
            health: s.health,
        }
    }

    /// Folds one event in. Events at or before the state's sequence number are ignored, so a
    /// client may replay an overlap safely.
    pub fn apply(&mut self, e: &Sequenced) {
        if e.seq != 0 && e.seq <= self.seq {
            return;
        }
        self.seq = self.seq.max(e.seq);
        self.time_ms = self.time_ms.max(e.time_ms);
        match &e.event {
            Event::Watch(w) => {
                match w {
                    WatchEvent::Applied { object } => self.cluster.apply((**object).clone()),
                    WatchEvent::Deleted { object } => {
                        self.cluster.delete(object);
                    }
                    WatchEvent::Reset { objects } => {
                        let config = self.cluster.config.clone();
                        self.cluster = Cluster::from_objects(objects.iter().cloned());
                        if !objects.iter().any(|o| matches!(o, Object::ProxyConfig(_))) {
                            self.cluster.config = config;
                        }
                    }
                }
                push_bounded(&mut self.timeline, e, RECENT_TIMELINE);
            }
            Event::Sync(_) => push_bounded(&mut self.syncs, e, RECENT_SYNCS),
            Event::Flow(_) => push_bounded(&mut self.flows, e, RECENT_FLOWS),
            Event::Node(_) => push_bounded(&mut self.timeline, e, RECENT_TIMELINE),
            Event::Health(h) => {
                self.health = h.clone();
                push_bounded(&mut self.timeline, e, RECENT_TIMELINE);
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: VERSION,
            seq: self.seq,
            time_ms: self.time_ms,
            source: self.source.clone(),
            objects: self.cluster.objects(),
            flows: self.flows.iter().cloned().collect(),
            syncs: self.syncs.iter().cloned().collect(),
            timeline: self.timeline.iter().cloned().collect(),
            health: self.health.clone(),
        }
    }
}

fn push_bounded(q: &mut VecDeque<Sequenced>, e: &Sequenced, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(e.clone());
}

/// The watch events that turn `old` into `new`, one per object that changed.
pub fn watch_diff(old: &Cluster, new: &Cluster) -> Vec<WatchEvent> {
    use std::collections::BTreeMap;
    // `None` stands for the proxy configuration, which has no name and is never deleted.
    let index = |c: &Cluster| -> BTreeMap<Option<ObjectRef>, Object> {
        c.objects().into_iter().map(|o| (o.reference(), o)).collect()
    };
    let (before, after) = (index(old), index(new));
    let deleted = before.keys().filter(|k| !after.contains_key(*k)).flatten();
    let mut out: Vec<WatchEvent> = deleted.map(|r| WatchEvent::Deleted { object: r.clone() }).collect();
    for (k, o) in after {
        if before.get(&k) != Some(&o) {
            out.push(WatchEvent::Applied { object: Box::new(o) });
        }
    }
    out
}

/// The node events that turn `old`'s nodes into `new`'s: joined, left, or updated.
pub fn node_changes(old: &Cluster, new: &Cluster) -> Vec<NodeEvent> {
    let left = old.nodes.keys().filter(|n| !new.nodes.contains_key(*n)).map(|n| (n, NodeChange::Left));
    let rest = new.nodes.iter().filter_map(|(n, node)| match old.nodes.get(n) {
        None => Some((n, NodeChange::Joined)),
        Some(before) if before != node => Some((n, NodeChange::Updated)),
        Some(_) => None,
    });
    let mut out: Vec<NodeEvent> = left.chain(rest).map(|(n, change)| NodeEvent { name: n.clone(), change }).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SourceInfo {
        SourceInfo { mode: Mode::Demo, node: "node-1".into(), backend: "nftables".into(), version: "test".into() }
    }

    fn health(n: u64) -> Event {
        Event::Health(Health { healthy: n.is_multiple_of(2), message: format!("h{n}") })
    }

    #[test]
    fn journal_resumes_or_asks_for_a_snapshot() {
        let mut j = Journal::new(3);
        assert_eq!(j.since(0), Resume::Events(vec![]));
        for n in 1..=5 {
            j.push(n, health(n));
        }
        // Kept: 3, 4, 5.
        assert_eq!(j.last_seq(), 5);
        let seqs = |r: Resume| match r {
            Resume::Events(v) => Some(v.iter().map(|e| e.seq).collect::<Vec<_>>()),
            Resume::Snapshot => None,
        };
        assert_eq!(seqs(j.since(2)), Some(vec![3, 4, 5]));
        assert_eq!(seqs(j.since(4)), Some(vec![5]));
        assert_eq!(seqs(j.since(5)), Some(vec![]));
        assert_eq!(seqs(j.since(1)), None, "event 2 is gone");
        assert_eq!(seqs(j.since(9)), None, "a number from another run");
    }

    #[test]
    fn messages_round_trip_and_unknown_fields_are_refused() {
        let mut state = StreamState::new(source(), crate::demo::cluster());
        let e = Sequenced { seq: 1, time_ms: 10, event: health(1) };
        state.apply(&e);
        let snap = ServerMessage::Snapshot(state.snapshot());
        let text = snap.to_json();
        assert_eq!(ServerMessage::from_json(&text).expect("decodes"), snap);
        let ev = ServerMessage::Event(e);
        assert_eq!(ServerMessage::from_json(&ev.to_json()).expect("decodes"), ev);

        // Every kind of event decodes (a field named like the tag would not).
        let sync = Event::Sync(sync_event(SyncKind::Full));
        let ev = ServerMessage::Event(Sequenced { seq: 2, time_ms: 0, event: sync });
        assert_eq!(ServerMessage::from_json(&ev.to_json()).expect("decodes"), ev);

        let bad = r#"{"type":"event","seq":1,"timeMs":0,"event":{"kind":"health","healthy":true,"extra":1}}"#;
        let err = ServerMessage::from_json(bad).expect_err("unknown field");
        assert!(err.to_string().contains("extra"), "{err}");
    }

    /// A sync of node-1 that named no services.
    fn sync_event(kind: SyncKind) -> SyncEvent {
        SyncEvent {
            node: "node-1".into(),
            backend: "nftables".into(),
            kind,
            ok: true,
            duration_ms: 1.0,
            render_ms: 0.5,
            rules: 3,
            changed: 3,
            services: vec![],
            services_omitted: 0,
            error: None,
        }
    }

    /// A sync event names at most `SYNC_SERVICES_LISTED` services and counts the others, on the
    /// wire too.
    #[test]
    fn sync_events_name_a_bounded_number_of_services() {
        let keys: Vec<ObjectKey> = (0..3_000).map(|i| ObjectKey::new("churn", format!("bulk-{i}"))).collect();
        let blank = sync_event(SyncKind::Partial);
        let big = blank.clone().with_services(&keys);
        assert_eq!(big.services, keys[..SYNC_SERVICES_LISTED]);
        assert_eq!(big.services_omitted, 3_000 - SYNC_SERVICES_LISTED);
        let small = blank.clone().with_services(&keys[..2]);
        assert_eq!((small.services.len(), small.services_omitted), (2, 0));
        for e in [big, small] {
            let m = ServerMessage::Event(Sequenced { seq: 1, time_ms: 0, event: Event::Sync(e) });
            let text = m.to_json();
            assert!(text.len() < 2_000, "{} bytes", text.len());
            assert_eq!(ServerMessage::from_json(&text).expect("decodes"), m);
        }
        assert!(
            !ServerMessage::Event(Sequenced { seq: 1, time_ms: 0, event: Event::Sync(blank) })
                .to_json()
                .contains("servicesOmitted")
        );
    }

    /// A node that joins, one that leaves and one that changes are each said once.
    #[test]
    fn node_changes_name_each_node_once() {
        let old = crate::demo::cluster();
        let mut new = old.clone();
        new.nodes.remove("node-2");
        let mut n4 = new.nodes["node-1"].clone();
        n4.name = "node-4".into();
        new.nodes.insert("node-4".into(), n4);
        if let Some(n) = new.nodes.get_mut("node-3") {
            n.labels.insert("x".into(), "y".into());
        }
        let got: Vec<(String, NodeChange)> = node_changes(&old, &new).into_iter().map(|e| (e.name, e.change)).collect();
        assert_eq!(
            got,
            vec![
                ("node-2".into(), NodeChange::Left),
                ("node-3".into(), NodeChange::Updated),
                ("node-4".into(), NodeChange::Joined)
            ]
        );
        assert!(node_changes(&old, &old).is_empty());
    }

    #[test]
    fn state_from_a_snapshot_equals_the_state_it_was_taken_from() {
        let mut a = StreamState::new(source(), crate::demo::cluster());
        let mut next = crate::demo::cluster();
        next.services.retain(|k, _| k.name != "nginx-svc");
        for (i, w) in watch_diff(&a.cluster, &next).into_iter().enumerate() {
            a.apply(&Sequenced { seq: i as u64 + 1, time_ms: 0, event: Event::Watch(w) });
        }
        assert_eq!(a.cluster, next);
        let b = StreamState::from_snapshot(a.snapshot());
        assert_eq!(b.cluster, a.cluster);
        assert_eq!(b.seq, a.seq);
    }
}
