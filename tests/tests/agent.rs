//! The agent against a real kernel: `switchyard_agent::agent` runs with the real appliers inside
//! a fresh network namespace, driven by a manifests folder the test writes.
//!
//! nftables: the table appears, an endpoint edited in the folder changes the element in the
//! kernel, a half-written file changes nothing, the table deleted by hand comes back at the
//! periodic resync, a foreign table is never touched, `/metrics` and `/healthz` answer, and
//! stopping the agent leaves the rules in place. iptables: two runs over the same namespace leave
//! one copy of each builtin jump, and a foreign rule in a builtin chain survives both. Health:
//! syncs that keep failing turn `/healthz` to 503 (this one needs no root).
//!
//! The kernel tests are skipped, with the reason printed, when not root or when the tools are
//! missing. HTTP goes to 127.0.0.1 only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use switchyard_agent::agent::{self, AgentConfig, BackendChoice};
use switchyard_agent::sync::Backoff;
use switchyard_tests::netns::{self, Netns};

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.50.2\n";

/// Quick syncs, and a resync every 2 s so the drift test is short.
const CONFIG: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.244.0.0/16\nminSyncPeriod: 50ms\nsyncPeriod: 2s\n";

fn web(endpoint: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n    nodePort: 30080\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: 8080\nendpoints:\n- addresses: [\"{endpoint}\"]\n  conditions:\n    ready: true\n  nodeName: n1\n"
    )
}

/// A manifests folder, removed on drop.
struct Folder(PathBuf);

impl Folder {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sy-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Folder(p)
    }

    /// Writes through a hidden file and a rename, as a careful tool would: the agent never reads
    /// hidden files, so it sees the old or the new version whole.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.0.join(name)).expect("rename");
    }

    /// Writes in place, as a careless editor would.
    fn write_in_place(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).expect("write");
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` on 127.0.0.1: status code and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    let code = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

fn config(ns: &Netns, folder: &Folder, backend: BackendChoice) -> AgentConfig {
    AgentConfig {
        node: "n1".into(),
        source: agent::AgentSource::Manifests(folder.path().to_path_buf()),
        backend,
        netns: Some(ns.name().to_string()),
        backoff: Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(2) },
        flows: false,
    }
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A metric's value in the text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn nftables_agent_follows_the_folder() {
    if let Some(why) = netns::skip_reason(&["nft"]) {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::new().expect("netns");
    let nft = |args: &[&str]| ns.exec("nft", args, None);
    nft(&["add table inet foreign"]).expect("foreign table");
    nft(&["add chain inet foreign input { type filter hook input priority 0 ; }"]).expect("foreign chain");
    nft(&["add rule inet foreign input tcp dport 9 counter accept comment \"not ours\""]).expect("foreign rule");
    let foreign = nft(&["list", "table", "inet", "foreign"]).expect("lists");

    let folder = Folder::new("nft");
    folder.write("node.yaml", NODE);
    folder.write("config.yaml", CONFIG);
    folder.write("web.yaml", &web("10.244.0.5"));
    let running = agent::spawn(config(&ns, &folder, BackendChoice::Nftables), localhost()).expect("starts");
    let table = || nft(&["list", "table", "ip", "switchyard"]).unwrap_or_default();

    wait_for("the table", Duration::from_secs(10), || table().contains("10.244.0.5"));

    // One endpoint changed in the folder: the element changes in the kernel.
    let t0 = Instant::now();
    folder.write("web.yaml", &web("10.244.0.6"));
    wait_for("the new endpoint", Duration::from_secs(10), || {
        let t = table();
        t.contains("10.244.0.6") && !t.contains("10.244.0.5")
    });
    eprintln!("endpoint change, folder to kernel: {:?}", t0.elapsed());

    // A half-written file is reported and ignored: the last good version stays programmed.
    folder.write_in_place("web.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  names");
    std::thread::sleep(Duration::from_millis(300));
    assert!(table().contains("10.244.0.6"), "a half-written file changed the kernel");
    folder.write("web.yaml", &web("10.244.0.6"));

    // Drift: our table deleted by hand comes back at the next periodic full resync.
    nft(&["delete", "table", "ip", "switchyard"]).expect("deletes");
    wait_for("the resync to restore the table", Duration::from_secs(10), || table().contains("10.244.0.6"));

    // The kernel holds the program a moment before the sync's report reaches the metrics.
    wait_for("the resync in the metrics", Duration::from_secs(5), || {
        let (_, body) = get(running.addr, "/metrics");
        metric(&body, "kubeproxy_sync_full_proxy_rules_duration_seconds_count").is_some_and(|n| n >= 2.0)
    });
    let (code, body) = get(running.addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let full = metric(&body, "kubeproxy_sync_full_proxy_rules_duration_seconds_count").expect("full syncs");
    let partial = metric(&body, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count").expect("partial syncs");
    assert!(full >= 2.0 && partial >= 1.0, "full {full}, partial {partial}\n{body}");
    assert_eq!(metric(&body, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"), Some(0.0), "{body}");
    assert_eq!(metric(&body, "switchyard_programmed_endpoints"), Some(1.0), "{body}");
    // Full syncs (whole programs, the declarations staged by `nft`) and the endpoint change (element
    // updates only) all go over netlink.
    let by_path = |p: &str| metric(&body, &format!("switchyard_nftables_transactions_total{{path=\"{p}\"}}"));
    assert!(by_path("netlink").is_some_and(|n| n >= full + partial), "{body}");
    assert!(by_path("nft").is_none_or(|n| n == 0.0), "{body}");
    let (code, body) = get(running.addr, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"nodeEligible\":true") && body.contains("\"healthy\":true"), "{body}");

    running.stop().expect("stops cleanly");
    assert!(table().contains("10.244.0.6"), "stopping must leave the rules in place");
    assert_eq!(nft(&["list", "table", "inet", "foreign"]).expect("lists"), foreign, "the foreign table changed");
}

#[test]
fn iptables_agent_restarts_without_duplicating_jumps() {
    let tools = ["iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore", "ip6tables-save"];
    if let Some(why) = netns::skip_reason(&tools) {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::new().expect("netns");
    ns.exec("iptables", &["-t", "nat", "-A", "POSTROUTING", "-s", "10.9.9.0/24", "-j", "MASQUERADE"], None)
        .expect("foreign rule");
    // A chain of ours an earlier program left behind: the first full sync removes it.
    ns.exec("iptables", &["-t", "nat", "-N", "SWITCHYARD-SVC-STALESTALESTA"], None).expect("stale chain");
    let folder = Folder::new("ipt");
    folder.write("node.yaml", NODE);
    folder.write("config.yaml", CONFIG);
    folder.write("web.yaml", &web("10.244.0.5"));
    let save = || ns.exec("iptables-save", &[], None).unwrap_or_default();
    for run in 0..2 {
        let running = agent::spawn(config(&ns, &folder, BackendChoice::Iptables), localhost()).expect("starts");
        wait_for("the rules", Duration::from_secs(10), || save().contains("10.244.0.5:8080"));
        let (code, body) = get(running.addr, "/healthz");
        assert_eq!(code, 200, "run {run}: {body}");
        let (_, metrics) = get(running.addr, "/metrics");
        assert_eq!(metric(&metrics, "switchyard_sync_failures_total"), Some(0.0), "run {run}:\n{metrics}");
        running.stop().expect("stops");
    }
    let s = save();
    let jumps = s.lines().filter(|l| l.starts_with("-A PREROUTING") && l.contains("SWITCHYARD-SERVICES")).count();
    assert_eq!(jumps, 1, "{s}");
    assert!(s.contains("-A POSTROUTING -s 10.9.9.0/24 -j MASQUERADE"), "the foreign rule is gone:\n{s}");
    assert!(!s.contains("STALESTALESTA"), "the stale chain is still there:\n{s}");
}

/// Syncs that keep failing turn `/healthz` to 503 with the error, and count as failures. (The
/// kernel tools are pointed at a namespace that does not exist, so this needs no root.)
#[test]
fn failing_syncs_make_the_agent_unhealthy() {
    let folder = Folder::new("unhealthy");
    folder.write("node.yaml", NODE);
    folder.write("config.yaml", CONFIG);
    folder.write("web.yaml", &web("10.244.0.5"));
    let cfg = AgentConfig {
        node: "n1".into(),
        source: agent::AgentSource::Manifests(folder.path().to_path_buf()),
        backend: BackendChoice::Nftables,
        netns: Some(format!("sy-t-absent-{}", std::process::id())),
        backoff: Backoff { initial: Duration::from_millis(50), max: Duration::from_millis(200) },
        flows: false,
    };
    let running = agent::spawn(cfg, localhost()).expect("starts");
    wait_for("/healthz to turn 503", Duration::from_secs(10), || get(running.addr, "/healthz").0 == 503);
    let (_, body) = get(running.addr, "/healthz");
    assert!(body.contains("\"healthy\":false") && body.contains("lastError"), "{body}");
    let (_, metrics) = get(running.addr, "/metrics");
    let failures = metric(&metrics, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total").unwrap_or(0.0);
    assert!(failures >= 3.0, "{metrics}");
    running.stop().expect("stops");
}
