//! Kernel programs written from a [`crate::policy::NodePlan`]: full programs, and the smallest
//! transaction that turns one node's program into the next.

pub mod iptables;
pub mod ipvs;
pub mod nftables;

/// The comment prefix every program starts with, naming the node and backend.
pub fn header(node: &str, backend: &str) -> String {
    format!("# Switchyard {backend} program for node {node}")
}
