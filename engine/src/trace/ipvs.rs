//! Executes IPVS programs: what [`crate::render::ipvs`] writes (all sections), or plain
//! `ipvsadm -Sn` output, parsed back into virtual servers, ipsets, the iptables part and the
//! dummy interface's addresses, and run over a packet.
//!
//! The iptables part runs as in iptables mode ([`super::iptables`]), its `-m set` matches looking
//! into the parsed sets. IPVS itself hooks LOCAL_IN, after the filter table's INPUT chains: a
//! packet reaches it because the service address is bound to the dummy interface (so routing
//! delivers it locally; [`Program::node_context`] adds those addresses to the node's own).
//! There the virtual server (firewall mark first, then protocol, address and port) picks a real
//! server and rewrites the destination; IPVS then sends the packet out again, through
//! postrouting, where the iptables rules decide the masquerade (the path driver does that:
//! [`super::path`]).
//!
//! Schedulers: `rr`, `wrr`, `lc`, `wlc`, `sed`, `nq`, `lblc` and `lblcr` depend on connection
//! counts and history, so every real server is an outcome with its long-run share (its weight
//! over the total; weight 0 takes no new connection). `sh`, `dh` and `mh` hash the packet
//! (source, destination, source): one real server, a fixed function of the packet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::iptables::{self as ipt, IpSets};
use super::{Hook, HookVerdict, Hop, Netfilter, NodeContext, Packet, PacketState, SocketAddr};
use crate::model::{IpFamily, Protocol};
use crate::render::ipvs::{self as render, RealServer, Section, SetKind, VirtualServer, VsKey};

/// A line of a program that could not be read or applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}: {text}")]
pub struct ParseError {
    /// 1-based line number in the whole text.
    pub line: usize,
    pub text: String,
    pub message: String,
}

/// One member of an ipset, by the dimensions its type has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub ip: Option<IpAddr>,
    pub protocol: Option<Protocol>,
    pub port: Option<u16>,
    /// The third dimension: an address (`hash:ip,port,ip`, as a host network) or a network.
    pub other: Option<IpNet>,
}

/// A parsed ipset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    pub family: Option<IpFamily>,
    pub members: BTreeSet<Element>,
}

/// A parsed IPVS program.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Program {
    pub services: BTreeMap<VsKey, VirtualServer>,
    pub sets: BTreeMap<String, Set>,
    pub iptables: ipt::Program,
    /// Addresses bound to the dummy interface.
    pub addresses: BTreeSet<IpAddr>,
}

fn err(line: usize, text: &str, message: impl Into<String>) -> ParseError {
    ParseError { line, text: text.to_string(), message: message.into() }
}

impl Program {
    /// Parses a program as `render` prints it, or `ipvsadm -Sn` output alone.
    pub fn parse(text: &str) -> Result<Program, ParseError> {
        let mut p = Program::default();
        let mut tables = String::new();
        let mut first_table_line = 0;
        for (section, line, body) in render::sections(text) {
            match section {
                Section::Iptables(_) => {
                    if tables.is_empty() {
                        first_table_line = line;
                    }
                    tables.push_str(&body);
                }
                _ => p.apply_section(section, line, &body, false)?,
            }
        }
        if !tables.is_empty() {
            p.iptables = ipt::Program::parse(&tables).map_err(|e| ParseError {
                line: e.line + first_table_line - 1,
                text: e.text,
                message: e.message,
            })?;
        }
        Ok(p)
    }

    /// Applies a transaction ([`crate::render::ipvs::render_incremental`]) the way the tools
    /// would, section by section: `ipvsadm -R`, `ipset restore`, `iptables-restore --noflush`,
    /// `ip -batch`. What a tool would refuse (adding a virtual server that exists, deleting one
    /// that does not, adding to a missing set, ...) is an error.
    pub fn apply(&mut self, transaction: &str) -> Result<(), ParseError> {
        for (section, line, body) in render::sections(transaction) {
            match section {
                Section::Iptables(_) => self.iptables.apply(&body).map_err(|e| ParseError {
                    line: e.line + line - 1,
                    text: e.text,
                    message: e.message,
                })?,
                _ => self.apply_section(section, line, &body, true)?,
            }
        }
        Ok(())
    }

    /// The node as the kernel sees it with this program loaded: the dummy interface's addresses
    /// are local addresses too. A program without its `ip` part (a node's `ipvsadm -Sn` output)
    /// binds every virtual server's address, as kube-proxy does.
    pub fn node_context(&self, ctx: &NodeContext) -> NodeContext {
        let mut c = ctx.clone();
        let vs_addrs: BTreeSet<IpAddr> = self
            .services
            .keys()
            .filter_map(|k| match k {
                VsKey::Addr { addr, .. } => Some(addr.ip),
                VsKey::Fwmark { .. } => None,
            })
            .collect();
        let bound = if self.addresses.is_empty() { &vs_addrs } else { &self.addresses };
        c.addresses.extend(bound.iter().filter(|a| !ctx.addresses.contains(a)));
        c
    }

    /// What `ipvsadm -Ln` prints for this program.
    pub fn list(&self) -> String {
        render::list(&self.services)
    }

    fn apply_section(&mut self, section: Section, first: usize, body: &str, strict: bool) -> Result<(), ParseError> {
        let mut comment: Option<String> = None;
        for (i, raw) in body.lines().enumerate() {
            let line_no = first + i;
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(c) = line.strip_prefix('#') {
                // The comment line just before a virtual server says what made it.
                comment = (i > 0).then(|| c.trim().to_string());
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let r = match section {
                Section::Ipvsadm => self.ipvsadm(&words, comment.take(), strict),
                Section::Ipset => self.ipset(&words, strict),
                Section::Ip => self.ip(&words),
                Section::Iptables(_) => Ok(()),
            };
            r.map_err(|m| err(line_no, raw, m))?;
            comment = None;
        }
        Ok(())
    }

    fn ipvsadm(&mut self, words: &[&str], comment: Option<String>, strict: bool) -> Result<(), String> {
        let Some((command, rest)) = words.split_first() else { return Ok(()) };
        let mut key: Option<(Option<Protocol>, String)> = None;
        let mut v6 = false;
        let mut scheduler: Option<String> = None;
        let mut persistence: Option<u32> = None;
        let mut real: Option<String> = None;
        let mut weight: Option<u32> = None;
        let mut i = 0;
        while i < rest.len() {
            let w = rest[i];
            let arg = || rest.get(i + 1).copied().ok_or_else(|| format!("{w} needs an argument"));
            let mut next = i + 2;
            match w {
                "-t" | "--tcp-service" => key = Some((Some(Protocol::Tcp), arg()?.to_string())),
                "-u" | "--udp-service" => key = Some((Some(Protocol::Udp), arg()?.to_string())),
                "--sctp-service" => key = Some((Some(Protocol::Sctp), arg()?.to_string())),
                "-f" | "--fwmark-service" => key = Some((None, arg()?.to_string())),
                "-6" | "--ipv6" => {
                    v6 = true;
                    next = i + 1;
                }
                "-s" | "--scheduler" => scheduler = Some(arg()?.to_string()),
                "-p" | "--persistent" => match rest.get(i + 1).and_then(|s| s.parse::<u32>().ok()) {
                    Some(t) => persistence = Some(t),
                    None => {
                        persistence = Some(300); // ipvsadm's default timeout
                        next = i + 1;
                    }
                },
                "-r" | "--real-server" => real = Some(arg()?.to_string()),
                "-w" | "--weight" => {
                    let w = arg()?;
                    weight = Some(w.parse().map_err(|_| format!("{w:?} is not a weight"))?);
                }
                "-m" | "--masquerading" | "-g" | "--gatewaying" | "-i" | "--ipip" => next = i + 1,
                "-M" | "--netmask" | "-b" | "--sched-flags" | "-x" | "--u-threshold" | "-y" | "--l-threshold"
                | "--pe" | "--tun-type" => {}
                "-n" | "--numeric" => next = i + 1,
                other => return Err(format!("unexpected {other:?}")),
            }
            i = next;
        }
        if *command == "-C" || *command == "--clear" {
            self.services.clear();
            return Ok(());
        }
        let (protocol, spec) = key.ok_or("no service (-t, -u, --sctp-service or -f)")?;
        let key = match protocol {
            Some(protocol) => VsKey::Addr { protocol, addr: parse_addr(&spec, None)? },
            None => VsKey::Fwmark { family: if v6 { IpFamily::V6 } else { IpFamily::V4 }, mark: parse_u32(&spec)? },
        };
        let service_port = match key {
            VsKey::Addr { addr, .. } => Some(addr.port),
            VsKey::Fwmark { .. } => None,
        };
        match *command {
            "-A" | "--add-service" | "-E" | "--edit-service" => {
                let exists = self.services.contains_key(&key);
                let adding = matches!(*command, "-A" | "--add-service");
                if strict && adding && exists {
                    return Err("the virtual server exists already".into());
                }
                if strict && !adding && !exists {
                    return Err("no such virtual server".into());
                }
                let v = self.services.entry(key).or_insert_with(|| VirtualServer {
                    key,
                    scheduler: String::new(),
                    persistence: None,
                    reals: Vec::new(),
                    comment: None,
                });
                v.scheduler = scheduler.unwrap_or_else(|| "wlc".into()); // ipvsadm's default
                v.persistence = persistence;
                if adding {
                    v.comment = comment;
                }
            }
            "-D" | "--delete-service" => {
                if self.services.remove(&key).is_none() && strict {
                    return Err("no such virtual server".into());
                }
            }
            "-a" | "--add-server" | "-e" | "--edit-server" | "-d" | "--delete-server" => {
                let spec = real.ok_or("no real server (-r)")?;
                let addr = parse_addr(&spec, service_port)?;
                let v = self.services.get_mut(&key).ok_or("no such virtual server")?;
                let pos = v.reals.iter().position(|r| r.addr == addr);
                match (*command, pos) {
                    ("-a" | "--add-server", Some(_)) if strict => return Err("the real server exists already".into()),
                    ("-a" | "--add-server", _) | ("-e" | "--edit-server", _) => {
                        if pos.is_none() && matches!(*command, "-e" | "--edit-server") && strict {
                            return Err("no such real server".into());
                        }
                        let r = RealServer { addr, weight: weight.unwrap_or(1) };
                        match pos {
                            Some(p) => v.reals[p] = r,
                            None => v.reals.push(r),
                        }
                        v.reals.sort();
                    }
                    (_, Some(p)) => {
                        v.reals.remove(p);
                    }
                    (_, None) if strict => return Err("no such real server".into()),
                    (_, None) => {}
                }
            }
            other => return Err(format!("unknown ipvsadm command {other:?}")),
        }
        Ok(())
    }

    fn ipset(&mut self, words: &[&str], strict: bool) -> Result<(), String> {
        let words: Vec<&str> = words.iter().copied().filter(|w| *w != "-exist" && *w != "-!").collect();
        let Some((command, rest)) = words.split_first() else { return Ok(()) };
        let name = rest.first().copied();
        match *command {
            "create" | "-N" | "n" => {
                let name = name.ok_or("create needs a name")?;
                let kind_text = rest.get(1).ok_or("create needs a type")?;
                let kind =
                    SetKind::parse(kind_text).ok_or_else(|| format!("set type {kind_text:?} is not modelled"))?;
                let family = match rest.iter().position(|w| *w == "family").and_then(|i| rest.get(i + 1)) {
                    Some(&"inet6") => Some(IpFamily::V6),
                    Some(_) => Some(IpFamily::V4),
                    None if kind == SetKind::BitmapPort => None,
                    None => Some(IpFamily::V4),
                };
                if self.sets.contains_key(name) && strict {
                    return Ok(()); // `-exist` semantics: the applier restores with -exist
                }
                self.sets.entry(name.to_string()).or_insert(Set { kind, family, members: BTreeSet::new() });
            }
            "add" | "-A" | "a" | "del" | "-D" | "d" => {
                let name = name.ok_or("needs a set name")?;
                let text = rest.get(1).ok_or("needs an element")?;
                let set = self.sets.get_mut(name).ok_or_else(|| format!("no set {name:?}"))?;
                let e = parse_element(set.kind, text)?;
                if matches!(*command, "add" | "-A" | "a") {
                    set.members.insert(e);
                } else {
                    set.members.remove(&e);
                }
            }
            "flush" | "-F" => match name {
                Some(n) => self.sets.get_mut(n).ok_or_else(|| format!("no set {n:?}"))?.members.clear(),
                None => self.sets.values_mut().for_each(|s| s.members.clear()),
            },
            "destroy" | "-X" | "x" => match name {
                Some(n) => {
                    if self.sets.remove(n).is_none() && strict {
                        return Err(format!("no set {n:?}"));
                    }
                }
                None => self.sets.clear(),
            },
            other => return Err(format!("unknown ipset command {other:?}")),
        }
        Ok(())
    }

    fn ip(&mut self, words: &[&str]) -> Result<(), String> {
        let words = words.strip_prefix(&["ip"]).unwrap_or(words);
        match words {
            [obj, op, ..] if matches!(*obj, "addr" | "address" | "a") && matches!(*op, "flush" | "f") => {
                self.addresses.clear();
                Ok(())
            }
            [obj, op, addr, ..] if matches!(*obj, "addr" | "address" | "a") => {
                let ip: IpAddr = addr
                    .split('/')
                    .next()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| format!("{addr:?} is not an address"))?;
                match *op {
                    "add" | "replace" => {
                        self.addresses.insert(ip);
                    }
                    "del" | "delete" => {
                        self.addresses.remove(&ip);
                    }
                    other => return Err(format!("unknown ip addr command {other:?}")),
                }
                Ok(())
            }
            // The interface itself (`link add kube-ipvs0 type dummy`) and anything else: no
            // effect on where packets go.
            _ => Ok(()),
        }
    }

    /// The IPVS stage at LOCAL_IN for one branch.
    fn ipvs(&self, s: PacketState, v: HookVerdict, ctx: &NodeContext) -> Vec<(PacketState, HookVerdict)> {
        if s.dnat.is_some() {
            return vec![(s, v)];
        }
        let family = s.packet.family();
        let by_mark = if s.mark != 0 { self.services.get(&VsKey::Fwmark { family, mark: s.mark }) } else { None };
        let vs = by_mark.or_else(|| {
            self.services.get(&VsKey::Addr {
                protocol: s.packet.protocol,
                addr: SocketAddr { ip: s.packet.dst, port: s.packet.dst_port },
            })
        });
        let Some(vs) = vs else { return vec![(s, v)] };
        let hop = |action: String| {
            let mut h = Hop::new("input ipvs", action)
                .chain(format!("{} {}", vs.key.display(), vs.scheduler))
                .comment(vs.comment.clone());
            h.node = Some(ctx.node.clone());
            h
        };
        let live: Vec<&RealServer> = vs.reals.iter().filter(|r| r.weight > 0).collect();
        if live.is_empty() {
            let mut s = s;
            let draining =
                if vs.reals.is_empty() { String::new() } else { format!(" ({} draining at weight 0)", vs.reals.len()) };
            s.hops.push(hop(format!(
                "virtual server {} has no real server for new connections{draining}: IPVS answers ICMP port \
                 unreachable (reject). kube-proxy's IPVS mode relies on this for services with no endpoints (it \
                 writes no REJECT rule), and so rejects, rather than drops, a Local policy with no local endpoint",
                vs.key.display()
            )));
            return vec![(s, HookVerdict::Reject)];
        }
        let persistent = match vs.persistence {
            Some(t) => format!(
                "; persistent {t}s (ClientIP affinity): this client's later connections go to the same real server"
            ),
            None => String::new(),
        };
        let mark_note = match vs.key {
            VsKey::Fwmark { mark, .. } => format!(
                "; firewall mark {mark:#x}: externalTrafficPolicy Local traffic from a pod or the node itself reaches \
                 every endpoint (kube-proxy's IPVS mode sends it to the local endpoints only)"
            ),
            VsKey::Addr { .. } => String::new(),
        };
        let pick = |mut s: PacketState, r: &RealServer, action: String, p: f64| {
            s.packet.dst = r.addr.ip;
            s.packet.dst_port = r.addr.port;
            s.dnat = Some(r.addr);
            s.probability *= p;
            let mut h = hop(action).rule(vs.real_line("-a", r));
            h.packet = Some(format!(
                "{} → {} {}",
                SocketAddr { ip: s.packet.src, port: s.packet.src_port },
                r.addr,
                s.packet.protocol
            ));
            s.hops.push(h);
            (s, HookVerdict::Continue)
        };
        let fixed = match vs.scheduler.as_str() {
            "sh" | "mh" => Some(("source", s.packet.src)),
            "dh" => Some(("destination", s.packet.dst)),
            _ => None,
        };
        if let Some((what, ip)) = fixed {
            // The kernel's tables are weighted buckets indexed by a hash of the address: a
            // fixed function of the packet. Ours has the same shape, not the kernel's hash.
            let table: Vec<&RealServer> =
                live.iter().flat_map(|r| std::iter::repeat_n(*r, r.weight.min(256) as usize)).collect();
            let r = table[(fnv(ip) % table.len() as u64) as usize];
            let action = format!(
                "ipvs {} → {} (masq, weight {}): a fixed function of the {what} address {ip}, so every connection \
                 with it goes to this real server (the kernel's own hash may pick another one, always the same){persistent}{mark_note}",
                vs.scheduler, r.addr, r.weight
            );
            return vec![pick(s, r, action, 1.0)];
        }
        let total: u64 = live.iter().map(|r| u64::from(r.weight)).sum();
        live.iter()
            .map(|r| {
                let share = f64::from(r.weight) / total as f64;
                let action = format!(
                    "ipvs {} → {} (masq, weight {}, long-run share {:.1}%){persistent}{mark_note}",
                    vs.scheduler,
                    r.addr,
                    r.weight,
                    share * 100.0
                );
                pick(s.clone(), r, action, share)
            })
            .collect()
    }
}

/// FNV-1a over an address's bytes.
fn fnv(ip: IpAddr) -> u64 {
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number"))
}

/// `10.0.0.1:80`, `[fd00::1]:80`, or an address alone (the service's port).
fn parse_addr(s: &str, default_port: Option<u16>) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    match (bare.parse::<IpAddr>(), default_port) {
        (Ok(ip), Some(port)) => Ok(SocketAddr { ip, port }),
        _ => Err(format!("{s:?} is not ADDRESS:PORT")),
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// `tcp:80`, `udp:53`, `sctp:9`, or `80` (tcp).
fn parse_proto_port(s: &str) -> Result<(Protocol, u16), String> {
    let (proto, port) = match s.split_once(':') {
        Some((p, port)) => {
            let proto = match p {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                other => return Err(format!("protocol {other:?} is not modelled")),
            };
            (proto, port)
        }
        None => (Protocol::Tcp, s),
    };
    Ok((proto, port.parse().map_err(|_| format!("{port:?} is not a port"))?))
}

fn parse_element(kind: SetKind, text: &str) -> Result<Element, String> {
    let parts: Vec<&str> = split_element(text);
    let none = Element { ip: None, protocol: None, port: None, other: None };
    let ip_port = |a: &str, b: &str| -> Result<Element, String> {
        let (protocol, port) = parse_proto_port(b)?;
        Ok(Element { ip: Some(parse_ip(a)?), protocol: Some(protocol), port: Some(port), other: None })
    };
    Ok(match (kind, parts.as_slice()) {
        (SetKind::HashIp, [a]) => Element { ip: Some(parse_ip(a.split('/').next().unwrap_or(a))?), ..none },
        (SetKind::HashIpPort, [a, b]) => ip_port(a, b)?,
        (SetKind::HashIpPortIp, [a, b, c]) => Element { other: Some(IpNet::from(parse_ip(c)?)), ..ip_port(a, b)? },
        (SetKind::HashIpPortNet, [a, b, c]) => {
            let net = match c.parse::<IpNet>() {
                Ok(n) => n.trunc(),
                Err(_) => IpNet::from(parse_ip(c)?),
            };
            Element { other: Some(net), ..ip_port(a, b)? }
        }
        (SetKind::BitmapPort, [a]) => {
            let port = a.rsplit(':').next().unwrap_or(a);
            Element { port: Some(port.parse().map_err(|_| format!("{a:?} is not a port"))?), ..none }
        }
        _ => return Err(format!("{text:?} is not an element of a {} set", kind.as_str())),
    })
}

/// Splits `ip,proto:port,ip` at the commas (IPv6 addresses have none).
fn split_element(text: &str) -> Vec<&str> {
    text.split(',').collect()
}

impl IpSets for Program {
    fn contains(&self, name: &str, source: &[bool], packet: &Packet) -> Option<bool> {
        let set = self.sets.get(name)?;
        if set.family.is_some_and(|f| f != packet.family()) {
            return Some(false);
        }
        let ip = |i: usize| if source.get(i) == Some(&true) { packet.src } else { packet.dst };
        let port = |i: usize| if source.get(i) == Some(&true) { packet.src_port } else { packet.dst_port };
        let base = Element { ip: Some(ip(0)), protocol: Some(packet.protocol), port: Some(port(1)), other: None };
        Some(match set.kind {
            SetKind::HashIp => set.members.contains(&Element { protocol: None, port: None, ..base }),
            SetKind::HashIpPort => set.members.contains(&base),
            SetKind::HashIpPortIp => set.members.contains(&Element { other: Some(IpNet::from(ip(2))), ..base }),
            SetKind::HashIpPortNet => {
                let probe = ip(2);
                set.members
                    .range(base..)
                    .take_while(|e| e.ip == base.ip && e.protocol == base.protocol && e.port == base.port)
                    .any(|e| e.other.is_some_and(|n| n.contains(&probe)))
            }
            SetKind::BitmapPort => {
                set.members.contains(&Element { ip: None, protocol: None, port: Some(port(0)), other: None })
            }
        })
    }
}

impl Netfilter for Program {
    fn run_hook(&self, hook: Hook, state: PacketState, ctx: &NodeContext) -> Vec<(PacketState, HookVerdict)> {
        let out = self.iptables.run_hook_with_sets(hook, state, ctx, self);
        if hook != Hook::Input {
            return out;
        }
        // IPVS's LOCAL_IN hook (priority NF_IP_PRI_NAT_SRC - 2) runs after the filter table.
        out.into_iter()
            .flat_map(|(s, v)| match v {
                HookVerdict::Drop | HookVerdict::Reject => vec![(s, v)],
                _ => self.ipvs(s, v, ctx),
            })
            .collect()
    }
}
