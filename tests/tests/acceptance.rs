//! The acceptance corpus: every probe of every scenario, through the engine's API, held to the
//! same rules as `shared/contract-check/run.py` (see `switchyard_tests::scenario`).
//!
//! IPVS is held to every probe that names it, and to every forwarded probe that names iptables.
//!
//! Prints a table (per scenario and backend: passed/total) and every failing probe; fails if any
//! probe fails. Run with `-- --nocapture` to see the table when everything passes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use switchyard_engine::policy::Backend;
use switchyard_tests::scenario::{self, Scenario};

const BACKENDS: [Backend; 3] = [Backend::Nftables, Backend::Iptables, Backend::Ipvs];

/// Runs every scenario under `root`; returns the failure lines.
fn run_corpus(root: &Path) -> Vec<String> {
    let scenarios = scenario::scenarios(root);
    assert!(!scenarios.is_empty(), "no scenarios under {}", root.display());
    let mut failures = Vec::new();
    let mut totals: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let width = scenarios.iter().map(|s| s.name.len()).max().unwrap_or(8).max(8);
    // One print at the end: tests run in parallel and their lines would interleave.
    let mut table = format!("\nscenarios in {}\n", root.display());
    let _ = writeln!(table, "{:<width$}  {:>9}  {:>9}  {:>9}", "scenario", "nftables", "iptables", "ipvs");
    for s in &scenarios {
        let counts = run_scenario(s, &mut failures);
        let mut row = format!("{:<width$}", s.name);
        for b in BACKENDS {
            let (pass, total) = counts.get(b.as_str()).copied().unwrap_or((0, 0));
            let t = totals.entry(b.as_str()).or_default();
            t.0 += pass;
            t.1 += total;
            let cell = if total == 0 { "-".to_string() } else { format!("{pass}/{total}") };
            let _ = write!(row, "  {cell:>9}");
        }
        let _ = writeln!(table, "{row}");
    }
    let mut row = format!("{:<width$}", "total");
    for b in BACKENDS {
        let (pass, total) = totals.get(b.as_str()).copied().unwrap_or((0, 0));
        let _ = write!(row, "  {:>9}", format!("{pass}/{total}"));
    }
    let _ = writeln!(table, "{row}");
    for f in &failures {
        let _ = writeln!(table, "FAIL {f}");
    }
    print!("{table}");
    failures
}

/// Checks one scenario's probes; counts (passed, total) per backend name.
fn run_scenario(s: &Scenario, failures: &mut Vec<String>) -> BTreeMap<&'static str, (usize, usize)> {
    let mut counts: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    let (cluster, probes) = match (s.cluster(), s.probes()) {
        (Ok(c), Ok(p)) => (c, p),
        (c, p) => {
            failures.push(format!("{}: cannot read the scenario: {}", s.name, c.err().or(p.err()).unwrap_or_default()));
            return counts;
        }
    };
    for probe in &probes {
        for backend in probe.checked_backends() {
            let c = counts.entry(backend.as_str()).or_default();
            c.1 += 1;
            match scenario::check(&cluster, probe, backend) {
                Ok(_) => c.0 += 1,
                Err(why) => failures.push(format!("{}: {} {probe}: {why}", s.name, backend.as_str())),
            }
        }
    }
    counts
}

/// Every probe of this repository's scenarios passes on every backend it names.
#[test]
fn repository_scenarios() {
    let failures = run_corpus(&switchyard_tests::repo_scenarios());
    assert!(failures.is_empty(), "{} probe(s) fail; see the FAIL lines above", failures.len());
}

/// Every probe of the public contract-check scenarios passes (skipped when `../shared` is absent).
#[test]
fn contract_check_scenarios() {
    let Some(root) = switchyard_tests::shared_scenarios() else {
        println!("skipped: ../shared/contract-check/scenarios is not beside the workspace");
        return;
    };
    let failures = run_corpus(&root);
    assert!(failures.is_empty(), "{} probe(s) fail; see the FAIL lines above", failures.len());
}
