//! Kernel appliers: every write to the kernel goes through one trait per backend, with a real
//! implementation that pipes programs to the kernel's tools and a recording fake for unit tests.

pub mod iptables;
pub mod ipvs;
pub mod nftables;
