//! The nftables program: a data-driven layout.
//!
//! kube-proxy's nftables mode writes a chain per service and per endpoint; the kernel's cost grows
//! with chains, not map elements (139 s to load 110,000 chains here, 0.8 s for the same cluster as
//! elements). So this layout has a small fixed set of chains, and every service, endpoint and
//! policy is a set or map element:
//!
//! - `service-ips` (address . proto . port) and `service-nodeports` (proto . port) dispatch a new
//!   connection to a *class* chain that applies the masquerade rules of its traffic kind:
//!   `internal` (cluster IPs), `external` / `external-local` (external and LB IPs, by
//!   externalTrafficPolicy), `nodeport` / `nodeport-local`;
//! - the class chain looks the frontend up again in `lb-*` maps, which send it to a load-balancing
//!   chain shared by every service with the same endpoint count N (`lb-ip-N`, ...), whose one rule
//!   per protocol DNATs through `numgen random mod N` into an `endpoints-*` map keyed by
//!   frontend . slot;
//! - the filter stage rejects or drops what must not be served (`no-endpoint-*` verdict maps,
//!   `cluster-ips`, `service-cidrs`) and enforces `loadBalancerSourceRanges` with an interval set;
//! - masquerading uses kube-proxy's mark bit, plus a `hairpin` set of endpoint . endpoint pairs.
//!
//! An endpoint change is then a few element updates. Element comments name the Service and the
//! field each element comes from.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::fasthash::FastHash;
use crate::model::{IpFamily, ObjectKey, Protocol};
use crate::policy::*;
use crate::textfmt::{FastIp, FastNum};

/// Our table's name, in both families. We never touch any other table.
pub const TABLE: &str = "switchyard";

/// A set or a map, with its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub map: bool,
    /// The `type ...` or `typeof ...` line, as written.
    pub key_type: String,
    pub flags: Vec<String>,
    /// `size N`: nft adds 65535 to a map that rules `update`, so we declare it to match.
    pub size: Option<u32>,
    pub comment: Option<String>,
    /// Key text → element.
    pub elements: BTreeMap<String, Element>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub value: Option<String>,
    pub comment: Option<String>,
}

/// A chain and its rules (each rule as one line of nft syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// `type filter hook input priority -110` for base chains.
    pub base: Option<BaseChain>,
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: String,
    pub hook: String,
    pub priority: i32,
}

/// One nftables table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `ip`, `ip6` or `inet`.
    pub family: String,
    pub name: String,
    pub comment: Option<String>,
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
}

/// Tables by (family, name).
pub type Ruleset = BTreeMap<(String, String), Table>;

struct Names {
    fam: &'static str,
    addr: &'static str,
    loopback: &'static str,
}

fn names(f: IpFamily) -> Names {
    match f {
        IpFamily::V4 => Names { fam: "ip", addr: "ipv4_addr", loopback: "127.0.0.0/8" },
        IpFamily::V6 => Names { fam: "ip6", addr: "ipv6_addr", loopback: "::1" },
    }
}

/// The mark bit as nft prints it.
fn mark_hex(m: u32) -> String {
    format!("0x{m:08x}")
}

/// The sets and maps every program declares, with their types.
fn declare_sets(fam: &FamilyPlan) -> BTreeMap<String, Set> {
    let n = names(fam.family);
    let (f, a) = (n.fam, n.addr);
    let mut sets = BTreeMap::new();
    let mut add = |name: &str, map: bool, key_type: String, flags: &[&str], comment: &str| {
        sets.insert(
            name.to_string(),
            Set {
                name: name.to_string(),
                map,
                key_type,
                flags: flags.iter().map(|s| s.to_string()).collect(),
                size: flags.contains(&"dynamic").then_some(65535),
                comment: Some(comment.to_string()),
                elements: BTreeMap::new(),
            },
        );
    };
    add("cluster-ips", false, format!("type {a}"), &[], "active cluster IPs");
    add("service-cidrs", false, format!("type {a}"), &["interval"], "ServiceCIDRs: unallocated addresses are dropped");
    add(
        "local-pod-cidrs",
        false,
        format!("type {a}"),
        &["interval"],
        "sources treated as local pods (detectLocalMode)",
    );
    add("nodeport-ips", false, format!("type {a}"), &[], "addresses that accept NodePorts (nodePortAddresses)");
    add(
        "hairpin",
        false,
        format!("type {a} . {a}"),
        &[],
        "endpoint . endpoint: a pod reaching itself through a service",
    );
    add("health-check-ports", false, "type inet_service".into(), &[], "healthCheckNodePorts");
    let ipv = format!("{a} . inet_proto . inet_service : verdict");
    add("service-ips", true, format!("type {ipv}"), &[], "cluster, external and load-balancer IPs");
    add("service-nodeports", true, "type inet_proto . inet_service : verdict".into(), &[], "NodePorts");
    add("lb-ips", true, format!("type {ipv}"), &[], "frontend → load-balancing chain for its endpoint count");
    add("lb-local-ips", true, format!("type {ipv}"), &[], "frontend → load-balancing chain for its local endpoints");
    add(
        "lb-nodeports",
        true,
        "type inet_proto . inet_service : verdict".into(),
        &[],
        "NodePort → load-balancing chain",
    );
    add(
        "lb-local-nodeports",
        true,
        "type inet_proto . inet_service : verdict".into(),
        &[],
        "NodePort → local load-balancing chain",
    );
    let ep_ip = format!("typeof {f} daddr . meta l4proto . th dport . numgen random mod 1 : {f} daddr . tcp dport");
    let ep_np = format!("typeof meta l4proto . th dport . numgen random mod 1 : {f} daddr . tcp dport");
    add("endpoints-ips", true, ep_ip.clone(), &[], "frontend . slot → endpoint");
    add("endpoints-local-ips", true, ep_ip, &[], "frontend . slot → local endpoint");
    add("endpoints-nodeports", true, ep_np.clone(), &[], "NodePort . slot → endpoint");
    add("endpoints-local-nodeports", true, ep_np, &[], "NodePort . slot → local endpoint");
    add(
        "affinity",
        true,
        format!("typeof {f} saddr . {f} daddr . meta l4proto . th dport : {f} daddr . tcp dport"),
        &["dynamic", "timeout"],
        "sessionAffinity ClientIP: client . frontend → endpoint",
    );
    add(
        "affinity-services",
        true,
        format!("type {a} . inet_proto . inet_service : verdict"),
        &[],
        "frontends with ClientIP affinity → the chain that records it",
    );
    add(
        "firewall-protected",
        false,
        format!("type {a} . inet_proto . inet_service"),
        &[],
        "frontends with loadBalancerSourceRanges",
    );
    add(
        "firewall-allowed",
        false,
        format!("typeof {f} daddr . meta l4proto . th dport . {f} saddr"),
        &["interval"],
        "loadBalancerSourceRanges: allowed sources per frontend",
    );
    add("no-endpoint-services", true, format!("type {ipv}"), &[], "services that cannot be served: reject or drop");
    add(
        "no-endpoint-nodeports",
        true,
        "type inet_proto . inet_service : verdict".into(),
        &[],
        "NodePorts that cannot be served",
    );
    sets
}

fn chain(name: &str, rules: Vec<String>) -> Chain {
    Chain { name: name.to_string(), base: None, rules }
}

fn base(name: &str, kind: &str, hook: &str, priority: i32, rules: Vec<String>) -> Chain {
    Chain { name: name.to_string(), base: Some(BaseChain { kind: kind.into(), hook: hook.into(), priority }), rules }
}

/// The fixed chains, which depend only on family-level settings.
fn fixed_chains(fam: &FamilyPlan) -> BTreeMap<String, Chain> {
    let n = names(fam.family);
    let f = n.fam;
    let mark = mark_hex(fam.masquerade_mark);
    let key_ip = format!("{f} daddr . meta l4proto . th dport");
    let nodeport_match = match fam.node_port_addresses {
        NodePortAddresses::All => format!("fib daddr type local {f} daddr != {}", n.loopback),
        NodePortAddresses::Only(_) => format!("{f} daddr @nodeport-ips"),
    };
    let detector = !matches!(fam.local_detector, LocalDetector::None);
    let mut internal = Vec::new();
    if fam.masquerade_all {
        internal.push("jump mark-for-masquerade comment \"masqueradeAll\"".to_string());
    } else if detector {
        internal
            .push(format!("{f} saddr != @local-pod-cidrs jump mark-for-masquerade comment \"not from a local pod\""));
    }
    internal.push(format!("{key_ip} vmap @lb-ips"));

    let external_local = |lookup: &str, lb: &str, lb_local: &str| {
        let mut r = Vec::new();
        if detector {
            r.push(format!("{f} saddr @local-pod-cidrs {lookup} vmap @{lb} comment \"short-circuit pod traffic\""));
        }
        r.push("fib saddr type local jump mark-for-masquerade comment \"masquerade node traffic\"".to_string());
        r.push(format!("fib saddr type local {lookup} vmap @{lb} comment \"short-circuit node traffic\""));
        r.push(format!("{lookup} vmap @{lb_local}"));
        r
    };
    let np_key = "meta l4proto . th dport";
    let mut chains = BTreeMap::new();
    let mut put = |c: Chain| {
        chains.insert(c.name.clone(), c);
    };
    put(base("nat-prerouting", "nat", "prerouting", -100, vec!["jump services".into()]));
    put(base("nat-output", "nat", "output", -100, vec!["jump services".into()]));
    put(base("nat-postrouting", "nat", "postrouting", 100, vec!["jump masquerading".into()]));
    put(base("filter-prerouting", "filter", "prerouting", -110, vec!["ct state new jump firewall-check".into()]));
    put(base("filter-output", "filter", "output", -110, vec!["ct state new jump firewall-check".into()]));
    put(base(
        "filter-input",
        "filter",
        "input",
        -110,
        vec![
            "ct state new jump nodeport-endpoints-check".into(),
            "ct state new jump service-endpoints-check".into(),
            "meta l4proto tcp th dport @health-check-ports accept comment \"healthCheckNodePort\"".into(),
        ],
    ));
    let post_dnat = vec![
        "ct state new jump service-endpoints-check".to_string(),
        "ct state new jump cluster-ips-check".to_string(),
    ];
    put(base("filter-forward", "filter", "forward", -110, post_dnat.clone()));
    // After DNAT (-90), so the node's own traffic is judged like a pod's: a translated packet no
    // longer matches, and the ETP=Local short-circuit for node traffic still works.
    put(base("filter-output-post-dnat", "filter", "output", -90, post_dnat));
    put(chain(
        "services",
        vec![format!("{key_ip} vmap @service-ips"), format!("{nodeport_match} {np_key} vmap @service-nodeports")],
    ));
    put(chain("internal", internal));
    put(chain(
        "external",
        vec![
            "jump mark-for-masquerade comment \"externalTrafficPolicy=Cluster\"".into(),
            format!("{key_ip} vmap @lb-ips"),
        ],
    ));
    put(chain("external-local", external_local(&key_ip, "lb-ips", "lb-local-ips")));
    put(chain(
        "nodeport",
        vec![
            "jump mark-for-masquerade comment \"externalTrafficPolicy=Cluster\"".into(),
            format!("{np_key} vmap @lb-nodeports"),
        ],
    ));
    put(chain("nodeport-local", external_local(np_key, "lb-nodeports", "lb-local-nodeports")));
    put(chain("mark-for-masquerade", vec![format!("meta mark set meta mark | {mark}")]));
    let mut masq =
        vec![format!("ct status dnat {f} saddr . {f} daddr @hairpin jump mark-for-masquerade comment \"hairpin\"")];
    for p in Protocol::ALL {
        masq.push(format!(
            "meta l4proto {p} ct original {f} daddr . meta l4proto . ct original proto-dst vmap @affinity-services"
        ));
    }
    masq.push(format!("meta mark & {mark} == 0x00000000 return"));
    masq.push(format!("meta mark set meta mark ^ {mark}"));
    masq.push("masquerade fully-random".into());
    put(chain("masquerading", masq));
    put(chain(
        "firewall-check",
        vec![format!(
            "{key_ip} @firewall-protected {key_ip} . {f} saddr != @firewall-allowed drop comment \"loadBalancerSourceRanges\""
        )],
    ));
    put(chain("service-endpoints-check", vec![format!("{key_ip} vmap @no-endpoint-services")]));
    put(chain("nodeport-endpoints-check", vec![format!("{nodeport_match} {np_key} vmap @no-endpoint-nodeports")]));
    put(chain(
        "cluster-ips-check",
        vec![
            format!("{f} daddr @cluster-ips reject comment \"unknown port of a cluster IP\""),
            format!("{f} daddr @service-cidrs drop comment \"unallocated address of a ServiceCIDR\""),
        ],
    ));
    put(chain("reject-chain", vec!["reject".into()]));
    chains
}

/// The kind of load-balancing chain: which endpoint map it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LbKind {
    Ip,
    LocalIp,
    NodePort,
    LocalNodePort,
}

impl LbKind {
    fn chain(self, n: usize) -> String {
        match self {
            LbKind::Ip => format!("lb-ip-{n}"),
            LbKind::LocalIp => format!("lb-local-ip-{n}"),
            LbKind::NodePort => format!("lb-nodeport-{n}"),
            LbKind::LocalNodePort => format!("lb-local-nodeport-{n}"),
        }
    }
    fn endpoints_map(self) -> &'static str {
        match self {
            LbKind::Ip => "endpoints-ips",
            LbKind::LocalIp => "endpoints-local-ips",
            LbKind::NodePort => "endpoints-nodeports",
            LbKind::LocalNodePort => "endpoints-local-nodeports",
        }
    }
    fn dispatch_map(self) -> &'static str {
        match self {
            LbKind::Ip => "lb-ips",
            LbKind::LocalIp => "lb-local-ips",
            LbKind::NodePort => "lb-nodeports",
            LbKind::LocalNodePort => "lb-local-nodeports",
        }
    }
    fn nodeport(self) -> bool {
        matches!(self, LbKind::NodePort | LbKind::LocalNodePort)
    }
}

fn lb_chain(fam: IpFamily, kind: LbKind, n: usize, affinity: bool) -> Chain {
    let f = names(fam).fam;
    let key = if kind.nodeport() {
        "meta l4proto . th dport".to_string()
    } else {
        format!("{f} daddr . meta l4proto . th dport")
    };
    let mut rules = Vec::new();
    for p in Protocol::ALL {
        if affinity {
            rules.push(format!(
                "meta l4proto {p} dnat {f} to {f} saddr . {f} daddr . meta l4proto . th dport map @affinity comment \"sessionAffinity ClientIP\""
            ));
        }
        rules.push(format!("meta l4proto {p} dnat {f} to {key} . numgen random mod {n} map @{}", kind.endpoints_map()));
    }
    chain(&kind.chain(n), rules)
}

/// Receives what a service port contributes to the sets and maps. `format_args!` keeps the
/// work lazy: a sink that only counts chains formats nothing.
trait Sink {
    fn put(
        &mut self,
        set: &'static str,
        key: fmt::Arguments,
        value: Option<fmt::Arguments>,
        comment: Option<fmt::Arguments>,
    );
    /// An element several services may share (a cluster IP, a hairpin pair): written once.
    fn shared(&mut self, set: &'static str, ip: IpAddr, comment: Option<fmt::Arguments>);
    /// A load-balancing chain this service needs.
    fn lb(&mut self, kind: LbKind, n: usize);
    /// Whether this sink wants elements at all (one that only collects chains does not).
    fn elements(&self) -> bool {
        true
    }
    /// Claims a frontend for the service being written. Two services that claim one frontend (a
    /// misconfiguration the API server does not always prevent) must not put two elements with
    /// one key in a transaction: nft rejects the whole transaction. The first claimant wins.
    fn claim(&mut self, frontend: FrontendId) -> bool;
}

/// What a service listens on: an address, protocol and port, or a NodePort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendId {
    Ip(IpAddr, Protocol, u16),
    NodePort(Protocol, u16),
    HealthCheck(u16),
}

/// Every frontend of a service port, as [`contributions`] claims them.
fn frontends_of(s: &ServicePortPlan) -> impl Iterator<Item = FrontendId> + '_ {
    let (p, port) = (s.protocol, s.port);
    std::iter::once(FrontendId::Ip(s.cluster_ip, p, port))
        .chain(s.external_ips.iter().chain(&s.load_balancer_ips).map(move |ip| FrontendId::Ip(*ip, p, port)))
        .chain(s.node_port.map(|np| FrontendId::NodePort(p, np)))
        .chain(s.health_check_node_port.map(FrontendId::HealthCheck))
}

fn verdict_text(v: FilterVerdict) -> &'static str {
    match v {
        FilterVerdict::Reject => "goto reject-chain",
        FilterVerdict::Drop => "drop",
    }
}

/// Everything one service port contributes. In a large cluster (over 1,000 endpoints, as
/// kube-proxy's `largeClusterMode`) per-endpoint elements carry no comment: they would double
/// the program's size and the kernel's memory for no routing value.
fn contributions(s: &ServicePortPlan, large: bool, sink: &mut dyn Sink) {
    let p = s.protocol.as_str();
    let name = &s.name;
    let port = s.port;
    // The chain for a count is needed whether or not this service won its frontend, so the
    // chains depend only on the plan (see `lb_needs`).
    let lb =
        |sink: &mut dyn Sink, kind: LbKind, key: &dyn fmt::Display, eps: &[PlannedEndpoint], what: &str, emit: bool| {
            sink.lb(kind, eps.len());
            if !emit || !sink.elements() {
                return;
            }
            sink.put(
                kind.dispatch_map(),
                format_args!("{key}"),
                Some(format_args!("goto {}", LbChainName(kind, eps.len()))),
                Some(format_args!("{name} {what}")),
            );
            // The frontend is the prefix of every slot's key: format it once.
            let key = key.to_string();
            for (slot, e) in eps.iter().enumerate() {
                let target = e.target.as_deref().unwrap_or("");
                sink.put(
                    kind.endpoints_map(),
                    format_args!("{key} . {}", FastNum(slot as u32)),
                    Some(format_args!("{} . {}", FastIp(e.ip), FastNum(u32::from(e.port)))),
                    (!large).then_some(format_args!("{name} {target}")),
                );
            }
        };

    sink.shared("cluster-ips", s.cluster_ip, Some(format_args!("{name} clusterIP")));
    let cip = Frontend(s.cluster_ip, p, port);
    let own_cip = sink.claim(FrontendId::Ip(s.cluster_ip, s.protocol, port));
    match s.internal_endpoints() {
        Some(eps) if !own_cip => lb(sink, LbKind::Ip, &cip, eps, "clusterIP", false),
        None if !own_cip => {}
        Some(eps) => {
            sink.put(
                "service-ips",
                format_args!("{cip}"),
                Some(format_args!("goto internal")),
                Some(format_args!("{name} clusterIP")),
            );
            lb(sink, LbKind::Ip, &cip, eps, "clusterIP", true);
            if let Some(t) = s.affinity_timeout {
                sink.put(
                    "affinity-services",
                    format_args!("{cip}"),
                    Some(format_args!("jump affinity-{t}")),
                    Some(format_args!("{name} sessionAffinity")),
                );
            }
        }
        None => {
            let why = if s.has_endpoints { "internalTrafficPolicy=Local, no local endpoint" } else { "no endpoints" };
            if let Some(v) = s.internal_filter() {
                sink.put(
                    "no-endpoint-services",
                    format_args!("{cip}"),
                    Some(format_args!("{}", verdict_text(v))),
                    Some(format_args!("{name} clusterIP: {why}")),
                );
            }
        }
    }

    let ext_filter = s.external_filter();
    let why_ext = if s.has_endpoints { "externalTrafficPolicy=Local, no local endpoint" } else { "no endpoints" };
    let (class_ip, class_np) = if s.external_policy_local {
        ("goto external-local", "goto nodeport-local")
    } else {
        ("goto external", "goto nodeport")
    };
    let frontends = s
        .external_ips
        .iter()
        .map(|ip| (*ip, "externalIPs"))
        .chain(s.load_balancer_ips.iter().map(|ip| (*ip, "loadBalancer ingress")));
    for (ip, what) in frontends {
        let key = Frontend(ip, p, port);
        let own = sink.claim(FrontendId::Ip(ip, s.protocol, port));
        if !own {
            if s.captures_external() {
                lb(sink, LbKind::Ip, &key, &s.cluster_endpoints, what, false);
                if s.external_policy_local && !s.local_endpoints.is_empty() {
                    lb(sink, LbKind::LocalIp, &key, &s.local_endpoints, what, false);
                }
            }
            continue;
        }
        if s.captures_external() {
            sink.put(
                "service-ips",
                format_args!("{key}"),
                Some(format_args!("{class_ip}")),
                Some(format_args!("{name} {what}")),
            );
            lb(sink, LbKind::Ip, &key, &s.cluster_endpoints, what, true);
            if s.external_policy_local && !s.local_endpoints.is_empty() {
                lb(sink, LbKind::LocalIp, &key, &s.local_endpoints, what, true);
            }
            if let Some(t) = s.affinity_timeout {
                sink.put(
                    "affinity-services",
                    format_args!("{key}"),
                    Some(format_args!("jump affinity-{t}")),
                    Some(format_args!("{name} sessionAffinity")),
                );
            }
        }
        if let Some(v) = ext_filter {
            sink.put(
                "no-endpoint-services",
                format_args!("{key}"),
                Some(format_args!("{}", verdict_text(v))),
                Some(format_args!("{name} {what}: {why_ext}")),
            );
        }
        // loadBalancerSourceRanges guard the LB IPs only; NodePorts are not filtered.
        if !s.source_ranges.is_empty() && what == "loadBalancer ingress" {
            sink.put(
                "firewall-protected",
                format_args!("{key}"),
                None,
                Some(format_args!("{name} loadBalancerSourceRanges")),
            );
            for r in &s.source_ranges {
                sink.put(
                    "firewall-allowed",
                    format_args!("{key} . {}", Net(r)),
                    None,
                    Some(format_args!("{name} loadBalancerSourceRanges")),
                );
            }
            if s.source_range_lb_self {
                for lbip in &s.load_balancer_ips {
                    sink.put(
                        "firewall-allowed",
                        format_args!("{key} . {lbip}"),
                        None,
                        Some(format_args!("{name} loadBalancerSourceRanges: node IP in range")),
                    );
                }
            }
        }
    }
    if let Some(np) = s.node_port {
        let key = NodePortKey(p, np);
        let own = sink.claim(FrontendId::NodePort(s.protocol, np));
        if !own && s.captures_external() {
            lb(sink, LbKind::NodePort, &key, &s.cluster_endpoints, "nodePort", false);
            if s.external_policy_local && !s.local_endpoints.is_empty() {
                lb(sink, LbKind::LocalNodePort, &key, &s.local_endpoints, "nodePort", false);
            }
        }
        if own && s.captures_external() {
            sink.put(
                "service-nodeports",
                format_args!("{key}"),
                Some(format_args!("{class_np}")),
                Some(format_args!("{name} nodePort")),
            );
            lb(sink, LbKind::NodePort, &key, &s.cluster_endpoints, "nodePort", true);
            if s.external_policy_local && !s.local_endpoints.is_empty() {
                lb(sink, LbKind::LocalNodePort, &key, &s.local_endpoints, "nodePort", true);
            }
        }
        if let Some(v) = ext_filter.filter(|_| own) {
            sink.put(
                "no-endpoint-nodeports",
                format_args!("{key}"),
                Some(format_args!("{}", verdict_text(v))),
                Some(format_args!("{name} nodePort: {why_ext}")),
            );
        }
    }
    if let Some(hc) = s.health_check_node_port.filter(|hc| sink.claim(FrontendId::HealthCheck(*hc))) {
        sink.put("health-check-ports", format_args!("{hc}"), None, Some(format_args!("{name} healthCheckNodePort")));
    }
    for e in s.cluster_endpoints.iter().chain(&s.local_endpoints) {
        sink.shared("hairpin", e.ip, (!large).then_some(format_args!("hairpin")));
    }
}

struct Frontend(IpAddr, &'static str, u16);
impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {} . {}", FastIp(self.0), self.1, FastNum(u32::from(self.2)))
    }
}

struct NodePortKey(&'static str, u16);
impl fmt::Display for NodePortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {}", self.0, self.1)
    }
}
struct Net<'a>(&'a IpNet);
impl fmt::Display for Net<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}
struct LbChainName(LbKind, usize);
impl fmt::Display for LbChainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.chain(self.1))
    }
}

/// kube-proxy's `largeClusterMode` threshold: above it, per-endpoint comments are left out.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

fn is_large(fam: &FamilyPlan) -> bool {
    fam.services.iter().map(|s| s.cluster_endpoints.len() + s.local_endpoints.len()).sum::<usize>()
        > LARGE_CLUSTER_ENDPOINTS
}

fn shared_key(set: &str, ip: IpAddr) -> String {
    if set == "hairpin" { format!("{ip} . {ip}") } else { ip.to_string() }
}

/// Writes a comment as nft accepts it: printable, no quotes, at most 120 bytes (the kernel's
/// limit for element comments is 128). Names come from the cluster: never let them break syntax.
fn write_comment(out: &mut String, scratch: &mut String, args: fmt::Arguments) {
    out.push_str(" comment \"");
    let start = out.len();
    let _ = out.write_fmt(args);
    let written = &out[start..];
    let clean = written.len() <= 120 && !written.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f);
    if !clean {
        scratch.clear();
        scratch.push_str(written.trim());
        out.truncate(start);
        let mut n = 0;
        for c in scratch.chars() {
            let c = if c == '"' || c == '\\' || c.is_control() { '\'' } else { c };
            if n + c.len_utf8() > 120 {
                break;
            }
            n += c.len_utf8();
            out.push(c);
        }
    } else if written.ends_with(' ') {
        let t = out.trim_end().len();
        out.truncate(t.max(start));
    }
    out.push('"');
}

/// The full-render sink: elements straight into one text buffer per set.
struct TextSink {
    index: [usize; SET_NAMES.len()],
    bufs: Vec<String>,
    scratch: String,
    shared: HashSet<(usize, IpAddr), FastHash>,
    claims: HashSet<FrontendId, FastHash>,
    lbs: BTreeSet<(LbKind, usize)>,
}

impl TextSink {
    fn start(&mut self, set: &'static str) -> Option<&mut String> {
        let i = self.index[set_id(set)?];
        let b = &mut self.bufs[i];
        if !b.is_empty() {
            b.push_str(",\n\t\t\t     ");
        }
        Some(b)
    }
}

impl Sink for TextSink {
    fn claim(&mut self, frontend: FrontendId) -> bool {
        self.claims.insert(frontend)
    }
    fn put(
        &mut self,
        set: &'static str,
        key: fmt::Arguments,
        value: Option<fmt::Arguments>,
        comment: Option<fmt::Arguments>,
    ) {
        let mut scratch = std::mem::take(&mut self.scratch);
        if let Some(b) = self.start(set) {
            let _ = b.write_fmt(key);
            if let Some(c) = comment {
                write_comment(b, &mut scratch, c);
            }
            if let Some(v) = value {
                b.push_str(" : ");
                let _ = b.write_fmt(v);
            }
        }
        self.scratch = scratch;
    }
    fn shared(&mut self, set: &'static str, ip: IpAddr, comment: Option<fmt::Arguments>) {
        if self.shared.insert((set_id(set).unwrap_or(usize::MAX), ip)) {
            let mut scratch = std::mem::take(&mut self.scratch);
            if let Some(b) = self.start(set) {
                if set == "hairpin" {
                    let _ = write!(b, "{} . {}", FastIp(ip), FastIp(ip));
                } else {
                    let _ = write!(b, "{}", FastIp(ip));
                }
                if let Some(c) = comment {
                    write_comment(b, &mut scratch, c);
                }
            }
            self.scratch = scratch;
        }
    }
    fn lb(&mut self, kind: LbKind, n: usize) {
        self.lbs.insert((kind, n));
    }
}

/// An element's value and comment.
type ValueAndComment = (Option<String>, Option<String>);

/// The structured sink: elements as (set, key) → (value, comment), the first claimant winning
/// as nft's `add element` does.
#[derive(Default)]
struct MapSink {
    elements: BTreeMap<(&'static str, String), ValueAndComment>,
    lbs: BTreeSet<(LbKind, usize)>,
    claims: HashSet<FrontendId, FastHash>,
    scratch: String,
}

impl MapSink {
    fn comment(&mut self, args: Option<fmt::Arguments>) -> Option<String> {
        let mut out = String::new();
        write_comment(&mut out, &mut self.scratch, args?);
        // Strip the ` comment "` wrapper written for the text form.
        Some(out[10..out.len() - 1].to_string())
    }
}

impl Sink for MapSink {
    fn claim(&mut self, frontend: FrontendId) -> bool {
        self.claims.insert(frontend)
    }
    fn put(
        &mut self,
        set: &'static str,
        key: fmt::Arguments,
        value: Option<fmt::Arguments>,
        comment: Option<fmt::Arguments>,
    ) {
        let c = self.comment(comment);
        self.elements.entry((set, key.to_string())).or_insert((value.map(|v| v.to_string()), c));
    }
    fn shared(&mut self, set: &'static str, ip: IpAddr, comment: Option<fmt::Arguments>) {
        let c = self.comment(comment);
        self.elements.entry((set, shared_key(set, ip))).or_insert((None, c));
    }
    fn lb(&mut self, kind: LbKind, n: usize) {
        self.lbs.insert((kind, n));
    }
}

/// A sink that only records which load-balancing chains are needed (checks [`lb_needs`]).
#[cfg(test)]
#[derive(Default)]
struct ChainNeeds {
    lbs: BTreeSet<(LbKind, usize)>,
}

#[cfg(test)]
impl Sink for ChainNeeds {
    fn claim(&mut self, _: FrontendId) -> bool {
        true
    }
    fn put(&mut self, _: &'static str, _: fmt::Arguments, _: Option<fmt::Arguments>, _: Option<fmt::Arguments>) {}
    fn shared(&mut self, _: &'static str, _: IpAddr, _: Option<fmt::Arguments>) {}
    fn lb(&mut self, kind: LbKind, n: usize) {
        self.lbs.insert((kind, n));
    }
    fn elements(&self) -> bool {
        false
    }
}

/// The load-balancing chains a family needs: what [`contributions`] asks of a [`Sink`]'s
/// `lb`, computed without touching elements (the incremental path runs it on every service).
fn lb_needs(fam: &FamilyPlan) -> BTreeSet<(LbKind, usize)> {
    let mut v: Vec<(LbKind, usize)> = Vec::new();
    for s in &fam.services {
        lb_needs_of(s, &mut |k, n| {
            if !v.contains(&(k, n)) {
                v.push((k, n));
            }
        });
    }
    v.into_iter().collect()
}

/// The load-balancing chains one service port needs, given to `add`.
fn lb_needs_of(s: &ServicePortPlan, add: &mut dyn FnMut(LbKind, usize)) {
    if let Some(eps) = s.internal_endpoints() {
        add(LbKind::Ip, eps.len());
    }
    if !s.captures_external() {
        return;
    }
    let local = s.external_policy_local && !s.local_endpoints.is_empty();
    if !s.external_ips.is_empty() || !s.load_balancer_ips.is_empty() {
        add(LbKind::Ip, s.cluster_endpoints.len());
        if local {
            add(LbKind::LocalIp, s.local_endpoints.len());
        }
    }
    if s.node_port.is_some() {
        add(LbKind::NodePort, s.cluster_endpoints.len());
        if local {
            add(LbKind::LocalNodePort, s.local_endpoints.len());
        }
    }
}

/// Whether a service port needs load-balancing chain `(kind, n)`.
fn needs_lb(s: &ServicePortPlan, kind: LbKind, n: usize) -> bool {
    let mut found = false;
    lb_needs_of(s, &mut |k, m| found |= k == kind && m == n);
    found
}

/// Elements that come from family-level settings rather than services.
fn static_elements(fam: &FamilyPlan, sink: &mut dyn Sink) {
    for c in &fam.service_cidrs {
        sink.put("service-cidrs", format_args!("{}", Net(c)), None, Some(format_args!("ServiceCIDR")));
    }
    if let LocalDetector::Cidrs(cidrs) = &fam.local_detector {
        for c in cidrs {
            sink.put("local-pod-cidrs", format_args!("{}", Net(c)), None, Some(format_args!("detectLocalMode")));
        }
    }
    if let NodePortAddresses::Only(ips) = &fam.node_port_addresses {
        for ip in ips {
            sink.put("nodeport-ips", format_args!("{ip}"), None, Some(format_args!("nodePortAddresses")));
        }
    }
}

/// The chains that depend on the services: load-balancing chains per endpoint count in use,
/// and one affinity-recording chain per distinct timeout.
fn dynamic_chains(fam: &FamilyPlan, lbs: &BTreeSet<(LbKind, usize)>) -> BTreeMap<String, Chain> {
    let affinity = fam.services.iter().any(|s| s.affinity_timeout.is_some());
    let mut m: BTreeMap<String, Chain> =
        lbs.iter().map(|(k, n)| lb_chain(fam.family, *k, *n, affinity)).map(|c| (c.name.clone(), c)).collect();
    for t in fam.services.iter().filter_map(|s| s.affinity_timeout).collect::<BTreeSet<_>>() {
        let c = affinity_chain(fam.family, t);
        m.insert(c.name.clone(), c);
    }
    m
}

/// The whole table for one family, as a structure (for diffs and tests; `render` writes text
/// directly and must agree with this).
pub fn table(fam: &FamilyPlan, node: &str) -> Table {
    let mut sets = declare_sets(fam);
    let mut chains = fixed_chains(fam);
    let mut sink = MapSink::default();
    let large = is_large(fam);
    for s in &fam.services {
        contributions(s, large, &mut sink);
    }
    static_elements(fam, &mut sink);
    for ((set, key), (value, comment)) in sink.elements {
        if let Some(st) = sets.get_mut(set) {
            st.elements.insert(key, Element { value, comment });
        }
    }
    chains.extend(dynamic_chains(fam, &sink.lbs));
    Table {
        family: names(fam.family).fam.to_string(),
        name: TABLE.to_string(),
        comment: Some(format!("Switchyard service proxy for node {node}")),
        sets,
        chains,
    }
}

fn affinity_chain(fam: IpFamily, timeout: u32) -> Chain {
    let f = names(fam).fam;
    let rules = Protocol::ALL
        .iter()
        .map(|p| {
            format!(
                "meta l4proto {p} update @affinity {{ {f} saddr . ct original {f} daddr . meta l4proto . ct original proto-dst timeout {timeout}s : {f} daddr . {p} dport }}"
            )
        })
        .collect();
    chain(&format!("affinity-{timeout}"), rules)
}

/// The plan as a ruleset (one table per family).
pub fn ruleset(plan: &NodePlan) -> Ruleset {
    plan.families
        .iter()
        .map(|f| {
            let t = table(f, &plan.node);
            ((t.family.clone(), t.name.clone()), t)
        })
        .collect()
}

/// A complete program for `nft -f -`: creates or replaces our tables in one transaction.
pub fn render(plan: &NodePlan) -> String {
    let mut out = String::with_capacity(1 << 16);
    let _ = writeln!(out, "{}", super::header(&plan.node, "nftables"));
    for fam in &plan.families {
        write_family(&mut out, fam, &plan.node);
    }
    out
}

/// Writes one family's table straight from the plan, elements streamed into per-set buffers.
fn write_family(out: &mut String, fam: &FamilyPlan, node: &str) {
    let f = names(fam.family).fam;
    let sets = declare_sets(fam);
    let mut sink = TextSink {
        index: {
            let mut ix = [0; SET_NAMES.len()];
            for (i, k) in sets.keys().enumerate() {
                if let Some(id) = set_id(k) {
                    ix[id] = i;
                }
            }
            ix
        },
        bufs: vec![String::new(); sets.len()],
        scratch: String::new(),
        shared: HashSet::with_hasher(FastHash),
        claims: HashSet::with_hasher(FastHash),
        lbs: BTreeSet::new(),
    };
    let large = is_large(fam);
    // Size the big buffers up front: growing them by doubling copies megabytes.
    let endpoints: usize = fam.services.iter().map(|s| s.cluster_endpoints.len() + s.local_endpoints.len()).sum();
    let per_element = if large { 40 } else { 90 };
    for (set, n) in [
        ("endpoints-ips", endpoints * 2),
        ("endpoints-nodeports", endpoints),
        ("hairpin", endpoints),
        ("service-ips", fam.services.len() * 2),
        ("lb-ips", fam.services.len() * 2),
        ("cluster-ips", fam.services.len()),
    ] {
        if let Some(id) = set_id(set) {
            sink.bufs[sink.index[id]].reserve(n * per_element);
        }
    }
    for s in &fam.services {
        contributions(s, large, &mut sink);
    }
    static_elements(fam, &mut sink);
    let mut chains = fixed_chains(fam);
    chains.extend(dynamic_chains(fam, &sink.lbs));
    let total: usize = sink.bufs.iter().map(String::len).sum();
    out.reserve(total + 16 * 1024);
    // `table` then `delete table` makes the delete valid whether or not it existed.
    let _ = writeln!(out, "table {f} {TABLE}");
    let _ = writeln!(out, "delete table {f} {TABLE}");
    let _ = writeln!(out, "table {f} {TABLE} {{");
    let _ = writeln!(out, "\tcomment \"Switchyard service proxy for node {node}\"");
    for (i, s) in sets.values().enumerate() {
        let mut empty = s.clone();
        empty.elements.clear();
        let _ = writeln!(out, "\t{} {} {{", if s.map { "map" } else { "set" }, s.name);
        write_set_body(out, &empty);
        if !sink.bufs[i].is_empty() {
            out.push_str("\t\telements = { ");
            out.push_str(&sink.bufs[i]);
            out.push_str(" }\n");
        }
        out.push_str("\t}\n");
    }
    write_chains(out, &chains);
    out.push_str("}\n");
}

const SET_NAMES: [&str; 22] = [
    "cluster-ips",
    "service-cidrs",
    "local-pod-cidrs",
    "nodeport-ips",
    "hairpin",
    "health-check-ports",
    "service-ips",
    "service-nodeports",
    "lb-ips",
    "lb-local-ips",
    "lb-nodeports",
    "lb-local-nodeports",
    "endpoints-ips",
    "endpoints-local-ips",
    "endpoints-nodeports",
    "endpoints-local-nodeports",
    "affinity",
    "affinity-services",
    "firewall-protected",
    "firewall-allowed",
    "no-endpoint-services",
    "no-endpoint-nodeports",
];

/// A declared set's index in [`SET_NAMES`]; a match on the name is cheaper than hashing it.
fn set_id(name: &str) -> Option<usize> {
    SET_NAMES.iter().position(|n| *n == name)
}

fn write_element(out: &mut String, key: &str, e: &Element) {
    out.push_str(key);
    if let Some(c) = &e.comment {
        let _ = write!(out, " comment \"{c}\"");
    }
    if let Some(v) = &e.value {
        let _ = write!(out, " : {v}");
    }
}

fn write_set_body(out: &mut String, s: &Set) {
    let _ = writeln!(out, "\t\t{}", s.key_type);
    if let Some(n) = s.size {
        let _ = writeln!(out, "\t\tsize {n}");
    }
    if !s.flags.is_empty() {
        let _ = writeln!(out, "\t\tflags {}", s.flags.join(","));
    }
    if let Some(c) = &s.comment {
        let _ = writeln!(out, "\t\tcomment \"{c}\"");
    }
    if !s.elements.is_empty() {
        out.push_str("\t\telements = { ");
        for (i, (k, e)) in s.elements.iter().enumerate() {
            if i > 0 {
                out.push_str(",\n\t\t\t     ");
            }
            write_element(out, k, e);
        }
        out.push_str(" }\n");
    }
}

fn write_chains(out: &mut String, chains: &BTreeMap<String, Chain>) {
    for c in chains.values() {
        let _ = writeln!(out, "\tchain {} {{", c.name);
        if let Some(b) = &c.base {
            let _ = writeln!(out, "\t\ttype {} hook {} priority {}; policy accept;", b.kind, b.hook, b.priority);
        }
        for r in &c.rules {
            let _ = writeln!(out, "\t\t{r}");
        }
        out.push_str("\t}\n");
    }
}

/// Writes a table in the block form `nft list table` prints.
pub fn write_table(out: &mut String, t: &Table) {
    let _ = writeln!(out, "table {} {} {{", t.family, t.name);
    if let Some(c) = &t.comment {
        let _ = writeln!(out, "\tcomment \"{c}\"");
    }
    for s in t.sets.values() {
        let _ = writeln!(out, "\t{} {} {{", if s.map { "map" } else { "set" }, s.name);
        write_set_body(out, s);
        out.push_str("\t}\n");
    }
    write_chains(out, &t.chains);
    out.push_str("}\n");
}

/// The smallest transaction that turns the program of `old` into the program of `new`: element
/// adds and deletes, chains added, rewritten or deleted, and a whole-table replacement only when
/// family-level settings changed. Empty when nothing changed.
pub fn render_incremental(old: &NodePlan, new: &NodePlan) -> String {
    render_incremental_for(old, new, None)
}

/// [`render_incremental`] when the caller knows which services changed (the agent's sync loop
/// does): only those are compared, so one endpoint change costs the same at any cluster size.
pub fn render_incremental_for(old: &NodePlan, new: &NodePlan, changed: Option<&BTreeSet<ObjectKey>>) -> String {
    let mut out = String::new();
    for nf in &new.families {
        match old.family(nf.family) {
            Some(of) if same_settings(of, nf) => diff_family(&mut out, of, nf, changed),
            _ => write_family(&mut out, nf, &new.node),
        }
    }
    for of in &old.families {
        if new.family(of.family).is_none() {
            let _ = writeln!(out, "delete table {} {TABLE}", names(of.family).fam);
        }
    }
    if !out.is_empty() {
        out.insert_str(0, &format!("{} (incremental)\n", super::header(&new.node, "nftables")));
    }
    out
}

fn same_settings(a: &FamilyPlan, b: &FamilyPlan) -> bool {
    a.node_ips == b.node_ips
        && a.local_detector == b.local_detector
        && a.masquerade_all == b.masquerade_all
        && a.masquerade_mark == b.masquerade_mark
        && a.node_port_addresses == b.node_port_addresses
        && a.service_cidrs == b.service_cidrs
}

/// Service ports that differ between two plans, among the given services or all of them.
fn changed<'a>(
    of: &'a FamilyPlan,
    nf: &'a FamilyPlan,
    only: Option<&BTreeSet<ObjectKey>>,
) -> (Vec<&'a ServicePortPlan>, Vec<&'a ServicePortPlan>) {
    let Some(only) = only else { return changed_in(&of.services, &nf.services) };
    let range = |v: &'a [ServicePortPlan], k: &ObjectKey| {
        let lo = v.partition_point(|s| &s.name.service < k);
        let hi = v.partition_point(|s| &s.name.service <= k);
        &v[lo..hi]
    };
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for k in only {
        let (o, n) = changed_in(range(&of.services, k), range(&nf.services, k));
        old.extend(o);
        new.extend(n);
    }
    (old, new)
}

/// Service ports that differ between two lists sorted by name, then cluster IP.
fn changed_in<'a>(
    of: &'a [ServicePortPlan],
    nf: &'a [ServicePortPlan],
) -> (Vec<&'a ServicePortPlan>, Vec<&'a ServicePortPlan>) {
    fn key(s: &ServicePortPlan) -> (&ServicePortName, IpAddr) {
        (&s.name, s.cluster_ip)
    }
    let (mut i, mut j) = (0, 0);
    let (mut old, mut new) = (Vec::new(), Vec::new());
    while i < of.len() || j < nf.len() {
        match (of.get(i), nf.get(j)) {
            (Some(a), Some(b)) if key(a) == key(b) => {
                if a != b {
                    old.push(a);
                    new.push(b);
                }
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if key(a) < key(b) => {
                old.push(a);
                i += 1;
            }
            (Some(_), Some(b)) | (None, Some(b)) => {
                new.push(b);
                j += 1;
            }
            (Some(a), None) => {
                old.push(a);
                i += 1;
            }
            (None, None) => break,
        }
    }
    (old, new)
}

fn diff_family(out: &mut String, of: &FamilyPlan, nf: &FamilyPlan, only: Option<&BTreeSet<ObjectKey>>) {
    let f = names(nf.family).fam;
    let (old_changed, new_changed) = changed(of, nf, only);
    if old_changed.is_empty() && new_changed.is_empty() {
        return;
    }
    let (mut before, mut after) = (MapSink::default(), MapSink::default());
    // A frontend a changed service shares with an unchanged one stays with the unchanged one:
    // the transaction must never add a second element with one key.
    // Sets, not scans: under endpoint churn one sync carries thousands of changed services, and
    // a scan of them per service (or of every endpoint per removed element, below) made the
    // diff quadratic (45 s for 6,000 of 10,000 services changed; see BENCHMARKS, churn).
    let mine: HashSet<FrontendId> = old_changed.iter().chain(&new_changed).flat_map(|s| frontends_of(s)).collect();
    let changed_ptrs: HashSet<*const ServicePortPlan> = new_changed.iter().map(|c| std::ptr::from_ref(*c)).collect();
    let is_changed = |s: &ServicePortPlan| changed_ptrs.contains(&std::ptr::from_ref(s));
    let shares = |s: &ServicePortPlan| frontends_of(s).any(|f| mine.contains(&f));
    for s in nf.services.iter().filter(|s| shares(s) && !is_changed(s)) {
        for f in frontends_of(s).filter(|f| mine.contains(f)) {
            before.claims.insert(f);
            after.claims.insert(f);
        }
    }
    let (large_old, large_new) = (is_large(of), is_large(nf));
    for s in &old_changed {
        contributions(s, large_old, &mut before);
    }
    for s in &new_changed {
        contributions(s, large_new, &mut after);
    }
    // Shared elements (cluster IPs, hairpin pairs, health-check ports) stay while another
    // service still has them. Changed services' new elements are in `after` already, so
    // scanning every service of the new plan is right.
    // Only the elements about to go are asked about: gather them first, then one pass over
    // every endpoint looks them up (building sets of all 100,000 endpoints instead cost ~7 ms
    // per sync at 10,000 services).
    let shared_set = |set: &str| matches!(set, "hairpin" | "cluster-ips" | "health-check-ports");
    let leaving =
        before.elements.keys().filter(|(set, k)| shared_set(set) && !after.elements.contains_key(&(*set, k.clone())));
    let (mut hairpin, mut cluster_ips, mut health_checks) = (HashSet::new(), HashSet::new(), HashSet::new());
    for (set, k) in leaving {
        let ip: Option<IpAddr> = k.split(" . ").next().and_then(|a| a.parse().ok());
        match (*set, ip) {
            ("hairpin", Some(ip)) => {
                hairpin.insert(ip);
            }
            ("cluster-ips", Some(ip)) => {
                cluster_ips.insert(ip);
            }
            ("health-check-ports", _) => {
                health_checks.insert(k.clone());
            }
            _ => {}
        }
    }
    let (mut hairpin_used, mut cluster_ips_used, mut health_checks_used) =
        (HashSet::new(), HashSet::new(), HashSet::new());
    if !(hairpin.is_empty() && cluster_ips.is_empty() && health_checks.is_empty()) {
        for s in &nf.services {
            if !hairpin.is_empty() {
                hairpin_used.extend(
                    s.cluster_endpoints
                        .iter()
                        .chain(&s.local_endpoints)
                        .map(|e| e.ip)
                        .filter(|ip| hairpin.contains(ip)),
                );
            }
            if cluster_ips.contains(&s.cluster_ip) {
                cluster_ips_used.insert(s.cluster_ip);
            }
            if let Some(p) = s
                .health_check_node_port
                .filter(|_| !health_checks.is_empty())
                .map(|n| n.to_string())
                .filter(|p| health_checks.contains(p))
            {
                health_checks_used.insert(p);
            }
        }
    }
    let still_used = |set: &str, k: &str| -> bool {
        let ip: Option<IpAddr> = k.split(" . ").next().and_then(|a| a.parse().ok());
        match set {
            "hairpin" => ip.is_some_and(|ip| hairpin_used.contains(&ip)),
            "cluster-ips" => ip.is_some_and(|ip| cluster_ips_used.contains(&ip)),
            "health-check-ports" => health_checks_used.contains(k),
            _ => false,
        }
    };
    let mut deletes: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut adds: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((set, k), (v, _)) in &before.elements {
        match after.elements.get(&(*set, k.clone())) {
            Some((v2, _)) if v2 == v => {}
            Some(_) => deletes.entry(set).or_default().push(k),
            None if still_used(set, k) => {}
            None => deletes.entry(set).or_default().push(k),
        }
    }
    for ((set, k), (v, c)) in &after.elements {
        match before.elements.get(&(*set, k.clone())) {
            Some((v0, _)) if v0 == v => {}
            _ => {
                let mut s = String::new();
                write_element(&mut s, k, &Element { value: v.clone(), comment: c.clone() });
                adds.entry(set).or_default().push(s);
            }
        }
    }
    // Load-balancing and affinity chains: add the ones now needed, delete the ones unused.
    // Only the changed services' chains can come or go; whether an unchanged service still
    // uses one is a scan that stops at the first user.
    let affinity = |fam: &FamilyPlan| fam.services.iter().any(|s| s.affinity_timeout.is_some());
    let (old_chains, new_chains) = if affinity(of) != affinity(nf) {
        // Every load-balancing chain gains or loses its affinity lookup: rewrite them all.
        (dynamic_chains(of, &lb_needs(of)), dynamic_chains(nf, &lb_needs(nf)))
    } else {
        let unchanged = || nf.services.iter().filter(|s| !is_changed(s));
        let changed_needs = |v: &[&ServicePortPlan]| {
            let mut set = BTreeSet::new();
            for s in v {
                lb_needs_of(s, &mut |k, n| {
                    set.insert((k, n));
                });
            }
            set
        };
        let (before, after) = (changed_needs(&old_changed), changed_needs(&new_changed));
        let timeouts = |v: &[&ServicePortPlan]| v.iter().filter_map(|s| s.affinity_timeout).collect::<BTreeSet<u32>>();
        let (t_before, t_after) = (timeouts(&old_changed), timeouts(&new_changed));
        let mut old_chains = BTreeMap::new();
        let mut new_chains = BTreeMap::new();
        let with_affinity = affinity(nf);
        for &(k, n) in before.symmetric_difference(&after) {
            if unchanged().any(|s| needs_lb(s, k, n)) {
                continue;
            }
            let c = lb_chain(nf.family, k, n, with_affinity);
            let side = if before.contains(&(k, n)) { &mut old_chains } else { &mut new_chains };
            side.insert(c.name.clone(), c);
        }
        for &t in t_before.symmetric_difference(&t_after) {
            if unchanged().any(|s| s.affinity_timeout == Some(t)) {
                continue;
            }
            let c = affinity_chain(nf.family, t);
            let side = if t_before.contains(&t) { &mut old_chains } else { &mut new_chains };
            side.insert(c.name.clone(), c);
        }
        (old_chains, new_chains)
    };
    for c in new_chains.values() {
        match old_chains.get(&c.name) {
            Some(o) if o == c => continue,
            Some(_) => {
                let _ = writeln!(out, "flush chain {f} {TABLE} {}", c.name);
            }
            None => {
                let _ = writeln!(out, "add chain {f} {TABLE} {}", c.name);
            }
        }
        for r in &c.rules {
            let _ = writeln!(out, "add rule {f} {TABLE} {} {r}", c.name);
        }
    }
    for (set, keys) in &deletes {
        let _ = writeln!(out, "delete element {f} {TABLE} {set} {{ {} }}", keys.join(", "));
    }
    for (set, elems) in &adds {
        // Interval sets take at most ~800 elements per statement.
        for chunk in elems.chunks(500) {
            let _ = writeln!(out, "add element {f} {TABLE} {set} {{ {} }}", chunk.join(", "));
        }
    }
    // Chains go last: nothing may still point at them.
    for name in old_chains.keys() {
        if !new_chains.contains_key(name) {
            let _ = writeln!(out, "delete chain {f} {TABLE} {name}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two services claiming one NodePort and one external IP (the API server does not stop
    /// every such clash): the program holds one element per key, the first service's, so the
    /// kernel accepts the transaction.
    #[test]
    fn clashing_frontends_keep_the_first_claimant() {
        let mut c = crate::synthetic::cluster(4, 2);
        let keys: Vec<_> = c.services.keys().cloned().collect();
        for k in &keys {
            let s = c.services.get_mut(k).expect("service");
            s.service_type = crate::model::ServiceType::NodePort;
            s.ports[0].protocol = Protocol::Tcp;
            s.ports[0].node_port = Some(30080);
            s.external_ips = vec!["198.51.100.1".parse().expect("ip")];
        }
        for sl in c.endpoint_slices.values_mut() {
            sl.ports[0].protocol = Protocol::Tcp;
        }
        let plan = crate::policy::plan(&c, "node-a", Backend::Nftables);
        let text = render(&plan);
        assert_eq!(text.matches("tcp . 30080 comment").count(), 2, "service-nodeports and lb-nodeports, once each");
        assert_eq!(text.matches("198.51.100.1 . tcp . 80 comment").count(), 2, "service-ips and lb-ips");
        let parsed = crate::trace::nftables::parse_ruleset(&text).expect("parses");
        assert_eq!(parsed, ruleset(&plan));
    }

    /// The fast chain count agrees with what the element writer asks for.
    #[test]
    fn lb_needs_match_contributions() {
        for cluster in [crate::synthetic::cluster(200, 3), crate::demo::cluster()] {
            for node in cluster.nodes.keys() {
                let plan = crate::policy::plan(&cluster, node, Backend::Nftables);
                for fam in &plan.families {
                    let mut n = ChainNeeds::default();
                    for s in &fam.services {
                        contributions(s, true, &mut n);
                    }
                    assert_eq!(lb_needs(fam), n.lbs, "node {node}");
                }
            }
        }
    }
}
