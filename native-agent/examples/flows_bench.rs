//! What explaining real flows costs: the conntrack observer's state machine
//! ([`switchyard_agent::conntrack::Flows`]) fed connections to the Services of
//! `synthetic::cluster(10_000, 10)` on `node-a`, as conntrack would report them (the endpoint in
//! the reply tuple is one the program can pick). No kernel: the figures are the CPU per flow.
//!
//!     cargo run --release -p switchyard-agent --example flows_bench

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_agent::conntrack::wire::{Conn, Event, Tuple};
use switchyard_agent::conntrack::{Flows, FlowsConfig, Input, Output, View};
use switchyard_engine::policy::{self, Backend};

const FLOWS: u32 = 20_000;

fn main() {
    let cluster = switchyard_engine::synthetic::cluster(10_000, 10);
    let plan = policy::plan(&cluster, "node-a", Backend::Nftables);
    let view = Arc::new(View { cluster: Arc::new(cluster), plan });
    let services: Vec<_> = view.plan.families[0].services.iter().filter(|s| !s.cluster_endpoints.is_empty()).collect();
    let conns: Vec<Conn> = (0..FLOWS)
        .map(|i| {
            let s = services[(i as usize * 7919) % services.len()];
            let ep = &s.cluster_endpoints[i as usize % s.cluster_endpoints.len()];
            let client = IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8));
            let port = 10_000 + (i % 50_000) as u16;
            let proto = s.protocol.number();
            Conn {
                id: i + 1,
                orig: Tuple { src: client, dst: s.cluster_ip, proto, src_port: port, dst_port: s.port },
                reply: Tuple { src: ep.ip, dst: client, proto, src_port: ep.port, dst_port: port },
                status: 0,
                zone: 0,
            }
        })
        .collect();
    println!("{} services on node-a's program, {FLOWS} connections to them", services.len());

    for (what, rate) in [("with a diagram each", 1e9), ("without diagrams", 0.0)] {
        let cfg = FlowsConfig {
            capacity: FLOWS as usize,
            diagrams_per_second: rate,
            diagram_burst: if rate > 0.0 { 1e12 } else { 0.0 },
            ..FlowsConfig::new("node-a")
        };
        let mut flows = Flows::new(cfg);
        flows.step(Input::View(view.clone()), Duration::ZERO);
        // The first flow parses the program.
        let t = Instant::now();
        let first = flows.step(Input::Conntrack(Event::New, conns[0]), Duration::ZERO);
        let parse = t.elapsed();
        let t = Instant::now();
        let mut agreed = 0;
        for c in &conns[1..] {
            for o in flows.step(Input::Conntrack(Event::New, *c), Duration::ZERO) {
                if let Output::Publish(e) = o {
                    agreed += usize::from(e.agrees == Some(true));
                }
            }
        }
        let each = t.elapsed() / (FLOWS - 1);
        let t = Instant::now();
        let table: Vec<Conn> = conns[..FLOWS as usize / 2].to_vec();
        flows.step(Input::Table(table), Duration::ZERO);
        let reconcile = t.elapsed();
        println!(
            "{what}: first flow (renders and parses the program) {parse:.0?}; then {each:.1?} per flow \
             ({:.0} flows/s); {agreed} of {} agree; a dump of {} entries reconciled in {reconcile:.1?}",
            1.0 / each.as_secs_f64(),
            FLOWS - 1,
            FLOWS / 2,
        );
        assert_eq!(first.len(), 1);
    }
}
