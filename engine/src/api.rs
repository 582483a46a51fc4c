//! The engine's front door: render a node's program, and trace a packet through a program.

use std::net::IpAddr;

use crate::cluster::Cluster;
use crate::dns;
use crate::model::{IpFamily, Protocol};
use crate::policy::{self, Backend};

use crate::trace::path::{self, Topology};
use crate::trace::{NodeContext, Packet, SocketAddr, Trace};

/// Why a render or trace could not be done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node {0:?} is not in the cluster input (add its Node object)")]
    UnknownNode(String),
    #[error("the {0} backend is not available yet")]
    UnsupportedBackend(&'static str),
    #[error("cannot parse the nftables program: {0}")]
    Nftables(#[source] crate::trace::nftables::ParseError),
    #[error("cannot parse the iptables program: {0}")]
    Iptables(#[source] crate::trace::iptables::ParseError),
    #[error("cannot parse the IPVS program: {0}")]
    Ipvs(#[source] crate::trace::ipvs::ParseError),
    #[error("{0:?} is not a service name the cluster input knows")]
    UnknownName(String),
    #[error("{name:?} resolves to no address{detail}")]
    NoAddress { name: String, detail: String },
    #[error("source {from} and destination {to} are of different IP families")]
    FamilyMismatch { from: IpAddr, to: IpAddr },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn check_node(cluster: &Cluster, node: &str) -> Result<()> {
    if cluster.nodes.contains_key(node) { Ok(()) } else { Err(Error::UnknownNode(node.to_string())) }
}

/// The complete program of `node` for `backend`.
pub fn render(cluster: &Cluster, node: &str, backend: Backend) -> Result<String> {
    check_node(cluster, node)?;
    let plan = policy::plan(cluster, node, backend);
    match backend {
        Backend::Nftables => Ok(crate::render::nftables::render(&plan)),
        Backend::Iptables => Ok(crate::render::iptables::render(&plan)),
        Backend::Ipvs => Ok(crate::render::ipvs::render(&plan)),
    }
}

/// The transaction that turns `old`'s program into `new`'s.
pub fn render_incremental(old: &Cluster, new: &Cluster, node: &str, backend: Backend) -> Result<String> {
    check_node(new, node)?;
    let (a, b) = (policy::plan(old, node, backend), policy::plan(new, node, backend));
    match backend {
        Backend::Nftables => Ok(crate::render::nftables::render_incremental(&a, &b)),
        Backend::Iptables => Ok(crate::render::iptables::render_incremental(&a, &b)),
        Backend::Ipvs => Ok(crate::render::ipvs::render_incremental(&a, &b)),
    }
}

/// What `ipvsadm -Ln` would show on `node` once its IPVS program is loaded.
pub fn ipvs_list(cluster: &Cluster, node: &str) -> Result<String> {
    check_node(cluster, node)?;
    let plan = policy::plan(cluster, node, Backend::Ipvs);
    Ok(crate::render::ipvs::list(&crate::render::ipvs::model(&plan).services))
}

/// Where a traced packet is sent: an address, or a Service DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Addr(SocketAddr),
    Name { name: String, port: u16 },
}

impl std::str::FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if let Some((host, port)) = s.rsplit_once(':')
            && !host.starts_with('[')
            && dns::is_name(host)
        {
            let port = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
            return Ok(Destination::Name { name: host.to_string(), port });
        }
        s.parse().map(Destination::Addr)
    }
}

/// One question for the tracer.
#[derive(Debug, Clone)]
pub struct TraceRequest {
    pub node: String,
    pub backend: Backend,
    /// A program to trace instead of rendering one (as `render` prints it, or as the kernel lists it).
    pub program: Option<String>,
    pub from: IpAddr,
    pub to: Destination,
    pub protocol: Protocol,
    /// Seeds the one sampled path drawn for diagrams.
    pub seed: u64,
}

/// Traces one packet. The program (rendered, or given) is parsed and executed; the plan is only
/// used to write the program.
pub fn trace(cluster: &Cluster, req: &TraceRequest) -> Result<Trace> {
    check_node(cluster, &req.node)?;
    let family = IpFamily::of(&req.from);
    let (dst, resolution) = match &req.to {
        Destination::Addr(a) => (*a, None),
        Destination::Name { name, port } => {
            let r = dns::resolve(cluster, name).ok_or_else(|| Error::UnknownName(name.clone()))?;
            match r.address(Some(family)) {
                Some(ip) => (SocketAddr { ip, port: *port }, Some(r)),
                None => {
                    // ExternalName: DNS answers with a CNAME and the proxy never sees the packet.
                    let detail = match &r.answer {
                        dns::Answer::Cname { target } => format!(" in the cluster: it is a CNAME to {target}"),
                        _ => String::new(),
                    };
                    if let dns::Answer::Cname { .. } = r.answer {
                        return Ok(external_name_trace(&req.node, req, r, *port));
                    }
                    return Err(Error::NoAddress { name: name.clone(), detail });
                }
            }
        }
    };
    if IpFamily::of(&dst.ip) != family {
        return Err(Error::FamilyMismatch { from: req.from, to: dst.ip });
    }
    let text = match &req.program {
        Some(p) => p.clone(),
        None => render(cluster, &req.node, req.backend)?,
    };
    let tracer = Tracer::new(cluster, &req.node, req.backend, &text)?;
    let packet = Packet {
        src: req.from,
        src_port: 40000 + (req.seed % 20000) as u16,
        dst: dst.ip,
        dst_port: dst.port,
        protocol: req.protocol,
    };
    let mut t = tracer.trace(packet, req.seed);
    if let Some(r) = resolution {
        t.hops.insert(0, crate::trace::Hop::new("dns", format!("{} → {}", r.name, dst.ip)));
        t.dns = Some(r);
    }
    Ok(t)
}

/// A node's program parsed once, for tracing many packets through it (the agent explains every
/// connection conntrack reports against the program the kernel holds).
pub struct Tracer {
    program: Parsed,
    ctx: NodeContext,
    topo: Topology,
}

enum Parsed {
    Nftables(Box<crate::trace::nftables::Program>),
    Iptables(Box<crate::trace::iptables::Program>),
    Ipvs(Box<crate::trace::ipvs::Program>),
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("node", &self.ctx.node).finish_non_exhaustive()
    }
}

impl Tracer {
    /// Parses `program` (as `render` prints it, or as the kernel lists it) for `node` of `cluster`.
    pub fn new(cluster: &Cluster, node: &str, backend: Backend, program: &str) -> Result<Self> {
        check_node(cluster, node)?;
        let mut ctx = NodeContext {
            node: node.to_string(),
            addresses: cluster.nodes.get(node).map(|n| n.ips()).unwrap_or_default(),
        };
        let program = match backend {
            Backend::Nftables => {
                Parsed::Nftables(Box::new(crate::trace::nftables::Program::parse(program).map_err(Error::Nftables)?))
            }
            Backend::Iptables => {
                Parsed::Iptables(Box::new(crate::trace::iptables::Program::parse(program).map_err(Error::Iptables)?))
            }
            Backend::Ipvs => {
                let p = crate::trace::ipvs::Program::parse(program).map_err(Error::Ipvs)?;
                // IPVS binds its virtual addresses to the node: they are local from then on.
                ctx = p.node_context(&ctx);
                Parsed::Ipvs(Box::new(p))
            }
        };
        Ok(Tracer { program, ctx, topo: Topology::from_cluster(cluster) })
    }

    /// Traces one packet, ports and all, as it was sent.
    pub fn trace(&self, packet: Packet, seed: u64) -> Trace {
        let (ctx, topo) = (&self.ctx, &self.topo);
        match &self.program {
            Parsed::Nftables(p) => path::trace(p.as_ref(), ctx, topo, packet, "nftables", seed),
            Parsed::Iptables(p) => path::trace(p.as_ref(), ctx, topo, packet, "iptables", seed),
            Parsed::Ipvs(p) => path::trace(p.as_ref(), ctx, topo, packet, "ipvs", seed),
        }
    }

    /// Traces one packet whose endpoint was observed: of up to `tries` seeds, the first whose
    /// sampled path reaches `endpoint` is kept, so the path drawn is the one the packet took
    /// (outcomes do not depend on the seed). Falls back to the first trace.
    pub fn trace_towards(&self, packet: Packet, endpoint: Option<SocketAddr>, seed: u64, tries: u32) -> Trace {
        let first = self.trace(packet, seed);
        let Some(want) = endpoint else { return first };
        if !first.outcomes.iter().any(|o| o.endpoint == want) || crate::flow::sampled_endpoint(&first) == Some(want) {
            return first;
        }
        (1..tries as u64)
            .map(|i| self.trace(packet, seed.wrapping_add(i.wrapping_mul(0x9E37_79B9))))
            .find(|t| crate::flow::sampled_endpoint(t) == Some(want))
            .unwrap_or(first)
    }
}

/// An ExternalName service: the only hop is DNS; the connection leaves the cluster untouched.
fn external_name_trace(node: &str, req: &TraceRequest, r: dns::Resolution, port: u16) -> Trace {
    let target = match &r.answer {
        dns::Answer::Cname { target } => target.clone(),
        _ => String::new(),
    };
    let unspecified = match IpFamily::of(&req.from) {
        IpFamily::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpFamily::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    Trace {
        verdict: crate::trace::Verdict::NoMatch,
        outcomes: Vec::new(),
        hops: vec![
            crate::trace::Hop::new("dns", format!("{} is a CNAME to {target}", r.fqdn)),
            crate::trace::Hop::new(
                "client",
                format!("connects to {target}:{port} directly; the proxy is not involved"),
            ),
        ],
        packet: Packet { src: req.from, src_port: 40000, dst: unspecified, dst_port: port, protocol: req.protocol },
        node: node.to_string(),
        backend: req.backend.as_str().to_string(),
        dns: Some(r),
    }
}
