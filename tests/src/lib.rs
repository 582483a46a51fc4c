//! Shared helpers for the cross-crate tests in `tests/tests/`.
//!
//! - [`scenario`] finds scenario folders (`cluster.yaml` + `probes.tsv`), reads their probes and
//!   checks one probe against the engine with the same rules as `contract-check/run.py`;
//! - [`changes`] makes the small cluster changes (endpoint removed, service removed and added,
//!   endpoint added) that incremental programs are tested with;
//! - [`differential`] checks real connections in the lab against the tracer, and runs the
//!   `switchyard` binary in a lab node for the fault tests;
//! - [`listing`] turns kernel listings into sorted lines that compare equal when the programs are;
//! - [`netns`] runs kernel tools inside throwaway network namespaces that are deleted on every
//!   exit path, and says why kernel tests must be skipped on this machine.

pub mod changes;
pub mod differential;
pub mod listing;
pub mod netns;
pub mod scenario;

use std::path::PathBuf;

/// The workspace root (the folder holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// This repository's scenarios.
pub fn repo_scenarios() -> PathBuf {
    workspace_root().join("tests/scenarios")
}

/// The public contract-check scenarios beside the repository (`../shared/contract-check/scenarios`
/// from the workspace root), when that folder is there.
pub fn shared_scenarios() -> Option<PathBuf> {
    let p = workspace_root().join("../shared/contract-check/scenarios");
    p.is_dir().then_some(p)
}
