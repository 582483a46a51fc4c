//! Conntrack entries become flow events: a pure state machine ([`Flows::step`]) fed the kernel's
//! events, table dumps and the program the node holds, with no socket, thread or clock.
//!
//! A new entry whose original destination is a Service frontend of this node (a ClusterIP,
//! external or load-balancer IP and port, or a NodePort on a node address) is traced through the
//! node's program; the reply tuple says what really happened (its source is the endpoint that
//! answered, and a destination other than the client means the source was masqueraded), and
//! `agrees` says whether the tracer predicted exactly that. Everything else is ignored.
//!
//! Bounded: at most [`FlowsConfig::capacity`] connections are remembered (the oldest is
//! forgotten first, and will get no `Destroyed` event), and diagrams, the costly part, are drawn
//! at most [`FlowsConfig::diagrams_per_second`] (flows past that are published without one).
//! After the socket overflowed, the table dump is reconciled with what is remembered: entries
//! not seen before are new, remembered ones missing from the table are gone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_engine::Tracer;
use switchyard_engine::cluster::Cluster;
use switchyard_engine::flow::{self, ClusterIndex, Observed};
use switchyard_engine::model::Protocol;
use switchyard_engine::policy::{Backend, NodePlan, NodePortAddresses};
use switchyard_engine::protocol::{FlowEvent, FlowOrigin, FlowState};
use switchyard_engine::trace::{Packet, SocketAddr};

use super::wire::{Conn, Event, Tuple};

/// What the node's kernel holds: the plan last applied and the cluster it came from.
#[derive(Debug, Clone)]
pub struct View {
    pub cluster: Arc<Cluster>,
    pub plan: NodePlan,
}

/// Limits.
#[derive(Debug, Clone)]
pub struct FlowsConfig {
    /// The node's name (every event carries it).
    pub node: String,
    /// Connections remembered for their `Destroyed` event.
    pub capacity: usize,
    /// Diagrams drawn per second, on average ...
    pub diagrams_per_second: f64,
    /// ... and at most this many at once.
    pub diagram_burst: f64,
    /// Table dumps start at most this often: on a busy node overflows come in runs, and each
    /// dump reads the whole table.
    pub min_dump_interval: Duration,
}

impl FlowsConfig {
    pub fn new(node: impl Into<String>) -> Self {
        FlowsConfig {
            node: node.into(),
            capacity: 16_384,
            diagrams_per_second: 50.0,
            diagram_burst: 200.0,
            min_dump_interval: Duration::from_secs(1),
        }
    }
}

/// One input of the machine.
#[derive(Debug, Clone)]
pub enum Input {
    /// An event from the subscribed socket.
    Conntrack(Event, Conn),
    /// The socket dropped events (`ENOBUFS`).
    Overflow,
    /// Every entry of the table, from a dump.
    Table(Vec<Conn>),
    /// The kernel holds a new program.
    View(Arc<View>),
    /// Time passed (a dump put off by [`FlowsConfig::min_dump_interval`] may be due).
    Tick,
    /// The dump asked for failed: ask again later.
    DumpFailed,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Publish(Box<FlowEvent>),
    /// Dump the table and send it back as [`Input::Table`].
    Dump,
}

/// Running totals (the agent's metrics add them up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// New-connection events received (entries found by table dumps are not counted).
    pub observed: u64,
    /// Of which addressed to a Service frontend and published.
    pub matched: u64,
    /// Connections to a frontend that could not be explained (the program does not parse).
    pub unexplained: u64,
    pub overflows: u64,
    pub resyncs: u64,
    /// Connections forgotten to stay within the capacity.
    pub evicted: u64,
    /// Flows published without a diagram because of the rate limit.
    pub diagrams_dropped: u64,
}

/// A connection remembered for its `Destroyed` event.
#[derive(Debug, Clone)]
struct Tracked {
    orig: Tuple,
    order: u64,
    /// The `Destroyed` event, ready (no diagram, no outcomes: the `New` event carried those).
    gone: Box<FlowEvent>,
}

/// The program, parsed once per view, and the frontends it serves.
struct Prepared {
    view: Arc<View>,
    /// Parsed at the first connection to a frontend; an error is kept, not retried per flow.
    tracer: Option<Result<Tracer, String>>,
    /// Built with the tracer: what each flow's Service and client are, without scanning.
    index: Option<ClusterIndex>,
    frontends: Frontends,
}

/// The machine.
pub struct Flows {
    cfg: FlowsConfig,
    prepared: Option<Prepared>,
    tracked: HashMap<u32, Tracked>,
    /// Insertion order → id: the oldest is evicted first.
    order: BTreeMap<u64, u32>,
    next_order: u64,
    tokens: f64,
    last_refill: Option<Duration>,
    last_dump: Option<Duration>,
    dump_pending: bool,
    pub stats: Stats,
}

impl Flows {
    pub fn new(cfg: FlowsConfig) -> Self {
        let tokens = cfg.diagram_burst;
        Flows {
            cfg,
            prepared: None,
            tracked: HashMap::new(),
            order: BTreeMap::new(),
            next_order: 0,
            tokens,
            last_refill: None,
            last_dump: None,
            dump_pending: false,
            stats: Stats::default(),
        }
    }

    /// Why the current program cannot be traced, once a connection needed it.
    pub fn trace_error(&self) -> Option<&str> {
        match self.prepared.as_ref()?.tracer.as_ref()? {
            Err(e) => Some(e),
            Ok(_) => None,
        }
    }

    /// Connections remembered now.
    pub fn tracked(&self) -> usize {
        self.tracked.len()
    }

    /// Advances the machine; `now` is time since any fixed origin (for the diagram rate).
    pub fn step(&mut self, input: Input, now: Duration) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::View(v) => {
                if self.prepared.is_none() {
                    // Connections opened before there was a program to explain them with.
                    self.dump_pending = true;
                }
                let frontends = Frontends::of(&v.plan, &v.cluster);
                // Parsed lazily: a node without Service traffic never pays for it.
                self.prepared = Some(Prepared { view: v, tracer: None, index: None, frontends });
            }
            Input::Overflow => {
                self.stats.overflows += 1;
                self.dump_pending = true;
            }
            Input::Tick => {}
            Input::DumpFailed => self.dump_pending = true,
            Input::Conntrack(Event::New, c) => {
                self.stats.observed += 1;
                self.new_conn(c, now, &mut out);
            }
            Input::Conntrack(Event::Destroy, c) => self.gone(c.id, &c.orig, &mut out),
            Input::Conntrack(Event::Update | Event::Dumped, _) => {}
            Input::Table(conns) => {
                self.stats.resyncs += 1;
                let present: HashMap<u32, Tuple> = conns.iter().map(|c| (c.id, c.orig)).collect();
                let gone: Vec<(u32, Tuple)> = self
                    .tracked
                    .iter()
                    .filter(|(id, t)| present.get(id) != Some(&t.orig))
                    .map(|(id, t)| (*id, t.orig))
                    .collect();
                for (id, orig) in gone {
                    self.gone(id, &orig, &mut out);
                }
                for c in conns {
                    self.new_conn(c, now, &mut out);
                }
            }
        }
        let due = self.last_dump.is_none_or(|t| now.saturating_sub(t) >= self.cfg.min_dump_interval);
        if self.dump_pending && due && self.prepared.is_some() {
            self.last_dump = Some(now);
            self.dump_pending = false;
            out.push(Output::Dump);
        }
        out
    }

    fn new_conn(&mut self, c: Conn, now: Duration, out: &mut Vec<Output>) {
        if self.tracked.get(&c.id).is_some_and(|t| t.orig == c.orig) {
            return;
        }
        let Some(p) = self.prepared.as_mut() else { return };
        let Some(protocol) = protocol(c.orig.proto) else { return };
        if !p.frontends.contains(&c.orig, protocol) {
            return;
        }
        let Ok(tracer) = p.tracer.get_or_insert_with(|| tracer(&p.view)) else {
            self.stats.unexplained += 1;
            return;
        };
        let index = p.index.get_or_insert_with(|| ClusterIndex::new(&p.view.cluster));
        let packet =
            Packet { src: c.orig.src, src_port: c.orig.src_port, dst: c.orig.dst, dst_port: c.orig.dst_port, protocol };
        let observed = observed(&c);
        let seed = u64::from(c.id);
        let draw = take_token(&mut self.tokens, &mut self.last_refill, &self.cfg, now);
        let trace = if draw {
            tracer.trace_towards(packet, observed.map(|o| o.endpoint), seed, 16)
        } else {
            tracer.trace(packet, seed)
        };
        let mut event = flow::explain_in(&index.context(&trace), trace, observed, draw);
        event.id = u64::from(c.id);
        event.origin = FlowOrigin::Conntrack;
        event.node.clone_from(&self.cfg.node);
        if !draw {
            self.stats.diagrams_dropped += 1;
        }
        self.stats.matched += 1;
        self.remember(&c, &event);
        out.push(Output::Publish(Box::new(event)));
    }

    fn remember(&mut self, c: &Conn, event: &FlowEvent) {
        while self.tracked.len() >= self.cfg.capacity.max(1) {
            let Some((_, id)) = self.order.pop_first() else { break };
            self.tracked.remove(&id);
            self.stats.evicted += 1;
        }
        let gone =
            Box::new(FlowEvent { state: FlowState::Destroyed, outcomes: Vec::new(), diagram: None, ..event.clone() });
        let order = self.next_order;
        self.next_order += 1;
        if let Some(old) = self.tracked.insert(c.id, Tracked { orig: c.orig, order, gone }) {
            self.order.remove(&old.order);
        }
        self.order.insert(order, c.id);
    }

    fn gone(&mut self, id: u32, orig: &Tuple, out: &mut Vec<Output>) {
        // Ids are reused by the kernel: the tuple must be the one remembered.
        if self.tracked.get(&id).is_some_and(|t| t.orig == *orig)
            && let Some(t) = self.tracked.remove(&id)
        {
            self.order.remove(&t.order);
            out.push(Output::Publish(t.gone));
        }
    }
}

/// The endpoint that answered and whether it answered someone other than the client; `None`
/// when the destination was not translated (nothing was load-balanced).
fn observed(c: &Conn) -> Option<Observed> {
    let endpoint = SocketAddr { ip: c.reply.src, port: c.reply.src_port };
    let untranslated = c.reply.src == c.orig.dst && c.reply.src_port == c.orig.dst_port;
    (!untranslated).then_some(Observed { endpoint, masquerade: c.reply.dst != c.orig.src })
}

fn protocol(n: u8) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].into_iter().find(|p| p.number() == n)
}

/// The tracer over the program the plan renders to: the same text the appliers loaded.
fn tracer(v: &View) -> Result<Tracer, String> {
    let program = match v.plan.backend {
        Backend::Nftables => switchyard_engine::render::nftables::render(&v.plan),
        Backend::Iptables => switchyard_engine::render::iptables::render(&v.plan),
        Backend::Ipvs => switchyard_engine::render::ipvs::render(&v.plan),
    };
    Tracer::new(&v.cluster, &v.plan.node, v.plan.backend, &program).map_err(|e| e.to_string())
}

/// A token bucket: `diagrams_per_second` on average, `diagram_burst` at once.
fn take_token(tokens: &mut f64, last: &mut Option<Duration>, cfg: &FlowsConfig, now: Duration) -> bool {
    let elapsed = last.map_or(0.0, |l| now.saturating_sub(l).as_secs_f64());
    *last = Some(now);
    *tokens = (*tokens + elapsed * cfg.diagrams_per_second).min(cfg.diagram_burst);
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

/// The addresses a node's program answers for Services.
#[derive(Debug, Default)]
struct Frontends {
    /// (address, port, protocol number): ClusterIPs, external IPs, load-balancer IPs.
    addrs: HashSet<(IpAddr, u16, u8)>,
    /// (nodePort, protocol number).
    node_ports: HashSet<(u16, u8)>,
    /// Where NodePorts are served.
    node_addrs: HashSet<IpAddr>,
    localhost_node_ports: bool,
}

impl Frontends {
    fn of(plan: &NodePlan, cluster: &Cluster) -> Self {
        let mut f = Frontends::default();
        if let Some(n) = cluster.nodes.get(&plan.node) {
            f.node_addrs.extend(n.ips());
        }
        for fam in &plan.families {
            f.node_addrs.extend(fam.node_ips.iter().copied());
            if let NodePortAddresses::Only(ips) = &fam.node_port_addresses {
                f.node_addrs.extend(ips.iter().copied());
            }
            f.localhost_node_ports |= fam.localhost_node_ports;
            for s in &fam.services {
                let proto = s.protocol.number();
                for ip in std::iter::once(s.cluster_ip)
                    .chain(s.external_ips.iter().copied())
                    .chain(s.load_balancer_ips.iter().copied())
                {
                    f.addrs.insert((ip, s.port, proto));
                }
                if let Some(np) = s.node_port {
                    f.node_ports.insert((np, proto));
                }
            }
        }
        f
    }

    fn contains(&self, t: &Tuple, protocol: Protocol) -> bool {
        let proto = protocol.number();
        self.addrs.contains(&(t.dst, t.dst_port, proto))
            || (self.node_ports.contains(&(t.dst_port, proto))
                && (self.node_addrs.contains(&t.dst) || (self.localhost_node_ports && t.dst.is_loopback())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::flow::DestinationKind;
    use switchyard_engine::model::ObjectKey;
    use switchyard_engine::policy;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn tuple(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple { src: ip(src), dst: ip(dst), proto: 6, src_port: sport, dst_port: dport }
    }

    /// A connection to `dst` answered by `endpoint`, which saw `seen` as its client.
    fn conn(id: u32, src: &str, dst: &str, dport: u16, endpoint: &str, eport: u16, seen: &str) -> Conn {
        Conn {
            id,
            orig: tuple(src, 40_000 + id as u16, dst, dport),
            reply: tuple(endpoint, eport, seen, 40_000 + id as u16),
            status: 0x1b8,
            zone: 0,
        }
    }

    fn view(node: &str) -> Arc<View> {
        let cluster = switchyard_engine::demo::cluster();
        let plan = policy::plan(&cluster, node, Backend::Nftables);
        Arc::new(View { cluster: Arc::new(cluster), plan })
    }

    /// A ClusterIP of the demo cluster, its port and one of its endpoints, from the tracer.
    fn demo_service(v: &View, from: &str) -> (SocketAddr, flow::Observed) {
        let s = v.cluster.services.get(&ObjectKey::new("default", "nginx-svc")).expect("nginx-svc");
        let dst = SocketAddr { ip: s.cluster_ips[0], port: s.ports[0].port };
        let tracer = tracer(v).expect("traces");
        let t = tracer.trace(
            Packet { src: ip(from), src_port: 40_001, dst: dst.ip, dst_port: dst.port, protocol: Protocol::Tcp },
            1,
        );
        let o = t.outcomes.first().expect("an outcome");
        (dst, flow::Observed { endpoint: o.endpoint, masquerade: o.masquerade })
    }

    fn published(out: &[Output]) -> Vec<&FlowEvent> {
        out.iter()
            .filter_map(|o| match o {
                Output::Publish(e) => Some(e.as_ref()),
                Output::Dump => None,
            })
            .collect()
    }

    fn pod_ip(v: &View, node: &str) -> String {
        v.cluster.nodes[node].pod_cidrs[0].hosts().nth(200).expect("a pod address").to_string()
    }

    /// A connection to a ClusterIP is explained, agrees with the tracer, and its destroy event
    /// carries the same id; a connection elsewhere is ignored.
    #[test]
    fn service_connections_are_explained_and_others_ignored() {
        let v = view("node-1");
        let client = pod_ip(&v, "node-1");
        let (dst, ob) = demo_service(&v, &client);
        let mut f = Flows::new(FlowsConfig::new("node-1"));
        f.step(Input::View(v.clone()), Duration::ZERO);
        let seen = if ob.masquerade { "192.168.1.11" } else { client.as_str() };
        let c = conn(7, &client, &dst.ip.to_string(), dst.port, &ob.endpoint.ip.to_string(), ob.endpoint.port, seen);
        let out = f.step(Input::Conntrack(Event::New, c), Duration::ZERO);
        let e = published(&out);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].service, Some(ObjectKey::new("default", "nginx-svc")));
        assert_eq!(e[0].destination, DestinationKind::ClusterIp);
        assert_eq!((e[0].endpoint, e[0].masquerade, e[0].agrees), (Some(ob.endpoint), Some(ob.masquerade), Some(true)));
        assert_eq!((e[0].id, e[0].origin, e[0].state), (7, FlowOrigin::Conntrack, FlowState::New));
        assert!(e[0].diagram.is_some());

        let other = conn(8, &client, "10.244.2.10", 8080, "10.244.2.10", 8080, &client);
        assert!(f.step(Input::Conntrack(Event::New, other), Duration::ZERO).is_empty());
        assert!(f.step(Input::Conntrack(Event::Destroy, other), Duration::ZERO).is_empty());

        let out = f.step(Input::Conntrack(Event::Destroy, c), Duration::ZERO);
        let e = published(&out);
        assert_eq!((e.len(), e[0].id, e[0].state), (1, 7, FlowState::Destroyed));
        assert_eq!(f.tracked(), 0);
        assert_eq!((f.stats.observed, f.stats.matched), (2, 1));
    }

    /// An endpoint the program cannot have chosen, or a masquerade it did not do, disagrees.
    #[test]
    fn an_unpredicted_endpoint_disagrees() {
        let v = view("node-1");
        let client = pod_ip(&v, "node-1");
        let (dst, ob) = demo_service(&v, &client);
        let mut f = Flows::new(FlowsConfig::new("node-1"));
        f.step(Input::View(v), Duration::ZERO);
        let wrong = conn(9, &client, &dst.ip.to_string(), dst.port, "10.9.9.9", 8080, &client);
        let e = f.step(Input::Conntrack(Event::New, wrong), Duration::ZERO);
        assert_eq!(published(&e)[0].agrees, Some(false));
        let seen = if ob.masquerade { client.clone() } else { "192.168.1.11".to_string() };
        let flipped =
            conn(10, &client, &dst.ip.to_string(), dst.port, &ob.endpoint.ip.to_string(), ob.endpoint.port, &seen);
        let e = f.step(Input::Conntrack(Event::New, flipped), Duration::ZERO);
        assert_eq!(published(&e)[0].agrees, Some(false));
    }

    /// After an overflow the machine asks for a dump; the dump's unseen entries are new and the
    /// remembered entries it lacks are gone.
    #[test]
    fn overflow_asks_for_a_dump_and_reconciles() {
        let v = view("node-1");
        let client = pod_ip(&v, "node-1");
        let (dst, ob) = demo_service(&v, &client);
        let (d, e) = (dst.ip.to_string(), ob.endpoint.ip.to_string());
        let seen = if ob.masquerade { "192.168.1.11" } else { client.as_str() };
        let mk = |id| conn(id, &client, &d, dst.port, &e, ob.endpoint.port, seen);
        let mut f = Flows::new(FlowsConfig::new("node-1"));
        // The first program asks for the table: connections may predate it.
        assert_eq!(f.step(Input::View(v), Duration::ZERO), vec![Output::Dump]);
        assert!(f.step(Input::Table(vec![]), Duration::ZERO).is_empty());
        f.step(Input::Conntrack(Event::New, mk(1)), Duration::ZERO);
        f.step(Input::Conntrack(Event::New, mk(2)), Duration::ZERO);
        // Dumps are at least a second apart: this one waits for the clock.
        let ms = Duration::from_millis;
        assert!(f.step(Input::Overflow, ms(500)).is_empty());
        assert!(f.step(Input::Tick, ms(900)).is_empty());
        assert_eq!(f.step(Input::Tick, ms(1000)), vec![Output::Dump]);
        // Missed meanwhile: 1 ended, 3 began.
        let out = f.step(Input::Table(vec![mk(2), mk(3)]), ms(1100));
        let got: Vec<(u64, FlowState)> = published(&out).iter().map(|e| (e.id, e.state)).collect();
        assert_eq!(got, vec![(1, FlowState::Destroyed), (3, FlowState::New)]);
        assert_eq!((f.stats.overflows, f.stats.resyncs, f.tracked()), (1, 2, 2));
        assert!(f.step(Input::Tick, ms(5000)).is_empty(), "nothing pending");
        // A reused id with another tuple is another connection.
        let mut reused = mk(2);
        reused.orig.src_port = 1;
        reused.reply.dst_port = 1;
        let out = f.step(Input::Table(vec![reused, mk(3)]), ms(1200));
        let got: Vec<(u64, FlowState)> = published(&out).iter().map(|e| (e.id, e.state)).collect();
        assert_eq!(got, vec![(2, FlowState::Destroyed), (2, FlowState::New)]);
    }

    /// Memory and diagram work stay bounded; what was dropped is counted.
    #[test]
    fn capacity_and_diagram_rate_are_bounded() {
        let v = view("node-1");
        let client = pod_ip(&v, "node-1");
        let (dst, ob) = demo_service(&v, &client);
        let (d, e) = (dst.ip.to_string(), ob.endpoint.ip.to_string());
        let seen = if ob.masquerade { "192.168.1.11" } else { client.as_str() };
        let cfg =
            FlowsConfig { capacity: 3, diagrams_per_second: 2.0, diagram_burst: 2.0, ..FlowsConfig::new("node-1") };
        let mut f = Flows::new(cfg);
        f.step(Input::View(v), Duration::ZERO);
        let mut diagrams = 0;
        for id in 1..=5 {
            let out = f.step(
                Input::Conntrack(Event::New, conn(id, &client, &d, dst.port, &e, ob.endpoint.port, seen)),
                Duration::ZERO,
            );
            diagrams += published(&out).iter().filter(|e| e.diagram.is_some()).count();
        }
        assert_eq!((diagrams, f.stats.diagrams_dropped), (2, 3));
        assert_eq!((f.tracked(), f.stats.evicted), (3, 2));
        // A second later the bucket holds two again.
        let out = f.step(
            Input::Conntrack(Event::New, conn(6, &client, &d, dst.port, &e, ob.endpoint.port, seen)),
            Duration::from_secs(1),
        );
        assert!(published(&out)[0].diagram.is_some());
        // The evicted connection's end goes unreported; a remembered one's does not.
        let gone = f.step(
            Input::Conntrack(Event::Destroy, conn(1, &client, &d, dst.port, &e, ob.endpoint.port, seen)),
            Duration::ZERO,
        );
        assert!(gone.is_empty());
        let gone = f.step(
            Input::Conntrack(Event::Destroy, conn(5, &client, &d, dst.port, &e, ob.endpoint.port, seen)),
            Duration::ZERO,
        );
        assert_eq!(published(&gone).len(), 1);
    }

    /// Frontends: service addresses with their port and protocol, NodePorts on node addresses.
    #[test]
    fn frontends_of_the_demo_plan() {
        let v = view("node-1");
        let f = Frontends::of(&v.plan, &v.cluster);
        let s = &v.cluster.services[&ObjectKey::new("default", "nginx-svc")];
        let (cip, port) = (s.cluster_ips[0], s.ports[0].port);
        assert!(f.contains(&tuple("10.244.1.5", 1, &cip.to_string(), port), Protocol::Tcp));
        assert!(!f.contains(&tuple("10.244.1.5", 1, &cip.to_string(), port + 1), Protocol::Tcp));
        assert!(!f.contains(&tuple("10.244.1.5", 1, &cip.to_string(), port), Protocol::Sctp));
        let np =
            v.cluster.services.values().find_map(|s| s.ports.iter().find_map(|p| p.node_port)).expect("a NodePort");
        let node_ip = v.cluster.nodes["node-1"].ips()[0].to_string();
        assert!(f.contains(&tuple("198.51.100.2", 1, &node_ip, np), Protocol::Tcp));
        assert!(!f.contains(&tuple("198.51.100.2", 1, "198.51.100.9", np), Protocol::Tcp));
    }
}
