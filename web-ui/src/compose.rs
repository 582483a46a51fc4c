//! The packet composer's choices, from the cluster: sources (pods, nodes, outside clients) and
//! targets (cluster IPs, NodePorts on each node, load balancer IPs, external IPs, DNS names), the
//! node a packet enters, the request the tracer runs, and the same question as a CLI command and
//! as a `/api/v1/trace` URL. Plain Rust, so the choices are tested natively.

use std::net::IpAddr;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::{IpFamily, Protocol, ServiceType};
use switchyard_engine::policy::Backend;
use switchyard_engine::{Destination, TraceRequest};

/// Outside clients offered by default (documentation ranges, RFC 5737).
pub const OUTSIDE: [(&str, &str); 2] =
    [("a client on the internet", "198.51.100.23"), ("an office client", "203.0.113.7")];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub group: &'static str,
    pub label: String,
    /// A source IP, or a destination as `trace --to` takes it.
    pub value: String,
    /// The node this source sits on, or the node this target addresses.
    pub node: Option<String>,
    pub protocol: Option<Protocol>,
}

pub fn sources(cluster: &Cluster) -> Vec<Choice> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for slice in cluster.endpoint_slices.values() {
        for e in &slice.endpoints {
            if seen.insert(e.address) {
                let name = e.target.clone().unwrap_or_else(|| format!("{}/{}", slice.key.namespace, slice.service));
                let on = e.node_name.as_deref().map(|n| format!(" on {n}")).unwrap_or_default();
                out.push(Choice {
                    group: "Pods",
                    label: format!("{name} {}{on}", e.address),
                    value: e.address.to_string(),
                    node: e.node_name.clone(),
                    protocol: None,
                });
            }
        }
    }
    for n in cluster.nodes.values() {
        if let Some(ip) = n.primary_ip(IpFamily::V4).or_else(|| n.ips().first().copied()) {
            out.push(Choice {
                group: "Nodes",
                label: format!("{} {ip}", n.name),
                value: ip.to_string(),
                node: Some(n.name.clone()),
                protocol: None,
            });
        }
    }
    for (label, ip) in OUTSIDE {
        out.push(Choice {
            group: "Outside",
            label: format!("{label} {ip}"),
            value: ip.into(),
            node: None,
            protocol: None,
        });
    }
    out
}

pub fn targets(cluster: &Cluster) -> Vec<Choice> {
    let mut out = Vec::new();
    let node_ips: Vec<(String, IpAddr)> = cluster
        .nodes
        .values()
        .filter_map(|n| n.primary_ip(IpFamily::V4).or_else(|| n.ips().first().copied()).map(|ip| (n.name.clone(), ip)))
        .collect();
    for s in cluster.services.values() {
        let key = &s.key;
        for p in &s.ports {
            let port_name = if p.name.is_empty() { String::new() } else { format!(":{}", p.name) };
            for ip in &s.cluster_ips {
                out.push(Choice {
                    group: "ClusterIP",
                    label: format!("{key}{port_name} {}", sock(*ip, p.port)),
                    value: sock(*ip, p.port),
                    node: None,
                    protocol: Some(p.protocol),
                });
            }
            if let Some(np) = p.node_port.filter(|_| s.service_type != ServiceType::ClusterIP) {
                for (node, ip) in &node_ips {
                    out.push(Choice {
                        group: "NodePort",
                        label: format!("{key}{port_name} on {node} {}", sock(*ip, np)),
                        value: sock(*ip, np),
                        node: Some(node.clone()),
                        protocol: Some(p.protocol),
                    });
                }
            }
            for ip in s.load_balancer_ips() {
                out.push(Choice {
                    group: "LoadBalancer",
                    label: format!("{key}{port_name} {}", sock(ip, p.port)),
                    value: sock(ip, p.port),
                    node: None,
                    protocol: Some(p.protocol),
                });
            }
            for ip in &s.external_ips {
                out.push(Choice {
                    group: "External IP",
                    label: format!("{key}{port_name} {}", sock(*ip, p.port)),
                    value: sock(*ip, p.port),
                    node: None,
                    protocol: Some(p.protocol),
                });
            }
        }
        // By name: every service, ExternalName ones included (DNS only, no proxying).
        let port = s.ports.first().map(|p| p.port).unwrap_or(80);
        let protocol = s.ports.first().map(|p| p.protocol);
        let name = format!("{}.{}.svc.cluster.local", key.name, key.namespace);
        let what = if s.service_type == ServiceType::ExternalName { " (ExternalName)" } else { "" };
        out.push(Choice {
            group: "DNS name",
            label: format!("{name}:{port}{what}"),
            value: format!("{name}:{port}"),
            node: None,
            protocol,
        });
    }
    out
}

fn sock(ip: IpAddr, port: u16) -> String {
    switchyard_engine::trace::SocketAddr { ip, port }.to_string()
}

/// The node the packet enters: the source's own node (pods, nodes), else the node a NodePort
/// target addresses, else the first node (the one the load balancer picked).
pub fn entry_node(cluster: &Cluster, source: &Choice, target: &Choice) -> Option<String> {
    source
        .node
        .clone()
        .or_else(|| target.node.clone())
        .filter(|n| cluster.nodes.contains_key(n))
        .or_else(|| cluster.nodes.keys().next().cloned())
}

/// The tracer's question; `None` when the source or destination does not parse.
pub fn request(node: &str, from: &str, to: &str, protocol: Protocol, backend: Backend) -> Result<TraceRequest, String> {
    let from: IpAddr = from.trim().parse().map_err(|_| format!("{from:?} is not an IP address"))?;
    let to: Destination = to.parse()?;
    Ok(TraceRequest { node: node.into(), backend, program: None, from, to, protocol, seed: 0 })
}

/// The same question for the CLI: `switchyard trace` prints the same outcomes.
pub fn cli_command(node: &str, from: &str, to: &str, protocol: Protocol, backend: Backend) -> String {
    format!(
        "switchyard trace --node {node} --from {from} --to {to} --protocol {} --backend {}",
        protocol.as_str().to_ascii_lowercase(),
        backend.as_str()
    )
}

/// `/api/v1/trace?node=..&from=..&to=..&protocol=..&backend=..` on the agent.
pub fn trace_url(node: &str, from: &str, to: &str, protocol: Protocol, backend: Backend) -> String {
    format!(
        "/api/v1/trace?node={}&from={}&to={}&protocol={}&backend={}",
        encode(node),
        encode(from),
        encode(to),
        protocol.as_str().to_ascii_lowercase(),
        backend.as_str()
    )
}

/// Percent-encodes a query value (IPv6 brackets and colons included).
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::demo;

    /// Every kind of target is offered for the demo cluster, and every pairing the composer offers
    /// by default traces without an error.
    #[test]
    fn demo_targets_cover_every_kind_and_trace() {
        let c = demo::cluster();
        let t = targets(&c);
        let has = |g: &str, v: &str| t.iter().any(|x| x.group == g && x.value == v);
        assert!(has("ClusterIP", "10.96.0.10:80"));
        assert!(has("NodePort", "192.168.1.13:30080"));
        assert!(has("LoadBalancer", "34.101.12.7:80"));
        assert!(has("DNS name", "my-db.default.svc.cluster.local:5432"));
        let s = sources(&c);
        assert!(s.iter().any(|x| x.group == "Pods" && x.node.is_some()));
        assert!(s.iter().any(|x| x.group == "Nodes"));
        let outside = s.iter().find(|x| x.group == "Outside").expect("outside");
        for target in &t {
            let node = entry_node(&c, outside, target).expect("a node");
            let req = request(
                &node,
                &outside.value,
                &target.value,
                target.protocol.unwrap_or(Protocol::Tcp),
                Backend::Nftables,
            )
            .expect("parses");
            switchyard_engine::trace(&c, &req).unwrap_or_else(|e| panic!("{}: {e}", target.label));
        }
    }

    #[test]
    fn entry_node_prefers_the_source_then_the_target() {
        let c = demo::cluster();
        let t = targets(&c);
        let np = t.iter().find(|x| x.value == "192.168.1.13:30080").expect("nodeport");
        let s = sources(&c);
        let outside = s.iter().find(|x| x.group == "Outside").expect("outside");
        assert_eq!(entry_node(&c, outside, np).as_deref(), Some("node-3"));
        let pod = s.iter().find(|x| x.node.as_deref() == Some("node-2")).expect("a pod on node-2");
        assert_eq!(entry_node(&c, pod, np).as_deref(), Some("node-2"));
    }

    #[test]
    fn urls_and_commands() {
        assert_eq!(
            trace_url("node-1", "fd00::1", "[fd00::10]:80", Protocol::Tcp, Backend::Ipvs),
            "/api/v1/trace?node=node-1&from=fd00%3A%3A1&to=%5Bfd00%3A%3A10%5D%3A80&protocol=tcp&backend=ipvs"
        );
        assert_eq!(
            cli_command("node-1", "10.0.0.1", "10.96.0.10:80", Protocol::Udp, Backend::Nftables),
            "switchyard trace --node node-1 --from 10.0.0.1 --to 10.96.0.10:80 --protocol udp --backend nftables"
        );
        assert!(request("n", "nope", "10.0.0.1:80", Protocol::Tcp, Backend::Nftables).is_err());
    }
}
