//! The sync loop as a state machine: [`State`] advanced by a pure [`State::step`], so every
//! timing rule is unit-tested without a runtime, a clock or a kernel.
//!
//! The runtime ([`crate::agent`]) feeds it [`Input`]s (the cluster changed, a timer fired, an
//! apply finished, each with the time read by the caller) and carries out the [`Action`]s it
//! returns (apply a program, wake me at, report a sync). The rules are kube-proxy's
//! (`pkg/proxy/iptables/proxier.go` and its `BoundedFrequencyRunner`):
//!
//! - **minSyncPeriod**: a sync starts at most once per `minSyncPeriod`; the first change after a
//!   quiet spell syncs at once, and a burst of changes within the period becomes one sync;
//! - **partial syncs**: only the services that changed since the last sync are planned again
//!   ([`policy::replan_in_place`], on a spare copy of the applied plan) and compared
//!   (`render_incremental_for(.., Some(changed))`); an unchanged program writes nothing;
//! - **full syncs** rewrite everything we own: the first sync, every `syncPeriod` (which repairs
//!   drift, e.g. a rule deleted by hand), after a change that can touch every service (a Node,
//!   the proxy configuration, a ServiceCIDR) and after any failure;
//! - **failures** keep the last applied program as the base of the next diff, and retry with an
//!   exponential backoff capped at [`Backoff::max`].

use std::collections::BTreeSet;
use std::time::Duration;

use switchyard_engine::cluster::{Cluster, Delta};
use switchyard_engine::model::ObjectKey;
use switchyard_engine::policy::{self, Backend, NodePlan};
use switchyard_engine::render;

/// What changed in the cluster, as the source saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose Service object changed (added, removed, edited).
    pub services: BTreeSet<ObjectKey>,
    /// Services whose endpoints (EndpointSlices, legacy Endpoints) changed.
    pub endpoints: BTreeSet<ObjectKey>,
    /// Something every service may depend on changed (a Node, the proxy configuration, a
    /// ServiceCIDR): the next sync must be full.
    pub all: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoints.is_empty() && !self.all
    }
}

/// Full or partial, as kube-proxy's metrics tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    Full,
    Partial,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
        }
    }
}

/// One event for the state machine; `now` is time since any fixed origin, read by the caller.
#[derive(Debug, Clone)]
pub enum Input {
    /// The cluster is now `cluster`; `changes` says what differs from the previous one.
    Cluster { now: Duration, cluster: Box<Cluster>, changes: Changes },
    /// The cluster changed by these objects only (a source that knows what it changed: no whole
    /// cluster to copy, compare or free); `changes` says which services they touch.
    Delta { now: Duration, deltas: Vec<Delta>, changes: Changes },
    /// The wake-up asked for by [`Action::Wake`] (or any earlier one) fired.
    Tick { now: Duration },
    /// The program of the last [`Action::Apply`] was applied (`error: None`) or not. `took` is
    /// the whole sync, rendering included.
    Applied { now: Duration, took: Duration, error: Option<String> },
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Load this program or transaction (one kernel transaction), then send [`Input::Applied`].
    Apply { kind: SyncKind, program: String },
    /// Send [`Input::Tick`] at `at` (replaces any earlier wake-up).
    Wake { at: Duration },
    /// A sync ended; publish it (metrics, events, health).
    Report(SyncReport),
    /// Delete these UDP conntrack entries: the endpoint they point at is gone from the program,
    /// and UDP has no connection end to make them expire, so the client would keep sending into
    /// the void (kube-proxy's `conntrack.CleanStaleEntries`).
    FlushConntrack(Vec<StaleUdp>),
}

/// A UDP flow to a service frontend that conntrack may still translate to a removed endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleUdp {
    /// The frontend address (cluster, external or load-balancer IP); `None` for a NodePort,
    /// which any node address can carry.
    pub frontend: Option<std::net::IpAddr>,
    pub port: u16,
    pub endpoint: std::net::IpAddr,
}

/// The UDP (frontend, endpoint) pairs the old program served and the new one does not.
pub fn stale_udp(old: &NodePlan, new: &NodePlan) -> Vec<StaleUdp> {
    use std::collections::BTreeMap;
    use switchyard_engine::model::Protocol;
    let mut out = Vec::new();
    for fo in &old.families {
        let udp_old: Vec<_> = fo.services.iter().filter(|s| s.protocol == Protocol::Udp).collect();
        if udp_old.is_empty() {
            continue;
        }
        let now: BTreeMap<_, _> = new
            .family(fo.family)
            .map(|f| {
                f.services
                    .iter()
                    .filter(|s| s.protocol == Protocol::Udp)
                    .map(|s| ((&s.name, s.cluster_ip), s))
                    .collect()
            })
            .unwrap_or_default();
        for s in udp_old {
            let kept: BTreeSet<std::net::IpAddr> = now
                .get(&(&s.name, s.cluster_ip))
                .map(|n| n.reachable_endpoints().iter().map(|e| e.ip).collect())
                .unwrap_or_default();
            for e in s.reachable_endpoints().iter().filter(|e| !kept.contains(&e.ip)) {
                for ip in std::iter::once(s.cluster_ip)
                    .chain(s.external_ips.iter().copied())
                    .chain(s.load_balancer_ips.iter().copied())
                {
                    out.push(StaleUdp { frontend: Some(ip), port: s.port, endpoint: e.ip });
                }
                if let Some(np) = s.node_port {
                    out.push(StaleUdp { frontend: None, port: np, endpoint: e.ip });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// One finished sync.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    pub kind: SyncKind,
    pub at: Duration,
    pub took: Duration,
    /// `None` when the kernel took the program.
    pub error: Option<String>,
    /// Whether anything was written (a partial sync with nothing to change writes nothing).
    pub wrote: bool,
    /// Failures in a row, this one included (0 after a success).
    pub consecutive_failures: u32,
    /// Service ports and endpoints in the program now in the kernel.
    pub service_ports: usize,
    pub endpoints: usize,
    /// Lines of the transaction sent to the kernel (0 when nothing was written).
    pub changed: usize,
    /// Rules and set elements of the node's program, counted at the last full sync (partial
    /// syncs do not render the whole program, so they do not recount).
    pub rules: usize,
    /// The services a partial sync was for (empty for a full sync).
    pub services: Vec<ObjectKey>,
}

/// Retry delays after failures: `initial`, doubled each time, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// The delay after `failures` failures in a row (1 or more).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }
}

#[derive(Debug, Clone)]
struct InFlight {
    kind: SyncKind,
    plan: NodePlan,
    changed: usize,
    /// The full program's rule count (full syncs only).
    rules: Option<usize>,
    services: Vec<ObjectKey>,
}

/// The sync loop's whole state.
#[derive(Debug, Clone)]
pub struct State {
    node: String,
    backend: Backend,
    backoff: Backoff,
    cluster: Cluster,
    /// The plan whose program the kernel holds: the base of every partial sync.
    applied: Option<NodePlan>,
    /// A copy of `applied` that the next partial sync replans in place. Copying a plan of
    /// 10,000 services takes ~6 ms, so it is made after a sync reached the kernel, not on the
    /// way from a change to the kernel.
    spare: Option<NodePlan>,
    in_flight: Option<InFlight>,
    pending_services: BTreeSet<ObjectKey>,
    pending_endpoints: BTreeSet<ObjectKey>,
    pending_all: bool,
    need_full: bool,
    /// When the last sync started (minSyncPeriod counts from there).
    last_start: Option<Duration>,
    /// When the last successful full sync started.
    last_full: Option<Duration>,
    failures: u32,
    retry_at: Option<Duration>,
    /// Rules and elements of the last full program applied.
    rules: usize,
}

impl State {
    /// A loop that has synced nothing yet: its first sync is full.
    pub fn new(node: impl Into<String>, backend: Backend, backoff: Backoff) -> Self {
        State {
            node: node.into(),
            backend,
            backoff,
            cluster: Cluster::default(),
            applied: None,
            spare: None,
            in_flight: None,
            pending_services: BTreeSet::new(),
            pending_endpoints: BTreeSet::new(),
            pending_all: false,
            need_full: true,
            last_start: None,
            last_full: None,
            failures: 0,
            retry_at: None,
            rules: 0,
        }
    }

    /// Service changes not yet synced (kube-proxy's `sync_proxy_rules_service_changes_pending`).
    pub fn pending_services(&self) -> usize {
        self.pending_services.len()
    }

    /// Services whose endpoint changes are not yet synced.
    pub fn pending_endpoints(&self) -> usize {
        self.pending_endpoints.len()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// The plan the kernel holds, if any sync succeeded.
    pub fn applied(&self) -> Option<&NodePlan> {
        self.applied.as_ref()
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn min_sync_period(&self) -> Duration {
        Duration::from_millis(self.cluster.config.min_sync_period_ms)
    }

    fn sync_period(&self) -> Duration {
        // A zero period would resync in a busy loop.
        Duration::from_millis(self.cluster.config.sync_period_ms.max(1000))
    }

    /// Advances the machine by one input. Pure: no IO, no clock.
    pub fn step(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        let now = match input {
            Input::Cluster { now, cluster, changes } => {
                self.cluster = *cluster;
                self.pending_services.extend(changes.services);
                self.pending_endpoints.extend(changes.endpoints);
                self.pending_all |= changes.all;
                now
            }
            Input::Delta { now, deltas, changes } => {
                for d in deltas {
                    self.cluster.patch(d);
                }
                self.pending_services.extend(changes.services);
                self.pending_endpoints.extend(changes.endpoints);
                self.pending_all |= changes.all;
                now
            }
            Input::Tick { now } => now,
            Input::Applied { now, took, error } => {
                self.finish(now, took, error, &mut out);
                now
            }
        };
        self.poll(now, &mut out);
        out
    }

    fn finish(&mut self, now: Duration, took: Duration, error: Option<String>, out: &mut Vec<Action>) {
        let Some(f) = self.in_flight.take() else { return };
        match &error {
            None => {
                if f.kind == SyncKind::Full {
                    self.last_full = self.last_start;
                }
                if let Some(old) = &self.applied {
                    let stale = stale_udp(old, &f.plan);
                    if !stale.is_empty() {
                        out.push(Action::FlushConntrack(stale));
                    }
                }
                self.applied = Some(f.plan);
                self.spare = self.applied.clone();
                if let Some(r) = f.rules {
                    self.rules = r;
                }
                self.failures = 0;
                self.retry_at = None;
            }
            Some(_) => {
                // What the kernel holds is now uncertain: the next sync rewrites everything, from
                // the last program known to be applied, after a growing pause.
                self.failures += 1;
                self.need_full = true;
                self.retry_at = Some(now + self.backoff.delay(self.failures));
            }
        }
        let r = self.report(f.kind, now, took, error, f.changed);
        out.push(Action::Report(SyncReport { services: f.services, ..r }));
    }

    fn report(
        &self,
        kind: SyncKind,
        at: Duration,
        took: Duration,
        error: Option<String>,
        changed: usize,
    ) -> SyncReport {
        let (service_ports, endpoints) = self.applied.as_ref().map(counts).unwrap_or((0, 0));
        SyncReport {
            kind,
            at,
            took,
            error,
            wrote: changed > 0,
            consecutive_failures: self.failures,
            service_ports,
            endpoints,
            changed,
            rules: self.rules,
            services: Vec::new(),
        }
    }

    /// Starts a sync if one is due and allowed, else says when to look again.
    fn poll(&mut self, now: Duration, out: &mut Vec<Action>) {
        if self.in_flight.is_some() {
            return;
        }
        let periodic_at = self.last_full.map(|t| t + self.sync_period());
        let full =
            self.applied.is_none() || self.need_full || self.pending_all || periodic_at.is_some_and(|t| now >= t);
        let pending = !self.pending_services.is_empty() || !self.pending_endpoints.is_empty();
        if !full && !pending {
            if let Some(at) = periodic_at {
                out.push(Action::Wake { at });
            }
            return;
        }
        let earliest = [self.last_start.map(|t| t + self.min_sync_period()), self.retry_at]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(now);
        if now < earliest {
            out.push(Action::Wake { at: earliest });
            return;
        }
        self.start(now, full, out);
    }

    fn start(&mut self, now: Duration, full: bool, out: &mut Vec<Action>) {
        let changed: BTreeSet<ObjectKey> = self.pending_services.union(&self.pending_endpoints).cloned().collect();
        self.pending_services.clear();
        self.pending_endpoints.clear();
        self.pending_all = false;
        self.last_start = Some(now);
        let (kind, plan, program) = match (&self.applied, full) {
            (Some(old), false) => {
                // Only Services changed (anything that reaches every service makes the sync
                // full): plan them again on the spare copy of the applied plan.
                let mut plan = self.spare.take().unwrap_or_else(|| old.clone());
                policy::replan_in_place(&mut plan, &self.cluster, &changed);
                let program = incremental(self.backend, old, &plan, &changed);
                (SyncKind::Partial, plan, program)
            }
            _ => {
                self.need_full = false;
                self.spare = None;
                let plan = policy::plan(&self.cluster, &self.node, self.backend);
                let program = full_program(self.backend, &plan);
                (SyncKind::Full, plan, program)
            }
        };
        let services = if kind == SyncKind::Partial { changed.into_iter().collect() } else { Vec::new() };
        if program.is_empty() {
            // Nothing to write: the kernel already holds this program.
            self.applied = Some(plan);
            self.spare = self.applied.clone();
            let r = self.report(kind, now, Duration::ZERO, None, 0);
            out.push(Action::Report(SyncReport { services, ..r }));
            if let Some(at) = self.last_full.map(|t| t + self.sync_period()) {
                out.push(Action::Wake { at });
            }
            return;
        }
        let rules = (kind == SyncKind::Full).then(|| switchyard_engine::render::rule_count(&program));
        let changed = program.lines().count();
        self.in_flight = Some(InFlight { kind, plan, changed, rules, services });
        out.push(Action::Apply { kind, program });
    }
}

fn full_program(backend: Backend, plan: &NodePlan) -> String {
    match backend {
        Backend::Nftables => render::nftables::render(plan),
        Backend::Iptables => render::iptables::render(plan),
        Backend::Ipvs => render::ipvs::render(plan),
    }
}

fn incremental(backend: Backend, old: &NodePlan, new: &NodePlan, changed: &BTreeSet<ObjectKey>) -> String {
    let changed = Some(changed);
    match backend {
        Backend::Nftables => render::nftables::render_incremental_for(old, new, changed),
        Backend::Iptables => render::iptables::render_incremental_for(old, new, changed),
        Backend::Ipvs => render::ipvs::render_incremental_for(old, new, changed),
    }
}

/// Service ports and endpoints of a plan (all families).
fn counts(plan: &NodePlan) -> (usize, usize) {
    let ports = plan.families.iter().map(|f| f.services.len()).sum();
    let eps = plan.families.iter().flat_map(|f| &f.services).map(|s| s.reachable_endpoints().len()).sum();
    (ports, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::demo;

    const MS: Duration = Duration::from_millis(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The demo cluster with minSyncPeriod 100 ms and syncPeriod 10 s.
    fn cluster() -> Cluster {
        let mut c = demo::cluster();
        c.config.min_sync_period_ms = 100;
        c.config.sync_period_ms = 10_000;
        c
    }

    fn nginx() -> ObjectKey {
        ObjectKey::new("default", "nginx-svc")
    }

    /// The cluster with nginx's endpoints gone, and the change that says so.
    fn without_nginx_endpoints(c: &Cluster) -> (Box<Cluster>, Changes) {
        let mut n = c.clone();
        n.endpoint_slices.retain(|_, s| s.service != "nginx-svc");
        let changes = Changes { endpoints: [nginx()].into(), ..Changes::default() };
        (Box::new(n), changes)
    }

    fn applies(actions: &[Action]) -> Vec<(SyncKind, &str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Apply { kind, program } => Some((*kind, program.as_str())),
                _ => None,
            })
            .collect()
    }

    fn wake(actions: &[Action]) -> Option<Duration> {
        actions.iter().find_map(|a| match a {
            Action::Wake { at } => Some(*at),
            _ => None,
        })
    }

    fn report(actions: &[Action]) -> Option<&SyncReport> {
        actions.iter().find_map(|a| match a {
            Action::Report(r) => Some(r),
            _ => None,
        })
    }

    fn ok(now: Duration) -> Input {
        Input::Applied { now, took: MS, error: None }
    }

    /// A machine that has done its first full sync at t=0 of `cluster()`.
    fn synced() -> State {
        let mut s = State::new("node-1", Backend::Nftables, Backoff::default());
        let a = s.step(Input::Cluster { now: ms(0), cluster: Box::new(cluster()), changes: Changes::default() });
        assert_eq!(applies(&a).len(), 1);
        let r = s.step(ok(ms(5)));
        assert_eq!(report(&r).map(|r| r.kind), Some(SyncKind::Full));
        s
    }

    /// The first sync is a full replacement of our table.
    #[test]
    fn first_sync_is_full() {
        let mut s = State::new("node-1", Backend::Nftables, Backoff::default());
        let a = s.step(Input::Cluster { now: ms(0), cluster: Box::new(cluster()), changes: Changes::default() });
        let [(kind, program)] = applies(&a)[..] else { panic!("{a:?}") };
        assert_eq!(kind, SyncKind::Full);
        assert!(program.contains("delete table ip switchyard"), "{program}");
    }

    /// A burst of changes within minSyncPeriod becomes one partial sync naming all of them.
    #[test]
    fn bursts_coalesce() {
        let mut s = synced();
        let base = s.cluster().clone();
        let (c1, ch1) = without_nginx_endpoints(&base);
        // 10 ms after the last sync started: too early, wait until 100 ms.
        let a = s.step(Input::Cluster { now: ms(10), cluster: c1.clone(), changes: ch1 });
        assert!(applies(&a).is_empty());
        assert_eq!(wake(&a), Some(ms(100)));
        let mut c2 = (*c1).clone();
        c2.services.retain(|k, _| k.name != "cart");
        let ch2 = Changes { services: [ObjectKey::new("default", "cart")].into(), ..Changes::default() };
        let a = s.step(Input::Cluster { now: ms(50), cluster: Box::new(c2), changes: ch2 });
        assert!(applies(&a).is_empty());
        assert_eq!((s.pending_services(), s.pending_endpoints()), (1, 1));
        let a = s.step(Input::Tick { now: ms(100) });
        let [(kind, program)] = applies(&a)[..] else { panic!("{a:?}") };
        assert_eq!(kind, SyncKind::Partial);
        // nginx (10.96.0.10) loses its endpoints, cart (10.96.0.30) goes: both in one transaction.
        assert!(program.contains("nginx-svc:http clusterIP: no endpoints"), "{program}");
        assert!(program.contains("delete element ip switchyard cluster-ips { 10.96.0.30 }"), "{program}");
        assert_eq!((s.pending_services(), s.pending_endpoints()), (0, 0));
        let lines = program.lines().count();
        let r = s.step(ok(ms(101)));
        assert_eq!(report(&r).map(|r| (r.kind, r.wrote)), Some((SyncKind::Partial, true)));
        // The report says what the event stream shows: the transaction's size, the services it
        // was for, and the rule count of the last full program.
        let r = report(&r).expect("a report");
        assert_eq!(r.changed, lines);
        assert_eq!(r.services, vec![ObjectKey::new("default", "cart"), nginx()]);
        assert!(r.rules > 10, "{r:?}");
    }

    /// The first change after a quiet spell syncs at once.
    #[test]
    fn change_after_quiet_syncs_at_once() {
        let mut s = synced();
        let (c, ch) = without_nginx_endpoints(s.cluster());
        let a = s.step(Input::Cluster { now: ms(5_000), cluster: c, changes: ch });
        assert_eq!(applies(&a).len(), 1);
    }

    /// A change that leaves the program as it is writes nothing and still reports a sync.
    #[test]
    fn no_change_no_transaction() {
        let mut s = synced();
        let same = Box::new(s.cluster().clone());
        let ch = Changes { endpoints: [nginx()].into(), ..Changes::default() };
        let a = s.step(Input::Cluster { now: ms(500), cluster: same, changes: ch });
        assert!(applies(&a).is_empty(), "{a:?}");
        assert_eq!(report(&a).map(|r| (r.kind, r.wrote)), Some((SyncKind::Partial, false)));
        // Nothing pending: the next wake-up is the periodic resync.
        assert_eq!(wake(&a), Some(ms(10_000)));
        assert!(s.step(Input::Tick { now: ms(600) }).iter().all(|a| matches!(a, Action::Wake { .. })));
    }

    /// A failure keeps the applied program, backs off exponentially (capped), and the retry is a
    /// full sync.
    #[test]
    fn failure_backs_off_then_full() {
        let mut s = State::new(
            "node-1",
            Backend::Nftables,
            Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(4) },
        );
        s.step(Input::Cluster { now: ms(0), cluster: Box::new(cluster()), changes: Changes::default() });
        s.step(ok(ms(1)));
        let kept = s.applied().cloned();
        let (c, ch) = without_nginx_endpoints(s.cluster());
        let a = s.step(Input::Cluster { now: ms(1_000), cluster: c, changes: ch });
        assert_eq!(applies(&a)[0].0, SyncKind::Partial);
        let mut now = ms(1_001);
        let mut delays = Vec::new();
        for _ in 0..4 {
            let a = s.step(Input::Applied { now, took: MS, error: Some("nft: boom".into()) });
            let r = report(&a).expect("report");
            assert!(r.error.is_some());
            assert_eq!(s.applied().cloned(), kept, "the last applied program is kept");
            let at = wake(&a).expect("retry scheduled");
            delays.push(at - now);
            assert!(applies(&s.step(Input::Tick { now: at - MS })).is_empty(), "retried early");
            let a = s.step(Input::Tick { now: at });
            assert_eq!(applies(&a)[0].0, SyncKind::Full, "a retry is full");
            now = at + MS;
        }
        assert_eq!(delays, [ms(1_000), ms(2_000), ms(4_000), ms(4_000)]);
        assert_eq!(s.consecutive_failures(), 4);
        let a = s.step(ok(now));
        assert_eq!(report(&a).map(|r| r.consecutive_failures), Some(0));
        assert_ne!(s.applied().cloned(), kept);
    }

    /// Every syncPeriod a full sync rewrites the table, changed or not (it repairs drift).
    #[test]
    fn periodic_full_resync() {
        let mut s = synced();
        let a = s.step(Input::Tick { now: ms(9_999) });
        assert!(applies(&a).is_empty());
        assert_eq!(wake(&a), Some(ms(10_000)));
        let a = s.step(Input::Tick { now: ms(10_000) });
        assert_eq!(applies(&a).first().map(|x| x.0), Some(SyncKind::Full));
        let a = s.step(ok(ms(10_010)));
        assert_eq!(wake(&a), Some(ms(20_000)));
    }

    /// A change every service may depend on forces a full sync.
    #[test]
    fn global_change_is_full() {
        let mut s = synced();
        let mut c = s.cluster().clone();
        c.config.masquerade_bit = 15;
        let ch = Changes { all: true, ..Changes::default() };
        let a = s.step(Input::Cluster { now: ms(1_000), cluster: Box::new(c), changes: ch });
        assert_eq!(applies(&a).first().map(|x| x.0), Some(SyncKind::Full));
    }

    /// Changes arriving while a sync runs wait for it, and are synced next.
    #[test]
    fn changes_during_a_sync_wait_for_it() {
        let mut s = synced();
        let (c, ch) = without_nginx_endpoints(s.cluster());
        let a = s.step(Input::Tick { now: ms(10_000) });
        assert_eq!(applies(&a).len(), 1);
        let a = s.step(Input::Cluster { now: ms(10_001), cluster: c, changes: ch });
        assert!(a.is_empty(), "{a:?}");
        let a = s.step(ok(ms(10_050)));
        assert_eq!(wake(&a), Some(ms(10_100)));
        let a = s.step(Input::Tick { now: ms(10_100) });
        assert_eq!(applies(&a).first().map(|x| x.0), Some(SyncKind::Partial));
    }

    /// Partial syncs replan only the changed services, and land on the plan of the whole
    /// cluster, sync after sync (the second one replans the spare copy the first one left).
    #[test]
    fn partial_syncs_land_on_the_full_plan() {
        let mut s = synced();
        let (c1, ch1) = without_nginx_endpoints(s.cluster());
        let a = s.step(Input::Cluster { now: ms(1_000), cluster: c1, changes: ch1 });
        assert_eq!(applies(&a).first().map(|x| x.0), Some(SyncKind::Partial));
        s.step(ok(ms(1_001)));
        let mut c2 = s.cluster().clone();
        c2.services.retain(|k, _| k.name != "cart");
        let ch2 = Changes { services: [ObjectKey::new("default", "cart")].into(), ..Changes::default() };
        let a = s.step(Input::Cluster { now: ms(2_000), cluster: Box::new(c2), changes: ch2 });
        assert_eq!(applies(&a).first().map(|x| x.0), Some(SyncKind::Partial));
        s.step(ok(ms(2_001)));
        assert_eq!(s.applied(), Some(&policy::plan(s.cluster(), "node-1", Backend::Nftables)));
    }

    /// A change handed on as deltas patches the loop's cluster and syncs exactly as the whole new
    /// cluster would.
    #[test]
    fn deltas_sync_as_the_whole_cluster() {
        let (mut by_cluster, mut by_delta) = (synced(), synced());
        let (c1, ch1) = without_nginx_endpoints(by_cluster.cluster());
        let deltas: Vec<Delta> = by_delta
            .cluster()
            .endpoint_slices
            .values()
            .filter(|s| s.service == "nginx-svc")
            .map(|s| Delta { before: Some(switchyard_engine::input::Object::EndpointSlice(s.clone())), after: None })
            .collect();
        assert!(!deltas.is_empty());
        let a = by_cluster.step(Input::Cluster { now: ms(1_000), cluster: c1, changes: ch1.clone() });
        let b = by_delta.step(Input::Delta { now: ms(1_000), deltas, changes: ch1 });
        assert_eq!(applies(&b).first().map(|x| x.0), Some(SyncKind::Partial));
        assert_eq!(applies(&a), applies(&b));
        assert_eq!(by_cluster.cluster(), by_delta.cluster());
    }

    #[test]
    fn backoff_is_capped() {
        let b = Backoff { initial: ms(500), max: ms(30_000) };
        assert_eq!(b.delay(1), ms(500));
        assert_eq!(b.delay(3), ms(2_000));
        assert_eq!(b.delay(100), ms(30_000));
    }

    /// A UDP endpoint that leaves the program leaves stale conntrack entries for every frontend
    /// that could reach it; a TCP one does not (its connections end by themselves).
    #[test]
    fn removed_udp_endpoints_are_stale() {
        use switchyard_engine::{policy, synthetic};
        let old = synthetic::cluster(8, 2);
        let mut new = old.clone();
        for sl in new.endpoint_slices.values_mut() {
            sl.endpoints.truncate(1);
        }
        let (a, b) = (policy::plan(&old, "node-a", Backend::Nftables), policy::plan(&new, "node-a", Backend::Nftables));
        let stale = stale_udp(&a, &b);
        // svc0 and svc7 are the UDP ones (one in seven); svc7 is a LoadBalancer with a NodePort.
        let gone: std::collections::BTreeSet<_> = stale.iter().map(|f| f.endpoint).collect();
        assert_eq!(gone.len(), 2, "{stale:?}");
        assert!(stale.iter().any(|f| f.frontend.is_none()), "the NodePort's flows too: {stale:?}");
        assert!(stale_udp(&b, &b).is_empty());
    }
}
