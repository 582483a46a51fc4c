//! `cargo xtask`: the project's two entry points, so a fresh machine needs nothing but Rust.
//!
//! - `cargo xtask test`: installs what is missing (kernel tools, the wasm32 target, rustfmt and
//!   clippy, the Kubernetes schema validator), then runs the checks CI runs, stopping at the
//!   first failure: rustfmt, clippy with `-D warnings`, the engine for `wasm32-unknown-unknown`,
//!   and `cargo test --workspace`.
//!   The dashboard's checks (clippy on wasm32, its tests in headless Chromium) come from `ui`.
//! - `cargo xtask demo`: builds the dashboard (`trunk build --release` into `dist/`) and the
//!   release binary, shows the built-in demo cluster (node-1's nftables program, and textbook
//!   packets traced through it), then serves the dashboard with `switchyard demo`.
//!
//! Installs are idempotent: each checks first, so a second run costs seconds.

use std::env;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

mod ui;

const APT_PACKAGES: [(&str, &str); 6] = [
    ("nftables", "nft"),
    ("iptables", "iptables-restore"),
    ("conntrack", "conntrack"),
    ("iproute2", "ip"),
    ("ipset", "ipset"),
    ("ipvsadm", "ipvsadm"),
];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("demo") => demo(),
        _ => {
            eprintln!("usage: cargo xtask test | cargo xtask demo");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask's manifest folder's parent.
fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn step(title: &str) {
    println!("\n==> {title}");
}

/// Runs a command with inherited output; fails on a non-zero exit.
fn run(mut cmd: Command) -> Result<()> {
    let shown = shown(&cmd);
    println!("$ {shown}");
    let status = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
fn output(mut cmd: Command) -> Result<String> {
    let shown = shown(&cmd);
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn shown(cmd: &Command) -> String {
    let args: Vec<_> = cmd.get_args().map(OsStr::to_string_lossy).collect();
    format!("{} {}", cmd.get_program().to_string_lossy(), args.join(" "))
}

fn on_path(tool: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// cargo xtask test

fn test() -> Result<()> {
    step("tools");
    install_apt_packages()?;
    install_rust_parts()?;
    ui::install_tools()?;
    install_schema_validator()?;

    step("rustfmt");
    let mut c = cargo();
    c.args(["fmt", "--all", "--", "--check"]);
    run(c)?;

    step("clippy");
    let mut c = cargo();
    c.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    run(c)?;

    step("engine for wasm32-unknown-unknown");
    let mut c = cargo();
    c.args(["build", "-p", "switchyard-engine", "--target", "wasm32-unknown-unknown"]);
    run(c)?;

    // Before the workspace tests: their totals must stay the last line CI reads.
    ui::test()?;

    step("tests");
    cargo_test()
}

/// Installs the kernel tools the real-kernel tests use, when root and missing.
fn install_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().filter(|(_, tool)| !on_path(tool)).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        println!("kernel tools: present");
        return Ok(());
    }
    if !is_root() || !on_path("apt-get") {
        println!("kernel tools missing ({}); not root or no apt-get: the kernel tests will skip", missing.join(" "));
        return Ok(());
    }
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    run(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install)
}

/// The wasm32 target, rustfmt and clippy, through rustup when it is there.
fn install_rust_parts() -> Result<()> {
    if !on_path("rustup") {
        println!("rustup not found: assuming the wasm32 target, rustfmt and clippy are installed");
        return Ok(());
    }
    let mut c = Command::new("rustup");
    c.args(["target", "list", "--installed"]);
    if !output(c)?.lines().any(|l| l.trim() == "wasm32-unknown-unknown") {
        let mut add = Command::new("rustup");
        add.args(["target", "add", "wasm32-unknown-unknown"]);
        run(add)?;
    }
    let mut c = Command::new("rustup");
    c.args(["component", "list", "--installed"]);
    let installed = output(c)?;
    let missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|p| !installed.lines().any(|l| l.starts_with(&format!("{p}-"))))
        .collect();
    if !missing.is_empty() {
        let mut add = Command::new("rustup");
        add.args(["component", "add"]).args(&missing);
        run(add)?;
    }
    println!("rust: wasm32-unknown-unknown, rustfmt and clippy present");
    Ok(())
}

/// The Kubernetes schema validator the deploy/ manifests test uses (`kubernetes-validate` from
/// PyPI: it ships the JSON schemas, so validating needs no network).
const SCHEMA_VALIDATOR: &str = "kubernetes-validate==1.37.0";

fn install_schema_validator() -> Result<()> {
    let mut c = Command::new("python3");
    c.args(["-m", "kubernetes_validate", "--version"]).stderr(Stdio::null());
    let want = SCHEMA_VALIDATOR.rsplit("==").next().unwrap_or_default();
    if c.output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == want) {
        println!("kubernetes-validate {want}: present");
        return Ok(());
    }
    if !on_path("python3") {
        bail!("python3 is needed for the manifests' schema test (apt-get install python3-pip)");
    }
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--quiet", SCHEMA_VALIDATOR]);
    if run(pip).is_ok() {
        return Ok(());
    }
    // Debian's own Python refuses pip installs outside a venv (PEP 668) unless told.
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--quiet", "--break-system-packages", SCHEMA_VALIDATOR]);
    run(pip)
}

/// `cargo test --workspace`, echoing everything, then cargo's summary lines with their totals.
fn cargo_test() -> Result<()> {
    let mut c = cargo();
    // The browser end-to-end crate runs in `ui::test`, after the dashboard is built.
    c.args(["test", "--workspace", "--exclude", "switchyard-browser-tests", "--no-fail-fast"]).stdout(Stdio::piped());
    println!("$ {}", shown(&c));
    let mut child = c.spawn().context("cannot start cargo test")?;
    let mut summaries = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if line.starts_with("test result:") {
                summaries.push(line);
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for s in &summaries {
        passed += count(s, "passed");
        failed += count(s, "failed");
        ignored += count(s, "ignored");
    }
    println!("\n==> summary: cargo's test result lines");
    for s in &summaries {
        println!("  {s}");
    }
    // The plain closing line CI reads: the workspace's totals, last.
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test --workspace failed ({status})");
    }
    Ok(())
}

/// The number before `word` in a `test result:` line (`... 12 passed; 0 failed; ...`).
fn count(line: &str, word: &str) -> u64 {
    let words: Vec<&str> =
        line.split(|c: char| c.is_whitespace() || c == ';' || c == '.').filter(|w| !w.is_empty()).collect();
    words.windows(2).find(|w| w[1] == word).and_then(|w| w[0].parse().ok()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// cargo xtask demo

/// One packet of the demo: what it shows, and the `trace` arguments.
struct Packet {
    title: &'static str,
    args: &'static [&'static str],
}

/// Addresses from the engine's demo cluster (`engine/src/demo.rs`): node-1 to node-3 are
/// 192.168.1.11-13 with pods in 10.244.{1,2,3}.0/24; nginx pods run on node-1 and node-2 only.
const PACKETS: [Packet; 5] = [
    Packet {
        title: "ClusterIP: a pod on node-1 calls nginx-svc",
        args: &["--node", "node-1", "--from", "10.244.1.50", "--to", "10.96.0.10:80"],
    },
    Packet {
        title: "NodePort: a client on the internet calls node-3, which has no nginx pod",
        args: &["--node", "node-3", "--from", "198.51.100.23", "--to", "node-3:30080"],
    },
    Packet {
        title: "LoadBalancer: the cloud load balancer hands the packet to node-1",
        args: &["--node", "node-1", "--from", "198.51.100.23", "--to", "34.101.12.7:80"],
    },
    Packet {
        title: "Hairpin: echo's only pod (on node-3) calls its own Service by name",
        args: &["--node", "node-3", "--from", "10.244.3.20", "--to", "echo.default:80"],
    },
    Packet {
        title: "ExternalName: a pod looks up my-db, which is only a DNS CNAME",
        args: &["--node", "node-1", "--from", "10.244.1.50", "--to", "my-db.default.svc.cluster.local:5432"],
    },
];

fn demo() -> Result<()> {
    install_rust_parts()?;
    ui::build()?;
    step("build (release)");
    let mut c = cargo();
    c.args(["build", "--release", "-p", "switchyard-agent", "--bin", "switchyard"]);
    run(c)?;
    let bin = root().join("target/release/switchyard");

    step("node-1's nftables program (switchyard render --demo --node node-1 --backend nftables)");
    let mut c = Command::new(&bin);
    c.args(["render", "--demo", "--node", "node-1", "--backend", "nftables"]);
    let program = output(c)?;
    print_program_summary(&program);

    for p in &PACKETS {
        step(p.title);
        let mut c = Command::new(&bin);
        c.args(["trace", "--demo"]).args(p.args).args(["--output", "text"]);
        println!("$ switchyard trace --demo {} --output text", p.args.join(" "));
        print!("{}", output(c)?);
    }

    step("the NodePort packet as a Mermaid sequence diagram (paste into mermaid.live or a Markdown file)");
    let mut c = Command::new(&bin);
    c.args(["trace", "--demo"]).args(PACKETS[1].args).args(["--output", "mermaid"]);
    print!("{}", output(c)?);

    println!("\nMore: {} trace --help", bin.display());
    ui::serve(&bin)
}

/// The program's shape (chains, maps, sets, elements) and its first lines.
fn print_program_summary(program: &str) {
    let lines: Vec<&str> = program.lines().collect();
    let starts = |p: &str| lines.iter().filter(|l| l.trim_start().starts_with(p)).count();
    println!(
        "{} lines: {} chains, {} maps, {} sets; every service is a map element, not a chain",
        lines.len(),
        starts("chain "),
        starts("map "),
        starts("set ")
    );
    let shown = 40.min(lines.len());
    for l in &lines[..shown] {
        println!("  {l}");
    }
    if lines.len() > shown {
        println!(
            "  ... ({} more lines; print it all with `switchyard render --demo --node node-1 --backend nftables`)",
            lines.len() - shown
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Totals are read from cargo's summary lines.
    #[test]
    fn counts_summary_lines() {
        let l = "test result: ok. 12 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!((count(l, "passed"), count(l, "failed"), count(l, "ignored")), (12, 1, 3));
        assert_eq!(count("test result: FAILED. 0 passed; 2 failed;", "failed"), 2);
    }
}
