//! The built-in demo cluster.
