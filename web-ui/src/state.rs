//! The dashboard's state and its reducer: the engine's [`StreamState`] (what the stream says about
//! the cluster) plus what the user is looking at. Plain Rust, no browser: every data source (the
//! live WebSocket, the demo scenario in the page, pasted YAML) ends up as [`Action`]s here, and
//! the components only render a [`Model`].
//!
//! Events are not applied as they arrive: they are queued and [`Model::apply_pending`] folds a
//! bounded batch once per animation frame, so a burst of thousands of events costs one render,
//! not thousands. Memory is bounded everywhere: the stream state keeps the last flows, syncs and
//! timeline entries; the queue, the chart counters and the flow cache have caps.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::flow::DestinationKind;
use switchyard_engine::model::ObjectKey;
use switchyard_engine::protocol::{
    Event, FlowEvent, FlowState, Mode, RECENT_FLOWS, Sequenced, Snapshot, SourceInfo, StreamState,
};
use switchyard_engine::trace::SocketAddr;

/// Events waiting for a frame beyond this are shed, oldest flows first (watch events are kept:
/// losing one would leave the cluster view wrong).
pub const MAX_PENDING: usize = 50_000;
/// Services and endpoints the connection-spread chart keeps counters for.
pub const MAX_SPREAD_SERVICES: usize = 256;
pub const MAX_SPREAD_ENDPOINTS: usize = 256;
/// Flows shown in the recent-flows list (the stream state keeps [`RECENT_FLOWS`]).
pub const LIST_FLOWS: usize = 60;

/// The six views, in the order of their keyboard shortcuts `1`..`6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    Cluster,
    Service,
    Flows,
    Composer,
    Events,
    Charts,
}

impl View {
    pub const ALL: [View; 6] = [View::Cluster, View::Service, View::Flows, View::Composer, View::Events, View::Charts];

    pub fn title(self) -> &'static str {
        match self {
            View::Cluster => "Cluster",
            View::Service => "Service",
            View::Flows => "Flows",
            View::Composer => "Packet composer",
            View::Events => "Events",
            View::Charts => "Charts",
        }
    }

    /// `1`..`6`.
    pub fn from_key(key: &str) -> Option<View> {
        let n: usize = key.parse().ok()?;
        View::ALL.get(n.checked_sub(1)?).copied()
    }

    /// The slug used in ids and test selectors.
    pub fn slug(self) -> &'static str {
        match self {
            View::Cluster => "cluster",
            View::Service => "service",
            View::Flows => "flows",
            View::Composer => "composer",
            View::Events => "events",
            View::Charts => "charts",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Theme {
    /// Follows `prefers-color-scheme`.
    System,
    Light,
    Dark,
}

impl Theme {
    /// The toggle cycles system → light → dark.
    pub fn next(self) -> Theme {
        match self {
            Theme::System => Theme::Light,
            Theme::Light => Theme::Dark,
            Theme::Dark => Theme::System,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Theme::System => "system",
            Theme::Light => "light",
            Theme::Dark => "dark",
        }
    }

    pub fn parse(s: &str) -> Theme {
        match s {
            "light" => Theme::Light,
            "dark" => Theme::Dark,
            _ => Theme::System,
        }
    }
}

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// The agent's WebSocket on the page's own origin.
    Live,
    /// The engine's demo scenario, running in the page.
    Demo,
    /// Objects the user pasted or uploaded (the file name, for the header).
    Offline { file: String },
}

/// The live stream's link, as the banner shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Connection {
    /// Not a live source.
    Local,
    Connecting {
        attempt: u32,
    },
    Open,
    /// Down; the next attempt is in `retry_ms`.
    Down {
        attempt: u32,
        retry_ms: u32,
        reason: String,
    },
}

/// How the page decides its source: `?demo` or a file/static server means demo; `?live` forces
/// live; otherwise it tries live and falls back to the demo if no agent ever answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Demo,
    Live { fall_back_to_demo: bool },
}

pub fn choose_start(protocol: &str, search: &str) -> Start {
    let flags: BTreeSet<&str> = search
        .trim_start_matches('?')
        .split('&')
        .map(|kv| kv.split_once('=').map(|(k, _)| k).unwrap_or(kv))
        .filter(|k| !k.is_empty())
        .collect();
    if flags.contains("demo") {
        Start::Demo
    } else if flags.contains("live") {
        Start::Live { fall_back_to_demo: false }
    } else if protocol == "file:" {
        Start::Demo
    } else {
        Start::Live { fall_back_to_demo: true }
    }
}

/// Reconnection delays: doubling from 500 ms to 10 s, so a restarted agent is found quickly and a
/// dead one is not hammered. Deterministic (no jitter): there is one dashboard per browser tab.
pub fn backoff_ms(attempt: u32) -> u32 {
    let doubled = 500u64.saturating_mul(1u64 << attempt.min(10));
    doubled.min(10_000) as u32
}

/// How the selected flow's diagram plays (pausing and stepping belong to the diagram itself:
/// only it knows where it is).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Animation {
    /// 0.25 to 4.
    pub speed: f64,
    /// Pick the newest flow automatically when the current one finished playing.
    pub follow: bool,
}

impl Default for Animation {
    fn default() -> Self {
        Animation { speed: 1.0, follow: true }
    }
}

pub const SPEEDS: [f64; 5] = [0.25, 0.5, 1.0, 2.0, 4.0];

/// Connections per endpoint of one service: how many were seen, and how many the tracer's
/// probabilities expected (the sum, over the flows, of each outcome's probability).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spread {
    pub flows: u64,
    pub endpoints: BTreeMap<SocketAddr, EndpointShare>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EndpointShare {
    pub observed: u64,
    pub expected: f64,
}

/// Counters about the stream itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub applied: u64,
    /// Shed because the queue was full.
    pub shed: u64,
    /// Flow events folded as counters only because newer flows in the same batch evicted them.
    pub skipped: u64,
}

/// What a flow in the list shows.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRow {
    pub seq: u64,
    pub time_ms: u64,
    pub flow: Rc<FlowEvent>,
    /// Its connection was closed since.
    pub closed: bool,
}

/// Everything the dashboard shows.
#[derive(Debug, Clone)]
pub struct Model {
    /// `None` until the first snapshot (live) or the scenario's start (demo).
    pub stream: Option<StreamState>,
    pub source: DataSource,
    pub connection: Connection,
    pub view: View,
    pub theme: Theme,
    pub animation: Animation,
    /// The flow the diagram shows; kept even after the stream state evicted it.
    pub selected_flow: Option<FlowRow>,
    pub selected_service: Option<ObjectKey>,
    /// The node whose program the service view renders.
    pub program_node: Option<String>,
    pub program_backend: switchyard_engine::policy::Backend,
    /// Only flows to this kind of destination in the list.
    pub flow_filter: Option<DestinationKind>,
    pub pending: VecDeque<Sequenced>,
    pub spread: BTreeMap<ObjectKey, Spread>,
    pub counters: Counters,
    /// Flows (id) whose `Destroyed` event was seen, bounded like the flow list.
    closed: VecDeque<u64>,
    /// Decoded flows, shared with the list and the diagram without copying (by seq).
    flow_cache: BTreeMap<u64, Rc<FlowEvent>>,
    /// Something the user should read (a parse error, an unreachable trace endpoint).
    pub notice: Option<String>,
    /// Bumped whenever the cluster may have changed, so views can cache what they derive from it.
    pub cluster_version: u64,
}

/// Everything that changes the model.
#[derive(Debug, Clone)]
pub enum Action {
    /// A fresh snapshot: the state starts again from it (first connect, or fell too far behind).
    Snapshot(Box<Snapshot>),
    /// Start from a cluster without a server (demo start, pasted objects).
    Start {
        source: SourceInfo,
        cluster: Box<Cluster>,
        data: DataSource,
    },
    /// Events to queue; they are applied by the next [`Action::Frame`].
    Events(Vec<Sequenced>),
    /// An animation frame: apply up to this many queued events.
    Frame {
        budget: usize,
    },
    Connection(Connection),
    SetView(View),
    SelectFlow(u64),
    /// Select the newest flow (matching the filter).
    SelectLatest,
    SelectService(ObjectKey),
    ProgramNode(String),
    ProgramBackend(switchyard_engine::policy::Backend),
    FilterFlows(Option<DestinationKind>),
    ToggleTheme,
    SetTheme(Theme),
    SetSpeed(f64),
    ToggleFollow,
    Notice(Option<String>),
}

impl Model {
    pub fn new(source: DataSource) -> Self {
        let connection = match source {
            DataSource::Live => Connection::Connecting { attempt: 0 },
            _ => Connection::Local,
        };
        Model {
            stream: None,
            source,
            connection,
            view: View::Flows,
            theme: Theme::System,
            animation: Animation::default(),
            selected_flow: None,
            selected_service: None,
            program_node: None,
            program_backend: switchyard_engine::policy::Backend::Nftables,
            flow_filter: None,
            pending: VecDeque::new(),
            spread: BTreeMap::new(),
            counters: Counters::default(),
            closed: VecDeque::new(),
            flow_cache: BTreeMap::new(),
            notice: None,
            cluster_version: 0,
        }
    }

    /// Applies one action; returns whether anything visible changed (Yew re-renders only then).
    pub fn reduce(&mut self, action: Action) -> bool {
        match action {
            Action::Snapshot(s) => {
                let state = StreamState::from_snapshot(*s);
                self.reset(state);
                true
            }
            Action::Start { source, cluster, data } => {
                self.source = data;
                self.connection = Connection::Local;
                self.reset(StreamState::new(source, *cluster));
                true
            }
            Action::Events(events) => {
                self.enqueue(events);
                false
            }
            Action::Frame { budget } => self.apply_pending(budget) > 0,
            Action::Connection(c) => {
                let changed = self.connection != c;
                self.connection = c;
                changed
            }
            Action::SetView(v) => replace(&mut self.view, v),
            Action::SelectFlow(seq) => {
                let row = self.flow_rows().into_iter().find(|r| r.seq == seq);
                if row.is_some() {
                    self.selected_flow = row;
                    self.animation.follow = false;
                }
                true
            }
            Action::SelectLatest => {
                let latest = self.flow_rows().into_iter().find(|r| r.flow.diagram.is_some());
                if latest.as_ref().map(|r| r.seq) != self.selected_flow.as_ref().map(|r| r.seq) && latest.is_some() {
                    self.selected_flow = latest;
                    return true;
                }
                false
            }
            Action::SelectService(k) => replace(&mut self.selected_service, Some(k)),
            Action::ProgramNode(n) => replace(&mut self.program_node, Some(n)),
            Action::ProgramBackend(b) => replace(&mut self.program_backend, b),
            Action::FilterFlows(f) => replace(&mut self.flow_filter, f),
            Action::ToggleTheme => {
                self.theme = self.theme.next();
                true
            }
            Action::SetTheme(t) => replace(&mut self.theme, t),
            Action::SetSpeed(s) => replace(&mut self.animation.speed, s.clamp(SPEEDS[0], SPEEDS[SPEEDS.len() - 1])),
            Action::ToggleFollow => {
                self.animation.follow = !self.animation.follow;
                true
            }
            Action::Notice(n) => replace(&mut self.notice, n),
        }
    }

    fn reset(&mut self, state: StreamState) {
        self.pending.clear();
        self.spread.clear();
        self.closed.clear();
        self.flow_cache.clear();
        // Counters and the chart data describe what the state holds: count its flows in.
        let flows: Vec<Sequenced> = state.flows.iter().cloned().collect();
        self.program_node = self
            .program_node
            .take()
            .filter(|n| state.cluster.nodes.contains_key(n))
            .or_else(|| Some(state.source.node.clone()).filter(|n| state.cluster.nodes.contains_key(n)))
            .or_else(|| state.cluster.nodes.keys().next().cloned());
        if self.selected_service.as_ref().is_some_and(|k| !state.cluster.services.contains_key(k)) {
            self.selected_service = None;
        }
        if self.selected_service.is_none() {
            self.selected_service = state.cluster.services.keys().next().cloned();
        }
        self.stream = Some(state);
        self.cluster_version += 1;
        for e in &flows {
            if let Event::Flow(f) = &e.event {
                count_flow(&mut self.spread, &mut self.closed, f);
            }
        }
        self.refresh_cache();
        if self.animation.follow && self.selected_flow.is_none() {
            self.reduce(Action::SelectLatest);
        }
    }

    /// Queues events; when the queue is full the oldest flow events make room.
    pub fn enqueue(&mut self, events: impl IntoIterator<Item = Sequenced>) {
        for e in events {
            self.counters.received += 1;
            self.pending.push_back(e);
        }
        if self.pending.len() > MAX_PENDING {
            let mut excess = self.pending.len() - MAX_PENDING;
            let before = self.pending.len();
            self.pending.retain(|e| {
                if excess > 0 && matches!(e.event, Event::Flow(_)) {
                    excess -= 1;
                    false
                } else {
                    true
                }
            });
            self.counters.shed += (before - self.pending.len()) as u64;
        }
    }

    /// Folds up to `budget` queued events into the state; returns how many. Flow events that the
    /// same batch would push out of the bounded flow list again are only counted, not stored: at
    /// thousands of events a second most flows never reach the screen.
    pub fn apply_pending(&mut self, budget: usize) -> usize {
        let n = budget.min(self.pending.len());
        if n == 0 {
            return 0;
        }
        let Some(stream) = self.stream.as_mut() else {
            // Events before any snapshot have nothing to apply to; the next snapshot covers them.
            return 0;
        };
        let batch: Vec<Sequenced> = self.pending.drain(..n).collect();
        let flows_in_batch = batch.iter().filter(|e| matches!(e.event, Event::Flow(_))).count();
        let mut to_skip = flows_in_batch.saturating_sub(RECENT_FLOWS);
        // Flows that made it into the stream state, moved (not copied) into the shared cache.
        let mut fresh: Vec<(u64, Box<FlowEvent>)> = Vec::new();
        for e in batch {
            if e.seq != 0 && e.seq <= stream.seq {
                // A replayed overlap after a reconnect: already folded in.
                continue;
            }
            if let Event::Flow(f) = &e.event {
                count_flow(&mut self.spread, &mut self.closed, f);
                if to_skip > 0 {
                    to_skip -= 1;
                    stream.seq = stream.seq.max(e.seq);
                    stream.time_ms = stream.time_ms.max(e.time_ms);
                    self.counters.skipped += 1;
                    continue;
                }
            }
            if matches!(e.event, Event::Watch(_)) {
                self.cluster_version += 1;
            }
            stream.apply(&e);
            if let Event::Flow(f) = e.event {
                fresh.push((e.seq, f));
            }
        }
        self.counters.applied += n as u64;
        let keep: BTreeSet<u64> = stream.flows.iter().map(|e| e.seq).collect();
        self.flow_cache.retain(|seq, _| keep.contains(seq));
        for (seq, f) in fresh {
            if keep.contains(&seq) {
                self.flow_cache.insert(seq, Rc::new(*f));
            }
        }
        if self.animation.follow && self.selected_flow.is_none() {
            self.reduce(Action::SelectLatest);
        }
        n
    }

    /// Keeps one shared copy of each flow the stream state holds, and no others.
    fn refresh_cache(&mut self) {
        let Some(stream) = &self.stream else { return };
        let keep: BTreeSet<u64> = stream.flows.iter().map(|e| e.seq).collect();
        self.flow_cache.retain(|seq, _| keep.contains(seq));
        for e in &stream.flows {
            if let Event::Flow(f) = &e.event
                && !self.flow_cache.contains_key(&e.seq)
            {
                self.flow_cache.insert(e.seq, Rc::new((**f).clone()));
            }
        }
    }

    /// The recent flows (their `New` events), newest first, filtered, at most [`LIST_FLOWS`].
    pub fn flow_rows(&self) -> Vec<FlowRow> {
        let Some(stream) = &self.stream else { return Vec::new() };
        let closed: BTreeSet<u64> = self.closed.iter().copied().collect();
        stream
            .flows
            .iter()
            .rev()
            .filter_map(|e| {
                let f = self.flow_cache.get(&e.seq)?;
                (f.state == FlowState::New && self.flow_filter.is_none_or(|k| f.destination == k)).then(|| FlowRow {
                    seq: e.seq,
                    time_ms: e.time_ms,
                    flow: f.clone(),
                    closed: closed.contains(&f.id),
                })
            })
            .take(LIST_FLOWS)
            .collect()
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.stream.as_ref().map(|s| &s.cluster)
    }

    pub fn mode_label(&self) -> String {
        match (&self.source, self.stream.as_ref().map(|s| s.source.mode)) {
            (DataSource::Offline { file }, _) => format!("offline: {file}"),
            (DataSource::Demo, _) => "demo".into(),
            // `switchyard demo` streams its scenario like an agent streams a node.
            (DataSource::Live, Some(Mode::Demo)) => "live: demo scenario".into(),
            (DataSource::Live, _) => "live".into(),
        }
    }

    /// The sequence number to resume from after a reconnect.
    pub fn resume_seq(&self) -> Option<u64> {
        self.stream.as_ref().map(|s| s.seq).filter(|s| *s > 0)
    }
}

/// Counts a flow into the connection spread, or notes that its connection closed.
fn count_flow(spread_by: &mut BTreeMap<ObjectKey, Spread>, closed: &mut VecDeque<u64>, f: &FlowEvent) {
    if f.state == FlowState::Destroyed {
        if closed.len() == RECENT_FLOWS {
            closed.pop_front();
        }
        closed.push_back(f.id);
        return;
    }
    let (Some(service), Some(endpoint)) = (&f.service, f.endpoint) else { return };
    if !spread_by.contains_key(service) && spread_by.len() >= MAX_SPREAD_SERVICES {
        return;
    }
    let spread = spread_by.entry(service.clone()).or_default();
    spread.flows += 1;
    let mut add = |ep: SocketAddr, observed: u64, expected: f64| {
        if let Some(s) = spread.endpoints.get_mut(&ep) {
            s.observed += observed;
            s.expected += expected;
        } else if spread.endpoints.len() < MAX_SPREAD_ENDPOINTS {
            spread.endpoints.insert(ep, EndpointShare { observed, expected });
        }
    };
    add(endpoint, 1, 0.0);
    for o in &f.outcomes {
        add(o.endpoint, 0, o.probability);
    }
}

fn replace<T: PartialEq>(slot: &mut T, value: T) -> bool {
    if *slot == value {
        false
    } else {
        *slot = value;
        true
    }
}

/// Bins for a histogram of `values` (e.g. sync durations): `bins` equal ranges from 0 to the
/// largest value, as `(lower bound, upper bound, count)`.
pub fn histogram(values: &[f64], bins: usize) -> Vec<(f64, f64, u32)> {
    let bins = bins.max(1);
    let max = values.iter().copied().filter(|v| v.is_finite()).fold(0.0_f64, f64::max);
    let width = if max > 0.0 { max / bins as f64 } else { 1.0 };
    let mut out: Vec<(f64, f64, u32)> = (0..bins).map(|i| (i as f64 * width, (i + 1) as f64 * width, 0)).collect();
    for v in values.iter().copied().filter(|v| v.is_finite() && *v >= 0.0) {
        let i = ((v / width) as usize).min(bins - 1);
        out[i].2 += 1;
    }
    out
}

/// `(observed share, expected share)` per endpoint of a service, each summing to 1 (when any).
pub fn shares(spread: &Spread) -> Vec<(SocketAddr, f64, f64)> {
    let observed: u64 = spread.endpoints.values().map(|e| e.observed).sum();
    let expected: f64 = spread.endpoints.values().map(|e| e.expected).sum();
    spread
        .endpoints
        .iter()
        .map(|(ep, s)| {
            let o = if observed > 0 { s.observed as f64 / observed as f64 } else { 0.0 };
            let e = if expected > 0.0 { s.expected / expected } else { 0.0 };
            (*ep, o, e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::demo::scenario::Scenario;
    use switchyard_engine::protocol::{Health, Journal, SyncEvent, SyncKind};

    fn demo_events(until: u64) -> Vec<Sequenced> {
        let mut s = Scenario::new(11);
        let mut j = Journal::new(100_000);
        s.advance(until, &mut || 0.0).into_iter().map(|(t, e)| j.push(t, e).clone()).collect()
    }

    fn started() -> Model {
        let mut m = Model::new(DataSource::Demo);
        m.reduce(Action::Start {
            source: Scenario::source(),
            cluster: Box::new(switchyard_engine::demo::cluster()),
            data: DataSource::Demo,
        });
        m
    }

    /// Queued events change nothing until a frame applies them; then the cluster equals the
    /// scenario's, exactly as the engine's own stream state would fold them.
    #[test]
    fn events_apply_per_frame_and_follow_the_scenario() {
        let mut m = started();
        let events = demo_events(30_000);
        let mut reference = StreamState::new(Scenario::source(), switchyard_engine::demo::cluster());
        for e in &events {
            reference.apply(e);
        }
        assert!(!m.reduce(Action::Events(events.clone())));
        assert_eq!(m.pending.len(), events.len());
        assert_eq!(m.stream.as_ref().map(|s| s.seq), Some(0));
        while m.reduce(Action::Frame { budget: 7 }) {}
        let s = m.stream.as_ref().expect("started");
        assert_eq!(s.cluster, reference.cluster);
        assert_eq!(s.seq, reference.seq);
        assert_eq!(m.counters.applied, events.len() as u64);
        assert!(m.pending.is_empty());
    }

    /// A burst far larger than the flow list costs no more memory than the list, counters stay
    /// exact, and the newest flows are the ones kept.
    #[test]
    fn a_burst_of_flows_keeps_memory_bounded_and_the_newest_flows() {
        let mut m = started();
        let flow = demo_events(20_000)
            .into_iter()
            .find_map(|e| match e.event {
                Event::Flow(f) if f.state == FlowState::New && f.service.is_some() && f.endpoint.is_some() => Some(f),
                _ => None,
            })
            .expect("the demo sends flows");
        let burst: Vec<Sequenced> = (1..=5_000u64)
            .map(|seq| Sequenced {
                seq,
                time_ms: seq,
                event: Event::Flow(Box::new(FlowEvent { id: seq, ..(*flow).clone() })),
            })
            .collect();
        m.reduce(Action::Events(burst));
        assert!(m.reduce(Action::Frame { budget: 5_000 }));
        let s = m.stream.as_ref().expect("started");
        assert_eq!(s.flows.len(), RECENT_FLOWS);
        assert_eq!(s.seq, 5_000);
        assert_eq!(s.flows.back().map(|e| e.seq), Some(5_000));
        assert_eq!(m.counters.skipped, 5_000 - RECENT_FLOWS as u64);
        assert!(m.flow_cache.len() <= RECENT_FLOWS);
        let spread = &m.spread[flow.service.as_ref().expect("service")];
        assert_eq!(spread.flows, 5_000, "every flow is counted, stored or not");
        let rows = m.flow_rows();
        assert_eq!(rows.len(), LIST_FLOWS);
        assert_eq!(rows[0].seq, 5_000, "newest first");
    }

    #[test]
    fn the_queue_sheds_flows_but_never_watch_events() {
        let mut m = Model::new(DataSource::Live);
        let watch = demo_events(10_000).into_iter().find(|e| matches!(e.event, Event::Watch(_))).expect("watch");
        let flow = demo_events(5_000).into_iter().find(|e| matches!(e.event, Event::Flow(_))).expect("flow");
        m.enqueue([watch]);
        m.enqueue((0..MAX_PENDING + 10).map(|_| flow.clone()));
        assert_eq!(m.pending.len(), MAX_PENDING);
        assert!(matches!(m.pending[0].event, Event::Watch(_)));
        assert_eq!(m.counters.shed, 11);
    }

    /// Following picks the newest flow; a click pins one and stops following.
    #[test]
    fn selection_follows_until_the_user_picks() {
        let mut m = started();
        m.reduce(Action::Events(demo_events(20_000)));
        m.reduce(Action::Frame { budget: usize::MAX });
        let rows = m.flow_rows();
        assert!(rows.len() > 3);
        assert!(m.selected_flow.is_some(), "follow selects a flow as soon as there is one");
        m.reduce(Action::SelectLatest);
        assert_eq!(m.selected_flow.as_ref().map(|r| r.seq), Some(rows[0].seq));
        m.reduce(Action::SelectFlow(rows[2].seq));
        assert_eq!(m.selected_flow.as_ref().map(|r| r.seq), Some(rows[2].seq));
        assert!(!m.animation.follow);
    }

    #[test]
    fn filter_and_closed_flows() {
        let mut m = started();
        m.reduce(Action::Events(demo_events(40_000)));
        m.reduce(Action::Frame { budget: usize::MAX });
        assert!(m.flow_rows().iter().any(|r| r.closed), "TCP flows close after a few seconds");
        m.reduce(Action::FilterFlows(Some(DestinationKind::NodePort)));
        let rows = m.flow_rows();
        assert!(!rows.is_empty());
        assert!(rows.iter().all(|r| r.flow.destination == DestinationKind::NodePort));
    }

    /// A snapshot replaces everything; the resume point is its sequence number and events at or
    /// before it are ignored when a reconnect replays an overlap.
    #[test]
    fn snapshot_then_resume() {
        let mut m = Model::new(DataSource::Live);
        let events = demo_events(15_000);
        let mut st = StreamState::new(Scenario::source(), switchyard_engine::demo::cluster());
        let half = events.len() / 2;
        for e in &events[..half] {
            st.apply(e);
        }
        m.reduce(Action::Snapshot(Box::new(st.snapshot())));
        assert_eq!(m.resume_seq(), Some(events[half - 1].seq));
        assert!(m.selected_flow.is_some(), "following picks a flow from the snapshot");
        assert_eq!(m.mode_label(), "live: demo scenario");
        assert_eq!(m.program_node.as_deref(), Some("node-1"));
        // The server replays from a little before: the overlap is ignored.
        m.reduce(Action::Events(events[half - 5..].to_vec()));
        m.reduce(Action::Frame { budget: usize::MAX });
        for e in &events[half..] {
            st.apply(e);
        }
        let s = m.stream.as_ref().expect("snapshot");
        assert_eq!(s.cluster, st.cluster);
        assert_eq!(s.flows.len(), st.flows.len());
    }

    #[test]
    fn views_by_key_theme_cycle_and_start() {
        assert_eq!(View::from_key("1"), Some(View::Cluster));
        assert_eq!(View::from_key("6"), Some(View::Charts));
        assert_eq!(View::from_key("0"), None);
        assert_eq!(View::from_key("7"), None);
        assert_eq!(Theme::System.next().next().next(), Theme::System);
        assert_eq!(choose_start("http:", "?demo"), Start::Demo);
        assert_eq!(choose_start("file:", ""), Start::Demo);
        assert_eq!(choose_start("http:", "?live&x=1"), Start::Live { fall_back_to_demo: false });
        assert_eq!(choose_start("https:", ""), Start::Live { fall_back_to_demo: true });
        assert_eq!(choose_start("http:", "?demo=1"), Start::Demo);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let d: Vec<u32> = (0..8).map(backoff_ms).collect();
        assert_eq!(d, vec![500, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000]);
        assert_eq!(backoff_ms(u32::MAX), 10_000);
    }

    #[test]
    fn histogram_counts_every_value_once() {
        let h = histogram(&[0.0, 0.5, 1.0, 2.0, 4.0, 4.0], 4);
        assert_eq!(h.len(), 4);
        assert_eq!(h.iter().map(|b| b.2).sum::<u32>(), 6);
        assert_eq!(h[3].2, 2, "the maximum falls in the last bin");
        assert_eq!(histogram(&[], 3).iter().map(|b| b.2).sum::<u32>(), 0);
    }

    /// The demo's flows to nginx spread over its endpoints; observed and expected shares each sum
    /// to one.
    #[test]
    fn spread_shares_sum_to_one() {
        let mut m = started();
        m.reduce(Action::Events(demo_events(60_000)));
        m.reduce(Action::Frame { budget: usize::MAX });
        let nginx = ObjectKey::new("default", "nginx-svc");
        let s = shares(&m.spread[&nginx]);
        assert!(s.len() >= 2, "{s:?}");
        let (o, e): (f64, f64) = s.iter().fold((0.0, 0.0), |a, x| (a.0 + x.1, a.1 + x.2));
        assert!((o - 1.0).abs() < 1e-9 && (e - 1.0).abs() < 1e-9, "{o} {e}");
    }

    #[test]
    fn health_and_sync_events_reach_the_timeline() {
        let mut m = started();
        let sync = SyncEvent {
            node: "node-1".into(),
            backend: "nftables".into(),
            kind: SyncKind::Full,
            ok: true,
            duration_ms: 1.0,
            render_ms: 1.0,
            rules: 10,
            changed: 10,
            services: vec![],
            services_omitted: 0,
            error: None,
        };
        m.reduce(Action::Events(vec![
            Sequenced { seq: 1, time_ms: 1, event: Event::Health(Health { healthy: false, message: "x".into() }) },
            Sequenced { seq: 2, time_ms: 2, event: Event::Sync(sync) },
        ]));
        m.reduce(Action::Frame { budget: 10 });
        let s = m.stream.as_ref().expect("started");
        assert_eq!(s.syncs.len(), 1);
        assert!(!s.health.healthy);
    }
}
