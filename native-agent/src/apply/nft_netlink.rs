//! A long-lived netlink applier for nftables, beside `nft -f`.
//!
//! One endpoint change costs ~16-20 ms through `nft -f`, nearly all of it in the `nft` process
//! (start, reading back its cache, an RCU wait when its socket closes); the kernel commits the
//! same element update in well under a millisecond. A full program at 10,000 Services costs
//! ~2.8 s, two thirds of it `nft` parsing 330,000 elements. So [`Hybrid`] sends on a
//! `NETLINK_NETFILTER` socket it keeps open, as one nfnetlink batch (`NFNL_MSG_BATCH_BEGIN`,
//! messages..., `NFNL_MSG_BATCH_END`: atomic, as `nft` is):
//!
//! - transactions of element adds and deletes only (most partial syncs);
//! - whole programs (full syncs): the declarations and rules are staged by `nft` in a hookless
//!   table and read back, the elements encoded here ([`program`]);
//!
//! and everything else through `nft -f` as before:
//!
//! - [`Declarations`] learns each set's key and data types from the scripts that went through
//!   `nft` (the full program declares every set); interval sets and types it cannot encode
//!   exactly are marked unsupported;
//! - [`plan`] turns a transaction into a [`Batch`], or says why it must go through `nft`;
//! - [`encode`] writes the batch's bytes (pure; tested against what `nft` 1.0.6 sends);
//! - [`Socket`] sends a batch and reads an ack or error for every message, and reads dumps.
//!
//! Encoding (`include/uapi/linux/netfilter/nf_tables.h`, nft's `datatype.c`): a concatenation
//! pads each field to 4 bytes; addresses and `inet_service` are in network byte order,
//! `inet_proto` is 1 byte, marks and `numgen` integers are host order; verdict data is
//! `NFTA_DATA_VERDICT {NFTA_VERDICT_CODE (be32), NFTA_VERDICT_CHAIN}`; an element's comment is
//! userdata TLV `NFTNL_UDATA_SET_ELEM_COMMENT` (type 0, NUL-terminated).

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, sockopt};
use switchyard_engine::render::nftables::TABLE;

use super::nftables::{ApplyError, NftApplier};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// An attribute's length is 16 bits: a message's element list stays below this, and a longer
/// statement is split over several messages of the same batch.
const MAX_ELEMENTS_ATTR: usize = 60_000;
/// Batches above this go through `nft` (a full program at 10,000 Services is ~17 MB).
const MAX_BATCH: usize = 256 << 20;

/// One field of a set's key or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Ipv4,
    Ipv6,
    /// `inet_proto`, `meta l4proto`: one byte.
    Proto,
    /// `inet_service`, `th dport`: two bytes, network order.
    Service,
    /// `mark`, `numgen ... mod N`: 32 bits, host order.
    Host32,
}

impl Field {
    /// A `type` name or a `typeof` expression, as our renderer writes them.
    fn from_decl(word: &str) -> Option<Field> {
        let w: Vec<&str> = word.split_whitespace().collect();
        Some(match w.as_slice() {
            ["ipv4_addr"] | ["ip", "saddr" | "daddr"] => Field::Ipv4,
            ["ipv6_addr"] | ["ip6", "saddr" | "daddr"] => Field::Ipv6,
            ["inet_proto"] | ["meta", "l4proto"] | ["ip", "protocol"] => Field::Proto,
            ["inet_service"] | ["th" | "tcp" | "udp" | "sctp", "sport" | "dport"] => Field::Service,
            ["mark"] | ["meta" | "ct", "mark"] | ["numgen", "random" | "inc", "mod", _] => Field::Host32,
            _ => return None,
        })
    }

    fn write(self, text: &str, out: &mut Vec<u8>) -> Option<()> {
        match self {
            Field::Ipv4 => out.extend_from_slice(&text.parse::<Ipv4Addr>().ok()?.octets()),
            Field::Ipv6 => out.extend_from_slice(&text.parse::<Ipv6Addr>().ok()?.octets()),
            Field::Proto => out.push(match text {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                "icmp" => 1,
                "icmpv6" => 58,
                n => n.parse().ok()?,
            }),
            Field::Service => out.extend_from_slice(&text.parse::<u16>().ok()?.to_be_bytes()),
            Field::Host32 => {
                let v = match text.strip_prefix("0x") {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => text.parse().ok()?,
                };
                out.extend_from_slice(&v.to_ne_bytes());
            }
        }
        Some(())
    }
}

/// What a map's elements point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataType {
    Value(Vec<Field>),
    Verdict,
}

/// A set's declared type, when this module can encode its elements exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetType {
    pub key: Vec<Field>,
    pub data: Option<DataType>,
}

impl SetType {
    /// From the `type ...`/`typeof ...` line and the flags; `None` for what only `nft` can do.
    fn parse(decl: &str, flags: &[String]) -> Option<SetType> {
        // Interval sets store ranges as pairs of elements: leave them to nft.
        if flags.iter().any(|f| f == "interval" || f == "constant") {
            return None;
        }
        let rest = decl.strip_prefix("typeof ").or_else(|| decl.strip_prefix("type "))?;
        let fields = |s: &str| s.split(" . ").map(Field::from_decl).collect::<Option<Vec<Field>>>();
        let (key, data) = match rest.split_once(" : ") {
            Some((k, "verdict")) => (fields(k)?, Some(DataType::Verdict)),
            Some((k, d)) => (fields(k)?, Some(DataType::Value(fields(d)?))),
            None => (fields(rest)?, None),
        };
        Some(SetType { key, data })
    }
}

/// The sets of our tables and their types, learnt from the scripts `nft` applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declarations {
    /// (family, set) → type; `None`: the set exists but only `nft` can update it.
    sets: BTreeMap<(String, String), Option<SetType>>,
}

impl Declarations {
    /// Follows a script that `nft` applied: a `table <family> switchyard { ... }` block (always
    /// after a `delete table` in our programs) replaces what is known of that family, a bare
    /// `delete table` forgets it. What is not understood is forgotten: an unknown set goes
    /// through `nft`, never through a guessed encoding.
    pub fn learn(&mut self, script: &str) {
        let mut family: Option<String> = None;
        let mut set: Option<(String, Option<String>, Vec<String>)> = None;
        let mut depth_skip = false;
        for line in script.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("delete table ") {
                if let Some((fam, name)) = rest.split_once(' ')
                    && name.trim() == TABLE
                {
                    self.forget(fam);
                }
                continue;
            }
            if let Some(rest) = t.strip_prefix("table ").and_then(|r| r.strip_suffix(" {")) {
                family = match rest.split_once(' ') {
                    Some((fam, name)) if name == TABLE => {
                        self.forget(fam);
                        Some(fam.to_string())
                    }
                    _ => None,
                };
                continue;
            }
            let Some(fam) = &family else { continue };
            if let Some((name, decl, flags)) = &mut set {
                if t == "}" {
                    let ty = decl.as_deref().and_then(|d| SetType::parse(d, flags));
                    self.sets.insert((fam.clone(), std::mem::take(name)), ty);
                    set = None;
                } else if t.starts_with("type ") || t.starts_with("typeof ") {
                    *decl = Some(t.to_string());
                } else if let Some(f) = t.strip_prefix("flags ") {
                    flags.extend(f.split(',').map(|s| s.trim().to_string()));
                }
                continue;
            }
            if depth_skip {
                depth_skip = t != "}";
                continue;
            }
            if let Some(name) =
                t.strip_prefix("set ").or_else(|| t.strip_prefix("map ")).and_then(|r| r.strip_suffix(" {"))
            {
                set = Some((name.to_string(), None, Vec::new()));
            } else if t.starts_with("chain ") && t.ends_with('{') {
                depth_skip = true;
            } else if t == "}" {
                family = None;
            }
        }
    }

    fn forget(&mut self, family: &str) {
        self.sets.retain(|(f, _), _| f != family);
    }

    fn get(&self, family: &str, set: &str) -> Option<&Option<SetType>> {
        self.sets.get(&(family.to_string(), set.to_string()))
    }
}

/// Add or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
}

/// A map element's data, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElementData {
    Value(Vec<u8>),
    Verdict { code: i32, chain: Option<String> },
}

/// One element, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<u8>,
    pub data: Option<ElementData>,
    pub comment: Option<String>,
}

/// One `add element` or `delete element` statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetUpdate {
    pub op: Op,
    pub family: String,
    pub set: String,
    pub elements: Vec<Element>,
}

/// A transaction this module can send: element updates, in the script's order; for a whole
/// program ([`program`]) also the messages that go before and after them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub before: Vec<program::RawMessage>,
    /// A program's elements, encoded as it was read: which set, and where in `nests`.
    pub encoded: Vec<program::EncodedElements>,
    pub nests: Vec<u8>,
    pub updates: Vec<SetUpdate>,
    pub after: Vec<program::RawMessage>,
}

impl Batch {
    pub fn elements(&self) -> usize {
        self.updates.iter().map(|u| u.elements.len()).sum::<usize>()
            + self.encoded.iter().map(|e| e.count).sum::<usize>()
    }
}

/// Why a transaction goes through `nft`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("line {line}: not an element update")]
    Statement { line: usize },
    #[error("line {line}: set {family} {set} is not known, or is an interval set or of a type only nft encodes")]
    Set { line: usize, family: String, set: String },
    #[error("line {line}: element `{element}` does not match the set's type")]
    Element { line: usize, element: String },
    #[error("no element updates")]
    Empty,
}

/// The batch for `script` when it holds only element adds and deletes on sets whose types are
/// known and exactly encodable; otherwise why not.
pub fn plan(script: &str, decls: &Declarations) -> Result<Batch, Unsupported> {
    let mut batch = Batch::default();
    for (i, line) in script.lines().enumerate() {
        let n = i + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let (op, rest) = if let Some(r) = t.strip_prefix("add element ") {
            (Op::Add, r)
        } else if let Some(r) = t.strip_prefix("delete element ") {
            (Op::Delete, r)
        } else {
            return Err(Unsupported::Statement { line: n });
        };
        let mut w = rest.splitn(4, ' ');
        let (Some(family), Some(table), Some(set), Some(body)) = (w.next(), w.next(), w.next(), w.next()) else {
            return Err(Unsupported::Statement { line: n });
        };
        let Some(body) = body.strip_prefix("{ ").and_then(|b| b.strip_suffix(" }")) else {
            return Err(Unsupported::Statement { line: n });
        };
        let ty = match decls.get(family, set) {
            Some(Some(ty)) if table == TABLE && super::nftables::FAMILIES.contains(&family) => ty,
            _ => return Err(Unsupported::Set { line: n, family: family.into(), set: set.into() }),
        };
        let mut elements = Vec::new();
        for item in split_elements(body) {
            let e = parse_element(item, ty, op)
                .ok_or_else(|| Unsupported::Element { line: n, element: item.to_string() })?;
            elements.push(e);
        }
        batch.updates.push(SetUpdate { op, family: family.into(), set: set.into(), elements });
    }
    if batch.updates.is_empty() {
        return Err(Unsupported::Empty);
    }
    Ok(batch)
}

/// Splits `a, b comment "x, y" : c` at the commas outside quotes.
fn split_elements(body: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in body.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty())
}

/// `KEY [comment "TEXT"] [: DATA]`, encoded for `ty`.
fn parse_element(text: &str, ty: &SetType, op: Op) -> Option<Element> {
    let (before, comment, after) = match text.split_once(" comment \"") {
        Some((k, rest)) => {
            let (c, rest) = rest.split_once('"')?;
            (k, Some(c.to_string()), rest.trim_start())
        }
        None => match text.split_once(" : ") {
            Some((k, d)) => (k, None, d),
            None => (text, None, ""),
        },
    };
    let data_text = match (after, comment.is_some()) {
        ("", _) => None,
        (d, true) => Some(d.strip_prefix(": ")?),
        (d, false) => Some(d),
    };
    let key = encode_fields(before.trim(), &ty.key)?;
    let data = match (&ty.data, data_text) {
        (_, None) if op == Op::Delete => None,
        (None, None) => None,
        (Some(DataType::Value(f)), Some(d)) => Some(ElementData::Value(encode_fields(d.trim(), f)?)),
        (Some(DataType::Verdict), Some(d)) => Some(parse_verdict(d.trim())?),
        _ => return None,
    };
    // A delete names the key only; what else nft would accept there we leave to nft.
    if op == Op::Delete && (data.is_some() || comment.is_some()) {
        return None;
    }
    // The comment's TLV length is one byte (with the NUL).
    if comment.as_ref().is_some_and(|c| c.len() > 254) {
        return None;
    }
    Some(Element { key, data, comment })
}

fn encode_fields(text: &str, fields: &[Field]) -> Option<Vec<u8>> {
    let parts: Vec<&str> = text.split(" . ").collect();
    if parts.len() != fields.len() {
        return None;
    }
    let mut out = Vec::with_capacity(fields.len() * 4);
    for (p, f) in parts.iter().zip(fields) {
        if p.contains(char::is_whitespace) {
            return None;
        }
        f.write(p, &mut out)?;
        // A concatenation's fields each take a multiple of 4 bytes.
        if fields.len() > 1 {
            out.resize(out.len().next_multiple_of(4), 0);
        }
    }
    Some(out)
}

/// `accept`, `drop`, `return`, `continue`, `jump CHAIN`, `goto CHAIN`.
fn parse_verdict(text: &str) -> Option<ElementData> {
    let mut w = text.split_whitespace();
    let (code, chain) = match (w.next()?, w.next(), w.next()) {
        ("drop", None, _) => (0, None),
        ("accept", None, _) => (1, None),
        ("continue", None, _) => (-1, None),
        ("return", None, _) => (-5, None),
        ("jump", Some(c), None) => (-3, Some(c)),
        ("goto", Some(c), None) => (-4, Some(c)),
        _ => return None,
    };
    if chain.is_some_and(|c| !c.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))) {
        return None;
    }
    Some(ElementData::Verdict { code, chain: chain.map(str::to_string) })
}

/// What one message of an encoded batch does, to name it in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfo {
    pub seq: u32,
    pub what: String,
}

/// An encoded batch: the bytes, the sequence numbers it used, and its element messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub begin_seq: u32,
    pub end_seq: u32,
    pub messages: Vec<MessageInfo>,
}

/// The batch's bytes: BATCH_BEGIN at `seq`, one message per statement (or per 60 KB of its
/// elements) with `NLM_F_ACK`, BATCH_END. `add` carries `NLM_F_CREATE` without `NLM_F_EXCL`,
/// as `nft add element` does (an identical element already there is not an error).
pub fn encode(batch: &Batch, seq: u32) -> Encoded {
    let mut bytes = Vec::new();
    let (begin_seq, end_seq, messages) = encode_into(batch, seq, &mut bytes);
    Encoded { bytes, begin_seq, end_seq, messages }
}

/// [`encode`] into `b` (cleared first), whose allocation a long-lived sender keeps; the
/// sequence numbers and messages.
fn encode_into(batch: &Batch, seq: u32, b: &mut Vec<u8>) -> (u32, u32, Vec<MessageInfo>) {
    b.clear();
    b.reserve(
        256 + batch.nests.len()
            + batch.encoded.len() * 64
            + batch.updates.iter().map(|u| u.elements.len()).sum::<usize>() * 64,
    );
    let mut next = seq;
    let begin_seq = next;
    batch_marker(b, NFNL_MSG_BATCH_BEGIN, next);
    let mut messages = Vec::new();
    let raw = |b: &mut Vec<u8>, next: &mut u32, messages: &mut Vec<MessageInfo>, m: &program::RawMessage| {
        *next = next.wrapping_add(1);
        let flags = NLM_F_REQUEST | NLM_F_ACK | m.flags;
        let at = msg_start(b, (NFNL_SUBSYS_NFTABLES << 8) | m.msg, flags, *next, m.family, 0);
        b.extend_from_slice(&m.attrs);
        msg_end(b, at);
        messages.push(MessageInfo { seq: *next, what: m.what.clone() });
    };
    for m in &batch.before {
        raw(b, &mut next, &mut messages, m);
    }
    for e in &batch.encoded {
        for (chunk, count) in e.chunks(&batch.nests, MAX_ELEMENTS_ATTR) {
            next = next.wrapping_add(1);
            let flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
            let (msg, list) = element_list_start(b, NFT_MSG_NEWSETELEM, flags, next, &e.family, &e.set);
            b.extend_from_slice(chunk);
            nest_end(b, list);
            msg_end(b, msg);
            messages.push(MessageInfo {
                seq: next,
                what: format!("add element {} {TABLE} {} ({count} elements)", e.family, e.set),
            });
        }
    }
    let mut elem = Vec::new();
    for u in &batch.updates {
        let (ty, flags) = match u.op {
            Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
            Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        let mut rest = u.elements.as_slice();
        while !rest.is_empty() {
            next = next.wrapping_add(1);
            let (msg, list) = element_list_start(b, ty, flags, next, &u.family, &u.set);
            let mut taken = 0;
            for e in rest {
                elem.clear();
                // libnftnl numbers a message's elements 1, 2, ... (the kernel reads any type).
                encode_element(&mut elem, e, (taken + 1) as u16);
                if taken > 0 && b.len() - list + elem.len() > MAX_ELEMENTS_ATTR {
                    break;
                }
                b.extend_from_slice(&elem);
                taken += 1;
            }
            nest_end(b, list);
            msg_end(b, msg);
            let verb = if u.op == Op::Add { "add" } else { "delete" };
            messages.push(MessageInfo {
                seq: next,
                what: format!("{verb} element {} {TABLE} {} ({taken} elements)", u.family, u.set),
            });
            rest = &rest[taken..];
        }
    }
    for m in &batch.after {
        raw(b, &mut next, &mut messages, m);
    }
    next = next.wrapping_add(1);
    batch_marker(b, NFNL_MSG_BATCH_END, next);
    (begin_seq, next, messages)
}

/// `nft`'s family name as an `NFPROTO_*` number (our tables are `ip` or `ip6`).
fn nfproto(family: &str) -> u8 {
    if family == "ip6" { NFPROTO_IPV6 } else { NFPROTO_IPV4 }
}

/// Starts an element message of our table's `set`: its header and the opened element list, whose
/// offsets (message, list) `msg_end` and `nest_end` close.
fn element_list_start(b: &mut Vec<u8>, msg: u16, flags: u16, seq: u32, family: &str, set: &str) -> (usize, usize) {
    let at = msg_start(b, (NFNL_SUBSYS_NFTABLES << 8) | msg, flags, seq, nfproto(family), 0);
    put_str(b, NFTA_SET_ELEM_LIST_TABLE, TABLE);
    put_str(b, NFTA_SET_ELEM_LIST_SET, set);
    (at, nest_start(b, NFTA_SET_ELEM_LIST_ELEMENTS))
}

fn encode_element(b: &mut Vec<u8>, e: &Element, index: u16) {
    let el = nest_start(b, index);
    let k = nest_start(b, NFTA_SET_ELEM_KEY);
    put_attr(b, NFTA_DATA_VALUE, &e.key);
    nest_end(b, k);
    match &e.data {
        Some(ElementData::Value(v)) => {
            let d = nest_start(b, NFTA_SET_ELEM_DATA);
            put_attr(b, NFTA_DATA_VALUE, v);
            nest_end(b, d);
        }
        Some(ElementData::Verdict { code, chain }) => {
            let d = nest_start(b, NFTA_SET_ELEM_DATA);
            let v = nest_start(b, NFTA_DATA_VERDICT);
            put_attr(b, NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(c) = chain {
                put_str(b, NFTA_VERDICT_CHAIN, c);
            }
            nest_end(b, v);
            nest_end(b, d);
        }
        None => {}
    }
    if let Some(c) = &e.comment {
        // libnftnl's TLV: type, length (with the NUL), value.
        let mut ud = vec![NFTNL_UDATA_SET_ELEM_COMMENT, (c.len() + 1) as u8];
        ud.extend_from_slice(c.as_bytes());
        ud.push(0);
        put_attr(b, NFTA_SET_ELEM_USERDATA, &ud);
    }
    nest_end(b, el);
}

fn batch_marker(b: &mut Vec<u8>, ty: u16, seq: u32) {
    let m = msg_start(b, ty, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES);
    msg_end(b, m);
}

fn msg_start(b: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let at = b.len();
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, NFNETLINK_V0, res_id (big-endian).
    b.extend_from_slice(&[family, 0]);
    b.extend_from_slice(&res_id.to_be_bytes());
    at
}

fn msg_end(b: &mut [u8], at: usize) {
    let len = (b.len() - at) as u32;
    b[at..at + 4].copy_from_slice(&len.to_ne_bytes());
}

fn put_attr(b: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    b.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(b.len().next_multiple_of(4), 0);
}

fn put_str(b: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    put_attr(b, ty, &v);
}

fn nest_start(b: &mut Vec<u8>, ty: u16) -> usize {
    let at = b.len();
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(b: &mut [u8], at: usize) {
    let len = (b.len() - at) as u16;
    b[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused the batch: nothing of it was committed.
    #[error("the kernel refused {what}: {source}")]
    Rejected {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The socket failed: whether the batch was committed is unknown.
    #[error("netlink socket: {0}")]
    Io(#[source] io::Error),
    #[error("batch of {0} bytes is larger than this applier sends")]
    TooLarge(usize),
}

/// Sends batches; [`Socket`] is the kernel, tests substitute a fake.
pub trait BatchSender: Send {
    fn send(&mut self, batch: &Batch) -> Result<(), NetlinkError>;

    /// Whether [`BatchSender::dump`] reads a kernel (whole programs need it).
    fn can_dump(&self) -> bool {
        false
    }

    /// The replies to a dump request `msg` (`NFT_MSG_GET*`) with `attrs` as the filter.
    fn dump(&mut self, msg: u16, family: u8, attrs: &[u8]) -> Result<Vec<program::Dumped>, NetlinkError> {
        let _ = (msg, family, attrs);
        Err(NetlinkError::Io(io::Error::other("this sender reads no kernel")))
    }
}

/// One `NETLINK_NETFILTER` socket, kept open for the agent's life.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    sndbuf: usize,
    /// Replies are read into this.
    buf: Vec<u8>,
    /// Batches are encoded into this.
    out: Vec<u8>,
}

impl Socket {
    /// Opens the socket in the network namespace `/run/netns/<netns>`, or the caller's. A socket
    /// stays in the namespace it was made in, so a short-lived thread enters it to make it.
    pub fn open(netns: Option<&str>) -> io::Result<Socket> {
        let fd = match netns {
            None => open_fd()?,
            Some(name) => {
                let name = name.to_string();
                std::thread::spawn(move || {
                    crate::conntrack::socket::enter_netns(&name)?;
                    open_fd()
                })
                .join()
                .map_err(|_| io::Error::other("the netns thread panicked"))??
            }
        };
        // The kernel answers during `sendmsg`; an error reply quotes the failed message whole.
        let _ = sockopt::set_socket_recv_buffer_size_force(&fd, 4 << 20);
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(5)))?;
        let sndbuf = sockopt::socket_send_buffer_size(&fd).unwrap_or(200_000);
        // Start from a different sequence number per socket so a reply can never be mistaken
        // for one to an earlier socket's batch.
        let seq =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(1);
        Ok(Socket { fd, seq, sndbuf, buf: vec![0; 1 << 18], out: Vec::new() })
    }

    fn read_replies(&mut self, enc: &Encoded) -> Result<(), NetlinkError> {
        let in_batch = |seq: u32| seq.wrapping_sub(enc.begin_seq) <= enc.end_seq.wrapping_sub(enc.begin_seq);
        let mut acked = 0;
        let mut failure: Option<NetlinkError> = None;
        while acked < enc.messages.len() {
            let n = match rustix::net::recv(self.fd.as_fd(), &mut self.buf[..], RecvFlags::empty()) {
                Ok((n, _)) => n,
                Err(Errno::INTR) => continue,
                // A truncated reply or a full receive buffer: the outcome is unknown.
                Err(e) => return Err(failure.unwrap_or(NetlinkError::Io(e.into()))),
            };
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(self.buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                let ty = u16::from_ne_bytes([self.buf[at + 4], self.buf[at + 5]]);
                if len < 16 || at + len > n {
                    break;
                }
                if ty == NLMSG_ERROR && len >= 36 {
                    let p = &self.buf[at + 16..at + len];
                    let errno = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
                    let seq = u32::from_ne_bytes([p[12], p[13], p[14], p[15]]);
                    if in_batch(seq) {
                        if seq == enc.begin_seq || seq == enc.end_seq {
                            // The batch itself was refused: no message of it was run.
                            if errno != 0 {
                                return Err(NetlinkError::Rejected {
                                    what: "the batch".into(),
                                    source: io::Error::from_raw_os_error(-errno),
                                });
                            }
                        } else {
                            acked += 1;
                            if errno != 0 && failure.is_none() {
                                let what = enc
                                    .messages
                                    .iter()
                                    .find(|m| m.seq == seq)
                                    .map_or_else(|| format!("message {seq}"), |m| m.what.clone());
                                failure =
                                    Some(NetlinkError::Rejected { what, source: io::Error::from_raw_os_error(-errno) });
                            }
                        }
                    }
                }
                at += len.next_multiple_of(4);
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

fn open_fd() -> io::Result<OwnedFd> {
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(netlink::NETFILTER))?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
    Ok(fd)
}

impl BatchSender for Socket {
    fn can_dump(&self) -> bool {
        true
    }

    fn dump(&mut self, msg: u16, family: u8, attrs: &[u8]) -> Result<Vec<program::Dumped>, NetlinkError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut b = Vec::with_capacity(64 + attrs.len());
        let at = msg_start(&mut b, (NFNL_SUBSYS_NFTABLES << 8) | msg, NLM_F_REQUEST | NLM_F_DUMP, seq, family, 0);
        b.extend_from_slice(attrs);
        msg_end(&mut b, at);
        rustix::net::send(&self.fd, &b, SendFlags::empty()).map_err(|e| NetlinkError::Io(e.into()))?;
        let mut out = Vec::new();
        loop {
            let n = match rustix::net::recv(self.fd.as_fd(), &mut self.buf[..], RecvFlags::empty()) {
                Ok((n, _)) => n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(NetlinkError::Io(e.into())),
            };
            let mut at = 0;
            while at + 16 <= n {
                let m = &self.buf[at..n];
                let len = u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize;
                let ty = u16::from_ne_bytes([m[4], m[5]]);
                let flags = u16::from_ne_bytes([m[6], m[7]]);
                let mseq = u32::from_ne_bytes([m[8], m[9], m[10], m[11]]);
                if len < 16 || len > m.len() {
                    return Err(NetlinkError::Io(io::Error::other("truncated netlink dump")));
                }
                at += len.next_multiple_of(4);
                if mseq != seq {
                    continue;
                }
                if flags & NLM_F_DUMP_INTR != 0 {
                    return Err(NetlinkError::Io(io::Error::other("the ruleset changed during the dump")));
                }
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR if len >= 20 => {
                        let errno = i32::from_ne_bytes([m[16], m[17], m[18], m[19]]);
                        return Err(NetlinkError::Rejected {
                            what: format!("the dump of message type {msg}"),
                            source: io::Error::from_raw_os_error(-errno),
                        });
                    }
                    _ if len >= 20 && ty >> 8 == NFNL_SUBSYS_NFTABLES => {
                        out.push(program::Dumped { msg: ty & 0xff, family: m[16], attrs: m[20..len].to_vec() })
                    }
                    _ => {}
                }
            }
        }
    }

    fn send(&mut self, batch: &Batch) -> Result<(), NetlinkError> {
        // The buffer is kept: a full program's ~14 MB made afresh each time would leave the
        // allocator holding ever more of them.
        let mut bytes = std::mem::take(&mut self.out);
        let (begin_seq, end_seq, messages) = encode_into(batch, self.seq, &mut bytes);
        self.seq = end_seq.wrapping_add(1);
        let enc = Encoded { bytes, begin_seq, end_seq, messages };
        let result = self.send_encoded(&enc);
        self.out = enc.bytes;
        result
    }
}

impl Socket {
    fn send_encoded(&mut self, enc: &Encoded) -> Result<(), NetlinkError> {
        if enc.bytes.len() > MAX_BATCH {
            return Err(NetlinkError::TooLarge(enc.bytes.len()));
        }
        if enc.bytes.len() + 4096 > self.sndbuf {
            // The kernel doubles what it is given; a batch must fit in one datagram.
            let want = enc.bytes.len() + 4096;
            sockopt::set_socket_send_buffer_size_force(&self.fd, want)
                .or_else(|_| sockopt::set_socket_send_buffer_size(&self.fd, want))
                .map_err(|e| NetlinkError::Io(e.into()))?;
            self.sndbuf = sockopt::socket_send_buffer_size(&self.fd).unwrap_or(want);
        }
        let sent =
            rustix::net::send(&self.fd, &enc.bytes, SendFlags::empty()).map_err(|e| NetlinkError::Io(e.into()))?;
        if sent != enc.bytes.len() {
            return Err(NetlinkError::Io(io::Error::other("short netlink send")));
        }
        self.read_replies(enc)
    }
}

/// Which way a transaction went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Netlink,
    Nft,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Netlink => "netlink",
            Path::Nft => "nft",
        }
    }
}

/// Opens a fresh [`BatchSender`] (after the previous one failed).
pub type Opener = Box<dyn FnMut() -> io::Result<Box<dyn BatchSender>> + Send>;

/// The nftables applier that picks, per transaction, netlink for pure element updates and `nft`
/// for everything else (and for everything while no socket can be opened).
pub struct Hybrid<A> {
    pub nft: A,
    sender: Option<Box<dyn BatchSender>>,
    open: Option<Opener>,
    decls: Declarations,
    /// Told the path of every transaction applied (a metric label in the agent).
    pub on_apply: Option<Box<dyn FnMut(Path) + Send>>,
    /// The path of the last transaction applied.
    pub last: Option<Path>,
    /// Where the time of the last whole program over netlink went.
    pub last_program: Option<ProgramPhases>,
    /// The buffer a program's elements are encoded into, kept from one program to the next.
    nests: Vec<u8>,
    said_unavailable: bool,
    announced: bool,
}

impl<A: NftApplier> Hybrid<A> {
    /// `open` makes the netlink side; it is called again after a socket failure.
    pub fn new(nft: A, mut open: Opener) -> Self {
        let (sender, said) = match open() {
            Ok(s) => (Some(s), false),
            Err(e) => {
                eprintln!(
                    "switchyard: nftables netlink socket unavailable ({e}): every transaction goes through nft -f"
                );
                (None, true)
            }
        };
        Hybrid {
            nft,
            sender,
            open: Some(open),
            decls: Declarations::default(),
            on_apply: None,
            last: None,
            last_program: None,
            nests: Vec::new(),
            said_unavailable: said,
            announced: false,
        }
    }

    /// Only `nft` (no netlink side): the applier as it was.
    pub fn nft_only(nft: A) -> Self {
        Hybrid {
            nft,
            sender: None,
            open: None,
            decls: Declarations::default(),
            on_apply: None,
            last: None,
            last_program: None,
            nests: Vec::new(),
            said_unavailable: true,
            announced: false,
        }
    }

    /// The real kernel, in namespace `netns` when given.
    pub fn kernel(nft: A, netns: Option<String>) -> Self {
        Self::new(nft, Box::new(move || Socket::open(netns.as_deref()).map(|s| Box::new(s) as Box<dyn BatchSender>)))
    }

    /// Takes note of a script the kernel holds already (loaded by other means), so that the
    /// sets it declares can then be updated over netlink.
    pub fn assume_applied(&mut self, script: &str) {
        self.decls.learn(script);
    }

    pub fn declarations(&self) -> &Declarations {
        &self.decls
    }

    fn sender(&mut self) -> Option<&mut Box<dyn BatchSender>> {
        if self.sender.is_none()
            && let Some(open) = &mut self.open
        {
            match open() {
                Ok(s) => {
                    eprintln!("switchyard: nftables netlink socket open again");
                    self.said_unavailable = false;
                    self.sender = Some(s);
                }
                Err(e) if !self.said_unavailable => {
                    eprintln!("switchyard: nftables netlink socket unavailable ({e}): using nft -f");
                    self.said_unavailable = true;
                }
                Err(_) => {}
            }
        }
        self.sender.as_mut()
    }

    fn done(&mut self, path: Path) {
        if path == Path::Netlink && !self.announced {
            eprintln!("switchyard: nftables full programs and element-only transactions now go through netlink");
            self.announced = true;
        }
        self.last = Some(path);
        if let Some(f) = &mut self.on_apply {
            f(path);
        }
    }
}

/// The steps of a whole program's load over netlink, timed (for the benchmark and logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramPhases {
    /// Reading the program: the staging script, and the elements encoded.
    pub split: Duration,
    pub elements: usize,
    /// `nft -f` of the staging script.
    pub staging: Duration,
    /// The staging table's dumps, and the batch's messages made from them.
    pub read_back: Duration,
    /// Encoding, sending and the kernel's commit, up to its last ack.
    pub batch: Duration,
}

/// Why a whole program did not go over netlink (it then goes through `nft -f`).
#[derive(Debug, thiserror::Error)]
enum ProgramError {
    #[error("staging its declarations: {0}")]
    Staging(#[source] ApplyError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Assemble(#[from] program::AssembleError),
}

impl<A: NftApplier> Hybrid<A> {
    /// A full program over netlink ([`program`]); `None` when it is not one this module loads, or
    /// when no socket that reads the kernel is open.
    fn apply_program(&mut self, script: &str) -> Option<Result<(), ProgramError>> {
        if !self.sender().is_some_and(|s| s.can_dump()) {
            return None;
        }
        let t = Instant::now();
        let mut split = program::split(script, std::mem::take(&mut self.nests)).ok()?;
        let mut phases = ProgramPhases { split: t.elapsed(), elements: split.elements(), ..ProgramPhases::default() };
        let t = Instant::now();
        if let Err(e) = self.nft.apply(&split.staging) {
            return Some(Err(ProgramError::Staging(e)));
        }
        phases.staging = t.elapsed();
        let sender = self.sender.as_mut()?;
        let result = (|| {
            let t = Instant::now();
            let mut staged = program::Staged::default();
            for (msg, family, attrs, part) in program::dump_requests(&split) {
                staged.push(part, sender.dump(msg, family, &attrs)?);
            }
            let (before, after) = program::assemble(&split, &staged)?;
            let encoded = split.families.iter_mut().flat_map(|f| std::mem::take(&mut f.elements)).collect();
            phases.read_back = t.elapsed();
            let t = Instant::now();
            let nests = std::mem::take(&mut split.nests);
            let batch = Batch { before, encoded, nests, updates: Vec::new(), after };
            let sent = sender.send(&batch);
            // Kept for the next program (see `program::split`).
            split.nests = batch.nests;
            sent?;
            phases.batch = t.elapsed();
            Ok(())
        })();
        self.nests = std::mem::take(&mut split.nests);
        if result.is_err() {
            // The batch changed nothing (or its fate is unknown): the staging table must go.
            let _ = self.nft.apply(&split.cleanup_script());
        } else {
            self.last_program = Some(phases);
        }
        Some(result)
    }
}

impl<A: NftApplier> NftApplier for Hybrid<A> {
    fn apply(&mut self, script: &str) -> Result<(), ApplyError> {
        match self.apply_program(script) {
            Some(Ok(())) => {
                self.decls.learn(script);
                self.done(Path::Netlink);
                return Ok(());
            }
            Some(Err(e)) => {
                eprintln!("switchyard: full program over netlink failed ({e}); it goes through nft -f");
                if matches!(e, ProgramError::Netlink(NetlinkError::Io(_))) {
                    self.sender = None;
                }
            }
            None => {}
        }
        if let Ok(batch) = plan(script, &self.decls)
            && let Some(sender) = self.sender()
        {
            match sender.send(&batch) {
                Ok(()) => {
                    self.done(Path::Netlink);
                    return Ok(());
                }
                Err(e @ NetlinkError::Rejected { .. }) => return Err(ApplyError::Netlink(e)),
                Err(NetlinkError::TooLarge(_)) => {}
                Err(e) => {
                    // Whether it committed is unknown: nft runs the same transaction; if that
                    // fails too, the sync loop's full sync repairs whatever state is there.
                    eprintln!("switchyard: {e}; this transaction and the next go through nft -f");
                    self.sender = None;
                }
            }
        }
        self.nft.apply(script)?;
        self.decls.learn(script);
        self.done(Path::Nft);
        Ok(())
    }

    fn owned_families(&mut self) -> Result<Vec<String>, ApplyError> {
        self.nft.owned_families()
    }
}

/// Records batches instead of sending them; fails on demand.
#[derive(Debug, Default, Clone)]
pub struct RecordingSender {
    pub sent: std::sync::Arc<std::sync::Mutex<Vec<Batch>>>,
    pub fail: Option<fn() -> NetlinkError>,
}

impl BatchSender for RecordingSender {
    fn send(&mut self, batch: &Batch) -> Result<(), NetlinkError> {
        if let Some(f) = self.fail {
            return Err(f());
        }
        if let Ok(mut v) = self.sent.lock() {
            v.push(batch.clone());
        }
        Ok(())
    }
}

pub mod program;

#[cfg(test)]
mod tests;
