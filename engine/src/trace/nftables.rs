//! Executes nftables programs: parses the text (what `render` prints, an incremental transaction
//! after it, or what `nft list table|ruleset` prints back) into tables of sets, maps and chains,
//! and runs packets through the base chains of each hook.
//!
//! The parser understands the subset of nft syntax a service proxy uses, in both block and
//! command form; a rule with an expression it does not know is kept and treated as not matching,
//! so a real node's ruleset (foreign tables included) can still be traced.

use std::collections::{BTreeMap, HashMap};

use crate::fasthash::FastHash;
use crate::textfmt::{FastIp, FastNum};
use std::net::IpAddr;

use ipnet::IpNet;

use super::*;
use crate::model::Protocol;
use crate::render::nftables as model;

/// A problem in the program text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    LBrace,
    RBrace,
    Comma,
    Semi,
    Newline,
}

fn tokenize(text: &str) -> Vec<(Tok, usize)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let mut chars = line.char_indices().peekable();
        let bytes = line;
        while let Some(&(i, c)) = chars.peek() {
            match c {
                '#' => break,
                '"' => {
                    chars.next();
                    let start = i + 1;
                    let mut end = line.len();
                    for (j, d) in chars.by_ref() {
                        if d == '"' {
                            end = j;
                            break;
                        }
                    }
                    out.push((Tok::Str(bytes[start..end].to_string()), line_no));
                }
                '{' => {
                    chars.next();
                    out.push((Tok::LBrace, line_no));
                }
                '}' => {
                    chars.next();
                    out.push((Tok::RBrace, line_no));
                }
                ',' => {
                    chars.next();
                    out.push((Tok::Comma, line_no));
                }
                ';' => {
                    chars.next();
                    out.push((Tok::Semi, line_no));
                }
                c if c.is_whitespace() => {
                    chars.next();
                }
                _ => {
                    let start = i;
                    let mut end = line.len();
                    while let Some(&(j, d)) = chars.peek() {
                        if d.is_whitespace() || matches!(d, '{' | '}' | ',' | ';' | '"') {
                            end = j;
                            break;
                        }
                        chars.next();
                    }
                    out.push((Tok::Word(bytes[start..end].to_string()), line_no));
                }
            }
        }
        out.push((Tok::Newline, line_no));
    }
    out
}

/// Words of a token slice joined back with single spaces (braces and commas spaced as nft prints).
fn join(toks: &[(Tok, usize)]) -> String {
    let mut s = String::new();
    for (t, _) in toks {
        let piece = match t {
            Tok::Word(w) => w.clone(),
            Tok::Str(x) => format!("\"{x}\""),
            Tok::LBrace => "{".into(),
            Tok::RBrace => "}".into(),
            Tok::Comma => {
                s.push(',');
                continue;
            }
            Tok::Semi => ";".into(),
            Tok::Newline => continue,
        };
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&piece);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Statement-level parsing into the shared ruleset model

struct Cursor<'a> {
    toks: &'a [(Tok, usize)],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<&'a Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }
    fn line(&self) -> usize {
        self.toks.get(self.pos.min(self.toks.len().saturating_sub(1))).map(|(_, l)| *l).unwrap_or(0)
    }
    fn next(&mut self) -> Option<&'a Tok> {
        let t = self.toks.get(self.pos).map(|(t, _)| t);
        self.pos += 1;
        t
    }
    fn err(&self, m: impl Into<String>) -> ParseError {
        ParseError { line: self.line(), message: m.into() }
    }
    fn word(&mut self) -> Result<String, ParseError> {
        match self.next() {
            Some(Tok::Word(w)) => Ok(w.clone()),
            other => Err(self.err(format!("expected a word, found {other:?}"))),
        }
    }
    fn skip_newlines(&mut self) {
        while matches!(self.peek(), Some(Tok::Newline | Tok::Semi)) {
            self.pos += 1;
        }
    }
    /// Tokens up to the end of the statement (newline or `;` outside braces), not consuming it.
    fn statement(&mut self) -> &'a [(Tok, usize)] {
        let start = self.pos;
        let mut depth = 0usize;
        while let Some(t) = self.peek() {
            match t {
                Tok::LBrace => depth += 1,
                Tok::RBrace if depth == 0 => break,
                Tok::RBrace => depth -= 1,
                Tok::Newline | Tok::Semi if depth == 0 => break,
                _ => {}
            }
            self.pos += 1;
        }
        &self.toks[start..self.pos]
    }
    fn expect(&mut self, t: Tok) -> Result<(), ParseError> {
        match self.next() {
            Some(x) if *x == t => Ok(()),
            other => Err(self.err(format!("expected {t:?}, found {other:?}"))),
        }
    }
}

/// Parses program text into tables, applying commands in order (so a full program followed by
/// an incremental transaction yields the state after the transaction).
pub fn parse_ruleset(text: &str) -> Result<model::Ruleset, ParseError> {
    let toks = tokenize(text);
    let mut c = Cursor { toks: &toks, pos: 0 };
    let mut rs = model::Ruleset::new();
    loop {
        c.skip_newlines();
        let Some(t) = c.peek() else { break };
        let Tok::Word(w) = t else { return Err(c.err(format!("unexpected {t:?}"))) };
        let w = w.clone();
        c.pos += 1;
        match w.as_str() {
            "table" | "add" | "create" | "delete" | "destroy" | "flush" | "insert" => {
                let (verb, obj) =
                    if w == "table" { ("add".to_string(), "table".to_string()) } else { (w.clone(), c.word()?) };
                command(&mut c, &mut rs, &verb, &obj)?;
            }
            "list" => {
                c.statement();
            }
            other => return Err(c.err(format!("unknown command {other:?}"))),
        }
    }
    Ok(rs)
}

fn table_key(c: &mut Cursor) -> Result<(String, String), ParseError> {
    let a = c.word()?;
    if matches!(a.as_str(), "ip" | "ip6" | "inet" | "arp" | "bridge" | "netdev") {
        Ok((a, c.word()?))
    } else {
        Ok(("ip".into(), a))
    }
}

fn new_table(k: &(String, String)) -> model::Table {
    model::Table {
        family: k.0.clone(),
        name: k.1.clone(),
        comment: None,
        sets: BTreeMap::new(),
        chains: BTreeMap::new(),
    }
}

fn command(c: &mut Cursor, rs: &mut model::Ruleset, verb: &str, obj: &str) -> Result<(), ParseError> {
    match (verb, obj) {
        ("add" | "create", "table") => {
            let k = table_key(c)?;
            rs.entry(k.clone()).or_insert_with(|| new_table(&k));
            if c.peek() == Some(&Tok::LBrace) {
                c.pos += 1;
                table_body(c, rs, &k)?;
            }
        }
        ("delete" | "destroy", "table") => {
            let k = table_key(c)?;
            rs.remove(&k);
        }
        ("flush", "table") => {
            let k = table_key(c)?;
            if let Some(t) = rs.get_mut(&k) {
                for ch in t.chains.values_mut() {
                    ch.rules.clear();
                }
                for s in t.sets.values_mut() {
                    s.elements.clear();
                }
            }
        }
        ("add" | "create", "chain") => {
            let k = table_key(c)?;
            let name = c.word()?;
            let t = rs.entry(k.clone()).or_insert_with(|| new_table(&k));
            let ch = t.chains.entry(name.clone()).or_insert_with(|| model::Chain {
                name: name.clone(),
                base: None,
                rules: Vec::new(),
            });
            if c.peek() == Some(&Tok::LBrace) {
                c.pos += 1;
                chain_body(c, ch)?;
            }
        }
        ("delete" | "destroy", "chain") => {
            let k = table_key(c)?;
            let name = c.word()?;
            if let Some(t) = rs.get_mut(&k) {
                t.chains.remove(&name);
            }
        }
        ("flush", "chain") => {
            let k = table_key(c)?;
            let name = c.word()?;
            if let Some(ch) = rs.get_mut(&k).and_then(|t| t.chains.get_mut(&name)) {
                ch.rules.clear();
            }
        }
        ("add" | "insert", "rule") => {
            let k = table_key(c)?;
            let name = c.word()?;
            let stmt = c.statement();
            let text = join(stmt);
            let t = rs.get_mut(&k).ok_or_else(|| c.err(format!("no table {} {}", k.0, k.1)))?;
            let ch = t.chains.get_mut(&name).ok_or_else(|| c.err(format!("no chain {name}")))?;
            if verb == "insert" { ch.rules.insert(0, text) } else { ch.rules.push(text) }
        }
        ("add" | "create", "set" | "map") => {
            let k = table_key(c)?;
            let name = c.word()?;
            let t = rs.entry(k.clone()).or_insert_with(|| new_table(&k));
            let s = t.sets.entry(name.clone()).or_insert_with(|| empty_set(&name, obj == "map"));
            c.expect(Tok::LBrace)?;
            set_body(c, s)?;
        }
        ("delete" | "destroy", "set" | "map") => {
            let k = table_key(c)?;
            let name = c.word()?;
            if let Some(t) = rs.get_mut(&k) {
                t.sets.remove(&name);
            }
        }
        ("flush", "set" | "map") => {
            let k = table_key(c)?;
            let name = c.word()?;
            if let Some(s) = rs.get_mut(&k).and_then(|t| t.sets.get_mut(&name)) {
                s.elements.clear();
            }
        }
        ("add" | "create" | "delete" | "destroy", "element") => {
            let k = table_key(c)?;
            let name = c.word()?;
            c.expect(Tok::LBrace)?;
            let elems = elements(c)?;
            let s = rs
                .get_mut(&k)
                .and_then(|t| t.sets.get_mut(&name))
                .ok_or_else(|| c.err(format!("no set or map {name} in table {} {}", k.0, k.1)))?;
            for (key, e) in elems {
                if verb == "delete" || verb == "destroy" {
                    s.elements.remove(&key);
                } else {
                    s.elements.insert(key, e);
                }
            }
        }
        _ => {
            // Objects we do not model (counters, flowtables, ...): skip the statement.
            c.statement();
        }
    }
    Ok(())
}

fn empty_set(name: &str, map: bool) -> model::Set {
    model::Set {
        name: name.to_string(),
        map,
        key_type: String::new(),
        flags: Vec::new(),
        size: None,
        comment: None,
        elements: BTreeMap::new(),
    }
}

fn table_body(c: &mut Cursor, rs: &mut model::Ruleset, k: &(String, String)) -> Result<(), ParseError> {
    loop {
        c.skip_newlines();
        match c.next() {
            Some(Tok::RBrace) => return Ok(()),
            Some(Tok::Word(w)) => match w.as_str() {
                "comment" => {
                    if let Some(Tok::Str(s)) = c.next() {
                        rs.get_mut(k).expect("table exists").comment = Some(s.clone());
                    }
                }
                "chain" => {
                    let name = c.word()?;
                    c.expect(Tok::LBrace)?;
                    let t = rs.get_mut(k).expect("table exists");
                    let ch = t.chains.entry(name.clone()).or_insert_with(|| model::Chain {
                        name,
                        base: None,
                        rules: Vec::new(),
                    });
                    chain_body(c, ch)?;
                }
                "set" | "map" => {
                    let map = w == "map";
                    let name = c.word()?;
                    c.expect(Tok::LBrace)?;
                    let t = rs.get_mut(k).expect("table exists");
                    let s = t.sets.entry(name.clone()).or_insert_with(|| empty_set(&name, map));
                    set_body(c, s)?;
                }
                _ => {
                    // flags, counters, flowtables...: skip the statement (and any block).
                    c.statement();
                }
            },
            None => return Err(c.err("unexpected end of input inside a table")),
            Some(t) => return Err(c.err(format!("unexpected {t:?} in a table"))),
        }
    }
}

/// Named priorities as nft prints them.
fn priority(words: &[String]) -> Option<i32> {
    let base = |w: &str| -> Option<i32> {
        Some(match w {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => -100,
            "filter" => 0,
            "security" => 50,
            "srcnat" => 100,
            n => n.parse().ok()?,
        })
    };
    match words {
        [a] => base(a),
        [a, op, b] => {
            let (a, b) = (base(a)?, b.parse::<i32>().ok()?);
            match op.as_str() {
                "+" => Some(a + b),
                "-" => Some(a - b),
                _ => None,
            }
        }
        _ => None,
    }
}

fn chain_body(c: &mut Cursor, ch: &mut model::Chain) -> Result<(), ParseError> {
    loop {
        c.skip_newlines();
        if c.peek() == Some(&Tok::RBrace) {
            c.pos += 1;
            return Ok(());
        }
        if c.peek().is_none() {
            return Err(c.err("unexpected end of input inside a chain"));
        }
        let line = c.line();
        let stmt = c.statement();
        let words: Vec<String> =
            stmt.iter().filter_map(|(t, _)| if let Tok::Word(w) = t { Some(w.clone()) } else { None }).collect();
        match words.first().map(String::as_str) {
            Some("type") => {
                // type KIND hook HOOK [device X] priority P
                let kind = words.get(1).cloned().unwrap_or_default();
                let hook = words.get(3).cloned().unwrap_or_default();
                let p = words.iter().position(|w| w == "priority").map(|i| &words[i + 1..]).unwrap_or(&[]);
                let prio = priority(p).ok_or_else(|| ParseError { line, message: format!("bad priority {p:?}") })?;
                ch.base = Some(model::BaseChain { kind, hook, priority: prio });
            }
            Some("policy") | Some("comment") | Some("devices") => {}
            _ => ch.rules.push(join(stmt)),
        }
    }
}

fn set_body(c: &mut Cursor, s: &mut model::Set) -> Result<(), ParseError> {
    loop {
        c.skip_newlines();
        match c.peek() {
            Some(Tok::RBrace) => {
                c.pos += 1;
                return Ok(());
            }
            None => return Err(c.err("unexpected end of input inside a set")),
            _ => {}
        }
        let w = c.word()?;
        match w.as_str() {
            "type" | "typeof" => {
                let stmt = c.statement();
                s.key_type = format!("{w} {}", join(stmt));
            }
            "flags" => {
                let stmt = c.statement();
                s.flags = stmt
                    .iter()
                    .filter_map(|(t, _)| if let Tok::Word(w) = t { Some(w.clone()) } else { None })
                    .collect();
            }
            "comment" => {
                if let Some(Tok::Str(x)) = c.next() {
                    s.comment = Some(x.clone());
                }
            }
            "size" => {
                let n = c.word()?;
                s.size = Some(n.parse().map_err(|_| c.err(format!("bad set size {n:?}")))?);
            }
            "elements" => {
                match c.next() {
                    Some(Tok::Word(eq)) if eq == "=" => {}
                    other => return Err(c.err(format!("expected `=`, found {other:?}"))),
                }
                c.expect(Tok::LBrace)?;
                for (k, e) in elements(c)? {
                    s.elements.insert(k, e);
                }
            }
            _ => {
                c.statement();
            }
        }
    }
}

/// Elements up to the closing brace: `key [comment "c"] [: value]`, comma separated.
fn elements(c: &mut Cursor) -> Result<Vec<(String, model::Element)>, ParseError> {
    let mut out = Vec::new();
    let mut key: Vec<String> = Vec::new();
    let mut value: Vec<String> = Vec::new();
    let mut comment = None;
    let mut in_value = false;
    let mut skip_next = false;
    let flush = |key: &mut Vec<String>,
                 value: &mut Vec<String>,
                 comment: &mut Option<String>,
                 in_value: &mut bool,
                 out: &mut Vec<(String, model::Element)>| {
        if !key.is_empty() {
            let k = normalize_key(&key.join(" "));
            let v = (!value.is_empty()).then(|| value.join(" "));
            out.push((k, model::Element { value: v, comment: comment.take() }));
        }
        key.clear();
        value.clear();
        *in_value = false;
    };
    loop {
        match c.next() {
            Some(Tok::RBrace) => {
                flush(&mut key, &mut value, &mut comment, &mut in_value, &mut out);
                return Ok(out);
            }
            Some(Tok::Comma) => flush(&mut key, &mut value, &mut comment, &mut in_value, &mut out),
            Some(Tok::Newline) => {}
            Some(Tok::Str(s)) => comment = Some(s.clone()),
            Some(Tok::Word(w)) => {
                if skip_next {
                    skip_next = false;
                    continue;
                }
                match w.as_str() {
                    "comment" => {}
                    ":" => in_value = true,
                    "timeout" | "expires" | "counter" => skip_next = w != "counter",
                    "packets" | "bytes" => skip_next = true,
                    _ if in_value => value.push(w.clone()),
                    _ => key.push(w.clone()),
                }
            }
            None => return Err(c.err("unexpected end of input inside elements")),
            Some(t) => return Err(c.err(format!("unexpected {t:?} in elements"))),
        }
    }
}

/// One canonical spelling per key, so lookups built from packets match what nft printed.
fn normalize_key(k: &str) -> String {
    k.split(" . ").map(|p| normalize_atom(p.trim())).collect::<Vec<_>>().join(" . ")
}

fn normalize_atom(a: &str) -> String {
    if let Ok(ip) = a.parse::<IpAddr>() {
        return ip.to_string();
    }
    if let Ok(n) = a.parse::<IpNet>() {
        return n.trunc().to_string();
    }
    a.to_string()
}

// ---------------------------------------------------------------------------------------------
// Rules

#[derive(Debug, Clone, PartialEq)]
enum Field {
    Saddr,
    Daddr,
    L4proto,
    /// `th dport`, or `tcp dport` (which also requires that protocol).
    Dport(Option<Protocol>),
    Sport(Option<Protocol>),
    Numgen(u32),
    CtOrigDaddr,
    CtOrigProtoDst,
    Mark,
}

#[derive(Debug, Clone, PartialEq)]
enum Rhs {
    Set(String),
    /// Values (or concatenations of values), each already split into atoms.
    Values(Vec<Vec<Atom>>),
}

/// The parts of a concatenated key (`a . b . c`), split without building a string searcher:
/// the tracer splits keys on every lookup in an interval set.
struct KeyParts<'k>(Option<&'k str>);

impl<'k> Iterator for KeyParts<'k> {
    type Item = &'k str;
    fn next(&mut self) -> Option<&'k str> {
        let rest = self.0?;
        let b = rest.as_bytes();
        let mut i = 0;
        while i + 2 < b.len() {
            if b[i] == b' ' && b[i + 1] == b'.' && b[i + 2] == b' ' {
                self.0 = Some(&rest[i + 3..]);
                return Some(&rest[..i]);
            }
            i += 1;
        }
        self.0 = None;
        Some(rest)
    }
}

/// One part of a set element or a literal, parsed once when the program is loaded.
#[derive(Debug, Clone, PartialEq)]
enum Atom {
    Net(IpNet),
    Range(IpAddr, IpAddr),
    Proto(Protocol),
    Text(String),
}

impl Atom {
    fn parse(a: &str) -> Atom {
        if let Ok(n) = a.parse::<IpNet>() {
            return Atom::Net(n);
        }
        if let Ok(ip) = a.parse::<IpAddr>() {
            return Atom::Net(IpNet::from(ip));
        }
        if let Some((x, y)) = a.split_once('-')
            && let (Ok(x), Ok(y)) = (x.parse::<IpAddr>(), y.parse::<IpAddr>())
        {
            return Atom::Range(x, y);
        }
        if let Some(p) = Protocol::parse(a) {
            return Atom::Proto(p);
        }
        Atom::Text(a.to_string())
    }

    fn split(key: &str) -> Vec<Atom> {
        key.split(" . ").map(|p| Atom::parse(p.trim())).collect()
    }

    /// Whether a key part (as the tracer writes it) falls in this atom.
    fn matches(&self, v: &str) -> bool {
        match self {
            Atom::Net(n) => v.parse::<IpAddr>().is_ok_and(|ip| n.contains(&ip)),
            Atom::Range(a, b) => v.parse::<IpAddr>().is_ok_and(|ip| *a <= ip && ip <= *b),
            Atom::Proto(p) => Protocol::parse(v) == Some(*p),
            Atom::Text(t) => t == v,
        }
    }

    fn all_match(atoms: &[Atom], key: &str) -> bool {
        let mut parts = KeyParts(Some(key));
        atoms.iter().all(|a| parts.next().is_some_and(|v| a.matches(v))) && parts.next().is_none()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum MapRef {
    Named(String),
    Inline(Vec<(String, String)>),
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Cmp {
        fields: Vec<Field>,
        neg: bool,
        rhs: Rhs,
    },
    Fib {
        daddr: bool,
        neg: bool,
    },
    CtState(Vec<String>),
    CtStatus(Vec<String>),
    MarkMask {
        mask: u32,
        value: u32,
        neg: bool,
    },
    Vmap {
        fields: Vec<Field>,
        map: MapRef,
    },
    Dnat {
        fields: Vec<Field>,
        map: Option<MapRef>,
        fixed: Option<String>,
    },
    MarkSet {
        op: char,
        value: u32,
    },
    Masquerade,
    Verdict(String, Option<String>),
    /// Statements with no effect on a first packet's path (counters, logging, `update`).
    Nop,
    Unknown(String),
}

#[derive(Debug, Clone)]
struct Rule {
    text: String,
    comment: Option<String>,
    exprs: Vec<Expr>,
}

fn parse_u32(s: &str) -> Option<u32> {
    if let Some(h) = s.strip_prefix("0x") { u32::from_str_radix(h, 16).ok() } else { s.parse().ok() }
}

fn parse_rule(text: &str) -> Rule {
    let toks = tokenize(text);
    let words: Vec<Tok> = toks.into_iter().map(|(t, _)| t).filter(|t| *t != Tok::Newline).collect();
    let mut p = RuleParser { t: &words, i: 0 };
    let mut exprs = Vec::new();
    let mut comment = None;
    while p.i < p.t.len() {
        let start = p.i;
        match p.expr() {
            Some(Expr::Verdict(v, _)) if v == "comment" => {
                if let Some(Tok::Str(s)) = p.t.get(p.i) {
                    comment = Some(s.clone());
                    p.i += 1;
                }
            }
            Some(e) => exprs.push(e),
            None => {
                exprs.push(Expr::Unknown(text.to_string()));
                break;
            }
        }
        if p.i == start {
            p.i += 1;
        }
    }
    Rule { text: text.to_string(), comment, exprs }
}

struct RuleParser<'a> {
    t: &'a [Tok],
    i: usize,
}

impl RuleParser<'_> {
    fn peek_word(&self, off: usize) -> Option<&str> {
        match self.t.get(self.i + off) {
            Some(Tok::Word(w)) => Some(w.as_str()),
            _ => None,
        }
    }
    fn take(&mut self) -> Option<String> {
        let w = self.peek_word(0).map(str::to_string);
        if w.is_some() {
            self.i += 1;
        }
        w
    }

    /// One field of a (possibly concatenated) key.
    fn field(&mut self) -> Option<Field> {
        let a = self.peek_word(0)?;
        let b = self.peek_word(1).unwrap_or("");
        let (f, n) = match (a, b) {
            ("ip" | "ip6", "saddr") => (Field::Saddr, 2),
            ("ip" | "ip6", "daddr") => (Field::Daddr, 2),
            ("meta", "l4proto") => (Field::L4proto, 2),
            ("meta", "mark") => (Field::Mark, 2),
            ("th", "dport") => (Field::Dport(None), 2),
            ("th", "sport") => (Field::Sport(None), 2),
            (p @ ("tcp" | "udp" | "sctp"), "dport") => (Field::Dport(Protocol::parse(p)), 2),
            (p @ ("tcp" | "udp" | "sctp"), "sport") => (Field::Sport(Protocol::parse(p)), 2),
            ("numgen", "random") => {
                // numgen random mod N
                let n = self.peek_word(3)?.parse().ok()?;
                self.i += 4;
                return Some(Field::Numgen(n));
            }
            ("ct", "original") => match (self.peek_word(2)?, self.peek_word(3).unwrap_or("")) {
                ("ip" | "ip6", "daddr") => {
                    self.i += 4;
                    return Some(Field::CtOrigDaddr);
                }
                ("proto-dst", _) => {
                    self.i += 3;
                    return Some(Field::CtOrigProtoDst);
                }
                _ => return None,
            },
            _ => return None,
        };
        self.i += n;
        Some(f)
    }

    fn fields(&mut self) -> Option<Vec<Field>> {
        let mut v = vec![self.field()?];
        while self.peek_word(0) == Some(".") {
            self.i += 1;
            v.push(self.field()?);
        }
        Some(v)
    }

    /// `{ a, b }` or `{ k : v, ... }`.
    fn braces(&mut self) -> Option<Vec<(String, Option<String>)>> {
        if self.t.get(self.i) != Some(&Tok::LBrace) {
            return None;
        }
        self.i += 1;
        let mut out = Vec::new();
        let (mut k, mut v, mut in_v) = (Vec::new(), Vec::new(), false);
        loop {
            match self.t.get(self.i)? {
                Tok::RBrace | Tok::Comma => {
                    if !k.is_empty() {
                        out.push((normalize_key(&k.join(" ")), (!v.is_empty()).then(|| v.join(" "))));
                    }
                    k.clear();
                    v.clear();
                    in_v = false;
                    let end = self.t[self.i] == Tok::RBrace;
                    self.i += 1;
                    if end {
                        return Some(out);
                    }
                }
                Tok::Word(w) if w == ":" => {
                    in_v = true;
                    self.i += 1;
                }
                Tok::Word(w) => {
                    if in_v {
                        v.push(w.clone())
                    } else {
                        k.push(w.clone())
                    }
                    self.i += 1;
                }
                _ => self.i += 1,
            }
        }
    }

    fn map_ref(&mut self) -> Option<MapRef> {
        if let Some(name) = self.peek_word(0).and_then(|w| w.strip_prefix('@')).map(str::to_string) {
            self.i += 1;
            return Some(MapRef::Named(name));
        }
        let b = self.braces()?;
        Some(MapRef::Inline(b.into_iter().map(|(k, v)| (k, v.unwrap_or_default())).collect()))
    }

    fn expr(&mut self) -> Option<Expr> {
        let w = self.peek_word(0)?.to_string();
        match w.as_str() {
            "jump" | "goto" => {
                self.i += 1;
                let target = self.take()?;
                Some(Expr::Verdict(w, Some(target)))
            }
            "accept" | "drop" | "return" | "continue" => {
                self.i += 1;
                Some(Expr::Verdict(w, None))
            }
            "reject" => {
                self.i += 1;
                // reject [with icmp type X | tcp reset]
                if self.peek_word(0) == Some("with") {
                    self.i += 1;
                    while let Some(x) = self.peek_word(0) {
                        if matches!(x, "comment" | "counter") {
                            break;
                        }
                        self.i += 1;
                    }
                }
                Some(Expr::Verdict("reject".into(), None))
            }
            "comment" => {
                self.i += 1;
                Some(Expr::Verdict("comment".into(), None))
            }
            "counter" => {
                self.i += 1;
                while matches!(self.peek_word(0), Some("packets" | "bytes")) {
                    self.i += 2;
                }
                Some(Expr::Nop)
            }
            "log" => {
                self.i += 1;
                while matches!(self.peek_word(0), Some("prefix" | "level" | "flags")) {
                    self.i += 1;
                    if self.t.get(self.i).is_some() {
                        self.i += 1;
                    }
                }
                Some(Expr::Nop)
            }
            "update" | "add" => {
                self.i += 1;
                self.take()?;
                self.braces()?;
                Some(Expr::Nop)
            }
            "masquerade" | "snat" => {
                self.i += 1;
                if w == "snat" {
                    // snat [ip] to ADDR
                    while let Some(x) = self.peek_word(0) {
                        if matches!(x, "comment" | "counter") {
                            break;
                        }
                        self.i += 1;
                    }
                }
                while matches!(self.peek_word(0), Some("fully-random" | "random" | "persistent")) {
                    self.i += 1;
                }
                Some(Expr::Masquerade)
            }
            "dnat" => {
                self.i += 1;
                if matches!(self.peek_word(0), Some("ip" | "ip6")) {
                    self.i += 1;
                }
                if self.peek_word(0) != Some("to") {
                    return None;
                }
                self.i += 1;
                let save = self.i;
                if let Some(fields) = self.fields()
                    && self.peek_word(0) == Some("map")
                {
                    self.i += 1;
                    let m = self.map_ref()?;
                    return Some(Expr::Dnat { fields, map: Some(m), fixed: None });
                }
                self.i = save;
                let fixed = self.take()?;
                Some(Expr::Dnat { fields: Vec::new(), map: None, fixed: Some(fixed) })
            }
            "fib" => {
                // fib saddr|daddr [. iif] type [!=] local
                let daddr = self.peek_word(1)? == "daddr";
                self.i += 2;
                if self.peek_word(0) != Some("type") {
                    return None;
                }
                self.i += 1;
                let neg = self.peek_word(0) == Some("!=");
                if neg {
                    self.i += 1;
                }
                let v = self.take()?;
                if v != "local" {
                    return None;
                }
                Some(Expr::Fib { daddr, neg })
            }
            "ct" if matches!(self.peek_word(1), Some("state" | "status")) => {
                let state = self.peek_word(1) == Some("state");
                self.i += 2;
                let mut vals = Vec::new();
                if let Some(b) = self.braces() {
                    vals.extend(b.into_iter().map(|(k, _)| k));
                } else {
                    let v = self.take()?;
                    vals.extend(v.split(',').map(str::to_string));
                }
                Some(if state { Expr::CtState(vals) } else { Expr::CtStatus(vals) })
            }
            "meta" if self.peek_word(1) == Some("mark") && self.peek_word(2) == Some("set") => {
                self.i += 3;
                // meta mark set meta mark | X   /   ^ X   /   set X
                if self.peek_word(0) == Some("meta") && self.peek_word(1) == Some("mark") {
                    self.i += 2;
                    let op = self.take()?.chars().next()?;
                    let value = parse_u32(&self.take()?)?;
                    Some(Expr::MarkSet { op, value })
                } else {
                    let value = parse_u32(&self.take()?)?;
                    Some(Expr::MarkSet { op: '=', value })
                }
            }
            "meta" if self.peek_word(1) == Some("mark") && self.peek_word(2) == Some("&") => {
                // meta mark & M == V  /  != V
                self.i += 3;
                let mask = parse_u32(&self.take()?)?;
                let op = self.take()?;
                let value = parse_u32(&self.take()?)?;
                Some(Expr::MarkMask { mask, value, neg: op == "!=" })
            }
            _ => {
                let fields = self.fields()?;
                match self.peek_word(0) {
                    Some("vmap") => {
                        self.i += 1;
                        Some(Expr::Vmap { fields, map: self.map_ref()? })
                    }
                    Some(op @ ("!=" | "==")) => {
                        let neg = op == "!=";
                        self.i += 1;
                        Some(Expr::Cmp { fields, neg, rhs: self.rhs()? })
                    }
                    _ => Some(Expr::Cmp { fields, neg: false, rhs: self.rhs()? }),
                }
            }
        }
    }

    fn rhs(&mut self) -> Option<Rhs> {
        if let Some(name) = self.peek_word(0).and_then(|w| w.strip_prefix('@')).map(str::to_string) {
            self.i += 1;
            return Some(Rhs::Set(name));
        }
        if let Some(b) = self.braces() {
            return Some(Rhs::Values(b.into_iter().map(|(k, _)| Atom::split(&k)).collect()));
        }
        // A single value, possibly a concatenation `a . b`.
        let mut parts = vec![self.take()?];
        while self.peek_word(0) == Some(".") {
            self.i += 1;
            parts.push(self.take()?);
        }
        Some(Rhs::Values(vec![Atom::split(&normalize_key(&parts.join(" . ")))]))
    }
}

// ---------------------------------------------------------------------------------------------
// The executable program

struct SetP {
    /// Exact elements by canonical key.
    exact: HashMap<String, (Option<String>, Option<String>), FastHash>,
    /// Elements with ranges, scanned.
    ranges: Vec<(Vec<Atom>, Option<String>, Option<String>)>,
}

struct ChainP {
    base: Option<model::BaseChain>,
    rules: Vec<Rule>,
}

struct TableP {
    family: String,
    name: String,
    sets: HashMap<String, SetP, FastHash>,
    chains: HashMap<String, ChainP, FastHash>,
}

/// A base chain to run: (table index, chain name).
type BaseChainRef = (usize, String);

/// A parsed nftables program, ready to run packets through.
pub struct Program {
    tables: Vec<TableP>,
    /// For each (packet family, hook): the base chains to run, in priority order, as
    /// (table index, chain name).
    hooks: Vec<((&'static str, Hook), Vec<BaseChainRef>)>,
}

impl Program {
    pub fn parse(text: &str) -> Result<Program, ParseError> {
        Ok(Self::from_ruleset(&parse_ruleset(text)?))
    }

    pub fn from_ruleset(rs: &model::Ruleset) -> Program {
        let tables = rs
            .values()
            .map(|t| TableP {
                family: t.family.clone(),
                name: t.name.clone(),
                sets: t
                    .sets
                    .values()
                    .map(|s| {
                        let interval = s.flags.iter().any(|f| f == "interval");
                        let mut p = SetP {
                            exact: HashMap::with_capacity_and_hasher(s.elements.len(), FastHash),
                            ranges: Vec::new(),
                        };
                        for (k, e) in &s.elements {
                            if interval || k.contains('/') || k.contains('-') {
                                p.ranges.push((Atom::split(k), e.value.clone(), e.comment.clone()));
                            } else {
                                p.exact.insert(k.clone(), (e.value.clone(), e.comment.clone()));
                            }
                        }
                        (s.name.clone(), p)
                    })
                    .collect(),
                chains: t
                    .chains
                    .values()
                    .map(|c| {
                        (
                            c.name.clone(),
                            ChainP { base: c.base.clone(), rules: c.rules.iter().map(|r| parse_rule(r)).collect() },
                        )
                    })
                    .collect(),
            })
            .collect::<Vec<TableP>>();
        let mut hooks = Vec::new();
        for fam in ["ip", "ip6"] {
            for hook in [Hook::Prerouting, Hook::Input, Hook::Forward, Hook::Output, Hook::Postrouting] {
                let mut chains: Vec<(i32, usize, String)> = Vec::new();
                for (i, t) in tables.iter().enumerate().filter(|(_, t)| t.family == fam || t.family == "inet") {
                    for (name, c) in &t.chains {
                        if let Some(b) = &c.base
                            && b.hook == hook.as_str()
                            && matches!(b.kind.as_str(), "filter" | "nat")
                        {
                            chains.push((b.priority, i, name.clone()));
                        }
                    }
                }
                chains.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
                hooks.push(((fam, hook), chains.into_iter().map(|(_, i, n)| (i, n)).collect()));
            }
        }
        Program { tables, hooks }
    }
}

/// How a rule (or chain) ended for one branch.
#[derive(Debug, Clone, PartialEq)]
enum Flow<'a> {
    Next,
    NoMatch,
    Jump(&'a str),
    Goto(&'a str),
    Return,
    Final(HookVerdict),
}

impl SetP {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.ranges.is_empty()
    }

    /// The element for `key`: its value and comment, borrowed.
    fn lookup(&self, key: &str) -> Option<(Option<&str>, Option<&str>)> {
        if let Some((v, c)) = self.exact.get(key) {
            return Some((v.as_deref(), c.as_deref()));
        }
        if self.ranges.is_empty() {
            return None;
        }
        self.ranges.iter().find(|(k, ..)| Atom::all_match(k, key)).map(|(_, v, c)| (v.as_deref(), c.as_deref()))
    }
}

struct Exec<'a> {
    table: &'a TableP,
    ctx: &'a NodeContext,
    /// Where hops happen: the hook and the base chain's type (`prerouting nat`).
    at: String,
}

/// The values a key takes for one packet: usually one; `numgen random mod N` forks N ways.
fn key_values(fields: &[Field], s: &PacketState) -> Option<Vec<(String, f64)>> {
    use std::fmt::Write as _;
    // The common case has no `numgen`: one key, built in one buffer.
    let forks = fields.iter().find_map(|f| if let Field::Numgen(n) = f { Some(*n) } else { None }).unwrap_or(1);
    let mut keys = Vec::with_capacity(forks as usize);
    for k in 0..forks {
        let mut key = String::with_capacity(48);
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                key.push_str(" . ");
            }
            let _ = match f {
                Field::Saddr => write!(key, "{}", FastIp(s.packet.src)),
                Field::Daddr => write!(key, "{}", FastIp(s.packet.dst)),
                Field::L4proto => {
                    key.push_str(s.packet.protocol.as_str());
                    Ok(())
                }
                Field::Dport(p) | Field::Sport(p) => {
                    if p.is_some_and(|p| p != s.packet.protocol) {
                        return None;
                    }
                    let port = if matches!(f, Field::Dport(_)) { s.packet.dst_port } else { s.packet.src_port };
                    write!(key, "{}", FastNum(u32::from(port)))
                }
                Field::Numgen(_) => write!(key, "{}", FastNum(k)),
                Field::CtOrigDaddr => write!(key, "{}", FastIp(s.original.dst)),
                Field::CtOrigProtoDst => write!(key, "{}", FastNum(u32::from(s.original.dst_port))),
                Field::Mark => write!(key, "0x{:08x}", s.mark),
            };
        }
        keys.push((key, 1.0 / f64::from(forks)));
    }
    Some(keys)
}

/// A branch's state, boxed: states move through every rule and chain, and a pointer moves
/// cheaper than 150 bytes.
type St = Box<PacketState>;

impl<'a> Exec<'a> {
    /// The value and comment a map holds for `key`, and the map's name for hops.
    fn lookup(&self, map: &'a MapRef, key: &str) -> Option<(&'a str, Option<&'a str>, &'a str)> {
        match map {
            MapRef::Named(name) => {
                let set = self.table.sets.get(name)?;
                let (v, c) = set.lookup(key)?;
                Some((v.unwrap_or(""), c, name.as_str()))
            }
            MapRef::Inline(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| (v.as_str(), None, "anonymous")),
        }
    }

    fn hop(&self, s: &mut PacketState, chain: &str, rule: &Rule, action: String, comment: Option<String>) {
        if !s.record {
            return;
        }
        let at = self.at.clone();
        s.hops.push(Hop {
            node: Some(self.ctx.node.clone()),
            ..Hop::new(at, action)
                .chain(chain)
                .rule(rule.text.clone())
                .comment(comment.or_else(|| rule.comment.clone()))
        });
    }

    /// Runs one rule from expression `start`: every expression in order; a non-match stops it.
    /// One state goes through without allocating until an expression forks it.
    fn rule(&self, chain: &str, rule: &'a Rule, start: usize, mut s: St, out: &mut Vec<(St, Flow<'a>)>) {
        for (idx, e) in rule.exprs.iter().enumerate().skip(start) {
            match self.expr(chain, rule, e, &mut s) {
                ExprResult::Match => {}
                ExprResult::NoMatch => return out.push((s, Flow::NoMatch)),
                ExprResult::Ends(f) => return out.push((s, f)),
                ExprResult::Fork(branches) => {
                    for (b, f) in branches {
                        match f {
                            Some(f) => out.push((b, f)),
                            None => self.rule(chain, rule, idx + 1, b, out),
                        }
                    }
                    return;
                }
            }
        }
        out.push((s, Flow::Next));
    }

    fn expr(&self, chain: &str, rule: &'a Rule, e: &'a Expr, s: &mut PacketState) -> ExprResult<'a> {
        use ExprResult::*;
        match e {
            Expr::Cmp { fields, neg, rhs } => {
                if let Rhs::Set(name) = rhs
                    && self.table.sets.get(name).is_none_or(SetP::is_empty)
                {
                    return if *neg { Match } else { NoMatch };
                }
                let Some(keys) = key_values(fields, s) else { return NoMatch };
                let key = &keys[0].0;
                let found = match rhs {
                    Rhs::Set(name) => self.table.sets.get(name).is_some_and(|set| set.lookup(key).is_some()),
                    Rhs::Values(vals) => vals.iter().any(|atoms| Atom::all_match(atoms, key)),
                };
                if found != *neg { Match } else { NoMatch }
            }
            Expr::Fib { daddr, neg } => {
                let ip = if *daddr { s.packet.dst } else { s.packet.src };
                if self.ctx.is_local(&ip) != *neg { Match } else { NoMatch }
            }
            Expr::CtState(v) => {
                if v.iter().any(|x| x == "new") {
                    Match
                } else {
                    NoMatch
                }
            }
            Expr::CtStatus(v) => {
                let dnat = s.dnat.is_some();
                if v.iter().all(|x| x == "dnat") && dnat { Match } else { NoMatch }
            }
            Expr::MarkMask { mask, value, neg } => {
                if ((s.mark & mask) == *value) != *neg {
                    Match
                } else {
                    NoMatch
                }
            }
            Expr::MarkSet { op, value } => {
                match op {
                    '|' => s.mark |= value,
                    '^' => s.mark ^= value,
                    '&' => s.mark &= value,
                    _ => s.mark = *value,
                }
                if *op != '^' {
                    self.hop(s, chain, rule, "mark for masquerade".into(), None);
                }
                Match
            }
            Expr::Masquerade => {
                s.masquerade = true;
                self.hop(s, chain, rule, "masquerade: source becomes this node's address".into(), None);
                Ends(Flow::Final(HookVerdict::Continue))
            }
            Expr::Verdict(v, target) => match (v.as_str(), target) {
                ("jump", Some(t)) => Ends(Flow::Jump(t.as_str())),
                ("goto", Some(t)) => Ends(Flow::Goto(t.as_str())),
                ("return", _) => Ends(Flow::Return),
                ("accept", _) => {
                    s.accepted = true;
                    self.hop(s, chain, rule, "accept".into(), None);
                    Ends(Flow::Final(HookVerdict::Accept))
                }
                ("drop", _) => {
                    self.hop(s, chain, rule, "drop".into(), None);
                    Ends(Flow::Final(HookVerdict::Drop))
                }
                ("reject", _) => {
                    self.hop(s, chain, rule, "reject".into(), None);
                    Ends(Flow::Final(HookVerdict::Reject))
                }
                _ => Match,
            },
            Expr::Vmap { fields, map } => {
                // Most maps of a program are empty for most packets' keys; an empty one cannot match.
                if let MapRef::Named(name) = map
                    && self.table.sets.get(name).is_none_or(SetP::is_empty)
                {
                    return NoMatch;
                }
                let Some(keys) = key_values(fields, s) else { return NoMatch };
                let keep = if keys.len() > 1 { s.pick(&keys.iter().map(|k| k.1).collect::<Vec<_>>()) } else { None };
                let mut out = Vec::new();
                for (i, (key, w)) in keys.into_iter().enumerate() {
                    let mut b = Box::new(s.clone());
                    b.probability *= w;
                    b.record &= keep.is_none_or(|k| k == i);
                    match self.lookup(map, &key) {
                        None => out.push((b, Some(Flow::NoMatch))),
                        Some((verdict, comment, name)) => {
                            let flow = verdict_flow(verdict);
                            if let Some(Flow::Final(HookVerdict::Drop)) | Some(Flow::Final(HookVerdict::Reject)) = &flow
                            {
                                // reported by the hop below
                            }
                            if b.record {
                                let comment = comment.map(str::to_string);
                                self.hop(&mut b, chain, rule, format!("@{name}: {key} → {verdict}"), comment);
                            }
                            if matches!(flow, Some(Flow::Final(HookVerdict::Accept))) {
                                b.accepted = true;
                            }
                            out.push((b, flow));
                        }
                    }
                }
                Fork(out)
            }
            Expr::Dnat { fields, map, fixed } => {
                let mut out = Vec::new();
                // (target, weight, comment, the map and key that chose it)
                type Target<'m> = (&'m str, f64, Option<&'m str>, Option<(&'m str, String)>);
                let targets: Vec<Target> = if let Some(f) = fixed {
                    vec![(f.as_str(), 1.0, None, None)]
                } else {
                    let Some(keys) = key_values(fields, s) else { return NoMatch };
                    let Some(map) = map else { return NoMatch };
                    keys.into_iter()
                        .map(|(k, w)| match self.lookup(map, &k) {
                            Some((v, c, name)) => (v, w, c, Some((name, k))),
                            None => ("", w, None, None),
                        })
                        .collect()
                };
                let keep =
                    if targets.len() > 1 { s.pick(&targets.iter().map(|t| t.1).collect::<Vec<_>>()) } else { None };
                for (i, (target, w, comment, via)) in targets.into_iter().enumerate() {
                    let mut b = Box::new(s.clone());
                    b.probability *= w;
                    b.record &= keep.is_none_or(|k| k == i);
                    match parse_target(target, s.packet.dst_port) {
                        Some(ep) => {
                            b.packet.dst = ep.ip;
                            b.packet.dst_port = ep.port;
                            b.dnat = Some(ep);
                            if b.record {
                                let action = match via {
                                    Some((name, k)) => format!("@{name}: {k} → dnat to {ep}"),
                                    None => format!("dnat to {ep}"),
                                };
                                self.hop(&mut b, chain, rule, action, comment.map(str::to_string));
                            }
                            out.push((b, Some(Flow::Final(HookVerdict::Continue))));
                        }
                        // A lookup miss: the statement does nothing and the rule ends.
                        None => out.push((b, Some(Flow::NoMatch))),
                    }
                }
                Fork(out)
            }
            Expr::Nop => Match,
            Expr::Unknown(_) => NoMatch,
        }
    }

    /// Runs chain `name` over one state; every way it can end is pushed to `out`.
    fn chain(&self, name: &str, s: St, depth: usize, out: &mut Vec<(St, Flow<'a>)>) {
        match self.table.chains.get(name) {
            Some(ch) if depth <= 32 => self.chain_from(name, ch, 0, s, depth, out),
            _ => out.push((s, Flow::Return)),
        }
    }

    /// Runs a chain from rule `i`. One state walks the rules in a loop; only a fork (a
    /// load-balancing choice) or a jump that forks recurses.
    fn chain_from(
        &self,
        name: &str,
        ch: &'a ChainP,
        mut i: usize,
        mut s: St,
        depth: usize,
        out: &mut Vec<(St, Flow<'a>)>,
    ) {
        let mut results: Vec<(St, Flow<'a>)> = Vec::new();
        loop {
            let Some(rule) = ch.rules.get(i) else { return out.push((s, Flow::Return)) };
            self.rule(name, rule, 0, s, &mut results);
            if results.len() == 1
                && matches!(results[0].1, Flow::Next | Flow::NoMatch)
                && let Some((next, _)) = results.pop()
            {
                s = next;
                i += 1;
                continue;
            }
            for (st, flow) in std::mem::take(&mut results) {
                self.follow(name, ch, rule, i, st, flow, depth, out);
            }
            return;
        }
    }

    /// Where one branch goes after rule `i` ended with `flow`.
    #[allow(clippy::too_many_arguments)]
    fn follow(
        &self,
        name: &str,
        ch: &'a ChainP,
        rule: &'a Rule,
        i: usize,
        s: St,
        flow: Flow<'a>,
        depth: usize,
        out: &mut Vec<(St, Flow<'a>)>,
    ) {
        match flow {
            Flow::Next | Flow::NoMatch => self.chain_from(name, ch, i + 1, s, depth, out),
            // Jumps are not hops of their own: the rules that act inside name their chain.
            Flow::Jump(t) => {
                let mut sub = Vec::new();
                self.chain(t, s, depth + 1, &mut sub);
                for (s, f) in sub {
                    match f {
                        Flow::Return | Flow::Next | Flow::NoMatch => self.chain_from(name, ch, i + 1, s, depth, out),
                        other => out.push((s, other)),
                    }
                }
            }
            Flow::Goto(t) => {
                let mut s = s;
                if !rule.exprs.iter().any(|e| matches!(e, Expr::Vmap { .. })) {
                    self.hop(&mut s, name, rule, format!("goto {t}"), None);
                }
                let mut sub = Vec::new();
                self.chain(t, s, depth + 1, &mut sub);
                out.extend(sub.into_iter().map(|(s, f)| match f {
                    Flow::Next | Flow::NoMatch => (s, Flow::Return),
                    other => (s, other),
                }));
            }
            Flow::Return => out.push((s, Flow::Return)),
            Flow::Final(v) => out.push((s, Flow::Final(v))),
        }
    }
}

enum ExprResult<'a> {
    Match,
    NoMatch,
    Ends(Flow<'a>),
    /// Branches: `None` to continue the rule, or how it ended.
    Fork(Vec<(St, Option<Flow<'a>>)>),
}

fn verdict_flow(v: &str) -> Option<Flow<'_>> {
    let mut w = v.split_whitespace();
    match (w.next(), w.next()) {
        (Some("goto"), Some(t)) => Some(Flow::Goto(t)),
        (Some("jump"), Some(t)) => Some(Flow::Jump(t)),
        (Some("accept"), _) => Some(Flow::Final(HookVerdict::Accept)),
        (Some("drop"), _) => Some(Flow::Final(HookVerdict::Drop)),
        (Some("return"), _) => Some(Flow::Return),
        (Some("continue"), _) => None,
        _ => None,
    }
}

/// `10.0.0.1 . 8080` (map data), `10.0.0.1:8080`, `[fd00::1]:80` or a bare address.
fn parse_target(t: &str, port: u16) -> Option<SocketAddr> {
    let t = t.trim();
    if t.is_empty() {
        return None;
    }
    if let Some((a, p)) = t.split_once(" . ") {
        return Some(SocketAddr { ip: a.trim().parse().ok()?, port: p.trim().parse().ok()? });
    }
    if let Ok(sa) = t.parse::<SocketAddr>() {
        return Some(sa);
    }
    Some(SocketAddr { ip: t.parse().ok()?, port })
}

impl Netfilter for Program {
    fn run_hook(&self, hook: Hook, state: PacketState, ctx: &NodeContext) -> Vec<(PacketState, HookVerdict)> {
        let fam = match state.packet.family() {
            crate::model::IpFamily::V4 => "ip",
            crate::model::IpFamily::V6 => "ip6",
        };
        let chains = self.hooks.iter().find(|(k, _)| *k == (fam, hook)).map(|(_, v)| v.as_slice()).unwrap_or(&[]);
        let mut live = vec![state];
        let mut ended = Vec::new();
        for (ti, name) in chains {
            let table = &self.tables[*ti];
            let kind = table.chains.get(name).and_then(|c| c.base.as_ref()).map_or("filter", |b| b.kind.as_str());
            let exec = Exec { table, ctx, at: format!("{} {kind}", hook.as_str()) };
            let mut next = Vec::new();
            for s in live {
                let mut results = Vec::new();
                exec.chain(name, Box::new(s), 0, &mut results);
                for (s, flow) in results {
                    match flow {
                        Flow::Final(HookVerdict::Drop) => ended.push((*s, HookVerdict::Drop)),
                        Flow::Final(HookVerdict::Reject) => ended.push((*s, HookVerdict::Reject)),
                        _ => next.push(*s),
                    }
                }
            }
            live = next;
        }
        ended.extend(live.into_iter().map(|s| (s, HookVerdict::Continue)));
        ended
    }
}

impl Program {
    /// Table names, for diagnostics.
    pub fn tables(&self) -> Vec<String> {
        self.tables.iter().map(|t| format!("{} {}", t.family, t.name)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::policy::Backend;
    use crate::{Destination, TraceRequest};

    pub(crate) const EXAMPLE: &str = include_str!("../../tests/fixtures/example.yaml");

    fn probe(cluster: &Cluster, from: &str, to: &str) -> Trace {
        let req = TraceRequest {
            node: "test-node".into(),
            backend: Backend::Nftables,
            program: None,
            from: from.parse().unwrap(),
            to: to.parse::<Destination>().unwrap(),
            protocol: Protocol::Tcp,
            seed: 1,
        };
        crate::trace(cluster, &req).unwrap()
    }

    fn eps(t: &Trace) -> Vec<String> {
        t.outcomes.iter().map(|o| o.endpoint.to_string()).collect()
    }

    /// The contract's example probes hold on the nftables program.
    #[test]
    fn contract_example() {
        let c = Cluster::from_objects(crate::input::parse("example.yaml", EXAMPLE).unwrap().objects);
        let t = probe(&c, "10.180.0.2", "172.30.0.41:80");
        assert_eq!((t.verdict, eps(&t)), (Verdict::Forward, vec!["10.180.0.1:80".to_string()]), "{t:#?}");
        assert!(!t.outcomes[0].masquerade);
        let t = probe(&c, "10.180.0.1", "172.30.0.41:80");
        assert!(t.outcomes[0].masquerade, "hairpin: {t:#?}");
        assert_eq!(probe(&c, "10.180.0.2", "172.30.0.41:443").verdict, Verdict::Reject);
        assert_eq!(probe(&c, "203.0.113.130", "1.2.3.4:80").verdict, Verdict::Drop);
        let t = probe(&c, "203.0.113.2", "1.2.3.4:80");
        assert_eq!(eps(&t), vec!["10.180.2.5:8080".to_string()]);
        assert!(t.outcomes[0].masquerade);
        let t = probe(&c, "203.0.113.130", "192.168.0.2:30080");
        assert_eq!((t.verdict, eps(&t)), (Verdict::Forward, vec!["10.180.2.5:8080".to_string()]), "{t:#?}");
        assert!(t.outcomes[0].masquerade);
    }

    /// What `nft list table` prints back (priorities by name, `tcp dport` folded into map keys,
    /// `0x00000000`) traces exactly like the program we rendered.
    #[test]
    fn kernel_listing_traces_like_the_render() {
        let c = Cluster::from_objects(crate::input::parse("example.yaml", EXAMPLE).unwrap().objects);
        let listed = include_str!("../../tests/fixtures/example.nft-listed");
        for (from, to) in [
            ("10.180.0.2", "172.30.0.41:80"),
            ("10.180.0.1", "172.30.0.41:80"),
            ("10.180.0.2", "172.30.0.41:443"),
            ("203.0.113.130", "1.2.3.4:80"),
            ("203.0.113.2", "1.2.3.4:80"),
            ("203.0.113.130", "192.168.0.2:30080"),
            ("192.168.0.2", "172.30.99.1:80"),
        ] {
            let rendered = probe(&c, from, to);
            let req = TraceRequest {
                node: "test-node".into(),
                backend: Backend::Nftables,
                program: Some(listed.to_string()),
                from: from.parse().unwrap(),
                to: to.parse::<Destination>().unwrap(),
                protocol: Protocol::Tcp,
                seed: 1,
            };
            let from_kernel = crate::trace(&c, &req).unwrap();
            assert_eq!(
                (rendered.verdict, &rendered.outcomes),
                (from_kernel.verdict, &from_kernel.outcomes),
                "{from} -> {to}"
            );
        }
    }

    /// Rendering, parsing back and printing again changes nothing.
    #[test]
    fn round_trip() {
        let c = Cluster::from_objects(crate::input::parse("example.yaml", EXAMPLE).unwrap().objects);
        let plan = crate::policy::plan(&c, "test-node", Backend::Nftables);
        let rs = crate::render::nftables::ruleset(&plan);
        let text = crate::render::nftables::render(&plan);
        assert_eq!(parse_ruleset(&text).unwrap(), rs);
    }
}
