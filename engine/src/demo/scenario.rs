//! The demo's script over simulated time: nginx scales up, a pod dies (terminating, then gone), a
//! node joins and gets a pod, nginx scales down and the node leaves; meanwhile steady traffic of
//! every kind (ClusterIP, NodePort, LoadBalancer, ExternalName, hairpin, UDP, affinity) is traced.
//!
//! The scenario is pure: time is a number the caller advances, randomness is a seeded generator,
//! and the only outside input is a clock the caller passes to measure how long rendering took
//! (the agent passes a monotonic clock, the browser `performance.now()`, tests a counter). It
//! speaks [`crate::protocol`], so the dashboard cannot tell it from a live node.

use std::net::IpAddr;

use crate::api::{self, Destination, TraceRequest};
use crate::cluster::Cluster;
use crate::flow;
use crate::input::{self, Object};
use crate::model::{Endpoint, ObjectKey, Protocol};
use crate::policy::Backend;
use crate::protocol::{
    Event, FlowEvent, FlowOrigin, FlowState, Health, Mode, SourceInfo, SyncEvent, SyncKind, WatchEvent, node_changes,
    watch_diff,
};
use crate::trace::SocketAddr;

/// One pass of the script; then the cluster goes back to its first state and it starts again.
pub const CYCLE_MS: u64 = 60_000;

/// The node whose kernel program the demo "syncs".
pub const SYNC_NODE: &str = "node-1";

/// What happens at each moment of a cycle, in order.
const SCRIPT: &[(u64, Step)] = &[
    (6_000, Step::ScaleUp),
    (14_000, Step::PodTerminating),
    (19_000, Step::PodGone),
    (24_000, Step::NodeJoins),
    (30_000, Step::PodOnNewNode),
    (42_000, Step::ScaleDown),
    (50_000, Step::NodeLeaves),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A third nginx pod starts on node-3.
    ScaleUp,
    /// The nginx pod on node-1 is deleted: it turns terminating (still serving).
    PodTerminating,
    /// ... and leaves the slice.
    PodGone,
    /// node-4 joins the cluster.
    NodeJoins,
    /// An nginx pod starts on node-4.
    PodOnNewNode,
    /// The pod on node-3 goes away.
    ScaleDown,
    /// node-4's pod goes, then node-4 itself.
    NodeLeaves,
}

const NODE_4_YAML: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: node-4
  labels: {kubernetes.io/hostname: node-4, topology.kubernetes.io/zone: zone-a}
spec: {podCIDR: 10.244.4.0/24, podCIDRs: [10.244.4.0/24]}
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.14}
  - {type: Hostname, address: node-4}
"#;

/// The demo's simulated cluster and traffic.
#[derive(Debug, Clone)]
pub struct Scenario {
    base: Cluster,
    cluster: Cluster,
    node_4: Object,
    backend: Backend,
    now_ms: u64,
    /// Where in [`SCRIPT`] the current cycle is.
    next_step: usize,
    cycle: u64,
    next_flow_ms: u64,
    next_flow_id: u64,
    /// TCP flows still open: (when they end, the event that opened them).
    open: Vec<(u64, FlowEvent)>,
    rng: SplitMix64,
    /// The last program synced, for the size of the next transaction.
    program: Option<String>,
    started: bool,
}

/// `(time, event)` pairs, in time order.
pub type Timeline = Vec<(u64, Event)>;

impl Scenario {
    pub fn new(seed: u64) -> Self {
        let base = super::cluster();
        let node_4 = input::parse("node-4.yaml", NODE_4_YAML)
            .ok()
            .and_then(|p| p.objects.into_iter().next())
            .expect("the node-4 manifest parses (checked by scenario tests)");
        Scenario {
            cluster: base.clone(),
            base,
            node_4,
            backend: Backend::Nftables,
            now_ms: 0,
            next_step: 0,
            cycle: 0,
            next_flow_ms: 500,
            next_flow_id: 1,
            open: Vec::new(),
            rng: SplitMix64(seed),
            program: None,
            started: false,
        }
    }

    pub fn source() -> SourceInfo {
        SourceInfo {
            mode: Mode::Demo,
            node: SYNC_NODE.to_string(),
            backend: Backend::Nftables.as_str().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// The cluster as of the last `advance`.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Runs the script and the traffic up to `until_ms` (simulated milliseconds since the start).
    /// `clock` returns milliseconds from any fixed origin; it only measures rendering.
    pub fn advance(&mut self, until_ms: u64, clock: &mut dyn FnMut() -> f64) -> Timeline {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            out.push((0, Event::Health(Health { healthy: true, message: "demo scenario running".into() })));
            self.sync(0, SyncKind::Full, Vec::new(), clock, &mut out);
        }
        while self.now_ms < until_ms {
            let cycle_start = self.cycle * CYCLE_MS;
            let next_script =
                SCRIPT.get(self.next_step).map(|(t, _)| cycle_start + t).unwrap_or(cycle_start + CYCLE_MS);
            let next_close = self.open.iter().map(|(t, _)| *t).min().unwrap_or(u64::MAX);
            let next = next_script.min(self.next_flow_ms).min(next_close);
            if next > until_ms {
                self.now_ms = until_ms;
                break;
            }
            self.now_ms = next;
            if next == next_close {
                self.close_flows(next, &mut out);
            } else if next == next_script {
                match SCRIPT.get(self.next_step) {
                    Some((_, step)) => {
                        self.next_step += 1;
                        self.run(*step, next, clock, &mut out);
                    }
                    None => self.restart(next, clock, &mut out),
                }
            } else {
                self.traffic(next, &mut out);
                self.next_flow_ms = next + 250 + self.rng.below(500);
            }
        }
        out
    }

    fn run(&mut self, step: Step, t: u64, clock: &mut dyn FnMut() -> f64, out: &mut Timeline) {
        let old = self.cluster.clone();
        let nginx = ObjectKey::new("default", "nginx-svc");
        match step {
            Step::ScaleUp => self.add_nginx_pod("10.244.3.15", "node-3", "zone-c", "nginx-7d4b9c-k8s3p"),
            Step::PodTerminating => self.edit_nginx_pod("10.244.1.10", |e| {
                e.ready = false;
                e.serving = true;
                e.terminating = true;
            }),
            Step::PodGone => self.remove_nginx_pod("10.244.1.10"),
            Step::NodeJoins => self.cluster.apply(self.node_4.clone()),
            Step::PodOnNewNode => self.add_nginx_pod("10.244.4.12", "node-4", "zone-a", "nginx-7d4b9c-n4x2w"),
            Step::ScaleDown => self.remove_nginx_pod("10.244.3.15"),
            Step::NodeLeaves => {
                self.remove_nginx_pod("10.244.4.12");
                self.cluster.delete(&crate::cluster::ObjectRef::Node("node-4".into()));
            }
        }
        self.publish_diff(&old, t, out);
        let services = if matches!(step, Step::NodeJoins) { Vec::new() } else { vec![nginx] };
        let kind = if services.is_empty() { SyncKind::Full } else { SyncKind::Partial };
        self.sync(t, kind, services, clock, out);
    }

    /// The end of a cycle: back to the first state, as a re-list would say it.
    fn restart(&mut self, t: u64, clock: &mut dyn FnMut() -> f64, out: &mut Timeline) {
        self.cycle += 1;
        self.next_step = 0;
        let old = std::mem::replace(&mut self.cluster, self.base.clone());
        if old != self.cluster {
            out.push((t, Event::Watch(WatchEvent::Reset { objects: self.cluster.objects() })));
            node_events(&old, &self.cluster, t, out);
        }
        self.sync(t, SyncKind::Full, Vec::new(), clock, out);
    }

    fn publish_diff(&self, old: &Cluster, t: u64, out: &mut Timeline) {
        out.extend(watch_diff(old, &self.cluster).into_iter().map(|w| (t, Event::Watch(w))));
        node_events(old, &self.cluster, t, out);
    }

    fn sync(
        &mut self,
        t: u64,
        kind: SyncKind,
        services: Vec<ObjectKey>,
        clock: &mut dyn FnMut() -> f64,
        out: &mut Timeline,
    ) {
        let start = clock();
        let result = api::render(&self.cluster, SYNC_NODE, self.backend);
        let render_ms = (clock() - start).max(0.0);
        let event = match result {
            Ok(program) => {
                let changed = match (&self.program, kind) {
                    (Some(old), SyncKind::Partial) => changed_lines(old, &program),
                    _ => program.lines().count(),
                };
                let rules = crate::render::rule_count(&program);
                self.program = Some(program);
                SyncEvent {
                    node: SYNC_NODE.into(),
                    backend: self.backend.as_str().into(),
                    kind,
                    ok: true,
                    // Nothing is applied in the demo: the whole sync is the render.
                    duration_ms: render_ms,
                    render_ms,
                    rules,
                    changed,
                    services: Vec::new(),
                    services_omitted: 0,
                    error: None,
                }
                .with_services(&services)
            }
            Err(e) => SyncEvent {
                node: SYNC_NODE.into(),
                backend: self.backend.as_str().into(),
                kind,
                ok: false,
                duration_ms: render_ms,
                render_ms,
                rules: 0,
                changed: 0,
                services: Vec::new(),
                services_omitted: 0,
                error: Some(e.to_string()),
            }
            .with_services(&services),
        };
        out.push((t, Event::Sync(event)));
    }

    fn traffic(&mut self, t: u64, out: &mut Timeline) {
        let samples = super::sample_packets();
        let (_, node, from, to, protocol) = samples[self.rng.below(samples.len() as u64) as usize];
        let id = self.next_flow_id;
        self.next_flow_id += 1;
        let Some(flow) = explain(&self.cluster, node, from, to, protocol, self.backend, self.rng.next()) else {
            return;
        };
        let flow = FlowEvent { id, ..flow };
        if flow.protocol == Protocol::Tcp && flow.verdict == crate::trace::Verdict::Forward {
            let ends = t + 800 + self.rng.below(2_500);
            self.open.push((ends, FlowEvent { state: FlowState::Destroyed, diagram: None, ..flow.clone() }));
        }
        out.push((t, Event::Flow(Box::new(flow))));
    }

    fn close_flows(&mut self, t: u64, out: &mut Timeline) {
        let (due, open): (Vec<_>, Vec<_>) = std::mem::take(&mut self.open).into_iter().partition(|(end, _)| *end <= t);
        self.open = open;
        out.extend(due.into_iter().map(|(end, f)| (end, Event::Flow(Box::new(f)))));
    }

    fn nginx_slice(&mut self) -> Option<&mut crate::model::EndpointSlice> {
        self.cluster.endpoint_slices.values_mut().find(|s| s.key.namespace == "default" && s.service == "nginx-svc")
    }

    fn add_nginx_pod(&mut self, ip: &str, node: &str, zone: &str, pod: &str) {
        let Some(slice) = self.nginx_slice() else { return };
        let Some(mut e) = slice.endpoints.first().cloned() else { return };
        e.address = ip.parse().expect("a literal address");
        e.ready = true;
        e.serving = true;
        e.terminating = false;
        e.node_name = Some(node.into());
        e.zone = Some(zone.into());
        e.target = Some(pod.into());
        slice.endpoints.retain(|x| x.address != e.address);
        slice.endpoints.push(e);
    }

    fn edit_nginx_pod(&mut self, ip: &str, edit: impl FnOnce(&mut Endpoint)) {
        let ip: IpAddr = ip.parse().expect("a literal address");
        if let Some(e) = self.nginx_slice().and_then(|s| s.endpoints.iter_mut().find(|e| e.address == ip)) {
            edit(e);
        }
    }

    fn remove_nginx_pod(&mut self, ip: &str) {
        let ip: IpAddr = ip.parse().expect("a literal address");
        if let Some(s) = self.nginx_slice() {
            s.endpoints.retain(|e| e.address != ip);
        }
    }
}

/// Traces one packet and describes it as a flow the way the agent describes a real connection,
/// with the endpoint of the sampled path standing for the observed one. `None` when the request
/// does not fit the cluster (an unknown name or node).
pub fn explain(
    cluster: &Cluster,
    node: &str,
    from: IpAddr,
    to: &str,
    protocol: Protocol,
    backend: Backend,
    seed: u64,
) -> Option<FlowEvent> {
    let dest: Destination = to.parse().ok()?;
    let req = TraceRequest { node: node.into(), backend, program: None, from, to: dest.clone(), protocol, seed };
    let trace = api::trace(cluster, &req).ok()?;
    let endpoint = flow::sampled_endpoint(&trace);
    let observed = endpoint
        .and_then(|ep| trace.outcomes.iter().find(|o| o.endpoint == ep))
        .map(|o| flow::Observed { endpoint: o.endpoint, masquerade: o.masquerade });
    let (name, dst) = match dest {
        Destination::Addr(a) => (None, a),
        Destination::Name { name, port } => (Some(name), SocketAddr { ip: trace.packet.dst, port }),
    };
    Some(FlowEvent { origin: FlowOrigin::Demo, name, dst, ..flow::explain(cluster, trace, observed) })
}

fn node_events(old: &Cluster, new: &Cluster, t: u64, out: &mut Timeline) {
    out.extend(node_changes(old, new).into_iter().map(|n| (t, Event::Node(n))));
}

/// Lines that differ between two programs: what an incremental transaction would roughly carry.
fn changed_lines(old: &str, new: &str) -> usize {
    use std::collections::BTreeSet;
    let a: BTreeSet<&str> = old.lines().collect();
    let b: BTreeSet<&str> = new.lines().collect();
    a.symmetric_difference(&b).count()
}

/// A small deterministic generator (SplitMix64): the engine takes no ambient randomness.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::DestinationKind;
    use crate::protocol::{Journal, NodeChange, Sequenced, StreamState};

    fn run(seed: u64, until: u64) -> Timeline {
        let mut tick = 0.0;
        Scenario::new(seed).advance(until, &mut || {
            tick += 0.5;
            tick
        })
    }

    #[test]
    fn node_4_parses() {
        assert!(input::parse("node-4.yaml", NODE_4_YAML).is_ok());
    }

    #[test]
    fn a_cycle_shows_every_kind_of_traffic_and_every_step() {
        let t = run(7, CYCLE_MS + 1_000);
        let kinds: std::collections::BTreeSet<_> = t
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Flow(f) => Some(f.destination),
                _ => None,
            })
            .collect();
        for k in [
            DestinationKind::ClusterIp,
            DestinationKind::NodePort,
            DestinationKind::LoadBalancer,
            DestinationKind::ExternalName,
        ] {
            assert!(kinds.contains(&k), "{k:?} missing from {kinds:?}");
        }
        let hairpin =
            t.iter().any(|(_, e)| matches!(e, Event::Flow(f) if f.endpoint.is_some_and(|ep| ep.ip == f.src.ip)));
        assert!(hairpin, "no hairpin flow");
        let nodes: Vec<_> = t
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Node(n) => Some((n.name.as_str(), n.change)),
                _ => None,
            })
            .collect();
        assert_eq!(nodes, vec![("node-4", NodeChange::Joined), ("node-4", NodeChange::Left)]);
        let syncs = t.iter().filter(|(_, e)| matches!(e, Event::Sync(s) if s.ok)).count();
        assert_eq!(syncs, 1 + SCRIPT.len() + 1, "start, one per step, the restart");
        assert!(t.windows(2).all(|w| w[0].0 <= w[1].0), "time order");
    }

    #[test]
    fn terminating_pod_still_serves_then_disappears() {
        let mut s = Scenario::new(1);
        let mut clock = || 0.0;
        s.advance(15_000, &mut clock);
        let ep = |s: &Scenario| -> Vec<(IpAddr, bool)> {
            s.cluster()
                .endpoint_slices
                .values()
                .filter(|x| x.service == "nginx-svc")
                .flat_map(|x| &x.endpoints)
                .map(|e| (e.address, e.terminating))
                .collect()
        };
        let ip: IpAddr = "10.244.1.10".parse().expect("ip");
        assert!(ep(&s).contains(&(ip, true)));
        s.advance(20_000, &mut clock);
        assert!(!ep(&s).iter().any(|(a, _)| *a == ip));
    }

    #[test]
    fn deterministic_and_resumable_in_pieces() {
        let whole = run(3, 20_000);
        let mut s = Scenario::new(3);
        let mut tick = 0.0;
        let mut clock = || {
            tick += 0.5;
            tick
        };
        let mut pieces = Vec::new();
        for until in (1_000..=20_000).step_by(1_000) {
            pieces.extend(s.advance(until, &mut clock));
        }
        assert_eq!(whole.len(), pieces.len());
        assert_eq!(
            whole.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            pieces.iter().map(|(t, _)| *t).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_stream_state_follows_the_scenario() {
        let mut s = Scenario::new(5);
        let mut state = StreamState::new(Scenario::source(), s.cluster().clone());
        let mut journal = Journal::new(10_000);
        for until in [10_000, 20_000, 35_000, CYCLE_MS - 1, CYCLE_MS + 100] {
            for (t, e) in s.advance(until, &mut || 0.0) {
                let seq: Sequenced = journal.push(t, e).clone();
                state.apply(&seq);
            }
            assert_eq!(&state.cluster, s.cluster(), "at {until} ms");
        }
    }
}
