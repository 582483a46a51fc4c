//! Real-kernel loading: every program `render` writes must load, and so must every incremental
//! transaction applied on top of the program before it.
//!
//! For each scenario cluster (this repository's, the public contract-check ones, and the built-in
//! demo cluster) and each of
//! its nodes: the full program is loaded into a fresh network namespace (`nft -f -`, or
//! `iptables-restore` / `ip6tables-restore` for the sections after the `# ip6tables-restore`
//! line), then the transactions of `switchyard_tests::changes::steps` are applied in order
//! (`--noflush` for iptables). After each transaction the namespace's ruleset must equal what the
//! full program of the new cluster gives in a second namespace: the incremental path and the full
//! path end in the same kernel state.
//!
//! Skipped, with the reason printed, when not root or when the tools are missing. Programs that
//! fail to load are written to `tests/artifacts/kernel/` for inspection.

use std::fmt::Write as _;
use std::path::PathBuf;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::policy::Backend;
use switchyard_tests::changes;
use switchyard_tests::listing::{normalize_iptables, normalize_nft, split_iptables};
use switchyard_tests::netns::{self, Netns};
use switchyard_tests::scenario;

/// How one backend loads programs and lists what the kernel holds.
trait Loader {
    const BACKEND: Backend;
    const TOOLS: &'static [&'static str];
    fn load(ns: &Netns, program: &str, incremental: bool) -> Result<(), String>;
    /// The kernel's state, normalised so that equal rulesets compare equal.
    fn state(ns: &Netns) -> Result<Vec<String>, String>;
}

struct Nftables;

impl Loader for Nftables {
    const BACKEND: Backend = Backend::Nftables;
    const TOOLS: &'static [&'static str] = &["nft"];
    fn load(ns: &Netns, program: &str, _incremental: bool) -> Result<(), String> {
        ns.exec("nft", &["-f", "-"], Some(program)).map(drop)
    }
    fn state(ns: &Netns) -> Result<Vec<String>, String> {
        ns.exec("nft", &["list", "ruleset"], None).map(|s| normalize_nft(&s))
    }
}

struct Iptables;

impl Loader for Iptables {
    const BACKEND: Backend = Backend::Iptables;
    const TOOLS: &'static [&'static str] =
        &["iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save"];
    fn load(ns: &Netns, program: &str, incremental: bool) -> Result<(), String> {
        let (v4, v6) = split_iptables(program);
        let args: &[&str] = if incremental { &["--noflush"] } else { &[] };
        for (tool, part) in [("iptables-restore", v4), ("ip6tables-restore", v6)] {
            if part.lines().any(|l| l.starts_with('*')) {
                ns.exec(tool, args, Some(part))?;
            }
        }
        Ok(())
    }
    fn state(ns: &Netns) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for (family, tool) in [("ipv4", "iptables-save"), ("ipv6", "ip6tables-save")] {
            out.extend(normalize_iptables(&ns.exec(tool, &[], None)?).into_iter().map(|l| format!("{family} {l}")));
        }
        Ok(out)
    }
}

/// The IPVS backend, through the agent's real applier run inside the namespace. This kernel may
/// have no IPVS module: then the `ipvsadm -R` part is skipped (said plainly by the test) and the
/// virtual servers are checked by the tracer and the parse-back tests instead; likewise the
/// `ip -batch` part when the kernel has no dummy interface type.
struct Ipvs;

impl Loader for Ipvs {
    const BACKEND: Backend = Backend::Ipvs;
    const TOOLS: &'static [&'static str] =
        &["ipset", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save"];
    fn load(ns: &Netns, program: &str, incremental: bool) -> Result<(), String> {
        use switchyard_agent::apply::ipvs::{IpvsApplier, Kernel, Transaction, ipvs_available};
        use switchyard_engine::render::ipvs::Section;
        let mut k = Kernel::in_netns(ns.name());
        if !ipvs_available() {
            k = k.without(Section::Ipvsadm);
        }
        if !dummy_available() {
            k = k.without(Section::Ip);
        }
        let t = if incremental { Transaction::from_transaction(program) } else { Transaction::from_program(program) };
        k.apply(&t).map_err(|e| e.to_string())
    }
    fn state(ns: &Netns) -> Result<Vec<String>, String> {
        let mut out = Iptables::state(ns)?;
        // `ipset save` as sorted lines, without the kernel's per-set random initval.
        for line in ns.exec("ipset", &["save"], None)?.lines() {
            let kept: Vec<&str> = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["create", name, kind, ..] => vec!["create", name, kind],
                words => words.to_vec(),
            };
            out.push(format!("ipset {}", kept.join(" ")));
        }
        let addrs = ns.exec("ip", &["-o", "addr", "show", "dev", "kube-ipvs0"], None).unwrap_or_default();
        out.extend(addrs.lines().filter_map(|l| l.split_whitespace().nth(3)).map(|a| format!("kube-ipvs0 {a}")));
        out.sort();
        Ok(out)
    }
}

/// Whether this kernel can make dummy interfaces (tried once, in a throwaway namespace).
fn dummy_available() -> bool {
    static DUMMY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DUMMY.get_or_init(|| {
        Netns::new().is_ok_and(|ns| ns.exec("ip", &["link", "add", "sy-probe0", "type", "dummy"], None).is_ok())
    })
}

/// Saves a program that did not load, and says where.
fn save_artifact<L: Loader>(scenario: &str, node: &str, step: usize, program: &str) -> String {
    let dir = switchyard_tests::workspace_root().join("tests/artifacts/kernel").join(L::BACKEND.as_str());
    let path: PathBuf = dir.join(format!("{scenario}-{node}-{step}.txt"));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, program)) {
        Ok(()) => format!("(program saved to {})", path.display()),
        Err(e) => format!("(could not save the program: {e})"),
    }
}

/// The first lines of a tool's complaint.
fn first_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let mut out = lines.iter().take(n).copied().collect::<Vec<_>>().join("\n    ");
    if lines.len() > n {
        out.push_str(&format!("\n    ... ({} more lines)", lines.len() - n));
    }
    out
}

/// Loads one node's programs and transactions; returns (programs loaded, transactions loaded).
fn check_node<L: Loader>(name: &str, cluster: &Cluster, node: &str, failures: &mut Vec<String>) -> (usize, usize) {
    let at = |step: &str| format!("{} {name} node {node}: {step}", L::BACKEND.as_str());
    let (ns, reference) = match (Netns::new(), Netns::new()) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            failures.push(format!(
                "{}: cannot make a network namespace: {}",
                at("setup"),
                a.err().or(b.err()).unwrap_or_default()
            ));
            return (0, 0);
        }
    };
    let full = match switchyard_engine::render(cluster, node, L::BACKEND) {
        Ok(p) => p,
        Err(e) => {
            failures.push(format!("{}: render failed: {e}", at("full program")));
            return (0, 0);
        }
    };
    if full.trim().is_empty() || (L::BACKEND == Backend::Iptables && !full.lines().any(|l| l.starts_with('*'))) {
        failures.push(format!("{}: render wrote no program", at("full program")));
        return (0, 0);
    }
    if let Err(e) = L::load(&ns, &full, false) {
        let saved = save_artifact::<L>(name, node, 0, &full);
        failures.push(format!("{}: the kernel refused it {saved}:\n    {}", at("full program"), first_lines(&e, 12)));
        return (0, 0);
    }
    let (mut programs, mut transactions) = (1, 0);
    let mut prev = cluster.clone();
    for (i, step) in changes::steps(cluster).into_iter().enumerate() {
        let what = at(&step.what);
        let tx = match switchyard_engine::render_incremental(&prev, &step.cluster, node, L::BACKEND) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{what}: render_incremental failed: {e}"));
                return (programs, transactions);
            }
        };
        if let Err(e) = L::load(&ns, &tx, true) {
            let saved = save_artifact::<L>(name, node, i + 1, &tx);
            failures.push(format!("{what}: the kernel refused the transaction {saved}:\n    {}", first_lines(&e, 12)));
            return (programs, transactions);
        }
        transactions += 1;
        // The incremental path must end where the full program of the new cluster does.
        let new_full = match switchyard_engine::render(&step.cluster, node, L::BACKEND) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{what}: render failed: {e}"));
                return (programs, transactions);
            }
        };
        if let Err(e) = L::load(&reference, &new_full, false) {
            let saved = save_artifact::<L>(name, node, i + 1, &new_full);
            failures.push(format!("{what}: the kernel refused the full program {saved}:\n    {}", first_lines(&e, 12)));
            return (programs, transactions);
        }
        programs += 1;
        match (L::state(&ns), L::state(&reference)) {
            (Ok(got), Ok(want)) if got != want => {
                let saved = save_artifact::<L>(
                    name,
                    node,
                    i + 1,
                    &format!("{tx}\n# ---- full program of the new cluster\n{new_full}"),
                );
                let extra: Vec<&String> = got.iter().filter(|l| !want.contains(l)).take(5).collect();
                let missing: Vec<&String> = want.iter().filter(|l| !got.contains(l)).take(5).collect();
                failures.push(format!(
                    "{what}: after the transaction the kernel differs from the full program {saved}\n    only after the transaction: {extra:?}\n    only in the full program: {missing:?}"
                ));
                return (programs, transactions);
            }
            (Err(e), _) | (_, Err(e)) => failures.push(format!("{what}: cannot list the ruleset: {e}")),
            _ => {}
        }
        prev = step.cluster;
    }
    (programs, transactions)
}

fn check_backend<L: Loader>() {
    if let Some(why) = netns::skip_reason(L::TOOLS) {
        println!("skipped {} kernel tests: {why}", L::BACKEND.as_str());
        return;
    }
    let mut roots = vec![switchyard_tests::repo_scenarios()];
    roots.extend(switchyard_tests::shared_scenarios());
    let mut failures = Vec::new();
    // One print at the end: tests run in parallel and their lines would interleave.
    let mut table = format!("\n{} programs in network namespaces\n", L::BACKEND.as_str());
    let _ = writeln!(table, "{:<40} {:>5} {:>9} {:>13}", "scenario", "nodes", "programs", "transactions");
    // Every scenario cluster, and the built-in demo cluster (three nodes, every kind of service).
    let mut clusters: Vec<(String, Result<Cluster, String>)> = Vec::new();
    for root in roots {
        clusters.extend(scenario::scenarios(&root).into_iter().map(|s| (s.name.clone(), s.cluster())));
    }
    clusters.push(("demo".to_string(), Ok(switchyard_engine::demo::cluster())));
    for (name, cluster) in clusters {
        let cluster = match cluster {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{name}: cannot read the cluster: {e}"));
                continue;
            }
        };
        let (mut programs, mut transactions) = (0, 0);
        for node in cluster.nodes.keys() {
            let (p, t) = check_node::<L>(&name, &cluster, node, &mut failures);
            programs += p;
            transactions += t;
        }
        let _ = writeln!(table, "{name:<40} {:>5} {programs:>9} {transactions:>13}", cluster.nodes.len());
    }
    for f in &failures {
        let _ = writeln!(table, "FAIL {f}");
    }
    print!("{table}");
    assert!(failures.is_empty(), "{} kernel check(s) fail; see the FAIL lines above", failures.len());
}

/// Every nftables program and transaction loads with `nft -f`, and transactions end where the
/// full program does.
#[test]
fn nftables_programs_load() {
    check_backend::<Nftables>();
}

/// Every iptables program loads with `iptables-restore`/`ip6tables-restore`, every transaction
/// with `--noflush`, and transactions end where the full program does.
#[test]
fn iptables_programs_load() {
    check_backend::<Iptables>();
}

/// Every IPVS program's ipset and iptables parts (and its dummy interface addresses) load into a
/// fresh namespace with the agent's applier, transactions too, ending where the full program
/// does. The virtual servers need the IPVS module, which this kernel may not have.
#[test]
fn ipvs_programs_load() {
    // Straight to the process's stderr, past the test harness's capture: CI's log must say what
    // this kernel could not check.
    let say = |line: &str| {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{line}");
    };
    if netns::skip_reason(Ipvs::TOOLS).is_none() {
        if !switchyard_agent::apply::ipvs::ipvs_available() {
            say("ipvs kernel test: the `ipvsadm -R` part (virtual servers) is SKIPPED because the IPVS module is \
                 missing (no /proc/net/ip_vs); the ipset and iptables parts are loaded and compared");
        }
        if !dummy_available() {
            say("ipvs kernel test: the `ip -batch` part (kube-ipvs0 addresses) is SKIPPED: this kernel has no \
                 dummy interfaces");
        }
    }
    check_backend::<Ipvs>();
}

/// The ipsets of 10,000 Services of 10 endpoints fit: `SWITCHYARD-LOOP-BACK` alone holds 100,000
/// members, past kube-proxy's `maxelem 65536` ("Hash is full").
#[test]
fn ipvs_sets_hold_ten_thousand_services() {
    if let Some(why) = netns::skip_reason(&["ipset"]) {
        println!("skipped: {why}");
        return;
    }
    let cluster = switchyard_engine::synthetic::cluster(10_000, 10);
    let plan = switchyard_engine::policy::plan(&cluster, "node-a", Backend::Ipvs);
    let program = switchyard_engine::render::ipvs::render(&plan);
    let tx = switchyard_agent::apply::ipvs::Transaction::from_program(&program);
    let ipset =
        tx.steps.iter().find(|s| s.section == switchyard_engine::render::ipvs::Section::Ipset).expect("an ipset part");
    let ns = Netns::new().expect("namespace");
    ns.exec("ipset", &["restore", "-exist"], Some(&ipset.input)).expect("ipset restore");
    let listed = ns.exec("ipset", &["list", "-terse", "SWITCHYARD-LOOP-BACK"], None).expect("ipset list");
    let entries: usize = listed
        .lines()
        .find_map(|l| l.strip_prefix("Number of entries: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("an entry count");
    assert!(entries > 65_536, "SWITCHYARD-LOOP-BACK holds {entries} members");
}

/// A set left with other parameters (an earlier `maxelem`) and still used by an iptables rule is
/// resized by the applier's swap, in place, rule intact, members as the program says.
#[test]
fn ipvs_sets_with_old_parameters_are_swapped_in() {
    use switchyard_agent::apply::ipvs::{IpvsApplier, Kernel, Transaction};
    use switchyard_engine::render::ipvs::Section;
    if let Some(why) = netns::skip_reason(&["ipset", "iptables"]) {
        println!("skipped: {why}");
        return;
    }
    let program =
        switchyard_engine::render(&switchyard_engine::demo::cluster(), "node-1", Backend::Ipvs).expect("renders");
    let mut tx = Transaction::from_program(&program);
    tx.steps.retain(|s| s.section == Section::Ipset);
    let ns = Netns::new().expect("namespace");
    let set = "SWITCHYARD-CLUSTER-IP";
    ns.exec("ipset", &["create", set, "hash:ip,port", "maxelem", "65536"], None).expect("old set");
    ns.exec("ipset", &["add", set, "10.9.9.9,tcp:9"], None).expect("old member");
    ns.exec(
        "iptables",
        &["-t", "nat", "-A", "PREROUTING", "-m", "set", "--match-set", set, "dst,dst", "-j", "ACCEPT"],
        None,
    )
    .expect("a rule using it");
    Kernel::in_netns(ns.name()).apply(&tx).expect("applies");
    let listed = ns.exec("ipset", &["list", set], None).expect("ipset list");
    assert!(listed.contains("maxelem 1048576"), "{listed}");
    let members: std::collections::BTreeSet<&str> =
        listed.lines().skip_while(|l| !l.starts_with("Members:")).skip(1).filter(|l| !l.is_empty()).collect();
    let want: std::collections::BTreeSet<&str> =
        tx.steps[0].input.lines().filter_map(|l| l.strip_prefix(&format!("add {set} "))).collect();
    assert!(!want.is_empty());
    assert_eq!(members, want);
    let rules = ns.exec("iptables", &["-t", "nat", "-S", "PREROUTING"], None).expect("iptables -S");
    assert!(rules.contains(&format!("--match-set {set} dst,dst")), "{rules}");
    let sets = ns.exec("ipset", &["list", "-name"], None).expect("ipset list -name");
    assert!(!sets.contains("RESIZE"), "the temporary set is gone: {sets}");
}

/// A namespace disappears when its guard is dropped, even on a panic.
#[test]
fn namespaces_are_removed_on_drop() {
    if let Some(why) = netns::skip_reason(&[]) {
        println!("skipped: {why}");
        return;
    }
    let ns = Netns::new().expect("namespace");
    let name = ns.name().to_string();
    let listed = |n: &str| {
        netns::run("ip", &["netns", "list"], None)
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(n))
    };
    assert!(listed(&name));
    let moved = std::panic::catch_unwind(move || {
        let _held = ns;
        panic!("test panic inside a namespace");
    });
    assert!(moved.is_err());
    assert!(!listed(&name), "{name} is still there");
}
