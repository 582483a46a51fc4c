//! Switchyard's engine: from a cluster's objects to the kernel program kube-proxy would write, and
//! back from that program to where any packet goes.
//!
//! The flow through the crate:
//! - [`input`] parses Kubernetes YAML/JSON into [`model`] types, once, at the edge;
//! - [`cluster::Cluster`] holds the state those objects describe;
//! - [`policy::plan`] decides, with kube-proxy's semantics, what one node must do (a [`policy::NodePlan`]);
//! - [`render`] writes that plan as an nftables or iptables program, in full or as the smallest
//!   transaction from a previous plan;
//! - [`trace`] parses a program back and executes it over a model of the Linux packet path;
//! - [`flow`] turns a trace into a sequence diagram; [`dns`] resolves Service names as cluster DNS
//!   would; [`demo`] is the built-in teaching cluster.
//!
//! No IO, no clock, no ambient randomness: the engine builds for `wasm32-unknown-unknown`.

pub mod cluster;
pub mod demo;
pub mod dns;
pub mod fasthash;
pub mod flow;
pub mod input;
pub mod model;
pub mod policy;
pub mod protocol;
pub mod render;
pub mod synthetic;
pub mod textfmt;
pub mod trace;

mod api;
pub use api::*;
