//! Executes iptables programs: what [`crate::render::iptables`] writes, or what `iptables-save`
//! and `ip6tables-save` print on a node, parsed back into chains of rules and run over a packet.
//!
//! Only the `nat` and `filter` tables are kept. Rules written by other software are kept too: a
//! match we do not model (interfaces, ipsets, rate limits, ...) never matches, and a target we do
//! not model does nothing, so a real node's ruleset can be traced. A builtin chain's policy is
//! not applied: it belongs to the node's firewall, whose accepting rules usually depend on
//! interfaces we cannot see; the tracer explains what the proxy's rules do.
//!
//! [`Program::apply`] models `iptables-restore --noflush`, so that a transaction can be checked
//! by value against the program it should produce.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Hook, HookVerdict, Hop, Netfilter, NodeContext, PacketState, SocketAddr};
use crate::fasthash::FastHash;
use crate::model::{IpFamily, Protocol};

/// A line of a program that could not be read (or, for [`Program::apply`], not applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}: {text}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// The line as written.
    pub text: String,
    pub message: String,
}

/// A parsed iptables program: the `nat` and `filter` tables of each IP family.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Program {
    pub families: BTreeMap<IpFamily, Ruleset>,
}

/// The tables of one family (`iptables` or `ip6tables`), by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ruleset {
    pub tables: BTreeMap<String, Table>,
}

/// The chains of one table, by name (builtin chains included).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub chains: BTreeMap<String, Chain>,
}

#[derive(Debug, Clone, Default)]
pub struct Chain {
    /// A builtin chain's policy (`ACCEPT`, `DROP`); `None` for user-defined chains.
    pub policy: Option<String>,
    pub rules: Vec<Rule>,
    /// For long chains: which rules can match a destination (see [`DstIndex`]). Rebuilt after
    /// every parse or apply; not part of the chain's meaning.
    index: Option<std::sync::Arc<DstIndex>>,
}

impl PartialEq for Chain {
    fn eq(&self, other: &Self) -> bool {
        self.policy == other.policy && self.rules == other.rules
    }
}

/// A chain's rules by the single destination address they require. The tracer still visits
/// rules in order, but skips those whose `-d` cannot match: `SWITCHYARD-SERVICES` at 10,000
/// services is 10,000 rules, and a traced packet needs the few for its address. This is what
/// makes the trace fast without changing what the kernel would do.
#[derive(Debug, Default)]
struct DstIndex {
    by_ip: HashMap<IpAddr, Vec<usize>, FastHash>,
    /// Rules with no `-d`, a negated one, or a network wider than one address.
    others: Vec<usize>,
}

impl DstIndex {
    const MIN_RULES: usize = 32;

    fn build(rules: &[Rule]) -> Option<DstIndex> {
        if rules.len() < Self::MIN_RULES {
            return None;
        }
        let mut ix = DstIndex::default();
        for (i, r) in rules.iter().enumerate() {
            let single = r.matches.iter().find_map(|m| match m {
                Match::Destination { nets, negated: false }
                    if nets.len() == 1 && nets[0].prefix_len() == nets[0].max_prefix_len() =>
                {
                    Some(nets[0].addr())
                }
                _ => None,
            });
            match single {
                Some(ip) => ix.by_ip.entry(ip).or_default().push(i),
                None => ix.others.push(i),
            }
        }
        Some(ix)
    }

    /// The first rule at or after `i` that may match a packet to `dst`.
    fn next(&self, i: usize, dst: &IpAddr) -> Option<usize> {
        let first = |v: &[usize]| v.get(v.partition_point(|x| *x < i)).copied();
        let a = self.by_ip.get(dst).and_then(|v| first(v));
        let b = first(&self.others);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Program {
    /// Rebuilds every long chain's destination index.
    fn reindex(&mut self) {
        for rs in self.families.values_mut() {
            for t in rs.tables.values_mut() {
                for c in t.chains.values_mut() {
                    c.index = DstIndex::build(&c.rules).map(std::sync::Arc::new);
                }
            }
        }
    }
}

/// One rule. Two rules are equal when they match and act alike (the text is not compared, so
/// `-d 10.0.0.1` equals `-d 10.0.0.1/32`).
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule as written, `-A CHAIN ...`.
    pub text: String,
    /// `-m comment --comment`: which Service and field the rule comes from.
    pub comment: Option<String>,
    pub matches: Vec<Match>,
    pub target: Target,
}

impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.comment == other.comment && self.matches == other.matches && self.target == other.target
    }
}

/// A condition on the packet. All of a rule's matches must hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Match {
    /// `-s`: any of these networks.
    Source { nets: Vec<IpNet>, negated: bool },
    /// `-d`
    Destination { nets: Vec<IpNet>, negated: bool },
    /// `-p`; `None` is `all`.
    Protocol { number: Option<u8>, negated: bool },
    /// `--dport`, `--dports`: inclusive ranges.
    DestinationPort { ranges: Vec<(u16, u16)>, negated: bool },
    /// `--sport`, `--sports`
    SourcePort { ranges: Vec<(u16, u16)>, negated: bool },
    /// `-m addrtype --src-type/--dst-type TYPE`
    AddrType { source: bool, kind: String, negated: bool },
    /// `-m statistic --mode random --probability P`
    Statistic { probability: f64 },
    /// `-m recent`: `--set` always matches; a check never does for a connection's first packet.
    Recent { name: String, command: RecentCommand, seconds: Option<u32>, reap: bool },
    /// `-m mark --mark VALUE/MASK`
    Mark { value: u32, mask: u32, negated: bool },
    /// `-m conntrack --ctstate`, `-m state --state`
    CtState { states: Vec<String>, negated: bool },
    /// `--syn`
    TcpSyn { negated: bool },
    /// `-m set --match-set NAME dst,dst,src`: `source` says, per dimension of the set, whether
    /// it is taken from the packet's source (`src`) or destination (`dst`).
    Set { name: String, source: Vec<bool>, negated: bool },
    /// Anything else, as written: never matches.
    Unknown(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecentCommand {
    Set,
    Rcheck,
    Update,
    Remove,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// No `-j`: the rule only counts.
    None,
    Accept,
    Drop,
    Return,
    Reject {
        with: Option<String>,
    },
    /// `-j CHAIN` (or an extension target we do not know, which does nothing).
    Jump(String),
    /// `-g CHAIN`
    Goto(String),
    Dnat {
        ip: Option<IpAddr>,
        port: Option<u16>,
    },
    Snat {
        to: String,
    },
    Masquerade {
        random_fully: bool,
    },
    /// `-j MARK`, normalised to `--set-xmark VALUE/MASK`: mark = (mark & !MASK) ^ VALUE.
    Mark {
        value: u32,
        mask: u32,
    },
    /// An extension target with options we do not model (`LOG --log-prefix ...`).
    Other {
        name: String,
        args: Vec<String>,
    },
}

const NAT_BUILTINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];
const FILTER_BUILTINS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];

/// Extension targets that are not chains, so a jump to them is not a dangling reference.
const EXTENSION_TARGETS: &[&str] = &[
    "LOG",
    "NFLOG",
    "ULOG",
    "CT",
    "NOTRACK",
    "CONNMARK",
    "TCPMSS",
    "REDIRECT",
    "TPROXY",
    "NFQUEUE",
    "QUEUE",
    "CLASSIFY",
    "DSCP",
    "TOS",
    "TTL",
    "HL",
    "AUDIT",
    "CHECKSUM",
    "SECMARK",
    "CONNSECMARK",
    "TEE",
    "NETMAP",
    "TRACE",
    "SET",
    "IDLETIMER",
    "LED",
    "RATEEST",
    "SYNPROXY",
    "CLUSTERIP",
    "ECN",
    "NFACCT",
];

/// The ipsets a program's `-m set` matches look into (the IPVS backend's program has them).
pub trait IpSets {
    /// Whether the element the packet gives for `source` is in set `name`; `None` when there is
    /// no such set (the match then fails, as for any match we cannot evaluate).
    fn contains(&self, name: &str, source: &[bool], packet: &super::Packet) -> Option<bool>;
}

/// No ipsets: every `-m set` match fails.
pub struct NoSets;

impl IpSets for NoSets {
    fn contains(&self, _: &str, _: &[bool], _: &super::Packet) -> Option<bool> {
        None
    }
}

/// How deep jumps may nest before the tracer gives up on a branch (the kernel refuses loops).
const MAX_DEPTH: usize = 64;

fn builtins(table: &str) -> &'static [&'static str] {
    match table {
        "nat" => &NAT_BUILTINS,
        "filter" => &FILTER_BUILTINS,
        _ => &[],
    }
}

impl Table {
    fn new(name: &str) -> Self {
        let chains = builtins(name)
            .iter()
            .map(|b| (b.to_string(), Chain { policy: Some("ACCEPT".into()), ..Chain::default() }))
            .collect();
        Table { chains }
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.get(name)
    }
}

impl Program {
    /// Parses a program as `render` prints it or as `iptables-save` / `ip6tables-save` print a
    /// node's tables (several sections may follow each other). A section's family comes from its
    /// marker comment (`# iptables-restore`, `# ip6tables-restore`, or the save tools'
    /// `# Generated by ...`), else from the addresses its rules use. Tables other than `nat` and
    /// `filter` are skipped.
    pub fn parse(text: &str) -> Result<Program, ParseError> {
        let mut p = Program::default();
        restore(&mut p, text, false)?;
        Ok(p)
    }

    /// Applies `iptables-restore --noflush` input (as [`crate::render::iptables::render_incremental`]
    /// writes) the way the kernel would: tables are not flushed, a declared chain is created or
    /// flushed, and anything iptables-restore would refuse (a rule for a missing chain, a jump to
    /// a missing chain, deleting a chain that is referenced or not empty, deleting a rule that is
    /// not there) is an error. A table is changed only if its whole `COMMIT` applies.
    pub fn apply(&mut self, restore_text: &str) -> Result<(), ParseError> {
        restore(self, restore_text, true)
    }

    pub fn family(&self, family: IpFamily) -> Option<&Ruleset> {
        self.families.get(&family)
    }

    /// A chain of one family's table.
    pub fn chain(&self, family: IpFamily, table: &str, chain: &str) -> Option<&Chain> {
        self.families.get(&family)?.tables.get(table)?.chains.get(chain)
    }

    /// The number of rules in all tables.
    pub fn rule_count(&self) -> usize {
        self.families
            .values()
            .flat_map(|r| r.tables.values())
            .flat_map(|t| t.chains.values())
            .map(|c| c.rules.len())
            .sum()
    }

    /// The program as `iptables-restore` input again (sections per family, chains in name
    /// order, rules as written).
    pub fn to_restore(&self) -> String {
        let mut out = String::new();
        for (family, rs) in &self.families {
            out.push_str(match family {
                IpFamily::V4 => crate::render::iptables::SECTION_V4,
                IpFamily::V6 => crate::render::iptables::SECTION_V6,
            });
            out.push('\n');
            for (name, t) in &rs.tables {
                let _ = writeln!(out, "*{name}");
                for (cname, c) in &t.chains {
                    let _ = writeln!(out, ":{cname} {} [0:0]", c.policy.as_deref().unwrap_or("-"));
                }
                for c in t.chains.values() {
                    for r in &c.rules {
                        out.push_str(&r.text);
                        out.push('\n');
                    }
                }
                out.push_str("COMMIT\n");
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Reading restore input

/// One command of a table's transaction.
#[derive(Debug)]
enum Op {
    Declare { chain: String, policy: String },
    Append { chain: String, rule: Rule },
    Insert { chain: String, position: usize, rule: Rule },
    Replace { chain: String, position: usize, rule: Rule },
    DeleteRule { chain: String, rule: Rule },
    DeleteNumber { chain: String, position: usize },
    Flush(Option<String>),
    DeleteChain(Option<String>),
    NewChain(String),
    Policy { chain: String, policy: String },
    Ignore,
}

struct PendingTable {
    name: String,
    line: usize,
    text: String,
    keep: bool,
    saw_v6: bool,
    saw_v4: bool,
    ops: Vec<(usize, String, Op)>,
}

fn err(line: usize, text: &str, message: impl Into<String>) -> ParseError {
    ParseError { line, text: text.to_string(), message: message.into() }
}

fn marker(comment: &str) -> Option<IpFamily> {
    let c = comment.trim();
    if c == crate::render::iptables::SECTION_V6 || c.starts_with("# Generated by ip6tables-save") {
        Some(IpFamily::V6)
    } else if c == crate::render::iptables::SECTION_V4 || c.starts_with("# Generated by iptables-save") {
        Some(IpFamily::V4)
    } else {
        None
    }
}

/// `[0:0] -A ...` as `iptables-save -c` prints it.
fn strip_counters(line: &str) -> &str {
    if line.starts_with('[')
        && let Some(end) = line.find(']')
    {
        return line[end + 1..].trim_start();
    }
    line
}

fn restore(program: &mut Program, text: &str, noflush: bool) -> Result<(), ParseError> {
    let mut family: Option<IpFamily> = None;
    let mut pending: Option<PendingTable> = None;
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            if pending.is_none()
                && let Some(f) = marker(line)
            {
                family = Some(f);
            }
            continue;
        }
        let line = strip_counters(line);
        if let Some(name) = line.strip_prefix('*') {
            if let Some(t) = &pending {
                return Err(err(line_no, raw, format!("table {name} starts before table {} is committed", t.name)));
            }
            let name = name.trim();
            pending = Some(PendingTable {
                name: name.to_string(),
                line: line_no,
                text: raw.to_string(),
                keep: name == "nat" || name == "filter",
                saw_v6: false,
                saw_v4: false,
                ops: Vec::new(),
            });
            continue;
        }
        let Some(t) = pending.as_mut() else {
            return Err(err(line_no, raw, "outside a table (expected a line like *nat or *filter)"));
        };
        if line == "COMMIT" {
            if let Some(t) = pending.take() {
                commit(program, family, t, noflush)?;
            }
            continue;
        }
        if !t.keep {
            continue;
        }
        let op = parse_op(line, &mut t.saw_v4, &mut t.saw_v6).map_err(|m| err(line_no, raw, m))?;
        t.ops.push((line_no, raw.to_string(), op));
    }
    if let Some(t) = pending {
        if noflush {
            return Err(err(t.line, &t.text, "table is never committed (no COMMIT line)"));
        }
        commit(program, family, t, noflush)?;
    }
    program.reindex();
    Ok(())
}

fn commit(program: &mut Program, family: Option<IpFamily>, t: PendingTable, noflush: bool) -> Result<(), ParseError> {
    if !t.keep {
        return Ok(());
    }
    let family = family.unwrap_or(if t.saw_v6 && !t.saw_v4 { IpFamily::V6 } else { IpFamily::V4 });
    let rs = program.families.entry(family).or_default();
    // Without --noflush a table is replaced; with it, changed only if the whole commit applies.
    let mut table = match rs.tables.get(&t.name) {
        Some(existing) if noflush => existing.clone(),
        _ => Table::new(&t.name),
    };
    for (line, text, op) in t.ops {
        apply_op(&mut table, &t.name, op, noflush).map_err(|m| err(line, &text, m))?;
    }
    // A table left with nothing but empty, accepting builtin chains is the same as no table (the
    // kernel creates those on demand), so that programs compare by what they do.
    let empty = table
        .chains
        .iter()
        .all(|(name, c)| is_builtin(&t.name, name) && c.rules.is_empty() && c.policy.as_deref() == Some("ACCEPT"));
    if empty {
        rs.tables.remove(&t.name);
    } else {
        rs.tables.insert(t.name, table);
    }
    if rs.tables.is_empty() {
        program.families.remove(&family);
    }
    Ok(())
}

fn is_builtin(table: &str, chain: &str) -> bool {
    builtins(table).contains(&chain)
}

fn references(table: &Table, chain: &str) -> bool {
    table
        .chains
        .values()
        .flat_map(|c| &c.rules)
        .any(|r| matches!(&r.target, Target::Jump(c) | Target::Goto(c) if c == chain))
}

fn apply_op(table: &mut Table, table_name: &str, op: Op, strict: bool) -> Result<(), String> {
    let check_target = |table: &Table, rule: &Rule| -> Result<(), String> {
        if let Target::Jump(c) | Target::Goto(c) = &rule.target
            && strict
            && !table.chains.contains_key(c)
            && !EXTENSION_TARGETS.contains(&c.as_str())
        {
            return Err(format!("jump to chain {c}, which does not exist"));
        }
        Ok(())
    };
    fn chain_mut<'t>(table: &'t mut Table, chain: &str, strict: bool) -> Result<&'t mut Chain, String> {
        if !table.chains.contains_key(chain) {
            if strict {
                return Err(format!("chain {chain} does not exist"));
            }
            // A hand-written file may use a chain it never declared.
            table.chains.insert(chain.to_string(), Chain::default());
        }
        table.chains.get_mut(chain).ok_or_else(|| format!("chain {chain} does not exist"))
    }
    match op {
        Op::Ignore => {}
        Op::Declare { chain, policy } => {
            if is_builtin(table_name, &chain) {
                // A builtin chain is never flushed by its declaration; `-` keeps its policy.
                if policy != "-"
                    && let Some(c) = table.chains.get_mut(&chain)
                {
                    c.policy = Some(policy);
                }
            } else if let Some(c) = table.chains.get_mut(&chain) {
                c.rules.clear();
            } else {
                table.chains.insert(chain, Chain::default());
            }
        }
        Op::NewChain(chain) => match table.chains.entry(chain) {
            std::collections::btree_map::Entry::Occupied(e) if strict => {
                return Err(format!("chain {} already exists", e.key()));
            }
            std::collections::btree_map::Entry::Occupied(_) => {}
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Chain::default());
            }
        },
        Op::Append { chain, rule } => {
            check_target(table, &rule)?;
            chain_mut(table, &chain, strict)?.rules.push(rule);
        }
        Op::Insert { chain, position, rule } => {
            check_target(table, &rule)?;
            let c = chain_mut(table, &chain, strict)?;
            if position == 0 || position > c.rules.len() + 1 {
                return Err(format!("no position {position} in chain {chain}"));
            }
            c.rules.insert(position - 1, rule);
        }
        Op::Replace { chain, position, rule } => {
            check_target(table, &rule)?;
            let c = chain_mut(table, &chain, strict)?;
            match c.rules.get_mut(position.wrapping_sub(1)) {
                Some(r) => *r = rule,
                None => return Err(format!("no rule {position} in chain {chain}")),
            }
        }
        Op::DeleteRule { chain, rule } => {
            let c = chain_mut(table, &chain, strict)?;
            match c.rules.iter().position(|r| *r == rule) {
                Some(i) => {
                    c.rules.remove(i);
                }
                None if strict => return Err(format!("no such rule in chain {chain}")),
                None => {}
            }
        }
        Op::DeleteNumber { chain, position } => {
            let c = chain_mut(table, &chain, strict)?;
            if position == 0 || position > c.rules.len() {
                return Err(format!("no rule {position} in chain {chain}"));
            }
            c.rules.remove(position - 1);
        }
        Op::Flush(None) => table.chains.values_mut().for_each(|c| c.rules.clear()),
        Op::Flush(Some(chain)) => chain_mut(table, &chain, strict)?.rules.clear(),
        Op::DeleteChain(None) => {
            let user: Vec<String> = table.chains.keys().filter(|c| !is_builtin(table_name, c)).cloned().collect();
            for c in user {
                if references(table, &c) && !strict {
                    continue;
                }
                delete_chain(table, table_name, &c)?;
            }
        }
        Op::DeleteChain(Some(chain)) => delete_chain(table, table_name, &chain)?,
        Op::Policy { chain, policy } => {
            if !is_builtin(table_name, &chain) {
                return Err(format!("chain {chain} is not a builtin chain and has no policy"));
            }
            if let Some(c) = table.chains.get_mut(&chain) {
                c.policy = Some(policy);
            }
        }
    }
    Ok(())
}

fn delete_chain(table: &mut Table, table_name: &str, chain: &str) -> Result<(), String> {
    if is_builtin(table_name, chain) {
        return Err(format!("cannot delete builtin chain {chain}"));
    }
    match table.chains.get(chain) {
        None => return Err(format!("chain {chain} does not exist")),
        Some(c) if !c.rules.is_empty() => return Err(format!("chain {chain} is not empty")),
        Some(_) => {}
    }
    if references(table, chain) {
        return Err(format!("chain {chain} is still referenced"));
    }
    table.chains.remove(chain);
    Ok(())
}

/// Splits a line into words the way iptables-restore does: double quotes group, and a
/// backslash inside quotes escapes the next character. Each word comes with its byte offset.
fn tokenize(line: &str) -> Result<Vec<(usize, String)>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start: Option<usize> = None;
    let mut quoted = false;
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some((_, n)) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    out.push((s, std::mem::take(&mut cur)));
                }
            }
            c => {
                cur.push(c);
                start.get_or_insert(i);
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if let Some(s) = start {
        out.push((s, cur));
    }
    Ok(out)
}

fn parse_op(line: &str, saw_v4: &mut bool, saw_v6: &mut bool) -> Result<Op, String> {
    if let Some(rest) = line.strip_prefix(':') {
        let mut words = rest.split_whitespace();
        let chain = words.next().ok_or("chain line without a chain name")?;
        let policy = words.next().ok_or("chain line without a policy (use - for none)")?;
        return Ok(Op::Declare { chain: chain.to_string(), policy: policy.to_string() });
    }
    let toks = tokenize(line)?;
    let word = |i: usize| toks.get(i).map(|(_, w)| w.as_str());
    let cmd = word(0).ok_or("empty line")?;
    let chain = || word(1).map(str::to_string).ok_or_else(|| format!("{cmd} needs a chain name"));
    let number = |i: usize| word(i).and_then(|w| w.parse::<usize>().ok());
    // The rule text is normalised to `-A CHAIN <spec as written>`.
    let rule_from = |i: usize, chain: &str, v4: &mut bool, v6: &mut bool| -> Result<Rule, String> {
        let spec = toks.get(i).map(|(off, _)| line[*off..].trim()).unwrap_or("");
        let text = if spec.is_empty() { format!("-A {chain}") } else { format!("-A {chain} {spec}") };
        let words: Vec<&str> = toks[i.min(toks.len())..].iter().map(|(_, w)| w.as_str()).collect();
        parse_rule(&words, text, v4, v6)
    };
    Ok(match cmd {
        "-A" | "--append" => {
            let chain = chain()?;
            let rule = rule_from(2, &chain, saw_v4, saw_v6)?;
            Op::Append { chain, rule }
        }
        "-I" | "--insert" => {
            let chain = chain()?;
            let (position, at) = match number(2) {
                Some(n) => (n, 3),
                None => (1, 2),
            };
            let rule = rule_from(at, &chain, saw_v4, saw_v6)?;
            Op::Insert { chain, position, rule }
        }
        "-R" | "--replace" => {
            let chain = chain()?;
            let position = number(2).ok_or("-R needs a rule number")?;
            let rule = rule_from(3, &chain, saw_v4, saw_v6)?;
            Op::Replace { chain, position, rule }
        }
        "-D" | "--delete" => {
            let chain = chain()?;
            match number(2) {
                Some(position) if toks.len() == 3 => Op::DeleteNumber { chain, position },
                _ => {
                    let rule = rule_from(2, &chain, saw_v4, saw_v6)?;
                    Op::DeleteRule { chain, rule }
                }
            }
        }
        "-F" | "--flush" => Op::Flush(word(1).map(str::to_string)),
        "-X" | "--delete-chain" => Op::DeleteChain(word(1).map(str::to_string)),
        "-N" | "--new-chain" => Op::NewChain(chain()?),
        "-P" | "--policy" => {
            let chain = chain()?;
            let policy = word(2).ok_or("-P needs a policy")?.to_string();
            Op::Policy { chain, policy }
        }
        "-Z" | "--zero" => Op::Ignore,
        other => return Err(format!("unknown command {other:?}")),
    })
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    };
    r.map_err(|_| format!("{s:?} is not a number"))
}

/// `VALUE[/MASK]`, mask defaulting to all ones.
fn parse_value_mask(s: &str) -> Result<(u32, u32), String> {
    match s.split_once('/') {
        Some((v, m)) => Ok((parse_u32(v)?, parse_u32(m)?)),
        None => Ok((parse_u32(s)?, u32::MAX)),
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let bad = || format!("{s:?} is not an address or network");
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    let len = match len {
        None => {
            if ip.is_ipv4() {
                32
            } else {
                128
            }
        }
        Some(l) if l.contains('.') || l.contains(':') => {
            // A mask written as an address (10.0.0.0/255.0.0.0).
            let mask: IpAddr = l.parse().map_err(|_| bad())?;
            let bits = match mask {
                IpAddr::V4(m) => u128::from(u32::from(m)) << 96,
                IpAddr::V6(m) => u128::from(m),
            };
            if bits.leading_ones() + bits.trailing_zeros() != 128 && bits != 0 {
                return Err(format!("{s:?}: the mask is not contiguous"));
            }
            bits.leading_ones() as u8
        }
        Some(l) => l.parse::<u8>().map_err(|_| bad())?,
    };
    IpNet::new(ip, len).map(|n| n.trunc()).map_err(|_| bad())
}

fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let port = |p: &str, default: u16| -> Result<u16, String> {
        if p.is_empty() { Ok(default) } else { p.parse::<u16>().map_err(|_| format!("{p:?} is not a port")) }
    };
    s.split(',')
        .map(|part| match part.split_once(':') {
            Some((a, b)) => Ok((port(a, 0)?, port(b, u16::MAX)?)),
            None => {
                let p = port(part, 0)?;
                Ok((p, p))
            }
        })
        .collect()
}

fn protocol_number(s: &str) -> Result<Option<u8>, ()> {
    Ok(Some(match s.to_ascii_lowercase().as_str() {
        "all" | "0" => return Ok(None),
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        "icmp" => 1,
        "icmpv6" | "ipv6-icmp" => 58,
        "udplite" => 136,
        "esp" => 50,
        "ah" => 51,
        "gre" => 47,
        n => n.parse::<u8>().map_err(|_| ())?,
    }))
}

/// `--to-destination`: `IP[-IP][:PORT[-PORT]]`, IPv6 in brackets when a port follows.
fn parse_nat_to(s: &str) -> Result<(Option<IpAddr>, Option<u16>), String> {
    let bad = || format!("{s:?} is not an address[:port]");
    let (ip, port) = if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
        (ip, after.strip_prefix(':'))
    } else if s.matches(':').count() == 1 {
        let (ip, port) = s.split_once(':').ok_or_else(bad)?;
        (ip, Some(port))
    } else {
        (s, None)
    };
    let ip = ip.split('-').next().unwrap_or("");
    let ip = if ip.is_empty() { None } else { Some(ip.parse::<IpAddr>().map_err(|_| bad())?) };
    let port = match port {
        Some(p) => Some(p.split('-').next().unwrap_or("").parse::<u16>().map_err(|_| bad())?),
        None => None,
    };
    Ok((ip, port))
}

/// Parses a rule specification (everything after `-A CHAIN`).
fn parse_rule(words: &[&str], text: String, saw_v4: &mut bool, saw_v6: &mut bool) -> Result<Rule, String> {
    let mut rule = Rule { text, comment: None, matches: Vec::new(), target: Target::None };
    let mut module = String::new();
    let mut target_name: Option<String> = None;
    let mut target_args: Vec<String> = Vec::new();
    let mut recent: Option<(String, Option<RecentCommand>, Option<u32>, bool)> = None;
    let mut statistic: Option<(String, Option<f64>)> = None;
    let mut negated = false;
    let mut i = 0;

    let mut note_family = |nets: &[IpNet]| {
        for n in nets {
            if n.addr().is_ipv6() { *saw_v6 = true } else { *saw_v4 = true }
        }
    };
    // Finishes a module's match when its options are complete.
    let flush_module = |rule: &mut Rule,
                        recent: &mut Option<(String, Option<RecentCommand>, Option<u32>, bool)>,
                        statistic: &mut Option<(String, Option<f64>)>| {
        if let Some((name, command, seconds, reap)) = recent.take() {
            rule.matches.push(match command {
                Some(command) => Match::Recent { name, command, seconds, reap },
                None => Match::Unknown("-m recent".into()),
            });
        }
        if let Some((mode, p)) = statistic.take() {
            rule.matches.push(match (mode.as_str(), p) {
                ("random", Some(probability)) => Match::Statistic { probability },
                _ => Match::Unknown(format!("-m statistic --mode {mode}")),
            });
        }
    };

    while i < words.len() {
        let w = words[i];
        if w == "!" {
            negated = true;
            i += 1;
            continue;
        }
        // An option's arguments: the following words that are not options.
        let mut args_end = i + 1;
        while args_end < words.len() && !words[args_end].starts_with('-') && words[args_end] != "!" {
            args_end += 1;
        }
        let arg = |n: usize| -> Result<&str, String> {
            words.get(i + n).copied().ok_or_else(|| format!("{w} needs an argument"))
        };
        let neg = std::mem::take(&mut negated);
        let mut next = i + 2;
        match w {
            "-s" | "--source" | "--src" | "-d" | "--destination" | "--dst" => {
                let nets = arg(1)?.split(',').map(parse_net).collect::<Result<Vec<_>, _>>()?;
                note_family(&nets);
                rule.matches.push(if matches!(w, "-s" | "--source" | "--src") {
                    Match::Source { nets, negated: neg }
                } else {
                    Match::Destination { nets, negated: neg }
                });
            }
            "-p" | "--protocol" => {
                let p = arg(1)?;
                rule.matches.push(match protocol_number(p) {
                    Ok(number) => Match::Protocol { number, negated: neg },
                    Err(()) => Match::Unknown(format!("-p {p}")),
                });
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                rule.matches.push(Match::Unknown(format!("{}{w} {}", if neg { "! " } else { "" }, arg(1)?)));
            }
            "-f" | "--fragment" => {
                rule.matches.push(Match::Unknown(format!("{}-f", if neg { "! " } else { "" })));
                next = i + 1;
            }
            "-4" | "-6" | "--ipv4" | "--ipv6" => next = i + 1,
            "-c" | "--set-counters" => next = i + 3,
            "-m" | "--match" => {
                flush_module(&mut rule, &mut recent, &mut statistic);
                module = arg(1)?.to_string();
                match module.as_str() {
                    "tcp" | "udp" | "sctp" | "multiport" | "comment" | "addrtype" | "mark" | "conntrack" | "state"
                    | "icmp" | "icmp6" | "set" => {}
                    "recent" => recent = Some((String::from("DEFAULT"), None, None, false)),
                    "statistic" => statistic = Some((String::new(), None)),
                    other => rule.matches.push(Match::Unknown(format!("-m {other}"))),
                }
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                flush_module(&mut rule, &mut recent, &mut statistic);
                let name = arg(1)?.to_string();
                if w.starts_with("-g") || w == "--goto" {
                    rule.target = Target::Goto(name);
                } else {
                    target_name = Some(name);
                }
            }
            opt if opt.starts_with("--") && target_name.is_some() && target_option(opt) => {
                next = args_end;
                target_args.push(opt.to_string());
                target_args.extend(words[i + 1..args_end].iter().map(|s| s.to_string()));
            }
            opt if opt.starts_with("--") => {
                next = args_end;
                let args = &words[i + 1..args_end];
                let first = || args.first().copied().ok_or_else(|| format!("{opt} needs an argument"));
                match (module.as_str(), opt) {
                    (_, "--dport" | "--destination-port") => {
                        rule.matches.push(Match::DestinationPort { ranges: parse_ports(first()?)?, negated: neg })
                    }
                    (_, "--sport" | "--source-port") => {
                        rule.matches.push(Match::SourcePort { ranges: parse_ports(first()?)?, negated: neg })
                    }
                    ("multiport", "--dports" | "--destination-ports") => {
                        rule.matches.push(Match::DestinationPort { ranges: parse_ports(first()?)?, negated: neg })
                    }
                    ("multiport", "--sports" | "--source-ports") => {
                        rule.matches.push(Match::SourcePort { ranges: parse_ports(first()?)?, negated: neg })
                    }
                    (_, "--syn") => rule.matches.push(Match::TcpSyn { negated: neg }),
                    ("set", "--match-set" | "--set") => {
                        let name = first()?.to_string();
                        let dirs = args.get(1).ok_or_else(|| format!("{opt} {name} needs src/dst flags"))?;
                        let source = dirs
                            .split(',')
                            .map(|d| match d {
                                "src" => Ok(true),
                                "dst" => Ok(false),
                                other => Err(format!("{other:?} is not src or dst")),
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        rule.matches.push(Match::Set { name, source, negated: neg });
                    }
                    ("set", "--return-nomatch" | "--update-counters" | "--update-subcounters") => {}
                    ("comment", "--comment") => rule.comment = Some(first()?.to_string()),
                    ("addrtype", "--src-type" | "--dst-type") => rule.matches.push(Match::AddrType {
                        source: opt == "--src-type",
                        kind: first()?.to_string(),
                        negated: neg,
                    }),
                    // Interface-limited address types are read as plain ones.
                    ("addrtype", "--limit-iface-in" | "--limit-iface-out") => {}
                    ("mark", "--mark") => {
                        let (value, mask) = parse_value_mask(first()?)?;
                        rule.matches.push(Match::Mark { value, mask, negated: neg });
                    }
                    ("conntrack", "--ctstate") | ("state", "--state") => rule.matches.push(Match::CtState {
                        states: first()?.split(',').map(str::to_string).collect(),
                        negated: neg,
                    }),
                    ("statistic", "--mode") => {
                        if let Some(s) = statistic.as_mut() {
                            s.0 = first()?.to_string();
                        }
                    }
                    ("statistic", "--probability") => {
                        let p = first()?.parse::<f64>().map_err(|_| format!("{:?} is not a probability", args[0]))?;
                        if let Some(s) = statistic.as_mut() {
                            s.1 = Some(if neg { 1.0 - p } else { p });
                        }
                    }
                    ("recent", "--set" | "--rcheck" | "--update" | "--remove") => {
                        if let Some(r) = recent.as_mut() {
                            r.1 = Some(match opt {
                                "--set" => RecentCommand::Set,
                                "--rcheck" => RecentCommand::Rcheck,
                                "--update" => RecentCommand::Update,
                                _ => RecentCommand::Remove,
                            });
                        }
                    }
                    ("recent", "--name") => {
                        if let Some(r) = recent.as_mut() {
                            r.0 = first()?.to_string();
                        }
                    }
                    ("recent", "--seconds") => {
                        if let Some(r) = recent.as_mut() {
                            r.2 = Some(parse_u32(first()?)?);
                        }
                    }
                    ("recent", "--reap") => {
                        if let Some(r) = recent.as_mut() {
                            r.3 = true;
                        }
                    }
                    ("recent", "--mask" | "--rsource" | "--rdest" | "--rttl" | "--hitcount") => {}
                    (_, _) => {
                        let mut u = String::new();
                        if neg {
                            u.push_str("! ");
                        }
                        u.push_str(opt);
                        for a in args {
                            u.push(' ');
                            u.push_str(a);
                        }
                        rule.matches.push(Match::Unknown(u));
                    }
                }
            }
            other => return Err(format!("unexpected {other:?}")),
        }
        i = next.max(i + 1);
    }
    flush_module(&mut rule, &mut recent, &mut statistic);
    if let Some(name) = target_name {
        rule.target = build_target(name, &target_args, saw_v4, saw_v6)?;
    }
    Ok(rule)
}

/// Options that belong to a target when they follow `-j`.
fn target_option(opt: &str) -> bool {
    !matches!(
        opt,
        "--dport"
            | "--sport"
            | "--destination-port"
            | "--source-port"
            | "--dports"
            | "--sports"
            | "--comment"
            | "--src-type"
            | "--dst-type"
            | "--mark"
            | "--ctstate"
            | "--state"
            | "--mode"
            | "--probability"
            | "--set"
            | "--rcheck"
            | "--name"
            | "--seconds"
            | "--reap"
            | "--rsource"
            | "--syn"
    )
}

fn build_target(name: String, args: &[String], saw_v4: &mut bool, saw_v6: &mut bool) -> Result<Target, String> {
    let opt = |o: &str| args.iter().position(|a| a == o).and_then(|i| args.get(i + 1)).map(String::as_str);
    let has = |o: &str| args.iter().any(|a| a == o);
    Ok(match name.as_str() {
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "RETURN" => Target::Return,
        "REJECT" => Target::Reject { with: opt("--reject-with").map(str::to_string) },
        "DNAT" => {
            let to = opt("--to-destination").or_else(|| opt("--to"));
            let (ip, port) = match to {
                Some(t) => parse_nat_to(t)?,
                None => (None, None),
            };
            match ip {
                Some(IpAddr::V6(_)) => *saw_v6 = true,
                Some(IpAddr::V4(_)) => *saw_v4 = true,
                None => {}
            }
            Target::Dnat { ip, port }
        }
        "SNAT" => Target::Snat { to: opt("--to-source").or_else(|| opt("--to")).unwrap_or_default().to_string() },
        "MASQUERADE" => Target::Masquerade { random_fully: has("--random-fully") },
        "MARK" => {
            let (value, mask) = if let Some(v) = opt("--set-xmark") {
                parse_value_mask(v)?
            } else if let Some(v) = opt("--set-mark") {
                // libxt_MARK: --set-mark V/M is --set-xmark V/(V|M).
                let (v, m) = parse_value_mask(v)?;
                (v, v | m)
            } else if let Some(v) = opt("--or-mark") {
                let v = parse_u32(v)?;
                (v, v)
            } else if let Some(v) = opt("--xor-mark") {
                (parse_u32(v)?, 0)
            } else if let Some(v) = opt("--and-mark") {
                (0, !parse_u32(v)?)
            } else {
                return Err("-j MARK needs --set-xmark, --set-mark, --or-mark, --xor-mark or --and-mark".into());
            };
            Target::Mark { value, mask }
        }
        _ if args.is_empty() && !EXTENSION_TARGETS.contains(&name.as_str()) => Target::Jump(name),
        _ => Target::Other { name, args: args.to_vec() },
    })
}

// ---------------------------------------------------------------------------------------------
// Running a packet

/// How a chain's traversal ended for one branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Fell off the end or `RETURN`: the caller goes on.
    Return,
    /// `ACCEPT`; `ours` when the rule is in one of the proxy's chains.
    Accept {
        ours: bool,
    },
    /// A NAT target: the table's traversal ends and the packet goes on.
    Translated,
    Drop,
    Reject,
}

/// Whether a chain is the proxy's (ours, or kube-proxy's when tracing a kube-proxy node).
fn proxy_chain(name: &str) -> bool {
    name.starts_with(crate::render::iptables::CHAIN_PREFIX) || name.starts_with("KUBE-")
}

fn packet_text(p: &super::Packet) -> String {
    format!(
        "{} → {} {}",
        SocketAddr { ip: p.src, port: p.src_port },
        SocketAddr { ip: p.dst, port: p.dst_port },
        p.protocol
    )
}

fn hex_mark(m: u32) -> String {
    format!("{m:#x}")
}

struct Run<'a> {
    table: &'a Table,
    table_name: &'a str,
    hook: Hook,
    ctx: &'a NodeContext,
    sets: &'a dyn IpSets,
}

impl Run<'_> {
    /// `None` when a match fails; otherwise the probability that the random matches hold.
    fn matches(&self, rule: &Rule, s: &PacketState) -> Option<f64> {
        let pkt = &s.packet;
        let mut p = 1.0_f64;
        for m in &rule.matches {
            let ok = match m {
                Match::Source { nets, negated } => nets.iter().any(|n| n.contains(&pkt.src)) != *negated,
                Match::Destination { nets, negated } => nets.iter().any(|n| n.contains(&pkt.dst)) != *negated,
                Match::Protocol { number, negated } => number.is_none_or(|n| n == pkt.protocol.number()) != *negated,
                Match::DestinationPort { ranges, negated } => {
                    ranges.iter().any(|(a, b)| (*a..=*b).contains(&pkt.dst_port)) != *negated
                }
                Match::SourcePort { ranges, negated } => {
                    ranges.iter().any(|(a, b)| (*a..=*b).contains(&pkt.src_port)) != *negated
                }
                Match::AddrType { source, kind, negated } => {
                    let ip = if *source { &pkt.src } else { &pkt.dst };
                    match kind.as_str() {
                        "LOCAL" => self.ctx.is_local(ip) != *negated,
                        _ => false,
                    }
                }
                Match::Statistic { probability } => {
                    p *= probability.clamp(0.0, 1.0);
                    true
                }
                // The first packet of a connection: no affinity recorded yet, so only `--set`
                // (which records and matches) holds.
                Match::Recent { command, .. } => *command == RecentCommand::Set,
                Match::Mark { value, mask, negated } => ((s.mark & mask) == *value) != *negated,
                Match::CtState { states, negated } => {
                    states.iter().any(|st| match st.as_str() {
                        "NEW" => true,
                        "DNAT" => s.dnat.is_some(),
                        "SNAT" => s.masquerade,
                        _ => false,
                    }) != *negated
                }
                Match::TcpSyn { negated } => (pkt.protocol == Protocol::Tcp) != *negated,
                Match::Set { name, source, negated } => {
                    self.sets.contains(name, source, pkt).is_some_and(|found| found != *negated)
                }
                Match::Unknown(_) => false,
            };
            if !ok {
                return None;
            }
        }
        (p > 0.0).then_some(p.min(1.0))
    }

    fn hop(&self, chain: &str, rule: &Rule, action: String, p: f64) -> Hop {
        let action = if p < 1.0 { format!("{action} (probability {p:.4})") } else { action };
        let mut h = Hop::new(format!("{} {}", self.hook.as_str(), self.table_name), action)
            .chain(chain)
            .rule(rule.text.clone())
            .comment(rule.comment.clone());
        h.node = Some(self.ctx.node.clone());
        h
    }

    /// Runs `state` through chain `name`; returns every branch with how it ended.
    fn chain(&self, name: &str, state: PacketState, depth: usize) -> Vec<(PacketState, Flow)> {
        let Some(chain) = self.table.chains.get(name) else {
            return vec![(state, Flow::Return)];
        };
        if depth > MAX_DEPTH {
            let mut state = state;
            state.hops.push(Hop::new(
                format!("{} {}", self.hook.as_str(), self.table_name),
                format!("jumps nest deeper than {MAX_DEPTH} chains at {name}: not followed"),
            ));
            return vec![(state, Flow::Return)];
        }
        let mut out = Vec::new();
        let mut work: Vec<(PacketState, usize)> = vec![(state, 0)];
        'branch: while let Some((mut s, mut i)) = work.pop() {
            loop {
                if let Some(ix) = &chain.index {
                    i = ix.next(i, &s.packet.dst).unwrap_or(chain.rules.len());
                }
                let Some(rule) = chain.rules.get(i) else {
                    out.push((s, Flow::Return));
                    continue 'branch;
                };
                i += 1;
                let Some(p) = self.matches(rule, &s) else { continue };
                if p < 1.0 {
                    // Only the branch the seed picks keeps recording hops (one path is drawn).
                    let keep = s.pick(&[p, 1.0 - p]);
                    let mut miss = s.clone();
                    miss.probability *= 1.0 - p;
                    miss.record &= keep == Some(1);
                    work.push((miss, i));
                    s.probability *= p;
                    s.record &= keep == Some(0);
                }
                let records =
                    rule.matches.iter().any(|m| matches!(m, Match::Recent { command: RecentCommand::Set, .. }));
                let affinity = if records { "; remembers the client for session affinity" } else { "" };
                match &rule.target {
                    Target::None => {}
                    Target::Accept => {
                        let ours = proxy_chain(name);
                        s.accepted |= ours;
                        if s.record {
                            s.hops.push(self.hop(name, rule, "accept".into(), p));
                        }
                        out.push((s, Flow::Accept { ours }));
                        continue 'branch;
                    }
                    Target::Drop => {
                        if s.record {
                            s.hops.push(self.hop(name, rule, "drop".into(), p));
                        }
                        out.push((s, Flow::Drop));
                        continue 'branch;
                    }
                    Target::Reject { with } => {
                        let action = match with {
                            Some(w) => format!("reject ({w})"),
                            None => "reject".into(),
                        };
                        if s.record {
                            s.hops.push(self.hop(name, rule, action, p));
                        }
                        out.push((s, Flow::Reject));
                        continue 'branch;
                    }
                    Target::Return => {
                        if s.record {
                            s.hops.push(self.hop(name, rule, "return".into(), p));
                        }
                        out.push((s, Flow::Return));
                        continue 'branch;
                    }
                    Target::Jump(c) | Target::Goto(c) if self.table.chains.contains_key(c) => {
                        let goto = matches!(rule.target, Target::Goto(_));
                        let action = if c.ends_with("MARK-MASQ") {
                            "mark for masquerade".to_string()
                        } else if goto {
                            format!("goto {c}")
                        } else {
                            format!("jump to {c}")
                        };
                        if s.record {
                            s.hops.push(self.hop(name, rule, action, p));
                        }
                        for (s2, flow) in self.chain(c, s, depth + 1) {
                            match flow {
                                Flow::Return if !goto => work.push((s2, i)),
                                other => out.push((s2, other)),
                            }
                        }
                        continue 'branch;
                    }
                    // An extension target we do not model (LOG, CT, ...), or a jump to a chain
                    // that is not there: no effect on where the packet goes.
                    Target::Jump(_) | Target::Goto(_) | Target::Other { .. } => {}
                    Target::Dnat { ip, port } => {
                        if let Some(ip) = ip {
                            s.packet.dst = *ip;
                        }
                        if let Some(port) = port {
                            s.packet.dst_port = *port;
                        }
                        let to = SocketAddr { ip: s.packet.dst, port: s.packet.dst_port };
                        s.dnat = Some(to);
                        if s.record {
                            let mut h = self.hop(name, rule, format!("dnat to {to}{affinity}"), p);
                            h.packet = Some(packet_text(&s.packet));
                            s.hops.push(h);
                        }
                        out.push((s, Flow::Translated));
                        continue 'branch;
                    }
                    Target::Masquerade { .. } | Target::Snat { .. } => {
                        s.masquerade = true;
                        let action = match &rule.target {
                            Target::Snat { to } => format!("snat to {to}"),
                            _ => "masquerade".to_string(),
                        };
                        if s.record {
                            s.hops.push(self.hop(name, rule, action, p));
                        }
                        out.push((s, Flow::Translated));
                        continue 'branch;
                    }
                    Target::Mark { value, mask } => {
                        s.mark = (s.mark & !mask) ^ value;
                        let action = if value == mask {
                            format!("set mark bits {}", hex_mark(*value))
                        } else if *mask == 0 {
                            format!("flip mark bits {}", hex_mark(*value))
                        } else {
                            format!("set mark to {}", hex_mark(s.mark))
                        };
                        if s.record {
                            s.hops.push(self.hop(name, rule, action, p));
                        }
                    }
                }
            }
        }
        out
    }
}

impl Netfilter for Program {
    fn run_hook(&self, hook: Hook, state: PacketState, ctx: &NodeContext) -> Vec<(PacketState, HookVerdict)> {
        self.run_hook_with_sets(hook, state, ctx, &NoSets)
    }
}

impl Program {
    /// [`Netfilter::run_hook`] with ipsets for the `-m set` matches.
    pub fn run_hook_with_sets(
        &self,
        hook: Hook,
        state: PacketState,
        ctx: &NodeContext,
        sets: &dyn IpSets,
    ) -> Vec<(PacketState, HookVerdict)> {
        let Some(rs) = self.families.get(&state.packet.family()) else {
            return vec![(state, HookVerdict::Continue)];
        };
        // Kernel order within a hook: nat's dstnat (-100) before filter (0) on output; filter
        // before nat's srcnat (100) on input.
        let tables: &[(&str, &str)] = match hook {
            Hook::Prerouting => &[("nat", "PREROUTING")],
            Hook::Input => &[("filter", "INPUT"), ("nat", "INPUT")],
            Hook::Forward => &[("filter", "FORWARD")],
            Hook::Output => &[("nat", "OUTPUT"), ("filter", "OUTPUT")],
            Hook::Postrouting => &[("nat", "POSTROUTING")],
        };
        let mut live = vec![(state, HookVerdict::Continue)];
        for (table_name, chain) in tables {
            let Some(table) = rs.tables.get(*table_name) else { continue };
            let run = Run { table, table_name, hook, ctx, sets };
            let mut next = Vec::with_capacity(live.len());
            for (s, v) in live {
                if matches!(v, HookVerdict::Drop | HookVerdict::Reject) {
                    next.push((s, v));
                    continue;
                }
                for (s, flow) in run.chain(chain, s, 0) {
                    let v = match flow {
                        Flow::Drop => HookVerdict::Drop,
                        Flow::Reject => HookVerdict::Reject,
                        Flow::Accept { ours: true } => HookVerdict::Accept,
                        Flow::Accept { ours: false } | Flow::Translated | Flow::Return => v,
                    };
                    next.push((s, v));
                }
            }
            live = next;
        }
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::policy::{Backend, NodePlan, plan};
    use crate::render::iptables::{render, render_incremental};
    use crate::trace::path::{Topology, trace};
    use crate::trace::{Packet, Verdict};

    /// The contract's example scenario.
    const EXAMPLE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: test-node
  labels: {topology.kubernetes.io/zone: zone-a}
spec: {podCIDR: 10.180.0.0/24}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.2}
  - {type: InternalIP, address: 192.168.1.2}
  - {type: ExternalIP, address: 192.168.99.11}
  - {type: Hostname, address: test-node}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  labels: {topology.kubernetes.io/zone: zone-b}
spec: {podCIDR: 10.180.2.0/24}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.3}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [172.30.0.0/16]}
---
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clusterCIDR: 10.0.0.0/8
detectLocalMode: ClusterCIDR
nodePortAddresses: [192.168.0.2/32]
---
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: ClusterIP
  clusterIP: 172.30.0.41
  clusterIPs: [172.30.0.41]
  ipFamilies: [IPv4]
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc1-abc12
  namespace: ns1
  labels: {kubernetes.io/service-name: svc1}
addressType: IPv4
endpoints:
- addresses: ["10.180.0.1"]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: test-node
ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns2}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.60
  clusterIPs: [172.30.0.60]
  ipFamilies: [IPv4]
  ports: [{name: p80, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}]
  loadBalancerSourceRanges: ["203.0.113.0/25"]
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.4}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: ns2
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: ["10.180.2.5"]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node2
ports: [{name: p80, port: 8080, protocol: TCP}]
"#;

    fn cluster(yaml: &str) -> Cluster {
        let parsed = crate::input::parse("t.yaml", yaml).expect("valid test yaml");
        Cluster::from_objects(parsed.objects)
    }

    fn node_plan(c: &Cluster) -> NodePlan {
        plan(c, "test-node", Backend::Iptables)
    }

    fn probe(c: &Cluster, program: &Program, from: &str, to: &str) -> crate::trace::Trace {
        let to: SocketAddr = to.parse().expect("socket address");
        let ctx = NodeContext { node: "test-node".into(), addresses: c.nodes["test-node"].ips() };
        let topo = Topology::from_cluster(c);
        let packet = Packet {
            src: from.parse().expect("ip"),
            src_port: 40000,
            dst: to.ip,
            dst_port: to.port,
            protocol: Protocol::Tcp,
        };
        trace(program, &ctx, &topo, packet, "iptables", 7)
    }

    fn endpoints(t: &crate::trace::Trace) -> Vec<(String, bool)> {
        t.outcomes.iter().map(|o| (o.endpoint.to_string(), o.masquerade)).collect()
    }

    /// The contract's probes hold when the tracer runs what the renderer wrote.
    #[test]
    fn contract_probes() {
        let c = cluster(EXAMPLE);
        let program = Program::parse(&render(&node_plan(&c))).expect("our render parses");

        let t = probe(&c, &program, "10.180.0.2", "172.30.0.41:80");
        assert_eq!(t.verdict, Verdict::Forward, "{t:#?}");
        assert_eq!(endpoints(&t), vec![("10.180.0.1:80".to_string(), false)]);

        let t = probe(&c, &program, "10.180.0.1", "172.30.0.41:80");
        assert_eq!(t.verdict, Verdict::Forward);
        assert_eq!(endpoints(&t), vec![("10.180.0.1:80".to_string(), true)], "hairpin is masqueraded");

        let t = probe(&c, &program, "10.180.0.2", "172.30.0.41:443");
        assert_eq!(t.verdict, Verdict::Reject, "{:#?}", t.hops);

        let t = probe(&c, &program, "203.0.113.130", "1.2.3.4:80");
        assert_eq!(t.verdict, Verdict::Drop, "{:#?}", t.hops);
        assert!(t.hops.iter().any(|h| h.chain.as_deref() == Some("SWITCHYARD-PROXY-FIREWALL")));

        let t = probe(&c, &program, "203.0.113.2", "1.2.3.4:80");
        assert_eq!(t.verdict, Verdict::Forward);
        assert_eq!(endpoints(&t), vec![("10.180.2.5:8080".to_string(), true)]);

        let t = probe(&c, &program, "203.0.113.130", "192.168.0.2:30080");
        assert_eq!(t.verdict, Verdict::Forward, "{:#?}", t.hops);
        assert_eq!(endpoints(&t), vec![("10.180.2.5:8080".to_string(), true)]);
    }

    /// Hops name the rule and the Service field behind it.
    #[test]
    fn hops_carry_rules_and_comments() {
        let c = cluster(EXAMPLE);
        let program = Program::parse(&render(&node_plan(&c))).expect("parses");
        let t = probe(&c, &program, "10.180.0.2", "172.30.0.41:80");
        let dnat = t.hops.iter().find(|h| h.action.starts_with("dnat to")).expect("a dnat hop");
        assert_eq!(dnat.action, "dnat to 10.180.0.1:80");
        assert_eq!(dnat.at, "prerouting nat");
        assert_eq!(dnat.comment.as_deref(), Some("ns1/svc1:http -> 10.180.0.1:80"));
        assert!(dnat.rule.as_deref().is_some_and(|r| r.starts_with("-A SWITCHYARD-SEP-")));
        let entry = t.hops.iter().find(|h| h.comment.as_deref() == Some("ns1/svc1:http cluster IP")).expect("entry");
        assert!(entry.action.starts_with("jump to SWITCHYARD-SVC-"));
    }

    /// parse(render(plan)) keeps every rule as written, and the program prints back to itself.
    #[test]
    fn render_round_trips() {
        for yaml in [EXAMPLE, DUAL_STACK] {
            let c = cluster(yaml);
            let text = render(&node_plan(&c));
            let program = Program::parse(&text).expect("parses");
            let written: Vec<&str> = text.lines().filter(|l| l.starts_with("-A ")).collect();
            assert_eq!(program.rule_count(), written.len());
            for (family, rs) in &program.families {
                for t in rs.tables.values() {
                    for (name, chain) in &t.chains {
                        for r in &chain.rules {
                            assert!(r.text.starts_with(&format!("-A {name}")), "{family:?} {}", r.text);
                            assert!(written.contains(&r.text.as_str()), "{}", r.text);
                            assert!(r.comment.is_some(), "every rule has a comment: {}", r.text);
                            assert!(!r.matches.iter().any(|m| matches!(m, Match::Unknown(_))), "{}", r.text);
                        }
                    }
                }
            }
            assert_eq!(Program::parse(&program.to_restore()).expect("reparses"), program);
        }
    }

    const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: test-node}
spec: {podCIDRs: [10.180.0.0/24, "fd00:10:180::/64"]}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.2}
  - {type: InternalIP, address: "fd00:192:168::2"}
---
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clusterCIDR: "10.0.0.0/8,fd00:10::/48"
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [172.30.0.0/16, "fd00:172:30::/112"]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns1}
spec:
  type: NodePort
  clusterIP: 172.30.0.10
  clusterIPs: [172.30.0.10, "fd00:172:30::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  sessionAffinity: ClientIP
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4
  namespace: ns1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: ["10.180.0.5"]
  conditions: {ready: true}
  nodeName: test-node
- addresses: ["10.180.2.5"]
  conditions: {ready: true}
  nodeName: node2
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: ns1
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
endpoints:
- addresses: ["fd00:10:180::5"]
  conditions: {ready: true}
  nodeName: test-node
- addresses: ["fd00:10:182::5"]
  conditions: {ready: true}
  nodeName: node2
ports: [{name: http, port: 8080, protocol: TCP}]
"#;

    #[test]
    fn dual_stack_sections_and_ipv6_trace() {
        let c = cluster(DUAL_STACK);
        let text = render(&node_plan(&c));
        assert!(text.starts_with("# iptables-restore\n"));
        assert!(text.contains("\n# ip6tables-restore\n"));
        assert!(text.contains("-j DNAT --to-destination [fd00:10:180::5]:8080"));
        let program = Program::parse(&text).expect("parses");
        assert_eq!(program.families.len(), 2);

        // Cluster IP, IPv6: both endpoints, half each.
        let t = probe(&c, &program, "fd00:10:180::9", "[fd00:172:30::10]:80");
        assert_eq!(t.verdict, Verdict::Forward, "{:#?}", t.hops);
        assert_eq!(t.outcomes.len(), 2);
        assert!(t.outcomes.iter().all(|o| (o.probability - 0.5).abs() < 1e-6));
        // NodePort from outside with externalTrafficPolicy Local: the local endpoint only,
        // source kept.
        let t = probe(&c, &program, "2001:db8::1", "[fd00:192:168::2]:30080");
        assert_eq!(endpoints(&t), vec![("[fd00:10:180::5]:8080".to_string(), false)], "{:#?}", t.hops);
        // The same for IPv4, and the node itself reaches every endpoint, masqueraded.
        let t = probe(&c, &program, "198.51.100.7", "192.168.0.2:30080");
        assert_eq!(endpoints(&t), vec![("10.180.0.5:8080".to_string(), false)]);
        let t = probe(&c, &program, "192.168.0.2", "192.168.0.2:30080");
        assert_eq!(t.outcomes.len(), 2, "{:#?}", t.hops);
        assert!(t.outcomes.iter().all(|o| o.masquerade));
        // The health check node port is accepted; an unallocated service address dropped.
        let t = probe(&c, &program, "198.51.100.7", "192.168.0.2:32000");
        assert_eq!(t.verdict, Verdict::Accept, "{:#?}", t.hops);
        let t = probe(&c, &program, "10.180.0.9", "172.30.0.99:80");
        assert_eq!(t.verdict, Verdict::Drop);
        // Not a service at all.
        let t = probe(&c, &program, "10.180.0.9", "8.8.8.8:53");
        assert_eq!(t.verdict, Verdict::NoMatch);
    }

    /// Services without endpoints are rejected; Local policies without local endpoints dropped.
    #[test]
    fn filter_verdicts() {
        let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: test-node}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: ns}
spec:
  type: NodePort
  clusterIP: 172.30.0.5
  externalIPs: [192.0.2.50]
  ports: [{port: 80, protocol: TCP, nodePort: 30005}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: ns}
spec:
  type: NodePort
  clusterIP: 172.30.0.6
  internalTrafficPolicy: Local
  externalTrafficPolicy: Local
  ports: [{port: 80, protocol: TCP, nodePort: 30006}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-a
  namespace: ns
  labels: {kubernetes.io/service-name: local}
addressType: IPv4
endpoints:
- addresses: ["10.180.2.5"]
  conditions: {ready: true}
  nodeName: node2
ports: [{port: 80, protocol: TCP}]
"#;
        let c = cluster(yaml);
        let program = Program::parse(&render(&node_plan(&c))).expect("parses");
        for (from, to, want) in [
            ("10.180.0.2", "172.30.0.5:80", Verdict::Reject),
            ("198.51.100.1", "192.0.2.50:80", Verdict::Reject),
            ("198.51.100.1", "192.168.0.2:30005", Verdict::Reject),
            ("192.168.0.2", "172.30.0.5:80", Verdict::Reject),
            ("10.180.0.2", "172.30.0.6:80", Verdict::Drop),
            ("198.51.100.1", "192.168.0.2:30006", Verdict::Drop),
        ] {
            let t = probe(&c, &program, from, to);
            assert_eq!(t.verdict, want, "{from} -> {to}: {:#?}", t.hops);
        }
    }

    /// Load balancing: n endpoints, each reached with probability 1/n.
    #[test]
    fn balancing_is_uniform() {
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  clusterIP: 172.30.0.7\n  ports: [{port: 80, protocol: TCP}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-a\n  namespace: ns\n  labels: {kubernetes.io/service-name: s}\naddressType: IPv4\nports: [{port: 80, protocol: TCP}]\nendpoints:\n",
        );
        for i in 1..=7 {
            yaml.push_str(&format!("- addresses: [\"10.180.1.{i}\"]\n  conditions: {{ready: true}}\n"));
        }
        let c = cluster(&format!(
            "{yaml}---\napiVersion: v1\nkind: Node\nmetadata: {{name: test-node}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.0.2}}]}}\n"
        ));
        let program = Program::parse(&render(&node_plan(&c))).expect("parses");
        let t = probe(&c, &program, "10.180.0.2", "172.30.0.7:80");
        assert_eq!(t.outcomes.len(), 7);
        let sum: f64 = t.outcomes.iter().map(|o| o.probability).sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert!(t.outcomes.iter().all(|o| (o.probability - 1.0 / 7.0).abs() < 1e-6), "{:?}", t.outcomes);
    }

    /// What iptables-save prints (counters, unquoted comments, normalised marks, foreign rules)
    /// parses, and foreign matches never match.
    #[test]
    fn parses_iptables_save_output() {
        let save = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 07:16:09 2026
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:PREROUTING ACCEPT [10:600]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SEP-AAAA - [0:0]
:KUBE-SVC-BBBB - [0:0]
[5:300] -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -i cni0 -m set --match-set foo src -j ACCEPT
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-AAAA -s 10.244.1.5/32 -m comment --comment default/web -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAA -p tcp -m comment --comment default/web -m recent --set --name KUBE-SEP-AAAA --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-SVC-BBBB
-A KUBE-SVC-BBBB ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-BBBB -m comment --comment "default/web -> 10.244.1.5:8080" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-AAAA --mask 255.255.255.255 --rsource -j KUBE-SEP-AAAA
-A KUBE-SVC-BBBB -m comment --comment "default/web -> 10.244.1.5:8080" -m statistic --mode random --probability 1.00000000000 -j KUBE-SEP-AAAA
COMMIT
# Completed on Thu Nov 26 07:16:09 2026
"#;
        let program = Program::parse(save).expect("iptables-save output parses");
        let rs = program.family(IpFamily::V4).expect("ipv4");
        assert!(!rs.tables.contains_key("mangle"));
        let masq = &program.chain(IpFamily::V4, "nat", "KUBE-MARK-MASQ").expect("chain").rules[0];
        assert_eq!(masq.target, Target::Mark { value: 0x4000, mask: 0x4000 });
        let sep = &program.chain(IpFamily::V4, "nat", "KUBE-SEP-AAAA").expect("chain").rules[0];
        assert_eq!(sep.comment.as_deref(), Some("default/web"));

        let ctx = NodeContext { node: "n".into(), addresses: vec!["192.168.0.2".parse().expect("ip")] };
        let packet = Packet {
            src: "192.168.5.5".parse().expect("ip"),
            src_port: 1,
            dst: "10.96.0.10".parse().expect("ip"),
            dst_port: 80,
            protocol: Protocol::Tcp,
        };
        let t = trace(&program, &ctx, &Topology::default(), packet, "iptables", 1);
        assert_eq!(t.verdict, Verdict::Forward, "{:#?}", t.hops);
        assert_eq!(endpoints(&t), vec![("10.244.1.5:8080".to_string(), true)]);
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e = Program::parse("*nat\n:FOO - [0:0]\n-A FOO -s not-an-ip -j ACCEPT\nCOMMIT\n").expect_err("bad address");
        assert_eq!(e.line, 3);
        assert!(e.text.contains("not-an-ip"));
        let e = Program::parse("-A FOO -j ACCEPT\n").expect_err("outside a table");
        assert_eq!(e.line, 1);
        let e = Program::parse("*nat\nbogus\nCOMMIT\n").expect_err("unknown command");
        assert_eq!(e.line, 2);
        let e = Program::parse("*nat\n-A X -m comment --comment \"open\nCOMMIT\n").expect_err("quote");
        assert_eq!(e.line, 2);
    }

    #[test]
    fn apply_models_noflush_restore() {
        let mut p = Program::parse(
            "*filter\n:FOO - [0:0]\n:BAR - [0:0]\n-A INPUT -j FOO\n-A FOO -j BAR\n-A BAR -j DROP\nCOMMIT\n",
        )
        .expect("parses");
        // Deleting a referenced chain fails, and the table is left as it was.
        let before = p.clone();
        let e = p.apply("*filter\n:BAR - [0:0]\n-X BAR\nCOMMIT\n").expect_err("BAR is referenced by FOO");
        assert_eq!(e.line, 3);
        assert_eq!(p, before);
        // Flush the referrer first: then it goes.
        p.apply("*filter\n:FOO - [0:0]\n:BAR - [0:0]\n-X BAR\nCOMMIT\n").expect("applies");
        assert!(p.chain(IpFamily::V4, "filter", "BAR").is_none());
        assert_eq!(
            p.chain(IpFamily::V4, "filter", "INPUT").map(|c| c.rules.len()),
            Some(1),
            "builtins are not flushed"
        );
        assert!(p.apply("*filter\n-A NOPE -j ACCEPT\nCOMMIT\n").is_err());
        assert!(p.apply("*filter\n-A FOO -j NOPE\nCOMMIT\n").is_err());
        assert!(p.apply("*filter\n-D INPUT -j BAR\nCOMMIT\n").is_err());
        p.apply("*filter\n-D INPUT -j FOO\nCOMMIT\n").expect("deletes by spec");
        assert!(p.chain(IpFamily::V4, "filter", "INPUT").is_some_and(|c| c.rules.is_empty()));
    }

    /// A transaction applied to the old program gives the new program.
    fn assert_incremental(old: &NodePlan, new: &NodePlan) -> String {
        let delta = render_incremental(old, new);
        let mut program = Program::parse(&render(old)).expect("old parses");
        program.apply(&delta).unwrap_or_else(|e| panic!("{e}\n--- transaction:\n{delta}"));
        let want = Program::parse(&render(new)).expect("new parses");
        assert!(program == want, "transaction did not produce the new program:\n{delta}");
        let every: std::collections::BTreeSet<crate::model::ObjectKey> = [old, new]
            .iter()
            .flat_map(|p| &p.families)
            .flat_map(|f| &f.services)
            .map(|s| s.name.service.clone())
            .collect();
        // Naming every service as changed lands on the same program (lines may come in another
        // order: chains are grouped by the order services are visited).
        let hinted = crate::render::iptables::render_incremental_for(old, new, Some(&every));
        let mut via_hint = Program::parse(&render(old)).expect("old parses");
        via_hint.apply(&hinted).unwrap_or_else(|e| panic!("{e}\n--- transaction:\n{hinted}"));
        assert!(via_hint == want, "the hinted transaction did not produce the new program:\n{hinted}");
        delta
    }

    #[test]
    fn incremental_applies_to_the_new_program() {
        let base = cluster(EXAMPLE);
        let old = node_plan(&base);
        assert_eq!(render_incremental(&old, &old), "");

        // One endpoint changes: only that service's chains.
        let moved = EXAMPLE.replace("10.180.2.5\"]", "10.180.2.6\"]");
        let new = node_plan(&cluster(&moved));
        let delta = assert_incremental(&old, &new);
        assert!(!delta.contains("*filter"), "{delta}");
        assert!(!delta.contains(":SWITCHYARD-SERVICES"), "{delta}");
        assert!(delta.contains("-X SWITCHYARD-SEP-"), "{delta}");
        assert!(!delta.contains("ns1/svc1"), "svc1 is untouched: {delta}");

        // Every other kind of change, both ways.
        let variants = [
            EXAMPLE.replace(
                "- addresses: [\"10.180.0.1\"]",
                "- addresses: [\"10.180.0.1\"]\n  conditions: {ready: true}\n- addresses: [\"10.180.0.7\"]",
            ),
            EXAMPLE.replace("kubernetes.io/service-name: svc1}", "kubernetes.io/service-name: gone}"),
            EXAMPLE.replace(
                "  loadBalancerSourceRanges: [\"203.0.113.0/25\"]\n",
                "  externalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n",
            ),
            EXAMPLE.replace("nodePortAddresses: [192.168.0.2/32]", "iptables: {masqueradeAll: true}"),
            EXAMPLE.replace("clusterCIDR: 10.0.0.0/8", "clusterCIDR: 10.0.0.0/9"),
            format!(
                "{EXAMPLE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: more, namespace: ns0}}\nspec:\n  clusterIP: 172.30.0.99\n  ports: [{{port: 53, protocol: UDP}}]\n"
            ),
            DUAL_STACK.to_string(),
            RICH.to_string(),
        ];
        for v in &variants {
            let other = node_plan(&cluster(v));
            assert_incremental(&old, &other);
            assert_incremental(&other, &old);
        }
        // Within the rich cluster: a local endpoint goes away (SVL, EXT and filter verdicts).
        let rich = node_plan(&cluster(RICH));
        let fewer = node_plan(&cluster(
            &RICH.replace("- {addresses: [\"10.180.0.11\"], conditions: {ready: true}, nodeName: test-node}\n", ""),
        ));
        assert_incremental(&rich, &fewer);
        let none_local = node_plan(&cluster(&RICH.replace("nodeName: test-node}", "nodeName: node3}")));
        let delta = assert_incremental(&rich, &none_local);
        assert!(delta.contains("*filter"), "no local endpoint: DROP verdicts appear: {delta}");
    }

    /// `-g` returns to the caller's caller; `RETURN` leaves a chain early.
    #[test]
    fn goto_and_return() {
        let text = "*nat\n:A - [0:0]\n:B - [0:0]\n:C - [0:0]\n\
            -A PREROUTING -j A\n-A PREROUTING -p tcp -j DNAT --to-destination 10.0.0.3:3\n\
            -A A -g B\n-A A -j DNAT --to-destination 10.0.0.1:1\n\
            -A B -d 192.0.2.1/32 -j RETURN\n-A B -j C\n-A C -j DNAT --to-destination 10.0.0.2:2\nCOMMIT\n";
        let program = Program::parse(text).expect("parses");
        let ctx = NodeContext { node: "n".into(), addresses: Vec::new() };
        let run = |dst: &str| {
            let packet = Packet {
                src: "198.51.100.1".parse().expect("ip"),
                src_port: 1,
                dst: dst.parse().expect("ip"),
                dst_port: 9,
                protocol: Protocol::Tcp,
            };
            trace(&program, &ctx, &Topology::default(), packet, "iptables", 1).outcomes[0].endpoint.to_string()
        };
        // B returns: A was left by the goto, so PREROUTING goes on.
        assert_eq!(run("192.0.2.1"), "10.0.0.3:3");
        assert_eq!(run("192.0.2.2"), "10.0.0.2:2");
    }

    /// A cluster exercising every rule kind: external IPs, a Local LB with affinity, source
    /// ranges with the node inside, UDP and SCTP, no endpoints, ITP Local, two cluster CIDRs.
    const RICH: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: test-node}
spec: {podCIDR: 10.180.0.0/24}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.2}
---
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clusterCIDR: "10.0.0.0/9,10.128.0.0/9"
iptables: {localhostNodePorts: false}
nodePortAddresses: ["192.168.0.0/16", "127.0.0.0/8"]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: apps}
spec:
  type: LoadBalancer
  clusterIP: 172.30.1.1
  externalIPs: [192.0.2.10]
  externalTrafficPolicy: Local
  healthCheckNodePort: 31999
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  loadBalancerSourceRanges: ["192.168.0.0/16", "198.51.100.0/24"]
  ports:
  - {name: web, port: 443, protocol: TCP, targetPort: 8443, nodePort: 30443}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
  - {name: sig, port: 3868, protocol: SCTP, targetPort: 3868, nodePort: 30868}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-a
  namespace: apps
  labels: {kubernetes.io/service-name: lb}
addressType: IPv4
endpoints:
- {addresses: ["10.180.0.10"], conditions: {ready: true}, nodeName: test-node}
- {addresses: ["10.180.0.11"], conditions: {ready: true}, nodeName: test-node}
- {addresses: ["10.181.0.10"], conditions: {ready: true}, nodeName: node2}
ports:
- {name: web, port: 8443, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
- {name: sig, port: 3868, protocol: SCTP}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: apps}
spec:
  type: NodePort
  clusterIP: 172.30.1.2
  ports: [{port: 80, protocol: TCP, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: local-only, namespace: apps}
spec:
  clusterIP: 172.30.1.3
  internalTrafficPolicy: Local
  ports: [{port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-only-a
  namespace: apps
  labels: {kubernetes.io/service-name: local-only}
addressType: IPv4
endpoints:
- {addresses: ["10.181.0.20"], conditions: {ready: true}, nodeName: node2}
ports: [{port: 80, protocol: TCP}]
"#;

    #[test]
    fn rich_cluster_round_trips_and_traces() {
        let c = cluster(RICH);
        let text = render(&node_plan(&c));
        assert!(text.contains(":SWITCHYARD-MASQ-NOT-LOCAL"), "two cluster CIDRs need the helper chain");
        let program = Program::parse(&text).expect("parses");
        assert_eq!(Program::parse(&program.to_restore()).expect("reparses"), program);
        // From outside, the LB IP inside the ranges: local endpoints only, source kept.
        let t = probe(&c, &program, "198.51.100.7", "203.0.113.10:443");
        assert_eq!(t.outcomes.len(), 2, "{:#?}", t.hops);
        assert!(t.outcomes.iter().all(|o| !o.masquerade));
        // Outside the ranges: dropped.
        assert_eq!(probe(&c, &program, "8.8.8.8", "203.0.113.10:443").verdict, Verdict::Drop);
        // A pod to the external IP: short-circuited to every endpoint.
        assert_eq!(probe(&c, &program, "10.180.0.99", "192.0.2.10:443").outcomes.len(), 3);
        // ITP Local with no local endpoint: dropped; unknown port of a cluster IP: rejected.
        assert_eq!(probe(&c, &program, "10.180.0.99", "172.30.1.3:80").verdict, Verdict::Drop);
        assert_eq!(probe(&c, &program, "10.180.0.99", "172.30.1.1:80").verdict, Verdict::Reject);
        // Off-cluster client to a cluster IP: masqueraded through the helper chain.
        let t = probe(&c, &program, "192.168.7.7", "172.30.1.1:443");
        assert!(t.outcomes.iter().all(|o| o.masquerade), "{:#?}", t.hops);
        let t = probe(&c, &program, "10.130.0.1", "172.30.1.1:443");
        assert!(t.outcomes.iter().all(|o| !o.masquerade), "{:#?}", t.hops);
    }

    /// One random service: (type 0-2, protocol 0-2, ETP Local, ITP Local, affinity,
    /// source ranges 0-2, external IP, endpoints as (address 1-4, on this node, ready)).
    type SvcSpec = (u8, u8, bool, bool, bool, u8, bool, Vec<(u8, bool, bool)>);

    /// A cluster from random services and proxy settings, as YAML.
    fn random_cluster(services: &[SvcSpec], masquerade_all: bool, cidrs: u8, only_node_ip: bool) -> String {
        let mut y = String::from(
            "apiVersion: v1\nkind: Node\nmetadata: {name: test-node}\nspec: {podCIDR: 10.180.0.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n",
        );
        let cluster_cidr = match cidrs {
            0 => "",
            1 => "clusterCIDR: 10.0.0.0/8\n",
            _ => "clusterCIDR: \"10.0.0.0/9,10.128.0.0/9\"\n",
        };
        y.push_str(&format!(
            "---\napiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{cluster_cidr}iptables: {{masqueradeAll: {masquerade_all}}}\n{}",
            if only_node_ip { "nodePortAddresses: [192.168.0.2/32]\n" } else { "" }
        ));
        for (i, (kind, proto, etp, itp, affinity, ranges, ext_ip, eps)) in services.iter().enumerate() {
            let kind = ["ClusterIP", "NodePort", "LoadBalancer"][*kind as usize % 3];
            let proto = ["TCP", "UDP", "SCTP"][*proto as usize % 3];
            let mut spec = format!(
                "  type: {kind}\n  clusterIP: 172.30.0.{}\n  ports: [{{name: p, port: 80, protocol: {proto}, targetPort: 8080{}}}]\n",
                i + 1,
                if kind == "ClusterIP" { String::new() } else { format!(", nodePort: {}", 30000 + i) }
            );
            if *etp && kind != "ClusterIP" {
                spec.push_str(&format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {}\n", 31000 + i));
            }
            if *itp {
                spec.push_str("  internalTrafficPolicy: Local\n");
            }
            if *affinity {
                spec.push_str("  sessionAffinity: ClientIP\n");
            }
            if *ext_ip {
                spec.push_str(&format!("  externalIPs: [192.0.2.{}]\n", i + 1));
            }
            match ranges {
                1 => spec.push_str("  loadBalancerSourceRanges: [198.51.100.0/24]\n"),
                2 => spec.push_str("  loadBalancerSourceRanges: [192.168.0.0/16, 198.51.100.0/24]\n"),
                _ => {}
            }
            let status = if kind == "LoadBalancer" {
                format!("status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.{}}}]}}}}\n", i + 1)
            } else {
                String::new()
            };
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n{spec}{status}"
            ));
            let mut endpoints = String::new();
            let mut seen = Vec::new();
            for (addr, local, ready) in eps {
                if seen.contains(addr) {
                    continue;
                }
                seen.push(*addr);
                let node = if *local { "test-node" } else { "node2" };
                endpoints.push_str(&format!(
                    "- {{addresses: [\"10.{}.{i}.{addr}\"], conditions: {{ready: {ready}, serving: true, terminating: {}}}, nodeName: {node}}}\n",
                    if *local { 180 } else { 181 },
                    !ready
                ));
            }
            if !endpoints.is_empty() {
                y.push_str(&format!(
                    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: {proto}}}]\nendpoints:\n{endpoints}"
                ));
            }
        }
        y
    }

    fn svc_spec() -> impl proptest::strategy::Strategy<Value = SvcSpec> {
        use proptest::prelude::*;
        (
            0u8..3,
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..3,
            any::<bool>(),
            proptest::collection::vec((1u8..5, any::<bool>(), any::<bool>()), 0..4),
        )
    }

    fn cluster_spec() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        (proptest::collection::vec(svc_spec(), 0..5), any::<bool>(), 0u8..3, any::<bool>())
            .prop_map(|(s, m, c, o)| random_cluster(&s, m, c, o))
    }

    proptest::proptest! {
        // PROPTEST_CASES overrides the count for a longer run.
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
            ..Default::default()
        })]

        /// Applying the transaction to the old program yields the new program, and every program
        /// parses back with no rule the tracer cannot read.
        #[test]
        fn incremental_lands_on_new_program(a in cluster_spec(), b in cluster_spec()) {
            let (old, new) = (node_plan(&cluster(&a)), node_plan(&cluster(&b)));
            assert_incremental(&old, &new);
            let program = Program::parse(&render(&new)).expect("parses");
            for rs in program.families.values() {
                for t in rs.tables.values() {
                    for r in t.chains.values().flat_map(|c| &c.rules) {
                        proptest::prop_assert!(!r.matches.iter().any(|m| matches!(m, Match::Unknown(_))), "{}", r.text);
                    }
                }
            }
        }
    }

    /// The destination index skips rules, never changes an answer: trace every service of a
    /// long program with and without it.
    #[test]
    fn destination_index_changes_no_answer() {
        let cluster = crate::synthetic::cluster(120, 3);
        let plan = crate::policy::plan(&cluster, "node-a", Backend::Iptables);
        let indexed = Program::parse(&render(&plan)).expect("parses");
        assert!(
            indexed
                .families
                .values()
                .flat_map(|r| r.tables.values())
                .flat_map(|t| t.chains.values())
                .any(|c| c.index.is_some())
        );
        let mut plain = indexed.clone();
        for rs in plain.families.values_mut() {
            for t in rs.tables.values_mut() {
                for c in t.chains.values_mut() {
                    c.index = None;
                }
            }
        }
        let ctx = NodeContext { node: "node-a".into(), addresses: vec!["192.168.0.1".parse().expect("ip")] };
        let topo = crate::trace::path::Topology::from_cluster(&cluster);
        for svc in cluster.services.values() {
            for src in ["10.1.0.9", "203.0.113.4"] {
                let packet = crate::trace::Packet {
                    src: src.parse().expect("ip"),
                    src_port: 40000,
                    dst: svc.cluster_ips[0],
                    dst_port: 80,
                    protocol: svc.ports[0].protocol,
                };
                let a = crate::trace::path::trace(&indexed, &ctx, &topo, packet, "iptables", 3);
                let b = crate::trace::path::trace(&plain, &ctx, &topo, packet, "iptables", 3);
                assert_eq!((a.verdict, &a.outcomes), (b.verdict, &b.outcomes), "{svc:?}");
            }
        }
    }
}
