//! Golden programs: the rendered nftables, iptables and IPVS programs of representative clusters,
//! reviewed like code. `INSTA_UPDATE=always cargo test -p switchyard-engine --test golden`
//! rewrites them; `git diff` shows what a change did to the rules.

#![allow(clippy::unwrap_used)]

use switchyard_engine::cluster::Cluster;
use switchyard_engine::policy::Backend;

const FIXTURES: &[(&str, &str)] = &[
    ("example", include_str!("fixtures/example.yaml")),
    ("masq-ie-base", include_str!("fixtures/masq-ie-base.yaml")),
    ("ep-dualstack", include_str!("fixtures/ep-dualstack.yaml")),
    ("ep-lb-source-ranges", include_str!("fixtures/ep-lb-source-ranges.yaml")),
    ("etp-local-no-local-endpoints", include_str!("fixtures/etp-local-no-local-endpoints.yaml")),
    ("ep-terminating-local", include_str!("fixtures/ep-terminating-local.yaml")),
    ("ep-topology", include_str!("fixtures/ep-topology.yaml")),
];

fn cluster(name: &str, text: &str) -> Cluster {
    Cluster::from_objects(switchyard_engine::input::parse(name, text).expect("fixture parses").objects)
}

#[test]
fn nftables_programs() {
    for (name, text) in FIXTURES {
        let program = switchyard_engine::render(&cluster(name, text), "test-node", Backend::Nftables).expect("renders");
        insta::assert_snapshot!(format!("nftables-{name}"), program);
    }
}

#[test]
fn iptables_programs() {
    for (name, text) in FIXTURES {
        let program = switchyard_engine::render(&cluster(name, text), "test-node", Backend::Iptables).expect("renders");
        insta::assert_snapshot!(format!("iptables-{name}"), program);
    }
}

#[test]
fn ipvs_programs() {
    for (name, text) in FIXTURES {
        let program = switchyard_engine::render(&cluster(name, text), "test-node", Backend::Ipvs).expect("renders");
        insta::assert_snapshot!(format!("ipvs-{name}"), program);
    }
}

#[test]
fn demo_programs() {
    let c = switchyard_engine::demo::cluster();
    for node in ["node-1", "node-3"] {
        for backend in [Backend::Nftables, Backend::Iptables, Backend::Ipvs] {
            let program = switchyard_engine::render(&c, node, backend).expect("renders");
            insta::assert_snapshot!(format!("demo-{}-{node}", backend.as_str()), program);
        }
    }
}
