//! `portguard run`: the agent (see `crate::agent`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use super::PolicyArgs;
use crate::{
    agent::{self, AgentConfig},
    audit::{DEFAULT_AUDIT_PATH, journal::JournalMode},
    policy::Mode,
};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Override the policy's mode: `enforce` denies strangers, `observe` only reports.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Attach below this cgroup v2 directory instead of the hierarchy's root
    /// (guards only processes in that subtree; for tests and staged roll-outs).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// The audit log (JSON Lines, append-only, rotated by size).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_AUDIT_PATH, env = "PORTGUARD_AUDIT_LOG")]
    pub audit_log: PathBuf,
    /// Also send every audit record to the systemd journal as a structured
    /// entry (MESSAGE_ID per kind, PORTGUARD_* fields, the whole record):
    /// `auto` when journald's socket exists at start.
    #[arg(long, value_enum, default_value_t = JournalMode::Auto, env = "PORTGUARD_JOURNAL")]
    pub journal: JournalMode,
    /// Serve metrics here instead of the policy's `[metrics] listen`
    /// (port 0: any free port, logged at start).
    #[arg(long, value_name = "ADDR:PORT", env = "PORTGUARD_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// kubeconfig for the Kubernetes layer (default: the policy's, else
    /// /etc/rancher/k3s/k3s.yaml when it exists, else in a pod its
    /// ServiceAccount; none: the layer is off).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// This host's Kubernetes node name (default: the hostname, as k3s names nodes).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// How often iptables-legacy tables are re-read while any is in use, in
    /// seconds (nf_tables changes are announced and need no polling).
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub legacy_poll: u64,
    /// How often the agent looks whether iptables-legacy is in use at all, in
    /// seconds, while it is not (one /proc read; x_tables announces nothing).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub legacy_check: u64,
    /// Guard the nftables ruleset of /run/netns/NAME instead of this one (tests).
    #[arg(long, hide = true, value_name = "NAME")]
    pub netns: Option<String>,
}

pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    crate::sys::memory::return_large_frees();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent::run(AgentConfig {
        policy_file: args.policy.config,
        mode: args.mode,
        cgroup: args.cgroup,
        audit_log: args.audit_log,
        journal: args.journal,
        metrics_listen: args.metrics_listen,
        kubeconfig: args.kubeconfig,
        node_name: args.node_name,
        netns: args.netns,
        legacy_poll: std::time::Duration::from_secs(args.legacy_poll.max(1)),
        legacy_check: std::time::Duration::from_secs(args.legacy_check.max(1)),
    }))?;
    Ok(ExitCode::SUCCESS)
}
