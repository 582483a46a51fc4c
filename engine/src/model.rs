//! The cluster's objects as the proxy sees them: validated domain types, parsed once from Kubernetes
//! YAML/JSON by [`crate::input`]. Only the fields that change how a packet is routed are kept.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An IP family; dual-stack services are programmed once per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
    pub fn of_net(net: &IpNet) -> Self {
        Self::of(&net.addr())
    }
}

/// A transport protocol a Service port can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IANA protocol number, as conntrack and `meta l4proto` see it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Protocol::ALL.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// A Service port's `targetPort`: a number, or the name of a container port (resolved through the
/// EndpointSlice, whose port carries the Service port's name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Empty for a single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

/// One `status.loadBalancer.ingress` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancerIngress {
    pub ip: Option<IpAddr>,
    pub hostname: Option<String>,
    /// `ipMode: Proxy`: the load balancer delivers traffic to the node with the node as destination,
    /// so the proxy must not capture the LB IP (KEP-1860).
    pub ip_mode_proxy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub key: ObjectKey,
    pub service_type: ServiceType,
    /// `clusterIPs` (or `clusterIP`), empty for headless services.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    pub external_name: Option<String>,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ingress: Vec<LoadBalancerIngress>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub external_traffic_policy_local: bool,
    pub internal_traffic_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// `sessionAffinity: ClientIP` timeout in seconds (default 10800).
    pub session_affinity_timeout: Option<u32>,
    pub traffic_distribution: Option<String>,
    pub selector: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl Service {
    /// kube-proxy skips services claimed by another proxy (`service.kubernetes.io/service-proxy-name`)
    /// and headless ones (`service.kubernetes.io/headless`), through its informers' label selector.
    pub fn skipped_by_label(&self) -> bool {
        self.labels.contains_key("service.kubernetes.io/service-proxy-name")
            || self.labels.contains_key("service.kubernetes.io/headless")
    }

    /// Whether the proxy programs this service at all.
    pub fn is_proxied(&self) -> bool {
        !self.headless
            && !self.cluster_ips.is_empty()
            && self.service_type != ServiceType::ExternalName
            && !self.skipped_by_label()
    }

    /// `ExternallyAccessible` in kube-proxy: NodePort and LoadBalancer services, and any service with
    /// external IPs.
    pub fn externally_accessible(&self) -> bool {
        matches!(self.service_type, ServiceType::NodePort | ServiceType::LoadBalancer) || !self.external_ips.is_empty()
    }

    pub fn load_balancer_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.load_balancer_ingress.iter().filter(|i| !i.ip_mode_proxy).filter_map(|i| i.ip)
    }
}

/// `addressType` of an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressType {
    IPv4,
    IPv6,
    Fqdn,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// kube-proxy uses only the first address.
    pub address: IpAddr,
    /// Unset `ready` means ready.
    pub ready: bool,
    /// Unset `serving` means the same as `ready`... kube-proxy reads it as true when unset.
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub hints_for_zones: Vec<String>,
    pub hints_for_nodes: Vec<String>,
    /// `targetRef.name` (the pod), for display.
    pub target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    pub address_type: AddressType,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
    /// Converted from a legacy `Endpoints` object; used only when the service has no real slice.
    pub from_legacy_endpoints: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, ...
    pub kind: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<NodeAddress>,
    pub pod_cidrs: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
}

impl Node {
    /// The node's IP addresses, in the order `status.addresses` lists them.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for a in &self.addresses {
            if let Ok(ip) = a.address.parse::<IpAddr>()
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
        out
    }

    /// The first InternalIP of a family (kube-proxy's "primary" node IP), else the first address.
    pub fn primary_ip(&self, family: IpFamily) -> Option<IpAddr> {
        let parsed = |a: &NodeAddress| a.address.parse::<IpAddr>().ok();
        self.addresses
            .iter()
            .filter(|a| a.kind == "InternalIP")
            .filter_map(parsed)
            .find(|ip| IpFamily::of(ip) == family)
            .or_else(|| self.ips().into_iter().find(|ip| IpFamily::of(ip) == family))
    }

    pub fn zone(&self) -> Option<&str> {
        self.labels
            .get("topology.kubernetes.io/zone")
            .or_else(|| self.labels.get("failure-domain.beta.kubernetes.io/zone"))
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCidr {
    pub name: String,
    pub cidrs: Vec<IpNet>,
}

/// How kube-proxy tells traffic from local pods apart (`detectLocalMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalMode {
    ClusterCidr,
    NodeCidr,
    /// `BridgeInterface` / `InterfaceNamePrefix`: we cannot evaluate interfaces, so these are
    /// treated as no detector in the tracer; kept so the configuration round-trips.
    BridgeInterface,
    InterfaceNamePrefix,
}

/// One `nodePortAddresses` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodePortAddress {
    Cidr(IpNet),
    /// `primary`: the node's primary IP of each family.
    Primary,
}

/// The `KubeProxyConfiguration` fields that change routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyConfig {
    pub cluster_cidrs: Vec<IpNet>,
    pub detect_local_mode: LocalMode,
    pub node_port_addresses: Vec<NodePortAddress>,
    pub iptables_masquerade_all: bool,
    pub nftables_masquerade_all: bool,
    pub masquerade_bit: u8,
    /// `iptables.localhostNodePorts` (default true): NodePorts answer on 127.0.0.1 in iptables mode.
    pub localhost_node_ports: bool,
    pub ipvs_scheduler: String,
    pub min_sync_period_ms: u64,
    pub sync_period_ms: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            cluster_cidrs: Vec::new(),
            detect_local_mode: LocalMode::ClusterCidr,
            node_port_addresses: Vec::new(),
            iptables_masquerade_all: false,
            nftables_masquerade_all: false,
            masquerade_bit: 14,
            localhost_node_ports: true,
            ipvs_scheduler: "rr".into(),
            min_sync_period_ms: 1000,
            sync_period_ms: 30_000,
        }
    }
}
