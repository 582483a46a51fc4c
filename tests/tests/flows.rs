//! Real flows in the lab ([`switchyard_agent::lab`]): real connections through the nodes'
//! kernels come out of the agent's event stream as flow events that name the right Service,
//! endpoint and masquerade, and agree with the tracer.
//!
//! `flows_reach_the_event_stream_{nftables,iptables}`: a client opens node-1's agent's WebSocket
//! (`/api/v1/events`; the in-process agents serve on this process's loopback, their conntrack
//! observers read the node namespaces), then ClusterIP connections (same node, cross node,
//! hairpin, UDP) and NodePort and LoadBalancer connections from the external client are made;
//! every one must arrive as a `new` flow whose endpoint is the pod that answered and whose
//! masquerade is what the pod saw. Deleting the entries brings `destroyed` events with the same ids. A second client that
//! connects with `?since=SEQ` gets exactly the events the first one saw after `SEQ`.
//!
//! `observer_recovers_from_an_overflow`: an observer with a tiny socket buffer and a burst of
//! connections; the kernel drops events (`ENOBUFS`), the observer dumps the table, and every
//! connection is still reported.
//!
//! Root only; skipped with the reason printed otherwise. Traffic stays inside the lab's namespaces.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_agent::agent::BackendChoice;
use switchyard_agent::conntrack::{FlowsConfig, Observer, ObserverConfig, Stats, View};
use switchyard_agent::lab::{self, CLIENT_IP, Lab, LabSpec, Proto, Reply, Svc, TARGET_PORT};
use switchyard_engine::flow::DestinationKind;
use switchyard_engine::model::{ObjectKey, Protocol};
use switchyard_engine::policy::{self, Backend};
use switchyard_engine::protocol::{Event, FlowEvent, FlowOrigin, FlowState, ServerMessage};
use switchyard_engine::trace::{SocketAddr as EngineAddr, Verdict};
use switchyard_tests::differential::svc;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

fn skip(backend: BackendChoice) -> bool {
    match lab::skip_reason(backend) {
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
        None => false,
    }
}

fn engine_addr(a: SocketAddrV4) -> EngineAddr {
    EngineAddr { ip: IpAddr::V4(*a.ip()), port: a.port() }
}

/// One client of `/api/v1/events`.
struct Client {
    ws: tungstenite::WebSocket<TcpStream>,
    /// Every event received, in order.
    events: Vec<(u64, Event)>,
    snapshot_seq: Option<u64>,
}

impl Client {
    fn connect(addr: SocketAddr, since: Option<u64>) -> Client {
        let stream = TcpStream::connect(addr).expect("the agent listens");
        let query = since.map(|s| format!("?since={s}")).unwrap_or_default();
        let (ws, _) = tungstenite::client(format!("ws://{addr}/api/v1/events{query}"), stream).expect("upgrades");
        // Short reads so the waits below can look at their deadline.
        ws.get_ref().set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        Client { ws, events: Vec::new(), snapshot_seq: None }
    }

    /// Reads what has arrived, for at most `wait`.
    fn poll(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            match self.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    match ServerMessage::from_json(t.as_str()).expect("a protocol message") {
                        ServerMessage::Snapshot(s) => self.snapshot_seq = Some(s.seq),
                        ServerMessage::Event(e) => self.events.push((e.seq, e.event)),
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return;
                }
                Err(e) => panic!("the event stream broke: {e}"),
            }
        }
    }

    /// Waits until a flow matches `pick`.
    fn wait_flow(&mut self, what: &str, pick: impl Fn(&FlowEvent) -> bool) -> FlowEvent {
        let start = Instant::now();
        loop {
            if let Some(f) = self.flows().into_iter().find(|f| pick(f)) {
                return f;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "no flow event for {what}; got {:#?}", self.flows());
            self.poll(Duration::from_millis(200));
        }
    }

    fn flows(&self) -> Vec<FlowEvent> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Flow(f) => Some((**f).clone()),
                _ => None,
            })
            .collect()
    }
}

/// One connection the test makes, and what must come of it.
struct Case {
    name: &'static str,
    /// The namespace and address it comes from.
    from: (String, Ipv4Addr),
    to: SocketAddrV4,
    proto: Proto,
    service: &'static str,
    kind: DestinationKind,
    pod: &'static str,
    masquerade: bool,
}

#[test]
fn flows_reach_the_event_stream_nftables() {
    flows_reach_the_event_stream(BackendChoice::Nftables, "fn");
}

#[test]
fn flows_reach_the_event_stream_iptables() {
    flows_reach_the_event_stream(BackendChoice::Iptables, "fi");
}

fn flows_reach_the_event_stream(backend: BackendChoice, tag: &str) {
    if skip(backend) {
        return;
    }
    let started = Instant::now();
    let mut lab =
        Lab::build(&LabSpec { tag: tag.into(), nodes: 2, pods_per_node: 2, backend }).expect("the lab builds");
    let services = [
        svc("same", "ClusterIP", "10.96.0.30", &["n1-p0"]),
        svc("cross", "ClusterIP", "10.96.0.31", &["n2-p0"]),
        Svc { node_port: Some(30090), ..svc("np", "NodePort", "10.96.0.32", &["n2-p1"]) },
        Svc { udp: true, port: 53, ..svc("dns", "ClusterIP", "10.96.0.33", &["n2-p1"]) },
        Svc {
            node_port: Some(30091),
            lb_ip: Some("203.0.113.20".into()),
            ..svc("lb", "LoadBalancer", "10.96.0.34", &["n1-p0"])
        },
    ];
    lab.write("10-services.yaml", &services.iter().map(|s| s.yaml(&lab)).collect::<String>()).expect("services");
    lab.start_agents().expect("agents start");
    lab.wait_programmed(
        &["10.96.0.30", "10.96.0.31", "10.96.0.32", "30090", "10.96.0.33", "203.0.113.20"],
        &[],
        Duration::from_secs(30),
    )
    .expect("both nodes programmed");
    let node1 = lab.node("node-1").expect("node-1").clone();
    let agent = lab.agent_addr("node-1").expect("node-1's agent");

    let mut first = Client::connect(agent, None);
    let start = Instant::now();
    while first.snapshot_seq.is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "no snapshot");
        first.poll(Duration::from_millis(200));
    }
    let since = first.snapshot_seq.expect("a snapshot comes first");

    let pod = |name: &str| {
        let p = lab.pod(name).expect("pod");
        (p.netns.clone(), p.ip)
    };
    let cases = [
        Case {
            name: "ClusterIP, same node",
            from: pod("n1-p1"),
            to: "10.96.0.30:80".parse().expect("addr"),
            proto: Proto::Tcp,
            service: "same",
            kind: DestinationKind::ClusterIp,
            pod: "n1-p0",
            masquerade: false,
        },
        Case {
            name: "ClusterIP, cross node",
            from: pod("n1-p1"),
            to: "10.96.0.31:80".parse().expect("addr"),
            proto: Proto::Tcp,
            service: "cross",
            kind: DestinationKind::ClusterIp,
            pod: "n2-p0",
            masquerade: false,
        },
        Case {
            name: "ClusterIP, hairpin (a pod reaching itself)",
            from: pod("n1-p0"),
            to: "10.96.0.30:80".parse().expect("addr"),
            proto: Proto::Tcp,
            service: "same",
            kind: DestinationKind::ClusterIp,
            pod: "n1-p0",
            masquerade: true,
        },
        Case {
            name: "NodePort from the external client",
            from: (lab.client.clone(), CLIENT_IP),
            to: SocketAddrV4::new(node1.ip, 30090),
            proto: Proto::Tcp,
            service: "np",
            kind: DestinationKind::NodePort,
            pod: "n2-p1",
            masquerade: true,
        },
        Case {
            // The LB namespace routes load-balancer addresses to node-1.
            name: "LoadBalancer IP from the external client",
            from: (lab.client.clone(), CLIENT_IP),
            to: "203.0.113.20:80".parse().expect("addr"),
            proto: Proto::Tcp,
            service: "lb",
            kind: DestinationKind::LoadBalancer,
            pod: "n1-p0",
            masquerade: true,
        },
        Case {
            name: "ClusterIP over UDP, cross node",
            from: pod("n1-p1"),
            to: "10.96.0.33:53".parse().expect("addr"),
            proto: Proto::Udp,
            service: "dns",
            kind: DestinationKind::ClusterIp,
            pod: "n2-p1",
            masquerade: false,
        },
    ];
    let mut ids = Vec::new();
    for c in &cases {
        // What the pod saw is the ground truth the flow event must match.
        let reply = lab.requests(&c.from.0, c.proto, c.to, 1, ANSWER_TIMEOUT);
        let Some(Reply::Served { pod, source }) = reply.first().cloned() else {
            panic!("{}: no answer: {reply:?}", c.name);
        };
        assert_eq!(pod, c.pod, "{}", c.name);
        assert_eq!(source != IpAddr::V4(c.from.1), c.masquerade, "{}: the pod saw {source}", c.name);

        let (src, to) = (IpAddr::V4(c.from.1), engine_addr(c.to));
        let f = first.wait_flow(c.name, |f| f.state == FlowState::New && f.src.ip == src && f.dst == to);
        let endpoint = EngineAddr { ip: IpAddr::V4(lab.pod(c.pod).expect("pod").ip), port: TARGET_PORT };
        let protocol = if c.proto == Proto::Udp { Protocol::Udp } else { Protocol::Tcp };
        assert_eq!((f.origin, f.protocol), (FlowOrigin::Conntrack, protocol), "{}", c.name);
        assert_eq!(f.node, "node-1", "{}", c.name);
        assert_eq!(f.service, Some(ObjectKey::new("default", c.service)), "{}", c.name);
        assert_eq!(f.destination, c.kind, "{}", c.name);
        assert_eq!(f.verdict, Verdict::Forward, "{}", c.name);
        assert_eq!(f.endpoint, Some(endpoint), "{}", c.name);
        assert_eq!(f.masquerade, Some(c.masquerade), "{}", c.name);
        assert_eq!(f.agrees, Some(true), "{}: the tracer predicted {:?}", c.name, f.outcomes);
        assert!(f.outcomes.iter().any(|o| o.endpoint == endpoint), "{}", c.name);
        assert!(f.diagram.is_some(), "{}", c.name);
        ids.push((c.name, f.id));
    }
    // Every case is one connection: no flow was reported twice.
    let distinct: BTreeSet<u64> = ids.iter().map(|(_, id)| *id).collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");

    // The entries end (TCP's would linger in TIME_WAIT for two minutes, UDP's for 30 s):
    // destroyed, same ids.
    let delete = |proto| lab::run("ip", &["netns", "exec", &node1.netns, "conntrack", "-D", "-p", proto]);
    match delete("tcp").and_then(|_| delete("udp")) {
        Ok(_) => {
            for (name, id) in &ids {
                first.wait_flow(name, |f| f.state == FlowState::Destroyed && f.id == *id);
            }
        }
        Err(e) => eprintln!("destroyed events not checked: {e} (apt-get install conntrack)"),
    }

    // A client that reconnects with a sequence number misses nothing.
    let last = first.events.last().map(|(s, _)| *s).expect("events");
    let mut second = Client::connect(agent, Some(since));
    let start = Instant::now();
    while second.events.last().is_none_or(|(s, _)| *s < last) {
        assert!(start.elapsed() < Duration::from_secs(10), "the second client stopped at {:?}", second.events.last());
        second.poll(Duration::from_millis(200));
    }
    assert_eq!(second.snapshot_seq, None, "resumed from the journal, not a snapshot");
    let upto = |c: &Client| -> Vec<(u64, Event)> { c.events.iter().filter(|(s, _)| *s <= last).cloned().collect() };
    let (a, b) = (upto(&first), upto(&second));
    assert_eq!(a.first().map(|(s, _)| *s), Some(since + 1), "the first client's events follow its snapshot");
    assert_eq!(a, b, "the second client saw exactly the first one's events after {since}");
    eprintln!(
        "flows in the lab ({}): {} flow events, {} events in all, {:?}",
        backend.as_str(),
        a.iter().filter(|(_, e)| matches!(e, Event::Flow(_))).count(),
        a.len(),
        started.elapsed()
    );
}

#[test]
fn observer_recovers_from_an_overflow() {
    if skip(BackendChoice::Nftables) {
        return;
    }
    const BURST: usize = 300;
    let lab = Lab::build(&LabSpec { tag: "fo".into(), nodes: 1, pods_per_node: 2, backend: BackendChoice::Nftables })
        .expect("the lab builds");
    let mut lab = lab;
    lab.write("10-services.yaml", &svc("burst", "ClusterIP", "10.96.0.40", &["n1-p0"]).yaml(&lab)).expect("services");
    lab.start_agents().expect("agents start");
    lab.wait_programmed(&["10.96.0.40"], &[], Duration::from_secs(30)).expect("programmed");
    let cluster = switchyard_agent::load::load(std::slice::from_ref(&lab.manifests)).expect("loads").cluster;
    let plan = policy::plan(&cluster, "node-1", Backend::Nftables);
    let node = lab.node("node-1").expect("node-1").clone();

    let flows: Arc<Mutex<Vec<FlowEvent>>> = Arc::default();
    let totals: Arc<Mutex<Stats>> = Arc::default();
    // Held during the burst: the observer blocks publishing the first flow, as a busy one
    // would be busy, and the kernel has to drop what does not fit in the socket's buffer.
    let gate: Arc<Mutex<()>> = Arc::default();
    let (f, t, g) = (flows.clone(), totals.clone(), gate.clone());
    let cfg = ObserverConfig {
        // Few diagrams: the burst is about events, and tracing slowly makes the buffer fill.
        flows: FlowsConfig { diagrams_per_second: 5.0, diagram_burst: 5.0, ..FlowsConfig::new("node-1") },
        netns: Some(node.netns.clone()),
        // The kernel rounds this up to its minimum: room for a handful of events.
        recv_buffer: Some(1),
    };
    let observer = Observer::spawn(
        cfg,
        Box::new(move |e| {
            if let Event::Flow(x) = e {
                let _open = g.lock().expect("lock");
                f.lock().expect("lock").push(*x);
            }
        }),
        Box::new(move |d: &Stats| {
            let mut t = t.lock().expect("lock");
            t.overflows += d.overflows;
            t.resyncs += d.resyncs;
            t.matched += d.matched;
        }),
    )
    .expect("the observer starts in node-1's namespace");
    observer.update(Arc::new(View { cluster: Arc::new(cluster), plan }));
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("the first table dump", &|| totals.lock().expect("lock").resyncs >= 1);

    let client = lab.pod("n1-p1").expect("pod").clone();
    let to: SocketAddrV4 = "10.96.0.40:80".parse().expect("addr");
    let held = gate.lock().expect("lock");
    let replies = lab.requests(&client.netns, Proto::Tcp, to, BURST, ANSWER_TIMEOUT);
    drop(held);
    assert!(replies.iter().all(|r| matches!(r, Reply::Served { .. })), "{replies:?}");

    let dst = engine_addr(to);
    let reported = || -> BTreeSet<u64> {
        flows.lock().expect("lock").iter().filter(|f| f.state == FlowState::New && f.dst == dst).map(|f| f.id).collect()
    };
    wait(&format!("{BURST} connections reported"), &|| reported().len() >= BURST);
    drop(observer);
    let t = *totals.lock().expect("lock");
    eprintln!(
        "overflow test: {BURST} connections, {} overflows, {} table dumps, {} flows",
        t.overflows, t.resyncs, t.matched
    );
    assert!(t.overflows >= 1, "the socket never overflowed: {t:?}");
    assert!(t.resyncs >= 2, "no dump after the overflow: {t:?}");
    let endpoint = EngineAddr { ip: IpAddr::V4(lab.pod("n1-p0").expect("pod").ip), port: TARGET_PORT };
    for f in flows.lock().expect("lock").iter().filter(|f| f.dst == dst) {
        assert_eq!((f.endpoint, f.masquerade, f.agrees), (Some(endpoint), Some(false), Some(true)), "{f:?}");
    }
    assert_eq!(reported().len(), BURST);
}
