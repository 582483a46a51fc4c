//! Executes iptables programs.
