//! What a sync costs at scale, per backend, split between rendering and the kernel; and what a
//! connection to the 1st and to the last service costs once the program is loaded.
//!
//!     cargo run --release -p switchyard-agent --example kernel_bench -- [SERVICES...]
//!
//! As root (it creates network namespaces `sy-kb-<pid>-<n>` and deletes them on every exit path).
//! Default sizes: 1000 and 10000 services × 10 endpoints (`synthetic::cluster`), programmed for
//! `node-a`. Prints a table; the figures are recorded in BENCHMARKS.md.
//!
//! - full: render the whole program, then load it (`nft -f`, `iptables-restore`, or the ipset and
//!   iptables parts of the IPVS program: this kernel has no IPVS module, so `ipvsadm` is skipped);
//! - one endpoint change: plan the changed service again (`policy::replan_in_place`, as the agent
//!   does), render the transaction for it, apply it; five times back and forth, the median;
//!   for nftables the same ten changes again through the agent's netlink applier
//!   (`apply::nft_netlink::Hybrid`: one batch on a socket kept open), beside `nft -f`;
//! - one endpoint change through the agent's own path (nftables): the cluster is a manifests
//!   folder (10 Services and their slices per file); one file is rewritten, then timed: the
//!   source's reload of the file the watcher names (read, parse, patch the cluster, deltas), the
//!   stream's watch events, the sync loop's step (replan + render), and `nft -f`; the median of ten;
//!   then ten more through the agent's netlink applier instead of `nft -f`;
//! - connect: `connect()` from the node to a ClusterIP, DNATed to a local listener, for the first
//!   and the last service of the program; the median and p99 of 2,000 connections.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use switchyard_agent::apply::{iptables, ipvs, nft_netlink, nftables};
use switchyard_agent::source::ManifestSource;
use switchyard_agent::stream;
use switchyard_agent::sync::{self, Action};
use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::{ObjectKey, Protocol};
use switchyard_engine::policy::{self, Backend, NodePlan};
use switchyard_engine::render;
use switchyard_engine::synthetic;

const NODE: &str = "node-a";
const NODE_IP: &str = "192.168.0.1";
const ENDPOINTS: u32 = 10;
const CONNECTS: usize = 2_000;
/// Above this many services the iptables nf_tables variant is not measured (see `main`).
const NFT_IPTABLES_MAX: u32 = 1_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__connect") {
        return connect_child(&args[1..]);
    }
    if !is_root() {
        eprintln!("kernel_bench: needs root (network namespaces)");
        return ExitCode::from(2);
    }
    let sizes: Vec<u32> = if args.is_empty() {
        vec![1_000, 10_000]
    } else {
        match args.iter().map(|a| a.parse()).collect() {
            Ok(v) => v,
            Err(_) => {
                eprintln!("kernel_bench: arguments are service counts, e.g. 1000 10000");
                return ExitCode::from(2);
            }
        }
    };
    remove_stale_namespaces();
    println!(
        "| services | backend | full: render | full: kernel | kernel share | full: kernel (netlink) | change: plan+render | change: kernel (nft -f) | change: kernel (netlink) | connect 1st (median/p99) | connect last (median/p99) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let before = synthetic::cluster(n, ENDPOINTS);
        let changed_service = n / 2;
        let after = with_endpoint_change(&before, changed_service);
        for backend in backends() {
            if matches!(backend, Bench::Ipt(iptables::Variant::NfTables)) && n > NFT_IPTABLES_MAX {
                // `iptables-nft-restore --noflush` rebuilds its whole cache rule by rule: over
                // seven minutes of CPU at 10,000 services here before it was stopped.
                println!(
                    "| {n} | {} | not run: a full restore takes many minutes at this size | | | | | | | | |",
                    backend.label()
                );
                continue;
            }
            match run(n, &before, &after, changed_service, backend) {
                Ok(row) => println!("{row}"),
                Err(e) => println!("| {n} | {} | failed: {e} | | | | | | | | |", backend.label()),
            }
            let _ = std::io::stdout().flush();
        }
    }
    println!();
    println!(
        "| services | nftables first full load, netlink applier: plan + render | load | of which: read the program (elements) | stage the declarations (`nft -f`) | read back | batch: encode, send, commit | plan + render + load |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in sizes_again(&args) {
        match netlink_phases(n) {
            Ok(row) => println!("{row}"),
            Err(e) => println!("| {n} | failed: {e} | | | | | | |"),
        }
        let _ = std::io::stdout().flush();
    }
    println!();
    println!(
        "| services | manifest → kernel, nftables: `nft -f` (median of 10) | reload | watch events | plan | rest of the step (render) | nft | manifest → kernel: netlink applier (median of 10) | netlink |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in sizes_again(&args) {
        match agent_path(n) {
            Ok(row) => println!("{row}"),
            Err(e) => println!("| {n} | failed: {e} | | | | | |"),
        }
        let _ = std::io::stdout().flush();
    }
    ExitCode::SUCCESS
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

#[derive(Debug, Clone, Copy)]
enum Bench {
    Nft,
    Ipt(iptables::Variant),
    Ipvs,
}

impl Bench {
    fn label(self) -> String {
        match self {
            Bench::Nft => "nftables".into(),
            Bench::Ipt(v) => format!("iptables ({})", v.as_str()),
            Bench::Ipvs => "ipvs (ipset + iptables parts)".into(),
        }
    }

    fn backend(self) -> Backend {
        match self {
            Bench::Nft => Backend::Nftables,
            Bench::Ipt(_) => Backend::Iptables,
            Bench::Ipvs => Backend::Ipvs,
        }
    }
}

fn backends() -> Vec<Bench> {
    let mut out = vec![Bench::Nft];
    for v in [iptables::Variant::Legacy, iptables::Variant::NfTables] {
        let tool = if matches!(v, iptables::Variant::Legacy) { "iptables-legacy" } else { "iptables-nft" };
        if Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()) {
            out.push(Bench::Ipt(v));
        }
    }
    out.push(Bench::Ipvs);
    out
}

/// The cluster with one endpoint of service `i` replaced.
fn with_endpoint_change(c: &Cluster, i: u32) -> Cluster {
    let mut c = c.clone();
    let slice = synthetic::slice(i, ENDPOINTS, 1);
    c.endpoint_slices.insert(slice.key.clone(), slice);
    c
}

fn run(n: u32, before: &Cluster, after: &Cluster, changed: u32, bench: Bench) -> Result<String, String> {
    let ns = Netns::new()?;
    ns.prepare_node(&[first_tcp_service(n), last_tcp_service(n)])?;
    let backend = bench.backend();

    let t = Instant::now();
    let old_plan = policy::plan(before, NODE, backend);
    let program = full(backend, &old_plan);
    let render_full = t.elapsed();

    let t = Instant::now();
    load_full(bench, &ns.name, &program)?;
    let kernel_full = t.elapsed();

    // One endpoint change, forth and back, five times each way.
    let key = synthetic::service(changed).key;
    let hint: BTreeSet<ObjectKey> = BTreeSet::from([key]);
    let mut render_change = Vec::new();
    let mut kernel_change = Vec::new();
    let mut applied: NodePlan = old_plan;
    for round in 0..10 {
        let target = if round % 2 == 0 { after } else { before };
        // The agent keeps a spare copy of the applied plan to replan in place (copied after the
        // previous sync, off this path).
        let mut new_plan = applied.clone();
        let t = Instant::now();
        policy::replan_in_place(&mut new_plan, target, &hint);
        let txn = incremental(backend, &applied, &new_plan, &hint);
        render_change.push(t.elapsed());
        let t = Instant::now();
        load_incremental(bench, &ns.name, &txn)?;
        kernel_change.push(t.elapsed());
        applied = new_plan;
    }
    let (netlink_full, netlink_change) = match bench {
        Bench::Nft => {
            (ms(netlink_full_load(&program)?), us(netlink_changes(&ns.name, &program, &applied, before, after, &hint)?))
        }
        _ => ("—".to_string(), "—".to_string()),
    };

    let connects = if matches!(bench, Bench::Ipvs) {
        // Without the IPVS module nothing answers on a virtual server.
        ("—".to_string(), "—".to_string())
    } else {
        let first = ns.connect(first_tcp_service(n))?;
        let last = ns.connect(last_tcp_service(n))?;
        (first, last)
    };
    let share = kernel_full.as_secs_f64() / (kernel_full + render_full).as_secs_f64() * 100.0;
    Ok(format!(
        "| {n} | {} | {} | {} | {share:.0} % | {netlink_full} | {} | {} | {netlink_change} | {} | {} |",
        bench.label(),
        ms(render_full),
        ms(kernel_full),
        ms(median(&mut render_change)),
        ms(median(&mut kernel_change)),
        connects.0,
        connects.1,
    ))
}

/// The first load of the full program into an empty kernel through the agent's hybrid applier:
/// the declarations staged by `nft`, read back, and the whole program sent as one netlink batch
/// (the socket is opened before, as the agent opens it at start).
fn netlink_full_load(program: &str) -> Result<Duration, String> {
    netlink_load(program).map(|(took, _)| took)
}

fn netlink_load(program: &str) -> Result<(Duration, nft_netlink::ProgramPhases), String> {
    let ns = Netns::new()?;
    let mut k = nft_netlink::Hybrid::kernel(nftables::Kernel::in_netns(&ns.name), Some(ns.name.clone()));
    let t = Instant::now();
    nftables::NftApplier::apply(&mut k, program).map_err(|e| e.to_string())?;
    let took = t.elapsed();
    match (k.last, k.last_program) {
        (Some(nft_netlink::Path::Netlink), Some(phases)) => Ok((took, phases)),
        _ => Err("the full program went through nft, not netlink".into()),
    }
}

/// The first full load through the netlink applier again, from the plan, with its steps.
fn netlink_phases(n: u32) -> Result<String, String> {
    let t = Instant::now();
    let plan = policy::plan(&synthetic::cluster(n, ENDPOINTS), NODE, Backend::Nftables);
    let program = render::nftables::render(&plan);
    let render = t.elapsed();
    let (load, p) = netlink_load(&program)?;
    Ok(format!(
        "| {n} | {} | {} | {} ({}) | {} | {} | {} | {} |",
        ms(render),
        ms(load),
        ms(p.split),
        p.elements,
        ms(p.staging),
        ms(p.read_back),
        ms(p.batch),
        ms(render + load),
    ))
}

/// The same ten endpoint changes as `run`'s, through the agent's hybrid applier: element-only
/// transactions as one netlink batch on a socket opened once. The median of ten; each must have
/// gone through netlink.
fn netlink_changes(
    ns: &str,
    program: &str,
    applied: &NodePlan,
    before: &Cluster,
    after: &Cluster,
    hint: &BTreeSet<ObjectKey>,
) -> Result<Duration, String> {
    let mut k = nft_netlink::Hybrid::kernel(nftables::Kernel::in_netns(ns), Some(ns.to_string()));
    k.assume_applied(program);
    let mut applied = applied.clone();
    let mut times = Vec::new();
    for round in 0..10 {
        let target = if round % 2 == 0 { after } else { before };
        let mut new_plan = applied.clone();
        policy::replan_in_place(&mut new_plan, target, hint);
        let txn = render::nftables::render_incremental_for(&applied, &new_plan, Some(hint));
        let t = Instant::now();
        nftables::NftApplier::apply(&mut k, &txn).map_err(|e| e.to_string())?;
        times.push(t.elapsed());
        if k.last != Some(nft_netlink::Path::Netlink) {
            return Err(format!("round {round} went through nft, not netlink"));
        }
        applied = new_plan;
    }
    Ok(median(&mut times))
}

fn full(backend: Backend, plan: &NodePlan) -> String {
    match backend {
        Backend::Nftables => render::nftables::render(plan),
        Backend::Iptables => render::iptables::render(plan),
        Backend::Ipvs => render::ipvs::render(plan),
    }
}

fn incremental(backend: Backend, old: &NodePlan, new: &NodePlan, changed: &BTreeSet<ObjectKey>) -> String {
    match backend {
        Backend::Nftables => render::nftables::render_incremental_for(old, new, Some(changed)),
        Backend::Iptables => render::iptables::render_incremental_for(old, new, Some(changed)),
        Backend::Ipvs => render::ipvs::render_incremental_for(old, new, Some(changed)),
    }
}

fn load_full(bench: Bench, ns: &str, program: &str) -> Result<(), String> {
    match bench {
        Bench::Nft => {
            nftables::NftApplier::apply(&mut nftables::Kernel::in_netns(ns), program).map_err(|e| e.to_string())
        }
        Bench::Ipt(v) => iptables::apply_full(&mut iptables::Kernel::in_netns(ns).with_variant(v), program)
            .map(drop)
            .map_err(|e| e.to_string()),
        Bench::Ipvs => ipvs_apply(ns, ipvs::Transaction::from_program(program)),
    }
}

fn load_incremental(bench: Bench, ns: &str, txn: &str) -> Result<(), String> {
    match bench {
        Bench::Nft => nftables::NftApplier::apply(&mut nftables::Kernel::in_netns(ns), txn).map_err(|e| e.to_string()),
        Bench::Ipt(v) => iptables::apply_incremental(&mut iptables::Kernel::in_netns(ns).with_variant(v), txn)
            .map(drop)
            .map_err(|e| e.to_string()),
        Bench::Ipvs => ipvs_apply(ns, ipvs::Transaction::from_transaction(txn)),
    }
}

fn ipvs_apply(ns: &str, t: ipvs::Transaction) -> Result<(), String> {
    use switchyard_engine::render::ipvs::Section;
    // No IPVS module and no dummy links here: the virtual servers and the kube-ipvs0 addresses
    // cannot be loaded; the ipset and iptables parts can.
    let mut k = ipvs::Kernel::in_netns(ns).without(Section::Ipvsadm).without(Section::Ip);
    ipvs::IpvsApplier::apply(&mut k, &t).map_err(|e| e.to_string())
}

/// The first and last TCP services (every 7th synthetic service is UDP).
fn first_tcp_service(n: u32) -> u32 {
    (0..n).find(|i| !is_udp(*i)).unwrap_or(0)
}

fn last_tcp_service(n: u32) -> u32 {
    (0..n).rev().find(|i| !is_udp(*i)).unwrap_or(0)
}

fn is_udp(i: u32) -> bool {
    synthetic::service(i).ports.iter().all(|p| p.protocol == Protocol::Udp)
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 1_000.0 { format!("{:.2} s", ms / 1e3) } else { format!("{ms:.1} ms") }
}

/// Microseconds, for what takes well under a millisecond.
fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Namespaces of earlier runs that were killed before their `Drop` ran.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix("sy-kb-").and_then(|r| r.split('-').next()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "delete", name]);
        }
    }
}

/// A network namespace deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Result<Netns, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("sy-kb-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        sh(&["ip", "netns", "add", &name])?;
        Ok(Netns { name })
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Loopback up, the node's address on a spare link with the default route, and the
    /// endpoints of the measured services as local addresses.
    fn prepare_node(&self, services: &[u32]) -> Result<(), String> {
        self.exec(&["ip", "link", "set", "lo", "up"])?;
        // This kernel has no dummy links: a veth pair whose far end nobody uses does the same.
        self.exec(&["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
        self.exec(&["ip", "link", "set", "d1", "up"])?;
        self.exec(&["ip", "link", "set", "d0", "up"])?;
        self.exec(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "d0"])?;
        self.exec(&["ip", "route", "add", "default", "dev", "d0"])?;
        for i in services {
            for e in synthetic::slice(*i, ENDPOINTS, 0).endpoints {
                let _ = self.exec(&["ip", "addr", "add", &format!("{}/32", e.address), "dev", "lo"]);
            }
        }
        Ok(())
    }

    /// Runs this binary in the namespace to time connections to service `i`'s ClusterIP.
    fn connect(&self, i: u32) -> Result<String, String> {
        let ip = synthetic::service(i).cluster_ips[0];
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(exe)
            .args(["__connect", &format!("{ip}:80"), &CONNECTS.to_string()])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("connect to service {i}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "delete", &self.name]);
    }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Inside the namespace: listen on the endpoints' port, connect to the service `count` times.
fn connect_child(args: &[String]) -> ExitCode {
    let (Some(addr), Some(count)) = (args.first(), args.get(1)) else {
        eprintln!("usage: __connect ADDR:PORT COUNT");
        return ExitCode::from(2);
    };
    let (Ok(addr), Ok(count)) = (addr.parse::<SocketAddr>(), count.parse::<usize>()) else {
        eprintln!("__connect: bad arguments");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind("0.0.0.0:8080") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("__connect: listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    // Warm up conntrack and the caches, then measure.
    let mut times = Vec::with_capacity(count);
    for k in 0..count + 100 {
        let t = Instant::now();
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                let d = t.elapsed();
                drop(s);
                if k >= 100 {
                    times.push(d);
                }
            }
            Err(e) => {
                eprintln!("__connect: {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("{:.0} / {:.0} µs", us(times[times.len() / 2]), us(times[times.len() * 99 / 100]));
    ExitCode::SUCCESS
}

fn sizes_again(args: &[String]) -> Vec<u32> {
    if args.is_empty() { vec![1_000, 10_000] } else { args.iter().filter_map(|a| a.parse().ok()).collect() }
}

/// Services per manifest file, as the churn run writes them.
const PER_FILE: u32 = 10;

/// A manifests folder deleted on drop.
struct Folder(std::path::PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The nodes, ServiceCIDR and proxy configuration of `synthetic::cluster`, as manifests.
fn cluster_yaml() -> String {
    let mut s = String::new();
    for n in synthetic::nodes() {
        let ip = &n.addresses[0].address;
        let zone = n.zone().unwrap_or_default();
        s += &format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    topology.kubernetes.io/zone: {zone}\nspec:\n  podCIDR: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n---\n",
            n.name, n.pod_cidrs[0]
        );
    }
    s += "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs: [\"172.16.0.0/12\"]\n---\n";
    s += "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.0.0.0/8\n";
    s
}

/// Services `first..first + PER_FILE` (below `n`) and their slices; `changed` gets generation `gen`.
fn services_yaml(first: u32, n: u32, changed: u32, generation: u32) -> String {
    let mut s = String::new();
    for i in first..(first + PER_FILE).min(n) {
        let svc = synthetic::service(i);
        let sl = synthetic::slice(i, ENDPOINTS, if i == changed { generation } else { 0 });
        let port = &svc.ports[0];
        let proto = if port.protocol == Protocol::Udp { "UDP" } else { "TCP" };
        let ty = format!("{:?}", svc.service_type);
        s += &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  type: {ty}\n  clusterIP: {}\n",
            svc.key.name, svc.key.namespace, svc.cluster_ips[0]
        );
        if svc.external_traffic_policy_local {
            s += "  externalTrafficPolicy: Local\n";
        }
        s += &format!(
            "  ports:\n  - name: {}\n    protocol: {proto}\n    port: {}\n    targetPort: 8080\n",
            port.name, port.port
        );
        if let Some(np) = port.node_port {
            s += &format!("    nodePort: {np}\n");
        }
        if let Some(ip) = svc.load_balancer_ingress.first().and_then(|i| i.ip) {
            s += &format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}\n");
        }
        s += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}\n  namespace: {}\n  labels:\n    kubernetes.io/service-name: {}\naddressType: IPv4\nports:\n- name: {}\n  protocol: {proto}\n  port: 8080\nendpoints:\n",
            sl.key.name, sl.key.namespace, sl.service, port.name
        );
        for e in &sl.endpoints {
            s += &format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {}\n",
                e.address,
                e.node_name.as_deref().unwrap_or_default()
            );
        }
        s += "---\n";
    }
    s
}

/// One endpoint change from a rewritten manifest to the kernel, through the agent's source, event
/// stream and sync loop (what `switchyard agent --manifests` runs), for nftables.
fn agent_path(n: u32) -> Result<String, String> {
    let ns = Netns::new()?;
    ns.prepare_node(&[])?;
    let dir = Folder(std::env::temp_dir().join(format!("sy-kb-{}-manifests-{n}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|e| e.to_string())?;
    let write = |name: String, text: String| std::fs::write(dir.0.join(name), text).map_err(|e| e.to_string());
    write("00-cluster.yaml".into(), cluster_yaml())?;
    let changed = n / 2;
    let file_of = |i: u32| format!("svc-{:05}.yaml", i / PER_FILE);
    for first in (0..n).step_by(PER_FILE as usize) {
        write(file_of(first), services_yaml(first, n, changed, 0))?;
    }
    let mut source = ManifestSource::new(&dir.0);
    let r = source.reload();
    if !r.errors.is_empty() {
        return Err(format!("manifests: {}", r.errors.join("; ")));
    }
    let mut state = sync::State::new(NODE, Backend::Nftables, sync::Backoff::default());
    let kernel = |program: &str| {
        nftables::NftApplier::apply(&mut nftables::Kernel::in_netns(&ns.name), program).map_err(|e| e.to_string())
    };
    let first =
        sync::Input::Cluster { now: Duration::ZERO, cluster: Box::new(source.cluster().clone()), changes: r.changes };
    let Some(program) = apply_of(state.step(first)) else { return Err("no first sync".into()) };
    kernel(&program)?;
    state.step(sync::Input::Applied { now: Duration::from_millis(1), took: Duration::ZERO, error: None });
    // The agent's own nftables kernel: element-only transactions over netlink (rounds 10..20).
    let mut hybrid = nft_netlink::Hybrid::kernel(nftables::Kernel::in_netns(&ns.name), Some(ns.name.clone()));
    hybrid.assume_applied(&program);

    let (mut total, mut reload, mut events, mut plan, mut render, mut nft) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut total_netlink, mut netlink) = (Vec::new(), Vec::new());
    for round in 0..20u32 {
        let first_of_file = changed / PER_FILE * PER_FILE;
        write(file_of(changed), services_yaml(first_of_file, n, changed, (round + 1) % 2))?;
        let path = dir.0.join(file_of(changed));
        // 1.1 s apart: past minSyncPeriod (1 s); all 20 before the periodic full sync (30 s).
        let now = Duration::from_millis(1_100 * u64::from(round + 1));
        let t0 = Instant::now();
        let r = source.reload_paths([path]);
        let input = sync::Input::Delta { now, deltas: r.deltas.ok_or("not incremental")?, changes: r.changes };
        let t1 = Instant::now();
        let sync::Input::Delta { deltas, .. } = &input else { unreachable!() };
        let ev = stream::delta_events(deltas);
        let t2 = Instant::now();
        // The plan share, measured apart on a copy (the step below replans the same services).
        let keys: BTreeSet<ObjectKey> = [synthetic::service(changed).key].into();
        let (mut copy, cluster_copy) = (state.applied().cloned().ok_or("no plan")?, source.cluster());
        let tp = Instant::now();
        policy::replan_in_place(&mut copy, cluster_copy, &keys);
        plan.push(tp.elapsed());
        let t3 = Instant::now();
        let Some(program) = apply_of(state.step(input)) else { return Err(format!("round {round}: no sync")) };
        let t4 = Instant::now();
        if round < 10 {
            kernel(&program)?;
        } else {
            nftables::NftApplier::apply(&mut hybrid, &program).map_err(|e| e.to_string())?;
            if hybrid.last != Some(nft_netlink::Path::Netlink) {
                return Err(format!("round {round} went through nft, not netlink"));
            }
        }
        let t5 = Instant::now();
        state.step(sync::Input::Applied { now: now + Duration::from_millis(1), took: t5 - t3, error: None });
        drop(ev);
        if round >= 10 {
            netlink.push(t5 - t4);
            total_netlink.push((t1 - t0) + (t2 - t1) + (t4 - t3) + (t5 - t4));
            continue;
        }
        reload.push(t1 - t0);
        events.push(t2 - t1);
        render.push((t4 - t3).saturating_sub(*plan.last().unwrap_or(&Duration::ZERO)));
        nft.push(t5 - t4);
        total.push((t1 - t0) + (t2 - t1) + (t4 - t3) + (t5 - t4));
    }
    Ok(format!(
        "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
        ms(median(&mut total)),
        ms(median(&mut reload)),
        ms(median(&mut events)),
        ms(median(&mut plan)),
        ms(median(&mut render)),
        ms(median(&mut nft)),
        ms(median(&mut total_netlink)),
        us(median(&mut netlink)),
    ))
}

fn apply_of(actions: Vec<Action>) -> Option<String> {
    actions.into_iter().find_map(|a| match a {
        Action::Apply { program, .. } => Some(program),
        _ => None,
    })
}
