//! Kernel appliers: every write to the kernel goes through one trait per backend, with a real
//! implementation that pipes programs to the kernel's tools and a recording fake for unit tests.

pub mod iptables;
pub mod ipvs;
pub mod nftables;

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Runs a kernel tool, after `prefix` (e.g. `ip netns exec NS`) when there is one, feeding it
/// `stdin` and collecting stdout and stderr. The input is written from a thread: a program of
/// megabytes must not deadlock against a full stderr pipe. A write error shows up as the tool's
/// own failure, so only a failure to start (or wait) is an `Err`.
pub(crate) fn run_tool<S: AsRef<OsStr>>(
    prefix: &[String],
    tool: &str,
    args: &[S],
    stdin: Option<&str>,
) -> std::io::Result<Output> {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(tool);
            c
        }
        None => Command::new(tool),
    };
    let mut child = cmd
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_string();
            Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let out = child.wait_with_output()?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    Ok(out)
}
