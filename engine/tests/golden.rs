//! Golden programs: the rendered nftables, iptables and IPVS programs of representative clusters,
//! reviewed like code. `INSTA_UPDATE=always cargo test -p switchyard-engine --test golden`
//! rewrites them; `git diff` shows what a change did to the rules.

#![allow(clippy::unwrap_used)]

mod common;

use common::{FIXTURES, cluster};
use switchyard_engine::policy::Backend;

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
