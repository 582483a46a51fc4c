//! The IPVS backend's applier: a program or transaction from
//! [`switchyard_engine::render::ipvs`] becomes [`Step`]s, one per section, each piped to its tool
//! in the order written (`ipvsadm -R`, `ipset restore -exist`, `iptables-restore --noflush`,
//! `ip6tables-restore --noflush`, `ip -force -batch -`).
//!
//! [`Kernel`] runs the tools (optionally inside a network namespace, for tests); [`Recording`]
//! only records, for unit tests. Kernels without the IPVS module (`/proc/net/ip_vs` missing)
//! cannot take the virtual servers: [`Kernel::without`] skips that part (and kernels without the
//! dummy interface type, the `ip` part), recording what it skipped.

use std::collections::BTreeMap;

use switchyard_engine::model::IpFamily;
use switchyard_engine::render::ipvs::{self as program, Section};

/// One tool invocation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub section: Section,
    /// What the tool reads on standard input (comments stripped where the tool reads none).
    pub input: String,
    /// iptables: `--noflush` (a transaction). A full program replaces the `nat` and `filter`
    /// tables, as `iptables-restore` does for the iptables backend's full program.
    pub noflush: bool,
}

impl Step {
    /// The command line: program and arguments.
    pub fn command(&self) -> (&'static str, &'static [&'static str]) {
        match self.section {
            Section::Ipvsadm => ("ipvsadm", &["-R"]),
            Section::Ipset => ("ipset", &["restore", "-exist"]),
            Section::Iptables(IpFamily::V4) if self.noflush => ("iptables-restore", &["--noflush"]),
            Section::Iptables(IpFamily::V6) if self.noflush => ("ip6tables-restore", &["--noflush"]),
            Section::Iptables(IpFamily::V4) => ("iptables-restore", &[]),
            Section::Iptables(IpFamily::V6) => ("ip6tables-restore", &[]),
            // -force: `link add` fails when the dummy interface exists; the rest must go on.
            Section::Ip => ("ip", &["-force", "-batch", "-"]),
        }
    }
}

/// A program or transaction, as the tools will read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    pub steps: Vec<Step>,
}

impl Transaction {
    /// A full program (as `render --backend ipvs` writes it).
    pub fn from_program(text: &str) -> Transaction {
        Self::split(text, false)
    }

    /// A transaction (as the incremental renderer writes it).
    pub fn from_transaction(text: &str) -> Transaction {
        Self::split(text, true)
    }

    fn split(text: &str, noflush: bool) -> Transaction {
        let steps = program::sections(text)
            .into_iter()
            .map(|(section, _, body)| {
                let input = match section {
                    // iptables-restore reads comments; the others do not.
                    Section::Iptables(_) => body,
                    _ => program::strip_comments(&body),
                };
                Step { section, input, noflush }
            })
            .collect();
        Transaction { steps }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Why a transaction did not apply.
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
    #[error("the IPVS module is not loaded (no /proc/net/ip_vs): cannot program virtual servers")]
    NoIpvs,
}

/// Every kernel write of the IPVS backend goes through here.
pub trait IpvsApplier {
    /// Applies the steps in order; stops at the first failure.
    fn apply(&mut self, t: &Transaction) -> Result<(), ApplyError>;
}

/// Whether this kernel has IPVS (the module is loaded, or built in).
pub fn ipvs_available() -> bool {
    std::path::Path::new("/proc/net/ip_vs").exists()
}

/// Runs the tools.
#[derive(Debug, Clone, Default)]
pub struct Kernel {
    /// Run every tool under this prefix (`ip netns exec NAME`), for tests in a namespace.
    pub prefix: Vec<String>,
    /// Sections to leave out (the kernel cannot take them); see `skipped`.
    pub skip: Vec<Section>,
    /// The steps left out so far.
    pub skipped: Vec<Section>,
}

impl Kernel {
    pub fn new() -> Self {
        Kernel::default()
    }

    /// Runs inside network namespace `name`.
    pub fn in_netns(name: &str) -> Self {
        Kernel { prefix: super::netns_prefix(name), ..Kernel::default() }
    }

    /// Skips every step of `section` (recorded in `skipped`) instead of failing on a kernel that
    /// lacks what it needs (`Section::Ipvsadm` without the IPVS module).
    pub fn without(mut self, section: Section) -> Self {
        self.skip.push(section);
        self
    }

    fn run(&self, step: &Step) -> Result<(), ApplyError> {
        let (tool, args) = step.command();
        let resized;
        let input = if step.section == Section::Ipset {
            resized = resize_sets(&step.input, &self.set_headers()?);
            &resized
        } else {
            &step.input
        };
        let out = super::run_tool(&self.prefix, tool, args, Some(input))
            .map_err(|source| ApplyError::Spawn { tool, source })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ApplyError::Failed {
                tool,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
            })
        }
    }
}

impl Kernel {
    /// `ipset list -terse`: each set's type and header, by name.
    fn set_headers(&self) -> Result<BTreeMap<String, String>, ApplyError> {
        let out = super::run_tool(&self.prefix, "ipset", &["list", "-terse"], None)
            .map_err(|source| ApplyError::Spawn { tool: "ipset", source })?;
        let mut sets = BTreeMap::new();
        let mut name = None;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(n) = line.strip_prefix("Name: ") {
                name = Some(n.trim().to_string());
            } else if let (Some(t), Some(n)) = (line.strip_prefix("Type: "), &name) {
                sets.insert(n.clone(), t.trim().to_string());
            } else if let (Some(h), Some(n)) = (line.strip_prefix("Header: "), &name) {
                sets.entry(n.clone()).and_modify(|t| *t = format!("{t} {}", h.trim()));
            }
        }
        Ok(sets)
    }
}

/// `ipset create -exist` fails on a set that exists with other parameters (a `maxelem` from an
/// earlier version, say), and a set iptables rules use cannot be destroyed. Such sets are built
/// again under a temporary name and swapped in, in the same `ipset restore`.
fn resize_sets(input: &str, existing: &BTreeMap<String, String>) -> String {
    let mut renamed: BTreeMap<&str, String> = BTreeMap::new();
    for line in input.lines() {
        let Some(rest) = line.strip_prefix("create ") else { continue };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else { continue };
        let wanted: Vec<&str> = words.collect();
        let Some(have) = existing.get(name) else { continue };
        let have: Vec<&str> = have.split_whitespace().collect();
        // Compare what `create` fixes: type, family, maxelem (the kernel grows hashsize itself).
        let param = |p: &[&str], key: &str| p.windows(2).find(|w| w[0] == key).map(|w| w[1].to_string());
        let same = have.first() == Some(&kind)
            && ["family", "maxelem"]
                .iter()
                .all(|k| param(&have, k) == param(&wanted, k) || param(&wanted, k).is_none());
        if !same {
            let tmp = format!("SWITCHYARD-RESIZE-{}", renamed.len());
            renamed.insert(name, tmp);
        }
    }
    if renamed.is_empty() {
        return input.to_string();
    }
    let mut out = String::new();
    for tmp in renamed.values().filter(|t| existing.contains_key(*t)) {
        // Left by an agent killed mid-resize: nothing uses it.
        out.push_str(&format!("destroy {tmp}\n"));
    }
    for line in input.lines() {
        let mut words = line.splitn(3, ' ');
        let (verb, name, rest) = (words.next().unwrap_or(""), words.next().unwrap_or(""), words.next());
        match renamed.get(name).filter(|_| matches!(verb, "create" | "add" | "del" | "flush")) {
            Some(tmp) => out.push_str(&[verb, tmp.as_str()].into_iter().chain(rest).collect::<Vec<_>>().join(" ")),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    for (name, tmp) in &renamed {
        out.push_str(&format!("swap {tmp} {name}\ndestroy {tmp}\n"));
    }
    out
}

impl IpvsApplier for Kernel {
    fn apply(&mut self, t: &Transaction) -> Result<(), ApplyError> {
        for step in &t.steps {
            if self.skip.contains(&step.section) {
                self.skipped.push(step.section);
                continue;
            }
            if step.section == Section::Ipvsadm && !ipvs_available() {
                return Err(ApplyError::NoIpvs);
            }
            self.run(step)?;
        }
        Ok(())
    }
}

/// Records transactions instead of applying them; can be told to fail.
#[derive(Debug, Default)]
pub struct Recording {
    pub applied: Vec<Transaction>,
    /// Fail (without recording) when a transaction has a step for this section.
    pub fail_on: Option<Section>,
}

impl IpvsApplier for Recording {
    fn apply(&mut self, t: &Transaction) -> Result<(), ApplyError> {
        if let Some(s) = self.fail_on
            && t.steps.iter().any(|x| x.section == s)
        {
            let (tool, _) = Step { section: s, input: String::new(), noflush: true }.command();
            return Err(ApplyError::Failed { tool, status: "exit status: 1".into(), stderr: "injected".into() });
        }
        self.applied.push(t.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::policy::Backend;

    /// A set that exists with another `maxelem` is built under a temporary name and swapped in;
    /// sets that match, and sets that do not exist yet, are left to `create -exist`.
    #[test]
    fn sets_with_other_parameters_are_swapped_in() {
        let input = "create A hash:ip family inet hashsize 1024 maxelem 1048576\nflush A\nadd A 10.0.0.1\n\
                     create B hash:ip family inet hashsize 1024 maxelem 1048576\nadd B 10.0.0.2\n\
                     create C bitmap:port range 0-65535\n";
        let existing = BTreeMap::from([
            ("A".to_string(), "hash:ip family inet hashsize 4096 maxelem 65536 bucketsize 12 initval 0x1".to_string()),
            ("B".to_string(), "hash:ip family inet hashsize 2048 maxelem 1048576 bucketsize 12".to_string()),
            ("SWITCHYARD-RESIZE-0".to_string(), "hash:ip family inet hashsize 1024 maxelem 1048576".to_string()),
        ]);
        assert_eq!(
            resize_sets(input, &existing),
            "destroy SWITCHYARD-RESIZE-0\n\
             create SWITCHYARD-RESIZE-0 hash:ip family inet hashsize 1024 maxelem 1048576\nflush SWITCHYARD-RESIZE-0\n\
             add SWITCHYARD-RESIZE-0 10.0.0.1\n\
             create B hash:ip family inet hashsize 1024 maxelem 1048576\nadd B 10.0.0.2\n\
             create C bitmap:port range 0-65535\n\
             swap SWITCHYARD-RESIZE-0 A\ndestroy SWITCHYARD-RESIZE-0\n"
        );
        assert_eq!(resize_sets(input, &BTreeMap::new()), input);
    }

    fn demo_program() -> String {
        switchyard_engine::render(&switchyard_engine::demo::cluster(), "node-1", Backend::Ipvs).expect("renders")
    }

    /// A full program becomes one step per section, in order, each for its tool.
    #[test]
    fn program_splits_into_tool_steps() {
        let t = Transaction::from_program(&demo_program());
        let sections: Vec<Section> = t.steps.iter().map(|s| s.section).collect();
        assert_eq!(sections, [Section::Ipvsadm, Section::Ipset, Section::Iptables(IpFamily::V4), Section::Ip]);
        let commands: Vec<String> =
            t.steps.iter().map(|s| format!("{} {}", s.command().0, s.command().1.join(" "))).collect();
        assert_eq!(commands, ["ipvsadm -R", "ipset restore -exist", "iptables-restore ", "ip -force -batch -"]);
        assert!(t.steps[0].input.starts_with("-A -t 10.96.0.1:443 -s rr\n"), "{}", t.steps[0].input);
        for s in &t.steps {
            if !matches!(s.section, Section::Iptables(_)) {
                assert!(!s.input.lines().any(|l| l.starts_with('#')), "comments left for {:?}", s.section);
            }
        }
        assert!(t.steps[2].input.contains("*nat") && t.steps[2].input.contains("COMMIT"));
    }

    /// The recording fake keeps every transaction in order, and a failure leaves no record.
    #[test]
    fn recording_fake_records_and_fails_on_demand() {
        let cluster = switchyard_engine::demo::cluster();
        let mut changed = cluster.clone();
        changed.endpoint_slices.retain(|k, _| !k.name.starts_with("nginx"));
        let full = Transaction::from_program(&demo_program());
        let tx = Transaction::from_transaction(
            &switchyard_engine::render_incremental(&cluster, &changed, "node-1", Backend::Ipvs).expect("renders"),
        );
        assert!(!tx.is_empty());
        let mut fake = Recording::default();
        fake.apply(&full).expect("applies");
        fake.apply(&tx).expect("applies");
        assert_eq!(fake.applied, [full.clone(), tx.clone()]);
        // The endpoint change removes real servers and set members.
        assert!(tx.steps.iter().filter(|s| matches!(s.section, Section::Iptables(_))).all(|s| s.noflush));
        let ipvsadm = tx.steps.iter().find(|s| s.section == Section::Ipvsadm).expect("ipvsadm step");
        assert!(ipvsadm.input.lines().any(|l| l.starts_with("-d -t 10.96.0.10:80 -r ")), "{}", ipvsadm.input);

        let mut failing = Recording { fail_on: Some(Section::Ipvsadm), ..Recording::default() };
        let e = failing.apply(&full).expect_err("fails");
        assert!(e.to_string().starts_with("ipvsadm failed"), "{e}");
        assert!(failing.applied.is_empty());
    }

    /// An unchanged cluster is an empty transaction: nothing to run.
    #[test]
    fn no_change_no_steps() {
        let c = switchyard_engine::demo::cluster();
        let tx = switchyard_engine::render_incremental(&c, &c, "node-1", Backend::Ipvs).expect("renders");
        assert!(Transaction::from_transaction(&tx).is_empty());
    }

    /// The real applier runs each tool under its prefix and skips ipvsadm when told to.
    #[test]
    fn kernel_applier_skips_ipvsadm_when_asked() {
        let mut k = Kernel { prefix: vec!["true".into()], ..Kernel::default() }.without(Section::Ipvsadm);
        // `true ipset restore -exist` etc.: every non-IPVS step runs (and succeeds) under `true`.
        k.apply(&Transaction::from_program(&demo_program())).expect("applies");
        assert_eq!(k.skipped, [Section::Ipvsadm]);
        let mut f = Kernel { prefix: vec!["false".into()], ..Kernel::default() }.without(Section::Ipvsadm);
        assert!(matches!(f.apply(&Transaction::from_program(&demo_program())), Err(ApplyError::Failed { .. })));
    }
}
