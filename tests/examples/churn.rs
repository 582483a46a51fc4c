//! Churn under load: one lab node ([`switchyard_agent::lab`], nine pods, the `switchyard agent`
//! binary in the node's namespace) programs 10,000 Services × 10 endpoints from a manifests
//! folder, while this program rewrites the folder at 1,000 endpoint changes per second and real
//! TCP connections flow to a handful of Services whose endpoints are the lab's pods.
//!
//! The check: no connection reaches an endpoint after the sync that removed it completed. The
//! agent's event stream (`/api/v1/events`) says which EndpointSlice versions it read (watch
//! events, in order) and when each sync completed (sync events, stamped after the kernel took
//! the transaction). After an `ok` sync the kernel holds exactly the cluster of the watch events
//! before it, so a connection that started after that sync completed may reach only an endpoint
//! of that version, or of a version read later and synced before the connection ended.
//!
//! Recorded every `--sample-seconds`: sync duration p50/p99 (the stream's `durationMs`, render
//! and kernel), end-to-end latency (manifest written → sync completed, for the tracked Services)
//! and the agent's RSS (`/proc/PID/status`). Memory is judged flat when a least-squares line
//! through the RSS samples of the run's second half (at most its last 5 minutes) rises or falls
//! by at most [`FLAT_MIB_PER_MIN`]; a run of 5 minutes or more fails otherwise. Written to `--out`: `churn.md` (the table), `churn.svg`
//! (the plot, drawn with plotters) and `churn.csv` (the samples).
//!
//! ```text
//! cargo build --release -p switchyard-agent --bin switchyard
//! cargo run --release -p switchyard-tests --example churn -- --seconds 60
//! ```
//!
//! Root only. Traffic stays inside the lab's namespaces, which are deleted on every exit path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use switchyard_agent::agent::BackendChoice;
use switchyard_agent::lab::{self, Lab, LabSpec, Proto, Reply, Svc};
use switchyard_engine::input::Object;
use switchyard_engine::protocol::{Event, ServerMessage, WatchEvent};
use switchyard_tests::differential::{AGENT_LISTEN, AgentProcess, Rng, svc, switchyard_binary};

#[derive(Parser, Debug)]
#[command(about = "Endpoint churn under load in the lab, with the no-stale-endpoint check")]
struct Args {
    /// How long to churn.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per bulk Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Endpoint changes (EndpointSlice updates) per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Bulk Services per manifest file.
    #[arg(long, default_value_t = 10)]
    per_file: usize,
    /// Services with real pods behind them, which the connections go to.
    #[arg(long, default_value_t = 4)]
    tracked: usize,
    /// Client threads making connections.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value_t = 5)]
    sample_seconds: u64,
    #[arg(long, default_value = "tests/churn")]
    out: PathBuf,
    #[arg(long, value_parser = ["nftables", "iptables"], default_value = "nftables")]
    backend: String,
    /// The `switchyard` binary (default: beside this example's folder).
    #[arg(long)]
    agent: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
}

fn now_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The tracked Services' ClusterIPs: `10.96.0.50 + k`.
fn tracked_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, 50 + k as u8)
}

/// Bulk Service `i`: ClusterIP in 10.96.8.0 and up; endpoint addresses that route nowhere.
fn bulk_ip(i: usize) -> String {
    format!("10.96.{}.{}", 8 + i / 250, 1 + i % 250)
}

fn endpoint_ip(id: u32) -> String {
    format!("10.{}.{}.{}", 128 + (id >> 16), (id >> 8) & 255, id & 255)
}

fn bulk_yaml(i: usize, eps: &[u32]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bulk-{i}\n  namespace: churn\nspec:\n  clusterIP: {}\n  ports:\n  - name: p\n    port: 80\n    targetPort: 8080\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: bulk-{i}-1\n  namespace: churn\n  labels:\n    kubernetes.io/service-name: bulk-{i}\naddressType: IPv4\nports:\n- name: p\n  port: 8080\nendpoints:\n",
        bulk_ip(i)
    );
    for e in eps {
        let _ = writeln!(s, "- addresses: [\"{}\"]\n  conditions: {{ready: true}}", endpoint_ip(*e));
    }
    s.push_str("---\n");
    s
}

/// One connection: when it started and ended, the tracked Service, and the pod that answered.
struct Conn {
    t0: f64,
    t1: f64,
    service: usize,
    served: Option<IpAddr>,
    error: Option<String>,
}

/// What the event stream said.
#[derive(Default)]
struct Stream {
    /// Per tracked Service: (seq, time, endpoint addresses) of every version the agent read.
    versions: Vec<Vec<(u64, f64, BTreeSet<IpAddr>)>>,
    /// (seq, time, ok, duration ms, of which rendering) of every sync.
    syncs: Vec<(u64, f64, bool, f64, f64)>,
    snapshots: usize,
    error: Option<String>,
}

impl Stream {
    fn object(&mut self, seq: u64, t: f64, o: &Object, tracked: usize) {
        if let Object::EndpointSlice(es) = o
            && let Some(k) = es.service.strip_prefix("track-").and_then(|k| k.parse::<usize>().ok())
            && k < tracked
        {
            let eps = es.endpoints.iter().filter(|e| e.ready).map(|e| e.address).collect();
            self.versions[k].push((seq, t, eps));
        }
    }
}

/// Follows the agent's event stream from inside the node's namespace until `stop`.
fn follow(netns: String, tracked: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Stream> {
    std::thread::spawn(move || {
        lab::in_netns(&netns, move || {
            let mut st = Stream { versions: vec![Vec::new(); tracked], ..Stream::default() };
            let mut run = || -> anyhow::Result<()> {
                let stream = TcpStream::connect(AGENT_LISTEN)?;
                stream.set_read_timeout(Some(Duration::from_millis(200)))?;
                let cfg = tungstenite::protocol::WebSocketConfig::default().max_message_size(None).max_frame_size(None);
                let url = format!("ws://{AGENT_LISTEN}/api/v1/events");
                let (mut ws, _) = tungstenite::client::client_with_config(url, stream, Some(cfg))
                    .map_err(|e| anyhow::anyhow!("upgrade: {e}"))?;
                while !stop.load(Ordering::Relaxed) {
                    let text = match ws.read() {
                        Ok(tungstenite::Message::Text(t)) => t,
                        Ok(_) => continue,
                        Err(tungstenite::Error::Io(e))
                            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                        {
                            continue;
                        }
                        Err(e) => bail!("the event stream broke: {e}"),
                    };
                    match ServerMessage::from_json(text.as_str())? {
                        ServerMessage::Snapshot(s) => {
                            st.snapshots += 1;
                            for o in &s.objects {
                                st.object(s.seq, s.time_ms as f64, o, tracked);
                            }
                        }
                        ServerMessage::Event(e) => match &e.event {
                            Event::Watch(WatchEvent::Applied { object }) => {
                                st.object(e.seq, e.time_ms as f64, object, tracked);
                            }
                            Event::Watch(WatchEvent::Reset { objects }) => {
                                for o in objects {
                                    st.object(e.seq, e.time_ms as f64, o, tracked);
                                }
                            }
                            Event::Sync(s) => {
                                st.syncs.push((e.seq, e.time_ms as f64, s.ok, s.duration_ms, s.render_ms));
                            }
                            _ => {}
                        },
                    }
                }
                Ok(())
            };
            if let Err(e) = run() {
                st.error = Some(e.to_string());
            }
            st
        })
        .unwrap_or_else(|e| Stream { error: Some(e.to_string()), ..Stream::default() })
    })
}

/// Connections from a pod's namespace to the tracked Services, round robin, until `stop`.
fn traffic(netns: String, first: usize, tracked: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Conn>> {
    std::thread::spawn(move || {
        lab::in_netns(&netns, move || {
            let mut out = Vec::new();
            let mut k = first;
            while !stop.load(Ordering::Relaxed) {
                k = (k + 1) % tracked;
                let t0 = now_ms();
                let r = lab::request(Proto::Tcp, SocketAddrV4::new(tracked_ip(k), 80), Duration::from_secs(2));
                let t1 = now_ms();
                let (served, error) = match r {
                    Reply::Served { pod, .. } => (Some(pod), None),
                    other => (None, Some(format!("{other:?}"))),
                };
                out.push((t0, t1, k, served, error));
                std::thread::sleep(Duration::from_millis(5));
            }
            out
        })
        .unwrap_or_default()
        .into_iter()
        .map(|(t0, t1, service, served, error)| Conn { t0, t1, service, served: served.map(|p| pod_ip(&p)), error })
        .collect()
    })
}

/// A lab pod's address from its name (`n1-p3` → 10.244.1.13), as [`lab::layout`] assigns them.
fn pod_ip(name: &str) -> IpAddr {
    let k: u8 = name.rsplit('p').next().and_then(|d| d.parse().ok()).unwrap_or(0);
    IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10 + k))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One sampling window.
struct Sample {
    t: f64,
    rss_mib: f64,
    syncs: usize,
    sync_p50: f64,
    sync_p99: f64,
    e2e_p50: f64,
    e2e_p99: f64,
    events: u64,
    connections: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let backend = if args.backend == "iptables" { BackendChoice::Iptables } else { BackendChoice::Nftables };
    if let Some(why) = lab::skip_reason(backend) {
        bail!("cannot run: {why}");
    }
    let bin = args.agent.clone().or_else(switchyard_binary).context("no switchyard binary (--agent PATH)")?;
    let seed = args.seed.unwrap_or_else(|| Rng::seed_from_env("SWITCHYARD_CHURN_SEED"));
    let mut rng = Rng::new(seed);
    eprintln!("churn: {args:?}, seed {seed}");
    let lab = Lab::build(&LabSpec { tag: "churn".into(), nodes: 1, pods_per_node: 9, backend })?;
    let node = lab.nodes[0].clone();
    let pods: Vec<String> = lab.pods.iter().map(|p| p.name.clone()).collect();

    // The tracked Services first, alone: the stream's first snapshot stays small.
    let mut tracked: Vec<Vec<String>> =
        (0..args.tracked).map(|k| vec![pods[k % 9].clone(), pods[(k + 3) % 9].clone()]).collect();
    let tracked_yaml = |k: usize, eps: &[String]| {
        let refs: Vec<&str> = eps.iter().map(String::as_str).collect();
        Svc { cluster_ip: tracked_ip(k).to_string(), ..svc(&format!("track-{k}"), "ClusterIP", "", &refs) }.yaml(&lab)
    };
    for (k, eps) in tracked.iter().enumerate() {
        lab.write(&format!("10-track-{k}.yaml"), &tracked_yaml(k, eps))?;
    }
    let log = std::env::temp_dir().join(format!("{}agent.log", lab.prefix));
    let agent = AgentProcess::start(&bin, &lab, &node, None, &log)?;
    agent.wait_synced(1.0, Duration::from_secs(60)).map_err(anyhow::Error::msg)?;
    let stop_stream = Arc::new(AtomicBool::new(false));
    let stream = follow(node.netns.clone(), args.tracked, stop_stream.clone());

    // The bulk: `services` × `endpoints`, `per_file` Services a file.
    let mut next_id: u32 = 0;
    let mut bulk: Vec<Vec<u32>> = (0..args.services)
        .map(|_| {
            (0..args.endpoints)
                .map(|_| {
                    next_id += 1;
                    next_id
                })
                .collect()
        })
        .collect();
    let files = args.services.div_ceil(args.per_file);
    let write_file = |f: usize, bulk: &[Vec<u32>]| -> anyhow::Result<()> {
        let text: String =
            (f * args.per_file..((f + 1) * args.per_file).min(bulk.len())).map(|i| bulk_yaml(i, &bulk[i])).collect();
        Ok(lab.write(&format!("50-bulk-{f:05}.yaml"), &text)?)
    };
    let loaded = Instant::now();
    for f in 0..files {
        write_file(f, &bulk)?;
    }
    let total_ports = (args.services + args.tracked) as f64;
    let programmed = || agent.metric("switchyard_programmed_service_ports").unwrap_or(0.0) >= total_ports;
    switchyard_tests::differential::wait_until("the bulk to be programmed", Duration::from_secs(900), programmed)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", agent.log_text()))?;
    let load_took = loaded.elapsed();
    eprintln!("churn: {} Services programmed in {load_took:?}; churning for {} s", args.services, args.seconds);

    let stop_traffic = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..args.clients)
        .map(|c| traffic(lab.pods[c % 9].netns.clone(), c, args.tracked, stop_traffic.clone()))
        .collect();

    // Churn: bulk endpoint replacements at `rate`, plus a tracked Service's pods every 1.5 s.
    let start = Instant::now();
    let start_ms = now_ms();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut events: u64 = 0;
    let mut writes: Vec<(f64, usize, BTreeSet<IpAddr>)> = Vec::new(); // tracked writes
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let mut next_sample = start;
    let mut next_tracked = start;
    let mut dirty = BTreeSet::new();
    while Instant::now() < deadline {
        let due = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while events < due {
            let i = rng.below(args.services as u64) as usize;
            let slot = rng.below(args.endpoints as u64) as usize;
            next_id += 1;
            bulk[i][slot] = next_id;
            dirty.insert(i / args.per_file);
            events += 1;
        }
        for f in std::mem::take(&mut dirty) {
            write_file(f, &bulk)?;
        }
        if Instant::now() >= next_tracked {
            let k = rng.below(args.tracked as u64) as usize;
            let n = 1 + rng.below(3) as usize;
            let mut eps: Vec<String> = Vec::new();
            while eps.len() < n {
                let p = pods[rng.below(9) as usize].clone();
                if !eps.contains(&p) {
                    eps.push(p);
                }
            }
            let set: BTreeSet<IpAddr> = eps.iter().map(|p| pod_ip(p)).collect();
            if set == tracked[k].iter().map(|p| pod_ip(p)).collect() {
                continue;
            }
            writes.push((now_ms(), k, set));
            lab.write(&format!("10-track-{k}.yaml"), &tracked_yaml(k, &eps))?;
            tracked[k] = eps;
            events += 1;
            next_tracked += Duration::from_millis(1500);
        }
        if Instant::now() >= next_sample {
            if let Some(kib) = rss_kib(agent.pid()) {
                rss.push((now_ms(), kib));
            }
            next_sample += Duration::from_secs(args.sample_seconds);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let churned = start.elapsed();
    // Let the last writes reach the kernel while connections still flow.
    std::thread::sleep(Duration::from_secs(3));
    stop_traffic.store(true, Ordering::Relaxed);
    let conns: Vec<Conn> = clients.into_iter().flat_map(|c| c.join().unwrap_or_default()).collect();
    stop_stream.store(true, Ordering::Relaxed);
    let st = stream.join().map_err(|_| anyhow::anyhow!("the stream thread panicked"))?;
    let failures = agent.metric("switchyard_sync_failures_total").unwrap_or(f64::NAN);
    let agent_log = agent.log_text();
    drop(agent);
    let _ = std::fs::remove_file(&log);
    eprintln!("churn: the agent's last log lines:");
    for l in agent_log.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev() {
        eprintln!("  {l}");
    }
    drop(lab);
    if let Some(e) = &st.error {
        bail!("the event stream failed: {e}");
    }

    // The check. After ok sync `b`, Service k's guaranteed version is the last one read before b.
    let ok_syncs: Vec<(u64, f64)> = st.syncs.iter().filter(|s| s.2).map(|s| (s.0, s.1)).collect();
    let mut checked = 0usize;
    let mut in_flight = 0usize;
    let mut violations: Vec<String> = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for c in &conns {
        let Some(pod) = c.served else {
            *errors.entry(c.error.clone().unwrap_or_default()).or_default() += 1;
            continue;
        };
        // The last sync that completed (1 ms: the stamp's resolution) before the connection began.
        let n = ok_syncs.partition_point(|(_, t)| t + 1.0 <= c.t0);
        let Some(&(bseq, bt)) = n.checked_sub(1).and_then(|i| ok_syncs.get(i)) else { continue };
        let versions = &st.versions[c.service];
        let g = versions.partition_point(|(seq, _, _)| *seq < bseq);
        let Some(gi) = g.checked_sub(1) else { continue };
        checked += 1;
        let later = versions[gi + 1..].iter().take_while(|(_, t, _)| *t <= c.t1 + 1.0);
        let allowed = versions[gi].2.contains(&pod) || later.clone().any(|(_, _, eps)| eps.contains(&pod));
        if !allowed {
            violations.push(format!(
                "connection to track-{} at {:.0} ms reached {pod}, removed by the sync completed at {bt:.0} ms (version {:?})",
                c.service, c.t0, versions[gi].2
            ));
        }
        // Reached an endpoint already removed from the file, before the sync removing it was done.
        let written = writes.iter().rev().find(|(t, k, _)| *k == c.service && *t <= c.t0);
        if written.is_some_and(|(_, _, set)| !set.contains(&pod)) && allowed {
            in_flight += 1;
        }
    }

    // End to end: a tracked write until the first ok sync whose version of the Service is it.
    // A write the agent never read (the next write of that Service came first) has none.
    let mut e2e: Vec<(f64, f64)> = Vec::new();
    let mut superseded = 0usize;
    for (wi, (tw, k, set)) in writes.iter().enumerate() {
        let versions = &st.versions[*k];
        let next = writes[wi + 1..].iter().find(|w| w.1 == *k).map_or(f64::INFINITY, |w| w.0);
        let read = |(_, t, eps): &&(u64, f64, BTreeSet<IpAddr>)| *t + 1.0 >= *tw && *t <= next + 1.0 && eps == set;
        let Some(vi) = versions.iter().position(|v| read(&v)) else {
            superseded += 1;
            continue;
        };
        let vseq = versions[vi].0;
        if let Some((_, ts)) = ok_syncs.iter().find(|(seq, _)| *seq > vseq) {
            e2e.push((*ts, ts - tw));
        }
    }

    // Windows.
    let window = args.sample_seconds as f64 * 1000.0;
    let mut samples = Vec::new();
    for &(t, kib) in &rss {
        let in_w = |x: f64| x > t - window && x <= t;
        let mut d: Vec<f64> = st.syncs.iter().filter(|s| s.2 && in_w(s.1)).map(|s| s.3).collect();
        let mut e: Vec<f64> = e2e.iter().filter(|x| in_w(x.0)).map(|x| x.1).collect();
        samples.push(Sample {
            t: (t - start_ms) / 1000.0,
            rss_mib: kib as f64 / 1024.0,
            syncs: d.len(),
            sync_p50: percentile(&mut d, 0.5),
            sync_p99: percentile(&mut d, 0.99),
            e2e_p50: percentile(&mut e, 0.5),
            e2e_p99: percentile(&mut e, 0.99),
            events: (((t - start_ms) / 1000.0) * args.rate as f64) as u64,
            connections: conns.iter().filter(|c| in_w(c.t0)).count(),
        });
    }
    let mut all_d: Vec<f64> = st
        .syncs
        .iter()
        .filter(|s| s.2 && s.1 >= start_ms && s.1 <= start_ms + churned.as_secs_f64() * 1000.0)
        .map(|s| s.3)
        .collect();
    let mut all_e: Vec<f64> = e2e.iter().map(|x| x.1).collect();
    let in_churn = |t: f64| t >= start_ms && t <= start_ms + churned.as_secs_f64() * 1000.0;
    let mut all_r: Vec<f64> = st.syncs.iter().filter(|s| s.2 && in_churn(s.1)).map(|s| s.4).collect();
    let served = conns.iter().filter(|c| c.served.is_some()).count();
    // Memory: the first minute (after warm-up) against the last.
    let rss_at = |from: f64, to: f64| {
        let mut v: Vec<f64> = samples.iter().filter(|s| s.t >= from && s.t < to).map(|s| s.rss_mib).collect();
        percentile(&mut v, 0.5)
    };
    let secs = churned.as_secs_f64();
    let span = 60f64.min(secs / 4.0);
    let slack = args.sample_seconds as f64 / 2.0;
    let (early, late) = (rss_at(0.0, span + slack), rss_at(secs - span - slack, secs + slack));
    let memory = Memory::of(&samples, secs);

    std::fs::create_dir_all(&args.out)?;
    let machine = machine();
    let mut md = String::new();
    let _ = writeln!(md, "# Churn under load\n");
    let _ = writeln!(
        md,
        "`cargo run --release -p switchyard-tests --example churn -- --seconds {} --services {} --endpoints {} --rate {} --backend {}` (seed {seed}), {machine}.\n",
        args.seconds, args.services, args.endpoints, args.rate, args.backend
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| Services × endpoints | {} × {} (+ {} tracked Services on real pods) |",
        args.services, args.endpoints, args.tracked
    );
    let _ = writeln!(md, "| first load (write to programmed) | {:.1} s |", load_took.as_secs_f64());
    let _ = writeln!(
        md,
        "| churn | {secs:.0} s, {events} endpoint changes = {:.0} /s, {} files of {} Services |",
        events as f64 / secs,
        files,
        args.per_file
    );
    let _ = writeln!(
        md,
        "| syncs | {} ok, {failures} failed, {} stream snapshots (1 = no resync) |",
        ok_syncs.len(),
        st.snapshots
    );
    let _ = writeln!(
        md,
        "| sync duration (render + kernel) | p50 {:.0} ms, p99 {:.0} ms; of which rendering p50 {:.0} ms, p99 {:.0} ms |",
        percentile(&mut all_d, 0.5),
        percentile(&mut all_d, 0.99),
        percentile(&mut all_r, 0.5),
        percentile(&mut all_r, 0.99)
    );
    let _ = writeln!(
        md,
        "| manifest written → sync completed (tracked) | p50 {:.0} ms, p99 {:.0} ms ({} changes; {superseded} rewritten before the agent read them) |",
        percentile(&mut all_e, 0.5),
        percentile(&mut all_e, 0.99),
        all_e.len()
    );
    let _ = writeln!(
        md,
        "| connections | {} made, {served} served, {} failed {:?} |",
        conns.len(),
        conns.len() - served,
        errors
    );
    let _ = writeln!(
        md,
        "| **stale endpoint after its removal synced** | **{}** of {checked} checked connections |",
        violations.len()
    );
    let _ = writeln!(md, "| reached a removed endpoint before its sync completed (allowed) | {in_flight} |");
    let _ = writeln!(
        md,
        "| agent RSS | median {early:.0} MiB in the first minute, {late:.0} MiB in the last; max {:.0} MiB |",
        samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max)
    );
    let _ = writeln!(
        md,
        "| **agent RSS over t = {:.0}–{:.0} s** | **{}**: least-squares slope {:+.2} MiB/min (flat: within ±{FLAT_MIB_PER_MIN} MiB/min), range {:.0}–{:.0} MiB over {} samples |",
        memory.from,
        secs,
        if memory.flat() { "flat" } else { "not flat" },
        memory.slope_per_min,
        memory.min,
        memory.max,
        memory.samples
    );
    let _ = writeln!(md, "\nEvery {} s (sync figures over the window before):\n", args.sample_seconds);
    let _ = writeln!(
        md,
        "| t (s) | RSS (MiB) | syncs | sync p50 (ms) | sync p99 (ms) | e2e p50 (ms) | e2e p99 (ms) | connections |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    let every = (30 / args.sample_seconds.max(1)).max(1) as usize;
    let mut csv = "t_s,rss_mib,syncs,sync_p50_ms,sync_p99_ms,e2e_p50_ms,e2e_p99_ms,events,connections\n".to_string();
    for (i, s) in samples.iter().enumerate() {
        let _ = writeln!(
            csv,
            "{:.1},{:.1},{},{:.1},{:.1},{:.1},{:.1},{},{}",
            s.t, s.rss_mib, s.syncs, s.sync_p50, s.sync_p99, s.e2e_p50, s.e2e_p99, s.events, s.connections
        );
        if i % every == 0 || i + 1 == samples.len() {
            let _ = writeln!(
                md,
                "| {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                s.t, s.rss_mib, s.syncs, s.sync_p50, s.sync_p99, s.e2e_p50, s.e2e_p99, s.connections
            );
        }
    }
    for v in violations.iter().take(10) {
        let _ = writeln!(md, "\n- {v}");
    }
    std::fs::write(args.out.join("churn.md"), &md)?;
    std::fs::write(args.out.join("churn.csv"), &csv)?;
    plot(&args.out.join("churn.svg"), &samples, &memory).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    println!("{md}");
    eprintln!("churn: wrote {}/churn.md, churn.svg, churn.csv", args.out.display());
    if !violations.is_empty() {
        bail!("{} connections reached an endpoint after the sync that removed it", violations.len());
    }
    if checked == 0 {
        bail!("no connection could be checked");
    }
    if secs >= FLAT_MIN_SECONDS && !memory.flat() {
        bail!(
            "the agent's memory is not flat: {:+.2} MiB/min over the last {:.0} s",
            memory.slope_per_min,
            secs - memory.from
        );
    }
    Ok(())
}

/// The slope, in MiB per minute, under which the agent's RSS counts as flat. Growth at that rate
/// would be 60 MiB an hour, a sixth of the agent's size here; the leak this guards against (every
/// sync event named all its services and 500 were kept) grew about 6 MiB/min.
const FLAT_MIB_PER_MIN: f64 = 1.0;
/// Runs shorter than this only report the memory figures: the window would be mostly warm-up.
const FLAT_MIN_SECONDS: f64 = 300.0;

/// The agent's RSS over the second half of the run (at most its last 5 minutes): the first
/// minutes are warm-up (the journal of 10,000 events, the broadcast ring and the snapshot's
/// recent events fill, and the allocator reaches its working set).
struct Memory {
    /// Where the window starts (s).
    from: f64,
    samples: usize,
    /// Of a least-squares line through the window's samples.
    slope_per_min: f64,
    /// The fit's value at `from`, for the plot.
    intercept: f64,
    min: f64,
    max: f64,
}

impl Memory {
    fn of(samples: &[Sample], secs: f64) -> Memory {
        let from = secs - (secs / 2.0).min(300.0);
        let w: Vec<(f64, f64)> = samples.iter().filter(|s| s.t >= from).map(|s| (s.t - from, s.rss_mib)).collect();
        let n = w.len() as f64;
        let (mx, my) = (w.iter().map(|p| p.0).sum::<f64>() / n, w.iter().map(|p| p.1).sum::<f64>() / n);
        let sxx: f64 = w.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = w.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let slope = if sxx > 0.0 { sxy / sxx } else { f64::NAN };
        Memory {
            from,
            samples: w.len(),
            slope_per_min: slope * 60.0,
            intercept: my - slope * mx,
            min: w.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
            max: w.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
        }
    }

    fn flat(&self) -> bool {
        self.slope_per_min.abs() <= FLAT_MIB_PER_MIN
    }
}

/// CPU model, cores and kernel, for the table.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpu.lines().find_map(|l| l.strip_prefix("model name")?.split(':').nth(1)).unwrap_or("?").trim().to_string();
    let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, Linux {}", kernel.trim())
}

/// Sync latency (top) and agent RSS (bottom) over time.
fn plot(path: &std::path::Path, samples: &[Sample], memory: &Memory) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);
    let t_max = samples.iter().map(|s| s.t).fold(1.0, f64::max);
    let finite = |v: f64| if v.is_finite() { Some(v) } else { None };
    let y_max =
        samples.iter().flat_map(|s| [s.sync_p99, s.e2e_p99]).filter(|v| v.is_finite()).fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&top)
        .caption("sync latency (ms)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    c.configure_mesh().x_desc("time (s)").draw()?;
    let series = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        samples.iter().filter_map(|s| finite(f(s)).map(|v| (s.t, v))).collect()
    };
    c.draw_series(LineSeries::new(series(|s| s.sync_p50), &BLUE))?
        .label("sync p50")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(series(|s| s.sync_p99), &RED))?
        .label("sync p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    c.draw_series(LineSeries::new(series(|s| s.e2e_p99), &MAGENTA))?
        .label("write→synced p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
    c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    let m_max = samples.iter().map(|s| s.rss_mib).fold(1.0, f64::max) * 1.2;
    let mut m = ChartBuilder::on(&bottom)
        .caption("agent RSS (MiB)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..m_max)?;
    m.configure_mesh().x_desc("time (s)").draw()?;
    m.draw_series(LineSeries::new(samples.iter().map(|s| (s.t, s.rss_mib)), &GREEN))?
        .label("RSS")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    if memory.slope_per_min.is_finite() {
        let fit = |t: f64| memory.intercept + memory.slope_per_min / 60.0 * (t - memory.from);
        m.draw_series(LineSeries::new([(memory.from, fit(memory.from)), (t_max, fit(t_max))], BLACK.stroke_width(2)))?
            .label(format!("least-squares fit: {:+.2} MiB/min", memory.slope_per_min))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    m.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
