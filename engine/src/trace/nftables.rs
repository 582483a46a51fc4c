//! Executes nftables programs.
