//! iptables programs. PLACEHOLDER so the crate compiles: helper-3 replaces this file whole.
use crate::policy::NodePlan;

pub fn render(_plan: &NodePlan) -> String {
    String::new()
}

pub fn render_incremental(_old: &NodePlan, _new: &NodePlan) -> String {
    String::new()
}
