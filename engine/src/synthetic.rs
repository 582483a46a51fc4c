//! Synthetic clusters at scale, for benchmarks and property tests: `n` services with `e`
//! endpoints each spread over three nodes, a deterministic mix of service types and policies.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::cluster::Cluster;
use crate::model::*;

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// The three nodes (`node-a`, `node-b`, `node-c`) with pod CIDRs 10.1.0.0/16, 10.2.0.0/16, 10.3.0.0/16.
pub fn nodes() -> Vec<Node> {
    (1..=3u8)
        .map(|i| Node {
            name: format!("node-{}", (b'a' + i - 1) as char),
            addresses: vec![NodeAddress { kind: "InternalIP".into(), address: format!("192.168.0.{i}") }],
            pod_cidrs: vec![format!("10.{i}.0.0/16").parse().expect("valid CIDR")],
            labels: BTreeMap::from([("topology.kubernetes.io/zone".to_string(), format!("zone-{i}"))]),
        })
        .collect()
}

/// One service's knobs; `i` picks a deterministic variety.
pub fn service(i: u32) -> Service {
    let ip = v4(172, 30 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
    let service_type = match i % 4 {
        0 | 1 => ServiceType::ClusterIP,
        2 => ServiceType::NodePort,
        _ => ServiceType::LoadBalancer,
    };
    Service {
        key: ObjectKey::new(format!("ns{}", i % 50), format!("svc{i}")),
        service_type,
        cluster_ips: vec![ip],
        headless: false,
        external_name: None,
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: if i.is_multiple_of(7) { Protocol::Udp } else { Protocol::Tcp },
            port: 80,
            target_port: TargetPort::Number(8080),
            // Unique NodePorts (a cluster this size uses a wider --service-node-port-range).
            node_port: (service_type != ServiceType::ClusterIP).then_some(20000 + (i % 45000) as u16),
        }],
        external_ips: Vec::new(),
        load_balancer_ingress: if service_type == ServiceType::LoadBalancer {
            vec![LoadBalancerIngress {
                ip: Some(v4(34, (i >> 16) as u8, (i >> 8) as u8, i as u8)),
                hostname: None,
                ip_mode_proxy: false,
            }]
        } else {
            Vec::new()
        },
        load_balancer_source_ranges: Vec::new(),
        external_traffic_policy_local: i % 8 == 3,
        internal_traffic_policy_local: false,
        health_check_node_port: None,
        session_affinity_timeout: None,
        traffic_distribution: None,
        selector: BTreeMap::new(),
        labels: BTreeMap::new(),
    }
}

/// The endpoints of service `i`; `generation` shifts them, to model churn.
pub fn slice(i: u32, endpoints: u32, generation: u32) -> EndpointSlice {
    let names = ["node-a", "node-b", "node-c"];
    EndpointSlice {
        key: ObjectKey::new(format!("ns{}", i % 50), format!("svc{i}-x")),
        service: format!("svc{i}"),
        address_type: AddressType::IPv4,
        endpoints: (0..endpoints)
            .map(|e| {
                let n = ((i + e + generation) % 3) as u8;
                let host = i * endpoints + e + generation;
                Endpoint {
                    address: v4(10, n + 1, (host >> 8) as u8, host as u8),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some(names[n as usize].into()),
                    zone: None,
                    hints_for_zones: Vec::new(),
                    hints_for_nodes: Vec::new(),
                    target: None,
                }
            })
            .collect(),
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: if i.is_multiple_of(7) { Protocol::Udp } else { Protocol::Tcp },
            port: 8080,
        }],
        from_legacy_endpoints: false,
    }
}

/// `services` services with `endpoints` endpoints each.
pub fn cluster(services: u32, endpoints: u32) -> Cluster {
    let mut c = Cluster::default();
    for n in nodes() {
        c.nodes.insert(n.name.clone(), n);
    }
    c.config.cluster_cidrs = vec!["10.0.0.0/8".parse().expect("valid CIDR")];
    c.service_cidrs.insert(
        "kubernetes".into(),
        ServiceCidr { name: "kubernetes".into(), cidrs: vec!["172.16.0.0/12".parse().expect("valid CIDR")] },
    );
    for i in 0..services {
        let s = service(i);
        c.services.insert(s.key.clone(), s);
        let sl = slice(i, endpoints, 0);
        c.endpoint_slices.insert(sl.key.clone(), sl);
    }
    c
}
