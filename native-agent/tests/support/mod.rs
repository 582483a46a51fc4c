//! Test helpers shared by the agent's integration tests.

pub mod apiserver;
