//! portguard: a port-ownership guard for Linux hosts.
//!
//! Data flows one way: sources (eBPF ring buffer, nftables and Docker events)
//! feed typed events to one owner of state, which decides, acts and records.

pub mod agent;
pub mod audit;
pub mod cli;
pub mod ebpf;
pub mod k8s;
pub mod logging;
pub mod metrics;
pub mod nft;
pub mod owners;
pub mod policy;
pub mod probes;
pub mod report;
pub mod rules;
pub mod service;
pub mod sys;
pub mod types;
