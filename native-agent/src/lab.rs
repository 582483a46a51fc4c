//! The lab: a small Kubernetes-shaped cluster made of network namespaces on one machine, with one
//! Switchyard agent per node programming that node's kernel from a shared manifests folder.
//!
//! ```text
//!  client ns 198.51.100.2 ──veth── lb ns (router; bridge `ul` 192.168.77.1; 203.0.113.0/24 → node-1;
//!                                         `lb_forward`: a VIP DNATed to every node's NodePort)
//!                                      │ underlay bridge
//!            ┌─────────────────────────┼─────────────────────────┐
//!   node-1 ns 192.168.77.11      node-2 ns 192.168.77.12      (node-3 ...)
//!   bridge cbr0 10.244.1.1/24    bridge cbr0 10.244.2.1/24      routes: 10.244.j.0/24 via node j
//!     pods 10.244.1.10, .11 ...    pods 10.244.2.10, .11 ...
//! ```
//!
//! Every namespace is named `sy-lab-<pid>-<tag>-...`: [`Lab`] deletes its namespaces when dropped
//! (success, failure and panic alike), and [`sweep`] deletes those a killed run left behind (its
//! pid is gone). Pod servers are threads of this process whose sockets were opened inside the
//! pod's namespace (`setns` on a thread of their own), answering TCP and UDP on
//! [`TARGET_PORT`] with `"<pod> <source address seen>"`; [`Lab::requests`] sends real
//! connections from any namespace of the lab the same way. The agents are
//! [`crate::agent::spawn`] with the real appliers running `ip netns exec <node> nft|iptables-restore`.
//!
//! Bridged traffic goes through the node's netfilter hooks (`br_netfilter`, as kube-proxy
//! requires for same-node pod traffic) and bridge ports are in hairpin mode, as kubelet sets them.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::agent::{self, AgentConfig, AgentError, BackendChoice};
use crate::sync::Backoff;

/// Every lab namespace starts with this.
pub const PREFIX: &str = "sy-lab-";
/// The port every pod serves on, TCP and UDP (Services' `targetPort`).
pub const TARGET_PORT: u16 = 8080;
/// The external client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Load-balancer addresses (`status.loadBalancer.ingress`) are routed by the LB namespace to node-1.
pub const LB_NET: &str = "203.0.113.0/24";
/// The cluster CIDR every pod CIDR is cut from.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// Why the lab could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the agent of {node}: {source}")]
    Agent {
        node: String,
        #[source]
        source: AgentError,
    },
    #[error("a lab thread panicked")]
    Panicked,
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// How big a lab to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Distinguishes labs of one process (part of every namespace name).
    pub tag: String,
    /// Node namespaces (1..=9).
    pub nodes: usize,
    /// Pods per node (1..=9).
    pub pods_per_node: usize,
    pub backend: BackendChoice,
}

/// A node namespace.
#[derive(Debug, Clone)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// `10.244.<n>.0/24`.
    pub pod_cidr: String,
}

/// A pod namespace behind its node's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub node: String,
    pub ip: Ipv4Addr,
}

/// What one request got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A pod answered, and saw the request come from `source`.
    Served {
        pod: String,
        source: IpAddr,
    },
    /// TCP: connection refused (a reject). UDP: an ICMP port unreachable.
    Refused,
    /// No answer in time (a drop).
    TimedOut,
    Failed(String),
}

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A running lab; everything is torn down on drop.
pub struct Lab {
    pub prefix: String,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<Pod>,
    pub client: String,
    pub lb: String,
    pub manifests: PathBuf,
    pub backend: BackendChoice,
    namespaces: Vec<String>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// (node name, its agent).
    agents: Vec<(String, agent::Running)>,
}

impl LabNode {
    fn index(&self) -> u8 {
        self.ip.octets()[3] - 10
    }
}

impl Lab {
    /// Builds the namespaces and starts the pod servers; no agent yet (see [`Lab::start_agents`]),
    /// so the manifests can be written first.
    pub fn build(spec: &LabSpec) -> Result<Lab> {
        sweep();
        let prefix = format!("{PREFIX}{}-{}-", std::process::id(), spec.tag);
        let manifests = std::env::temp_dir().join(prefix.trim_end_matches('-'));
        let _ = std::fs::remove_dir_all(&manifests);
        std::fs::create_dir_all(&manifests)
            .map_err(|source| LabError::Io { what: format!("create {}", manifests.display()), source })?;
        let mut lab = Lab {
            client: format!("{prefix}client"),
            lb: format!("{prefix}lb"),
            prefix,
            nodes: Vec::new(),
            pods: Vec::new(),
            manifests,
            backend: spec.backend,
            namespaces: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            agents: Vec::new(),
        };
        (lab.nodes, lab.pods) = layout(&lab.prefix, spec);
        // From here on, a failure drops `lab`, which deletes what was made.
        lab.wire()?;
        for pod in lab.pods.clone() {
            lab.serve(&pod)?;
        }
        lab.write("00-lab-cluster.yaml", &lab.cluster_yaml())?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(name, "link set lo up")
    }

    fn wire(&mut self) -> Result<()> {
        let (lb, client) = (self.lb.clone(), self.client.clone());
        self.add_netns(&lb)?;
        sysctl(&lb, "net.ipv4.ip_forward=1")?;
        // The underlay is a plain switch: its frames must not meet netfilter in the LB namespace.
        sysctl(&lb, "net.bridge.bridge-nf-call-iptables=0")?;
        ip(&lb, "link add ul type bridge")?;
        ip(&lb, "addr add 192.168.77.1/24 dev ul")?;
        ip(&lb, "link set ul up")?;

        self.add_netns(&client)?;
        run("ip", &["-n", &client, "link", "add", "eth0", "type", "veth", "peer", "name", "client", "netns", &lb])?;
        ip(&client, &format!("addr add {CLIENT_IP}/24 dev eth0"))?;
        ip(&client, "link set eth0 up")?;
        ip(&client, "route add default via 198.51.100.1")?;
        ip(&lb, "addr add 198.51.100.1/24 dev client")?;
        ip(&lb, "link set client up")?;

        for node in self.nodes.clone() {
            let (ns, i) = (node.netns.as_str(), node.index());
            self.add_netns(ns)?;
            sysctl(ns, "net.ipv4.ip_forward=1")?;
            // kube-proxy's rules must see bridged pod-to-pod traffic (same-node services, hairpin).
            sysctl(ns, "net.bridge.bridge-nf-call-iptables=1")?;
            let port = format!("n{i}");
            run("ip", &["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &lb])?;
            ip(&lb, &format!("link set {port} master ul up"))?;
            ip(ns, &format!("addr add {}/24 dev eth0", node.ip))?;
            ip(ns, "link set eth0 up")?;
            ip(ns, "route add default via 192.168.77.1")?;
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                ip(ns, &format!("route add {} via {}", other.pod_cidr, other.ip))?;
            }
            ip(ns, "link add cbr0 type bridge")?;
            ip(ns, &format!("addr add 10.244.{i}.1/24 dev cbr0"))?;
            ip(ns, "link set cbr0 up")?;
        }
        for pod in self.pods.clone() {
            let node = self.node(&pod.node).cloned().ok_or_else(|| LabError::Command {
                command: "lab".into(),
                message: format!("pod {} on unknown node {}", pod.name, pod.node),
            })?;
            let (ns, nns) = (pod.netns.as_str(), node.netns.as_str());
            self.add_netns(ns)?;
            let port = format!("v{}", pod.ip.octets()[3]);
            run("ip", &["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", nns])?;
            ip(nns, &format!("link set {port} master cbr0 up"))?;
            // A pod that reaches itself through a Service comes back through its own port.
            ip(nns, &format!("link set {port} type bridge_slave hairpin on"))?;
            ip(ns, &format!("addr add {}/24 dev eth0", pod.ip))?;
            ip(ns, "link set eth0 up")?;
            ip(ns, &format!("route add default via 10.244.{}.1", node.index()))?;
        }
        if let Some(first) = self.nodes.first() {
            ip(&lb, &format!("route add {LB_NET} via {}", first.ip))?;
        }
        Ok(())
    }

    /// Starts TCP and UDP servers in `pod`'s namespace.
    fn serve(&mut self, pod: &Pod) -> Result<()> {
        let (name, ns) = (pod.name.clone(), pod.netns.clone());
        let (tcp, udp) = in_netns(&ns, || -> std::io::Result<(TcpListener, UdpSocket)> {
            let t = TcpListener::bind((Ipv4Addr::UNSPECIFIED, TARGET_PORT))?;
            let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, TARGET_PORT))?;
            Ok((t, u))
        })?
        .map_err(|source| LabError::Io { what: format!("listen in {ns}"), source })?;
        tcp.set_nonblocking(true).map_err(|source| LabError::Io { what: "nonblocking".into(), source })?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|source| LabError::Io { what: "udp timeout".into(), source })?;
        let stop = self.stop.clone();
        let n = name.clone();
        self.servers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "{n} {}", peer.ip());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }));
        let stop = self.stop.clone();
        self.servers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{name} {}\n", peer.ip()).as_bytes(), peer);
                }
            }
        }));
        Ok(())
    }

    /// Nodes, the cluster CIDR, quick syncs: the part of the manifests the lab itself owns.
    pub fn cluster_yaml(&self) -> String {
        cluster_yaml(&self.nodes)
    }

    /// Writes a manifest through a hidden file and a rename, so agents see it whole.
    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        let io = |what: &str, source| LabError::Io { what: format!("{what} {name}"), source };
        std::fs::write(&tmp, text).map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, self.manifests.join(name)).map_err(|e| io("rename", e))
    }

    /// Starts one in-process agent per node, each programming its node's namespace.
    pub fn start_agents(&mut self) -> Result<()> {
        for n in self.nodes.clone() {
            self.agents.push((n.name.clone(), self.spawn_agent(&n)?));
        }
        Ok(())
    }

    fn spawn_agent(&self, n: &LabNode) -> Result<agent::Running> {
        let cfg = AgentConfig {
            node: n.name.clone(),
            source: agent::AgentSource::Manifests(self.manifests.clone()),
            backend: self.backend,
            netns: Some(n.netns.clone()),
            backoff: Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(2) },
            flows: true,
        };
        agent::spawn(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|source| LabError::Agent { node: n.name.clone(), source })
    }

    /// Makes the LB namespace forward TCP to `vip` to the nodes' `node_port`, round robin, as a
    /// cloud load balancer in front of NodePorts would: DNAT only, so nodes see the client's
    /// address, and replies come back through the LB (the nodes' default route).
    pub fn lb_forward(&self, vip: SocketAddrV4, node_port: u16) -> Result<()> {
        let map: Vec<String> = self.nodes.iter().enumerate().map(|(i, n)| format!("{i} : {}", n.ip)).collect();
        let nft = |cmd: &str| run("ip", &["netns", "exec", &self.lb, "nft", cmd]).map(drop);
        nft("add table ip lab")?;
        nft("add chain ip lab prerouting { type nat hook prerouting priority dstnat ; }")?;
        nft(&format!(
            "add rule ip lab prerouting ip daddr {} tcp dport {} dnat to numgen inc mod {} map {{ {} }} : {node_port}",
            vip.ip(),
            vip.port(),
            self.nodes.len(),
            map.join(", ")
        ))
    }

    /// Where the agent of `node` serves its HTTP API (on this process's loopback).
    pub fn agent_addr(&self, node: &str) -> Option<SocketAddr> {
        self.agents.iter().find(|(n, _)| n == node).map(|(_, a)| a.addr)
    }

    pub fn node(&self, name: &str) -> Option<&LabNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The pod serving at `ip`.
    pub fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods.iter().find(|p| IpAddr::V4(p.ip) == ip)
    }

    /// What the node's kernel holds of the backend's rules (`nft list table` / `iptables-save`).
    pub fn listing(&self, node: &LabNode) -> String {
        let r = match self.backend {
            BackendChoice::Iptables => run("ip", &["netns", "exec", &node.netns, "iptables-save", "-t", "nat"]),
            _ => run("ip", &["netns", "exec", &node.netns, "nft", "list", "table", "ip", "switchyard"]),
        };
        r.unwrap_or_default()
    }

    /// The node's program as the kernel lists it, in a form `trace --program` reads
    /// (`nft list table ip switchyard`, or the whole of `iptables-save`).
    pub fn kernel_program(&self, node: &LabNode) -> Result<String> {
        match self.backend {
            BackendChoice::Iptables => run("ip", &["netns", "exec", &node.netns, "iptables-save"]),
            _ => run("ip", &["netns", "exec", &node.netns, "nft", "list", "table", "ip", "switchyard"]),
        }
    }

    /// Waits until every node's kernel holds each of `present` and none of `absent` (strings of
    /// its listing, such as an endpoint's `10.244.1.10:8080` or a ClusterIP).
    pub fn wait_programmed(&self, present: &[&str], absent: &[&str], timeout: Duration) -> Result<()> {
        self.wait_programmed_on(&self.nodes, present, absent, timeout)
    }

    /// [`Lab::wait_programmed`] on some nodes only.
    pub fn wait_programmed_on(
        &self,
        nodes: &[LabNode],
        present: &[&str],
        absent: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        for n in nodes {
            loop {
                let l = self.listing(n);
                // iptables: the builtin jumps are ensured after the restore, PREROUTING's last.
                let jumped = self.backend != BackendChoice::Iptables
                    || l.lines().any(|j| j.starts_with("-A PREROUTING") && j.ends_with("-j SWITCHYARD-SERVICES"));
                if jumped && present.iter().all(|p| l.contains(p)) && !absent.iter().any(|a| l.contains(a)) {
                    break;
                }
                if start.elapsed() > timeout {
                    return Err(LabError::Timeout(
                        timeout,
                        format!("{} to hold {present:?} and not {absent:?}", n.name),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Sends `count` requests (a new connection or socket each) from namespace `from` to `to`.
    pub fn requests(&self, from: &str, proto: Proto, to: SocketAddrV4, count: usize, timeout: Duration) -> Vec<Reply> {
        in_netns(from, move || (0..count).map(|_| request(proto, to, timeout)).collect())
            .unwrap_or_else(|e| vec![Reply::Failed(e.to_string())])
    }

    /// Stops the agents, leaving their rules in place.
    pub fn stop_agents(&mut self) {
        for (_, a) in self.agents.drain(..) {
            let _ = a.stop();
        }
    }

    /// Restarts the agent of `node` (after [`Lab::stop_agents`] or a kill).
    pub fn restart_agent(&mut self, node: &str) -> Result<()> {
        let n = self
            .node(node)
            .cloned()
            .ok_or_else(|| LabError::Command { command: "lab".into(), message: format!("no node {node}") })?;
        let a = self.spawn_agent(&n)?;
        self.agents.push((n.name, a));
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agents();
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "delete", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// One request: a new TCP connection or UDP socket, from the calling thread's namespace.
pub fn request(proto: Proto, to: SocketAddrV4, timeout: Duration) -> Reply {
    let kind = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Reply::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Reply::TimedOut,
        // std's `connect_timeout` saw the connection fail (POLLHUP) after the ICMP error that
        // refused it had already been taken from the socket: a refusal all the same.
        _ if e.to_string().contains("no error set after POLLHUP") => Reply::Refused,
        _ => Reply::Failed(e.to_string()),
    };
    let text = match proto {
        Proto::Tcp => {
            let mut s = match TcpStream::connect_timeout(&to.into(), timeout) {
                Ok(s) => s,
                Err(e) => return kind(e),
            };
            let _ = s.set_read_timeout(Some(timeout));
            let mut text = String::new();
            if let Err(e) = s.read_to_string(&mut text) {
                return kind(e);
            }
            text
        }
        Proto::Udp => {
            let s = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
                Ok(s) => s,
                Err(e) => return Reply::Failed(e.to_string()),
            };
            let _ = s.set_read_timeout(Some(timeout));
            if let Err(e) = s.connect(to).and_then(|()| s.send(b"hello")) {
                return kind(e);
            }
            let mut buf = [0u8; 128];
            match s.recv(&mut buf) {
                Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e) => return kind(e),
            }
        }
    };
    let mut w = text.split_whitespace();
    match (w.next(), w.next().and_then(|a| a.parse().ok())) {
        (Some(pod), Some(source)) => Reply::Served { pod: pod.to_string(), source },
        _ => Reply::Failed(format!("unexpected answer {text:?}")),
    }
}

/// Runs `f` on a thread that has entered network namespace `name` (sockets it opens stay there).
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path)
        .map_err(|source| LabError::Io { what: format!("open {}", path.display()), source })?;
    let t = std::thread::spawn(move || -> Result<T> {
        rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
            .map_err(|e| LabError::Io { what: "setns".into(), source: e.into() })?;
        Ok(f())
    });
    t.join().map_err(|_| LabError::Panicked)?
}

fn ip(ns: &str, args: &str) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend(args.split_whitespace());
    run("ip", &all).map(drop)
}

fn sysctl(ns: &str, setting: &str) -> Result<()> {
    run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", setting]).map(drop)
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command { command: command.clone(), message: e.to_string() })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let message = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim_end());
        Err(LabError::Command { command, message })
    }
}

/// Deletes lab namespaces (and manifests folders) whose process is gone; `all` deletes every
/// lab namespace. Returns the names deleted.
pub fn sweep_with(all: bool) -> Vec<String> {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return Vec::new();
    };
    let mut gone = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if (all || !Path::new("/proc").join(pid).exists()) && run("ip", &["netns", "delete", name]).is_ok() {
            gone.push(name.to_string());
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
                continue;
            };
            if all || !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
    }
    gone
}

/// The nodes and pods of a lab, with their names and addresses (no namespace is made).
pub fn layout(prefix: &str, spec: &LabSpec) -> (Vec<LabNode>, Vec<Pod>) {
    let (mut nodes, mut pods) = (Vec::new(), Vec::new());
    for i in 1..=spec.nodes.clamp(1, 9) as u8 {
        let node = LabNode {
            name: format!("node-{i}"),
            netns: format!("{prefix}n{i}"),
            ip: Ipv4Addr::new(192, 168, 77, 10 + i),
            pod_cidr: format!("10.244.{i}.0/24"),
        };
        for k in 0..spec.pods_per_node.clamp(1, 9) as u8 {
            pods.push(Pod {
                name: format!("n{i}-p{k}"),
                netns: format!("{prefix}n{i}p{k}"),
                node: node.name.clone(),
                ip: Ipv4Addr::new(10, 244, i, 10 + k),
            });
        }
        nodes.push(node);
    }
    (nodes, pods)
}

/// The nodes' and the proxy's documents of a lab's manifests: quick syncs, the cluster CIDR.
pub fn cluster_yaml(nodes: &[LabNode]) -> String {
    let mut s = String::new();
    for n in nodes {
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nspec:\n  podCIDR: {}\n  podCIDRs: [{}]\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n---\n",
            n.name, n.pod_cidr, n.pod_cidr, n.ip
        );
    }
    let _ = write!(
        s,
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs: [10.96.0.0/16]\n---\napiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: {CLUSTER_CIDR}\ndetectLocalMode: ClusterCIDR\nminSyncPeriod: 50ms\nsyncPeriod: 60s\n"
    );
    s
}

/// Deletes what killed runs left behind.
pub fn sweep() {
    let _ = sweep_with(false);
}

/// Why the lab cannot run here, or `None` when it can.
pub fn skip_reason(backend: BackendChoice) -> Option<String> {
    if backend == BackendChoice::Ipvs && !crate::apply::ipvs::ipvs_available() {
        return Some(
            "this kernel has no IPVS module (no /proc/net/ip_vs): virtual servers cannot be programmed".into(),
        );
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false);
    if !root {
        return Some("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    let tools: &[&str] = match backend {
        // The LB namespace forwards with nft whatever the nodes run.
        BackendChoice::Iptables => &["ip", "nft", "iptables", "iptables-restore", "iptables-save", "ip6tables-restore"],
        _ => &["ip", "nft"],
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            return Some(format!("`{tool}` is not installed (apt-get install nftables iptables iproute2)"));
        }
    }
    if !Path::new("/proc/sys/net/bridge").exists() {
        return Some("br_netfilter is not loaded (modprobe br_netfilter)".into());
    }
    None
}

/// One Service of a lab manifest, with its EndpointSlice.
#[derive(Debug, Clone, Default)]
pub struct Svc {
    pub name: String,
    /// ClusterIP, NodePort or LoadBalancer.
    pub kind: &'static str,
    pub cluster_ip: String,
    pub port: u16,
    pub node_port: Option<u16>,
    pub udp: bool,
    pub etp_local: bool,
    pub itp_local: bool,
    pub affinity: bool,
    pub lb_ip: Option<String>,
    pub source_ranges: Vec<String>,
    /// Pod names.
    pub endpoints: Vec<String>,
}

impl Svc {
    /// The Service and its EndpointSlice as YAML documents.
    pub fn yaml(&self, lab: &Lab) -> String {
        self.yaml_for(&lab.pods)
    }

    /// [`Svc::yaml`] with the pods given.
    pub fn yaml_for(&self, pods: &[Pod]) -> String {
        let proto = if self.udp { "UDP" } else { "TCP" };
        let mut s = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: default\nspec:\n  type: {}\n  clusterIP: {}\n  selector:\n    app: {}\n  ports:\n  - name: p\n    protocol: {proto}\n    port: {}\n    targetPort: {TARGET_PORT}\n",
            self.name, self.kind, self.cluster_ip, self.name, self.port
        );
        if let Some(np) = self.node_port {
            let _ = writeln!(s, "    nodePort: {np}");
        }
        if self.etp_local {
            s.push_str("  externalTrafficPolicy: Local\n");
        }
        if self.itp_local {
            s.push_str("  internalTrafficPolicy: Local\n");
        }
        if self.affinity {
            s.push_str("  sessionAffinity: ClientIP\n");
        }
        if !self.source_ranges.is_empty() {
            let _ = writeln!(s, "  loadBalancerSourceRanges: [{}]", self.source_ranges.join(", "));
        }
        if let Some(ip) = &self.lb_ip {
            let _ = writeln!(s, "status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}");
        }
        let _ = write!(
            s,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {}\naddressType: IPv4\nports:\n- name: p\n  protocol: {proto}\n  port: {TARGET_PORT}\nendpoints:",
            self.name, self.name
        );
        if self.endpoints.is_empty() {
            s.push_str(" []\n");
        } else {
            s.push('\n');
        }
        for p in self.endpoints.iter().filter_map(|e| pods.iter().find(|p| p.name == *e)) {
            let _ = write!(
                s,
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {}\n  targetRef:\n    kind: Pod\n    namespace: default\n    name: {}\n",
                p.ip, p.node, p.name
            );
        }
        s.push_str("---\n");
        s
    }
}

/// The Services `switchyard lab up` shows: a NodePort with endpoints on every node and a
/// LoadBalancer reachable from the client namespace through the LB namespace.
pub fn demo_services(pods: &[Pod]) -> Vec<Svc> {
    let all: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
    vec![
        Svc {
            name: "web".into(),
            kind: "NodePort",
            cluster_ip: "10.96.0.10".into(),
            port: 80,
            node_port: Some(30080),
            endpoints: all.clone(),
            ..Svc::default()
        },
        Svc {
            name: "lb".into(),
            kind: "LoadBalancer",
            cluster_ip: "10.96.0.12".into(),
            port: 80,
            node_port: Some(30082),
            lb_ip: Some("203.0.113.10".into()),
            endpoints: all,
            ..Svc::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::trace::{SocketAddr as EngineAddr, Verdict};
    use switchyard_engine::{Destination, TraceRequest};

    /// The lab's own manifests load, and the tracer sees the demo Services as the lab wires them:
    /// the ClusterIP spreads over every pod, the NodePort from the client is masqueraded.
    #[test]
    fn demo_manifests_load_and_trace() {
        let spec = LabSpec { tag: "unit".into(), nodes: 2, pods_per_node: 2, backend: BackendChoice::None };
        let (nodes, pods) = layout("sy-lab-0-unit-", &spec);
        assert_eq!((nodes.len(), pods.len()), (2, 4));
        assert_eq!(pods[2].ip, Ipv4Addr::new(10, 244, 2, 10));
        let dir = std::env::temp_dir().join(format!("sy-unit-lab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let yaml: String = demo_services(&pods).iter().map(|s| s.yaml_for(&pods)).collect();
        std::fs::write(dir.join("a.yaml"), cluster_yaml(&nodes) + "---\n" + &yaml).expect("write");
        let loaded = crate::load::load(std::slice::from_ref(&dir));
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = loaded.expect("loads").cluster;
        let trace = |from: Ipv4Addr, ip: Ipv4Addr, port: u16| {
            let req = TraceRequest {
                node: "node-1".into(),
                backend: switchyard_engine::policy::Backend::Nftables,
                program: None,
                from: IpAddr::V4(from),
                to: Destination::Addr(EngineAddr { ip: IpAddr::V4(ip), port }),
                protocol: switchyard_engine::model::Protocol::Tcp,
                seed: 0,
            };
            switchyard_engine::trace(&cluster, &req).expect("traces")
        };
        let t = trace(pods[0].ip, Ipv4Addr::new(10, 96, 0, 10), 80);
        assert_eq!((t.verdict, t.outcomes.len()), (Verdict::Forward, 4));
        let t = trace(CLIENT_IP, nodes[0].ip, 30080);
        assert_eq!(t.verdict, Verdict::Forward);
        assert!(t.outcomes.iter().all(|o| o.masquerade && o.endpoint.port == TARGET_PORT), "{t:?}");
    }
}
