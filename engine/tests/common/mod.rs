//! Fixtures shared by the engine's integration tests: representative clusters, one per file.

use switchyard_engine::cluster::Cluster;

/// (name, YAML) of each fixture cluster; programs are rendered for its node `test-node`.
pub const FIXTURES: &[(&str, &str)] = &[
    ("example", include_str!("../fixtures/example.yaml")),
    ("masq-ie-base", include_str!("../fixtures/masq-ie-base.yaml")),
    ("ep-dualstack", include_str!("../fixtures/ep-dualstack.yaml")),
    ("ep-lb-source-ranges", include_str!("../fixtures/ep-lb-source-ranges.yaml")),
    ("etp-local-no-local-endpoints", include_str!("../fixtures/etp-local-no-local-endpoints.yaml")),
    ("ep-terminating-local", include_str!("../fixtures/ep-terminating-local.yaml")),
    ("ep-topology", include_str!("../fixtures/ep-topology.yaml")),
];

/// A fixture's objects as a cluster.
pub fn cluster(name: &str, text: &str) -> Cluster {
    Cluster::from_objects(switchyard_engine::input::parse(name, text).expect("fixture parses").objects)
}
