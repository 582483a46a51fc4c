//! The IPVS backend end to end: programs parse back to what was rendered, transactions applied to
//! the old program give the new one, schedulers share traffic as IPVS does, and `ipvsadm -Ln`
//! looks like ipvsadm's.

#![allow(clippy::unwrap_used)]

mod common;

use common::{FIXTURES, cluster};
use switchyard_engine::cluster::Cluster;
use switchyard_engine::policy::{self, Backend};
use switchyard_engine::render::ipvs as render;
use switchyard_engine::render::ipvs::{RealServer, VsKey};
use switchyard_engine::trace::ipvs::Program;
use switchyard_engine::trace::path::{self, Topology};
use switchyard_engine::trace::{NodeContext, Packet, SocketAddr, Verdict};
use switchyard_engine::{Destination, TraceRequest};

fn clusters() -> Vec<(String, Cluster, Vec<String>)> {
    let mut v: Vec<(String, Cluster, Vec<String>)> =
        FIXTURES.iter().map(|(n, t)| (n.to_string(), cluster(n, t), vec!["test-node".to_string()])).collect();
    let demo = switchyard_engine::demo::cluster();
    let nodes = demo.nodes.keys().cloned().collect();
    v.push(("demo".into(), demo, nodes));
    v
}

fn trace(c: &Cluster, node: &str, from: &str, to: &str, program: Option<String>) -> switchyard_engine::trace::Trace {
    let req = TraceRequest {
        node: node.into(),
        backend: Backend::Ipvs,
        program,
        from: from.parse().unwrap(),
        to: to.parse::<Destination>().unwrap(),
        protocol: switchyard_engine::model::Protocol::Tcp,
        seed: 7,
    };
    switchyard_engine::trace(c, &req).unwrap()
}

/// Every rendered program parses back to the model it was written from: virtual servers (with
/// their comments), set members, addresses; and `ipvsadm -Sn` output alone parses too.
#[test]
fn programs_parse_back() {
    for (name, c, nodes) in clusters() {
        for node in nodes {
            let plan = policy::plan(&c, &node, Backend::Ipvs);
            let model = render::model(&plan);
            let text = render::render(&plan);
            let p = Program::parse(&text).unwrap_or_else(|e| panic!("{name} {node}: {e}"));
            assert_eq!(p.services, model.services, "{name} {node}");
            assert_eq!(p.addresses, model.addresses, "{name} {node}");
            assert_eq!(p.sets.len(), model.sets.len(), "{name} {node}");
            for (set, m) in &model.sets {
                assert_eq!(p.sets[set].members.len(), m.members.len(), "{name} {node} {set}");
                assert_eq!(p.sets[set].kind, m.kind);
            }
            assert!(p.iptables.rule_count() > 0);
            // `ipvsadm -Sn` prints the same lines, without our comments or the other parts.
            let saved: String = text
                .lines()
                .skip_while(|l| *l != render::SECTION_IPVSADM)
                .skip(1)
                .take_while(|l| !l.starts_with("# ipset"))
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect();
            let plain = Program::parse(&saved).unwrap();
            let mut want = model.services.clone();
            want.values_mut().for_each(|v| v.comment = None);
            assert_eq!(plain.services, want, "{name} {node}: ipvsadm -Sn");
        }
    }
}

/// A transaction applied to the old program gives the new program, for a series of changes
/// (endpoints removed, a service removed and back, affinity and scheduler changed).
#[test]
fn incremental_applied_equals_new() {
    for (name, start, nodes) in clusters() {
        let mut steps: Vec<Cluster> = Vec::new();
        let mut c = start.clone();
        if let Some(k) = c.endpoint_slices.keys().next().cloned() {
            c.endpoint_slices.remove(&k);
            steps.push(c.clone());
        }
        if let Some(k) = c.services.keys().next().cloned() {
            c.services.remove(&k);
            steps.push(c.clone());
        }
        let mut c2 = start.clone();
        c2.config.ipvs_scheduler = "sh".into();
        for s in c2.services.values_mut() {
            s.session_affinity_timeout = Some(60);
        }
        steps.push(c2);
        steps.push(start.clone());
        for node in nodes {
            let mut prev = start.clone();
            let mut program = Program::parse(&switchyard_engine::render(&prev, &node, Backend::Ipvs).unwrap()).unwrap();
            for (i, next) in steps.iter().enumerate() {
                let tx = switchyard_engine::render_incremental(&prev, next, &node, Backend::Ipvs).unwrap();
                // The same change with the changed services named, as the agent's sync loop does.
                let (po, pn) = (policy::plan(&prev, &node, Backend::Ipvs), policy::plan(next, &node, Backend::Ipvs));
                let hinted = render::render_incremental_for(&po, &pn, Some(&changed_services(&prev, next)));
                let mut via_hint = program.clone();
                via_hint.apply(&hinted).unwrap_or_else(|e| panic!("{name} {node} step {i} (hint): {e}\n{hinted}"));
                program.apply(&tx).unwrap_or_else(|e| panic!("{name} {node} step {i}: {e}\n{tx}"));
                assert_eq!(via_hint.services, program.services, "{name} {node} step {i}: hint");
                assert_eq!(via_hint.sets, program.sets, "{name} {node} step {i}: hint");
                assert_eq!(via_hint.addresses, program.addresses, "{name} {node} step {i}: hint");
                let want = Program::parse(&switchyard_engine::render(next, &node, Backend::Ipvs).unwrap()).unwrap();
                assert_eq!(program.services, want.services, "{name} {node} step {i}");
                assert_eq!(program.sets, want.sets, "{name} {node} step {i}");
                assert_eq!(program.addresses, want.addresses, "{name} {node} step {i}");
                assert_eq!(program.iptables, want.iptables, "{name} {node} step {i}");
                prev = next.clone();
            }
            assert_eq!(switchyard_engine::render_incremental(&prev, &prev, &node, Backend::Ipvs).unwrap(), "");
        }
    }
}

/// The services whose objects differ between two clusters (what a sync loop's change tracker knows).
fn changed_services(a: &Cluster, b: &Cluster) -> std::collections::BTreeSet<switchyard_engine::model::ObjectKey> {
    let (sa, sb) = (a.slices_by_service(), b.slices_by_service());
    let keys: std::collections::BTreeSet<_> =
        a.services.keys().chain(b.services.keys()).chain(sa.keys()).chain(sb.keys()).cloned().collect();
    keys.into_iter().filter(|k| a.services.get(k) != b.services.get(k) || sa.get(k) != sb.get(k)).collect()
}

/// A transaction uses ipvsadm's edit commands: real servers removed with `-d`, weights with `-e`,
/// scheduler changes with `-E`.
#[test]
fn transactions_use_ipvsadm_commands() {
    let c = switchyard_engine::demo::cluster();
    let mut fewer = c.clone();
    fewer.endpoint_slices.retain(|k, _| !k.name.starts_with("nginx"));
    let tx = switchyard_engine::render_incremental(&c, &fewer, "node-1", Backend::Ipvs).unwrap();
    assert!(tx.contains("\n-d -t 10.96.0.10:80 -r 10.244.1.10:8080\n"), "{tx}");
    assert!(tx.contains("\ndel SWITCHYARD-LOOP-BACK 10.244.1.10,tcp:8080,10.244.1.10\n"), "{tx}");
    let mut sh = c.clone();
    sh.config.ipvs_scheduler = "sh".into();
    let tx = switchyard_engine::render_incremental(&c, &sh, "node-1", Backend::Ipvs).unwrap();
    assert!(tx.contains("\n-E -t 10.96.0.10:80 -s sh\n"), "{tx}");
}

/// Every scheduler is written as configured; those that depend on connection state share
/// traffic by weight, and sh/dh/mh pick one real server as a fixed function of the packet.
#[test]
fn schedulers_share_by_weight_or_hash() {
    for sched in render::SCHEDULERS {
        let mut c = switchyard_engine::demo::cluster();
        c.config.ipvs_scheduler = sched.into();
        let text = switchyard_engine::render(&c, "node-1", Backend::Ipvs).unwrap();
        assert!(text.contains(&format!("-A -t 10.96.0.10:80 -s {sched}\n")), "{sched}");
        let t = trace(&c, "node-1", "10.244.1.50", "10.96.0.10:80", None);
        assert_eq!(t.verdict, Verdict::Forward, "{sched}");
        let sum: f64 = t.outcomes.iter().map(|o| o.probability).sum();
        assert!((sum - 1.0).abs() < 1e-9);
        if matches!(sched, "sh" | "dh" | "mh") {
            assert_eq!(t.outcomes.len(), 1, "{sched}: one real server");
            assert!(t.hops.iter().any(|h| h.action.contains("fixed function")), "{sched}");
            let again = trace(&c, "node-1", "10.244.1.50", "10.96.0.10:80", None);
            assert_eq!(again.outcomes, t.outcomes, "{sched}: deterministic");
        } else {
            assert_eq!(t.outcomes.len(), 2, "{sched}");
            assert!(t.outcomes.iter().all(|o| (o.probability - 0.5).abs() < 1e-9), "{sched}");
            assert!(t.hops.iter().any(|h| h.action.contains("long-run share 50.0%")), "{sched}");
        }
    }
}

/// Weights set the long-run shares; a weight-0 real server (draining) is never picked.
#[test]
fn weights_set_shares_and_weight_zero_drains() {
    let c = switchyard_engine::demo::cluster();
    let program = "-A -t 10.96.0.10:80 -s wrr\n\
                   -a -t 10.96.0.10:80 -r 10.244.1.10:8080 -m -w 1\n\
                   -a -t 10.96.0.10:80 -r 10.244.2.15:8080 -m -w 3\n\
                   -a -t 10.96.0.10:80 -r 10.244.3.99:8080 -m -w 0\n";
    let p = Program::parse(program).unwrap();
    let ctx = p.node_context(&NodeContext { node: "node-1".into(), addresses: vec!["192.168.1.11".parse().unwrap()] });
    assert!(ctx.is_local(&"10.96.0.10".parse().unwrap()) || p.addresses.is_empty());
    // Without the dummy-interface part the address is not local: bind it as kube-ipvs0 would.
    let mut ctx = ctx;
    ctx.addresses.push("10.96.0.10".parse().unwrap());
    let packet = Packet {
        src: "10.244.1.50".parse().unwrap(),
        src_port: 40000,
        dst: "10.96.0.10".parse().unwrap(),
        dst_port: 80,
        protocol: switchyard_engine::model::Protocol::Tcp,
    };
    let t = path::trace(&p, &ctx, &Topology::from_cluster(&c), packet, "ipvs", 1);
    assert_eq!(t.verdict, Verdict::Forward);
    let shares: Vec<(String, f64)> = t.outcomes.iter().map(|o| (o.endpoint.to_string(), o.probability)).collect();
    assert_eq!(shares, [("10.244.1.10:8080".to_string(), 0.25), ("10.244.2.15:8080".to_string(), 0.75)]);
    // All at weight 0: no real server takes new connections, IPVS rejects.
    let drained = Program::parse(&program.replace("-w 1", "-w 0").replace("-w 3", "-w 0")).unwrap();
    let t = path::trace(&drained, &ctx, &Topology::from_cluster(&c), packet, "ipvs", 1);
    assert_eq!(t.verdict, Verdict::Reject);
    assert!(t.hops.iter().any(|h| h.action.contains("ICMP port unreachable")));
}

/// Terminating endpoints that no traffic may use stay as weight-0 real servers (graceful
/// termination), and the tracer never sends to them.
#[test]
fn terminating_endpoints_drain_at_weight_zero() {
    let (_, text) = FIXTURES.iter().find(|(n, _)| *n == "ep-terminating-local").unwrap();
    let c = cluster("ep-terminating-local", text);
    let model = render::model(&policy::plan(&c, "test-node", Backend::Ipvs));
    let vs = model
        .services
        .values()
        .find(|v| v.reals.iter().any(|r| r.weight == 0))
        .expect("a virtual server with a draining real server");
    let live: Vec<&RealServer> = vs.reals.iter().filter(|r| r.weight > 0).collect();
    assert!(!live.is_empty());
    if let VsKey::Addr { addr, .. } = vs.key {
        let t = trace(&c, "test-node", "10.180.0.250", &addr.to_string(), None);
        let drained: Vec<SocketAddr> = vs.reals.iter().filter(|r| r.weight == 0).map(|r| r.addr).collect();
        assert!(t.outcomes.iter().all(|o| !drained.contains(&o.endpoint)), "{t:?}");
    }
}

/// `ipvsadm -Ln`'s layout: header, service lines, real-server columns.
#[test]
fn list_looks_like_ipvsadm() {
    let mut c = switchyard_engine::demo::cluster();
    c.config.ipvs_scheduler = "wlc".into();
    let out = switchyard_engine::ipvs_list(&c, "node-1").unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "IP Virtual Server version 1.2.1 (size=4096)");
    assert_eq!(lines[1], "Prot LocalAddress:Port Scheduler Flags");
    assert_eq!(lines[2], "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn");
    let i = lines.iter().position(|l| *l == "TCP  10.96.0.10:80 wlc").expect("nginx-svc");
    assert_eq!(lines[i + 1], "  -> 10.244.1.10:8080             Masq    1      0          0         ");
    assert!(lines.contains(&"TCP  10.96.0.30:80 wlc persistent 600"), "{out}");
    assert!(lines.contains(&"UDP  10.96.0.53:53 wlc"), "{out}");
}

/// The same packets through `--program` text as through the rendered program.
#[test]
fn given_program_traces_like_rendered() {
    let c = switchyard_engine::demo::cluster();
    let text = switchyard_engine::render(&c, "node-1", Backend::Ipvs).unwrap();
    for (from, to) in
        [("10.244.1.50", "10.96.0.10:80"), ("198.51.100.23", "34.101.12.7:80"), ("10.244.1.50", "10.96.0.40:80")]
    {
        let a = trace(&c, "node-1", from, to, None);
        let b = trace(&c, "node-1", from, to, Some(text.clone()));
        assert_eq!(a.verdict, b.verdict);
        assert_eq!(a.outcomes, b.outcomes);
    }
}

/// A node's own listings, concatenated (`ipvsadm -Sn; ipset save; iptables-save`, kube-proxy's
/// names), trace too: the sets feed the `-m set` matches, and virtual-server addresses count as
/// bound to the dummy interface.
#[test]
fn node_listings_trace() {
    let c = switchyard_engine::demo::cluster();
    let listing = "-A -t 10.96.0.10:80 -s rr\n\
                   -a -t 10.96.0.10:80 -r 10.244.1.10:8080 -m -w 1\n\
                   create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n\
                   add KUBE-CLUSTER-IP 10.96.0.10,tcp:80\n\
                   # Generated by iptables-save v1.8.9 on Thu Nov 26 08:00:00 2026\n\
                   *nat\n\
                   :PREROUTING ACCEPT [0:0]\n\
                   :KUBE-SERVICES - [0:0]\n\
                   :KUBE-MARK-MASQ - [0:0]\n\
                   -A PREROUTING -j KUBE-SERVICES\n\
                   -A KUBE-SERVICES ! -s 10.244.0.0/16 -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ\n\
                   -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
                   COMMIT\n";
    let p = Program::parse(listing).unwrap();
    assert_eq!(p.services.len(), 1);
    assert_eq!(p.sets["KUBE-CLUSTER-IP"].members.len(), 1);
    let t = trace(&c, "node-1", "198.51.100.9", "10.96.0.10:80", Some(listing.to_string()));
    assert_eq!(t.verdict, Verdict::Forward);
    assert_eq!(t.outcomes.len(), 1);
    assert!(t.hops.iter().any(|h| h.action == "mark for masquerade"), "{:?}", t.hops);
}

/// With the changed services named, a transaction is the same as comparing whole programs, and
/// it keeps what an unchanged service still needs (an endpoint behind two services stays in the
/// hairpin set when one of them goes).
#[test]
fn hinted_transactions_keep_shared_members() {
    use switchyard_engine::model::ObjectKey;
    let c = switchyard_engine::demo::cluster();
    let nginx = ObjectKey::new("default", "nginx-svc");
    let mut fewer = c.clone();
    fewer.endpoint_slices.retain(|k, _| !k.name.starts_with("nginx"));
    let (po, pn) = (policy::plan(&c, "node-1", Backend::Ipvs), policy::plan(&fewer, "node-1", Backend::Ipvs));
    let only = [nginx.clone()].into_iter().collect();
    assert_eq!(render::render_incremental_for(&po, &pn, Some(&only)), render::render_incremental(&po, &pn));

    // A second service in front of nginx's pods, then removed again.
    let mut two = c.clone();
    let copy = ObjectKey::new("default", "nginx-copy");
    let mut svc = c.services[&nginx].clone();
    svc.key = copy.clone();
    svc.cluster_ips = vec!["10.96.0.11".parse().unwrap()];
    svc.load_balancer_ingress.clear();
    svc.external_ips.clear();
    svc.ports.iter_mut().for_each(|p| p.node_port = None);
    svc.service_type = switchyard_engine::model::ServiceType::ClusterIP;
    two.services.insert(copy.clone(), svc);
    let slices: Vec<_> = c.endpoint_slices.values().filter(|s| s.service == "nginx-svc").cloned().collect();
    for mut s in slices {
        s.key = ObjectKey::new("default", format!("{}-copy", s.key.name));
        s.service = "nginx-copy".into();
        two.endpoint_slices.insert(s.key.clone(), s);
    }
    let (p2, p1) = (policy::plan(&two, "node-1", Backend::Ipvs), policy::plan(&c, "node-1", Backend::Ipvs));
    let only = [copy].into_iter().collect();
    let tx = render::render_incremental_for(&p2, &p1, Some(&only));
    assert!(tx.contains("-D -t 10.96.0.11:80\n"), "{tx}");
    assert!(!tx.contains("del SWITCHYARD-LOOP-BACK"), "{tx}");
    let mut program = Program::parse(&render::render(&p2)).unwrap();
    program.apply(&tx).unwrap();
    let want = Program::parse(&render::render(&p1)).unwrap();
    assert_eq!(program.sets, want.sets);
    assert_eq!(program.services.len(), want.services.len());
}
