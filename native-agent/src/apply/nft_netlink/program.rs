//! Whole programs in one netlink batch: a full sync without `nft` reading every element.
//!
//! At 10,000 Services a full program holds ~330,000 map elements, and `nft -f` spends two thirds
//! of its ~2.8 s parsing and evaluating their text. Elements are what this module's parent
//! already encodes exactly; declarations and rules are few, varied, and what `nft` is for. So a
//! full program is loaded in three steps:
//!
//! 1. [`split`]: the program without the elements of the sets the parent encodes, and without the
//!    base chains' hooks, becomes the *staging script*: the same declarations and rules in
//!    `table <family> switchyard-staging` ([`STAGING`]). Without hooks no packet ever reaches it.
//! 2. `nft -f` loads the staging script, and the staging table is read back with netlink dumps
//!    (table, chains, sets, what elements remain, rules): `nft`'s own encoding of our text.
//! 3. [`assemble`]: one batch replaces `table <family> switchyard` with those objects, the hooks
//!    put back, then adds the encoded elements and deletes the staging table. The batch is one
//!    transaction, as `nft -f` of the program is; if anything on the way fails, the staging table
//!    goes and the program goes through `nft -f` as before.

use std::collections::BTreeMap;

use switchyard_engine::render::nftables::TABLE;

use super::{
    NLA_F_NESTED, Op, SetType, Unsupported, encode_element, nest_end, nest_start, nfproto, parse_element, put_attr,
    put_str, split_elements,
};

/// The table the declarations are staged in; created and deleted by every full load.
pub const STAGING: &str = "switchyard-staging";

pub(super) const NFT_MSG_NEWTABLE: u16 = 0;
pub(super) const NFT_MSG_GETTABLE: u16 = 1;
pub(super) const NFT_MSG_DELTABLE: u16 = 2;
pub(super) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(super) const NFT_MSG_GETCHAIN: u16 = 4;
pub(super) const NFT_MSG_NEWRULE: u16 = 6;
pub(super) const NFT_MSG_GETRULE: u16 = 7;
pub(super) const NFT_MSG_NEWSET: u16 = 9;
pub(super) const NFT_MSG_GETSET: u16 = 10;
pub(super) const NFT_MSG_GETSETELEM: u16 = 13;
const NLM_F_APPEND: u16 = 0x800;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_FLAGS: u16 = 10;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_ID: u16 = 10;
/// What a set's request may carry: name, flags, key and data types and lengths, policy,
/// description, timeout, gc interval, user data, object type, expressions.
const SET_ATTRIBUTES: &[u16] = &[2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 17, 18];
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = super::NFTA_SET_ELEM_LIST_TABLE;
const NFTA_SET_ELEM_LIST_SET: u16 = super::NFTA_SET_ELEM_LIST_SET;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = super::NFTA_SET_ELEM_LIST_ELEMENTS;

/// A base chain's hook, which the staging table leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `filter`, `nat`, `route`.
    pub kind: String,
    pub hooknum: u32,
    pub priority: i32,
    /// `NF_ACCEPT` (1) or `NF_DROP` (0).
    pub policy: u32,
}

/// One family's part of a program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyProgram {
    pub family: String,
    /// The program replaces the table (`delete table`) rather than adding to it.
    pub replaces: bool,
    /// The program declares the table (`table F switchyard { ... }`).
    pub declares: bool,
    pub hooks: BTreeMap<String, Hook>,
    /// The elements this module encodes, per set, in the program's order.
    pub elements: Vec<EncodedElements>,
    /// Sets whose elements stay in the staging script (interval sets, ...): read back and copied.
    pub staged_elements: Vec<String>,
}

/// A full program, split for loading over netlink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// For `nft -f`: the declarations and rules in [`STAGING`], hookless.
    pub staging: String,
    pub families: Vec<FamilyProgram>,
    /// The encoded elements' nests, one set after another ([`EncodedElements::range`]).
    pub nests: Vec<u8>,
}

impl Split {
    pub fn elements(&self) -> usize {
        self.families.iter().flat_map(|f| &f.elements).map(|e| e.count).sum()
    }

    /// `nft` input that removes the staging tables, whatever they hold (after a failure).
    pub fn cleanup_script(&self) -> String {
        self.families.iter().map(|f| format!("table {0} {STAGING}\ndelete table {0} {STAGING}\n", f.family)).collect()
    }
}

/// Splits a full program as the renderer prints it (and `full_sync_script` extends it): per
/// family `table F switchyard`, `delete table F switchyard`, and the table's block. Anything else
/// (an incremental transaction, a statement this module does not know) is [`Unsupported`].
///
/// `nests` is a buffer to write the elements to, reused from the previous program: a full
/// program's 14 MB written into a fresh buffer each time would leave the allocator holding ever
/// more of them.
pub fn split(script: &str, mut nests: Vec<u8>) -> Result<Split, Unsupported> {
    nests.clear();
    let mut out = Split { staging: String::with_capacity(16 << 10), families: Vec::new(), nests };
    let mut lines = script.lines().enumerate().map(|(i, l)| (i + 1, l));
    let unsupported = |line| Err(Unsupported::Statement { line });
    while let Some((n, line)) = lines.next() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = t.split_whitespace().collect();
        let (fam, declares) = match words.as_slice() {
            ["table", fam, name] if *name == TABLE => (*fam, false),
            ["delete", "table", fam, name] if *name == TABLE => {
                let f = family(&mut out.families, fam, n)?;
                // The batch deletes before it declares, as the renderer's programs do.
                if f.declares {
                    return unsupported(n);
                }
                f.replaces = true;
                out.staging.push_str(&format!("delete table {fam} {STAGING}\n"));
                continue;
            }
            ["table", fam, name, "{"] if *name == TABLE => (*fam, true),
            _ => return unsupported(n),
        };
        let f = family(&mut out.families, fam, n)?;
        if !declares {
            out.staging.push_str(&format!("table {fam} {STAGING}\n"));
            continue;
        }
        if f.declares {
            return unsupported(n);
        }
        f.declares = true;
        out.staging.push_str(&format!("table {fam} {STAGING} {{\n"));
        table_block(&mut lines, f, &mut out.staging, &mut out.nests)?;
        out.staging.push_str("}\n");
    }
    if !out.families.iter().any(|f| f.declares) {
        return Err(Unsupported::Empty);
    }
    Ok(out)
}

fn family<'a>(
    families: &'a mut Vec<FamilyProgram>,
    fam: &str,
    line: usize,
) -> Result<&'a mut FamilyProgram, Unsupported> {
    if !super::super::nftables::FAMILIES.contains(&fam) {
        return Err(Unsupported::Statement { line });
    }
    let at = match families.iter().position(|f| f.family == fam) {
        Some(at) => at,
        None => {
            families.push(FamilyProgram { family: fam.to_string(), ..FamilyProgram::default() });
            families.len() - 1
        }
    };
    Ok(&mut families[at])
}

/// The inside of `table F switchyard { ... }`, up to its closing brace.
fn table_block<'a>(
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
    f: &mut FamilyProgram,
    staging: &mut String,
    nests: &mut Vec<u8>,
) -> Result<(), Unsupported> {
    while let Some((n, line)) = lines.next() {
        let t = line.trim();
        if t == "}" {
            return Ok(());
        }
        if let Some(name) = t.strip_prefix("chain ").and_then(|r| r.strip_suffix(" {")) {
            staging.push_str(line);
            staging.push('\n');
            chain_block(lines, f, name, staging)?;
        } else if let Some(name) =
            t.strip_prefix("set ").or_else(|| t.strip_prefix("map ")).and_then(|r| r.strip_suffix(" {"))
        {
            staging.push_str(line);
            staging.push('\n');
            set_block(lines, f, name, staging, nests)?;
        } else if t.ends_with('{') {
            // A flowtable, a named object...: only nft.
            return Err(Unsupported::Statement { line: n });
        } else {
            staging.push_str(line);
            staging.push('\n');
        }
    }
    Err(Unsupported::Statement { line: 0 })
}

fn chain_block<'a>(
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
    f: &mut FamilyProgram,
    chain: &str,
    staging: &mut String,
) -> Result<(), Unsupported> {
    for (n, line) in lines.by_ref() {
        let t = line.trim();
        if t.starts_with("type ") && t.contains(" hook ") {
            let hook = parse_hook(t).ok_or(Unsupported::Statement { line: n })?;
            f.hooks.insert(chain.to_string(), hook);
            continue;
        }
        staging.push_str(line);
        staging.push('\n');
        if t == "}" {
            return Ok(());
        }
    }
    Err(Unsupported::Statement { line: 0 })
}

/// `type filter hook forward priority -110; policy accept;`, numbers only.
fn parse_hook(t: &str) -> Option<Hook> {
    let w: Vec<&str> = t.split_whitespace().collect();
    let (kind, hook, prio, policy) = match w.as_slice() {
        ["type", kind, "hook", hook, "priority", prio, "policy", policy] => (kind, hook, prio, Some(*policy)),
        ["type", kind, "hook", hook, "priority", prio] => (kind, hook, prio, None),
        _ => return None,
    };
    let hooknum = match *hook {
        "prerouting" => 0,
        "input" => 1,
        "forward" => 2,
        "output" => 3,
        "postrouting" => 4,
        _ => return None,
    };
    let policy = match policy {
        None | Some("accept;") => 1,
        Some("drop;") => 0,
        Some(_) => return None,
    };
    if !matches!(*kind, "filter" | "nat" | "route") {
        return None;
    }
    Some(Hook { kind: kind.to_string(), hooknum, priority: prio.strip_suffix(';')?.parse().ok()?, policy })
}

fn set_block<'a>(
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
    f: &mut FamilyProgram,
    set: &str,
    staging: &mut String,
    nests: &mut Vec<u8>,
) -> Result<(), Unsupported> {
    let mut decl: Option<&str> = None;
    let mut flags: Vec<String> = Vec::new();
    while let Some((n, line)) = lines.next() {
        let t = line.trim();
        if t == "}" {
            staging.push_str(line);
            staging.push('\n');
            return Ok(());
        }
        if t.starts_with("type ") || t.starts_with("typeof ") {
            decl = Some(t);
        } else if let Some(fl) = t.strip_prefix("flags ") {
            flags.extend(fl.split(',').map(|s| s.trim().to_string()));
        } else if let Some(first) = t.strip_prefix("elements = {") {
            match decl.and_then(|d| SetType::parse(d, &flags)) {
                Some(ty) => {
                    let at = nests.len();
                    let mut e = EncodedElements { family: f.family.clone(), set: set.into(), count: 0, range: at..at };
                    elements_block(lines, first, &ty, n, &mut e, nests)?;
                    f.elements.push(e);
                    continue;
                }
                None => {
                    f.staged_elements.push(set.to_string());
                    staging.push_str(line);
                    staging.push('\n');
                    // Copied as is, up to the end of the list.
                    let mut done = t.ends_with('}');
                    while !done {
                        let Some((_, l)) = lines.next() else { break };
                        staging.push_str(l);
                        staging.push('\n');
                        done = l.trim_end().ends_with('}');
                    }
                    continue;
                }
            }
        }
        staging.push_str(line);
        staging.push('\n');
    }
    Err(Unsupported::Statement { line: 0 })
}

/// Elements encoded as they are read: their `NFTA_LIST_ELEM` nests one after another, as an
/// element list attribute holds them (a program's 330,000 elements are 14 MB this way, several
/// times that as parsed values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedElements {
    pub family: String,
    pub set: String,
    pub count: usize,
    /// Where the nests are in [`Split::nests`].
    pub range: std::ops::Range<usize>,
}

impl EncodedElements {
    /// The nests (of `all`, [`Split::nests`]) in chunks of at most `max` bytes, at least one nest
    /// each, for one message each.
    pub fn chunks<'a>(&self, all: &'a [u8], max: usize) -> impl Iterator<Item = (&'a [u8], usize)> + use<'a> {
        let mut rest = all.get(self.range.clone()).unwrap_or_default();
        std::iter::from_fn(move || {
            let (mut len, mut count) = (0, 0);
            while len + 4 <= rest.len() {
                let step = (u16::from_ne_bytes([rest[len], rest[len + 1]]) as usize).next_multiple_of(4).max(4);
                if count > 0 && len + step > max {
                    break;
                }
                len = (len + step).min(rest.len());
                count += 1;
            }
            if count == 0 {
                return None;
            }
            let (chunk, tail) = rest.split_at(len);
            rest = tail;
            Some((chunk, count))
        })
    }
}

/// `elements = { a, b comment "x, y" : c,` ... `z }` (the renderer puts one element per line).
fn elements_block<'a>(
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
    first: &'a str,
    ty: &SetType,
    first_line: usize,
    out: &mut EncodedElements,
    nests: &mut Vec<u8>,
) -> Result<(), Unsupported> {
    let (mut text, mut n) = (first, first_line);
    loop {
        let t = text.trim();
        let (body, last) = match t.strip_suffix('}') {
            Some(b) => (b, true),
            None => (t, false),
        };
        for item in split_elements(body) {
            let e = parse_element(item, ty, Op::Add)
                .ok_or_else(|| Unsupported::Element { line: n, element: item.to_string() })?;
            out.count += 1;
            // libnftnl numbers a message's elements from 1; the kernel reads any number.
            encode_element(nests, &e, 1);
        }
        if last {
            out.range.end = nests.len();
            return Ok(());
        }
        (n, text) = lines.next().ok_or(Unsupported::Statement { line: n })?;
    }
}

/// One netlink message of a dump, as the kernel sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dumped {
    /// `NFT_MSG_*` (the subsystem byte removed).
    pub msg: u16,
    pub family: u8,
    /// The attributes, unparsed.
    pub attrs: Vec<u8>,
}

/// The staging table read back: the dumps [`assemble`] needs, per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Staged {
    pub tables: Vec<Dumped>,
    pub chains: Vec<Dumped>,
    pub sets: Vec<Dumped>,
    /// `GETSETELEM` of each set in [`FamilyProgram::staged_elements`].
    pub elements: Vec<Dumped>,
    pub rules: Vec<Dumped>,
}

/// A message of a batch other than our element updates: bytes made here, or copied from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// `NFT_MSG_*`.
    pub msg: u16,
    /// `NLM_F_*` besides `NLM_F_REQUEST | NLM_F_ACK`.
    pub flags: u16,
    pub family: u8,
    pub attrs: Vec<u8>,
    /// What it does, for an error message.
    pub what: String,
}

/// The attributes of `b`: (type with its flag bits, payload).
pub fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]);
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

fn attr<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(t, _)| t & !NLA_F_NESTED == ty).map(|(_, p)| *p)
}

fn attr_str(attrs: &[(u16, &[u8])], ty: u16) -> Option<String> {
    let p = attr(attrs, ty)?;
    let p = p.split(|&b| b == 0).next()?;
    String::from_utf8(p.to_vec()).ok()
}

/// Copies the attributes of `attrs` that are in `keep`: a dump also holds what only the kernel
/// sets (handles, use counts, and on newer kernels a set's backend and element count), which a
/// request must not carry.
fn copy_only(out: &mut Vec<u8>, attrs: &[(u16, &[u8])], keep: &[u16]) {
    for (ty, payload) in attrs {
        if keep.contains(&(ty & !NLA_F_NESTED)) {
            put_attr(out, *ty, payload);
        }
    }
}

/// Why a staged program cannot be assembled (it then goes through `nft -f`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("the staging table of family {0} was not read back")]
    NoTable(String),
    #[error("staged set {0} is anonymous or has timeouts: only nft copies it")]
    Set(String),
    #[error("a dumped {0} has no name")]
    Unnamed(&'static str),
}

/// A dump lists every table's objects of a family: only the staging table's count.
fn staged_in(d: &Dumped, family: u8, table_attr: u16) -> bool {
    d.family == family && attr_str(&attributes(&d.attrs), table_attr).as_deref() == Some(STAGING)
}

fn named(ty: u16, name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    put_str(&mut a, ty, name);
    a
}

/// The batch's messages around the element updates: `before` (tables, chains, sets, copied
/// elements), then [`Split`]'s element updates, then `after` (rules, the staging tables' removal).
pub fn assemble(split: &Split, staged: &Staged) -> Result<(Vec<RawMessage>, Vec<RawMessage>), AssembleError> {
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let create = super::NLM_F_CREATE;
    for f in &split.families {
        let fam = nfproto(&f.family);
        let raw = |msg, flags, attrs, what: String| RawMessage { msg, flags, family: fam, attrs, what };
        let add_table = |attrs| raw(NFT_MSG_NEWTABLE, create, attrs, format!("add table {} {TABLE}", f.family));
        if f.replaces {
            before.push(add_table(named(NFTA_TABLE_NAME, TABLE)));
            let what = format!("delete table {} {TABLE}", f.family);
            before.push(raw(NFT_MSG_DELTABLE, 0, named(NFTA_TABLE_NAME, TABLE), what));
        }
        if !f.declares {
            continue;
        }
        let table = staged
            .tables
            .iter()
            .find(|d| staged_in(d, fam, NFTA_TABLE_NAME))
            .ok_or_else(|| AssembleError::NoTable(f.family.clone()))?;
        let mut a = named(NFTA_TABLE_NAME, TABLE);
        copy_only(&mut a, &attributes(&table.attrs), &[NFTA_TABLE_FLAGS, NFTA_TABLE_USERDATA]);
        before.push(add_table(a));
        for c in staged.chains.iter().filter(|d| staged_in(d, fam, NFTA_CHAIN_TABLE)) {
            let ca = attributes(&c.attrs);
            let name = attr_str(&ca, NFTA_CHAIN_NAME).ok_or(AssembleError::Unnamed("chain"))?;
            let mut a = named(NFTA_CHAIN_TABLE, TABLE);
            copy_only(&mut a, &ca, &[NFTA_CHAIN_NAME, NFTA_CHAIN_FLAGS, NFTA_CHAIN_USERDATA]);
            if let Some(h) = f.hooks.get(&name) {
                let hook = nest_start(&mut a, NFTA_CHAIN_HOOK);
                put_attr(&mut a, NFTA_HOOK_HOOKNUM, &h.hooknum.to_be_bytes());
                put_attr(&mut a, NFTA_HOOK_PRIORITY, &h.priority.to_be_bytes());
                nest_end(&mut a, hook);
                put_attr(&mut a, NFTA_CHAIN_POLICY, &h.policy.to_be_bytes());
                put_str(&mut a, NFTA_CHAIN_TYPE, &h.kind);
            }
            before.push(raw(NFT_MSG_NEWCHAIN, create, a, format!("add chain {} {TABLE} {name}", f.family)));
        }
        for (i, s) in staged.sets.iter().filter(|d| staged_in(d, fam, NFTA_SET_TABLE)).enumerate() {
            let sa = attributes(&s.attrs);
            let name = attr_str(&sa, NFTA_SET_NAME).ok_or(AssembleError::Unnamed("set"))?;
            let flags = attr(&sa, NFTA_SET_FLAGS).and_then(|p| p.try_into().ok()).map_or(0, u32::from_be_bytes);
            if flags & NFT_SET_ANONYMOUS != 0 || (flags & NFT_SET_TIMEOUT != 0 && f.staged_elements.contains(&name)) {
                return Err(AssembleError::Set(name));
            }
            let mut a = named(NFTA_SET_TABLE, TABLE);
            copy_only(&mut a, &sa, SET_ATTRIBUTES);
            put_attr(&mut a, NFTA_SET_ID, &(i as u32 + 1).to_be_bytes());
            before.push(raw(NFT_MSG_NEWSET, create, a, format!("add set {} {TABLE} {name}", f.family)));
        }
        for e in staged.elements.iter().filter(|d| staged_in(d, fam, NFTA_SET_ELEM_LIST_TABLE)) {
            let ea = attributes(&e.attrs);
            let set = attr_str(&ea, NFTA_SET_ELEM_LIST_SET).ok_or(AssembleError::Unnamed("element list"))?;
            let mut a = named(NFTA_SET_ELEM_LIST_TABLE, TABLE);
            copy_only(&mut a, &ea, &[NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS]);
            let what = format!("add element {} {TABLE} {set}", f.family);
            before.push(raw(super::NFT_MSG_NEWSETELEM, create, a, what));
        }
        for r in staged.rules.iter().filter(|d| staged_in(d, fam, NFTA_RULE_TABLE)) {
            let ra = attributes(&r.attrs);
            let chain = attr_str(&ra, NFTA_RULE_CHAIN).ok_or(AssembleError::Unnamed("rule's chain"))?;
            let mut a = named(NFTA_RULE_TABLE, TABLE);
            copy_only(&mut a, &ra, &[NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA]);
            let what = format!("add rule {} {TABLE} {chain}", f.family);
            after.push(raw(NFT_MSG_NEWRULE, create | NLM_F_APPEND, a, what));
        }
    }
    for f in split.families.iter().filter(|f| f.declares) {
        let what = format!("delete table {} {STAGING}", f.family);
        let attrs = named(NFTA_TABLE_NAME, STAGING);
        after.push(RawMessage { msg: NFT_MSG_DELTABLE, flags: 0, family: nfproto(&f.family), attrs, what });
    }
    Ok((before, after))
}

/// The dump requests that read the staging tables back: (message, family, attributes, which
/// [`Staged`] list the replies go to).
pub fn dump_requests(split: &Split) -> Vec<(u16, u8, Vec<u8>, StagedPart)> {
    let mut out = Vec::new();
    for f in split.families.iter().filter(|f| f.declares) {
        let fam = nfproto(&f.family);
        out.push((NFT_MSG_GETTABLE, fam, Vec::new(), StagedPart::Tables));
        for (msg, ty, part) in [
            (NFT_MSG_GETCHAIN, NFTA_CHAIN_TABLE, StagedPart::Chains),
            (NFT_MSG_GETSET, NFTA_SET_TABLE, StagedPart::Sets),
            (NFT_MSG_GETRULE, NFTA_RULE_TABLE, StagedPart::Rules),
        ] {
            let mut a = Vec::new();
            put_str(&mut a, ty, STAGING);
            out.push((msg, fam, a, part));
        }
        for set in &f.staged_elements {
            let mut a = Vec::new();
            put_str(&mut a, NFTA_SET_ELEM_LIST_TABLE, STAGING);
            put_str(&mut a, NFTA_SET_ELEM_LIST_SET, set);
            out.push((NFT_MSG_GETSETELEM, fam, a, StagedPart::Elements));
        }
    }
    out
}

/// Which list of [`Staged`] a dump fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagedPart {
    Tables,
    Chains,
    Sets,
    Elements,
    Rules,
}

impl Staged {
    pub fn push(&mut self, part: StagedPart, replies: Vec<Dumped>) {
        let list = match part {
            StagedPart::Tables => &mut self.tables,
            StagedPart::Chains => &mut self.chains,
            StagedPart::Sets => &mut self.sets,
            StagedPart::Elements => &mut self.elements,
            StagedPart::Rules => &mut self.rules,
        };
        list.extend(replies);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{NFPROTO_IPV4, NFPROTO_IPV6};
    use super::*;
    use switchyard_engine::policy::Backend;

    fn demo_program(node: &str) -> String {
        switchyard_engine::render(&switchyard_engine::demo::cluster(), node, Backend::Nftables).expect("renders")
    }

    /// The staging script is the program in the staging table, without hooks and without the
    /// elements this module encodes; every element is in one place or the other, once.
    #[test]
    fn split_moves_elements_and_hooks_out_of_the_staging_script() {
        let program = demo_program("node-1");
        let s = split(&program, Vec::new()).expect("a full program");
        let ip = &s.families[0];
        assert_eq!((ip.family.as_str(), ip.replaces, ip.declares), ("ip", true, true));
        assert!(!s.staging.contains(" hook "), "{}", s.staging);
        assert!(!s.staging.contains(&format!(" {TABLE} ")) && !s.staging.contains(&format!(" {TABLE}\n")));
        assert!(
            s.staging.starts_with(&format!("table ip {STAGING}\ndelete table ip {STAGING}\ntable ip {STAGING} {{\n"))
        );
        assert_eq!(ip.hooks["nat-prerouting"], Hook { kind: "nat".into(), hooknum: 0, priority: -100, policy: 1 });
        assert_eq!(ip.hooks["filter-output-post-dnat"].priority, -90);
        assert_eq!(ip.hooks.len(), program.matches(" hook ").count());
        // Interval sets stay with nft; the rest are ours.
        for set in ["firewall-allowed", "local-pod-cidrs", "service-cidrs"] {
            assert!(ip.staged_elements.iter().any(|s| s == set), "{set}");
        }
        let ours: Vec<&str> = ip.elements.iter().map(|e| e.set.as_str()).collect();
        assert!(ours.contains(&"endpoints-ips") && ours.contains(&"service-ips") && ours.contains(&"hairpin"));
        let elements_in = |text: &str| text.lines().filter(|l| l.contains(" : ") || l.contains("elements = {")).count();
        assert!(elements_in(&s.staging) < elements_in(&program));
        let cart = ip.elements.iter().find(|e| e.set == "affinity-services").expect("affinity-services");
        assert_eq!(cart.count, 1);
        let mut want = Vec::new();
        let ty = SetType::parse("type ipv4_addr . inet_proto . inet_service : verdict", &[]).expect("type");
        let e = parse_element(
            r#"10.96.0.30 . tcp . 80 comment "default/cart:http sessionAffinity" : jump affinity-600"#,
            &ty,
            Op::Add,
        );
        encode_element(&mut want, &e.expect("parses"), 1);
        assert_eq!(&s.nests[cart.range.clone()], want);
        let endpoints = ip.elements.iter().find(|e| e.set == "endpoints-ips").expect("endpoints-ips");
        let block = program.split("map endpoints-ips {").nth(1).and_then(|b| b.split("\n\t}").next()).expect("block");
        let listed = block.lines().filter(|l| l.contains(" : ") && !l.contains("typeof")).count();
        assert_eq!(endpoints.count, listed);
        // A rule line is kept whole.
        assert!(s.staging.contains("\t\tmasquerade fully-random\n"));
    }

    /// Only whole programs split: an incremental transaction, a foreign table or a table block
    /// this module does not know go through nft.
    #[test]
    fn only_full_programs_split() {
        assert!(split("add element ip switchyard cluster-ips { 10.0.0.1 }\n", Vec::new()).is_err());
        assert!(split("table ip filter {\n}\n", Vec::new()).is_err());
        assert!(split("table inet switchyard {\n}\n", Vec::new()).is_err());
        assert!(split("table ip switchyard {\n\tflowtable f {\n\t}\n}\n", Vec::new()).is_err());
        assert!(split("table ip switchyard\ndelete table ip switchyard\n", Vec::new()).is_err(), "nothing to load");
        let declared_then_deleted = format!("{}delete table ip {TABLE}\n", demo_program("node-1"));
        assert!(split(&declared_then_deleted, Vec::new()).is_err());
        let bad_element =
            "table ip switchyard {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 10.0.0.300 }\n\t}\n}\n";
        assert!(matches!(split(bad_element, Vec::new()), Err(Unsupported::Element { line: 4, .. })));
        assert!(
            split(
                "table ip switchyard {\n\tchain c {\n\t\ttype filter hook ingress priority 0; policy accept;\n\t}\n}\n",
                Vec::new()
            )
            .is_err()
        );
    }

    /// A family only deleted (a full sync's reconciliation) is replaced by nothing, and has no
    /// staging table to read back or remove.
    #[test]
    fn a_deleted_family_is_deleted_in_the_batch() {
        let program = format!("{}table ip6 {TABLE}\ndelete table ip6 {TABLE}\n", demo_program("node-1"));
        let s = split(&program, Vec::new()).expect("a full program");
        let ip6 = s.families.iter().find(|f| f.family == "ip6").expect("ip6");
        assert!(ip6.replaces && !ip6.declares);
        assert!(dump_requests(&s).iter().all(|(_, fam, _, _)| *fam == NFPROTO_IPV4));
        let (before, after) = assemble(&s, &staged_demo(&s)).expect("assembles");
        let ip6_msgs: Vec<(u16, &str)> = before
            .iter()
            .chain(&after)
            .filter(|m| m.family == NFPROTO_IPV6)
            .map(|m| (m.msg, m.what.as_str()))
            .collect();
        assert_eq!(
            ip6_msgs,
            [(NFT_MSG_NEWTABLE, "add table ip6 switchyard"), (NFT_MSG_DELTABLE, "delete table ip6 switchyard")]
        );
    }

    /// Chunks end on element boundaries, hold at least one element, and cover every byte.
    #[test]
    fn encoded_elements_chunk_on_element_boundaries() {
        let ty = SetType::parse("type ipv4_addr", &[]).expect("type");
        let mut e = EncodedElements::default();
        // Another set's nests first (nests are padded to 4 bytes, as attributes are).
        let mut nests = vec![7; 4];
        for i in 0..100u8 {
            encode_element(&mut nests, &parse_element(&format!("10.0.0.{i}"), &ty, Op::Add).expect("parses"), 1);
            e.count += 1;
        }
        e.range = 4..nests.len();
        let one = (nests.len() - 4) / 100;
        let chunks: Vec<(&[u8], usize)> = e.chunks(&nests, one * 30 + 1).collect();
        assert_eq!(chunks.iter().map(|c| c.1).collect::<Vec<_>>(), [30, 30, 30, 10]);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.0.iter().copied()).collect();
        assert_eq!(joined, nests[4..]);
        assert_eq!(e.chunks(&nests, 1).count(), 100, "an element larger than the limit still goes, alone");
        assert_eq!(EncodedElements::default().chunks(&nests, 100).count(), 0);
    }

    fn dumped(msg: u16, attrs: &[(u16, &[u8])]) -> Dumped {
        let mut a = Vec::new();
        for (t, p) in attrs {
            put_attr(&mut a, *t, p);
        }
        Dumped { msg, family: NFPROTO_IPV4, attrs: a }
    }

    /// A stand-in for the kernel's dumps: a table, a base chain and a regular one, a set and a
    /// rule of the staging table, with the attributes only the kernel sets, and one object of
    /// another table.
    fn staged_demo(_s: &Split) -> Staged {
        let z = |s: &str| [s.as_bytes(), &[0]].concat();
        let (staging, other) = (z(STAGING), z("filter"));
        Staged {
            tables: vec![
                dumped(0, &[(NFTA_TABLE_NAME, &other)]),
                dumped(0, &[(NFTA_TABLE_NAME, &staging), (NFTA_TABLE_FLAGS, &[0; 4]), (4, &[0, 0, 0, 0, 0, 0, 0, 9])]),
            ],
            chains: vec![
                dumped(
                    3,
                    &[
                        (NFTA_CHAIN_TABLE, &staging),
                        (NFTA_CHAIN_NAME, &z("nat-prerouting")),
                        (2, &[0; 8]),
                        (6, &[0; 4]),
                    ],
                ),
                dumped(3, &[(NFTA_CHAIN_TABLE, &other), (NFTA_CHAIN_NAME, &z("input"))]),
                dumped(3, &[(NFTA_CHAIN_TABLE, &staging), (NFTA_CHAIN_NAME, &z("services"))]),
            ],
            sets: vec![dumped(
                9,
                &[
                    (NFTA_SET_TABLE, &staging),
                    (NFTA_SET_NAME, &z("cluster-ips")),
                    (16, &[0; 8]),
                    (19, &z("0xffff")),
                    (20, &[0; 4]),
                ],
            )],
            elements: vec![],
            rules: vec![dumped(
                6,
                &[
                    (NFTA_RULE_TABLE, &staging),
                    (NFTA_RULE_CHAIN, &z("services")),
                    (3, &[0; 8]),
                    (NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, &[4, 0, 1, 0]),
                ],
            )],
        }
    }

    /// The batch re-creates the staged objects in our table: kernel-only attributes dropped,
    /// hooks put back on base chains, rules appended, other tables' objects ignored, and the
    /// staging table deleted last.
    #[test]
    fn assemble_copies_the_staging_table_into_ours() {
        let s = split(&demo_program("node-1"), Vec::new()).expect("a full program");
        let (before, after) = assemble(&s, &staged_demo(&s)).expect("assembles");
        let whats: Vec<&str> = before.iter().chain(&after).map(|m| m.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "add table ip switchyard",
                "delete table ip switchyard",
                "add table ip switchyard",
                "add chain ip switchyard nat-prerouting",
                "add chain ip switchyard services",
                "add set ip switchyard cluster-ips",
                "add rule ip switchyard services",
                "delete table ip switchyard-staging",
            ]
        );
        let types = |m: &RawMessage| attributes(&m.attrs).iter().map(|(t, _)| t & !NLA_F_NESTED).collect::<Vec<u16>>();
        assert_eq!(types(&before[2]), [NFTA_TABLE_NAME, NFTA_TABLE_FLAGS]);
        assert_eq!(
            types(&before[3]),
            [NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE]
        );
        let hook = attributes(&before[3].attrs)[2].1.to_vec();
        assert_eq!(
            attributes(&hook),
            [(NFTA_HOOK_HOOKNUM, &0u32.to_be_bytes()[..]), (NFTA_HOOK_PRIORITY, &(-100i32).to_be_bytes()[..])]
        );
        assert_eq!(types(&before[4]), [NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME]);
        assert_eq!(types(&before[5]), [NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_ID]);
        assert_eq!(types(&after[0]), [NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS]);
        assert_eq!(after[0].flags, super::super::NLM_F_CREATE | NLM_F_APPEND);
        assert_eq!(attr_str(&attributes(&before[0].attrs), NFTA_TABLE_NAME).as_deref(), Some(TABLE));
        // Without the staging table read back there is nothing to copy.
        assert_eq!(assemble(&s, &Staged::default()), Err(AssembleError::NoTable("ip".into())));
    }
}
