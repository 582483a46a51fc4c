//! Kernel appliers: every write to the kernel goes through one trait per backend, with a real
//! implementation that pipes programs to the kernel's tools and a recording fake for unit tests.

pub mod iptables;
pub mod ipvs;
pub mod nft_netlink;
pub mod nftables;

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Output, Stdio};

/// The prefix that runs a tool inside network namespace `name` (`ip netns exec NAME`).
pub fn netns_prefix(name: &str) -> Vec<String> {
    vec!["ip".into(), "netns".into(), "exec".into(), name.into()]
}

/// Runs a kernel tool, after `prefix` (e.g. `ip netns exec NS`) when there is one, feeding it
/// `stdin` and collecting stdout and stderr. Only a failure to write the input, start or wait is
/// an `Err`; the tool's own failure is in the `Output`.
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
    // The input goes through a file, complete before the tool starts: were the agent killed while
    // writing into a pipe, the tool would read a cut input and could commit the part before the cut
    // (`nft -f -` commits at end of input; `iptables-restore` at each table's COMMIT). The file is
    // unlinked once open, so nothing is left behind.
    let input = match stdin {
        Some(text) => {
            let path = input_path();
            let file = (|| {
                use std::os::unix::fs::OpenOptionsExt as _;
                // Readable by root only: the program maps the cluster.
                let mut w = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
                w.write_all(text.as_bytes())?;
                drop(w);
                let f = std::fs::File::open(&path);
                let _ = std::fs::remove_file(&path);
                f
            })();
            if file.is_err() {
                let _ = std::fs::remove_file(&path);
            }
            Stdio::from(file?)
        }
        None => Stdio::null(),
    };
    let child = cmd.args(args).stdin(input).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let out = child.wait_with_output()?;
    Ok(out)
}

/// A fresh private path for one tool input.
fn input_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(".switchyard-input-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tool reads the whole input from a file that is already gone from the folder.
    #[test]
    fn input_reaches_the_tool_whole_and_leaves_no_file() {
        let text = "line\n".repeat(200_000);
        let out = run_tool(
            &[],
            "sh",
            &["-c", "wc -c; ls -a \"$TMPDIR\" /tmp 2>/dev/null | grep -c switchyard-input-$PPID || true"],
            Some(&text),
        )
        .expect("sh runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        assert_eq!(lines.next().map(str::trim), Some(text.len().to_string().as_str()));
        assert_eq!(lines.next().map(str::trim), Some("0"), "the input file is unlinked before the tool runs");
    }
}
