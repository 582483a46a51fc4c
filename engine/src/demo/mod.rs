//! The built-in demo cluster: the textbook example people learn Service routing from, in the engine
//! so the CLI (`--demo`) and the browser (no server) show the same thing.
//!
//! Three nodes, `default/nginx-svc` (ClusterIP 10.96.0.10:80 → 8080, NodePort 30080, LoadBalancer
//! 34.101.12.7) with pods on `node-1` and `node-2` only, so NodePort traffic to `node-3` must cross
//! nodes; `default/my-db`, an ExternalName that is only a DNS CNAME; `default/echo`, whose single pod
//! calls its own Service (hairpin); and one Service per traffic policy worth seeing. The cluster is
//! written as Kubernetes YAML and read through [`crate::input::parse`], the path user input takes.

pub mod scenario;

use std::net::{IpAddr, Ipv4Addr};

use crate::cluster::Cluster;
use crate::input::{self, Problem};
use crate::model::Protocol;

/// The file name parse errors would name.
pub const FILE_NAME: &str = "demo-cluster.yaml";

/// The demo cluster as `kubectl get -o yaml` would print it, one object per document.
pub const CLUSTER_YAML: &str = r#"# Switchyard's built-in demo cluster.
# Three nodes; a textbook LoadBalancer Service (nginx-svc) with pods on node-1 and node-2 only;
# an ExternalName service; a hairpin case; one service per traffic policy.
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels:
    kubernetes.io/hostname: node-1
    topology.kubernetes.io/zone: zone-a
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: [10.244.1.0/24]
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.11}
  - {type: Hostname, address: node-1}
---
apiVersion: v1
kind: Node
metadata:
  name: node-2
  labels:
    kubernetes.io/hostname: node-2
    topology.kubernetes.io/zone: zone-b
spec:
  podCIDR: 10.244.2.0/24
  podCIDRs: [10.244.2.0/24]
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.12}
  - {type: Hostname, address: node-2}
---
# node-3 runs no nginx pod: NodePort and LoadBalancer traffic that lands here crosses nodes.
apiVersion: v1
kind: Node
metadata:
  name: node-3
  labels:
    kubernetes.io/hostname: node-3
    topology.kubernetes.io/zone: zone-c
spec:
  podCIDR: 10.244.3.0/24
  podCIDRs: [10.244.3.0/24]
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.13}
  - {type: Hostname, address: node-3}
---
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16
detectLocalMode: ClusterCIDR
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata:
  name: kubernetes
spec:
  cidrs: [10.96.0.0/12]
---
# The API server, as in every cluster: a ClusterIP whose endpoint is a node address.
apiVersion: v1
kind: Service
metadata:
  name: kubernetes
  namespace: default
  labels: {component: apiserver, provider: kubernetes}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.1
  clusterIPs: [10.96.0.1]
  ports:
  - {name: https, protocol: TCP, port: 443, targetPort: 6443}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes}
addressType: IPv4
endpoints:
- addresses: [192.168.1.11]
  conditions: {ready: true, serving: true, terminating: false}
ports:
- {name: https, protocol: TCP, port: 6443}
---
# The textbook Service: one port, reachable by ClusterIP, NodePort and a cloud load balancer.
apiVersion: v1
kind: Service
metadata:
  name: nginx-svc
  namespace: default
  labels: {app: nginx}
spec:
  type: LoadBalancer
  selector: {app: nginx}
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  ports:
  - name: http
    protocol: TCP
    port: 80
    targetPort: 8080
    nodePort: 30080
  externalTrafficPolicy: Cluster
  internalTrafficPolicy: Cluster
  sessionAffinity: None
status:
  loadBalancer:
    ingress:
    - {ip: 34.101.12.7, ipMode: VIP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: nginx-svc-7x2kq
  namespace: default
  labels:
    kubernetes.io/service-name: nginx-svc
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
endpoints:
- addresses: [10.244.1.10]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: zone-a
  targetRef: {kind: Pod, namespace: default, name: nginx-7d4b9c-abcde}
- addresses: [10.244.2.15]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-2
  zone: zone-b
  targetRef: {kind: Pod, namespace: default, name: nginx-7d4b9c-fghij}
ports:
- {name: http, protocol: TCP, port: 8080}
---
# ExternalName: cluster DNS answers with a CNAME; no cluster IP, no proxy rules.
apiVersion: v1
kind: Service
metadata:
  name: my-db
  namespace: default
spec:
  type: ExternalName
  externalName: db.example.com
  ports:
  - {name: postgres, protocol: TCP, port: 5432}
---
# Hairpin: echo's only pod calls its own Service and is load-balanced back to itself, so the
# proxy masquerades the source to make the reply come back through the node.
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 5678}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-q8w2n
  namespace: default
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
endpoints:
- addresses: [10.244.3.20]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-3
  zone: zone-c
  targetRef: {kind: Pod, namespace: default, name: echo-5f6d8-xk2lp}
ports:
- {name: http, protocol: TCP, port: 5678}
---
# sessionAffinity ClientIP: a client keeps its endpoint for 10 minutes.
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: default
spec:
  selector: {app: cart}
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30]
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080}
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP: {timeoutSeconds: 600}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: cart-m4k9d
  namespace: default
  labels: {kubernetes.io/service-name: cart}
addressType: IPv4
endpoints:
- addresses: [10.244.2.40]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-2
  zone: zone-b
  targetRef: {kind: Pod, namespace: default, name: cart-6d9f8-tq7vx}
- addresses: [10.244.3.40]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-3
  zone: zone-c
  targetRef: {kind: Pod, namespace: default, name: cart-6d9f8-zr2hs}
ports:
- {name: http, protocol: TCP, port: 8080}
---
# No endpoints (its Deployment is scaled to zero): connections are rejected, not left to time out.
apiVersion: v1
kind: Service
metadata:
  name: legacy-api
  namespace: default
spec:
  selector: {app: legacy-api}
  clusterIP: 10.96.0.40
  clusterIPs: [10.96.0.40]
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-api-b7c2x
  namespace: default
  labels: {kubernetes.io/service-name: legacy-api}
addressType: IPv4
endpoints: []
ports:
- {name: http, protocol: TCP, port: 8080}
---
# externalTrafficPolicy Local: external traffic stays on the node it reaches and keeps its source
# IP; nodes without a local endpoint drop it, and the load balancer learns which nodes to use from
# healthCheckNodePort.
apiVersion: v1
kind: Service
metadata:
  name: ingress
  namespace: default
spec:
  type: LoadBalancer
  selector: {app: ingress-nginx}
  clusterIP: 10.96.0.80
  clusterIPs: [10.96.0.80]
  ports:
  - {name: https, protocol: TCP, port: 443, targetPort: 8443, nodePort: 30443}
  externalTrafficPolicy: Local
  healthCheckNodePort: 32080
status:
  loadBalancer:
    ingress:
    - {ip: 34.101.12.8, ipMode: VIP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ingress-h5d8p
  namespace: default
  labels: {kubernetes.io/service-name: ingress}
addressType: IPv4
endpoints:
- addresses: [10.244.1.30]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: zone-a
  targetRef: {kind: Pod, namespace: default, name: ingress-nginx-controller-6b9d4-qwert}
ports:
- {name: https, protocol: TCP, port: 8443}
---
# loadBalancerSourceRanges: only the office network may use this load balancer.
apiVersion: v1
kind: Service
metadata:
  name: admin-dashboard
  namespace: default
spec:
  type: LoadBalancer
  selector: {app: admin-dashboard}
  clusterIP: 10.96.0.90
  clusterIPs: [10.96.0.90]
  ports:
  - {name: https, protocol: TCP, port: 443, targetPort: 3000, nodePort: 30090}
  loadBalancerSourceRanges: [203.0.113.0/24]
status:
  loadBalancer:
    ingress:
    - {ip: 34.101.12.9, ipMode: VIP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: admin-dashboard-x9f3t
  namespace: default
  labels: {kubernetes.io/service-name: admin-dashboard}
addressType: IPv4
endpoints:
- addresses: [10.244.2.50]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-2
  zone: zone-b
  targetRef: {kind: Pod, namespace: default, name: admin-dashboard-5c8f7-m2n4b}
ports:
- {name: https, protocol: TCP, port: 3000}
---
# Cluster DNS over UDP and TCP, with named targetPorts resolved through the EndpointSlice.
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  selector: {k8s-app: kube-dns}
  clusterIP: 10.96.0.53
  clusterIPs: [10.96.0.53]
  ports:
  - {name: dns, protocol: UDP, port: 53, targetPort: dns}
  - {name: dns-tcp, protocol: TCP, port: 53, targetPort: dns-tcp}
  - {name: metrics, protocol: TCP, port: 9153, targetPort: metrics}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-s6l2c
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
endpoints:
- addresses: [10.244.1.2]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: zone-a
  targetRef: {kind: Pod, namespace: kube-system, name: coredns-76f75df574-2xhkq}
- addresses: [10.244.3.2]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-3
  zone: zone-c
  targetRef: {kind: Pod, namespace: kube-system, name: coredns-76f75df574-9zqmv}
ports:
- {name: dns, protocol: UDP, port: 53}
- {name: dns-tcp, protocol: TCP, port: 53}
- {name: metrics, protocol: TCP, port: 9153}
---
# internalTrafficPolicy Local: pods only reach the cache on their own node. The DaemonSet has not
# reached node-3 yet, so there the traffic is dropped rather than sent to another node.
apiVersion: v1
kind: Service
metadata:
  name: node-local-dns
  namespace: kube-system
spec:
  selector: {k8s-app: node-local-dns}
  clusterIP: 10.96.0.54
  clusterIPs: [10.96.0.54]
  internalTrafficPolicy: Local
  ports:
  - {name: dns, protocol: UDP, port: 53, targetPort: 53}
  - {name: dns-tcp, protocol: TCP, port: 53, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: node-local-dns-v7r4k
  namespace: kube-system
  labels: {kubernetes.io/service-name: node-local-dns}
addressType: IPv4
endpoints:
- addresses: [10.244.1.3]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: zone-a
  targetRef: {kind: Pod, namespace: kube-system, name: node-local-dns-8kq2w}
- addresses: [10.244.2.3]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-2
  zone: zone-b
  targetRef: {kind: Pod, namespace: kube-system, name: node-local-dns-p4m7z}
ports:
- {name: dns, protocol: UDP, port: 53}
- {name: dns-tcp, protocol: TCP, port: 53}
"#;

/// Parses [`CLUSTER_YAML`] through the same path as user input.
pub fn try_cluster() -> Result<Cluster, Vec<Problem>> {
    let parsed = input::parse(FILE_NAME, CLUSTER_YAML)?;
    Ok(Cluster::from_objects(parsed.objects))
}

/// The demo cluster.
pub fn cluster() -> Cluster {
    // The YAML is a constant and `demo_parses` checks it, so this cannot fail at run time.
    try_cluster().expect("the built-in demo cluster parses (checked by demo::tests)")
}

/// A pod on `node-1` that is not behind any Service: the usual client.
pub const CLIENT_POD_NODE_1: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 50));
/// A client pod on `node-2`.
pub const CLIENT_POD_NODE_2: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 2, 60));
/// A client pod on `node-3`, the node without an nginx pod.
pub const CLIENT_POD_NODE_3: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 3, 50));
/// A client somewhere on the internet.
pub const INTERNET_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 23));
/// A client inside `admin-dashboard`'s `loadBalancerSourceRanges` (203.0.113.0/24).
pub const OFFICE_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
/// A cloud load balancer's health checker.
pub const HEALTH_CHECKER: IpAddr = IpAddr::V4(Ipv4Addr::new(35, 191, 10, 1));

/// One textbook flow: `(title, node the packet enters, source, destination, protocol)`.
/// The destination is written as `switchyard trace --to` takes it: `IP:PORT` or `name:PORT`.
pub type SamplePacket = (&'static str, &'static str, IpAddr, &'static str, Protocol);

/// The textbook flows through the demo cluster, for the CLI demo and the dashboard's composer.
pub fn sample_packets() -> Vec<SamplePacket> {
    use Protocol::{Tcp, Udp};
    let (pod1, pod2, pod3) = (CLIENT_POD_NODE_1, CLIENT_POD_NODE_2, CLIENT_POD_NODE_3);
    let node2: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 12));
    let echo_pod: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 3, 20));
    vec![
        ("ClusterIP: a pod on node-1 calls nginx-svc (same node or across)", "node-1", pod1, "10.96.0.10:80", Tcp),
        ("ClusterIP across nodes: a pod on node-3 calls nginx-svc", "node-3", pod3, "10.96.0.10:80", Tcp),
        ("By DNS name: a pod on node-2 calls nginx-svc", "node-2", pod2, "nginx-svc.default.svc.cluster.local:80", Tcp),
        ("From the node itself: node-2 calls nginx-svc", "node-2", node2, "10.96.0.10:80", Tcp),
        (
            "NodePort from outside to node-3, which has no nginx pod",
            "node-3",
            INTERNET_CLIENT,
            "192.168.1.13:30080",
            Tcp,
        ),
        (
            "LoadBalancer: a client on the internet through 34.101.12.7",
            "node-1",
            INTERNET_CLIENT,
            "34.101.12.7:80",
            Tcp,
        ),
        ("Hairpin: echo's pod calls its own Service", "node-3", echo_pod, "10.96.0.20:80", Tcp),
        ("ExternalName: my-db is only a DNS CNAME", "node-1", pod1, "my-db.default.svc.cluster.local:5432", Tcp),
        ("DNS over UDP: a pod on node-2 asks kube-dns", "node-2", pod2, "10.96.0.53:53", Udp),
        ("sessionAffinity ClientIP: a pod on node-1 calls cart", "node-1", pod1, "10.96.0.30:80", Tcp),
        ("No endpoints: legacy-api rejects the connection", "node-1", pod1, "10.96.0.40:80", Tcp),
        ("Unknown port of a cluster IP is rejected", "node-1", pod1, "10.96.0.10:443", Tcp),
        ("internalTrafficPolicy Local: node-local-dns on node-1", "node-1", pod1, "10.96.0.54:53", Udp),
        ("internalTrafficPolicy Local: no node-local-dns pod on node-3, dropped", "node-3", pod3, "10.96.0.54:53", Udp),
        (
            "externalTrafficPolicy Local: ingress on node-1 keeps the client IP",
            "node-1",
            INTERNET_CLIENT,
            "34.101.12.8:443",
            Tcp,
        ),
        (
            "externalTrafficPolicy Local: node-2 has no ingress pod, dropped",
            "node-2",
            INTERNET_CLIENT,
            "34.101.12.8:443",
            Tcp,
        ),
        ("healthCheckNodePort: the load balancer asks node-2", "node-2", HEALTH_CHECKER, "192.168.1.12:32080", Tcp),
        (
            "loadBalancerSourceRanges: the office may reach admin-dashboard",
            "node-2",
            OFFICE_CLIENT,
            "34.101.12.9:443",
            Tcp,
        ),
        ("loadBalancerSourceRanges: anyone else is dropped", "node-2", INTERNET_CLIENT, "34.101.12.9:443", Tcp),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly; `unwrap` is the point
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{ObjectKey, ServiceType, TargetPort};
    use crate::policy::{self, Backend, FilterVerdict, NodePlan, ServicePortPlan};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn port_plan<'p>(plan: &'p NodePlan, ns: &str, name: &str, port: &str) -> &'p ServicePortPlan {
        plan.families[0]
            .services
            .iter()
            .find(|s| s.name.service == ObjectKey::new(ns, name) && s.name.port == port)
            .unwrap_or_else(|| panic!("{ns}/{name}:{port} is not planned on {}", plan.node))
    }

    fn ips(eps: Option<&[policy::PlannedEndpoint]>) -> Vec<String> {
        eps.unwrap_or(&[]).iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()
    }

    /// The demo is plain Kubernetes YAML: it parses without problems, warnings or skipped kinds.
    #[test]
    fn demo_parses() {
        let parsed = input::parse(FILE_NAME, CLUSTER_YAML).unwrap();
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        assert!(parsed.skipped_kinds.is_empty(), "{:?}", parsed.skipped_kinds);
        let c = cluster();
        assert_eq!(c.nodes.keys().collect::<Vec<_>>(), ["node-1", "node-2", "node-3"]);
        assert_eq!(c.services.len(), 10);
        assert_eq!(c.config.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
        assert_eq!(c.service_cidrs["kubernetes"].cidrs, vec!["10.96.0.0/12".parse().unwrap()]);
    }

    /// The facts the contract promises about `--demo`.
    #[test]
    fn contract_facts() {
        let c = cluster();
        let nginx = &c.services[&ObjectKey::new("default", "nginx-svc")];
        assert_eq!(nginx.service_type, ServiceType::LoadBalancer);
        assert_eq!(nginx.cluster_ips, vec![ip("10.96.0.10")]);
        assert_eq!(nginx.ports.len(), 1);
        assert_eq!(nginx.ports[0].name, "http");
        assert_eq!(nginx.ports[0].port, 80);
        assert_eq!(nginx.ports[0].target_port, TargetPort::Number(8080));
        assert_eq!(nginx.ports[0].node_port, Some(30080));
        assert_eq!(nginx.load_balancer_ips().collect::<Vec<_>>(), vec![ip("34.101.12.7")]);
        assert_eq!(nginx.selector.get("app").map(String::as_str), Some("nginx"));

        let db = &c.services[&ObjectKey::new("default", "my-db")];
        assert_eq!(db.service_type, ServiceType::ExternalName);
        assert_eq!(db.external_name.as_deref(), Some("db.example.com"));
        assert!(!db.is_proxied());

        let pods: Vec<_> =
            c.endpoint_slices.values().filter(|s| s.service == "nginx-svc").flat_map(|s| &s.endpoints).collect();
        let got: Vec<_> = pods.iter().map(|e| (e.address, e.node_name.as_deref(), e.target.as_deref())).collect();
        assert_eq!(
            got,
            [
                (ip("10.244.1.10"), Some("node-1"), Some("nginx-7d4b9c-abcde")),
                (ip("10.244.2.15"), Some("node-2"), Some("nginx-7d4b9c-fghij")),
            ]
        );
        for (name, addr, cidr) in [
            ("node-1", "192.168.1.11", "10.244.1.0/24"),
            ("node-2", "192.168.1.12", "10.244.2.0/24"),
            ("node-3", "192.168.1.13", "10.244.3.0/24"),
        ] {
            let n = &c.nodes[name];
            assert_eq!(n.primary_ip(crate::model::IpFamily::V4), Some(ip(addr)));
            assert_eq!(n.pod_cidrs, vec![cidr.parse().unwrap()]);
            assert!(n.zone().is_some());
        }
    }

    /// Every node's plan has nginx-svc on its ClusterIP, NodePort and LB IP, to both pods.
    #[test]
    fn nginx_plan_on_every_node() {
        let c = cluster();
        for node in ["node-1", "node-2", "node-3"] {
            for backend in [Backend::Nftables, Backend::Iptables] {
                let plan = policy::plan(&c, node, backend);
                assert_eq!(plan.families.len(), 1, "IPv4 only");
                let p = port_plan(&plan, "default", "nginx-svc", "http");
                assert_eq!((p.cluster_ip, p.port, p.node_port), (ip("10.96.0.10"), 80, Some(30080)));
                assert_eq!(p.load_balancer_ips, vec![ip("34.101.12.7")]);
                assert_eq!(ips(p.internal_endpoints()), ["10.244.1.10:8080", "10.244.2.15:8080"]);
                assert_eq!(ips(p.external_endpoints()), ["10.244.1.10:8080", "10.244.2.15:8080"]);
                let local: Vec<bool> = p.cluster_endpoints.iter().map(|e| e.local).collect();
                let expect = match node {
                    "node-1" => [true, false],
                    "node-2" => [false, true],
                    _ => [false, false],
                };
                assert_eq!(local, expect, "{node}");
            }
        }
    }

    /// The policy services behave per node as their comments in the YAML say.
    #[test]
    fn traffic_policies_per_node() {
        let c = cluster();
        let plans: Vec<NodePlan> =
            ["node-1", "node-2", "node-3"].iter().map(|n| policy::plan(&c, n, Backend::Nftables)).collect();
        let [n1, n2, n3] = [&plans[0], &plans[1], &plans[2]];

        // externalTrafficPolicy Local: only node-1 has the ingress pod.
        let ing1 = port_plan(n1, "default", "ingress", "https");
        assert_eq!(ips(ing1.external_endpoints()), ["10.244.1.30:8443"]);
        assert_eq!(ing1.health_check_node_port, Some(32080));
        for other in [n2, n3] {
            let p = port_plan(other, "default", "ingress", "https");
            assert_eq!(p.external_filter(), Some(FilterVerdict::Drop));
            // Pods and the node itself still reach it through the cluster endpoints.
            assert_eq!(ips(p.internal_endpoints()), ["10.244.1.30:8443"]);
        }

        // internalTrafficPolicy Local: node-local-dns on node-1 and node-2, dropped on node-3.
        assert_eq!(ips(port_plan(n1, "kube-system", "node-local-dns", "dns").internal_endpoints()), ["10.244.1.3:53"]);
        assert_eq!(ips(port_plan(n2, "kube-system", "node-local-dns", "dns").internal_endpoints()), ["10.244.2.3:53"]);
        assert_eq!(port_plan(n3, "kube-system", "node-local-dns", "dns").internal_filter(), Some(FilterVerdict::Drop));

        for plan in &plans {
            // kube-dns: named targetPorts resolved per protocol.
            let dns = port_plan(plan, "kube-system", "kube-dns", "dns");
            assert_eq!(dns.protocol, Protocol::Udp);
            assert_eq!(ips(dns.internal_endpoints()), ["10.244.1.2:53", "10.244.3.2:53"]);
            let metrics = port_plan(plan, "kube-system", "kube-dns", "metrics");
            assert_eq!(ips(metrics.internal_endpoints()), ["10.244.1.2:9153", "10.244.3.2:9153"]);
            // No endpoints: reject.
            assert_eq!(port_plan(plan, "default", "legacy-api", "http").internal_filter(), Some(FilterVerdict::Reject));
            // Session affinity.
            let cart = port_plan(plan, "default", "cart", "http");
            assert_eq!(cart.affinity_timeout, Some(600));
            assert_eq!(ips(cart.internal_endpoints()), ["10.244.2.40:8080", "10.244.3.40:8080"]);
            // Source ranges on one load balancer only.
            let admin = port_plan(plan, "default", "admin-dashboard", "https");
            assert_eq!(admin.source_ranges, vec!["203.0.113.0/24".parse().unwrap()]);
            assert!(port_plan(plan, "default", "nginx-svc", "http").source_ranges.is_empty());
            // The hairpin service has exactly one endpoint.
            assert_eq!(ips(port_plan(plan, "default", "echo", "http").internal_endpoints()), ["10.244.3.20:5678"]);
            // ExternalName is never programmed.
            assert!(plan.families[0].services.iter().all(|s| s.name.service.name != "my-db"));
        }
    }

    /// Both backends write a program for every demo node.
    #[test]
    fn every_node_renders() {
        let c = cluster();
        for node in ["node-1", "node-2", "node-3"] {
            for backend in [Backend::Nftables, Backend::Iptables] {
                let program = crate::render(&c, node, backend).unwrap();
                assert!(program.contains("10.96.0.10"), "{node} {backend:?}");
            }
        }
    }

    /// Every sample flow names a real node, a destination `--to` accepts, and a name DNS resolves.
    #[test]
    fn sample_packets_are_well_formed() {
        let c = cluster();
        let samples = sample_packets();
        let titles: BTreeSet<_> = samples.iter().map(|s| s.0).collect();
        assert_eq!(titles.len(), samples.len(), "titles are unique");
        for (title, node, from, to, _) in &samples {
            assert!(c.nodes.contains_key(*node), "{title}: {node}");
            match to.parse::<crate::Destination>().unwrap() {
                crate::Destination::Addr(a) => {
                    assert_eq!(a.ip.is_ipv4(), from.is_ipv4(), "{title}")
                }
                crate::Destination::Name { name, .. } => {
                    assert!(crate::dns::resolve(&c, &name).is_some(), "{title}: {name}")
                }
            }
        }
        let hairpin = samples.iter().find(|s| s.0.starts_with("Hairpin")).unwrap();
        let echo = c.endpoint_slices.values().find(|s| s.service == "echo").unwrap();
        assert_eq!(echo.endpoints[0].address, hairpin.2, "the hairpin client is echo's own pod");
        assert!(samples.iter().any(|s| s.3 == "my-db.default.svc.cluster.local:5432"));
        assert!(samples.iter().any(|s| s.1 == "node-3" && s.3 == "192.168.1.13:30080"));
        assert!(samples.iter().any(|s| s.3 == "34.101.12.7:80"));
    }
}
