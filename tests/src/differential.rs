//! The lab's differential check, shared by the lab and fault tests: real connections from a
//! namespace of the lab must land where the tracer predicts on the node where they meet the proxy
//! ([`run_case`], [`Tally`]), and the kernel's own listing must trace the same. Also the pieces the
//! kernel-fault tests need around it: the `switchyard` binary run in a node's namespace
//! ([`AgentProcess`]), its HTTP API reached from inside that namespace ([`http_get`]), rules
//! Switchyard does not own ([`Foreign`]) and a seeded random source ([`Rng`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr as NetAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_agent::agent::BackendChoice;
use switchyard_agent::lab::{self, CLIENT_IP, Lab, LabNode, Proto, Reply, Svc, TARGET_PORT};
use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::Protocol;
use switchyard_engine::policy::Backend;
use switchyard_engine::trace::{SocketAddr, Trace, Verdict};
use switchyard_engine::{Destination, TraceRequest};

/// Connections per case: with at most four endpoints, missing one by chance is below 1e-7.
pub const CONNECTIONS: usize = 60;
/// A connection that gets no answer in this long was dropped.
pub const DROP_TIMEOUT: Duration = Duration::from_millis(400);
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
pub fn svc(name: &str, kind: &'static str, ip: &str, endpoints: &[&str]) -> Svc {
    Svc {
        name: name.into(),
        kind,
        cluster_ip: ip.into(),
        port: 80,
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        ..Svc::default()
    }
}

/// Where a case's connections come from.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    Client,
    Pod(&'static str),
}

pub struct Case {
    pub name: &'static str,
    pub from: Origin,
    /// The node where the packet meets the proxy (traced there).
    pub node: &'static str,
    pub to: SocketAddrV4,
    pub proto: Proto,
    /// Session affinity: every connection reaches the same pod.
    pub sticky: bool,
    /// Sent to the LB namespace, which forwards to this NodePort of every node (round robin):
    /// traced on each node, and an answer must be one of their outcomes.
    pub lb_node_port: Option<u16>,
}

pub fn case(name: &'static str, from: Origin, node: &'static str, to: &str) -> Case {
    Case { name, from, node, to: to.parse().expect("address"), proto: Proto::Tcp, sticky: false, lb_node_port: None }
}

pub fn skip(backend: BackendChoice) -> bool {
    match lab::skip_reason(backend) {
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
        None => false,
    }
}

pub fn load(lab: &Lab) -> Cluster {
    switchyard_agent::load::load(std::slice::from_ref(&lab.manifests)).expect("the lab's manifests load").cluster
}

pub fn plan_backend(b: BackendChoice) -> Backend {
    match b {
        BackendChoice::Iptables => Backend::Iptables,
        BackendChoice::Ipvs => Backend::Ipvs,
        _ => Backend::Nftables,
    }
}

pub fn source_of(lab: &Lab, from: Origin) -> (String, Ipv4Addr) {
    match from {
        Origin::Client => (lab.client.clone(), CLIENT_IP),
        Origin::Pod(p) => {
            let pod = lab.pod(p).expect("pod");
            (pod.netns.clone(), pod.ip)
        }
    }
}

pub fn trace(cluster: &Cluster, backend: Backend, node: &str, from: Ipv4Addr, to: SocketAddrV4, proto: Proto) -> Trace {
    trace_program(cluster, backend, node, None, from, to, proto).expect("traces")
}

/// Traces `program` (as the kernel lists it), or the render when `None`.
pub fn trace_program(
    cluster: &Cluster,
    backend: Backend,
    node: &str,
    program: Option<String>,
    from: Ipv4Addr,
    to: SocketAddrV4,
    proto: Proto,
) -> Result<Trace, switchyard_engine::Error> {
    let req = TraceRequest {
        node: node.into(),
        backend,
        program,
        from: IpAddr::V4(from),
        to: Destination::Addr(SocketAddr { ip: IpAddr::V4(*to.ip()), port: to.port() }),
        protocol: if proto == Proto::Udp { Protocol::Udp } else { Protocol::Tcp },
        seed: 0,
    };
    switchyard_engine::trace(cluster, &req)
}

/// What a trace predicts, comparable across programs: verdict, and each endpoint with its
/// masquerade flags.
pub fn prediction(t: &Trace) -> (Verdict, BTreeSet<(String, bool)>) {
    (t.verdict, t.outcomes.iter().map(|o| (o.endpoint.to_string(), o.masquerade)).collect())
}

/// What a batch of replies showed, against one or more traces (an endpoint change is checked
/// against the union of before and after).
#[derive(Default)]
pub struct Tally {
    pub connections: usize,
    /// Pod name → connections it served.
    pub reached: BTreeMap<String, usize>,
    pub masqueraded: usize,
    pub refused: usize,
    pub timed_out: usize,
    pub problems: Vec<String>,
}

impl Tally {
    pub fn check(&mut self, lab: &Lab, traces: &[&Trace], from: Ipv4Addr, replies: &[Reply]) {
        let verdicts: Vec<Verdict> = traces.iter().map(|t| t.verdict).collect();
        for r in replies {
            self.connections += 1;
            let problem = match r {
                Reply::Served { pod, source } => {
                    *self.reached.entry(pod.clone()).or_default() += 1;
                    let masq = *source != IpAddr::V4(from);
                    self.masqueraded += usize::from(masq);
                    let ip = lab.pod(pod).map(|p| IpAddr::V4(p.ip));
                    let predicted: Vec<bool> = traces
                        .iter()
                        .flat_map(|t| &t.outcomes)
                        .filter(|o| Some(o.endpoint.ip) == ip && o.endpoint.port == TARGET_PORT)
                        .map(|o| o.masquerade)
                        .collect();
                    if predicted.is_empty() {
                        Some(format!("reached {pod}, which is not in the outcome set"))
                    } else if !predicted.contains(&masq) {
                        Some(format!("{pod} saw source {source}: masquerade {masq}, the tracer says {predicted:?}"))
                    } else {
                        None
                    }
                }
                Reply::Refused => {
                    self.refused += 1;
                    (!verdicts.contains(&Verdict::Reject)).then(|| "refused, the tracer says no reject".to_string())
                }
                Reply::TimedOut => {
                    self.timed_out += 1;
                    (!verdicts.contains(&Verdict::Drop)).then(|| "no answer, the tracer says no drop".to_string())
                }
                Reply::Failed(e) => Some(format!("failed: {e}")),
            };
            if let Some(p) = problem
                && self.problems.len() < 5
            {
                self.problems.push(p);
            }
        }
    }
}

/// The predicted endpoints of a trace, as pod names.
pub fn predicted_pods(lab: &Lab, t: &Trace) -> BTreeSet<String> {
    t.outcomes.iter().filter_map(|o| lab.pod_at(o.endpoint.ip).map(|p| p.name.clone())).collect()
}

pub fn run_case(lab: &Lab, cluster: &Cluster, backend: Backend, c: &Case, report: &mut String) -> Vec<String> {
    let (ns, ip) = source_of(lab, c.from);
    let traces: Vec<Trace> = match c.lb_node_port {
        None => vec![trace(cluster, backend, c.node, ip, c.to, c.proto)],
        Some(np) => lab
            .nodes
            .iter()
            .map(|n| trace(cluster, backend, &n.name, ip, SocketAddrV4::new(n.ip, np), c.proto))
            .collect(),
    };
    let t = &traces[0];
    // The same question asked of what the kernel really holds must get the same answer.
    let mut listed = Vec::new();
    for (t, name) in traces.iter().zip(lab.nodes.iter().map(|n| n.name.as_str())) {
        let name = if c.lb_node_port.is_some() { name } else { c.node };
        let dst = match c.lb_node_port {
            Some(np) => SocketAddrV4::new(lab.node(name).expect("node").ip, np),
            None => c.to,
        };
        let program = lab.kernel_program(lab.node(name).expect("node")).ok();
        match trace_program(cluster, backend, name, program, ip, dst, c.proto) {
            Ok(k) if prediction(&k) == prediction(t) => {}
            Ok(k) => {
                listed.push(format!("the kernel's listing traces {:?}, the render {:?}", prediction(&k), prediction(t)))
            }
            Err(e) => listed.push(format!("the kernel's listing does not trace: {e}")),
        }
    }
    let (count, timeout) = match t.verdict {
        Verdict::Drop => (3, DROP_TIMEOUT),
        Verdict::Reject => (10, ANSWER_TIMEOUT),
        _ => (CONNECTIONS, ANSWER_TIMEOUT),
    };
    let replies = lab.requests(&ns, c.proto, c.to, count, timeout);
    let mut tally = Tally::default();
    tally.check(lab, &traces.iter().collect::<Vec<_>>(), ip, &replies);
    let same = format!("{}/{}", traces.len() - listed.len(), traces.len());
    tally.problems.extend(listed);
    let predicted: BTreeSet<String> = traces.iter().flat_map(|t| predicted_pods(lab, t)).collect();
    let reached: BTreeSet<String> = tally.reached.keys().cloned().collect();
    if t.verdict == Verdict::Forward {
        if c.sticky && reached.len() != 1 {
            tally.problems.push(format!("session affinity, yet {} pods reached: {:?}", reached.len(), tally.reached));
        }
        if !c.sticky && reached != predicted {
            tally.problems.push(format!("reached {reached:?}, predicted {predicted:?}"));
        }
    }
    let _ = writeln!(
        report,
        "  {:<62} {:>8} {:>4} conns  reached {}/{} endpoints {:?}  masq {}  refused {}  no answer {}  listing traces the same {same}",
        c.name,
        t.verdict.as_str(),
        tally.connections,
        reached.len(),
        predicted.len(),
        tally.reached,
        tally.masqueraded,
        tally.refused,
        tally.timed_out
    );
    tally.problems.iter().map(|p| format!("{}: {p}", c.name)).collect()
}

/// Kills `child` on drop (a failing test must not leave an agent running).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `switchyard` binary beside this test's folder (`target/<profile>/switchyard`), which
/// `cargo test --workspace` builds.
pub fn switchyard_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("switchyard");
    bin.is_file().then_some(bin)
}

/// The processes whose parent is `pid`: their pid and command line.
pub fn children(pid: u32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces, so split after the last ')'.
            let (_, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            let cmdline = std::fs::read_to_string(e.path().join("cmdline")).ok()?.replace('\0', " ");
            (ppid == pid).then_some((p, cmdline.trim_end().to_string()))
        })
        .collect()
}

/// Where an [`AgentProcess`] serves its API, on its node namespace's loopback.
pub const AGENT_LISTEN: &str = "127.0.0.1:10260";

/// The `switchyard agent` binary running in a node's namespace (`ip netns exec`, so the tools it
/// runs are found through its own `PATH`), its stderr appended to a log file. SIGKILLed and
/// reaped on drop, so a failing test leaves no agent behind.
pub struct AgentProcess {
    child: Killed,
    pub netns: String,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent of `node`; `path`, when given, is the `PATH` it runs with.
    pub fn start(
        bin: &Path,
        lab: &Lab,
        node: &LabNode,
        path: Option<&std::ffi::OsStr>,
        log: &Path,
    ) -> std::io::Result<AgentProcess> {
        let file = std::fs::File::options().create(true).append(true).open(log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.netns])
            .arg(bin)
            .args(["agent", "--node", &node.name, "--backend", lab.backend.as_str(), "--listen", AGENT_LISTEN])
            .arg("--no-flows")
            .arg("--cluster")
            .arg(&lab.manifests)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        Ok(AgentProcess { child: Killed(cmd.spawn()?), netns: node.netns.clone(), log: log.to_path_buf() })
    }

    /// The agent's pid (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// `GET path` on the agent's API.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.netns, AGENT_LISTEN.parse().ok()?, path)
    }

    /// A metric of `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.get("/metrics").and_then(|(_, body)| metric(&body, name))
    }

    /// What the agent logged so far (every run sharing the log file).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent answers and has completed `n` successful syncs that wrote.
    pub fn wait_synced(&self, n: f64, timeout: Duration) -> Result<(), String> {
        wait_until(&format!("{n} successful syncs"), timeout, || {
            self.metric("switchyard_syncs_written_total").is_some_and(|w| w >= n)
                && self.metric("switchyard_sync_consecutive_failures") == Some(0.0)
        })
        .map_err(|e| format!("{e}\nagent log:\n{}", self.log_text()))
    }
}

/// `GET path` from inside network namespace `ns`: the status code and body.
pub fn http_get(ns: &str, addr: NetAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    lab::in_netns(ns, move || -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        let code = reply.split_whitespace().nth(1)?.parse().ok()?;
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    })
    .ok()
    .flatten()
}

/// A metric's value in the text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The iptables rule [`Foreign`] adds, as `iptables-save` prints it.
pub const FOREIGN_IPTABLES_RULE: &str = "-A POSTROUTING -s 10.9.9.0/24 -j MASQUERADE";

/// Rules Switchyard does not own, added to a node before its agent starts (an nftables table
/// with a base chain and a rule; an iptables rule in a builtin chain), and what they looked like.
pub struct Foreign {
    netns: String,
    nft: String,
    iptables: Vec<String>,
}

impl Foreign {
    pub fn add(node: &LabNode) -> Result<Foreign, lab::LabError> {
        let ns = node.netns.as_str();
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns];
            all.extend_from_slice(args);
            lab::run("ip", &all)
        };
        exec(&["nft", "add table inet foreign"])?;
        exec(&["nft", "add chain inet foreign input { type filter hook input priority 0 ; }"])?;
        exec(&["nft", "add rule inet foreign input tcp dport 9 counter accept comment \"not ours\""])?;
        exec(&["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.9.9.0/24", "-j", "MASQUERADE"])?;
        let (nft, iptables) = Foreign::read(ns);
        Ok(Foreign { netns: ns.to_string(), nft, iptables })
    }

    fn read(ns: &str) -> (String, Vec<String>) {
        let nft = lab::run("ip", &["netns", "exec", ns, "nft", "list", "table", "inet", "foreign"]).unwrap_or_default();
        let save = lab::run("ip", &["netns", "exec", ns, "iptables-save", "-t", "nat"]).unwrap_or_default();
        let ipt = save.lines().filter(|l| l.contains("10.9.9.0/24")).map(str::to_string).collect();
        (nft, ipt)
    }

    /// What changed since they were added (nothing, when Switchyard kept to its own rules).
    pub fn problems(&self) -> Vec<String> {
        let (nft, ipt) = Foreign::read(&self.netns);
        let mut out = Vec::new();
        if nft != self.nft || !nft.contains("not ours") {
            out.push(format!("the foreign nftables table changed:\n{}\n--- now ---\n{nft}", self.nft));
        }
        if ipt != self.iptables || ipt != [FOREIGN_IPTABLES_RULE] {
            out.push(format!("the foreign iptables rule changed: was {:?}, now {ipt:?}", self.iptables));
        }
        out
    }
}

/// A small seeded generator (splitmix64): fault schedules are random, yet replayable from the
/// printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The seed in environment variable `var`, or one from the clock.
    pub fn seed_from_env(var: &str) -> u64 {
        std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
