//! Fault injection in the lab: after each fault, real connections must still land where the
//! tracer says, and rules Switchyard does not own (an nftables table, an iptables rule, added
//! before the agent starts) must be untouched.
//!
//! The agent is the `switchyard` binary in a one-node lab (three pods, the external client),
//! started by `ip netns exec`, so it runs the kernel tools found through its own `PATH`:
//!
//! - `kernel_refuses_transactions_{nftables,iptables}`: `PATH` starts with a folder of shims
//!   (`nft`, `*-restore`) that refuse every transaction while a flag file exists and otherwise
//!   exec the real tool. With the flag set the manifests change: the kernel must keep the last
//!   good program (connections go where the tracer of the *old* cluster says, which fails if any
//!   part of the new one was applied: every Service checked has different endpoints in the two
//!   versions), the agent must count the failures, turn `/healthz` to 503 and retry with a
//!   growing backoff; once the flag is gone a retry heals (routing as the *new* cluster says).
//! - `agent_killed_at_random_points`: SIGKILL after a random delay (seeded:
//!   `SWITCHYARD_FAULT_SEED` replays a run) following a manifests change (two Services and
//!   1,500 bulk Services' endpoints) or a fresh start (its full sync), five times; after each
//!   restart routing follows the cluster.
//! - `half_written_manifests`: a file truncated mid-document, emptied, and written in two steps:
//!   the agent reports the parse error, keeps the file's last good objects, and routing follows
//!   the file once it is whole.
//!
//! The other faults of the hardening issue are tested beside their code: the conntrack socket
//! overflowing in `tests/tests/flows.rs` (`observer_recovers_from_an_overflow`), the Kubernetes
//! watch dropping and answering `410 Gone` in `native-agent/tests/kube_source.rs`.
//!
//! Root only; skipped with the reason printed otherwise. Every namespace, the shims and the logs
//! are removed on every exit path (the [`Lab`] guard, [`Shim`]'s drop, [`lab::sweep`] for a
//! killed run). Traffic stays inside the lab's namespaces.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use switchyard_agent::agent::BackendChoice;
use switchyard_agent::lab::{self, Lab, LabNode, LabSpec, Svc};
use switchyard_engine::cluster::Cluster;
use switchyard_engine::trace::Verdict;
use switchyard_tests::differential::{
    AgentProcess, Case, Foreign, Origin, Rng, case, children, load, plan_backend, prediction, run_case, source_of, svc,
    switchyard_binary, trace, wait_until,
};

/// Unhealthy after this many failures in a row (`metrics::UNHEALTHY_AFTER_FAILURES`).
const UNHEALTHY_AFTER: f64 = 3.0;

/// The root, tools and binary the tests need, or why they are skipped.
fn prerequisites() -> Option<PathBuf> {
    // Every fault test adds a foreign iptables rule, whatever the backend: it needs both tools.
    if let Some(why) = lab::skip_reason(BackendChoice::Iptables) {
        eprintln!("skipped: {why}");
        return None;
    }
    let bin = switchyard_binary();
    if bin.is_none() {
        eprintln!("skipped: no switchyard binary beside the tests (cargo build -p switchyard-agent)");
    }
    bin
}

fn build(tag: &str, backend: BackendChoice) -> (Lab, LabNode) {
    let lab = Lab::build(&LabSpec { tag: tag.into(), nodes: 1, pods_per_node: 3, backend }).expect("the lab builds");
    let node = lab.nodes[0].clone();
    (lab, node)
}

/// The Services in version 0 (before a change) or 1 (after): every one that is checked has
/// different endpoints in the two, and one Service is replaced by another.
fn services(v: u8) -> Vec<Svc> {
    let (web, change): (&[&str], &[&str]) =
        if v == 0 { (&["n1-p0", "n1-p1"], &["n1-p0"]) } else { (&["n1-p2"], &["n1-p1", "n1-p2"]) };
    vec![
        Svc { node_port: Some(30080), ..svc("web", "NodePort", "10.96.0.10", web) },
        svc("change", "ClusterIP", "10.96.0.20", change),
        svc("hairpin", "ClusterIP", "10.96.0.14", &["n1-p2"]),
        svc("empty", "ClusterIP", "10.96.0.15", &[]),
        if v == 0 {
            svc("gone", "ClusterIP", "10.96.0.30", &["n1-p1"])
        } else {
            svc("added", "ClusterIP", "10.96.0.31", &["n1-p0"])
        },
    ]
}

fn write_services(lab: &Lab, v: u8) {
    let yaml: String = services(v).iter().map(|s| s.yaml(lab)).collect();
    lab.write("10-services.yaml", &yaml).expect("services");
}

/// The connections made after a fault, for version `v`.
fn cases(v: u8) -> Vec<Case> {
    let (c, p0, p2) = (Origin::Client, Origin::Pod("n1-p0"), Origin::Pod("n1-p2"));
    vec![
        case("ClusterIP from a pod", p2, "node-1", "10.96.0.10:80"),
        case("NodePort from outside", c, "node-1", "192.168.77.11:30080"),
        case("changed endpoints", p0, "node-1", "10.96.0.20:80"),
        case("hairpin", p2, "node-1", "10.96.0.14:80"),
        case("no endpoints: refused", p0, "node-1", "10.96.0.15:80"),
        if v == 0 {
            case("the Service version 1 removes", p0, "node-1", "10.96.0.30:80")
        } else {
            case("the Service version 1 adds", p0, "node-1", "10.96.0.31:80")
        },
    ]
}

/// Runs `cases` against the tracer of `cluster`; the problems, prefixed with `when`.
fn check(lab: &Lab, cluster: &Cluster, cases: &[Case], when: &str, report: &mut String) -> Vec<String> {
    let _ = writeln!(report, " {when}:");
    let pb = plan_backend(lab.backend);
    cases.iter().flat_map(|c| run_case(lab, cluster, pb, c, report)).map(|p| format!("{when}: {p}")).collect()
}

/// A folder of kernel-tool shims put first on the agent's `PATH`: while [`Shim::refuse`] is on,
/// every transaction (`nft -f`, any `*tables*-restore`) fails as a kernel refusing it would
/// (exit 1, a message on stderr, nothing applied) and is logged with its time; reads (`nft list`)
/// and everything else exec the real tool. Removed on drop.
struct Shim {
    dir: PathBuf,
}

impl Shim {
    fn new(lab: &Lab) -> Shim {
        // Named like the lab, so `lab::sweep` removes it after a killed run.
        let dir = std::env::temp_dir().join(format!("{}shim", lab.prefix));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("shim folder");
        let shim = Shim { dir };
        let tools = ["nft", "iptables-restore", "ip6tables-restore", "iptables-nft-restore", "ip6tables-nft-restore"];
        let legacy = ["iptables-legacy-restore", "ip6tables-legacy-restore"];
        for tool in tools.iter().chain(&legacy) {
            let Some(real) = which(tool) else { continue };
            // nft: only `-f` loads a transaction; a restore is always one.
            let is_transaction =
                if *tool == "nft" { "for a in \"$@\"; do [ \"$a\" = -f ] && tx=1; done" } else { "tx=1" };
            let script = format!(
                "#!/bin/sh\n# Switchyard fault test: refuse transactions while {flag} exists.\ntx=0\n{is_transaction}\nif [ $tx = 1 ] && [ -e '{flag}' ]; then\n  cat > /dev/null\n  echo \"$(date +%s.%N) {tool} $*\" >> '{log}'\n  echo '{tool}: Operation not permitted (refused by the fault test)' >&2\n  exit 1\nfi\nexec '{real}' \"$@\"\n",
                flag = shim.flag().display(),
                log = shim.refusals().display(),
                real = real.display(),
            );
            let path = shim.dir.join(tool);
            std::fs::write(&path, script).expect("shim");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        }
        shim
    }

    fn flag(&self) -> PathBuf {
        self.dir.join("refuse")
    }

    fn refusals(&self) -> PathBuf {
        self.dir.join("refused.log")
    }

    fn refuse(&self, on: bool) {
        if on {
            std::fs::write(self.flag(), "").expect("flag");
        } else {
            std::fs::remove_file(self.flag()).expect("flag removed");
        }
    }

    /// When each refused transaction was attempted (seconds since the epoch).
    fn refused(&self) -> Vec<f64> {
        let text = std::fs::read_to_string(self.refusals()).unwrap_or_default();
        text.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect()
    }

    /// The agent's `PATH`: the shims first, then this process's.
    fn path(&self) -> OsString {
        let mut dirs = vec![self.dir.clone()];
        dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        std::env::join_paths(dirs).expect("PATH")
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The absolute path of `tool` on this process's `PATH`.
fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// A log file beside the lab's manifests, removed with the lab by `lab::sweep`'s naming.
fn log_path(lab: &Lab) -> PathBuf {
    std::env::temp_dir().join(format!("{}agent.log", lab.prefix))
}

fn kernel_refuses(backend: BackendChoice, tag: &str) {
    let Some(bin) = prerequisites() else { return };
    let (lab, node) = build(tag, backend);
    let foreign = Foreign::add(&node).expect("foreign rules");
    let shim = Shim::new(&lab);
    let log = log_path(&lab);
    write_services(&lab, 0);
    let agent = AgentProcess::start(&bin, &lab, &node, Some(&shim.path()), &log).expect("the agent starts");
    agent.wait_synced(1.0, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let old = load(&lab);
    let mut report = format!("kernel refusing transactions, {}:\n", backend.as_str());
    let mut problems = check(&lab, &old, &cases(0), "before the fault", &mut report);

    shim.refuse(true);
    let refused_at = Instant::now();
    write_services(&lab, 1);
    let new = load(&lab);
    let unhealthy = wait_until("/healthz to answer 503", Duration::from_secs(30), || {
        agent.get("/healthz").is_some_and(|(code, _)| code == 503)
    });
    let (_, health) = agent.get("/healthz").unwrap_or_default();
    let failures = agent.metric("switchyard_sync_failures_total").unwrap_or(0.0);
    let _ = writeln!(report, " unhealthy after {:?}: {failures} failed syncs, /healthz {health}", refused_at.elapsed());
    if let Err(e) = unhealthy {
        problems.push(format!("{e}; log:\n{}", agent.log_text()));
    }
    if failures < UNHEALTHY_AFTER || !health.contains("refused by the fault test") {
        problems.push(format!("failures not reported: {failures} failed syncs, /healthz {health}"));
    }
    // The last good program, whole: the tracer of the old cluster, none of the new.
    problems.extend(check(&lab, &old, &cases(0), "while the kernel refuses", &mut report));
    // The check has teeth: every case whose prediction differs between the versions fails
    // against the new cluster now, so any part of the new program in the kernel would be seen.
    let pb = plan_backend(backend);
    let mut scratch = String::new();
    let mut telling = 0;
    for c in cases(1) {
        let (_, from) = source_of(&lab, c.from);
        let t = |cl: &Cluster| prediction(&trace(cl, pb, c.node, from, c.to, c.proto));
        let (was, will) = (t(&old), t(&new));
        // Services in both versions only: one the kernel does not have yet would cost timeouts.
        if was != will && was.0 == Verdict::Forward && will.0 == Verdict::Forward {
            telling += 1;
            if run_case(&lab, &new, pb, &c, &mut scratch).is_empty() {
                problems.push(format!("while the kernel refuses, {} already routes as the new cluster says", c.name));
            }
        }
    }
    let _ = writeln!(report, " {telling} cases tell the versions apart; none routes as the new cluster says");
    let listing = lab.listing(&node);
    if !listing.contains("10.96.0.30") || listing.contains("10.96.0.31") {
        problems.push(format!("while the kernel refuses, the kernel holds part of the new program:\n{listing}"));
    }
    // Retries back off: each wait at least the initial second, and growing. One sync may run
    // `nft -f` twice (nftables: the netlink applier stages a full program's declarations with
    // `nft`, and when that is refused the program itself goes through `nft` for its error), so
    // refusals closer than half a second are one attempt.
    let mut times = shim.refused();
    times.dedup_by(|later, first| *later - *first < 0.5);
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let _ = writeln!(report, " refused transactions {}, gaps between them {gaps:.2?} s", times.len());
    // Doubling from the first second (then capped, with the binary's defaults at 30 s).
    let backs_off =
        gaps.len() >= 2 && gaps[0] >= 0.8 && gaps[1] > 1.5 * gaps[0] && gaps.windows(2).all(|w| w[1] >= 0.95 * w[0]);
    if !backs_off {
        problems.push(format!("no growing backoff between refused transactions: gaps {gaps:?} s"));
    }

    shim.refuse(false);
    let healed_at = Instant::now();
    if let Err(e) =
        lab.wait_programmed_on(std::slice::from_ref(&node), &["10.96.0.31"], &["10.96.0.30"], Duration::from_secs(60))
    {
        problems.push(format!("never healed: {e}; log:\n{}", agent.log_text()));
    }
    if let Err(e) = wait_until("/healthz to answer 200", Duration::from_secs(30), || {
        agent.get("/healthz").is_some_and(|(code, _)| code == 200)
    }) {
        problems.push(e);
    }
    let _ = writeln!(report, " healed {:?} after the kernel accepted again", healed_at.elapsed());
    problems.extend(check(&lab, &new, &cases(1), "after healing", &mut report));
    problems.extend(foreign.problems());
    eprintln!("{report}");
    drop(agent);
    let _ = std::fs::remove_file(&log);
    drop(lab);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn kernel_refuses_transactions_nftables() {
    kernel_refuses(BackendChoice::Nftables, "fn");
}

#[test]
fn kernel_refuses_transactions_iptables() {
    kernel_refuses(BackendChoice::Iptables, "fi");
}

/// Bulk Services whose endpoints move with the version: a change is a transaction of thousands
/// of lines, long enough for a random kill to land inside it.
fn bulk(lab: &Lab, v: u8) -> String {
    let eps: &[&str] = if v == 0 { &["n1-p0", "n1-p1"] } else { &["n1-p2"] };
    (0..BULK)
        .map(|i| svc(&format!("bulk-{i}"), "ClusterIP", &format!("10.96.{}.{}", 100 + i / 250, 1 + i % 250), eps))
        .map(|s| s.yaml(lab))
        .collect()
}

const BULK: usize = 1500;
const KILLS: usize = 5;

/// Where a kill lands: a transaction being loaded, or what the kernel then held.
fn kill(agent: AgentProcess, lab: &Lab, node: &LabNode) -> String {
    let running = children(agent.pid());
    drop(agent); // SIGKILL, reaped
    // A tool the agent started may still be reading what was written: let it finish.
    let alive = |p: &u32| Path::new("/proc").join(p.to_string()).exists();
    let _ =
        wait_until("the agent's tools to exit", Duration::from_secs(30), || !running.iter().map(|(p, _)| p).any(alive));
    let l = lab.listing(node);
    let held = match (l.contains("10.96.0.30"), l.contains("10.96.0.31")) {
        (true, false) => "version 0",
        (false, true) => "version 1",
        (false, false) if l.is_empty() => "no table",
        _ => "a MIX of versions",
    };
    let during: Vec<String> = running.into_iter().map(|(_, cmd)| cmd).collect();
    format!("while it ran {during:?}; the kernel then held {held}")
}

/// SIGKILL lands at random points of a sync: after a manifests change (a partial sync of
/// thousands of lines) or during the full sync of a fresh start; the delays are drawn from
/// 0..1.3 × the duration measured first. After each restart routing follows the cluster.
#[test]
fn agent_killed_at_random_points() {
    let Some(bin) = prerequisites() else { return };
    let (lab, node) = build("fk", BackendChoice::Nftables);
    let foreign = Foreign::add(&node).expect("foreign rules");
    let seed = Rng::seed_from_env("SWITCHYARD_FAULT_SEED");
    let mut rng = Rng::new(seed);
    let mut report =
        format!("SIGKILL at random points of a sync, seed {seed} (SWITCHYARD_FAULT_SEED={seed} replays it):\n");
    let log = log_path(&lab);
    let write = |v: u8| {
        write_services(&lab, v);
        lab.write("20-bulk.yaml", &bulk(&lab, v)).expect("bulk");
    };
    write(0);
    let started = Instant::now();
    let mut agent = AgentProcess::start(&bin, &lab, &node, None, &log).expect("the agent starts");
    agent.wait_synced(1.0, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"));
    let start_took = started.elapsed();
    // How long a change takes to reach the kernel, so kills can land before, in and after it.
    let changed = Instant::now();
    write(1);
    lab.wait_programmed_on(std::slice::from_ref(&node), &["10.96.0.31"], &["10.96.0.30"], Duration::from_secs(60))
        .expect("the change is programmed");
    let change_took = changed.elapsed();
    let _ = writeln!(report, " a start takes {start_took:?} to its first sync, a change {change_took:?}");
    let window = |d: Duration, rng: &mut Rng| Duration::from_millis(rng.below(d.as_millis() as u64 * 13 / 10 + 1));
    let mut problems = Vec::new();
    for round in 1..=KILLS {
        let v = ((round + 1) % 2) as u8;
        let what = if rng.below(2) == 0 {
            let delay = window(change_took, &mut rng);
            write(v);
            std::thread::sleep(delay);
            format!("wrote version {v}, killed {delay:?} later {}", kill(agent, &lab, &node))
        } else {
            drop(agent);
            write(v);
            let delay = window(start_took, &mut rng);
            let fresh = AgentProcess::start(&bin, &lab, &node, None, &log).expect("the agent starts");
            std::thread::sleep(delay);
            format!("wrote version {v}, started, killed {delay:?} into its full sync {}", kill(fresh, &lab, &node))
        };
        let restarted = Instant::now();
        agent = AgentProcess::start(&bin, &lab, &node, None, &log).expect("the agent restarts");
        let synced = agent.wait_synced(1.0, Duration::from_secs(120));
        let _ = writeln!(report, " round {round}: {what}; restarted, synced in {:?}", restarted.elapsed());
        if let Err(e) = synced {
            problems.push(format!("round {round}: {e}"));
            break;
        }
        let mut c = cases(v);
        c.push(case("a bulk Service", Origin::Pod("n1-p0"), "node-1", "10.96.105.250:80"));
        problems.extend(check(&lab, &load(&lab), &c, &format!("after restart {round}"), &mut report));
    }
    problems.extend(foreign.problems());
    eprintln!("{report}");
    drop(agent);
    let _ = std::fs::remove_file(&log);
    drop(lab);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The Service of the file that is caught half-written, in version 0 or 1.
fn extra(lab: &Lab, v: u8) -> String {
    let eps: &[&str] = if v == 0 { &["n1-p0"] } else { &["n1-p1", "n1-p2"] };
    svc("extra", "ClusterIP", "10.96.0.40", eps).yaml(lab)
}

fn extra_cases() -> Vec<Case> {
    let mut c = cases(0);
    c.push(case("the half-written file's Service", Origin::Pod("n1-p0"), "node-1", "10.96.0.40:80"));
    c
}

/// Writes in place, as a careless editor or `>` would (no hidden file and rename).
fn write_in_place(lab: &Lab, name: &str, text: &str) {
    std::fs::write(lab.manifests.join(name), text).expect("write");
}

#[test]
fn half_written_manifests() {
    let Some(bin) = prerequisites() else { return };
    let (lab, node) = build("fh", BackendChoice::Nftables);
    let foreign = Foreign::add(&node).expect("foreign rules");
    let log = log_path(&lab);
    write_services(&lab, 0);
    lab.write("20-extra.yaml", &extra(&lab, 0)).expect("extra");
    let agent = AgentProcess::start(&bin, &lab, &node, None, &log).expect("the agent starts");
    agent.wait_synced(1.0, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let old = load(&lab);
    let mut report = "half-written manifests:\n".to_string();
    let mut problems = check(&lab, &old, &extra_cases(), "whole", &mut report);

    // Cut inside an endpoint's flow mapping: not YAML, so it cannot pass for a shorter file.
    let whole = extra(&lab, 1);
    let mark = "{ready: t";
    let cut = whole.find(mark).map(|i| i + mark.len()).expect("a cut point");
    let reported = |since: usize| {
        wait_until("the parse error in the log", Duration::from_secs(10), || {
            let l = agent.log_text();
            l.get(since..).is_some_and(|new| new.contains("20-extra.yaml") && new.contains("keeping the last good"))
        })
    };

    let since = agent.log_text().len();
    write_in_place(&lab, "20-extra.yaml", &whole[..cut]);
    if let Err(e) = reported(since) {
        problems.push(format!("truncated file: {e}; log:\n{}", agent.log_text()));
    }
    problems.extend(check(&lab, &old, &extra_cases(), "truncated mid-document", &mut report));

    write_in_place(&lab, "20-extra.yaml", "");
    // An empty file is not an error (it is kept, see `source.rs`): give the agent time to read it.
    std::thread::sleep(Duration::from_millis(500));
    problems.extend(check(&lab, &old, &extra_cases(), "emptied", &mut report));

    // Two steps: the first half, a pause, then the rest appended.
    let since = agent.log_text().len();
    write_in_place(&lab, "20-extra.yaml", &whole[..cut]);
    if let Err(e) = reported(since) {
        problems.push(format!("first half: {e}"));
    }
    problems.extend(check(&lab, &old, &extra_cases(), "first of two writes", &mut report));
    let written = agent.metric("switchyard_syncs_written_total").unwrap_or(0.0);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(lab.manifests.join("20-extra.yaml")).expect("opens");
        f.write_all(&whole.as_bytes()[cut..]).expect("appends");
    }
    if let Err(e) = agent.wait_synced(written + 1.0, Duration::from_secs(30)) {
        problems.push(format!("the completed file was not synced: {e}"));
    }
    let new = load(&lab);
    problems.extend(check(&lab, &new, &extra_cases(), "completed", &mut report));
    problems.extend(foreign.problems());
    eprintln!("{report}");
    drop(agent);
    let _ = std::fs::remove_file(&log);
    drop(lab);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
