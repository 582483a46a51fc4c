//! Throwaway network namespaces for real-kernel tests.
//!
//! Every program a test loads goes into a namespace of its own (`sy-t-<pid>-<n>`), so tests never
//! touch the machine's own rules and can run in parallel. The [`Netns`] guard deletes its
//! namespace when dropped, on success, failure and panic alike; namespaces left behind by a run
//! that was killed are swept the first time a new one is made.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

const PREFIX: &str = "sy-t-";

/// Why kernel tests cannot run here, or `None` when they can: they need root and the tools.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for tool in std::iter::once(&"ip").chain(tools) {
        if !on_path(tool) {
            return Some(format!("`{tool}` is not installed (apt-get install nftables iptables iproute2)"));
        }
    }
    None
}

fn is_root() -> bool {
    // The effective uid is the second field of `Uid:` in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Whether `tool` is a file in one of the `PATH` folders (Debian puts nft and iptables in
/// /usr/sbin, which root's `PATH` has).
pub fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(tool).is_file())
}

/// A network namespace that exists as long as this value does.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace.
    pub fn new() -> Result<Self, String> {
        static SWEEP: Once = Once::new();
        static N: AtomicUsize = AtomicUsize::new(0);
        SWEEP.call_once(sweep_stale);
        let name = format!("{PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name], None)?;
        Ok(Netns { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program args` inside the namespace with `stdin` as input; returns its stdout, or a
    /// message with its exit status and stderr.
    pub fn exec(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all, stdin)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "delete", &self.name], None);
    }
}

/// Deletes `sy-t-<pid>-*` namespaces whose process is gone (a run killed before its guards ran).
fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"], None) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = run("ip", &["netns", "delete", name], None);
        }
    }
}

/// Runs a command to completion, feeding `stdin` from a thread so large programs cannot deadlock
/// against a full output pipe.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let shown = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: cannot start: {e}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_string();
            Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let out = child.wait_with_output().map_err(|e| format!("{shown}: {e}"))?;
    if let Some(w) = writer {
        // A write error shows up as the tool's own failure below; nothing more to say here.
        let _ = w.join();
    }
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{shown}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr).trim_end()))
    }
}
