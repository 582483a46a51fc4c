//! The dashboard's share of `cargo xtask`: the pinned WebAssembly tools (Trunk, wasm-bindgen-cli)
//! and a headless Chromium with its WebDriver, installed only when missing; clippy for wasm32, the
//! components' tests in the browser and the end-to-end WebDriver test (its own crate,
//! `tests/browser`, left out of `cargo test --workspace` so that stays fast) for `test`;
//! `trunk build --release` for `demo`.
//!
//! The versions are the ones that build offline with this toolchain (see TOOLCHAIN.md in the
//! shared notes): trunk 0.22 needs a newer rustc, and wasm-bindgen-cli must equal the
//! `wasm-bindgen` crate (`=0.2.130` in the workspace) or the generated glue does not load.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::{cargo, is_root, on_path, root, run, step};

const TRUNK: &str = "0.21.14";
const WASM_BINDGEN: &str = "0.2.130";

/// `tool --version` prints `tool X.Y.Z`: whether it is the pinned version.
fn has_version(tool: &str, version: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().nth(1) == Some(version))
}

/// Trunk, wasm-bindgen-cli, Chromium and chromedriver, each only when missing.
pub fn install_tools() -> Result<()> {
    install_build_tools()?;
    install_browser()
}

/// What `trunk build` needs besides the wasm32 target.
fn install_build_tools() -> Result<()> {
    if has_version("trunk", TRUNK) {
        println!("trunk {TRUNK}: present");
    } else {
        let mut c = cargo();
        c.args(["install", "trunk", "--version", TRUNK, "--locked"]);
        run(c)?;
    }
    if has_version("wasm-bindgen", WASM_BINDGEN) && on_path("wasm-bindgen-test-runner") {
        println!("wasm-bindgen-cli {WASM_BINDGEN}: present");
    } else {
        // No --locked: one dependency version its lock file names is gone from the registry.
        let mut c = cargo();
        c.args(["install", "wasm-bindgen-cli", "--version", WASM_BINDGEN, "--force"]);
        run(c)?;
    }
    Ok(())
}

fn install_browser() -> Result<()> {
    if on_path("chromedriver") && (on_path("chromium") || on_path("chromium-browser")) {
        println!("chromium and chromedriver: present");
        return Ok(());
    }
    if !is_root() || !on_path("apt-get") {
        bail!("the browser tests need chromium and chromedriver on PATH (apt-get install chromium chromium-driver)");
    }
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    run(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install)
}

/// Clippy for the dashboard as the browser builds it, then its tests in headless Chromium.
pub fn test() -> Result<()> {
    step("clippy for the dashboard on wasm32-unknown-unknown");
    let mut c = cargo();
    c.args([
        "clippy",
        "-p",
        "switchyard-web",
        "--target",
        "wasm32-unknown-unknown",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(c)?;

    step("the dashboard in headless Chromium (wasm-bindgen-test)");
    let mut c = cargo();
    c.args(["test", "-p", "switchyard-web", "--target", "wasm32-unknown-unknown", "--tests"])
        // The runner's default 20 s is tight on two busy cores; the demo test waits for flows.
        .env("WASM_BINDGEN_TEST_TIMEOUT", "300");
    run(c)?;

    step("end to end: headless Chromium against `switchyard demo` (screenshots in target/screenshots)");
    build()?;
    let mut c = cargo();
    c.args(["build", "-p", "switchyard-agent", "--bin", "switchyard"]);
    run(c)?;
    let mut c = cargo();
    c.args(["test", "-p", "switchyard-browser-tests"]).env("SWITCHYARD_E2E", "1");
    run(c)
}

/// `trunk build --release` at the workspace root; returns `dist/` and prints the wasm's size.
pub fn build() -> Result<PathBuf> {
    install_build_tools()?;
    step("the dashboard (trunk build --release)");
    let mut c = Command::new("trunk");
    c.current_dir(root()).args(["build", "--release"]);
    run(c)?;
    let dist = root().join("dist");
    let wasm = std::fs::read_dir(&dist)
        .with_context(|| format!("reading {}", dist.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "wasm"))
        .context("trunk wrote no .wasm into dist/")?;
    let raw = std::fs::metadata(&wasm)?.len();
    let gz = gzip_size(&wasm).map(|n| format!(", {} KB gzipped", n / 1024)).unwrap_or_default();
    println!("dashboard: {} ({} KB{gz})", dist.display(), raw / 1024);
    Ok(dist)
}

/// Runs `switchyard demo` in the foreground: the dashboard and its live stream until Ctrl-C.
pub fn serve(bin: &std::path::Path) -> Result<()> {
    step("the dashboard: switchyard demo, on http://127.0.0.1:10260/ (Ctrl-C stops it)");
    println!("open http://127.0.0.1:10260/ ; with ?demo the page runs the scenario by itself, no server");
    let mut c = Command::new(bin);
    c.current_dir(root()).arg("demo");
    run(c)
}

/// The size `gzip -9` makes of a file, when gzip is there.
fn gzip_size(path: &std::path::Path) -> Option<u64> {
    let out = Command::new("gzip").arg("-9c").arg(path).stderr(Stdio::null()).output().ok()?;
    out.status.success().then_some(out.stdout.len() as u64)
}
