//! The Kubernetes source against a wire-format API server on 127.0.0.1 (`support::apiserver`):
//! a whole life cycle (list, adds, updates, deletes, a bookmark, a dropped connection, an
//! outage, `410 Gone` re-lists, an unreadable object), with the node's nftables program checked
//! after each step, and the changes the source reports checked against a full comparison.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::apiserver::ApiServer;
use switchyard_agent::kube::{self, Connect, KubeSource, SourceEvent, Update};
use switchyard_agent::sync::{Backoff, Changes};
use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::{ObjectKey, ProxyConfig};
use switchyard_engine::policy::{self, Backend};
use switchyard_engine::render::nftables;

const NODE: &str = "node-a";

fn service(name: &str, ip: &str, port: u16, target: u16, labels: Value) -> Value {
    json!({
        "metadata": {
            "name": name, "namespace": "shop", "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                               "apiVersion": "v1", "time": "2026-11-26T09:00:00Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:spec": {"f:ports": {}}}}]
        },
        "spec": {
            "clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": target}]
        },
        "status": {"loadBalancer": {}}
    })
}

/// An EndpointSlice as the EndpointSlice controller writes it; `endpoints` are (ip, node, ready).
fn slice(name: &str, svc: &str, endpoints: &[(&str, &str, bool)], port: u16, extra_labels: Value) -> Value {
    let mut labels = json!({
        "kubernetes.io/service-name": svc,
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        "app": svc
    });
    if let (Some(l), Value::Object(extra)) = (labels.as_object_mut(), extra_labels) {
        l.extend(extra);
    }
    let eps: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (ip, node, ready))| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": node, "zone": "zone-a",
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("{svc}-7d4b9c-{i}"),
                              "uid": format!("0f6c1a7e-3b1d-4c55-8e2a-00000000000{i}")}
            })
        })
        .collect();
    json!({
        "metadata": {
            "name": name, "namespace": "shop", "generateName": format!("{svc}-"), "generation": 1,
            "labels": labels,
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-26T09:00:00Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc,
                                 "uid": "9d0d3a57-1111-4c0e-8d3c-3f4b5a6b7c8d",
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "protocol": "TCP", "port": port}]
    })
}

fn node(name: &str, ip: &str, cidr: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                               "topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": "2026-11-26T09:00:00Z", "lastTransitionTime": "2026-11-26T09:00:00Z"}],
            "nodeInfo": {"kubeletVersion": "v1.33.1", "containerRuntimeVersion": "containerd://2.0.0",
                         "kernelVersion": "6.1.0", "osImage": "Debian GNU/Linux 12", "architecture": "amd64",
                         "operatingSystem": "linux", "machineID": "m", "systemUUID": "s", "bootID": "b"}
        }
    })
}

/// The endpoints a service port's nftables rules lead to on NODE (`ip . port`), read from the
/// rendered program's map elements.
fn backends(program: &str, port_name: &str) -> BTreeSet<String> {
    let tag = format!("comment \"{port_name} ");
    program
        .lines()
        .filter(|l| l.contains(&tag) && l.contains("\" : "))
        .filter_map(|l| l.split("\" : ").nth(1))
        .map(|r| r.trim_end_matches([',', ' ', '}']).trim().to_string())
        // Map elements that jump to chains (`goto ...`) are not endpoints.
        .filter(|r| r.split(" . ").next().is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_ok()))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The agent's side of the source: every update as the sync loop gets it, with its programs.
struct Follower {
    source: KubeSource,
    cluster: Option<Box<Cluster>>,
    reports: Vec<SourceEvent>,
    updates: usize,
}

impl Follower {
    /// Waits until the cluster the sync loop was given satisfies `ok`; returns its program.
    async fn until(&mut self, what: &str, ok: impl Fn(&Cluster, &str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = &self.cluster {
                let program = switchyard_engine::render(c, NODE, Backend::Nftables).expect("renders");
                if ok(c, &program) {
                    return program;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.source.next()).await;
            match next {
                Err(_) => panic!("timed out waiting for: {what}; last cluster: {:#?}", self.cluster),
                Ok(None) => panic!("the source stopped while waiting for: {what}"),
                Ok(Some(Update::Invalid(e))) => self.reports.push(SourceEvent::Invalid(e)),
                Ok(Some(Update::WatchFailed { kind, message })) => {
                    self.reports.push(SourceEvent::WatchFailed { kind, message })
                }
                Ok(Some(Update::Cluster { cluster, changes })) => {
                    if let Some(old) = &self.cluster {
                        assert_changes_complete(old, &cluster, &changes);
                    }
                    self.updates += 1;
                    self.cluster = Some(cluster);
                }
            }
        }
    }
}

/// The services the source says changed are all the services whose rules changed: a partial
/// sync over them writes what a comparison of every service writes.
fn assert_changes_complete(old: &Cluster, new: &Cluster, changes: &Changes) {
    if changes.all {
        return;
    }
    let (a, b) = (policy::plan(old, NODE, Backend::Nftables), policy::plan(new, NODE, Backend::Nftables));
    let named: BTreeSet<ObjectKey> = changes.services.union(&changes.endpoints).cloned().collect();
    assert_eq!(
        nftables::render_incremental_for(&a, &b, Some(&named)),
        nftables::render_incremental(&a, &b),
        "changes {changes:?} miss a difference"
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sy-kube-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn backoff() -> Backoff {
    Backoff { initial: Duration::from_millis(50), max: Duration::from_millis(400) }
}

/// The cluster an API server holds at the start: two nodes, two services with endpoints, one
/// service for another proxy and a headless service's slice (both filtered by the selector).
fn seed(api: &ApiServer) {
    api.put("nodes", node("node-a", "192.168.10.2", "10.244.1.0/24"));
    api.put("nodes", node("node-b", "192.168.10.3", "10.244.2.0/24"));
    api.put("services", service("web", "10.96.0.10", 80, 8080, json!({"app": "web"})));
    api.put("endpointslices", slice("web-abc12", "web", &[("10.244.1.5", "node-a", true)], 8080, json!({})));
    api.put("services", service("api", "10.96.0.11", 8080, 9000, json!({"app": "api"})));
    api.put("endpointslices", slice("api-x7k2p", "api", &[("10.244.2.9", "node-b", true)], 9000, json!({})));
    let other = json!({"service.kubernetes.io/service-proxy-name": "other-proxy"});
    api.put("services", service("elsewhere", "10.96.0.12", 80, 80, other.clone()));
    api.put("endpointslices", slice("elsewhere-1", "elsewhere", &[("10.244.1.77", "node-a", true)], 80, other));
    let headless = json!({"service.kubernetes.io/headless": ""});
    api.put("endpointslices", slice("db-0", "db", &[("10.244.1.88", "node-a", true)], 5432, headless));
}

/// A whole life cycle; the program follows every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn life_cycle_through_the_wire_format() {
    let api = ApiServer::start().await;
    seed(&api);
    let dir = TempDir::new("life");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let client = kube::client(&Connect::Kubeconfig(kubeconfig)).await.expect("client");
    let mut f = Follower {
        source: KubeSource::start(client, ProxyConfig::default(), backoff()),
        cluster: None,
        reports: Vec::new(),
        updates: 0,
    };

    // 1. The initial list: one cluster, once every kind is listed; filtered as kube-proxy filters.
    let p = f.until("the initial list", |c, _| !c.services.is_empty()).await;
    let c = f.cluster.clone().expect("a cluster");
    assert_eq!(f.updates, 1, "the first sync waits for every kind");
    assert_eq!(c.nodes.keys().collect::<Vec<_>>(), ["node-a", "node-b"]);
    let names: Vec<&str> = c.services.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["api", "web"], "the other proxy's service is not listed");
    assert_eq!(c.endpoint_slices.len(), 2, "neither the other proxy's nor the headless slice");
    assert_eq!(backends(&p, "shop/web:http"), set(&["10.244.1.5 . 8080"]));
    assert_eq!(backends(&p, "shop/api:http"), set(&["10.244.2.9 . 9000"]));
    assert!(p.contains("10.96.0.10 comment \"shop/web:http clusterIP\""), "{p}");
    for s in api.seen() {
        let selector = s.query.get("labelSelector").map(String::as_str);
        match s.resource.as_str() {
            "nodes" => assert_eq!(selector, None, "{s:?}"),
            _ => assert_eq!(selector, Some(kube::PROXY_LABEL_SELECTOR), "{s:?}"),
        }
        if s.watch {
            assert_eq!(s.query.get("allowWatchBookmarks").map(String::as_str), Some("true"), "{s:?}");
        }
    }

    // 2. Adds.
    api.put("services", service("cart", "10.96.0.30", 80, 8080, json!({})));
    api.put("endpointslices", slice("cart-1", "cart", &[("10.244.1.40", "node-a", true)], 8080, json!({})));
    f.until("cart added", |_, p| backends(p, "shop/cart:http") == set(&["10.244.1.40 . 8080"])).await;

    // 3. Updates: web scales out and its first pod turns unready; api moves to a new port.
    api.put(
        "endpointslices",
        slice("web-abc12", "web", &[("10.244.1.5", "node-a", false), ("10.244.2.7", "node-b", true)], 8080, json!({})),
    );
    f.until("web's endpoints updated", |_, p| backends(p, "shop/web:http") == set(&["10.244.2.7 . 8080"])).await;
    api.put("services", service("api", "10.96.0.11", 8443, 9000, json!({})));
    f.until("api's port updated", |_, p| p.contains("10.96.0.11 . tcp . 8443")).await;
    // A service handed to another proxy leaves this one's watch (a DELETED event for us).
    api.put(
        "services",
        service("cart", "10.96.0.30", 80, 8080, json!({"service.kubernetes.io/service-proxy-name": "x"})),
    );
    f.until("cart handed to another proxy", |c, p| {
        !c.services.contains_key(&ObjectKey::new("shop", "cart")) && backends(p, "shop/cart:http").is_empty()
    })
    .await;

    // 4. Deletes.
    api.delete("endpointslices", "shop", "api-x7k2p");
    f.until("api's slice deleted", |_, p| backends(p, "shop/api:http").is_empty()).await;
    api.delete("services", "shop", "api");
    f.until("api deleted", |c, p| c.services.len() == 1 && !p.contains("10.96.0.11")).await;

    // 5. A bookmark, then a dropped connection: the watch resumes from the bookmark's version.
    let lists_before = api.lists("services");
    let bookmark = api.bookmark();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let watches_before = api.seen().len();
    api.drop_watches();
    api.put("services", service("late", "10.96.0.40", 80, 8080, json!({})));
    api.put("endpointslices", slice("late-1", "late", &[("10.244.2.50", "node-b", true)], 8080, json!({})));
    f.until("late added after the drop", |_, p| backends(p, "shop/late:http") == set(&["10.244.2.50 . 8080"])).await;
    let resumed: Vec<_> = api.seen().into_iter().skip(watches_before).filter(|s| s.resource == "services").collect();
    assert!(
        resumed.iter().any(|s| s.watch && s.query.get("resourceVersion") == Some(&bookmark.to_string())),
        "the watch resumes at the bookmark ({bookmark}): {resumed:?}"
    );
    assert_eq!(api.lists("services"), lists_before, "a dropped connection is resumed, not re-listed");

    // 6. An outage (connections refused): the failures are reported and retried with a backoff,
    //    nothing is lost, and the watch resumes from where it was.
    api.set_outage(true);
    api.drop_watches();
    api.put("endpointslices", slice("late-1", "late", &[("10.244.2.51", "node-b", true)], 8080, json!({})));
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.set_outage(false);
    f.until("late's endpoint moved", |_, p| backends(p, "shop/late:http") == set(&["10.244.2.51 . 8080"])).await;
    assert_eq!(api.lists("endpointslices"), 1, "an outage with the log intact needs no re-list");
    assert!(
        f.reports.iter().any(|r| matches!(r, SourceEvent::WatchFailed { .. })),
        "the outage is reported: {:?}",
        f.reports
    );

    // 7. 410 Gone after a long disconnection: the deletions it missed are lost events, and the
    //    re-list (one atomic snapshot) removes their objects anyway.
    let relists = api.lists("services");
    api.set_outage(true);
    api.drop_watches();
    api.delete("services", "shop", "late");
    api.delete("endpointslices", "shop", "late-1");
    api.put("services", service("fresh", "10.96.0.50", 80, 8080, json!({})));
    api.put("endpointslices", slice("fresh-1", "fresh", &[("10.244.1.60", "node-a", true)], 8080, json!({})));
    api.expire();
    api.set_outage(false);
    let p = f
        .until("the re-list after 410", |c, p| {
            !c.services.contains_key(&ObjectKey::new("shop", "late"))
                && backends(p, "shop/fresh:http") == set(&["10.244.1.60 . 8080"])
        })
        .await;
    assert!(backends(&p, "shop/late:http").is_empty());
    assert_eq!(backends(&p, "shop/web:http"), set(&["10.244.2.7 . 8080"]), "web survives the re-list");
    assert!(api.lists("services") > relists, "410 forces a re-list");
    assert!(f.reports.iter().any(
        |r| matches!(r, SourceEvent::WatchFailed { message, .. } if message.contains("too old resource version"))
    ));

    // 8. 410 on open watches (the log compacted under them): every kind re-lists, the program stays.
    const ALL: [&str; 3] = ["services", "endpointslices", "nodes"];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ALL.iter().all(|r| api.watching(r)) {
        assert!(Instant::now() < deadline, "the watches did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = ALL.map(|r| api.lists(r));
    let seen_updates = f.updates;
    api.expire();
    while ALL.map(|r| api.lists(r)).iter().zip(before).any(|(a, b)| *a <= b) {
        assert!(Instant::now() < deadline, "no re-list after an ERROR 410 on the open watches");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.put("services", service("after", "10.96.0.60", 80, 8080, json!({})));
    let p =
        f.until("a change after the re-list", |c, _| c.services.contains_key(&ObjectKey::new("shop", "after"))).await;
    assert_eq!(backends(&p, "shop/fresh:http"), set(&["10.244.1.60 . 8080"]));
    assert_eq!(f.updates, seen_updates + 1, "a re-list of unchanged objects gives the sync loop nothing");

    // 9. An object the engine cannot read is reported by kind, name and field, and skipped;
    //    the watch goes on, and the object's fixed version arrives.
    let mut broken = service("broken", "10.96.0.70", 80, 8080, json!({}));
    broken["spec"]["ports"][0]["port"] = json!("eighty");
    api.put("services", broken);
    api.put("services", service("next", "10.96.0.71", 80, 8080, json!({})));
    f.until("the service after the broken one", |c, _| c.services.contains_key(&ObjectKey::new("shop", "next"))).await;
    let invalid: Vec<String> = f
        .reports
        .iter()
        .filter_map(|r| match r {
            SourceEvent::Invalid(e) => Some(e.to_string()),
            _ => None,
        })
        .collect();
    assert!(
        invalid
            .iter()
            .any(|e| e.starts_with("Service shop/broken (resourceVersion") && e.contains("field spec.ports[0].port")),
        "{invalid:?}"
    );
    api.put("services", service("broken", "10.96.0.70", 80, 8080, json!({})));
    f.until("broken fixed", |c, _| c.services.contains_key(&ObjectKey::new("shop", "broken"))).await;
    // And a re-list with a broken object in it still lists the rest.
    let mut broken = service("broken", "10.96.0.70", 80, 8080, json!({}));
    broken["spec"]["clusterIP"] = json!("10.96.0.700");
    broken["spec"]["clusterIPs"] = json!(["10.96.0.700"]);
    api.put("services", broken);
    api.expire();
    api.put("services", service("last", "10.96.0.80", 80, 8080, json!({})));
    let p = f
        .until("the re-list with a broken object", |c, _| c.services.contains_key(&ObjectKey::new("shop", "last")))
        .await;
    assert!(p.contains("10.96.0.70 comment \"shop/broken:http clusterIP\""), "the last good version stays");
}

/// Without the token the source gets 401s and keeps retrying, never an empty cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_gives_no_cluster() {
    let api = ApiServer::start().await;
    seed(&api);
    let dir = TempDir::new("unauth");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig().replace(support::apiserver::TOKEN, "wrong")).expect("kubeconfig");
    let client = kube::client(&Connect::Kubeconfig(kubeconfig)).await.expect("client");
    let mut source = KubeSource::start(client, ProxyConfig::default(), backoff());
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut failures = 0;
    while let Ok(Some(u)) =
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), source.next()).await
    {
        match u {
            Update::Cluster { .. } => panic!("a cluster without a successful list"),
            Update::WatchFailed { message, .. } => {
                assert!(message.contains("401") || message.contains("Unauthorized"), "{message}");
                failures += 1;
            }
            Update::Invalid(e) => panic!("{e}"),
        }
    }
    // Three kinds, 50 ms doubling to 400 ms over two seconds: retried, but backing off.
    assert!((6..=60).contains(&failures), "{failures} failures in 2 s");
}

/// `switchyard agent --kubeconfig`: the binary lists, syncs once every kind is in, and follows
/// an add and a delete (with `--backend none`, its sync lines count what the program holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_follows_the_api_server() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let api = ApiServer::start().await;
    seed(&api);
    let dir = TempDir::new("binary");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let config = dir.0.join("kube-proxy.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.244.0.0/16\niptables:\n  minSyncPeriod: 0s\n",
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["agent", "--node", NODE, "--backend", "none", "--listen", "127.0.0.1:0"])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("switchyard starts");
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut said = Vec::new();
    let mut wait_for = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(l) = lines.recv_timeout(Duration::from_millis(100)) {
                said.push(l.clone());
                if l.contains(want) {
                    return l;
                }
            }
        }
        panic!("no line with {want:?}; the agent said:\n{}", said.join("\n"));
    };
    let first = wait_for("full sync in");
    assert!(first.ends_with(": 2 service ports, 2 endpoints"), "{first}");
    api.put("services", service("cart", "10.96.0.30", 80, 8080, json!({})));
    api.put("endpointslices", slice("cart-1", "cart", &[("10.244.1.40", "node-a", true)], 8080, json!({})));
    wait_for(": 3 service ports, 3 endpoints");
    api.delete("endpointslices", "shop", "web-abc12");
    wait_for(": 3 service ports, 2 endpoints");
    child.kill().expect("kill the agent we started");
    let _ = child.wait();
}
