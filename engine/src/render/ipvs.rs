//! IPVS programs: a [`NodePlan`] written the way kube-proxy's IPVS mode programs a node
//! (kubernetes `pkg/proxy/ipvs/proxier.go`, v1.29-1.33), under our own names.
//!
//! A program has up to five sections, each introduced by a comment line:
//!
//! - [`SECTION_IPVSADM`] (`ipvsadm -R` input): a virtual server per cluster IP, external IP and
//!   load-balancer IP with its port, and per NodePort address × NodePort; real servers in
//!   masquerading (NAT) mode, weight 1, and weight 0 for terminating endpoints that only drain
//!   (kube-proxy's graceful termination); the scheduler is `ipvs.scheduler`; ClientIP affinity is
//!   IPVS persistence (`-p timeout`). Comment lines name the Service port behind each virtual
//!   server; strip them before piping (ipvsadm reads no comments).
//! - [`SECTION_IPSET`] (`ipset restore` input): kube-proxy's sets (`KUBE-CLUSTER-IP`,
//!   `KUBE-LOOP-BACK`, ...) as `SWITCHYARD-...`, IPv6 ones as `SWITCHYARD-6-...`. ipset names
//!   are at most 31 characters, so the load-balancer sets are `LB-...`, and NodePorts are one
//!   `hash:ip,port` set (protocol in the element) rather than kube-proxy's per-protocol bitmaps.
//! - [`iptables::SECTION_V4`] / [`iptables::SECTION_V6`] (`iptables-restore` input): IPVS mode's
//!   chains, matching the sets: masquerade marks for cluster IPs (local-traffic detector),
//!   external IPs, load balancers and NodePorts, `externalTrafficPolicy: Local` exemptions,
//!   hairpin masquerade through the loop-back set, the load-balancer source-range firewall,
//!   health-check node ports, and `SWITCHYARD-IPVS-FILTER` (kube-proxy's `KUBE-IPVS-FILTER`)
//!   rejecting ports of a bound address that no service has.
//! - [`SECTION_IP`] (`ip -batch` input): the [`DUMMY_INTERFACE`] and the service addresses bound
//!   to it, so that the kernel delivers them locally where IPVS picks them up.
//!
//! Where this project's other backends answer differently from kube-proxy's IPVS mode, the plan
//! decides, as it does for them ([`crate::policy`]):
//! - services with no endpoints are rejected, and a Local policy with no local endpoint drops,
//!   by filter rules before IPVS (`SWITCHYARD-NO-ENDPOINTS`, `SWITCHYARD-NO-LOCAL-ENDPOINTS`);
//!   kube-proxy writes no such rules (the empty virtual server answers ICMP port unreachable);
//! - unallocated ServiceCIDR addresses are dropped (`SWITCHYARD-CLUSTER-IPS-CHECK`);
//! - `externalTrafficPolicy: Local` short-circuits pod and node traffic to all endpoints, as
//!   kube-proxy's iptables and nftables modes do (its IPVS mode sends it to local endpoints
//!   only): the traffic is marked in nat and served by a firewall-mark virtual server
//!   (`-f MARK`) with the cluster endpoints; the node's own traffic carries the masquerade bit
//!   too, so it has its own mark;
//! - hairpin masquerade covers every endpoint, not only local ones.
//!
//! [`render_incremental`] writes the smallest transaction: `-A/-E/-D` and `-a/-e/-d` lines,
//! `add`/`del` of set members, changed chains for `iptables-restore --noflush`, and address
//! changes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::{IpFamily, ObjectKey, Protocol};
use crate::policy::{FamilyPlan, FilterVerdict, LocalDetector, NodePlan, NodePortAddresses, ServicePortPlan};
use crate::render::iptables;
use crate::trace::SocketAddr;

/// The comment line that starts the `ipvsadm -R` section.
pub const SECTION_IPVSADM: &str = "# ipvsadm -R";
/// The comment line that starts the `ipset restore` section.
pub const SECTION_IPSET: &str = "# ipset restore";
/// The comment line that starts the `ip -batch` section (the dummy interface's addresses).
pub const SECTION_IP: &str = "# ip -batch";
/// The dummy interface service addresses are bound to (kube-proxy's name, which tools expect).
pub const DUMMY_INTERFACE: &str = "kube-ipvs0";
/// The schedulers `ipvs.scheduler` may name.
pub const SCHEDULERS: [&str; 11] = ["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh"];

const PREFIX: &str = iptables::CHAIN_PREFIX;
const NAT_SERVICES: &str = "SWITCHYARD-SERVICES";
const NAT_POSTROUTING: &str = "SWITCHYARD-POSTROUTING";
const MARK_MASQ: &str = "SWITCHYARD-MARK-MASQ";
const MASQ_NOT_LOCAL: &str = "SWITCHYARD-MASQ-NOT-LOCAL";
const LOAD_BALANCER: &str = "SWITCHYARD-LOAD-BALANCER";
const NODE_PORT: &str = "SWITCHYARD-NODE-PORT";
const FORWARD: &str = "SWITCHYARD-FORWARD";
const PROXY_FIREWALL: &str = "SWITCHYARD-PROXY-FIREWALL";
const SOURCE_RANGES: &str = "SWITCHYARD-SOURCE-RANGES";
const IPVS_FILTER: &str = "SWITCHYARD-IPVS-FILTER";
const FILTER_SERVICES: &str = "SWITCHYARD-SERVICES";
const CLUSTER_IPS_CHECK: &str = "SWITCHYARD-CLUSTER-IPS-CHECK";

/// A virtual server's identity: a protocol, address and port, or a firewall mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VsKey {
    Addr { protocol: Protocol, addr: SocketAddr },
    Fwmark { family: IpFamily, mark: u32 },
}

impl VsKey {
    pub fn family(&self) -> IpFamily {
        match self {
            VsKey::Addr { addr, .. } => IpFamily::of(&addr.ip),
            VsKey::Fwmark { family, .. } => *family,
        }
    }

    /// The service as `ipvsadm -S` writes it: `-t 10.96.0.10:80`, `-f 65537 -6`.
    pub fn spec(&self) -> String {
        match self {
            VsKey::Addr { protocol, addr } => {
                let flag = match protocol {
                    Protocol::Tcp => "-t",
                    Protocol::Udp => "-u",
                    Protocol::Sctp => "--sctp-service",
                };
                format!("{flag} {addr}")
            }
            VsKey::Fwmark { family: IpFamily::V4, mark } => format!("-f {mark}"),
            VsKey::Fwmark { family: IpFamily::V6, mark } => format!("-f {mark} -6"),
        }
    }

    /// The service as `ipvsadm -Ln` shows it: `TCP  10.96.0.10:80`, `FWM  65537`.
    pub fn display(&self) -> String {
        match self {
            VsKey::Addr { protocol, addr } => format!("{:<4} {addr}", protocol.as_str().to_uppercase()),
            VsKey::Fwmark { family: IpFamily::V4, mark } => format!("FWM  {mark}"),
            VsKey::Fwmark { family: IpFamily::V6, mark } => format!("FWM  {mark} IPv6"),
        }
    }
}

/// A real server of a virtual server (always masquerading: IPVS's NAT mode, as kube-proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RealServer {
    pub addr: SocketAddr,
    /// 0: draining, receives no new connections.
    pub weight: u32,
}

/// One virtual server and its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    pub key: VsKey,
    pub scheduler: String,
    /// `-p SECONDS`: ClientIP session affinity.
    pub persistence: Option<u32>,
    /// Sorted by address.
    pub reals: Vec<RealServer>,
    /// Which Service port and field made it.
    pub comment: Option<String>,
}

impl VirtualServer {
    /// `-A ...` as `ipvsadm -S` writes it (the command letter is a parameter for `-E`).
    pub fn line(&self, command: &str) -> String {
        let mut s = format!("{command} {} -s {}", self.key.spec(), self.scheduler);
        if let Some(p) = self.persistence {
            let _ = write!(s, " -p {p}");
        }
        s
    }

    /// `-a ... -r ADDR -m -w WEIGHT`.
    pub fn real_line(&self, command: &str, r: &RealServer) -> String {
        format!("{command} {} -r {} -m -w {}", self.key.spec(), r.addr, r.weight)
    }
}

/// How an ipset stores its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    HashIp,
    HashIpPort,
    HashIpPortIp,
    HashIpPortNet,
    BitmapPort,
}

impl SetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SetKind::HashIp => "hash:ip",
            SetKind::HashIpPort => "hash:ip,port",
            SetKind::HashIpPortIp => "hash:ip,port,ip",
            SetKind::HashIpPortNet => "hash:ip,port,net",
            SetKind::BitmapPort => "bitmap:port",
        }
    }

    pub fn parse(s: &str) -> Option<SetKind> {
        [SetKind::HashIp, SetKind::HashIpPort, SetKind::HashIpPortIp, SetKind::HashIpPortNet, SetKind::BitmapPort]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Each hash set's `maxelem`. kube-proxy's 65,536 is too few for `KUBE-LOOP-BACK` at 10,000
/// Services of 10 endpoints ("Hash is full"); the cap costs nothing, memory follows the members.
pub const MAX_ELEMENTS: u32 = 1 << 20;

/// One ipset, its members written as `ipset` writes them (`10.96.0.10,tcp:80`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSet {
    pub name: String,
    pub kind: SetKind,
    pub family: IpFamily,
    /// What the set is for (kube-proxy's set comment).
    pub comment: &'static str,
    pub members: BTreeSet<String>,
}

impl IpSet {
    /// `create NAME TYPE ...` as `ipset save` writes it.
    pub fn create_line(&self) -> String {
        match self.kind {
            SetKind::BitmapPort => format!("create {} bitmap:port range 0-65535", self.name),
            k => {
                let fam = if self.family == IpFamily::V6 { "inet6" } else { "inet" };
                format!("create {} {} family {fam} hashsize 1024 maxelem {MAX_ELEMENTS}", self.name, k.as_str())
            }
        }
    }
}

/// The sets of one family, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Set {
    ClusterIp,
    LoopBack,
    ExternalIp,
    ExternalIpLocal,
    Lb,
    LbFw,
    LbLocal,
    LbSourceIp,
    LbSourceCidr,
    NodePort,
    NodePortLocal,
    HealthCheck,
    IpvsIps,
    NoEndpoints,
    NoLocalEndpoints,
}

const SETS: [Set; 15] = [
    Set::ClusterIp,
    Set::LoopBack,
    Set::ExternalIp,
    Set::ExternalIpLocal,
    Set::Lb,
    Set::LbFw,
    Set::LbLocal,
    Set::LbSourceIp,
    Set::LbSourceCidr,
    Set::NodePort,
    Set::NodePortLocal,
    Set::HealthCheck,
    Set::IpvsIps,
    Set::NoEndpoints,
    Set::NoLocalEndpoints,
];

impl Set {
    /// (name without prefix, kind, kube-proxy's comment or ours)
    fn spec(self) -> (&'static str, SetKind, &'static str) {
        use SetKind::*;
        match self {
            Set::ClusterIp => ("CLUSTER-IP", HashIpPort, "Kubernetes service cluster ip + port for masquerade purpose"),
            Set::LoopBack => {
                ("LOOP-BACK", HashIpPortIp, "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose")
            }
            Set::ExternalIp => {
                ("EXTERNAL-IP", HashIpPort, "Kubernetes service external ip + port for masquerade and filter purpose")
            }
            Set::ExternalIpLocal => (
                "EXTERNAL-IP-LOCAL",
                HashIpPort,
                "Kubernetes service external ip + port with externalTrafficPolicy=local",
            ),
            Set::Lb => ("LB", HashIpPort, "Kubernetes service lb portal"),
            Set::LbFw => {
                ("LB-FW", HashIpPort, "Kubernetes service load balancer ip + port for load balancer with sourceRange")
            }
            Set::LbLocal => {
                ("LB-LOCAL", HashIpPort, "Kubernetes service load balancer ip + port with externalTrafficPolicy=local")
            }
            Set::LbSourceIp => (
                "LB-SOURCE-IP",
                HashIpPortIp,
                "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
            ),
            Set::LbSourceCidr => (
                "LB-SOURCE-CIDR",
                HashIpPortNet,
                "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
            ),
            Set::NodePort => (
                "NODE-PORT",
                HashIpPort,
                "Kubernetes nodeport address + port for masquerade purpose (nodePortAddresses)",
            ),
            Set::NodePortLocal => {
                ("NODE-PORT-LOCAL", HashIpPort, "Kubernetes nodeport address + port with externalTrafficPolicy=local")
            }
            Set::HealthCheck => ("HEALTH-CHECK", BitmapPort, "health check node port"),
            Set::IpvsIps => ("IPVS-IPS", HashIp, "IPVS service ips"),
            Set::NoEndpoints => {
                ("NO-ENDPOINTS", HashIpPort, "switchyard: service destinations with no endpoints (reject)")
            }
            Set::NoLocalEndpoints => {
                ("NO-LOCAL-ENDPOINTS", HashIpPort, "switchyard: Local traffic policy with no local endpoint (drop)")
            }
        }
    }

    fn name(self, family: IpFamily) -> String {
        set_name(self.spec().0, family)
    }
}

/// `SWITCHYARD-CLUSTER-IP`, `SWITCHYARD-6-CLUSTER-IP`.
fn set_name(base: &str, family: IpFamily) -> String {
    match family {
        IpFamily::V4 => format!("{PREFIX}{base}"),
        IpFamily::V6 => format!("{PREFIX}6-{base}"),
    }
}

/// A node's IPVS program as data: what [`render`] writes and [`render_incremental`] compares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Model {
    pub services: BTreeMap<VsKey, VirtualServer>,
    /// By name.
    pub sets: BTreeMap<String, IpSet>,
    /// (family, table, chain) → the chain's rules, `-A ...` lines.
    pub chains: BTreeMap<(IpFamily, &'static str, String), String>,
    pub families: Vec<IpFamily>,
    /// Bound to [`DUMMY_INTERFACE`].
    pub addresses: BTreeSet<IpAddr>,
}

fn element(ip: IpAddr, p: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", p.as_str())
}

/// The firewall mark of a short-circuit virtual server: a flag bit above the usual mark bits
/// and a per-service-port index, kept clear of the masquerade bit.
fn fwmark(index: u32, masq: u32) -> u32 {
    let (flag, shift) = if masq < 0x1_0000 { (0x1_0000, 17) } else { (0x1, 1) };
    flag | (index << shift)
}

fn fwmark_flag(masq: u32) -> u32 {
    fwmark(0, masq)
}

/// The endpoints a service port's virtual servers get: (selected, weight 1) then draining.
fn reals(selected: &[crate::policy::PlannedEndpoint], p: &ServicePortPlan) -> Vec<RealServer> {
    let mut v: Vec<RealServer> =
        selected.iter().map(|e| RealServer { addr: SocketAddr { ip: e.ip, port: e.port }, weight: 1 }).collect();
    for e in &p.draining_endpoints {
        let addr = SocketAddr { ip: e.ip, port: e.port };
        if !v.iter().any(|r| r.addr == addr) {
            v.push(RealServer { addr, weight: 0 });
        }
    }
    v.sort();
    v
}

/// Which addresses take NodePorts: nodePortAddresses, else every node address, and 127.0.0.1
/// when the plan has localhost NodePorts (kube-proxy's IPVS mode binds them with route_localnet).
fn node_port_ips(fam: &FamilyPlan) -> Vec<IpAddr> {
    let mut v = match &fam.node_port_addresses {
        NodePortAddresses::All => fam.node_ips.clone(),
        NodePortAddresses::Only(ips) => ips.clone(),
    };
    if fam.localhost_node_ports && matches!(fam.node_port_addresses, NodePortAddresses::All) {
        v.push(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
    if !fam.localhost_node_ports {
        v.retain(|ip| !ip.is_loopback());
    }
    v.sort();
    v.dedup();
    v
}

/// A rule line builder: `-A CHAIN` then parts.
fn rule(out: &mut String, chain: &str, parts: std::fmt::Arguments) {
    let _ = writeln!(out, "-A {chain} {parts}");
}

fn host(ip: IpAddr) -> String {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    format!("{ip}/{len}")
}

fn quote(s: &str) -> String {
    let cleaned: String = s.chars().filter(|c| !matches!(c, '"' | '\\' | '\n' | '\r')).take(250).collect();
    format!("\"{cleaned}\"")
}

/// Builds the model of `plan`.
pub fn model(plan: &NodePlan) -> Model {
    let mut m = Model::default();
    for fam in &plan.families {
        family_model(fam, &mut m);
    }
    m
}

fn family_model(fam: &FamilyPlan, m: &mut Model) {
    let family = fam.family;
    m.families.push(family);
    let mut sets: BTreeMap<Set, BTreeSet<String>> = SETS.iter().map(|s| (*s, BTreeSet::new())).collect();
    let mut add = |s: Set, e: String| {
        if let Some(v) = sets.get_mut(&s) {
            v.insert(e);
        }
    };
    let masq = fam.masquerade_mark;
    let np_ips = node_port_ips(fam);
    let mut short_rules = String::new();
    let mut short_index = 0u32;
    let pods: Vec<ipnet::IpNet> = match &fam.local_detector {
        LocalDetector::Cidrs(c) => c.clone(),
        LocalDetector::None => Vec::new(),
    };

    for p in &fam.services {
        let proto = p.protocol;
        let sched = fam.ipvs_scheduler.clone();
        let mut vs = |key: VsKey, reals: Vec<RealServer>, comment: String| {
            m.services.insert(
                key,
                VirtualServer {
                    key,
                    scheduler: sched.clone(),
                    persistence: p.affinity_timeout,
                    reals,
                    comment: Some(comment),
                },
            );
        };
        let internal = reals(if p.internal_policy_local { &p.local_endpoints } else { &p.cluster_endpoints }, p);
        let external = reals(if p.external_policy_local { &p.local_endpoints } else { &p.cluster_endpoints }, p);
        let name = &p.name;

        // Cluster IP.
        vs(
            VsKey::Addr { protocol: proto, addr: SocketAddr { ip: p.cluster_ip, port: p.port } },
            internal,
            format!("{name} cluster IP"),
        );
        add(Set::ClusterIp, element(p.cluster_ip, proto, p.port));
        m.addresses.insert(p.cluster_ip);
        match p.internal_filter() {
            Some(FilterVerdict::Reject) => add(Set::NoEndpoints, element(p.cluster_ip, proto, p.port)),
            Some(FilterVerdict::Drop) => add(Set::NoLocalEndpoints, element(p.cluster_ip, proto, p.port)),
            None => {}
        }
        for e in p.reachable_endpoints() {
            add(Set::LoopBack, format!("{},{}:{},{}", e.ip, proto.as_str(), e.port, e.ip));
        }

        // External destinations: external IPs, LB IPs, NodePort addresses.
        let mut external_dsts: Vec<(IpAddr, u16)> = Vec::new();
        for ip in &p.external_ips {
            vs(
                VsKey::Addr { protocol: proto, addr: SocketAddr { ip: *ip, port: p.port } },
                external.clone(),
                format!("{name} external IP"),
            );
            add(
                if p.external_policy_local { Set::ExternalIpLocal } else { Set::ExternalIp },
                element(*ip, proto, p.port),
            );
            external_dsts.push((*ip, p.port));
        }
        for ip in &p.load_balancer_ips {
            vs(
                VsKey::Addr { protocol: proto, addr: SocketAddr { ip: *ip, port: p.port } },
                external.clone(),
                format!("{name} load balancer IP"),
            );
            let e = element(*ip, proto, p.port);
            add(Set::Lb, e.clone());
            if p.external_policy_local {
                add(Set::LbLocal, e.clone());
            }
            if !p.source_ranges.is_empty() {
                add(Set::LbFw, e.clone());
                for r in &p.source_ranges {
                    add(Set::LbSourceCidr, format!("{e},{}", r.trunc()));
                }
                if p.source_range_lb_self {
                    // Node traffic to a load-balancer IP it holds may carry any of them as source.
                    for src in &p.load_balancer_ips {
                        add(Set::LbSourceIp, format!("{e},{src}"));
                    }
                }
            }
            external_dsts.push((*ip, p.port));
        }
        if let Some(np) = p.node_port {
            for ip in &np_ips {
                vs(
                    VsKey::Addr { protocol: proto, addr: SocketAddr { ip: *ip, port: np } },
                    external.clone(),
                    format!("{name} node port"),
                );
                add(Set::NodePort, element(*ip, proto, np));
                if p.external_policy_local {
                    add(Set::NodePortLocal, element(*ip, proto, np));
                }
                external_dsts.push((*ip, np));
            }
        }
        if let Some(hc) = p.health_check_node_port {
            add(Set::HealthCheck, hc.to_string());
        }
        for ip in p.external_ips.iter().chain(&p.load_balancer_ips) {
            // kube-proxy binds an address only if no other interface has it.
            if !fam.node_ips.contains(ip) {
                m.addresses.insert(*ip);
            }
        }
        match p.external_filter() {
            Some(FilterVerdict::Reject) if p.externally_accessible => {
                for (ip, port) in &external_dsts {
                    add(Set::NoEndpoints, element(*ip, proto, *port));
                }
            }
            Some(FilterVerdict::Drop) if p.externally_accessible => {
                for (ip, port) in &external_dsts {
                    add(Set::NoLocalEndpoints, element(*ip, proto, *port));
                }
            }
            _ => {}
        }

        // externalTrafficPolicy Local: pod and node traffic to external destinations reaches
        // every endpoint (the iptables and nftables modes' short-circuits), through
        // firewall-mark virtual servers.
        if p.external_policy_local && p.has_endpoints && !p.cluster_endpoints.is_empty() && !external_dsts.is_empty() {
            short_index += 1;
            // The node's own traffic also carries the masquerade bit, which postrouting clears
            // on its way through loopback, before IPVS sees it: one mark serves both.
            let pod_mark = fwmark(short_index, masq);
            let node_mark = pod_mark | masq;
            vs(
                VsKey::Fwmark { family, mark: pod_mark },
                reals(&p.cluster_endpoints, p),
                format!("{name} externalTrafficPolicy Local: pod and node traffic to external destinations"),
            );
            for (ip, port) in &external_dsts {
                for cidr in &pods {
                    rule(
                        &mut short_rules,
                        NAT_SERVICES,
                        format_args!(
                            "-s {} -d {} -p {proto} -m comment --comment {} -m {proto} --dport {port} -j MARK --set-xmark {pod_mark:#x}/0xffffffff",
                            cidr.trunc(),
                            host(*ip),
                            quote(&format!("{name} externalTrafficPolicy Local: short-circuit pod traffic")),
                        ),
                    );
                }
                rule(
                    &mut short_rules,
                    NAT_SERVICES,
                    format_args!(
                        "-d {} -p {proto} -m comment --comment {} -m {proto} --dport {port} -m addrtype --src-type LOCAL -j MARK --set-xmark {node_mark:#x}/0xffffffff",
                        host(*ip),
                        quote(&format!(
                            "{name} externalTrafficPolicy Local: masquerade and short-circuit the node's own traffic"
                        )),
                    ),
                );
            }
        }
    }
    for ip in &m.addresses {
        if IpFamily::of(ip) == family {
            add(Set::IpvsIps, ip.to_string());
        }
    }

    // The iptables part.
    let set = |s: Set| s.name(family);
    let mark = format!("{masq:#x}");
    let reject = if family == IpFamily::V6 {
        "REJECT --reject-with icmp6-port-unreachable"
    } else {
        "REJECT --reject-with icmp-port-unreachable"
    };
    let mut chain = |table: &'static str, name: &str, rules: String| {
        m.chains.insert((family, table, name.to_string()), rules);
    };

    let mut nat = short_rules;
    let cluster_ip = set(Set::ClusterIp);
    if fam.masquerade_all {
        rule(
            &mut nat,
            NAT_SERVICES,
            format_args!(
                "-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose (masqueradeAll)\" -m set --match-set {cluster_ip} dst,dst -j {MARK_MASQ}"
            ),
        );
    } else if let LocalDetector::Cidrs(c) = &fam.local_detector {
        if let [one] = c.as_slice() {
            rule(
                &mut nat,
                NAT_SERVICES,
                format_args!(
                    "! -s {} -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set {cluster_ip} dst,dst -j {MARK_MASQ}",
                    one.trunc()
                ),
            );
        } else {
            rule(
                &mut nat,
                NAT_SERVICES,
                format_args!(
                    "-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set {cluster_ip} dst,dst -j {MASQ_NOT_LOCAL}"
                ),
            );
            let mut not_local = String::new();
            for cidr in c {
                rule(
                    &mut not_local,
                    MASQ_NOT_LOCAL,
                    format_args!(
                        "-s {} -m comment --comment \"switchyard: traffic from local pods (detectLocalMode) is not masqueraded\" -j RETURN",
                        cidr.trunc()
                    ),
                );
            }
            rule(
                &mut not_local,
                MASQ_NOT_LOCAL,
                format_args!(
                    "-m comment --comment \"switchyard: masquerade traffic from outside the cluster\" -j {MARK_MASQ}"
                ),
            );
            chain("nat", MASQ_NOT_LOCAL, not_local);
        }
    }
    rule(
        &mut nat,
        NAT_SERVICES,
        format_args!(
            "-m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" -m set --match-set {} dst,dst -j {MARK_MASQ}",
            set(Set::ExternalIp)
        ),
    );
    rule(
        &mut nat,
        NAT_SERVICES,
        format_args!(
            "-m comment --comment \"Kubernetes service lb portal\" -m set --match-set {} dst,dst -j {LOAD_BALANCER}",
            set(Set::Lb)
        ),
    );
    rule(
        &mut nat,
        NAT_SERVICES,
        format_args!(
            "-m comment --comment \"Kubernetes nodeport address + port (nodePortAddresses)\" -m set --match-set {} dst,dst -j {NODE_PORT}",
            set(Set::NodePort)
        ),
    );
    chain("nat", NAT_SERVICES, nat);

    let mut lb = String::new();
    rule(
        &mut lb,
        LOAD_BALANCER,
        format_args!(
            "-m comment --comment \"externalTrafficPolicy Local: keep the client address\" -m set --match-set {} dst,dst -j RETURN",
            set(Set::LbLocal)
        ),
    );
    rule(
        &mut lb,
        LOAD_BALANCER,
        format_args!("-m comment --comment \"load balancer traffic is masqueraded\" -j {MARK_MASQ}"),
    );
    chain("nat", LOAD_BALANCER, lb);
    let mut np = String::new();
    rule(
        &mut np,
        NODE_PORT,
        format_args!(
            "-m comment --comment \"externalTrafficPolicy Local: keep the client address\" -m set --match-set {} dst,dst -j RETURN",
            set(Set::NodePortLocal)
        ),
    );
    rule(&mut np, NODE_PORT, format_args!("-m comment --comment \"NodePort traffic is masqueraded\" -j {MARK_MASQ}"));
    chain("nat", NODE_PORT, np);

    let mut post = String::new();
    rule(
        &mut post,
        NAT_POSTROUTING,
        format_args!(
            "-m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" -m set --match-set {} dst,dst,src -j MASQUERADE",
            set(Set::LoopBack)
        ),
    );
    rule(
        &mut post,
        NAT_POSTROUTING,
        format_args!(
            "-m comment --comment \"switchyard: not marked for masquerade\" -m mark ! --mark {mark}/{mark} -j RETURN"
        ),
    );
    rule(
        &mut post,
        NAT_POSTROUTING,
        format_args!("-m comment --comment \"switchyard: clear the masquerade mark\" -j MARK --xor-mark {mark}"),
    );
    rule(
        &mut post,
        NAT_POSTROUTING,
        format_args!("-m comment --comment \"switchyard service traffic requiring SNAT\" -j MASQUERADE --random-fully"),
    );
    chain("nat", NAT_POSTROUTING, post);
    let mut mm = String::new();
    rule(
        &mut mm,
        MARK_MASQ,
        format_args!(
            "-m comment --comment \"switchyard: mark for masquerade (masqueradeBit)\" -j MARK --or-mark {mark}"
        ),
    );
    chain("nat", MARK_MASQ, mm);

    // filter
    let mut hc = String::new();
    rule(
        &mut hc,
        NODE_PORT,
        format_args!(
            "-m comment --comment \"Kubernetes health check node port\" -m set --match-set {} dst -j ACCEPT",
            set(Set::HealthCheck)
        ),
    );
    chain("filter", NODE_PORT, hc);
    let mut fw = String::new();
    rule(
        &mut fw,
        PROXY_FIREWALL,
        format_args!(
            "-m comment --comment \"Kubernetes service load balancer ip + port for load balancer with sourceRange\" -m set --match-set {} dst,dst -j {SOURCE_RANGES}",
            set(Set::LbFw)
        ),
    );
    chain("filter", PROXY_FIREWALL, fw);
    let mut sr = String::new();
    rule(
        &mut sr,
        SOURCE_RANGES,
        format_args!(
            "-m comment --comment \"loadBalancerSourceRanges: allowed source range\" -m set --match-set {} dst,dst,src -j RETURN",
            set(Set::LbSourceCidr)
        ),
    );
    rule(
        &mut sr,
        SOURCE_RANGES,
        format_args!(
            "-m comment --comment \"loadBalancerSourceRanges: the node's own traffic to its load balancer IP\" -m set --match-set {} dst,dst,src -j RETURN",
            set(Set::LbSourceIp)
        ),
    );
    rule(
        &mut sr,
        SOURCE_RANGES,
        format_args!("-m comment --comment \"loadBalancerSourceRanges: source not allowed\" -j DROP"),
    );
    chain("filter", SOURCE_RANGES, sr);
    let mut fs = String::new();
    rule(
        &mut fs,
        FILTER_SERVICES,
        format_args!(
            "-m comment --comment \"service has no endpoints (kube-proxy's IPVS mode has no such rule: its virtual server with no real servers answers ICMP port unreachable itself)\" -m set --match-set {} dst,dst -j {reject}",
            set(Set::NoEndpoints)
        ),
    );
    let exempt = if short_index > 0 {
        let flag = fwmark_flag(masq);
        format!(" -m mark ! --mark {flag:#x}/{flag:#x}")
    } else {
        String::new()
    };
    rule(
        &mut fs,
        FILTER_SERVICES,
        format_args!(
            "-m comment --comment \"Local traffic policy: service has no local endpoints, dropped as by the other backends (kube-proxy's IPVS mode rejects: its virtual server has no real servers)\" -m set --match-set {} dst,dst{exempt} -j DROP",
            set(Set::NoLocalEndpoints)
        ),
    );
    chain("filter", FILTER_SERVICES, fs);
    let mut ipf = String::new();
    for s in [Set::Lb, Set::ClusterIp, Set::ExternalIp, Set::ExternalIpLocal] {
        rule(&mut ipf, IPVS_FILTER, format_args!("-m set --match-set {} dst,dst -j RETURN", set(s)));
    }
    rule(&mut ipf, IPVS_FILTER, format_args!("-m set --match-set {} dst -j RETURN", set(Set::HealthCheck)));
    rule(
        &mut ipf,
        IPVS_FILTER,
        format_args!(
            "-m comment --comment \"a port of a service address that no service has\" -m conntrack --ctstate NEW -m set --match-set {} dst -j {reject}",
            set(Set::IpvsIps)
        ),
    );
    chain("filter", IPVS_FILTER, ipf);
    let mut cc = String::new();
    for c in &fam.service_cidrs {
        rule(
            &mut cc,
            CLUSTER_IPS_CHECK,
            format_args!(
                "-d {} -m comment --comment {} -m set ! --match-set {} dst -j DROP",
                c.trunc(),
                quote(&format!("ServiceCIDR {}: unallocated address", c.trunc())),
                set(Set::IpvsIps)
            ),
        );
    }
    chain("filter", CLUSTER_IPS_CHECK, cc);
    let mut fwd = String::new();
    rule(
        &mut fwd,
        FORWARD,
        format_args!(
            "-m comment --comment \"switchyard: drop ctstate INVALID\" -m conntrack --ctstate INVALID -j DROP"
        ),
    );
    rule(
        &mut fwd,
        FORWARD,
        format_args!(
            "-m comment --comment \"switchyard forwarding rules: traffic marked for masquerade\" -m mark --mark {mark}/{mark} -j ACCEPT"
        ),
    );
    rule(
        &mut fwd,
        FORWARD,
        format_args!(
            "-m comment --comment \"switchyard forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ),
    );
    chain("filter", FORWARD, fwd);

    for s in SETS {
        let (_, kind, comment) = s.spec();
        let name = s.name(family);
        let members = sets.remove(&s).unwrap_or_default();
        m.sets.insert(name.clone(), IpSet { name, kind, family, comment, members });
    }
}

/// The jumps from the builtin chains, per table, as `-A BUILTIN ...` lines.
pub fn builtin_jumps() -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    for (chain, target, comment) in [
        ("PREROUTING", NAT_SERVICES, "switchyard service portals"),
        ("OUTPUT", NAT_SERVICES, "switchyard service portals"),
        ("POSTROUTING", NAT_POSTROUTING, "switchyard postrouting rules"),
    ] {
        v.push(("nat", format!("-A {chain} -m comment --comment \"{comment}\" -j {target}")));
    }
    for (chain, target, new_only) in [
        ("INPUT", PROXY_FIREWALL, true),
        ("INPUT", NODE_PORT, false),
        ("INPUT", FILTER_SERVICES, true),
        ("INPUT", IPVS_FILTER, false),
        ("FORWARD", FORWARD, false),
        ("FORWARD", CLUSTER_IPS_CHECK, true),
        ("OUTPUT", CLUSTER_IPS_CHECK, true),
    ] {
        let ct = if new_only { " -m conntrack --ctstate NEW" } else { "" };
        v.push(("filter", format!("-A {chain} -m comment --comment \"switchyard ipvs rules\"{ct} -j {target}")));
    }
    v
}

/// The parts of a program or transaction, in the order they must be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `ipvsadm -R` input.
    Ipvsadm,
    /// `ipset restore` input.
    Ipset,
    /// `iptables-restore --noflush` / `ip6tables-restore --noflush` input.
    Iptables(IpFamily),
    /// `ip -batch` input.
    Ip,
}

impl Section {
    fn of_marker(line: &str) -> Option<Section> {
        let t = line.trim();
        if t.starts_with("# Generated by ip6tables-save") {
            return Some(Section::Iptables(IpFamily::V6));
        }
        if t.starts_with("# Generated by iptables-save") {
            return Some(Section::Iptables(IpFamily::V4));
        }
        match t {
            SECTION_IPVSADM => Some(Section::Ipvsadm),
            SECTION_IPSET => Some(Section::Ipset),
            SECTION_IP => Some(Section::Ip),
            iptables::SECTION_V4 => Some(Section::Iptables(IpFamily::V4)),
            iptables::SECTION_V6 => Some(Section::Iptables(IpFamily::V6)),
            _ => None,
        }
    }

    pub fn marker(self) -> &'static str {
        match self {
            Section::Ipvsadm => SECTION_IPVSADM,
            Section::Ipset => SECTION_IPSET,
            Section::Ip => SECTION_IP,
            Section::Iptables(IpFamily::V4) => iptables::SECTION_V4,
            Section::Iptables(IpFamily::V6) => iptables::SECTION_V6,
        }
    }
}

/// Which tool a line without a section marker is for, by its form: what a node's `ipvsadm -Sn`,
/// `ipset save` and `iptables-save` print, concatenated.
fn section_of_line(line: &str) -> Option<Section> {
    let t = line.trim_start();
    if t.starts_with("create ") || t.starts_with("add ") {
        Some(Section::Ipset)
    } else if t.starts_with('*') {
        Some(Section::Iptables(IpFamily::V4))
    } else if t.starts_with("-A -") || t.starts_with("-a -") || t.starts_with("-A --") || t.starts_with("-a --") {
        Some(Section::Ipvsadm)
    } else {
        None
    }
}

/// Splits a program or transaction into its sections, in order, each with its text (marker line
/// included, 1-based line number of its first line). Sections start at their marker lines (and at
/// `iptables-save`'s `# Generated by` lines); without markers, a line's form says its tool, so a
/// node's `ipvsadm -Sn`, `ipset save` and `iptables-save` output, concatenated, reads too.
/// Sections with nothing but comments are left out.
pub fn sections(text: &str) -> Vec<(Section, usize, String)> {
    let mut out: Vec<(Section, usize, String)> = Vec::new();
    // Whether the current section was guessed from its lines rather than marked.
    let mut guessed = true;
    for (i, line) in text.lines().enumerate() {
        if let Some(s) = Section::of_marker(line) {
            out.push((s, i + 1, String::new()));
            // Our own markers mark every section; iptables-save's only its own.
            guessed = line.trim_start().starts_with("# Generated by");
        } else if guessed && let Some(s) = section_of_line(line) {
            let same = |cur: &Section| *cur == s || matches!((cur, s), (Section::Iptables(_), Section::Iptables(_)));
            if out.last().is_none_or(|(cur, _, _)| !same(cur)) {
                out.push((s, i + 1, String::new()));
            }
        } else if out.is_empty() {
            continue;
        }
        if let Some((_, _, s)) = out.last_mut() {
            s.push_str(line);
            s.push('\n');
        }
    }
    out.retain(|(_, _, s)| s.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')));
    out
}

/// A section's text without comment lines, as `ipvsadm -R` and `ipset restore` want it.
pub fn strip_comments(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for l in text.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()) {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// The complete program for `plan`.
pub fn render(plan: &NodePlan) -> String {
    write_full(&plan.node, &model(plan))
}

/// The transaction that turns the program of `old` into the program of `new` (empty when
/// nothing changed).
pub fn render_incremental(old: &NodePlan, new: &NodePlan) -> String {
    render_incremental_for(old, new, None)
}

/// [`render_incremental`] when the caller knows which services changed (the agent's sync loop
/// does): only their service ports are modelled and compared, so one endpoint change costs the
/// same at any cluster size. `changed` must name every service whose plan may differ. Falls back
/// to comparing whole programs when family-level settings differ or a changed service has
/// `externalTrafficPolicy: Local` (its firewall mark is numbered among all such services).
pub fn render_incremental_for(old: &NodePlan, new: &NodePlan, changed: Option<&BTreeSet<ObjectKey>>) -> String {
    if let Some(changed) = changed
        && let Some(t) = partial_diff(old, new, changed)
    {
        return t;
    }
    diff(&new.node, &model(old), &model(new), &|_, _| false, &|_| false)
}

/// A family plan with only some of its service ports. (Destructured so that a new field cannot
/// be forgotten here.)
fn subset(f: &FamilyPlan, keep: &dyn Fn(&ServicePortPlan) -> bool) -> FamilyPlan {
    let FamilyPlan {
        family,
        node_ips,
        local_detector,
        masquerade_all,
        masquerade_mark,
        node_port_addresses,
        localhost_node_ports,
        service_cidrs,
        services,
        ipvs_scheduler,
    } = f;
    FamilyPlan {
        family: *family,
        node_ips: node_ips.clone(),
        local_detector: local_detector.clone(),
        masquerade_all: *masquerade_all,
        masquerade_mark: *masquerade_mark,
        node_port_addresses: node_port_addresses.clone(),
        localhost_node_ports: *localhost_node_ports,
        service_cidrs: service_cidrs.clone(),
        services: services.iter().filter(|p| keep(p)).cloned().collect(),
        ipvs_scheduler: ipvs_scheduler.clone(),
    }
}

/// The transaction from the changed services' ports alone, or `None` when it cannot be told
/// from them.
fn partial_diff(old: &NodePlan, new: &NodePlan, changed: &BTreeSet<ObjectKey>) -> Option<String> {
    if old.families.len() != new.families.len() {
        return None;
    }
    let is_changed = |p: &ServicePortPlan| changed.contains(&p.name.service);
    let (mut mo, mut mn) = (Model::default(), Model::default());
    for (fo, fnew) in old.families.iter().zip(&new.families) {
        let (so, sn) = (subset(fo, &is_changed), subset(fnew, &is_changed));
        let empty = |f: &FamilyPlan| FamilyPlan { services: Vec::new(), ..f.clone() };
        if empty(&so) != empty(&sn) || so.services.iter().chain(&sn.services).any(|p| p.external_policy_local) {
            return None;
        }
        family_model(&so, &mut mo);
        family_model(&sn, &mut mn);
    }
    // An element the changed ports no longer give may still come from an unchanged port: an
    // endpoint behind two services (hairpin set), an address shared by two services.
    let unchanged = || new.families.iter().flat_map(|f| f.services.iter()).filter(|p| !is_changed(p));
    let address_used = |ip: IpAddr| {
        unchanged().any(|p| p.cluster_ip == ip || p.external_ips.contains(&ip) || p.load_balancer_ips.contains(&ip))
    };
    let element_used = |set: &str, e: &str| {
        if set.ends_with("-IPVS-IPS") {
            return e.parse().is_ok_and(address_used);
        }
        if !set.ends_with("-LOOP-BACK") {
            return false;
        }
        let mut parts = e.split(',');
        let ip = parts.next().and_then(|a| a.parse::<IpAddr>().ok());
        let proto_port = parts.next().and_then(|pp| pp.split_once(':'));
        let (Some(ip), Some((proto, port))) = (ip, proto_port) else {
            return false;
        };
        let Ok(port) = port.parse::<u16>() else { return false };
        unchanged().any(|p| {
            p.protocol.as_str() == proto
                && p.cluster_endpoints.iter().chain(&p.local_endpoints).any(|x| x.ip == ip && x.port == port)
        })
    };
    Some(diff(&new.node, &mo, &mn, &element_used, &address_used))
}

fn write_vs(v: &VirtualServer, out: &mut String) {
    if let Some(c) = &v.comment {
        let _ = writeln!(out, "# {c}");
    }
    out.push_str(&v.line("-A"));
    out.push('\n');
    for r in &v.reals {
        out.push_str(&v.real_line("-a", r));
        out.push('\n');
    }
}

fn write_set(s: &IpSet, flush: bool, out: &mut String) {
    let _ = writeln!(out, "# {}", s.comment);
    let _ = writeln!(out, "{}", s.create_line());
    if flush {
        // A full program states each set's whole content, whatever was there before.
        let _ = writeln!(out, "flush {}", s.name);
    }
    for e in &s.members {
        let _ = writeln!(out, "add {} {e}", s.name);
    }
}

fn iptables_header(family: IpFamily, node: &str, out: &mut String) {
    out.push_str(Section::Iptables(family).marker());
    out.push('\n');
    out.push_str(&super::header(node, "ipvs"));
    out.push_str(if family == IpFamily::V6 { ": ip6tables part\n" } else { ": iptables part\n" });
}

fn write_full_iptables(m: &Model, family: IpFamily, out: &mut String) {
    let jumps = builtin_jumps();
    for (table, builtins) in
        [("nat", &["PREROUTING", "OUTPUT", "POSTROUTING"][..]), ("filter", &["INPUT", "FORWARD", "OUTPUT"][..])]
    {
        let _ = writeln!(out, "*{table}");
        for b in builtins {
            let _ = writeln!(out, ":{b} - [0:0]");
        }
        let chains: Vec<(&String, &String)> =
            m.chains.iter().filter(|((f, t, _), _)| *f == family && *t == table).map(|((_, _, n), r)| (n, r)).collect();
        for (n, _) in &chains {
            let _ = writeln!(out, ":{n} - [0:0]");
        }
        for (t, j) in &jumps {
            if *t == table {
                out.push_str(j);
                out.push('\n');
            }
        }
        for (_, r) in &chains {
            out.push_str(r);
        }
        out.push_str("COMMIT\n");
    }
}

fn write_full(node: &str, m: &Model) -> String {
    let mut out = String::with_capacity(m.services.len() * 160 + 4096);
    out.push_str(&super::header(node, "ipvs"));
    out.push('\n');
    out.push_str(SECTION_IPVSADM);
    out.push('\n');
    for v in m.services.values() {
        write_vs(v, &mut out);
    }
    out.push_str(SECTION_IPSET);
    out.push('\n');
    for s in m.sets.values() {
        write_set(s, true, &mut out);
    }
    for f in &m.families {
        iptables_header(*f, node, &mut out);
        write_full_iptables(m, *f, &mut out);
    }
    out.push_str(SECTION_IP);
    out.push('\n');
    let _ = writeln!(out, "link add {DUMMY_INTERFACE} type dummy");
    let _ = writeln!(out, "addr flush dev {DUMMY_INTERFACE}");
    for ip in &m.addresses {
        let _ = writeln!(out, "addr add {} dev {DUMMY_INTERFACE}", host(*ip));
    }
    out
}

/// The transaction from `old` to `new`. A set member or address that `old` has and `new` lacks is
/// kept when `still_used` says another part of the program gives it (partial models).
fn diff(
    node: &str,
    old: &Model,
    new: &Model,
    still_used: &dyn Fn(&str, &str) -> bool,
    address_used: &dyn Fn(IpAddr) -> bool,
) -> String {
    let mut ipvs = String::new();
    for (k, o) in &old.services {
        if !new.services.contains_key(k) {
            let _ = writeln!(ipvs, "-D {}", o.key.spec());
        }
    }
    for (k, n) in &new.services {
        let Some(o) = old.services.get(k) else {
            write_vs(n, &mut ipvs);
            continue;
        };
        if o.scheduler != n.scheduler || o.persistence != n.persistence {
            ipvs.push_str(&n.line("-E"));
            ipvs.push('\n');
        }
        for r in &o.reals {
            if !n.reals.iter().any(|x| x.addr == r.addr) {
                let _ = writeln!(ipvs, "-d {} -r {}", n.key.spec(), r.addr);
            }
        }
        for r in &n.reals {
            match o.reals.iter().find(|x| x.addr == r.addr) {
                None => ipvs.push_str(&n.real_line("-a", r)),
                Some(x) if x.weight != r.weight => ipvs.push_str(&n.real_line("-e", r)),
                Some(_) => continue,
            }
            ipvs.push('\n');
        }
    }

    let mut sets = String::new();
    for (name, n) in &new.sets {
        match old.sets.get(name) {
            None => write_set(n, false, &mut sets),
            Some(o) => {
                for e in o.members.difference(&n.members).filter(|e| !still_used(name, e)) {
                    let _ = writeln!(sets, "del {name} {e}");
                }
                for e in n.members.difference(&o.members) {
                    let _ = writeln!(sets, "add {name} {e}");
                }
            }
        }
    }

    let mut ipt = String::new();
    for f in [IpFamily::V4, IpFamily::V6] {
        match (old.families.contains(&f), new.families.contains(&f)) {
            (false, true) => {
                iptables_header(f, node, &mut ipt);
                write_full_iptables(new, f, &mut ipt);
            }
            (true, false) => {
                iptables_header(f, node, &mut ipt);
                for table in ["nat", "filter"] {
                    let _ = writeln!(ipt, "*{table}");
                    let gone: Vec<&String> =
                        old.chains.keys().filter(|(x, t, _)| *x == f && *t == table).map(|(_, _, n)| n).collect();
                    for n in &gone {
                        let _ = writeln!(ipt, ":{n} - [0:0]");
                    }
                    for (t, j) in builtin_jumps() {
                        if t == table {
                            let _ = writeln!(ipt, "-D{}", j.trim_start_matches("-A"));
                        }
                    }
                    for n in &gone {
                        let _ = writeln!(ipt, "-X {n}");
                    }
                    ipt.push_str("COMMIT\n");
                }
            }
            (true, true) => {
                let mut part = String::new();
                for table in ["nat", "filter"] {
                    let mut declare = Vec::new();
                    let mut rules = String::new();
                    let mut remove = Vec::new();
                    for ((x, t, name), r) in &new.chains {
                        if *x != f || *t != table {
                            continue;
                        }
                        if old.chains.get(&(f, table, name.clone())) != Some(r) {
                            declare.push(name);
                            rules.push_str(r);
                        }
                    }
                    for (x, t, name) in old.chains.keys() {
                        if *x == f && *t == table && !new.chains.contains_key(&(f, table, name.clone())) {
                            declare.push(name);
                            remove.push(name);
                        }
                    }
                    if declare.is_empty() {
                        continue;
                    }
                    let _ = writeln!(part, "*{table}");
                    for n in &declare {
                        let _ = writeln!(part, ":{n} - [0:0]");
                    }
                    part.push_str(&rules);
                    for n in &remove {
                        let _ = writeln!(part, "-X {n}");
                    }
                    part.push_str("COMMIT\n");
                }
                if !part.is_empty() {
                    iptables_header(f, node, &mut ipt);
                    ipt.push_str(&part);
                }
            }
            (false, false) => {}
        }
    }

    let mut destroy = String::new();
    for name in old.sets.keys() {
        if !new.sets.contains_key(name) {
            let _ = writeln!(destroy, "destroy {name}");
        }
    }

    let mut ip = String::new();
    for a in old.addresses.difference(&new.addresses).filter(|a| !address_used(**a)) {
        let _ = writeln!(ip, "addr del {} dev {DUMMY_INTERFACE}", host(*a));
    }
    for a in new.addresses.difference(&old.addresses).filter(|a| !address_used(**a)) {
        let _ = writeln!(ip, "addr add {} dev {DUMMY_INTERFACE}", host(*a));
    }

    if ipvs.is_empty() && sets.is_empty() && ipt.is_empty() && destroy.is_empty() && ip.is_empty() {
        return String::new();
    }
    let mut out = format!("# Switchyard ipvs transaction for node {node}\n");
    // Sets before the rules that match them; addresses before the virtual servers that use them.
    if !ip.is_empty() {
        let _ = write!(out, "{SECTION_IP}\n{ip}");
    }
    if !sets.is_empty() {
        let _ = write!(out, "{SECTION_IPSET}\n{sets}");
    }
    out.push_str(&ipt);
    if !ipvs.is_empty() {
        let _ = write!(out, "{SECTION_IPVSADM}\n{ipvs}");
    }
    if !destroy.is_empty() {
        // After the iptables part, which stopped matching them.
        let _ = write!(out, "{SECTION_IPSET}\n{destroy}");
    }
    out
}

/// What `ipvsadm -Ln` prints for these virtual servers (no connections: counters are 0).
pub fn list(services: &BTreeMap<VsKey, VirtualServer>) -> String {
    let mut out = String::from(
        "IP Virtual Server version 1.2.1 (size=4096)\nProt LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n",
    );
    for v in services.values() {
        let _ = write!(out, "{} {}", v.key.display(), v.scheduler);
        if let Some(p) = v.persistence {
            let _ = write!(out, " persistent {p}");
        }
        out.push('\n');
        for r in &v.reals {
            let _ = writeln!(out, "  -> {:<28} {:<7} {:<6} {:<10} {:<10}", r.addr.to_string(), "Masq", r.weight, 0, 0);
        }
    }
    out
}
