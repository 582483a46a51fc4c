//! iptables programs.
