//! The iptables backend's applier: programs from [`switchyard_engine::render::iptables`] loaded
//! with `iptables-restore --noflush` (and `ip6tables-restore --noflush`), touching only the
//! chains we own (`SWITCHYARD-*`).
//!
//! A real node's `nat` and `filter` tables hold other people's rules (CNI plugins, firewalls,
//! Docker), so a restore without `--noflush` is never run: it would replace whole tables. Instead:
//!
//! - the restore input only declares (which flushes) and fills our own chains; the jumps from the
//!   builtin chains (`PREROUTING`, `INPUT`, ...) are taken out of it and ensured one by one with
//!   `-C` then `-I`, as kube-proxy does (`EnsureRule`), so they are never duplicated;
//! - a full sync also flushes and deletes our chains that the kernel has (read with
//!   `iptables-save`) but the program no longer declares, so a restart or a resync cleans up what
//!   an earlier program left;
//! - a transaction's `-D` of a builtin jump (a family torn down) is done with `-C` then `-D`
//!   before the restore, so a jump already gone cannot fail the transaction.
//!
//! Which iptables the node runs matters (iptables-nft restores are far slower): [`Variant`] is
//! detected as kube-proxy does, from `iptables --version`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use switchyard_engine::model::IpFamily;
use switchyard_engine::render::iptables::{self as program, CHAIN_PREFIX};

/// Which kernel interface the iptables tools drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `iptables-legacy` (the x_tables kernel interface).
    Legacy,
    /// `iptables-nft` (the same rules, stored by nf_tables).
    NfTables,
    /// The version line says neither.
    Unknown,
}

impl Variant {
    /// From `iptables --version` (`iptables v1.8.9 (nf_tables)`), as kube-proxy reads it.
    pub fn from_version(line: &str) -> Variant {
        if line.contains("(nf_tables)") {
            Variant::NfTables
        } else if line.contains("(legacy)") {
            Variant::Legacy
        } else {
            Variant::Unknown
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Legacy => "legacy",
            Variant::NfTables => "nf_tables",
            Variant::Unknown => "unknown",
        }
    }
}

/// Why an iptables tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed { tool: &'static str, status: String, stderr: String },
    #[error("cannot split the rule {0:?} into arguments (unbalanced quotes)")]
    BadRule(String),
}

/// What to do with one rule of a builtin chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleOp {
    /// `-C`: is it there?
    Check,
    /// `-I CHAIN 1`: prepend it.
    Insert,
    /// `-D`: remove it.
    Delete,
}

/// Every kernel read and write of the iptables backend goes through here.
pub trait IptablesApplier {
    /// `iptables-restore --noflush` (or `ip6tables-restore`) of `input`.
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), ApplyError>;
    /// `iptables-save` of the family (all tables).
    fn save(&mut self, family: IpFamily) -> Result<String, ApplyError>;
    /// One rule of a builtin chain; `rule` is `CHAIN match... -j TARGET` split into arguments.
    /// For [`RuleOp::Check`], `Ok(false)` means the rule is absent.
    fn rule(&mut self, family: IpFamily, table: &str, op: RuleOp, rule: &[String]) -> Result<bool, ApplyError>;
}

/// Builtin chains by table: never declared or filled by our restores.
fn is_builtin(chain: &str) -> bool {
    matches!(chain, "PREROUTING" | "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING")
}

/// Splits a rule line into arguments as a shell would for the quoting iptables-save uses.
pub fn split_args(line: &str) -> Result<Vec<String>, ApplyError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(ApplyError::BadRule(line.to_string()));
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// One family's restore input with the builtin chains taken out, and the builtin-chain lines
/// found in it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// `iptables-restore --noflush` input naming only our chains.
    pub restore: String,
    /// `(table, "-A CHAIN ...")` appends to builtin chains (to ensure with `-C`/`-I`).
    pub appends: Vec<(String, String)>,
    /// `(table, "-D CHAIN ...")` deletions from builtin chains (to do with `-C`/`-D` first).
    pub deletes: Vec<(String, String)>,
    /// Our chains declared, by table.
    pub declared: BTreeSet<(String, String)>,
}

/// Takes the builtin chains out of one family's restore input.
pub fn prepare(section: &str) -> Prepared {
    let mut p = Prepared::default();
    let mut table = String::new();
    for line in section.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if is_builtin(chain) {
                // `:INPUT - [0:0]` keeps the policy, but there is nothing for us to say about it.
                continue;
            }
            p.declared.insert((table.clone(), chain.to_string()));
        } else if let Some(rest) = line.strip_prefix("-A ").or_else(|| line.strip_prefix("-D ")) {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            if is_builtin(chain) {
                let list = if line.starts_with("-A") { &mut p.appends } else { &mut p.deletes };
                list.push((table.clone(), line.to_string()));
                continue;
            }
        }
        p.restore.push_str(line);
        p.restore.push('\n');
    }
    p
}

/// Our chains in an `iptables-save` listing, by table.
pub fn owned_chains(save: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut table = "";
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if chain.starts_with(CHAIN_PREFIX) {
                out.insert((table.to_string(), chain.to_string()));
            }
        }
    }
    out
}

/// The lines that flush and delete `stale` chains, per table, appended to `restore`: declared
/// (flushed) before any `-X`, so chains that jump to each other can all go.
fn append_removals(restore: &mut String, stale: &BTreeSet<(String, String)>) {
    let tables: BTreeSet<&str> = stale.iter().map(|(t, _)| t.as_str()).collect();
    for t in tables {
        let _ = writeln!(restore, "*{t}");
        for (_, c) in stale.iter().filter(|(tt, _)| tt == t) {
            let _ = writeln!(restore, ":{c} - [0:0]");
        }
        for (_, c) in stale.iter().filter(|(tt, _)| tt == t) {
            let _ = writeln!(restore, "-X {c}");
        }
        restore.push_str("COMMIT\n");
    }
}

/// What a sync did, for the agent's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Builtin jumps that were missing and were inserted.
    pub jumps_inserted: usize,
    /// Our chains deleted because the program no longer has them.
    pub chains_removed: usize,
}

/// A full sync: for each family, our chains rewritten from `program` (a full render), our chains
/// the program lacks deleted, and the builtin jumps ensured. Families absent from the program
/// lose our chains and jumps.
pub fn apply_full(ap: &mut dyn IptablesApplier, program: &str) -> Result<Applied, ApplyError> {
    let mut done = Applied::default();
    let sections = program::sections(program);
    for family in [IpFamily::V4, IpFamily::V6] {
        let text = sections.iter().find(|(f, _)| *f == family).map(|(_, s)| s.as_str()).unwrap_or("");
        let mut p = prepare(text);
        let present = owned_chains(&ap.save(family)?);
        let stale: BTreeSet<_> = present.difference(&p.declared).cloned().collect();
        if p.declared.is_empty() {
            // The family is gone: our jumps go first, or the chains could not be deleted. Only
            // jumps to chains that exist can exist (`-C` fails outright on a missing target).
            for (table, line) in program::builtin_jumps(family) {
                let target = line.rsplit(' ').next().unwrap_or_default();
                if present.contains(&(table.to_string(), target.to_string())) {
                    delete_rule(ap, family, table, &line)?;
                }
            }
        }
        append_removals(&mut p.restore, &stale);
        done.chains_removed += stale.len();
        if p.restore.lines().any(|l| l.starts_with('*')) {
            ap.restore(family, &p.restore)?;
        }
        done.jumps_inserted += ensure_jumps(ap, family, &p.appends)?;
    }
    Ok(done)
}

/// A partial sync: a transaction from the incremental renderer.
pub fn apply_incremental(ap: &mut dyn IptablesApplier, transaction: &str) -> Result<Applied, ApplyError> {
    let mut done = Applied::default();
    for (family, text) in program::sections(transaction) {
        let p = prepare(&text);
        for (table, line) in &p.deletes {
            delete_rule(ap, family, table, line)?;
        }
        if p.restore.lines().any(|l| l.starts_with('*')) {
            ap.restore(family, &p.restore)?;
        }
        done.jumps_inserted += ensure_jumps(ap, family, &p.appends)?;
    }
    Ok(done)
}

/// `-C` then `-I CHAIN 1` for each missing jump, last first, so they end in the order given
/// (kube-proxy prepends its jumps too: ours run before rules added later by others).
fn ensure_jumps(
    ap: &mut dyn IptablesApplier,
    family: IpFamily,
    appends: &[(String, String)],
) -> Result<usize, ApplyError> {
    let mut inserted = 0;
    for (table, line) in appends.iter().rev() {
        let args = rule_args(line)?;
        if !ap.rule(family, table, RuleOp::Check, &args)? {
            ap.rule(family, table, RuleOp::Insert, &args)?;
            inserted += 1;
        }
    }
    Ok(inserted)
}

fn delete_rule(ap: &mut dyn IptablesApplier, family: IpFamily, table: &str, line: &str) -> Result<(), ApplyError> {
    let args = rule_args(line)?;
    if ap.rule(family, table, RuleOp::Check, &args)? {
        ap.rule(family, table, RuleOp::Delete, &args)?;
    }
    Ok(())
}

/// `-A CHAIN rest` or `-D CHAIN rest` as `[CHAIN, rest...]`.
fn rule_args(line: &str) -> Result<Vec<String>, ApplyError> {
    let mut args = split_args(line)?;
    if !args.is_empty() {
        args.remove(0);
    }
    Ok(args)
}

/// Runs the iptables tools.
#[derive(Debug, Clone, Default)]
pub struct Kernel {
    /// Run every tool under this prefix (`ip netns exec NAME`), for tests in a namespace.
    pub prefix: Vec<String>,
    /// Which binaries to run: `iptables-legacy-restore` or `iptables-nft-restore`; `None` runs
    /// whatever `iptables-restore` is on this system.
    pub variant: Option<Variant>,
}

impl Kernel {
    pub fn new() -> Self {
        Kernel::default()
    }

    /// Runs inside network namespace `name`.
    pub fn in_netns(name: &str) -> Self {
        Kernel { prefix: super::netns_prefix(name), variant: None }
    }

    /// Runs the binaries of one variant.
    pub fn with_variant(mut self, variant: Variant) -> Self {
        self.variant = matches!(variant, Variant::Legacy | Variant::NfTables).then_some(variant);
        self
    }

    /// Which variant `iptables` is here.
    pub fn variant(&self) -> Result<Variant, ApplyError> {
        if let Some(v) = self.variant {
            return Ok(v);
        }
        let (out, _) = self.run("iptables", &["--version".to_string()], None)?;
        Ok(Variant::from_version(&out))
    }

    /// Picks the variant the node's other rules live in, as Kubernetes' iptables-wrappers do for
    /// kube-proxy: rules written with the other variant would run in a different order than the
    /// rest of the node's firewall. See [`choose_variant`].
    pub fn detect(&self) -> Result<Variant, ApplyError> {
        let read = |tool: &'static str, args: &[&str]| -> Result<Option<String>, ApplyError> {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            match self.run(tool, &args, None) {
                Ok((out, st)) if st.code == Some(0) => Ok(Some(out)),
                Ok(_) => Ok(None),
                // A system with only one variant installed: the other has nothing.
                Err(ApplyError::Spawn { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let (nft_mangle, legacy_mangle) =
            (read("iptables-nft-save", &["-t", "mangle"])?, read("iptables-legacy-save", &["-t", "mangle"])?);
        if nft_mangle.is_none() && legacy_mangle.is_none() {
            // Neither binary by its variant name: whatever `iptables` is.
            return Ok(Variant::Unknown);
        }
        let count = |tool| -> Result<usize, ApplyError> { Ok(read(tool, &[])?.map_or(0, |s| rule_count(&s))) };
        let nft_rules = count("iptables-nft-save")? + count("ip6tables-nft-save")?;
        let legacy_rules = count("iptables-legacy-save")? + count("ip6tables-legacy-save")?;
        Ok(choose_variant(
            nft_mangle.as_deref().unwrap_or(""),
            legacy_mangle.as_deref().unwrap_or(""),
            nft_rules,
            legacy_rules,
        ))
    }

    /// Runs a tool; returns stdout and whether it succeeded. `Err` only when it cannot start.
    fn run(&self, tool: &'static str, args: &[String], stdin: Option<&str>) -> Result<(String, Output), ApplyError> {
        let out =
            super::run_tool(&self.prefix, tool, args, stdin).map_err(|source| ApplyError::Spawn { tool, source })?;
        let status = Output {
            code: out.status.code(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
        };
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), status))
    }

    fn checked(&self, tool: &'static str, args: &[String], stdin: Option<&str>) -> Result<String, ApplyError> {
        let (out, st) = self.run(tool, args, stdin)?;
        if st.code == Some(0) {
            Ok(out)
        } else {
            Err(ApplyError::Failed { tool, status: st.status, stderr: st.stderr })
        }
    }
}

/// How a tool exited.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    status: String,
    stderr: String,
}

/// The chains kubelet creates in the `mangle` table so that proxies can tell which variant the
/// node uses (`KUBE-IPTABLES-HINT` since 1.24, `KUBE-KUBELET-CANARY` before).
const HINT_CHAINS: [&str; 2] = [":KUBE-IPTABLES-HINT ", ":KUBE-KUBELET-CANARY "];

/// iptables-wrappers' choice: the variant whose `mangle` table holds kubelet's hint chain (nft
/// first), else the variant with more rules, nft on a tie (a fresh node has no rules at all).
pub fn choose_variant(nft_mangle: &str, legacy_mangle: &str, nft_rules: usize, legacy_rules: usize) -> Variant {
    let hinted = |save: &str| save.lines().any(|l| HINT_CHAINS.iter().any(|h| l.starts_with(h)));
    if hinted(nft_mangle) {
        Variant::NfTables
    } else if hinted(legacy_mangle) || legacy_rules > nft_rules {
        Variant::Legacy
    } else {
        Variant::NfTables
    }
}

/// Rules in an `iptables-save` output.
fn rule_count(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

fn tools(family: IpFamily, variant: Option<Variant>) -> (&'static str, &'static str, &'static str) {
    match (family, variant) {
        (IpFamily::V4, Some(Variant::Legacy)) => ("iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save"),
        (IpFamily::V4, Some(Variant::NfTables)) => ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"),
        (IpFamily::V4, _) => ("iptables", "iptables-restore", "iptables-save"),
        (IpFamily::V6, Some(Variant::Legacy)) => {
            ("ip6tables-legacy", "ip6tables-legacy-restore", "ip6tables-legacy-save")
        }
        (IpFamily::V6, Some(Variant::NfTables)) => ("ip6tables-nft", "ip6tables-nft-restore", "ip6tables-nft-save"),
        (IpFamily::V6, _) => ("ip6tables", "ip6tables-restore", "ip6tables-save"),
    }
}

/// Wait up to 5 s for the xtables lock rather than fail when another writer holds it.
const WAIT: &str = "5";

impl IptablesApplier for Kernel {
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), ApplyError> {
        let tool = tools(family, self.variant).1;
        self.checked(tool, &["--noflush".into(), "-w".into(), WAIT.into()], Some(input)).map(drop)
    }

    fn save(&mut self, family: IpFamily) -> Result<String, ApplyError> {
        self.checked(tools(family, self.variant).2, &[], None)
    }

    fn rule(&mut self, family: IpFamily, table: &str, op: RuleOp, rule: &[String]) -> Result<bool, ApplyError> {
        let tool = tools(family, self.variant).0;
        let Some((chain, spec)) = rule.split_first() else { return Ok(false) };
        let mut args = vec!["-w".to_string(), WAIT.into(), "-t".into(), table.into()];
        match op {
            RuleOp::Check => args.extend(["-C".into(), chain.clone()]),
            RuleOp::Insert => args.extend(["-I".into(), chain.clone(), "1".into()]),
            RuleOp::Delete => args.extend(["-D".into(), chain.clone()]),
        }
        args.extend(spec.iter().cloned());
        let (_, st) = self.run(tool, &args, None)?;
        match (op, st.code) {
            (_, Some(0)) => Ok(true),
            // `-C` exits 1 when the rule is not there; anything else is a real failure.
            (RuleOp::Check, Some(1)) => Ok(false),
            _ => Err(ApplyError::Failed { tool, status: st.status, stderr: st.stderr }),
        }
    }
}

/// Keeps builtin-chain rules and our chains in memory, and records every call.
#[derive(Debug, Default)]
pub struct Recording {
    /// `(family, input)` of every restore, in order.
    pub restores: Vec<(IpFamily, String)>,
    /// `(family, table, op, rule)` of every insert and delete.
    pub rule_ops: Vec<(IpFamily, String, RuleOp, String)>,
    /// Rules present in builtin chains: `(family, table, "CHAIN args...")`.
    pub builtin: BTreeSet<(IpFamily, String, String)>,
    /// What `save` answers, per family.
    pub saved_v4: String,
    pub saved_v6: String,
    /// Fail every restore while set.
    pub fail: bool,
}

impl IptablesApplier for Recording {
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), ApplyError> {
        if self.fail {
            return Err(ApplyError::Failed {
                tool: "iptables-restore",
                status: "exit status: 1".into(),
                stderr: "injected".into(),
            });
        }
        self.restores.push((family, input.to_string()));
        Ok(())
    }

    fn save(&mut self, family: IpFamily) -> Result<String, ApplyError> {
        Ok(match family {
            IpFamily::V4 => self.saved_v4.clone(),
            IpFamily::V6 => self.saved_v6.clone(),
        })
    }

    fn rule(&mut self, family: IpFamily, table: &str, op: RuleOp, rule: &[String]) -> Result<bool, ApplyError> {
        let key = (family, table.to_string(), rule.join(" "));
        match op {
            RuleOp::Check => return Ok(self.builtin.contains(&key)),
            RuleOp::Insert => self.builtin.insert(key.clone()),
            RuleOp::Delete => self.builtin.remove(&key),
        };
        self.rule_ops.push((family, key.1, op, key.2));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::policy::Backend;

    fn demo(node: &str) -> String {
        switchyard_engine::render(&switchyard_engine::demo::cluster(), node, Backend::Iptables).expect("renders")
    }

    /// kube-proxy's reading of `iptables --version`.
    #[test]
    fn variant_from_version() {
        assert_eq!(Variant::from_version("iptables v1.8.9 (nf_tables)"), Variant::NfTables);
        assert_eq!(Variant::from_version("iptables v1.8.7 (legacy)"), Variant::Legacy);
        assert_eq!(Variant::from_version("iptables v1.4.21"), Variant::Unknown);
    }

    /// iptables-wrappers' order: kubelet's hint chain (nft first), then the larger rule set.
    #[test]
    fn variant_follows_the_hint_then_the_rules() {
        let hint = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        let plain = "*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(choose_variant(hint, hint, 0, 100), Variant::NfTables);
        assert_eq!(choose_variant(plain, hint, 100, 0), Variant::Legacy);
        assert_eq!(choose_variant(plain, canary, 100, 0), Variant::Legacy);
        assert_eq!(choose_variant(plain, plain, 3, 40), Variant::Legacy);
        assert_eq!(choose_variant(plain, plain, 40, 3), Variant::NfTables);
        assert_eq!(choose_variant(plain, plain, 0, 0), Variant::NfTables, "a fresh node");
        assert_eq!(rule_count("*filter\n-A INPUT -j ACCEPT\n-A FORWARD -j DROP\nCOMMIT\n"), 2);
    }

    /// Quoted comments stay one argument.
    #[test]
    fn splits_quoted_arguments() {
        let a = split_args(r#"-A INPUT -m comment --comment "a \"b\" c" -j X"#).expect("splits");
        assert_eq!(a, ["-A", "INPUT", "-m", "comment", "--comment", "a \"b\" c", "-j", "X"]);
        assert!(split_args("-A X \"open").is_err());
    }

    /// The restore input of a full sync names no builtin chain; the jumps are inserted once, and
    /// a second full sync inserts nothing.
    #[test]
    fn full_sync_touches_only_our_chains_and_ensures_jumps_once() {
        let mut fake = Recording::default();
        let first = apply_full(&mut fake, &demo("node-1")).expect("applies");
        let jumps = program::builtin_jumps(IpFamily::V4).len();
        assert_eq!(first.jumps_inserted, jumps);
        for (_, input) in &fake.restores {
            for line in input.lines() {
                let chain = line
                    .strip_prefix(':')
                    .or_else(|| line.strip_prefix("-A "))
                    .or_else(|| line.strip_prefix("-X "))
                    .and_then(|r| r.split_whitespace().next());
                if let Some(c) = chain {
                    assert!(c.starts_with(CHAIN_PREFIX), "restore touches {c}: {line}");
                }
            }
        }
        let second = apply_full(&mut fake, &demo("node-1")).expect("applies");
        assert_eq!(second.jumps_inserted, 0);
        assert_eq!(fake.builtin.len(), jumps);
        // Inserted last first: the first jump listed ends first in its chain.
        let ops: Vec<_> = fake.rule_ops.iter().map(|(_, _, op, _)| *op).collect();
        assert!(ops.iter().all(|o| *o == RuleOp::Insert));
    }

    /// Our chains the program no longer has are flushed and deleted; foreign chains never.
    #[test]
    fn full_sync_deletes_our_stale_chains_only() {
        let mut fake = Recording {
            saved_v4:
                "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n:SWITCHYARD-SVC-OLDOLDOLDOLD1 - [0:0]\nCOMMIT\n"
                    .into(),
            ..Recording::default()
        };
        let done = apply_full(&mut fake, &demo("node-1")).expect("applies");
        assert_eq!(done.chains_removed, 1);
        let all: String = fake.restores.iter().map(|(_, s)| s.as_str()).collect();
        assert!(all.contains("-X SWITCHYARD-SVC-OLDOLDOLDOLD1"), "{all}");
        assert!(!all.contains("DOCKER"));
    }

    /// A family the program no longer has loses our jumps, then our chains; a family where we
    /// own nothing is left alone.
    #[test]
    fn gone_family_is_torn_down() {
        let mut fake = Recording {
            saved_v6: "*nat\n:SWITCHYARD-SERVICES - [0:0]\n:SWITCHYARD-POSTROUTING - [0:0]\nCOMMIT\n".into(),
            ..Recording::default()
        };
        for (table, line) in program::builtin_jumps(IpFamily::V6) {
            let rule = split_args(&line).expect("splits")[1..].join(" ");
            fake.builtin.insert((IpFamily::V6, table.to_string(), rule));
        }
        let done = apply_full(&mut fake, &demo("node-1")).expect("applies");
        assert_eq!(done.chains_removed, 2);
        let deleted: Vec<_> =
            fake.rule_ops.iter().filter(|(f, _, op, _)| *f == IpFamily::V6 && *op == RuleOp::Delete).collect();
        assert_eq!(deleted.len(), 3, "{deleted:?}");
        assert!(fake.builtin.iter().filter(|(f, _, _)| *f == IpFamily::V6).all(|(_, t, _)| t == "filter"));
        let v6: Vec<_> = fake.restores.iter().filter(|(f, _)| *f == IpFamily::V6).collect();
        assert_eq!(v6.len(), 1);
        assert!(v6[0].1.contains("-X SWITCHYARD-SERVICES"), "{}", v6[0].1);
    }

    /// A failing restore is an error and leaves no record.
    #[test]
    fn failure_is_reported() {
        let mut fake = Recording { fail: true, ..Recording::default() };
        assert!(apply_full(&mut fake, &demo("node-1")).is_err());
        assert!(fake.restores.is_empty());
    }

    /// An endpoint change restores only our chains and needs no jump.
    #[test]
    fn incremental_restores_changed_chains() {
        let c = switchyard_engine::demo::cluster();
        let mut changed = c.clone();
        changed.endpoint_slices.retain(|k, _| !k.name.starts_with("nginx"));
        let tx = switchyard_engine::render_incremental(&c, &changed, "node-1", Backend::Iptables).expect("renders");
        let mut fake = Recording::default();
        let done = apply_incremental(&mut fake, &tx).expect("applies");
        assert_eq!(done, Applied::default());
        assert_eq!(fake.restores.len(), 1);
        assert!(fake.restores[0].1.contains("COMMIT"));
        assert!(fake.rule_ops.is_empty());
    }
}
