//! Switchyard's node agent and command line, as a library so that the binary stays a thin
//! `main` and the integration tests can load clusters the way the CLI does.
//!
//! - [`load`] reads `--cluster` files and folders into an engine [`Cluster`](switchyard_engine::cluster::Cluster);
//! - [`apply`] holds the kernel appliers (one trait per backend, a real one and a recording fake);
//! - [`cli`] defines the `switchyard` command line (clap) and runs `render`, `trace` and `agent`;
//! - [`source`] watches a manifests folder; [`sync`] is the sync loop's pure state machine;
//!   [`agent`] runs them with the appliers under tokio and serves [`metrics`] and health;
//! - [`kube`] watches an API server (Services, EndpointSlices, Nodes) as the other source;
//! - [`conntrack`] turns the node's real connections into flow events, explained by the tracer;
//! - [`lab`] builds a small cluster of network namespaces on one machine, one agent per node.

pub mod agent;
pub mod apply;
pub mod cli;
pub mod conntrack;
pub mod demo;
pub mod healthcheck;
pub mod kube;
pub mod lab;
pub mod load;
pub mod metrics;
pub mod server;
pub mod source;
pub mod stream;
pub mod sync;
