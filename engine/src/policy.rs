//! kube-proxy's semantics, decided once per node: for each service port, which endpoints each kind
//! of traffic may reach and what happens when there are none. Renderers only translate a
//! [`NodePlan`] into rules; every routing decision lives here.
//!
//! The reference is kubernetes `pkg/proxy`: `CategorizeEndpoints` (topology.go) for endpoint
//! selection, and the nftables/iptables proxiers' `syncProxyRules` for the filter verdicts.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::model::*;

/// Which kernel backend a plan is for: `masqueradeAll` and localhost NodePorts are per backend in
/// kube-proxy's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nftables,
    Iptables,
    Ipvs,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Iptables => "iptables",
            Backend::Ipvs => "ipvs",
        }
    }
}

/// `namespace/name:port/protocol`, kube-proxy's `ServicePortName`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePortName {
    pub service: ObjectKey,
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() { write!(f, "{}", self.service) } else { write!(f, "{}:{}", self.service, self.port) }
    }
}

/// One endpoint as a service port on this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PlannedEndpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub node: Option<String>,
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: Option<String>,
    pub target: Option<String>,
}

/// What the filter stage does with a packet addressed to a service that cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterVerdict {
    /// No endpoints at all: the client gets ICMP port unreachable (or a TCP reset).
    Reject,
    /// A Local traffic policy with no local endpoint: silently dropped.
    Drop,
}

/// One service port of one IP family, as this node must program it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServicePortPlan {
    pub name: ServicePortName,
    pub protocol: Protocol,
    pub port: u16,
    pub cluster_ip: IpAddr,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// `loadBalancerSourceRanges` of this family; empty means no firewall.
    pub source_ranges: Vec<IpNet>,
    /// LB IPs allowed as a source too: when a node IP is inside a range, node traffic to a locally
    /// assigned LB IP carries the LB IP as source (kube-proxy's firewall chain does the same).
    pub source_range_lb_self: bool,
    pub health_check_node_port: Option<u16>,
    pub affinity_timeout: Option<u32>,
    pub externally_accessible: bool,
    pub internal_policy_local: bool,
    pub external_policy_local: bool,
    /// Endpoints for Cluster traffic policy (after topology filtering and terminating fallback);
    /// empty when the policies never use them.
    pub cluster_endpoints: Vec<PlannedEndpoint>,
    /// Endpoints for Local traffic policy.
    pub local_endpoints: Vec<PlannedEndpoint>,
    /// Any usable endpoint anywhere in the cluster.
    pub has_endpoints: bool,
    /// Terminating endpoints that neither list selects: no new connection may reach them, but
    /// a backend that keeps per-endpoint state while connections drain (IPVS real servers at
    /// weight 0, kube-proxy's graceful termination) still lists them. Routing never uses them.
    #[serde(default)]
    pub draining_endpoints: Vec<PlannedEndpoint>,
}

impl ServicePortPlan {
    /// Endpoints for traffic to the cluster IP, or `None` when the filter stage handles it.
    pub fn internal_endpoints(&self) -> Option<&[PlannedEndpoint]> {
        let eps = if self.internal_policy_local { &self.local_endpoints } else { &self.cluster_endpoints };
        (self.has_endpoints && !eps.is_empty()).then_some(eps.as_slice())
    }

    pub fn internal_filter(&self) -> Option<FilterVerdict> {
        if !self.has_endpoints {
            Some(FilterVerdict::Reject)
        } else if self.internal_endpoints().is_none() {
            Some(FilterVerdict::Drop)
        } else {
            None
        }
    }

    /// Endpoints for external traffic (NodePort, external IPs, LB IPs) that is not short-circuited.
    pub fn external_endpoints(&self) -> Option<&[PlannedEndpoint]> {
        let eps = if self.external_policy_local { &self.local_endpoints } else { &self.cluster_endpoints };
        (self.has_endpoints && !eps.is_empty()).then_some(eps.as_slice())
    }

    pub fn external_filter(&self) -> Option<FilterVerdict> {
        if !self.has_endpoints {
            Some(FilterVerdict::Reject)
        } else if self.external_endpoints().is_none() {
            Some(FilterVerdict::Drop)
        } else {
            None
        }
    }

    /// Whether external destinations are captured at all: with no endpoints anywhere, only the
    /// filter stage acts (kube-proxy's `usesExternalTrafficChain`).
    pub fn captures_external(&self) -> bool {
        self.has_endpoints && self.externally_accessible
    }

    /// Every external destination address (external IPs, then LB IPs).
    pub fn external_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.external_ips.iter().chain(&self.load_balancer_ips).copied()
    }

    /// All endpoints this node may send to, deduplicated.
    pub fn reachable_endpoints(&self) -> Vec<&PlannedEndpoint> {
        let mut v: Vec<&PlannedEndpoint> = self.cluster_endpoints.iter().chain(&self.local_endpoints).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// How traffic from local pods is recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalDetector {
    /// No detector: ClusterIP traffic is never masqueraded and there is no pod short-circuit.
    None,
    /// Sources inside these CIDRs are local pods (cluster CIDR or this node's pod CIDR).
    Cidrs(Vec<IpNet>),
}

/// Which local addresses accept NodePort traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodePortAddresses {
    /// Every local address except loopback (unless the backend allows localhost NodePorts).
    All,
    /// Exactly these addresses.
    Only(Vec<IpAddr>),
}

/// Everything one IP family of one node needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamilyPlan {
    pub family: IpFamily,
    pub node_ips: Vec<IpAddr>,
    pub local_detector: LocalDetector,
    pub masquerade_all: bool,
    pub masquerade_mark: u32,
    pub node_port_addresses: NodePortAddresses,
    /// iptables and IPVS modes: NodePorts also answer on 127.0.0.1 (IPv4 only).
    pub localhost_node_ports: bool,
    pub service_cidrs: Vec<IpNet>,
    pub services: Vec<ServicePortPlan>,
    /// IPVS mode: `ipvs.scheduler` (kube-proxy's default, `rr`, when unset).
    #[serde(default = "default_scheduler")]
    pub ipvs_scheduler: String,
}

fn default_scheduler() -> String {
    "rr".into()
}

impl FamilyPlan {
    pub fn loopback(&self) -> IpNet {
        match self.family {
            IpFamily::V4 => IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("valid"),
            IpFamily::V6 => IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128).expect("valid"),
        }
    }
}

/// The whole program a node needs, before it is written for a backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodePlan {
    pub node: String,
    pub backend: Backend,
    pub families: Vec<FamilyPlan>,
}

impl NodePlan {
    pub fn family(&self, f: IpFamily) -> Option<&FamilyPlan> {
        self.families.iter().find(|p| p.family == f)
    }
}

/// Computes the plan of `node` for `backend`.
pub fn plan(cluster: &Cluster, node: &str, backend: Backend) -> NodePlan {
    let here = Here::new(cluster, node);
    let slices = cluster.slices_by_service();
    let mut families = Vec::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let mut services = Vec::new();
        for svc in cluster.services.values() {
            let svc_slices = slices.get(&svc.key).map(Vec::as_slice).unwrap_or(&[]);
            here.plan_service(svc, family, svc_slices, &mut services);
        }
        services.sort_by(by_name);
        if let Some(f) = family_plan(cluster, &here, backend, family, services) {
            families.push(f);
        }
    }
    NodePlan { node: node.to_string(), backend, families }
}

/// The plan of `old.node` after only the Services in `changed` changed since `old` was planned
/// (their Service object, their EndpointSlices or legacy Endpoints; added, edited or removed):
/// `replan(&plan(a, ..), b, changed) == plan(b, ..)` when every Service whose object or endpoints
/// differ between `a` and `b` is in `changed`, and nothing else differs.
///
/// Only the changed Services' ports are planned again; the rest of `old` is kept. Changes that
/// reach every service (this node's addresses, zone or pod CIDRs, the proxy configuration,
/// ServiceCIDRs) are not Services: plan them with [`plan`].
pub fn replan(old: &NodePlan, cluster: &Cluster, changed: &BTreeSet<ObjectKey>) -> NodePlan {
    let mut new = old.clone();
    replan_in_place(&mut new, cluster, changed);
    new
}

/// [`replan`] on a plan the caller owns: no unchanged service port is copied, which at 10,000
/// services is most of the cost (cloning a plan that size takes milliseconds).
pub fn replan_in_place(plan: &mut NodePlan, cluster: &Cluster, changed: &BTreeSet<ObjectKey>) {
    if changed.is_empty() {
        return;
    }
    let here = Here::new(cluster, &plan.node);
    let slices = cluster.slices_of(changed);
    let mut families = Vec::with_capacity(2);
    let mut old_families = std::mem::take(&mut plan.families).into_iter().peekable();
    for family in [IpFamily::V4, IpFamily::V6] {
        // The changed services' ports, sorted: `changed` iterates in key order, and a service's
        // ports sort among themselves.
        let mut fresh = Vec::new();
        for key in changed {
            if let Some(svc) = cluster.services.get(key) {
                let svc_slices = slices.get(key).map(Vec::as_slice).unwrap_or(&[]);
                here.plan_service(svc, family, svc_slices, &mut fresh);
            }
        }
        fresh.sort_by(by_name);
        let old = old_families.next_if(|f| f.family == family);
        let services = match old {
            Some(mut f) => {
                merge_services(&mut f.services, fresh, changed);
                // A family with neither services nor node addresses is not planned at all.
                if family == IpFamily::V6 && f.services.is_empty() && f.node_ips.is_empty() {
                    continue;
                }
                families.push(f);
                continue;
            }
            None => fresh,
        };
        // The family appears: its settings depend on the node and configuration only.
        if let Some(f) = family_plan(cluster, &here, plan.backend, family, services) {
            families.push(f);
        }
    }
    plan.families = families;
}

/// Order of service ports in a plan: by name (service, port, protocol), then cluster IP.
fn by_name(a: &ServicePortPlan, b: &ServicePortPlan) -> Ordering {
    a.name.cmp(&b.name).then(a.cluster_ip.cmp(&b.cluster_ip))
}

/// Replaces the ports of the `changed` services in `services` (sorted by [`by_name`]) with
/// `fresh` (sorted too, and only of changed services).
fn merge_services(services: &mut Vec<ServicePortPlan>, fresh: Vec<ServicePortPlan>, changed: &BTreeSet<ObjectKey>) {
    // Each service's ports are one run of the sorted list. When every changed service keeps its
    // number of ports (an endpoint change, the common case), they are swapped in where they are.
    let run = |v: &[ServicePortPlan], k: &ObjectKey| {
        let lo = v.partition_point(|s| &s.name.service < k);
        lo..lo + v[lo..].partition_point(|s| &s.name.service <= k)
    };
    let mut runs = Vec::with_capacity(changed.len());
    let mut at = 0;
    let same_shape = changed.iter().all(|k| {
        let (old, new) = (run(services, k), run(&fresh[at..], k));
        at += new.len();
        runs.push(old.clone());
        old.len() == new.len()
    });
    if same_shape {
        for (slot, s) in runs.into_iter().flatten().zip(fresh) {
            services[slot] = s;
        }
        return;
    }
    // Otherwise one merge of the kept ports with the fresh ones, moving (never copying) them.
    let old = std::mem::take(services);
    services.reserve(old.len() + fresh.len());
    let mut keys = changed.iter().peekable();
    let mut fresh = fresh.into_iter().peekable();
    for s in old {
        while keys.next_if(|k| *k < &s.name.service).is_some() {}
        if keys.peek().is_some_and(|k| *k == &s.name.service) {
            continue;
        }
        while let Some(f) = fresh.next_if(|f| by_name(f, &s) == Ordering::Less) {
            services.push(f);
        }
        services.push(s);
    }
    services.extend(fresh);
}

/// What every service port of one node needs to know about the node.
struct Here<'a> {
    name: &'a str,
    node: Option<&'a Node>,
    zone: Option<&'a str>,
    /// The node's primary IPv4 and IPv6 addresses.
    primary: [Option<IpAddr>; 2],
}

impl<'a> Here<'a> {
    fn new(cluster: &'a Cluster, name: &'a str) -> Self {
        let node = cluster.nodes.get(name);
        let primary = |f| node.and_then(|n| n.primary_ip(f));
        Here { name, node, zone: node.and_then(|n| n.zone()), primary: [primary(IpFamily::V4), primary(IpFamily::V6)] }
    }

    /// Appends the ports of `svc` in `family` (none when it is not proxied or has no cluster IP
    /// of that family).
    fn plan_service(&self, svc: &Service, family: IpFamily, slices: &[&EndpointSlice], out: &mut Vec<ServicePortPlan>) {
        if !svc.is_proxied() {
            return;
        }
        let Some(cluster_ip) = svc.cluster_ips.iter().copied().find(|ip| IpFamily::of(ip) == family) else {
            return;
        };
        let primary_ip = self.primary[usize::from(family == IpFamily::V6)];
        for port in &svc.ports {
            out.push(plan_port(svc, port, cluster_ip, family, slices, self.name, self.zone, primary_ip));
        }
    }
}

/// One family's plan around its (sorted) service ports; `None` for an IPv6 family with neither
/// services nor node addresses.
fn family_plan(
    cluster: &Cluster,
    here: &Here<'_>,
    backend: Backend,
    family: IpFamily,
    services: Vec<ServicePortPlan>,
) -> Option<FamilyPlan> {
    let cfg = &cluster.config;
    let this = here.node;
    let fam_ips: Vec<IpAddr> =
        this.map(|n| n.ips()).unwrap_or_default().into_iter().filter(|ip| IpFamily::of(ip) == family).collect();
    if family == IpFamily::V6 && services.is_empty() && fam_ips.is_empty() {
        return None;
    }
    let local_detector = match cfg.detect_local_mode {
        LocalMode::ClusterCidr => {
            let c: Vec<IpNet> = cfg.cluster_cidrs.iter().copied().filter(|n| IpFamily::of_net(n) == family).collect();
            if c.is_empty() { LocalDetector::None } else { LocalDetector::Cidrs(c) }
        }
        LocalMode::NodeCidr => {
            let c: Vec<IpNet> = this
                .map(|n| n.pod_cidrs.iter().copied().filter(|n| IpFamily::of_net(n) == family).collect())
                .unwrap_or_default();
            if c.is_empty() { LocalDetector::None } else { LocalDetector::Cidrs(c) }
        }
        LocalMode::BridgeInterface | LocalMode::InterfaceNamePrefix => LocalDetector::None,
    };
    let service_cidrs = cluster
        .service_cidrs
        .values()
        .flat_map(|c| c.cidrs.iter().copied())
        .filter(|n| IpFamily::of_net(n) == family)
        .collect();
    Some(FamilyPlan {
        family,
        node_port_addresses: node_port_addresses(cfg, backend, family, this, &fam_ips),
        node_ips: fam_ips,
        local_detector,
        masquerade_all: match backend {
            Backend::Nftables => cfg.nftables_masquerade_all,
            Backend::Iptables | Backend::Ipvs => cfg.iptables_masquerade_all,
        },
        masquerade_mark: 1u32 << cfg.masquerade_bit,
        localhost_node_ports: localhost_node_ports(backend, family, cfg),
        service_cidrs,
        services,
        ipvs_scheduler: if cfg.ipvs_scheduler.is_empty() { default_scheduler() } else { cfg.ipvs_scheduler.clone() },
    })
}

/// Localhost NodePorts (IPv4 only, route_localnet) exist in kube-proxy's iptables mode
/// (`iptables.localhostNodePorts`) and its IPVS mode (which binds 127.0.0.1 with the other node
/// addresses); never in nftables mode.
fn localhost_node_ports(backend: Backend, family: IpFamily, cfg: &ProxyConfig) -> bool {
    matches!(backend, Backend::Iptables | Backend::Ipvs) && family == IpFamily::V4 && cfg.localhost_node_ports
}

/// kube-proxy's `NodePortAddresses`: the CIDRs of this family (none means all addresses; a zero
/// CIDR means all), with `primary` standing for the node's primary IP.
fn node_port_addresses(
    cfg: &ProxyConfig,
    backend: Backend,
    family: IpFamily,
    node: Option<&Node>,
    ips: &[IpAddr],
) -> NodePortAddresses {
    // kube-proxy's nftables mode defaults to `primary` (KEP-3866); the others to all addresses.
    let primary = [NodePortAddress::Primary];
    let configured: &[NodePortAddress] = if cfg.node_port_addresses.is_empty() && backend == Backend::Nftables {
        &primary
    } else {
        &cfg.node_port_addresses
    };
    let mut cidrs = Vec::new();
    for a in configured {
        match a {
            NodePortAddress::Cidr(n) if IpFamily::of_net(n) == family => {
                if n.prefix_len() == 0 {
                    return NodePortAddresses::All;
                }
                cidrs.push(*n);
            }
            NodePortAddress::Cidr(_) => {}
            NodePortAddress::Primary => {
                if let Some(ip) = node.and_then(|n| n.primary_ip(family)) {
                    cidrs.push(IpNet::from(ip));
                }
            }
        }
    }
    if cidrs.is_empty() {
        return NodePortAddresses::All;
    }
    let loopback = match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    let localhost = localhost_node_ports(backend, family, cfg);
    let mut out: Vec<IpAddr> = ips
        .iter()
        .chain(localhost.then_some(&loopback))
        .copied()
        .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
        .collect();
    out.dedup();
    NodePortAddresses::Only(out)
}

#[allow(clippy::too_many_arguments)]
fn plan_port(
    svc: &Service,
    port: &ServicePort,
    cluster_ip: IpAddr,
    family: IpFamily,
    slices: &[&EndpointSlice],
    node: &str,
    zone: Option<&str>,
    primary_ip: Option<IpAddr>,
) -> ServicePortPlan {
    let name = ServicePortName { service: svc.key.clone(), port: port.name.clone(), protocol: port.protocol };
    let want = match family {
        IpFamily::V4 => AddressType::IPv4,
        IpFamily::V6 => AddressType::IPv6,
    };
    // Endpoints are matched to the service port by port name and protocol, as kube-proxy's
    // endpoint slice cache keys them; the slice controller already resolved targetPort.
    let mut endpoints: Vec<PlannedEndpoint> = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == want) {
        let Some(ep_port) = slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol) else {
            continue;
        };
        for e in &slice.endpoints {
            let planned = PlannedEndpoint {
                ip: e.address,
                port: ep_port.port,
                node: e.node_name.clone(),
                local: e.node_name.as_deref() == Some(node),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                zone: e.zone.clone(),
                target: e.target.clone(),
            };
            // The same endpoint in two slices counts once; prefer the ready copy.
            match endpoints.iter_mut().find(|x| x.ip == planned.ip && x.port == planned.port) {
                Some(existing) if !existing.ready && planned.ready => *existing = planned,
                Some(_) => {}
                None => endpoints.push(planned),
            }
        }
    }
    endpoints.sort_by_key(|e| (e.ip, e.port));
    let hints: BTreeMap<&IpAddr, (&[String], &[String])> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .map(|e| (&e.address, (e.hints_for_zones.as_slice(), e.hints_for_nodes.as_slice())))
        .collect();

    let externally_accessible = svc.externally_accessible();
    let internal_policy_local = svc.internal_traffic_policy_local;
    let external_policy_local = externally_accessible && svc.external_traffic_policy_local;
    let c =
        categorize(&endpoints, &hints, internal_policy_local, external_policy_local, externally_accessible, node, zone);

    let draining: Vec<PlannedEndpoint> = endpoints
        .iter()
        .filter(|e| e.terminating)
        .filter(|e| !c.cluster.iter().chain(&c.local).any(|x| x.ip == e.ip && x.port == e.port))
        .cloned()
        .collect();
    let source_ranges: Vec<IpNet> =
        svc.load_balancer_source_ranges.iter().copied().filter(|n| IpFamily::of_net(n) == family).collect();
    // kube-proxy checks its primary node IP only.
    let source_range_lb_self = source_ranges.iter().any(|r| primary_ip.is_some_and(|ip| r.contains(&ip)));
    let of_family = |ips: &mut dyn Iterator<Item = IpAddr>| -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = ips.filter(|ip| IpFamily::of(ip) == family).collect();
        v.dedup();
        v
    };
    ServicePortPlan {
        name,
        protocol: port.protocol,
        port: port.port,
        cluster_ip,
        node_port: port.node_port.filter(|_| svc.service_type != ServiceType::ClusterIP),
        external_ips: of_family(&mut svc.external_ips.iter().copied()),
        load_balancer_ips: if svc.service_type == ServiceType::LoadBalancer {
            of_family(&mut svc.load_balancer_ips())
        } else {
            Vec::new()
        },
        source_ranges,
        source_range_lb_self,
        health_check_node_port: svc.health_check_node_port.filter(|_| external_policy_local),
        affinity_timeout: svc.session_affinity_timeout,
        externally_accessible,
        internal_policy_local,
        external_policy_local,
        cluster_endpoints: c.cluster,
        local_endpoints: c.local,
        has_endpoints: c.has_any,
        draining_endpoints: draining,
    }
}

struct Categorized {
    cluster: Vec<PlannedEndpoint>,
    local: Vec<PlannedEndpoint>,
    has_any: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum TopologyMode {
    None,
    SameZone,
    SameNode,
}

/// kube-proxy's `CategorizeEndpoints`: Cluster endpoints are the ready ones allowed by topology,
/// falling back to serving-and-terminating ones anywhere; Local endpoints are the local ready
/// ones, falling back to local serving-and-terminating ones. ETP Local still needs Cluster
/// endpoints for the pod and node short-circuits.
fn categorize(
    eps: &[PlannedEndpoint],
    hints: &BTreeMap<&IpAddr, (&[String], &[String])>,
    itp_local: bool,
    etp_local: bool,
    externally_accessible: bool,
    node: &str,
    zone: Option<&str>,
) -> Categorized {
    let uses_cluster = !itp_local || externally_accessible;
    let uses_local = itp_local || etp_local;
    let mut out = Categorized { cluster: Vec::new(), local: Vec::new(), has_any: false };

    if uses_cluster {
        let mode = topology_mode(eps, hints, node, zone);
        out.cluster = eps
            .iter()
            .filter(|e| e.ready)
            .filter(|e| {
                let (zones, nodes) = hints.get(&e.ip).copied().unwrap_or((&[], &[]));
                match mode {
                    TopologyMode::None => true,
                    TopologyMode::SameZone => zone.is_some_and(|z| zones.iter().any(|h| h == z)),
                    TopologyMode::SameNode => nodes.iter().any(|h| h == node),
                }
            })
            .cloned()
            .collect();
        if out.cluster.is_empty() {
            out.cluster = eps.iter().filter(|e| e.serving && e.terminating).cloned().collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !uses_local {
        return out;
    }
    let mut local_ready = false;
    let mut local_terminating = false;
    for e in eps {
        if e.ready {
            out.has_any = true;
            local_ready |= e.local;
        } else if e.serving && e.terminating {
            out.has_any = true;
            local_terminating |= e.local;
        }
    }
    if local_ready {
        out.local = eps.iter().filter(|e| e.local && e.ready).cloned().collect();
    } else if local_terminating {
        out.local = eps.iter().filter(|e| e.local && e.serving && e.terminating).cloned().collect();
    }
    out
}

/// kube-proxy's `topologyModeFromHints`: hints count only when every ready endpoint carries them
/// and at least one is for this node (or zone); otherwise no filtering.
fn topology_mode(
    eps: &[PlannedEndpoint],
    hints: &BTreeMap<&IpAddr, (&[String], &[String])>,
    node: &str,
    zone: Option<&str>,
) -> TopologyMode {
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    let mut any_ready = false;
    for e in eps.iter().filter(|e| e.ready) {
        any_ready = true;
        let (zones, nodes) = hints.get(&e.ip).copied().unwrap_or((&[], &[]));
        if nodes.is_empty() {
            all_node_hints = false;
        } else if nodes.iter().any(|n| n == node) {
            for_node = true;
        }
        if zones.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| zones.iter().any(|h| h == z)) {
            for_zone = true;
        }
    }
    if !any_ready {
        return TopologyMode::None;
    }
    if all_node_hints && for_node {
        return TopologyMode::SameNode;
    }
    if all_zone_hints && for_zone {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic;

    const NODE: &str = "node-a";

    /// 20 services, planned for node-a.
    fn base() -> (Cluster, NodePlan) {
        let c = synthetic::cluster(20, 3);
        let p = plan(&c, NODE, Backend::Nftables);
        (c, p)
    }

    fn keys(i: &[u32]) -> BTreeSet<ObjectKey> {
        i.iter().map(|i| synthetic::service(*i).key).collect()
    }

    /// A removed Service's ports leave the plan; its slices left behind do not bring them back.
    #[test]
    fn replan_removed_service() {
        let (mut c, old) = base();
        c.services.remove(&synthetic::service(7).key);
        let new = replan(&old, &c, &keys(&[7]));
        assert_eq!(new, plan(&c, NODE, Backend::Nftables));
        assert_eq!(new.families[0].services.len(), 19);
    }

    /// An added Service is planned and lands in its sorted place.
    #[test]
    fn replan_added_service() {
        let (mut c, old) = base();
        for i in [20, 105] {
            let (s, sl) = (synthetic::service(i), synthetic::slice(i, 3, 0));
            c.services.insert(s.key.clone(), s);
            c.endpoint_slices.insert(sl.key.clone(), sl);
        }
        let new = replan(&old, &c, &keys(&[20, 105]));
        assert_eq!(new, plan(&c, NODE, Backend::Nftables));
        assert_eq!(new.families[0].services.len(), 22);
    }

    /// A Service whose port list changed (one port more, then one port fewer) and one whose
    /// endpoints changed, in one replan.
    #[test]
    fn replan_changed_ports() {
        let (mut c, old) = base();
        let k = synthetic::service(3).key;
        let svc = c.services.get_mut(&k).expect("svc3");
        svc.ports.push(ServicePort {
            name: "admin".into(),
            protocol: Protocol::Tcp,
            port: 9000,
            target_port: TargetPort::Number(9000),
            node_port: None,
        });
        let sl = synthetic::slice(9, 3, 1);
        c.endpoint_slices.insert(sl.key.clone(), sl);
        let grown = replan(&old, &c, &keys(&[3, 9]));
        assert_eq!(grown, plan(&c, NODE, Backend::Nftables));
        assert_eq!(grown.families[0].services.len(), 21);

        c.services.get_mut(&k).expect("svc3").ports.remove(0);
        let shrunk = replan(&grown, &c, &keys(&[3]));
        assert_eq!(shrunk, plan(&c, NODE, Backend::Nftables));
        assert_eq!(shrunk.families[0].services.len(), 20);
    }

    /// An IPv6 family appears with the first dual-stack service and goes with the last one.
    #[test]
    fn replan_family_comes_and_goes() {
        let (mut c, old) = base();
        let k = synthetic::service(4).key;
        c.services.get_mut(&k).expect("svc4").cluster_ips.push("fd00::4".parse().expect("ip"));
        let dual = replan(&old, &c, &keys(&[4]));
        assert_eq!(dual, plan(&c, NODE, Backend::Nftables));
        assert_eq!(dual.families.len(), 2);
        c.services.get_mut(&k).expect("svc4").cluster_ips.truncate(1);
        let single = replan(&dual, &c, &keys(&[4]));
        assert_eq!(single, old);
    }

    /// Looking up a few services' slices finds what grouping every slice finds, and no more.
    #[test]
    fn slices_of_matches_slices_by_service() {
        let (mut c, _) = base();
        let legacy = synthetic::slice(30, 2, 0);
        c.legacy_endpoints.insert(synthetic::service(30).key, vec![legacy]);
        let want = keys(&[1, 10, 30, 99]);
        let all = c.slices_by_service();
        let got = c.slices_of(&want);
        assert_eq!(got.len(), 3);
        for (k, v) in got {
            assert_eq!(Some(&v), all.get(k), "{k}");
        }
    }
}
