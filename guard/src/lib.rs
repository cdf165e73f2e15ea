//! portguard: a port-ownership guard for Linux hosts.
//!
//! Data flows one way: sources (eBPF ring buffer, nftables and Docker events)
//! feed typed events to one owner of state, which decides, acts and records.

pub mod cli;
pub mod ebpf;
pub mod logging;
pub mod nft;
pub mod policy;
pub mod sys;
