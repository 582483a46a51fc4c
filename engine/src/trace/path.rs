//! The Linux packet path on one node, and the rest of the way across the cluster and back.
//!
//! The node's own traffic starts at `output`; everything else arrives at `prerouting`. After the
//! nat hooks, routing sends the packet to `input` (a local address) or `forward`, then
//! `postrouting`. Branches fork wherever the program load-balances.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::*;
use crate::cluster::Cluster;

/// Where endpoints and nodes live, from the cluster input (not the plan): used only to draw the
/// rest of the path after the program has decided it.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Endpoint address → (node, pod).
    endpoints: BTreeMap<IpAddr, (Option<String>, Option<String>)>,
    nodes: Vec<(String, Vec<IpAddr>, Vec<IpNet>)>,
}

impl Topology {
    pub fn from_cluster(c: &Cluster) -> Self {
        let mut endpoints = BTreeMap::new();
        for s in c.endpoint_slices.values().chain(c.legacy_endpoints.values().flatten()) {
            for e in &s.endpoints {
                endpoints.entry(e.address).or_insert((e.node_name.clone(), e.target.clone()));
            }
        }
        let nodes = c.nodes.values().map(|n| (n.name.clone(), n.ips(), n.pod_cidrs.clone())).collect();
        Topology { endpoints, nodes }
    }

    /// The node and pod behind an address: from the slices, else by pod CIDR or node address.
    pub fn locate(&self, ip: &IpAddr) -> (Option<String>, Option<String>) {
        if let Some((n, p)) = self.endpoints.get(ip)
            && n.is_some()
        {
            return (n.clone(), p.clone());
        }
        let pod = self.endpoints.get(ip).and_then(|(_, p)| p.clone());
        for (name, ips, cidrs) in &self.nodes {
            if ips.contains(ip) || cidrs.iter().any(|c| c.contains(ip)) {
                return (Some(name.clone()), pod);
            }
        }
        (None, pod)
    }

    pub fn node_ip(&self, node: &str, family: IpFamily) -> Option<IpAddr> {
        self.nodes
            .iter()
            .find(|(n, ..)| n == node)
            .and_then(|(_, ips, _)| ips.iter().copied().find(|ip| IpFamily::of(ip) == family))
    }
}

/// A small deterministic generator so a sampled path is repeatable from a seed.
pub(crate) fn next_unit(seed: &mut u64) -> f64 {
    // splitmix64
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn packet_text(p: &Packet) -> String {
    format!(
        "{} → {} {}",
        SocketAddr { ip: p.src, port: p.src_port },
        SocketAddr { ip: p.dst, port: p.dst_port },
        p.protocol
    )
}

/// Runs `packet` through `program` on the node `ctx`, then draws the rest of one sampled path.
pub fn trace(
    program: &dyn Netfilter,
    ctx: &NodeContext,
    topo: &Topology,
    packet: Packet,
    backend: &str,
    seed: u64,
) -> Trace {
    let local_origin = ctx.is_local(&packet.src);
    let mut first = PacketState::new(packet);
    first.seed = seed;
    first.hops.push(Hop {
        node: Some(ctx.node.clone()),
        packet: Some(packet_text(&packet)),
        ..Hop::new(
            if local_origin { "node" } else { "arrival" },
            if local_origin { format!("sent by {} itself", ctx.node) } else { format!("arrives at {}", ctx.node) },
        )
    });

    // Each branch: state and whether it has ended (with the verdict that ended it).
    let mut done: Vec<(PacketState, HookVerdict)> = Vec::new();
    let mut live = vec![first];
    let start = if local_origin { Hook::Output } else { Hook::Prerouting };
    live = run(program, ctx, start, live, &mut done);
    // Routing: local destinations go to input; the rest are forwarded.
    let (mut to_input, mut to_forward) = (Vec::new(), Vec::new());
    for s in live {
        if ctx.is_local(&s.packet.dst) { to_input.push(s) } else { to_forward.push(s) }
    }
    // IPVS translates at input (LOCAL_IN) and sends the packet out again, through postrouting;
    // the other backends translate before routing, so what reaches input stays.
    let resend = |delivered: Vec<PacketState>, finished: &mut Vec<PacketState>| -> Vec<PacketState> {
        let (resent, delivered): (Vec<_>, Vec<_>) =
            delivered.into_iter().partition(|s| s.dnat.is_some() && !ctx.is_local(&s.packet.dst));
        finished.extend(delivered);
        resent
    };
    let mut finished = Vec::new();
    let resent = if local_origin {
        let after = run(program, ctx, Hook::Postrouting, to_input, &mut done);
        let resent = resend(run(program, ctx, Hook::Input, after, &mut done), &mut finished);
        finished.extend(run(program, ctx, Hook::Postrouting, to_forward, &mut done));
        resent
    } else {
        let resent = resend(run(program, ctx, Hook::Input, to_input, &mut done), &mut finished);
        let fwd = run(program, ctx, Hook::Forward, to_forward, &mut done);
        finished.extend(run(program, ctx, Hook::Postrouting, fwd, &mut done));
        resent
    };
    finished.extend(run(program, ctx, Hook::Postrouting, resent, &mut done));
    done.extend(finished.into_iter().map(|s| (s, HookVerdict::Continue)));

    let verdict_of = |s: &PacketState, v: HookVerdict| match v {
        HookVerdict::Drop => Verdict::Drop,
        HookVerdict::Reject => Verdict::Reject,
        _ if s.dnat.is_some() => Verdict::Forward,
        _ if s.accepted || v == HookVerdict::Accept => Verdict::Accept,
        _ => Verdict::NoMatch,
    };
    // The overall verdict is the most likely one (branches agree in every program we write).
    let mut by_verdict: Vec<(Verdict, f64)> = Vec::new();
    for (s, v) in &done {
        let verdict = verdict_of(s, *v);
        match by_verdict.iter_mut().find(|(x, _)| *x == verdict) {
            Some((_, p)) => *p += s.probability,
            None => by_verdict.push((verdict, s.probability)),
        }
    }
    let verdict = by_verdict.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|(v, _)| *v).unwrap_or(Verdict::NoMatch);

    let mut outcomes: Vec<Outcome> = Vec::new();
    if verdict == Verdict::Forward {
        let total: f64 =
            done.iter().filter(|(s, v)| verdict_of(s, *v) == Verdict::Forward).map(|(s, _)| s.probability).sum();
        for (s, v) in &done {
            if verdict_of(s, *v) != Verdict::Forward {
                continue;
            }
            let Some(ep) = s.dnat else { continue };
            match outcomes.iter_mut().find(|o| o.endpoint == ep && o.masquerade == s.masquerade) {
                Some(o) => o.probability += s.probability / total,
                None => {
                    let (node, pod) = topo.locate(&ep.ip);
                    outcomes.push(Outcome {
                        endpoint: ep,
                        probability: s.probability / total,
                        masquerade: s.masquerade,
                        node,
                        pod,
                    })
                }
            }
        }
        outcomes.sort_by(|a, b| a.endpoint.cmp(&b.endpoint).then(a.masquerade.cmp(&b.masquerade)));
    }

    // One sampled path among the branches of the winning verdict.
    let mut seed = seed;
    let mut candidates: Vec<&(PacketState, HookVerdict)> =
        done.iter().filter(|(s, v)| verdict_of(s, *v) == verdict).collect();
    // A program that sampled at its forks recorded hops on one branch only: draw that one.
    if candidates.iter().any(|(s, _)| !s.record) {
        candidates.retain(|(s, _)| s.record);
        if candidates.is_empty() {
            candidates = done.iter().filter(|(s, v)| verdict_of(s, *v) == verdict).collect();
        }
    }
    let total: f64 = candidates.iter().map(|(s, _)| s.probability).sum();
    let mut pick = next_unit(&mut seed) * total;
    let mut chosen = candidates.first().map(|(s, _)| s.clone());
    for (s, _) in &candidates {
        if pick < s.probability {
            chosen = Some(s.clone());
            break;
        }
        pick -= s.probability;
    }
    let mut hops = chosen.as_ref().map(|s| s.hops.to_vec()).unwrap_or_default();
    if let Some(s) = &chosen {
        hops.extend(finish(s, verdict, ctx, topo));
    }
    Trace { verdict, outcomes, hops, packet, node: ctx.node.clone(), backend: backend.to_string(), dns: None }
}

fn run(
    program: &dyn Netfilter,
    ctx: &NodeContext,
    hook: Hook,
    states: Vec<PacketState>,
    done: &mut Vec<(PacketState, HookVerdict)>,
) -> Vec<PacketState> {
    let mut next = Vec::new();
    for s in states {
        for (s, v) in program.run_hook(hook, s, ctx) {
            match v {
                HookVerdict::Drop | HookVerdict::Reject => done.push((s, v)),
                HookVerdict::Accept | HookVerdict::Continue => next.push(s),
            }
        }
    }
    next
}

/// The hops after the node's program: across the pod network to the endpoint, and the reply.
fn finish(s: &PacketState, verdict: Verdict, ctx: &NodeContext, topo: &Topology) -> Vec<Hop> {
    let mut hops = Vec::new();
    let on = |h: Hop, node: &Option<String>| Hop { node: node.clone(), ..h };
    let here = Some(ctx.node.clone());
    match verdict {
        Verdict::Forward => {
            let Some(ep) = s.dnat else { return hops };
            let family = s.packet.family();
            let src = if s.masquerade {
                topo.node_ip(&ctx.node, family)
                    .or_else(|| ctx.addresses.iter().copied().find(|ip| IpFamily::of(ip) == family))
                    .unwrap_or(s.original.src)
            } else {
                s.original.src
            };
            let wire = Packet { src, dst: ep.ip, dst_port: ep.port, ..s.original };
            let (ep_node, pod) = topo.locate(&ep.ip);
            let pod_name = pod.clone().unwrap_or_else(|| ep.ip.to_string());
            if ep_node.is_some() && ep_node != here {
                let node = ep_node.clone().unwrap_or_default();
                hops.push(Hop {
                    packet: Some(packet_text(&wire)),
                    ..on(Hop::new("pod network", format!("routed from {} to {node}", ctx.node)), &here)
                });
            }
            let at = ep_node.clone().or(here.clone());
            hops.push(Hop {
                packet: Some(packet_text(&wire)),
                ..on(Hop::new("pod", format!("delivered to {pod_name}; it sees source {src}")), &at)
            });
            let reply = Packet {
                src: ep.ip,
                src_port: ep.port,
                dst: src,
                dst_port: s.original.src_port,
                protocol: s.original.protocol,
            };
            hops.push(Hop {
                packet: Some(packet_text(&reply)),
                ..on(Hop::new("reply", format!("{pod_name} replies")), &at)
            });
            let mut restored = Packet { src: s.original.dst, src_port: s.original.dst_port, ..reply };
            let mut what = format!(
                "conntrack reverses the DNAT: source back to {}",
                SocketAddr { ip: s.original.dst, port: s.original.dst_port }
            );
            if s.masquerade {
                restored.dst = s.original.src;
                what.push_str(&format!(", and the masquerade: destination back to {}", s.original.src));
            }
            hops.push(Hop { packet: Some(packet_text(&restored)), ..on(Hop::new("reply conntrack", what), &here) });
            hops.push(on(Hop::new("client", format!("{} receives the reply", s.original.src)), &None));
        }
        Verdict::Reject => {
            hops.push(on(Hop::new("client", "connection refused (ICMP port unreachable or TCP reset)"), &None))
        }
        Verdict::Drop => hops.push(on(Hop::new("client", "no answer: the packet was dropped"), &None)),
        Verdict::Accept => hops.push(on(Hop::new("input", format!("delivered to a process on {}", ctx.node)), &here)),
        Verdict::NoMatch => {
            let what = if ctx.is_local(&s.packet.dst) {
                format!("not a service: delivered to {} untranslated", ctx.node)
            } else {
                "not a service: routed on untranslated".to_string()
            };
            hops.push(on(Hop::new("routing", what), &here));
        }
    }
    hops
}
