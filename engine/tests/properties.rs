//! Invariants over random clusters: what the tracer says about the rendered program agrees with
//! the cluster, and incremental transactions land exactly on the new program.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::*;
use switchyard_engine::policy::{self, Backend};
use switchyard_engine::render::nftables;
use switchyard_engine::synthetic;
use switchyard_engine::trace::Verdict;
use switchyard_engine::{Destination, TraceRequest, trace};

/// A service: (type 0-3, ETP Local, ITP Local, endpoints as (node 0-2, ready, serving, terminating),
/// ClientIP affinity timeout choice).
type SvcSpec = (u8, bool, bool, Vec<(u8, bool, bool, bool)>, u8);

fn build(specs: &[SvcSpec]) -> Cluster {
    let mut c = synthetic::cluster(0, 0);
    for (i, spec) in specs.iter().enumerate() {
        let (s, sl) = service_of(i as u32, spec);
        c.services.insert(s.key.clone(), s);
        c.endpoint_slices.insert(sl.key.clone(), sl);
    }
    c
}

/// Service `i` of a generated cluster and its one EndpointSlice.
fn service_of(i: u32, (ty, etp, itp, eps, affinity): &SvcSpec) -> (Service, EndpointSlice) {
    let mut s = synthetic::service(i);
    s.service_type = match ty {
        0 => ServiceType::ClusterIP,
        1 => ServiceType::NodePort,
        _ => ServiceType::LoadBalancer,
    };
    if s.service_type == ServiceType::ClusterIP {
        s.ports[0].node_port = None;
        s.load_balancer_ingress.clear();
    } else {
        s.ports[0].node_port = Some(30000 + i as u16);
    }
    if s.service_type != ServiceType::LoadBalancer {
        s.load_balancer_ingress.clear();
    } else if s.load_balancer_ingress.is_empty() {
        s.load_balancer_ingress.push(LoadBalancerIngress {
            ip: Some(format!("35.0.0.{}", i + 1).parse().unwrap()),
            hostname: None,
            ip_mode_proxy: false,
        });
    }
    s.external_traffic_policy_local = *etp;
    s.internal_traffic_policy_local = *itp;
    s.session_affinity_timeout = match affinity {
        0 | 1 => None,
        2 => Some(60),
        _ => Some(10800),
    };
    let mut sl = synthetic::slice(i, eps.len() as u32, 0);
    for (e, (node, ready, serving, terminating)) in sl.endpoints.iter_mut().zip(eps) {
        let names = ["node-a", "node-b", "node-c"];
        e.node_name = Some(names[*node as usize].into());
        e.ready = *ready;
        e.serving = *serving || *ready;
        e.terminating = *terminating && !*ready;
    }
    (s, sl)
}

/// A service for the replanning properties: the knobs of [`SvcSpec`], then a second port,
/// dual-stack, claimed by another proxy (not proxied), and where its endpoints live (0: one
/// slice, 1: two slices, 2: a legacy Endpoints object).
type RichSpec = (SvcSpec, bool, bool, bool, u8);

/// Services by position (`None`: absent), two namespaces so a namespace holds several services
/// whose names prefix each other (`svc1`, `svc10`).
fn build_rich(specs: &[Option<RichSpec>]) -> Cluster {
    let mut c = synthetic::cluster(0, 0);
    for (i, spec) in specs.iter().enumerate() {
        let Some((base, two_ports, dual, foreign, where_eps)) = spec else { continue };
        let i = i as u32;
        let (mut s, mut sl) = service_of(i, base);
        let ns = format!("ns{}", i % 2);
        s.key.namespace = ns.clone();
        sl.key.namespace = ns.clone();
        if *two_ports {
            let node_port = s.ports[0].node_port.map(|_| 31000 + i as u16);
            s.ports.push(ServicePort {
                name: "metrics".into(),
                protocol: Protocol::Tcp,
                port: 9090,
                target_port: TargetPort::Number(9090),
                node_port,
            });
            sl.ports.push(EndpointPort { name: "metrics".into(), protocol: Protocol::Tcp, port: 9090 });
        }
        if *foreign {
            s.labels.insert("service.kubernetes.io/service-proxy-name".into(), "other".into());
        }
        let mut slices = vec![sl.clone()];
        if *dual {
            s.cluster_ips.push(format!("fd00::{:x}", i + 1).parse().unwrap());
            let mut v6 = sl.clone();
            v6.key.name = format!("svc{i}-v6");
            v6.address_type = AddressType::IPv6;
            for (n, e) in v6.endpoints.iter_mut().enumerate() {
                e.address = format!("fd01::{:x}:{n:x}", i + 1).parse().unwrap();
            }
            slices.push(v6);
        }
        if *where_eps == 1 {
            let mut second = sl.clone();
            second.key.name = format!("svc{i}-y");
            let half = sl.endpoints.len() / 2;
            second.endpoints = slices[0].endpoints.split_off(half);
            slices.push(second);
        }
        if *where_eps == 2 {
            let legacy = slices.into_iter().map(|mut l| {
                l.from_legacy_endpoints = true;
                l
            });
            c.legacy_endpoints.insert(s.key.clone(), legacy.collect());
        } else {
            for l in slices {
                c.endpoint_slices.insert(l.key.clone(), l);
            }
        }
        c.services.insert(s.key.clone(), s);
    }
    c
}

fn rich() -> impl Strategy<Value = RichSpec> {
    let base = (
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec((0u8..3, any::<bool>(), any::<bool>(), any::<bool>()), 0..5),
        0u8..4,
    );
    (base, any::<bool>(), prop::bool::weighted(0.3), prop::bool::weighted(0.1), 0u8..3)
}

/// Services whose Service object or endpoints differ between two clusters (what the agent's
/// sources report).
fn differing(a: &Cluster, b: &Cluster) -> BTreeSet<ObjectKey> {
    let mut out: BTreeSet<ObjectKey> = a
        .services
        .keys()
        .chain(b.services.keys())
        .filter(|k| a.services.get(*k) != b.services.get(*k))
        .cloned()
        .collect();
    let (x, y) = (a.slices_by_service(), b.slices_by_service());
    out.extend(x.keys().chain(y.keys()).filter(|k| x.get(*k) != y.get(*k)).cloned());
    out
}

fn spec() -> impl Strategy<Value = Vec<SvcSpec>> {
    prop::collection::vec(
        (
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec((0u8..3, any::<bool>(), any::<bool>(), any::<bool>()), 0..5),
            0u8..4,
        ),
        1..6,
    )
}

fn probe(c: &Cluster, backend: Backend, from: &str, to: String) -> switchyard_engine::trace::Trace {
    let req = TraceRequest {
        node: "node-a".into(),
        backend,
        program: None,
        from: from.parse().unwrap(),
        to: to.parse::<Destination>().unwrap(),
        protocol: Protocol::Tcp,
        seed: 7,
    };
    trace(c, &req).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// From a local pod, a ClusterIP (Cluster policy) reaches exactly its ready endpoints (or,
    /// with none ready, its serving-terminating ones), with probabilities summing to 1.
    #[test]
    fn every_ready_endpoint_is_reachable(specs in spec()) {
        let c = build(&specs);
        for backend in [Backend::Nftables, Backend::Iptables, Backend::Ipvs] {
            for (i, (_, _, itp, _, _)) in specs.iter().enumerate() {
                let svc = synthetic::service(i as u32);
                if *itp || svc.ports[0].protocol != Protocol::Tcp {
                    continue;
                }
                let sl = &c.endpoint_slices[&synthetic::slice(i as u32, 0, 0).key];
                let mut want: BTreeSet<String> = sl.endpoints.iter().filter(|e| e.ready).map(|e| format!("{}:8080", e.address)).collect();
                if want.is_empty() {
                    want = sl.endpoints.iter().filter(|e| e.serving && e.terminating).map(|e| format!("{}:8080", e.address)).collect();
                }
                let t = probe(&c, backend, "10.1.0.99", format!("{}:80", svc.cluster_ips[0]));
                if want.is_empty() {
                    prop_assert_eq!(t.verdict, Verdict::Reject);
                } else {
                    prop_assert_eq!(t.verdict, Verdict::Forward);
                    let got: BTreeSet<String> = t.outcomes.iter().map(|o| o.endpoint.to_string()).collect();
                    prop_assert_eq!(got, want);
                    let sum: f64 = t.outcomes.iter().map(|o| o.probability).sum();
                    prop_assert!((sum - 1.0).abs() < 1e-6, "probabilities sum to {}", sum);
                }
            }
        }
    }

    /// Outcome probabilities sum to 1 for every kind of source and destination.
    #[test]
    fn probabilities_sum_to_one(specs in spec(), src in prop::sample::select(vec!["10.1.0.99", "10.2.0.5", "192.168.0.1", "203.0.113.9"])) {
        let c = build(&specs);
        for backend in [Backend::Nftables, Backend::Iptables, Backend::Ipvs] {
            for (i, _) in specs.iter().enumerate() {
                let svc = &c.services[&synthetic::service(i as u32).key];
                let mut dests = vec![format!("{}:80", svc.cluster_ips[0])];
                if let Some(np) = svc.ports[0].node_port { dests.push(format!("192.168.0.1:{np}")); }
                dests.extend(svc.load_balancer_ips().map(|ip| format!("{ip}:80")));
                for d in dests {
                    let t = probe(&c, backend, src, d);
                    if t.verdict == Verdict::Forward {
                        let sum: f64 = t.outcomes.iter().map(|o| o.probability).sum();
                        prop_assert!((sum - 1.0).abs() < 1e-6);
                    } else {
                        prop_assert!(t.outcomes.is_empty());
                    }
                }
            }
        }
    }

    /// Applying the incremental transaction to the old program yields the new program. (Two
    /// services claiming one frontend is a misconfiguration the generator avoids: the full
    /// program keeps the first claimant, as the kernel keeps the first `add element`.)
    #[test]
    fn incremental_lands_on_new_program(a in spec(), b in spec()) {
        let (old, new) = (build(&a), build(&b));
        let (po, pn) = (policy::plan(&old, "node-a", Backend::Nftables), policy::plan(&new, "node-a", Backend::Nftables));
        let text = format!("{}{}", nftables::render(&po), nftables::render_incremental(&po, &pn));
        let applied = switchyard_engine::trace::nftables::parse_ruleset(&text).unwrap();
        let want = nftables::ruleset(&pn);
        // Comments on elements that kept their value are not rewritten; compare the program.
        let strip = |mut rs: nftables::Ruleset| {
            for t in rs.values_mut() { for s in t.sets.values_mut() { for e in s.elements.values_mut() { e.comment = None; } } }
            rs
        };
        prop_assert_eq!(strip(applied), strip(want));
    }

    /// IPVS: the transaction applied to the old program (virtual servers, sets, chains,
    /// addresses) yields the new program.
    #[test]
    fn ipvs_incremental_lands_on_new_program(a in spec(), b in spec()) {
        use switchyard_engine::render::ipvs as render_ipvs;
        use switchyard_engine::trace::ipvs::Program;
        let (old, new) = (build(&a), build(&b));
        let (po, pn) = (policy::plan(&old, "node-a", Backend::Ipvs), policy::plan(&new, "node-a", Backend::Ipvs));
        let mut applied = Program::parse(&render_ipvs::render(&po)).unwrap();
        let mut hinted = applied.clone();
        applied.apply(&render_ipvs::render_incremental(&po, &pn)).unwrap();
        // The same with every service named as changed (the changed-services path).
        let all = old.services.keys().chain(new.services.keys()).cloned().collect();
        hinted.apply(&render_ipvs::render_incremental_for(&po, &pn, Some(&all))).unwrap();
        let want = Program::parse(&render_ipvs::render(&pn)).unwrap();
        prop_assert_eq!(&hinted.sets, &want.sets);
        prop_assert_eq!(&hinted.addresses, &want.addresses);
        // A virtual server that stays keeps the comment it was added with.
        let strip = |mut p: Program| {
            for v in p.services.values_mut() { v.comment = None; }
            p
        };
        prop_assert_eq!(strip(applied), strip(want));
    }

    /// Replanning only the changed Services lands on the plan of the new cluster:
    /// `replan(plan(old), new, changed) == plan(new)`, for services added, removed, edited (ports,
    /// families, proxied or not) or with new endpoints, and with unchanged services named too.
    #[test]
    fn replan_equals_plan(
        a in prop::collection::vec(prop::option::weighted(0.8, rich()), 1..9),
        edits in prop::collection::vec((0u8..5, prop::option::weighted(0.7, rich())), 9),
    ) {
        let before = build_rich(&a);
        // 0-1: kept, 2: kept but named as changed, 3: replaced (added or removed when either
        // side is absent), 4: same service, new endpoints.
        let mut b = a.clone();
        b.resize(9, None);
        let mut named = BTreeSet::new();
        for (i, (what, other)) in edits.iter().enumerate() {
            match what {
                2 => { named.insert(i); }
                3 => b[i] = other.clone(),
                4 => if let (Some(mine), Some(theirs)) = (&mut b[i], other) { mine.0.3 = theirs.0.3.clone() },
                _ => {}
            }
        }
        let after = build_rich(&b);
        let mut changed = differing(&before, &after);
        for (i, s) in b.iter().enumerate() {
            if named.contains(&i) && s.is_some() {
                changed.extend(after.services.keys().filter(|k| k.name == format!("svc{i}")).cloned());
            }
        }
        for backend in [Backend::Nftables, Backend::Iptables, Backend::Ipvs] {
            let old = policy::plan(&before, "node-a", backend);
            let want = policy::plan(&after, "node-a", backend);
            prop_assert_eq!(policy::replan(&old, &after, &changed), want);
        }
    }
}
