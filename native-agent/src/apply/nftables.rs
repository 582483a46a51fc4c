//! The nftables backend's applier: every sync is one `nft -f -` transaction that touches only
//! `table ip switchyard` and `table ip6 switchyard` ([`TABLE`]).
//!
//! A full sync is what [`switchyard_engine::render::nftables::render`] prints: for each family,
//! `table` + `delete table` + the table block, so the kernel ends with exactly our program
//! whatever it held before (drift repaired in one atomic step). A family we own in the kernel but
//! no longer program is deleted in the same transaction, which is how the agent reconciles what a
//! previous run left behind. A partial sync is the incremental renderer's transaction as is.
//!
//! [`Kernel`] runs `nft` (optionally inside a network namespace, for tests); [`Recording`]
//! records scripts for unit tests and can be told to fail.

use switchyard_engine::render::nftables::TABLE;

/// The families our table can exist in, as `nft` names them.
pub const FAMILIES: [&str; 2] = ["ip", "ip6"];

/// Why an `nft` call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot run nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("nftables netlink batch failed: {0}")]
    Netlink(#[source] super::nft_netlink::NetlinkError),
}

/// Every kernel read and write of the nftables backend goes through here.
pub trait NftApplier {
    /// Loads `script` as one transaction (`nft -f -`).
    fn apply(&mut self, script: &str) -> Result<(), ApplyError>;
    /// The families (`ip`, `ip6`) in which `table <family> switchyard` exists now.
    fn owned_families(&mut self) -> Result<Vec<String>, ApplyError>;
}

/// The transaction of a full sync: `program` (a full render), plus the deletion of our tables in
/// families the program no longer has. Deleting through `table` + `delete table` is valid whether
/// or not the table still exists when the transaction runs.
pub fn full_sync_script(program: &str, owned: &[String]) -> String {
    let mut out = program.to_string();
    for fam in owned {
        let declared = format!("table {fam} {TABLE} {{");
        if !program.lines().any(|l| l.trim_end() == declared) {
            out.push_str(&format!("table {fam} {TABLE}\ndelete table {fam} {TABLE}\n"));
        }
    }
    out
}

/// Parses `nft list tables` output into the families holding our table.
pub fn parse_owned_families(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("table"), Some(fam), Some(name)) if name == TABLE && FAMILIES.contains(&fam) => {
                    Some(fam.to_string())
                }
                _ => None,
            }
        })
        .collect()
}

/// Runs `nft`.
#[derive(Debug, Clone, Default)]
pub struct Kernel {
    /// Run `nft` under this prefix (`ip netns exec NAME`), for tests in a namespace.
    pub prefix: Vec<String>,
}

impl Kernel {
    pub fn new() -> Self {
        Kernel::default()
    }

    /// Runs inside network namespace `name`.
    pub fn in_netns(name: &str) -> Self {
        Kernel { prefix: super::netns_prefix(name) }
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
        let out = super::run_tool(&self.prefix, "nft", args, stdin).map_err(ApplyError::Spawn)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ApplyError::Failed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
            })
        }
    }
}

impl NftApplier for Kernel {
    fn apply(&mut self, script: &str) -> Result<(), ApplyError> {
        self.nft(&["-f", "-"], Some(script)).map(drop)
    }

    fn owned_families(&mut self) -> Result<Vec<String>, ApplyError> {
        self.nft(&["list", "tables"], None).map(|l| parse_owned_families(&l))
    }
}

/// Records scripts instead of loading them; holds the families it pretends to own.
#[derive(Debug, Default)]
pub struct Recording {
    pub applied: Vec<String>,
    pub owned: Vec<String>,
    /// Fail every `apply` (without recording) while set.
    pub fail: bool,
}

impl NftApplier for Recording {
    fn apply(&mut self, script: &str) -> Result<(), ApplyError> {
        if self.fail {
            return Err(ApplyError::Failed { status: "exit status: 1".into(), stderr: "injected".into() });
        }
        self.applied.push(script.to_string());
        Ok(())
    }

    fn owned_families(&mut self) -> Result<Vec<String>, ApplyError> {
        Ok(self.owned.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::policy::Backend;

    /// Only our table is named in `nft list tables`, whatever else is there.
    #[test]
    fn owned_families_ignore_foreign_tables() {
        let listing =
            "table inet filter\ntable ip switchyard\ntable ip nat\ntable ip6 switchyard\ntable inet switchyard\n";
        assert_eq!(parse_owned_families(listing), ["ip", "ip6"]);
        assert!(parse_owned_families("").is_empty());
    }

    /// A full sync replaces the program's tables and deletes our table of a family that is gone,
    /// and nothing else.
    #[test]
    fn full_sync_deletes_only_our_stale_family() {
        let program = switchyard_engine::render(&switchyard_engine::demo::cluster(), "node-1", Backend::Nftables)
            .expect("renders");
        let s = full_sync_script(&program, &["ip".into(), "ip6".into()]);
        assert!(s.starts_with(&program));
        assert_eq!(&s[program.len()..], "table ip6 switchyard\ndelete table ip6 switchyard\n");
        assert_eq!(full_sync_script(&program, &["ip".into()]), program);
        for line in s.lines().filter(|l| l.starts_with("table") || l.starts_with("delete")) {
            assert!(line.contains(" switchyard"), "touches a foreign table: {line}");
        }
    }

    /// The fake records in order and fails on demand without recording.
    #[test]
    fn recording_fake() {
        let mut f = Recording { owned: vec!["ip".into()], ..Recording::default() };
        f.apply("a").expect("applies");
        f.fail = true;
        assert!(f.apply("b").is_err());
        assert_eq!(f.applied, ["a"]);
        assert_eq!(f.owned_families().expect("lists"), ["ip"]);
    }

    /// The real applier runs nft under its prefix: `true` accepts anything, `false` fails.
    #[test]
    fn kernel_applier_reports_failure() {
        let mut ok = Kernel { prefix: vec!["true".into()] };
        ok.apply("table ip switchyard\n").expect("applies");
        let mut bad = Kernel { prefix: vec!["false".into()] };
        assert!(matches!(bad.apply("x"), Err(ApplyError::Failed { .. })));
    }
}
