//! Kernel programs written from a [`crate::policy::NodePlan`]: full programs, and the smallest
//! transaction that turns one node's program into the next.

pub mod iptables;
pub mod ipvs;
pub mod nftables;

/// The comment prefix every program starts with, naming the node and backend.
pub fn header(node: &str, backend: &str) -> String {
    format!("# Switchyard {backend} program for node {node}")
}

/// Rules and set elements in a full program (nftables, iptables-restore or IPVS input): every
/// line that is not structure (headers, braces, `type`/`flags`, `*table`, `:chain`, `COMMIT`).
pub fn rule_count(program: &str) -> usize {
    program.lines().filter(|l| is_rule_or_element(l)).count()
}

fn is_rule_or_element(line: &str) -> bool {
    let l = line.trim();
    !(l.is_empty()
        || l.starts_with('#')
        || l.starts_with('}')
        || l.ends_with('{')
        || l.starts_with("type ")
        || l.starts_with("flags ")
        || l.starts_with('*')
        || l.starts_with(':')
        || l == "COMMIT")
}
