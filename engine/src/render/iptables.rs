//! iptables programs: a [`NodePlan`] written as `iptables-restore` input, in full, or as the
//! smallest `iptables-restore --noflush` transaction that turns one node's program into the next.
//!
//! The layout is kube-proxy's iptables proxier (kubernetes `pkg/proxy/iptables/proxier.go`,
//! v1.31-1.33) under our own prefix, so anyone who has read a kube-proxy node's `iptables-save`
//! can read ours:
//!
//! - nat `SWITCHYARD-SERVICES` (from PREROUTING and OUTPUT) matches each service address and port
//!   and jumps to the service's chains; its last rule sends node-local destinations to
//!   `SWITCHYARD-NODEPORTS`. Per service port: `SWITCHYARD-SVC-<hash>` (endpoints for Cluster
//!   traffic policy), `SWITCHYARD-SVL-<hash>` (Local policy), `SWITCHYARD-EXT-<hash>` (external
//!   destinations: masquerade and the Local-policy short-circuits), `SWITCHYARD-FW-<hash>`
//!   (`loadBalancerSourceRanges`); per endpoint `SWITCHYARD-SEP-<hash>` (hairpin masquerade,
//!   affinity, DNAT). `SWITCHYARD-MARK-MASQ` sets the masquerade mark and nat
//!   `SWITCHYARD-POSTROUTING` masquerades marked packets.
//! - filter chains give the verdicts of services that cannot be served (`REJECT` with no
//!   endpoints, `DROP` for a Local policy with no local endpoint), accept health-check node ports,
//!   drop load-balancer traffic the source ranges did not let through, and let marked traffic be
//!   forwarded. Beyond kube-proxy's iptables mode (as its nftables mode does), filter
//!   `SWITCHYARD-SERVICES` also rejects unknown ports of active cluster IPs and drops unallocated
//!   addresses of the ServiceCIDRs; it only sees packets that were not DNATed.
//!
//! Every decision comes from the plan ([`crate::policy`]); this module only writes it down. Each
//! rule carries a comment naming the Service port and the field behind it.
//!
//! The output has one section per IP family, each introduced by a comment line ([`SECTION_V4`],
//! [`SECTION_V6`]) and loadable on its own by `iptables-restore` / `ip6tables-restore`; split it
//! with [`sections`].

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::model::{IpFamily, ObjectKey, Protocol};
use crate::policy::{FamilyPlan, FilterVerdict, LocalDetector, NodePlan, NodePortAddresses, ServicePortPlan};
use crate::trace::SocketAddr;

/// The prefix of every chain we own.
pub const CHAIN_PREFIX: &str = "SWITCHYARD-";
/// nat and filter: the service dispatch (nat) and the verdicts for cluster IPs (filter).
pub const SERVICES_CHAIN: &str = "SWITCHYARD-SERVICES";
/// nat: NodePort dispatch; filter: health check node ports.
pub const NODEPORTS_CHAIN: &str = "SWITCHYARD-NODEPORTS";
/// nat: masquerades packets that carry the masquerade mark.
pub const POSTROUTING_CHAIN: &str = "SWITCHYARD-POSTROUTING";
/// nat: sets the masquerade mark.
pub const MARK_MASQ_CHAIN: &str = "SWITCHYARD-MARK-MASQ";
/// nat, only when the local-traffic detector has several CIDRs: marks traffic from none of them.
pub const MASQ_NOT_LOCAL_CHAIN: &str = "SWITCHYARD-MASQ-NOT-LOCAL";
/// filter: verdicts for external IPs, load-balancer IPs and NodePorts.
pub const EXTERNAL_SERVICES_CHAIN: &str = "SWITCHYARD-EXTERNAL-SERVICES";
/// filter: lets masqueraded and established traffic be forwarded.
pub const FORWARD_CHAIN: &str = "SWITCHYARD-FORWARD";
/// filter: drops load-balancer traffic that `loadBalancerSourceRanges` did not let through.
pub const PROXY_FIREWALL_CHAIN: &str = "SWITCHYARD-PROXY-FIREWALL";
/// filter: kubelet's localnet block, needed while NodePorts answer on 127.0.0.1.
pub const FIREWALL_CHAIN: &str = "SWITCHYARD-FIREWALL";

/// The comment line that starts the IPv4 section (input for `iptables-restore`).
pub const SECTION_V4: &str = "# iptables-restore";
/// The comment line that starts the IPv6 section (input for `ip6tables-restore`).
pub const SECTION_V6: &str = "# ip6tables-restore";

/// iptables' limit on chain names (`XT_EXTENSION_MAXNAMELEN` - 1).
pub const MAX_CHAIN_NAME: usize = 28;
/// iptables' limit on comments (`XT_MAX_COMMENT_LEN` - 1).
const MAX_COMMENT: usize = 255;
/// Length of the hash in per-service chain names: `SWITCHYARD-SVC-` is 15 characters, so 13
/// base32 characters (65 bits of sha256) fill the 28 allowed.
const HASH_LEN: usize = MAX_CHAIN_NAME - "SWITCHYARD-SVC-".len();

/// The complete program for `plan`: one section per IP family, each with `*nat` and `*filter`,
/// including the jumps from the builtin chains.
pub fn render(plan: &NodePlan) -> String {
    let mut out = String::new();
    for fam in &plan.families {
        write_full_family(&plan.node, fam, &mut out);
    }
    out
}

/// `iptables-restore --noflush` input that turns the program of `old` into the program of `new`:
/// only chains whose content changed are declared (which flushes them) and rewritten; chains that
/// are gone are flushed and then deleted with `-X` once nothing refers to them. Returns an empty
/// string when nothing changed. A family that appears is written in full; one that disappears is
/// torn down (its jumps deleted with `-D`).
pub fn render_incremental(old: &NodePlan, new: &NodePlan) -> String {
    render_incremental_for(old, new, None)
}

/// [`render_incremental`] when the caller knows which services changed (the agent's sync loop
/// does): only their service ports are compared, so one endpoint change costs the same at any
/// cluster size. `changed` must name every service whose plan may differ; after a change that
/// can touch every service (a node's labels, the proxy configuration) pass `None`. Family-level
/// settings are always compared. Relies on the plans listing service ports sorted by name, as
/// [`crate::policy::plan`] does.
pub fn render_incremental_for(old: &NodePlan, new: &NodePlan, changed: Option<&BTreeSet<ObjectKey>>) -> String {
    let mut out = String::new();
    for fam in [IpFamily::V4, IpFamily::V6] {
        match (old.family(fam), new.family(fam)) {
            (None, None) => {}
            (None, Some(n)) => write_full_family(&new.node, n, &mut out),
            (Some(o), None) => teardown_family(&new.node, o).write(fam, &new.node, &mut out),
            (Some(o), Some(n)) => diff_family(o, n, changed).write(fam, &new.node, &mut out),
        }
    }
    out
}

/// Splits a program (or a transaction) into its per-family sections, each ready for
/// `iptables-restore` (IPv4) or `ip6tables-restore` (IPv6). Text before the first section
/// marker counts as IPv4.
pub fn sections(text: &str) -> Vec<(IpFamily, String)> {
    let mut out: Vec<(IpFamily, String)> = Vec::new();
    for line in text.lines() {
        let marker = match line.trim() {
            SECTION_V4 => Some(IpFamily::V4),
            SECTION_V6 => Some(IpFamily::V6),
            _ => None,
        };
        if let Some(f) = marker {
            out.push((f, String::new()));
        } else if out.is_empty() {
            out.push((IpFamily::V4, String::new()));
        }
        if let Some((_, s)) = out.last_mut() {
            s.push_str(line);
            s.push('\n');
        }
    }
    out.retain(|(_, s)| s.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')));
    out
}

/// The rules that attach our chains to the builtin chains, per table (`nat`, `filter`), as
/// `-A BUILTIN ...` lines. They are in [`render`]'s output; an agent that loads transactions with
/// `--noflush` into a node's existing tables can ensure them itself (`-C` then `-I`).
pub fn builtin_jumps(family: IpFamily) -> Vec<(&'static str, String)> {
    let _ = family; // the same in both families
    let mut out = Vec::new();
    let line = |f: &dyn Fn(&mut String)| {
        let mut s = String::new();
        f(&mut s);
        s.truncate(s.trim_end().len());
        s
    };
    for (chain, target, comment) in [
        ("PREROUTING", SERVICES_CHAIN, "switchyard service portals"),
        ("OUTPUT", SERVICES_CHAIN, "switchyard service portals"),
        ("POSTROUTING", POSTROUTING_CHAIN, "switchyard postrouting rules"),
    ] {
        out.push(("nat", line(&|b| Line::new(b, chain).comment(format_args!("{comment}")).j(target))));
    }
    // Order as kube-proxy leaves them (it prepends each jump): the firewall first, then the
    // forwarding accept before the verdicts.
    for (chain, target, comment, new_only) in [
        ("INPUT", PROXY_FIREWALL_CHAIN, "switchyard load balancer firewall", true),
        ("INPUT", NODEPORTS_CHAIN, "switchyard health check service ports", false),
        ("INPUT", EXTERNAL_SERVICES_CHAIN, "switchyard externally-visible service portals", true),
        ("INPUT", FIREWALL_CHAIN, "switchyard localnet firewall", false),
        ("FORWARD", PROXY_FIREWALL_CHAIN, "switchyard load balancer firewall", true),
        ("FORWARD", FORWARD_CHAIN, "switchyard forwarding rules", false),
        ("FORWARD", SERVICES_CHAIN, "switchyard service portals", true),
        ("FORWARD", EXTERNAL_SERVICES_CHAIN, "switchyard externally-visible service portals", true),
        ("OUTPUT", PROXY_FIREWALL_CHAIN, "switchyard load balancer firewall", true),
        ("OUTPUT", SERVICES_CHAIN, "switchyard service portals", true),
        ("OUTPUT", FIREWALL_CHAIN, "switchyard localnet firewall", false),
    ] {
        out.push((
            "filter",
            line(&|b| {
                let l = Line::new(b, chain).comment(format_args!("{comment}"));
                if new_only { l.m("-m conntrack --ctstate NEW").j(target) } else { l.j(target) }
            }),
        ));
    }
    out
}

/// The builtin chains each table uses.
const NAT_BUILTINS: [&str; 3] = ["PREROUTING", "OUTPUT", "POSTROUTING"];
const FILTER_BUILTINS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];

// ---------------------------------------------------------------------------------------------
// Names

/// kube-proxy's `portProtoHash`, shortened to fit our prefix: base32 of sha256, first 13
/// characters.
fn hash(parts: &[&str]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let mut bits: u128 = 0;
    for b in &digest[..9] {
        bits = (bits << 8) | u128::from(*b);
    }
    (0..HASH_LEN).map(|i| char::from(ALPHABET[((bits >> (72 - 5 * (i + 1))) & 31) as usize])).collect()
}

/// The chain names of one service port.
struct Names {
    /// `ns/svc:port`, as comments and hashes use it.
    label: String,
    svc: String,
    svl: String,
    ext: String,
    fw: String,
}

impl Names {
    fn of(p: &ServicePortPlan) -> Self {
        let label = p.name.to_string();
        let h = hash(&[&label, p.protocol.as_str()]);
        Names {
            svc: format!("SWITCHYARD-SVC-{h}"),
            svl: format!("SWITCHYARD-SVL-{h}"),
            ext: format!("SWITCHYARD-EXT-{h}"),
            fw: format!("SWITCHYARD-FW-{h}"),
            label,
        }
    }

    /// kube-proxy's `servicePortEndpointChainName`, from the endpoint written `ip:port`
    /// (`[ip]:port`).
    fn sep(&self, p: &ServicePortPlan, endpoint: &str) -> String {
        format!("SWITCHYARD-SEP-{}", hash(&[&self.label, p.protocol.as_str(), endpoint]))
    }
}

// ---------------------------------------------------------------------------------------------
// Rule lines

/// Writes one `-A CHAIN ...` line into a chain's buffer, in the order `iptables-save` prints a
/// rule (addresses, protocol, then matches in the order given, then the target), so that what
/// the kernel prints back reads like what we wrote.
struct Line<'b> {
    buf: &'b mut String,
}

impl<'b> Line<'b> {
    fn new(buf: &'b mut String, chain: &str) -> Self {
        buf.push_str("-A ");
        buf.push_str(chain);
        Line { buf }
    }
    fn addr(self, flag: &str, negated: bool, net: &IpNet) -> Self {
        let _ = write!(self.buf, "{} {flag} {}", if negated { " !" } else { "" }, net.trunc());
        self
    }
    fn host(self, flag: &str, ip: IpAddr) -> Self {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        let _ = write!(self.buf, " {flag} {ip}/{len}");
        self
    }
    fn src(self, net: &IpNet) -> Self {
        self.addr("-s", false, net)
    }
    fn not_src(self, net: &IpNet) -> Self {
        self.addr("-s", true, net)
    }
    fn src_ip(self, ip: IpAddr) -> Self {
        self.host("-s", ip)
    }
    fn dst(self, net: &IpNet) -> Self {
        self.addr("-d", false, net)
    }
    fn not_dst(self, net: &IpNet) -> Self {
        self.addr("-d", true, net)
    }
    fn dst_ip(self, ip: IpAddr) -> Self {
        self.host("-d", ip)
    }
    fn proto(self, p: Protocol) -> Self {
        self.buf.push_str(" -p ");
        self.buf.push_str(p.as_str());
        self
    }
    /// `-m comment --comment "..."`, quoted, escaped and cut to iptables' limit.
    fn comment(self, text: std::fmt::Arguments) -> Self {
        self.buf.push_str(" -m comment --comment \"");
        let start = self.buf.len();
        let _ = self.buf.write_fmt(text);
        let written = &self.buf[start..];
        if written.len() > MAX_COMMENT || written.bytes().any(|b| matches!(b, b'"' | b'\\' | b'\n' | b'\r')) {
            let raw = self.buf.split_off(start);
            let mut len = 0;
            for ch in raw.chars() {
                let ch = if ch == '\n' || ch == '\r' { ' ' } else { ch };
                len += ch.len_utf8();
                if len > MAX_COMMENT {
                    break;
                }
                if ch == '"' || ch == '\\' {
                    self.buf.push('\\');
                }
                self.buf.push(ch);
            }
        }
        self.buf.push('"');
        self
    }
    fn dport(self, p: Protocol, port: u16) -> Self {
        let _ = write!(self.buf, " -m {p} --dport {port}");
        self
    }
    fn m(self, text: &str) -> Self {
        self.buf.push(' ');
        self.buf.push_str(text);
        self
    }
    fn m_fmt(self, text: std::fmt::Arguments) -> Self {
        self.buf.push(' ');
        let _ = self.buf.write_fmt(text);
        self
    }
    fn j(self, target: &str) {
        self.buf.push_str(" -j ");
        self.buf.push_str(target);
        self.buf.push('\n');
    }
    fn j_fmt(self, target: std::fmt::Arguments) {
        self.buf.push_str(" -j ");
        let _ = self.buf.write_fmt(target);
        self.buf.push('\n');
    }
    /// A rule with no target: it only counts (and documents).
    fn done(self) {
        self.buf.push('\n');
    }
}

/// What one family needs besides the services: formatted once.
struct Fam<'a> {
    plan: &'a FamilyPlan,
    /// `0x4000`
    mark: String,
    reject: &'static str,
    recent_mask: &'static str,
}

impl<'a> Fam<'a> {
    fn new(plan: &'a FamilyPlan) -> Self {
        let v6 = plan.family == IpFamily::V6;
        Fam {
            plan,
            mark: format!("{:#x}", plan.masquerade_mark),
            reject: if v6 {
                "REJECT --reject-with icmp6-port-unreachable"
            } else {
                "REJECT --reject-with icmp-port-unreachable"
            },
            recent_mask: if v6 { "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" } else { "255.255.255.255" },
        }
    }

    fn verdict(&self, v: FilterVerdict) -> &'static str {
        match v {
            FilterVerdict::Reject => self.reject,
            FilterVerdict::Drop => "DROP",
        }
    }
}

/// kube-proxy's `computeProbability`: `%0.10f` of 1/n.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

fn no_endpoints_text(v: FilterVerdict, policy: &str) -> String {
    match v {
        FilterVerdict::Reject => "has no endpoints".to_string(),
        FilterVerdict::Drop => format!("has no local endpoints ({policy}=Local)"),
    }
}

// ---------------------------------------------------------------------------------------------
// One service port

/// The chains a service port shares with the others.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shared {
    NatServices = 0,
    NatNodePorts = 1,
    FilterServices = 2,
    FilterExternal = 3,
    FilterNodePorts = 4,
    FilterFirewall = 5,
}

const SHARED: [Shared; 6] = [
    Shared::NatServices,
    Shared::NatNodePorts,
    Shared::FilterServices,
    Shared::FilterExternal,
    Shared::FilterNodePorts,
    Shared::FilterFirewall,
];

impl Shared {
    fn chain(self) -> &'static str {
        match self {
            Shared::NatServices | Shared::FilterServices => SERVICES_CHAIN,
            Shared::NatNodePorts | Shared::FilterNodePorts => NODEPORTS_CHAIN,
            Shared::FilterExternal => EXTERNAL_SERVICES_CHAIN,
            Shared::FilterFirewall => PROXY_FIREWALL_CHAIN,
        }
    }
    fn is_nat(self) -> bool {
        matches!(self, Shared::NatServices | Shared::NatNodePorts)
    }
}

/// A chain and its rules: `-A` lines, each ending in a newline.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chain {
    name: String,
    rules: String,
}

impl Chain {
    fn new(name: &str) -> Self {
        Chain { name: name.to_string(), rules: String::new() }
    }
}

/// Everything one service port contributes: rules in the shared chains, and its own nat chains.
struct PortRules {
    shared: [String; 6],
    chains: Vec<Chain>,
}

fn uses_fw(p: &ServicePortPlan) -> bool {
    p.captures_external() && !p.load_balancer_ips.is_empty() && !p.source_ranges.is_empty()
}

/// Appends the rules `p` adds to one shared chain.
fn shared_rules(f: &Fam, p: &ServicePortPlan, n: &Names, which: Shared, out: &mut String) {
    let label = &n.label;
    match which {
        Shared::NatServices => {
            if p.internal_endpoints().is_some() {
                let target = if p.internal_policy_local { &n.svl } else { &n.svc };
                Line::new(out, SERVICES_CHAIN)
                    .dst_ip(p.cluster_ip)
                    .proto(p.protocol)
                    .comment(format_args!("{label} cluster IP"))
                    .dport(p.protocol, p.port)
                    .j(target);
            }
            // With no endpoints anywhere only the filter table acts (kube-proxy's
            // `usesExternalTrafficChain`).
            if p.captures_external() {
                for ip in &p.external_ips {
                    Line::new(out, SERVICES_CHAIN)
                        .dst_ip(*ip)
                        .proto(p.protocol)
                        .comment(format_args!("{label} external IP"))
                        .dport(p.protocol, p.port)
                        .j(&n.ext);
                }
                let lb_target = if uses_fw(p) { &n.fw } else { &n.ext };
                for ip in &p.load_balancer_ips {
                    Line::new(out, SERVICES_CHAIN)
                        .dst_ip(*ip)
                        .proto(p.protocol)
                        .comment(format_args!("{label} loadBalancer IP"))
                        .dport(p.protocol, p.port)
                        .j(lb_target);
                }
            }
        }
        Shared::NatNodePorts => {
            if let Some(np) = p.node_port
                && p.captures_external()
            {
                // NodePorts are not subject to loadBalancerSourceRanges (as in kube-proxy).
                Line::new(out, NODEPORTS_CHAIN)
                    .proto(p.protocol)
                    .comment(format_args!("{label} nodePort"))
                    .dport(p.protocol, np)
                    .j(&n.ext);
            }
        }
        Shared::FilterServices => {
            if let Some(v) = p.internal_filter() {
                let what = no_endpoints_text(v, "internalTrafficPolicy");
                Line::new(out, SERVICES_CHAIN)
                    .dst_ip(p.cluster_ip)
                    .proto(p.protocol)
                    .comment(format_args!("{label} cluster IP {what}"))
                    .dport(p.protocol, p.port)
                    .j(f.verdict(v));
            }
        }
        Shared::FilterExternal => {
            if let Some(v) = p.external_filter() {
                let what = no_endpoints_text(v, "externalTrafficPolicy");
                for (ips, field) in [(&p.external_ips, "external IP"), (&p.load_balancer_ips, "loadBalancer IP")] {
                    for ip in ips {
                        Line::new(out, EXTERNAL_SERVICES_CHAIN)
                            .dst_ip(*ip)
                            .proto(p.protocol)
                            .comment(format_args!("{label} {field} {what}"))
                            .dport(p.protocol, p.port)
                            .j(f.verdict(v));
                    }
                }
                if let Some(np) = p.node_port {
                    Line::new(out, EXTERNAL_SERVICES_CHAIN)
                        .proto(p.protocol)
                        .comment(format_args!("{label} nodePort {what}"))
                        .m("-m addrtype --dst-type LOCAL")
                        .dport(p.protocol, np)
                        .j(f.verdict(v));
                }
            }
        }
        Shared::FilterNodePorts => {
            if let Some(hc) = p.health_check_node_port {
                Line::new(out, NODEPORTS_CHAIN)
                    .proto(Protocol::Tcp)
                    .comment(format_args!("{label} healthCheckNodePort"))
                    .dport(Protocol::Tcp, hc)
                    .j("ACCEPT");
            }
        }
        Shared::FilterFirewall => {
            if uses_fw(p) {
                for ip in &p.load_balancer_ips {
                    Line::new(out, PROXY_FIREWALL_CHAIN)
                        .dst_ip(*ip)
                        .proto(p.protocol)
                        .comment(format_args!("{label} loadBalancerSourceRanges: traffic not accepted by {}", n.fw))
                        .dport(p.protocol, p.port)
                        .j("DROP");
                }
            }
        }
    }
}

/// One endpoint of a service port, with the strings its rules use.
struct Sep {
    addr: SocketAddr,
    /// `ip:port` / `[ip]:port`
    text: String,
    chain: String,
}

/// The nat chains that belong to one service port: SVC, SVL, EXT, FW and one SEP per endpoint.
fn own_chains(f: &Fam, p: &ServicePortPlan, n: &Names) -> Vec<Chain> {
    let mut chains = Vec::new();
    if !p.has_endpoints {
        return chains;
    }
    let label = &n.label;

    // The SEP chain of every endpoint either policy chain uses.
    let mut seps: Vec<Sep> = Vec::with_capacity(p.cluster_endpoints.len());
    for e in p.cluster_endpoints.iter().chain(&p.local_endpoints) {
        let addr = SocketAddr { ip: e.ip, port: e.port };
        if !seps.iter().any(|s| s.addr == addr) {
            let text = addr.to_string();
            let chain = n.sep(p, &text);
            seps.push(Sep { addr, text, chain });
        }
    }
    let sep_of = |e: &crate::policy::PlannedEndpoint| seps.iter().find(|s| s.addr.ip == e.ip && s.addr.port == e.port);

    // Masquerade for cluster IP traffic, in whichever chain the cluster IP leads to.
    let internal_masq = |out: &mut String, chain: &str| {
        if f.plan.masquerade_all {
            Line::new(out, chain)
                .dst_ip(p.cluster_ip)
                .proto(p.protocol)
                .comment(format_args!("{label} cluster IP: masqueradeAll"))
                .dport(p.protocol, p.port)
                .j(MARK_MASQ_CHAIN);
            return;
        }
        // Off-cluster traffic to a cluster IP (a static route to a node) may bounce to another
        // node, so it is masqueraded (kube-proxy's `localDetector.IfNotLocal`).
        let comment = format_args!("{label} cluster IP: masquerade traffic from outside the cluster");
        match &f.plan.local_detector {
            LocalDetector::None => {}
            LocalDetector::Cidrs(cidrs) if cidrs.len() == 1 => Line::new(out, chain)
                .not_src(&cidrs[0])
                .dst_ip(p.cluster_ip)
                .proto(p.protocol)
                .comment(comment)
                .dport(p.protocol, p.port)
                .j(MARK_MASQ_CHAIN),
            LocalDetector::Cidrs(_) => Line::new(out, chain)
                .dst_ip(p.cluster_ip)
                .proto(p.protocol)
                .comment(comment)
                .dport(p.protocol, p.port)
                .j(MASQ_NOT_LOCAL_CHAIN),
        }
    };

    let has_internal = p.internal_endpoints().is_some();
    for (local, eps, name) in [(false, &p.cluster_endpoints, &n.svc), (true, &p.local_endpoints, &n.svl)] {
        if eps.is_empty() {
            continue;
        }
        let mut c = Chain::new(name);
        c.rules.reserve(eps.len() * 170 + 200);
        if has_internal && p.internal_policy_local == local {
            internal_masq(&mut c.rules, name);
        }
        if let Some(t) = p.affinity_timeout {
            for sep in eps.iter().filter_map(sep_of) {
                Line::new(&mut c.rules, name)
                    .comment(format_args!("{label} -> {} sessionAffinity=ClientIP", sep.text))
                    .m_fmt(format_args!(
                        "-m recent --rcheck --seconds {t} --reap --name {} --mask {} --rsource",
                        sep.chain, f.recent_mask
                    ))
                    .j(&sep.chain);
            }
        }
        let count = eps.len();
        for (i, sep) in eps.iter().filter_map(sep_of).enumerate() {
            let l = Line::new(&mut c.rules, name).comment(format_args!("{label} -> {}", sep.text));
            if i + 1 < count {
                l.m_fmt(format_args!("-m statistic --mode random --probability {}", probability(count - i)))
                    .j(&sep.chain);
            } else {
                l.j(&sep.chain);
            }
        }
        chains.push(c);
    }

    if p.captures_external() {
        let mut c = Chain::new(&n.ext);
        let out = &mut c.rules;
        if !p.external_policy_local {
            // Cluster policy may cross nodes, so the reply must come back through this one.
            Line::new(out, &n.ext)
                .comment(format_args!("{label} externalTrafficPolicy=Cluster: masquerade external traffic"))
                .j(MARK_MASQ_CHAIN);
            if p.external_endpoints().is_some() {
                Line::new(out, &n.ext).comment(format_args!("{label} externalTrafficPolicy=Cluster")).j(&n.svc);
            }
        } else {
            // Pods going to an external address behave as if they went out to the load balancer
            // and came back: no traffic policy applies (kube-proxy's `IfLocal` short-circuit).
            if let LocalDetector::Cidrs(cidrs) = &f.plan.local_detector {
                for cidr in cidrs {
                    Line::new(out, &n.ext)
                        .src(cidr)
                        .comment(format_args!("{label} externalTrafficPolicy=Local: short-circuit pod traffic"))
                        .j(&n.svc);
                }
            }
            // The node's own traffic carries a local source (maybe the LB IP itself), so it is
            // masqueraded and sent to all endpoints.
            Line::new(out, &n.ext)
                .comment(format_args!("{label} externalTrafficPolicy=Local: masquerade LOCAL traffic"))
                .m("-m addrtype --src-type LOCAL")
                .j(MARK_MASQ_CHAIN);
            Line::new(out, &n.ext)
                .comment(format_args!("{label} externalTrafficPolicy=Local: short-circuit LOCAL traffic"))
                .m("-m addrtype --src-type LOCAL")
                .j(&n.svc);
            if p.external_endpoints().is_some() {
                Line::new(out, &n.ext)
                    .comment(format_args!("{label} externalTrafficPolicy=Local: local endpoints"))
                    .j(&n.svl);
            }
        }
        chains.push(c);
    }

    if uses_fw(p) {
        let mut c = Chain::new(&n.fw);
        let out = &mut c.rules;
        for cidr in &p.source_ranges {
            Line::new(out, &n.fw).src(cidr).comment(format_args!("{label} loadBalancerSourceRanges")).j(&n.ext);
        }
        // A node's request to a VIP assigned locally loops back with the VIP as source.
        if p.source_range_lb_self {
            for ip in &p.load_balancer_ips {
                Line::new(out, &n.fw)
                    .src_ip(*ip)
                    .comment(format_args!(
                        "{label} loadBalancerSourceRanges: loadBalancer IP as source (a node IP is in a range)"
                    ))
                    .j(&n.ext);
            }
        }
        Line::new(out, &n.fw)
            .comment(format_args!(
                "{label} loadBalancerSourceRanges: other traffic is dropped by {PROXY_FIREWALL_CHAIN}"
            ))
            .done();
        chains.push(c);
    }

    for sep in &seps {
        let mut c = Chain::new(&sep.chain);
        c.rules.reserve(320);
        // Hairpin: a pod reaching itself through the service must see the node as source.
        Line::new(&mut c.rules, &sep.chain)
            .src_ip(sep.addr.ip)
            .comment(format_args!("{label} -> {} hairpin", sep.text))
            .j(MARK_MASQ_CHAIN);
        let dnat =
            Line::new(&mut c.rules, &sep.chain).proto(p.protocol).comment(format_args!("{label} -> {}", sep.text));
        let dnat = if p.affinity_timeout.is_some() {
            dnat.m_fmt(format_args!("-m recent --set --name {} --mask {} --rsource", sep.chain, f.recent_mask))
        } else {
            dnat
        };
        dnat.j_fmt(format_args!("DNAT --to-destination {}", sep.text));
        chains.push(c);
    }
    chains
}

fn port_rules(f: &Fam, p: &ServicePortPlan) -> PortRules {
    let n = Names::of(p);
    let mut shared: [String; 6] = Default::default();
    for which in SHARED {
        shared_rules(f, p, &n, which, &mut shared[which as usize]);
    }
    PortRules { shared, chains: own_chains(f, p, &n) }
}

// ---------------------------------------------------------------------------------------------
// One family

/// The rules a shared chain ends with, after every service's: the NodePort dispatch (nat
/// SERVICES), and the verdicts for unknown ports and unallocated addresses (filter SERVICES).
fn shared_tail(f: &Fam, which: Shared, out: &mut String) {
    let plan = f.plan;
    match which {
        Shared::NatServices => {
            let comment =
                "switchyard service nodeports (nodePortAddresses); NOTE: this must be the last rule in this chain";
            match &plan.node_port_addresses {
                NodePortAddresses::All => {
                    let l = Line::new(out, SERVICES_CHAIN);
                    // Localhost NodePorts never work for IPv6, and for IPv4 only with
                    // `localhostNodePorts` (route_localnet).
                    let l = if plan.family == IpFamily::V6 || !plan.localhost_node_ports {
                        l.not_dst(&plan.loopback())
                    } else {
                        l
                    };
                    l.comment(format_args!("{comment}")).m("-m addrtype --dst-type LOCAL").j(NODEPORTS_CHAIN);
                }
                NodePortAddresses::Only(ips) => {
                    for ip in ips {
                        if ip.is_loopback() && !plan.localhost_node_ports {
                            continue;
                        }
                        Line::new(out, SERVICES_CHAIN)
                            .dst_ip(*ip)
                            .comment(format_args!("{comment}"))
                            .j(NODEPORTS_CHAIN);
                    }
                }
            }
        }
        Shared::FilterServices => {
            // Only packets that were not DNATed get here: a cluster IP with a port the service
            // does not have, or an address of a ServiceCIDR that no service holds.
            let mut seen: std::collections::HashSet<IpAddr> =
                std::collections::HashSet::with_capacity(plan.services.len());
            for p in &plan.services {
                if !seen.insert(p.cluster_ip) {
                    continue;
                }
                Line::new(out, SERVICES_CHAIN)
                    .dst_ip(p.cluster_ip)
                    .comment(format_args!("{} cluster IP: port not in the Service", p.name.service))
                    .j(f.reject);
            }
            for c in &plan.service_cidrs {
                Line::new(out, SERVICES_CHAIN)
                    .dst(c)
                    .comment(format_args!("ServiceCIDR {}: unallocated address", c.trunc()))
                    .j("DROP");
            }
        }
        _ => {}
    }
}

/// The chains of one family that do not belong to a service port, with their rules.
fn global_chains(f: &Fam) -> (Vec<Chain>, Vec<Chain>) {
    let plan = f.plan;
    let mark = &f.mark;
    let mut post = Chain::new(POSTROUTING_CHAIN);
    Line::new(&mut post.rules, POSTROUTING_CHAIN)
        .comment(format_args!("switchyard: not marked for masquerade"))
        .m_fmt(format_args!("-m mark ! --mark {mark}/{mark}"))
        .j("RETURN");
    // Clear the mark so a packet that traverses the stack again is not re-masqueraded.
    Line::new(&mut post.rules, POSTROUTING_CHAIN)
        .comment(format_args!("switchyard: clear the masquerade mark"))
        .j_fmt(format_args!("MARK --xor-mark {mark}"));
    Line::new(&mut post.rules, POSTROUTING_CHAIN)
        .comment(format_args!("switchyard service traffic requiring SNAT"))
        .j("MASQUERADE --random-fully");
    let mut mark_masq = Chain::new(MARK_MASQ_CHAIN);
    Line::new(&mut mark_masq.rules, MARK_MASQ_CHAIN)
        .comment(format_args!("switchyard: mark for masquerade (masqueradeBit)"))
        .j_fmt(format_args!("MARK --or-mark {mark}"));
    let mut nat = vec![post, mark_masq];
    if let LocalDetector::Cidrs(cidrs) = &plan.local_detector
        && cidrs.len() > 1
    {
        let mut c = Chain::new(MASQ_NOT_LOCAL_CHAIN);
        for cidr in cidrs {
            Line::new(&mut c.rules, MASQ_NOT_LOCAL_CHAIN)
                .src(cidr)
                .comment(format_args!("switchyard: traffic from local pods (detectLocalMode) is not masqueraded"))
                .j("RETURN");
        }
        Line::new(&mut c.rules, MASQ_NOT_LOCAL_CHAIN)
            .comment(format_args!("switchyard: masquerade traffic from outside the cluster"))
            .j(MARK_MASQ_CHAIN);
        nat.push(c);
    }

    let mut forward = Chain::new(FORWARD_CHAIN);
    // kubernetes issues 74839 and 117924: INVALID packets would reset connections.
    Line::new(&mut forward.rules, FORWARD_CHAIN)
        .comment(format_args!("switchyard: drop ctstate INVALID"))
        .m("-m conntrack --ctstate INVALID")
        .j("DROP");
    Line::new(&mut forward.rules, FORWARD_CHAIN)
        .comment(format_args!("switchyard forwarding rules: traffic marked for masquerade"))
        .m_fmt(format_args!("-m mark --mark {mark}/{mark}"))
        .j("ACCEPT");
    Line::new(&mut forward.rules, FORWARD_CHAIN)
        .comment(format_args!("switchyard forwarding conntrack rule"))
        .m("-m conntrack --ctstate RELATED,ESTABLISHED")
        .j("ACCEPT");
    let mut firewall = Chain::new(FIREWALL_CHAIN);
    if plan.family == IpFamily::V4 && plan.localhost_node_ports {
        // route_localnet makes 127.0.0.1 reachable from outside; this closes that hole
        // (kubernetes issue 90259), as kubelet and kube-proxy do.
        let lo = plan.loopback();
        Line::new(&mut firewall.rules, FIREWALL_CHAIN)
            .not_src(&lo)
            .dst(&lo)
            .comment(format_args!("switchyard: block incoming localnet connections (localhostNodePorts)"))
            .m("-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT")
            .j("DROP");
    }
    (nat, vec![forward, firewall])
}

/// Every chain of one family: (nat, filter), shared chains first, builtin jumps excluded.
fn family_chains(fam: &FamilyPlan) -> (Vec<Chain>, Vec<Chain>) {
    let f = Fam::new(fam);
    let mut shared: [String; 6] = Default::default();
    let mut own = Vec::new();
    for p in &fam.services {
        let n = Names::of(p);
        for which in SHARED {
            shared_rules(&f, p, &n, which, &mut shared[which as usize]);
        }
        own.extend(own_chains(&f, p, &n));
    }
    for which in SHARED {
        shared_tail(&f, which, &mut shared[which as usize]);
    }
    let (gnat, gfilter) = global_chains(&f);
    let [nat_services, nat_nodeports, f_services, f_external, f_nodeports, f_firewall] = shared;
    let chain = |name: &str, rules: String| Chain { name: name.to_string(), rules };
    let mut nat = Vec::with_capacity(own.len() + 5);
    nat.push(chain(SERVICES_CHAIN, nat_services));
    nat.push(chain(NODEPORTS_CHAIN, nat_nodeports));
    nat.extend(gnat);
    nat.extend(own);
    let mut filter = vec![
        chain(SERVICES_CHAIN, f_services),
        chain(EXTERNAL_SERVICES_CHAIN, f_external),
        chain(NODEPORTS_CHAIN, f_nodeports),
        chain(PROXY_FIREWALL_CHAIN, f_firewall),
    ];
    filter.extend(gfilter);
    (nat, filter)
}

fn section_header(family: IpFamily, node: &str, out: &mut String) {
    out.push_str(if family == IpFamily::V6 { SECTION_V6 } else { SECTION_V4 });
    out.push('\n');
    out.push_str(&super::header(node, "iptables"));
    out.push_str(if family == IpFamily::V6 { " (IPv6)\n" } else { " (IPv4)\n" });
}

fn write_full_family(node: &str, fam: &FamilyPlan, out: &mut String) {
    let (nat, filter) = family_chains(fam);
    let jumps = builtin_jumps(fam.family);
    section_header(fam.family, node, out);
    for (table, builtins, chains) in [("nat", &NAT_BUILTINS, &nat), ("filter", &FILTER_BUILTINS, &filter)] {
        let size: usize = chains.iter().map(|c| c.rules.len() + c.name.len() + 8).sum();
        out.reserve(size + 1024);
        let _ = writeln!(out, "*{table}");
        // `-` keeps a builtin chain's policy; with --noflush it also leaves its rules alone.
        for b in builtins {
            let _ = writeln!(out, ":{b} - [0:0]");
        }
        for c in chains.iter() {
            let _ = writeln!(out, ":{} - [0:0]", c.name);
        }
        for (t, j) in &jumps {
            if *t == table {
                out.push_str(j);
                out.push('\n');
            }
        }
        for c in chains.iter() {
            out.push_str(&c.rules);
        }
        out.push_str("COMMIT\n");
    }
}

// ---------------------------------------------------------------------------------------------
// Transactions

/// One table's part of a transaction.
#[derive(Default)]
struct TableDelta {
    /// Chains declared (created, or flushed if they exist).
    declare: Vec<String>,
    /// `-D` lines, before any rule is added.
    delete_rules: String,
    rules: String,
    /// Chains deleted (`-X`) last, once nothing refers to them.
    remove: Vec<String>,
}

impl TableDelta {
    fn is_empty(&self) -> bool {
        self.declare.is_empty() && self.delete_rules.is_empty() && self.rules.is_empty() && self.remove.is_empty()
    }
    fn rewrite(&mut self, c: Chain) {
        self.declare.push(c.name);
        self.rules.push_str(&c.rules);
    }
    fn delete(&mut self, name: String) {
        self.declare.push(name.clone());
        self.remove.push(name);
    }
    fn write(&self, table: &str, out: &mut String) {
        if self.is_empty() {
            return;
        }
        let _ = writeln!(out, "*{table}");
        for c in &self.declare {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        out.push_str(&self.delete_rules);
        out.push_str(&self.rules);
        for c in &self.remove {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
}

#[derive(Default)]
struct FamilyDelta {
    nat: TableDelta,
    filter: TableDelta,
}

impl FamilyDelta {
    fn table(&mut self, nat: bool) -> &mut TableDelta {
        if nat { &mut self.nat } else { &mut self.filter }
    }
    fn write(&self, family: IpFamily, node: &str, out: &mut String) {
        if self.nat.is_empty() && self.filter.is_empty() {
            return;
        }
        section_header(family, node, out);
        self.nat.write("nat", out);
        self.filter.write("filter", out);
    }
}

fn teardown_family(_node: &str, fam: &FamilyPlan) -> FamilyDelta {
    let (nat, filter) = family_chains(fam);
    let mut d = FamilyDelta::default();
    for (table, line) in builtin_jumps(fam.family) {
        let t = d.table(table == "nat");
        t.delete_rules.push_str("-D");
        t.delete_rules.push_str(line.strip_prefix("-A").unwrap_or(&line));
        t.delete_rules.push('\n');
    }
    for c in nat {
        d.nat.delete(c.name);
    }
    for c in filter {
        d.filter.delete(c.name);
    }
    d
}

/// Whether two family plans differ in anything but their services. (Destructured so that a new
/// field cannot be forgotten here.)
fn same_globals(a: &FamilyPlan, b: &FamilyPlan) -> bool {
    let FamilyPlan {
        family,
        node_ips: _, // used by the policy only (source_range_lb_self, NodePortAddresses)
        local_detector,
        masquerade_all,
        masquerade_mark,
        node_port_addresses,
        localhost_node_ports,
        service_cidrs,
        services: _,
        ipvs_scheduler: _, // IPVS only
    } = a;
    *family == b.family
        && *local_detector == b.local_detector
        && *masquerade_all == b.masquerade_all
        && *masquerade_mark == b.masquerade_mark
        && *node_port_addresses == b.node_port_addresses
        && *localhost_node_ports == b.localhost_node_ports
        && *service_cidrs == b.service_cidrs
}

/// Whether two plans of the same service port (the caller compared names) produce the same rules:
/// every field the renderer reads, endpoints by address only, cheapest first. (Destructured so
/// that a new field cannot be forgotten here.)
fn same_rules(a: &ServicePortPlan, b: &ServicePortPlan) -> bool {
    let ServicePortPlan {
        name: _,
        protocol,
        port,
        cluster_ip,
        node_port,
        external_ips,
        load_balancer_ips,
        source_ranges,
        source_range_lb_self,
        health_check_node_port,
        affinity_timeout,
        externally_accessible,
        internal_policy_local,
        external_policy_local,
        cluster_endpoints,
        local_endpoints,
        has_endpoints,
        draining_endpoints: _,
    } = a;
    let same_eps = |x: &[crate::policy::PlannedEndpoint], y: &[crate::policy::PlannedEndpoint]| {
        x.len() == y.len()
            && (std::ptr::eq(x.as_ptr(), y.as_ptr()) || x.iter().zip(y).all(|(x, y)| x.ip == y.ip && x.port == y.port))
    };
    *port == b.port
        && *cluster_ip == b.cluster_ip
        && *has_endpoints == b.has_endpoints
        && same_eps(cluster_endpoints, &b.cluster_endpoints)
        && same_eps(local_endpoints, &b.local_endpoints)
        && *protocol == b.protocol
        && *node_port == b.node_port
        && *external_ips == b.external_ips
        && *load_balancer_ips == b.load_balancer_ips
        && *source_ranges == b.source_ranges
        && *source_range_lb_self == b.source_range_lb_self
        && *health_check_node_port == b.health_check_node_port
        && *affinity_timeout == b.affinity_timeout
        && *externally_accessible == b.externally_accessible
        && *internal_policy_local == b.internal_policy_local
        && *external_policy_local == b.external_policy_local
}

/// The service ports that differ between two lists: (old, new) pairs, matched by name.
fn changed_ports<'a>(
    old: &'a [ServicePortPlan],
    new: &'a [ServicePortPlan],
) -> Vec<(Option<&'a ServicePortPlan>, Option<&'a ServicePortPlan>)> {
    let mut out = Vec::new();
    // The common case: the same service ports in the same order (an endpoint changed). Walk
    // both lists in step without paying for an ordering check.
    let common = old.len().min(new.len());
    let mut i = 0;
    while i < common && old[i].name == new[i].name {
        if !same_rules(&old[i], &new[i]) {
            out.push((Some(&old[i]), Some(&new[i])));
        }
        i += 1;
    }
    if i == old.len() && i == new.len() {
        return out;
    }
    let (old, new) = (&old[i..], &new[i..]);
    // Plans list their service ports sorted by name (policy::plan): merge the rest in one pass.
    let sorted = |v: &[ServicePortPlan]| v.windows(2).all(|w| w[0].name < w[1].name);
    if sorted(old) && sorted(new) {
        let (mut i, mut j) = (0, 0);
        loop {
            match (old.get(i), new.get(j)) {
                (Some(o), Some(n)) if o.name == n.name => {
                    if !same_rules(o, n) {
                        out.push((Some(o), Some(n)));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(o), Some(n)) if o.name < n.name => {
                    out.push((Some(o), None));
                    i += 1;
                }
                (_, Some(n)) => {
                    out.push((None, Some(n)));
                    j += 1;
                }
                (Some(o), None) => {
                    out.push((Some(o), None));
                    i += 1;
                }
                (None, None) => return out,
            }
        }
    }
    // Anything else: by a map.
    let by_name: HashMap<_, _> = old.iter().map(|p| (&p.name, p)).collect();
    let mut seen = std::collections::HashSet::new();
    for n in new {
        seen.insert(&n.name);
        match by_name.get(&n.name) {
            Some(o) if same_rules(o, n) => {}
            o => out.push((o.copied(), Some(n))),
        }
    }
    out.extend(old.iter().filter(|o| !seen.contains(&o.name)).map(|o| (Some(o), None)));
    out
}

/// [`changed_ports`] among the service ports of the given services only.
fn changed_ports_among<'a>(
    old: &'a [ServicePortPlan],
    new: &'a [ServicePortPlan],
    services: &BTreeSet<ObjectKey>,
) -> Vec<(Option<&'a ServicePortPlan>, Option<&'a ServicePortPlan>)> {
    // Service ports are sorted by name, so one service's ports are adjacent.
    let ports = |v: &'a [ServicePortPlan], k: &ObjectKey| {
        let lo = v.partition_point(|p| &p.name.service < k);
        let hi = v.partition_point(|p| &p.name.service <= k);
        &v[lo..hi]
    };
    let mut out = Vec::new();
    for k in services {
        let (o, n) = (ports(old, k), ports(new, k));
        for np in n {
            match o.iter().find(|op| op.name == np.name) {
                Some(op) if same_rules(op, np) => {}
                op => out.push((op, Some(np))),
            }
        }
        out.extend(o.iter().filter(|op| !n.iter().any(|np| np.name == op.name)).map(|op| (Some(op), None)));
    }
    out
}

/// The transaction for one family present in both plans.
fn diff_family(old: &FamilyPlan, new: &FamilyPlan, only: Option<&BTreeSet<ObjectKey>>) -> FamilyDelta {
    let mut d = FamilyDelta::default();
    if !same_globals(old, new) {
        // Something every chain may depend on changed: compare every chain.
        let (onat, ofilter) = family_chains(old);
        let (nnat, nfilter) = family_chains(new);
        diff_chains(onat, nnat, &mut d.nat);
        diff_chains(ofilter, nfilter, &mut d.filter);
        return d;
    }
    let fo = Fam::new(old);
    let fnew = Fam::new(new);
    let mut dirty = [false; 6];
    let changes = match only {
        Some(services) => changed_ports_among(&old.services, &new.services, services),
        None => changed_ports(&old.services, &new.services),
    };
    for (o, n) in changes {
        let ro = o.map(|p| port_rules(&fo, p));
        let rn = n.map(|p| port_rules(&fnew, p));
        for which in SHARED {
            let i = which as usize;
            let a = ro.as_ref().map(|r| r.shared[i].as_str()).unwrap_or_default();
            let b = rn.as_ref().map(|r| r.shared[i].as_str()).unwrap_or_default();
            dirty[i] |= a != b;
        }
        // The unknown-port rejects list every cluster IP.
        if o.map(|p| p.cluster_ip) != n.map(|p| p.cluster_ip) {
            dirty[Shared::FilterServices as usize] = true;
        }
        let old_chains = ro.map(|r| r.chains).unwrap_or_default();
        let new_chains = rn.map(|r| r.chains).unwrap_or_default();
        diff_chains(old_chains, new_chains, &mut d.nat);
    }
    // A shared chain is rewritten whole from the new plan when any service's part changed.
    let mut rewrite: Vec<(Shared, String)> =
        SHARED.iter().filter(|w| dirty[**w as usize]).map(|w| (*w, String::new())).collect();
    if !rewrite.is_empty() {
        for p in &new.services {
            let n = Names::of(p);
            for (which, rules) in rewrite.iter_mut() {
                shared_rules(&fnew, p, &n, *which, rules);
            }
        }
        for (which, mut rules) in rewrite {
            shared_tail(&fnew, which, &mut rules);
            // Declared first in the table, as in the full program.
            let t = d.table(which.is_nat());
            t.declare.insert(0, which.chain().to_string());
            t.rules.insert_str(0, &rules);
        }
    }
    d
}

/// Adds to `t` what turns the chains `old` into `new`.
fn diff_chains(old: Vec<Chain>, new: Vec<Chain>, t: &mut TableDelta) {
    if old.len() <= 64 {
        // One service port's chains: a linear search is cheapest.
        for c in &old {
            if !new.iter().any(|n| n.name == c.name) {
                t.delete(c.name.clone());
            }
        }
        for c in new {
            if old.iter().find(|o| o.name == c.name) != Some(&c) {
                t.rewrite(c);
            }
        }
        return;
    }
    let old_by_name: HashMap<&str, &Chain> = old.iter().map(|c| (c.name.as_str(), c)).collect();
    let new_names: std::collections::HashSet<&str> = new.iter().map(|c| c.name.as_str()).collect();
    for c in &old {
        if !new_names.contains(c.name.as_str()) {
            t.delete(c.name.clone());
        }
    }
    for c in new {
        if old_by_name.get(c.name.as_str()) != Some(&&c) {
            t.rewrite(c);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::policy::{Backend, plan};

    pub(crate) fn cluster(yaml: &str) -> Cluster {
        let parsed = crate::input::parse("t.yaml", yaml).expect("valid test yaml");
        Cluster::from_objects(parsed.objects)
    }

    const BASE: &str = r#"
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
clusterCIDR: 10.0.0.0/8
---
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  clusterIP: 172.30.0.41
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc1-a
  namespace: ns1
  labels: {kubernetes.io/service-name: svc1}
addressType: IPv4
endpoints:
- addresses: ["10.180.0.1"]
  conditions: {ready: true}
  nodeName: test-node
ports: [{name: http, port: 80, protocol: TCP}]
"#;

    /// Chain names fit iptables' limit and are stable.
    #[test]
    fn chain_names_fit_and_are_stable() {
        let h = hash(&["ns1/svc1:http", "tcp"]);
        assert_eq!(h.len(), HASH_LEN);
        assert_eq!(h, hash(&["ns1/svc1:http", "tcp"]));
        assert_ne!(h, hash(&["ns1/svc1:http", "udp"]));
        assert!(EXTERNAL_SERVICES_CHAIN.len() <= MAX_CHAIN_NAME);
        assert_eq!(format!("SWITCHYARD-SEP-{h}").len(), MAX_CHAIN_NAME);
    }

    #[test]
    fn renders_kube_proxy_layout() {
        let p = plan(&cluster(BASE), "test-node", Backend::Iptables);
        let text = render(&p);
        assert!(text.starts_with("# iptables-restore\n"), "{text}");
        assert!(!text.contains(SECTION_V6));
        for needle in [
            "-A PREROUTING -m comment --comment \"switchyard service portals\" -j SWITCHYARD-SERVICES",
            "-A SWITCHYARD-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:http cluster IP\" -m tcp --dport 80 -j SWITCHYARD-SVC-",
            "! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:http cluster IP: masquerade traffic from outside the cluster\" -m tcp --dport 80 -j SWITCHYARD-MARK-MASQ",
            "-s 10.180.0.1/32 -m comment --comment \"ns1/svc1:http -> 10.180.0.1:80 hairpin\" -j SWITCHYARD-MARK-MASQ",
            "-p tcp -m comment --comment \"ns1/svc1:http -> 10.180.0.1:80\" -j DNAT --to-destination 10.180.0.1:80",
            "-A SWITCHYARD-POSTROUTING -m comment --comment \"switchyard service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            "-A SWITCHYARD-MARK-MASQ -m comment --comment \"switchyard: mark for masquerade (masqueradeBit)\" -j MARK --or-mark 0x4000",
            "-A SWITCHYARD-SERVICES -m comment --comment \"switchyard service nodeports (nodePortAddresses); NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j SWITCHYARD-NODEPORTS",
            "-A SWITCHYARD-SERVICES -d 172.30.0.41/32 -m comment --comment \"ns1/svc1 cluster IP: port not in the Service\" -j REJECT --reject-with icmp-port-unreachable",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert_eq!(text.matches("COMMIT\n").count(), 2);
    }

    #[test]
    fn probabilities_use_kube_proxy_format() {
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(2), "0.5000000000");
    }

    #[test]
    fn sections_split_by_family() {
        let text = "# iptables-restore\n*nat\nCOMMIT\n# ip6tables-restore\n*nat\nCOMMIT\n";
        let s = sections(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, IpFamily::V4);
        assert_eq!(s[1].0, IpFamily::V6);
        assert!(s[1].1.starts_with("# ip6tables-restore\n*nat"));
        assert!(sections("").is_empty());
    }

    /// An unchanged plan needs no transaction.
    #[test]
    fn incremental_of_same_plan_is_empty() {
        let p = plan(&cluster(BASE), "test-node", Backend::Iptables);
        assert_eq!(render_incremental(&p, &p), "");
    }
}
