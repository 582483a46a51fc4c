//! kube-proxy's service health checks (`pkg/proxy/healthcheck/service_health.go`): for each
//! LoadBalancer Service with `externalTrafficPolicy: Local`, the API server allocates a
//! `healthCheckNodePort`, and the proxy on every node answers HTTP on it so that the cloud load
//! balancer sends traffic only to nodes that have a ready endpoint of the service.
//!
//! The answer is kube-proxy's: 200 when the node has local ready endpoints and the proxy is
//! healthy, else 503, with the body
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":bool}`. N counts
//! distinct addresses of ready endpoints on this node (terminating ones do not count: the node
//! should be drained). The servers follow the cluster the hub publishes: one opens when such a
//! service appears, closes when it goes or changes port, and the counts follow its endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::{ObjectKey, ServiceType};
use tokio::sync::oneshot;

use crate::stream::Hub;

/// Where the health check servers listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// The node's addresses from its Node object (all addresses when it has none), as
    /// kube-proxy does with `nodePortAddresses` unset.
    NodeAddresses,
    /// These addresses (tests: 127.0.0.1).
    Addresses(Vec<IpAddr>),
}

/// The services that need a health check server on `node`, with their port and local endpoint
/// count.
pub fn wanted(cluster: &Cluster, node: &str) -> BTreeMap<ObjectKey, (u16, usize)> {
    let slices = cluster.slices_by_service();
    cluster
        .services
        .values()
        .filter(|s| s.service_type == ServiceType::LoadBalancer && s.external_traffic_policy_local && s.is_proxied())
        .filter_map(|s| {
            let port = s.health_check_node_port?;
            let local: BTreeSet<IpAddr> = slices
                .get(&s.key)
                .into_iter()
                .flatten()
                .flat_map(|sl| &sl.endpoints)
                .filter(|e| e.ready && e.node_name.as_deref() == Some(node))
                .map(|e| e.address)
                .collect();
            Some((s.key.clone(), (port, local.len())))
        })
        .collect()
}

/// kube-proxy's body, byte for byte in content (it indents with tabs).
pub fn body(service: &ObjectKey, local_endpoints: usize, healthy: bool) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        q(&service.namespace),
        q(&service.name)
    )
}

#[derive(Clone)]
struct Served {
    key: ObjectKey,
    counts: Arc<RwLock<BTreeMap<ObjectKey, usize>>>,
    hub: Hub,
}

async fn answer(State(s): State<Served>) -> Response {
    let count = s.counts.read().ok().and_then(|c| c.get(&s.key).copied()).unwrap_or(0);
    let healthy = s.hub.stats().healthy.load(Ordering::Relaxed);
    let code = if count > 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        [(header::CONTENT_TYPE, "application/json"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        body(&s.key, count, healthy),
    )
        .into_response()
}

/// One open health check: its port and the servers to stop.
struct Open {
    port: u16,
    stops: Vec<oneshot::Sender<()>>,
}

/// Runs the health check servers of `node` until the hub stops, following its cluster.
pub async fn run(hub: Hub, node: String, bind: Bind) {
    let mut changes = hub.cluster_changes();
    let counts: Arc<RwLock<BTreeMap<ObjectKey, usize>>> = Arc::default();
    let mut open: BTreeMap<ObjectKey, Open> = BTreeMap::new();
    // Ports that failed to open, said once each until they open.
    let mut failed: BTreeSet<(ObjectKey, u16)> = BTreeSet::new();
    loop {
        let Ok(cluster) = hub.cluster().await else { return };
        let want = wanted(&cluster, &node);
        if let Ok(mut c) = counts.write() {
            *c = want.iter().map(|(k, (_, n))| (k.clone(), *n)).collect();
        }
        // Gone, or moved to another port: close.
        open.retain(|k, o| {
            let keep = want.get(k).is_some_and(|(p, _)| *p == o.port);
            if !keep {
                for s in o.stops.drain(..) {
                    let _ = s.send(());
                }
            }
            keep
        });
        let addrs = match &bind {
            Bind::Addresses(a) => a.clone(),
            Bind::NodeAddresses => {
                let ips = cluster.nodes.get(&node).map(|n| n.ips()).unwrap_or_default();
                if ips.is_empty() { vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)] } else { ips }
            }
        };
        for (key, (port, _)) in &want {
            if open.contains_key(key) {
                continue;
            }
            let served = Served { key: key.clone(), counts: counts.clone(), hub: hub.clone() };
            match listen(&addrs, *port, served).await {
                Ok(stops) => {
                    failed.remove(&(key.clone(), *port));
                    open.insert(key.clone(), Open { port: *port, stops });
                }
                Err(e) => {
                    // kube-proxy logs and retries at the next sync; so do we, at the next change.
                    if failed.insert((key.clone(), *port)) {
                        eprintln!("switchyard: cannot open the health check of {key} on port {port}: {e}");
                    }
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Listens on `port` on every address; all or none.
async fn listen(addrs: &[IpAddr], port: u16, served: Served) -> std::io::Result<Vec<oneshot::Sender<()>>> {
    let mut listeners = Vec::new();
    for ip in addrs {
        listeners.push(tokio::net::TcpListener::bind(SocketAddr::new(*ip, port)).await?);
    }
    let mut stops = Vec::new();
    for l in listeners {
        let (stop, stopped) = oneshot::channel::<()>();
        let app = Router::new().fallback(answer).with_state(served.clone());
        tokio::spawn(async move {
            let _ = axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        stops.push(stop);
    }
    Ok(stops)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only LoadBalancer services with externalTrafficPolicy Local and a port; the count is of
    /// distinct ready endpoint addresses on this node.
    #[test]
    fn wanted_services_and_counts() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30100}, {name: https, port: 443, targetPort: 8443, nodePort: 30101}]
---
apiVersion: v1
kind: Service
metadata: {name: cluster, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.21
  healthCheckNodePort: 32101
  ports: [{port: 80, nodePort: 30102}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: default, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
endpoints:
- {addresses: [10.244.1.5], conditions: {ready: true}, nodeName: n1}
- {addresses: [10.244.1.6], conditions: {ready: false, serving: true, terminating: true}, nodeName: n1}
- {addresses: [10.244.2.5], conditions: {ready: true}, nodeName: n2}
"#;
        let parsed = switchyard_engine::input::parse("t.yaml", yaml).expect("parses");
        let c = Cluster::from_objects(parsed.objects);
        let key = ObjectKey::new("default", "lb");
        assert_eq!(wanted(&c, "n1"), BTreeMap::from([(key.clone(), (32100, 1))]));
        assert_eq!(wanted(&c, "n2")[&key], (32100, 1));
        assert_eq!(wanted(&c, "n3")[&key], (32100, 0));
    }

    /// The body parses as kube-proxy's JSON, and names are escaped as JSON strings.
    #[test]
    fn body_is_kube_proxys() {
        let b = body(&ObjectKey::new("default", "web"), 2, true);
        let v: serde_json::Value = serde_json::from_str(&b).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        let b = body(&ObjectKey::new("a\"b", "<x>"), 0, false);
        let v: serde_json::Value = serde_json::from_str(&b).expect("json");
        assert_eq!(v["service"]["namespace"], "a\"b");
    }
}
