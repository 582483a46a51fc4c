//! Engine speed at the Kubernetes scalability envelope: 10,000 services × 10 endpoints.
//! `cargo bench -p switchyard-engine --bench engine`; figures go to BENCHMARKS.md.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard_engine::model::Protocol;
use switchyard_engine::policy::{self, Backend};
use switchyard_engine::render;
use switchyard_engine::synthetic;
use switchyard_engine::trace::path::{self, Topology};
use switchyard_engine::trace::{NodeContext, Packet};

fn bench(c: &mut Criterion) {
    let cluster = synthetic::cluster(10_000, 10);
    let mut changed = cluster.clone();
    let s = synthetic::slice(4242, 10, 1);
    changed.endpoint_slices.insert(s.key.clone(), s);

    let plan = policy::plan(&cluster, "node-a", Backend::Nftables);
    let plan2 = policy::plan(&changed, "node-a", Backend::Nftables);
    // Service 4242 lives in namespace ns42 (synthetic spreads services over 50 namespaces).
    let only = [switchyard_engine::model::ObjectKey::new("ns42", "svc4242")].into_iter().collect();
    let mut g = c.benchmark_group("10k-services-x10");
    g.sample_size(10);
    g.bench_function("plan", |b| b.iter(|| policy::plan(black_box(&cluster), "node-a", Backend::Nftables)));
    g.bench_function("nftables full render", |b| b.iter(|| render::nftables::render(black_box(&plan))));
    g.bench_function("nftables incremental (1 endpoint change)", |b| {
        b.iter(|| render::nftables::render_incremental(black_box(&plan), black_box(&plan2)))
    });
    g.bench_function("nftables incremental, changed services known (1 endpoint change)", |b| {
        b.iter(|| render::nftables::render_incremental_for(black_box(&plan), black_box(&plan2), Some(&only)))
    });
    let iplan = policy::plan(&cluster, "node-a", Backend::Iptables);
    let iplan2 = policy::plan(&changed, "node-a", Backend::Iptables);
    g.bench_function("iptables full render", |b| b.iter(|| render::iptables::render(black_box(&iplan))));
    g.bench_function("iptables incremental (1 endpoint change)", |b| {
        b.iter(|| render::iptables::render_incremental(black_box(&iplan), black_box(&iplan2)))
    });
    g.bench_function("iptables incremental, changed services known (1 endpoint change)", |b| {
        b.iter(|| render::iptables::render_incremental_for(black_box(&iplan), black_box(&iplan2), Some(&only)))
    });

    let vplan = policy::plan(&cluster, "node-a", Backend::Ipvs);
    let vplan2 = policy::plan(&changed, "node-a", Backend::Ipvs);
    g.bench_function("ipvs full render", |b| b.iter(|| render::ipvs::render(black_box(&vplan))));
    g.bench_function("ipvs incremental (1 endpoint change)", |b| {
        b.iter(|| render::ipvs::render_incremental(black_box(&vplan), black_box(&vplan2)))
    });
    g.bench_function("ipvs incremental, changed services known (1 endpoint change)", |b| {
        b.iter(|| render::ipvs::render_incremental_for(black_box(&vplan), black_box(&vplan2), Some(&only)))
    });

    let ctx = NodeContext { node: "node-a".into(), addresses: vec!["192.168.0.1".parse().expect("ip")] };
    let topo = Topology::from_cluster(&cluster);
    let packet = Packet {
        src: "10.1.0.99".parse().expect("ip"),
        src_port: 40000,
        dst: "172.30.39.15".parse().expect("ip"), // service 9999
        dst_port: 80,
        protocol: Protocol::Tcp,
    };
    g.bench_function("nftables trace", |b| {
        let nft = switchyard_engine::trace::nftables::Program::parse(&render::nftables::render(&plan)).expect("parses");
        b.iter(|| path::trace(&nft, &ctx, &topo, black_box(packet), "nftables", 1))
    });
    g.bench_function("iptables trace", |b| {
        let ipt =
            switchyard_engine::trace::iptables::Program::parse(&render::iptables::render(&iplan)).expect("parses");
        b.iter(|| path::trace(&ipt, &ctx, &topo, black_box(packet), "iptables", 1))
    });
    g.bench_function("ipvs trace", |b| {
        let ipvs = switchyard_engine::trace::ipvs::Program::parse(&render::ipvs::render(&vplan)).expect("parses");
        let ctx = ipvs.node_context(&ctx);
        b.iter(|| path::trace(&ipvs, &ctx, &topo, black_box(packet), "ipvs", 1))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
