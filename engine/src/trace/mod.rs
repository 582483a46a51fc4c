//! Where does this packet go? The tracer executes a parsed kernel program over a small model of
//! the Linux packet path, following every load-balancing branch with its probability.
//!
//! Each backend parses its own program text into something that implements [`Netfilter`]; this
//! module owns what they share: the packet, the hook order (prerouting → routing → forward/input
//! → postrouting, or output → postrouting for the node's own traffic), the verdicts, and the
//! continuation across the cluster to the endpoint's node and pod and back. The plan is never
//! consulted: the program is the truth.

pub mod iptables;
pub mod ipvs;
pub mod nftables;
pub mod path;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::model::{IpFamily, Protocol};

/// A netfilter hook, in the order a packet meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// An address and port, printed `10.0.0.1:80` or `[fd00::1]:80` as the contract requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SocketAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for SocketAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

impl Serialize for SocketAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SocketAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for SocketAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (ip, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, port) = rest.split_once("]:").ok_or_else(|| format!("{s:?}: expected [IPv6]:PORT"))?;
            (ip, port)
        } else {
            s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected IP:PORT"))?
        };
        let ip: IpAddr =
            crate::input::parse_ip_sloppy(ip).ok_or_else(|| format!("{s:?}: {ip:?} is not an IP address"))?;
        if ip.is_ipv6() && !s.starts_with('[') {
            return Err(format!("{s:?}: write IPv6 addresses as [addr]:port"));
        }
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        Ok(SocketAddr { ip, port })
    }
}

/// The first packet of a connection, as it leaves its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub protocol: Protocol,
}

impl Packet {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.dst)
    }
}

/// What the node knows about itself that the kernel would know: its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    pub node: String,
    /// The node's own addresses (from `Node.status.addresses`); loopback is always local too.
    pub addresses: Vec<IpAddr>,
}

impl NodeContext {
    /// `fib daddr type local` / `addrtype LOCAL`.
    pub fn is_local(&self, ip: &IpAddr) -> bool {
        ip.is_loopback() || self.addresses.contains(ip)
    }
    pub fn loopback(family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }
}

/// One step of a path, for humans and the UI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hop {
    /// Where: a hook and table (`prerouting nat`), or a place (`pod network`, `pod`).
    pub at: String,
    /// What happened there, in words (`dnat to 10.244.2.15:8080`, `mark for masquerade`).
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// The rule (or map element) that matched, as the program writes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The comment that says which Service and field produced it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The node this hop happens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The packet after this hop (`src → dst`), when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet: Option<String>,
}

impl Hop {
    pub fn new(at: impl Into<String>, action: impl Into<String>) -> Self {
        Hop { at: at.into(), action: action.into(), chain: None, rule: None, comment: None, node: None, packet: None }
    }
    pub fn chain(mut self, c: impl Into<String>) -> Self {
        self.chain = Some(c.into());
        self
    }
    pub fn rule(mut self, r: impl Into<String>) -> Self {
        self.rule = Some(r.into());
        self
    }
    pub fn comment(mut self, c: Option<String>) -> Self {
        self.comment = c;
        self
    }
}

/// The hops of one branch: a persistent list, so forking a branch at every load-balancing
/// choice costs a pointer copy rather than a copy of every hop so far.
#[derive(Debug, Clone, Default)]
pub struct Hops {
    last: Option<std::sync::Arc<(Hop, Hops)>>,
    len: usize,
}

impl Hops {
    pub fn push(&mut self, hop: Hop) {
        let prev = std::mem::take(self);
        self.len = prev.len + 1;
        self.last = Some(std::sync::Arc::new((hop, prev)));
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The hops in the order they happened.
    pub fn to_vec(&self) -> Vec<Hop> {
        let mut out = Vec::with_capacity(self.len);
        let mut cur = self;
        while let Some(node) = &cur.last {
            out.push(node.0.clone());
            cur = &node.1;
        }
        out.reverse();
        out
    }
}

impl PartialEq for Hops {
    fn eq(&self, other: &Self) -> bool {
        self.to_vec() == other.to_vec()
    }
}

/// How one hook ended for a branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookVerdict {
    /// The packet goes on (the chain fell through or accepted).
    Continue,
    /// An explicit `accept` in one of our chains.
    Accept,
    Drop,
    Reject,
}

/// The packet as it moves through the hooks of one node, on one branch.
#[derive(Debug, Clone, PartialEq)]
pub struct PacketState {
    /// The packet as it is now (after any DNAT).
    pub packet: Packet,
    /// The packet as it was sent.
    pub original: Packet,
    pub mark: u32,
    /// Set once a nat rule translated the destination.
    pub dnat: Option<SocketAddr>,
    /// Set once a `masquerade` (or SNAT) rewrote the source.
    pub masquerade: bool,
    /// An explicit accept by one of our rules.
    pub accepted: bool,
    pub probability: f64,
    pub hops: Hops,
    /// Whether this branch records hops. Only one sampled path is drawn, so at a
    /// load-balancing fork a program may keep recording on the branch the seed picks and skip
    /// the words for the others; outcomes and probabilities are unaffected.
    pub record: bool,
    /// Drives that pick; forks advance it.
    pub seed: u64,
}

impl PacketState {
    /// At a fork into `weights.len()` branches, which one keeps recording (if this one does).
    pub fn pick(&mut self, weights: &[f64]) -> Option<usize> {
        if !self.record {
            return None;
        }
        let total: f64 = weights.iter().sum();
        let mut x = crate::trace::path::next_unit(&mut self.seed) * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return Some(i);
            }
            x -= w;
        }
        weights.len().checked_sub(1)
    }

    pub fn new(p: Packet) -> Self {
        PacketState {
            packet: p,
            original: p,
            mark: 0,
            dnat: None,
            masquerade: false,
            accepted: false,
            probability: 1.0,
            hops: Hops::default(),
            record: true,
            seed: 0,
        }
    }
}

/// A parsed kernel program that can run a packet through one hook.
pub trait Netfilter {
    /// Runs every chain of this program attached to `hook`, in priority order. Returns each
    /// branch the packet can take, with its probability multiplied into the state.
    fn run_hook(&self, hook: Hook, state: PacketState, ctx: &NodeContext) -> Vec<(PacketState, HookVerdict)>;
}

/// The contract's verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Forward,
    Reject,
    Drop,
    Accept,
    NoMatch,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forward => "forward",
            Verdict::Reject => "reject",
            Verdict::Drop => "drop",
            Verdict::Accept => "accept",
            Verdict::NoMatch => "no-match",
        }
    }
}

/// One endpoint a packet can reach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub endpoint: SocketAddr,
    pub probability: f64,
    pub masquerade: bool,
    /// The node that hosts the endpoint, when the cluster input says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The pod behind the endpoint, when the cluster input says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// The answer to "where does this packet go?".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    pub verdict: Verdict,
    pub outcomes: Vec<Outcome>,
    /// One sampled path, reply included.
    pub hops: Vec<Hop>,
    pub packet: Packet,
    pub node: String,
    pub backend: String,
    /// A DNS hop that preceded the packet (`--to name:port`), or the ExternalName CNAME.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::dns::Resolution>,
}
