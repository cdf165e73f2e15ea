//! The command line: one module per subcommand.

pub mod audit_selftest;
pub mod check;
pub mod config;
pub mod fix;
pub mod install;
pub mod k3s;
pub mod listeners;
pub mod report;
pub mod restore;
pub mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// Guards port ownership on a Linux host: sees every bind() and every NAT rule
/// on a protected port, and keeps them for the port's owner.
#[derive(Debug, Parser)]
#[command(
    name = "portguard",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "\
Examples:
  portguard check                  audit NAT rules and listeners on protected ports, once
  portguard run --mode observe     run the agent, reporting only (no denials, no removals)
  portguard config show            the effective policy, with each owner as resolved now
  portguard listeners              who holds each protected port, and whether it owns it
  portguard k3s harden             keep k3s's packaged Traefik from coming back
  portguard report --since 7d      what was blocked, by port, source and day

Exit codes: 0 clean, 1 findings (check, listeners, fix), 2 error.
Policy: /etc/portguard/config.toml (built-in default: tcp/80 and tcp/443 owned by Docker).
Audit log: /var/lib/portguard/audit.jsonl. Metrics: http://127.0.0.1:9464/metrics."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PORTGUARD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// More detail in logs (-v, -vv); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: guard binds to protected ports until stopped (SIGINT/SIGTERM).
    Run(run::RunArgs),
    /// Who holds each protected port right now, and whether it is the owner
    /// (exit 0 all owners, 1 a non-owner holds one, 2 error).
    Listeners(listeners::ListenersArgs),
    /// One-shot audit: every foreign NAT rule on a protected port (exit 0 clean, 1 findings, 2 error).
    Check(check::CheckArgs),
    /// One-shot remediation: record, then delete every foreign NAT rule on a
    /// protected port in one transaction (exit 0 clean, 1 fixed/found, 2 error).
    Fix(fix::FixArgs),
    /// Put a removed rule back from the audit log (exit 0 restored, 2 error).
    Restore(restore::RestoreArgs),
    /// Validate or print the policy.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// k3s prevention: keep its packaged Traefik/ServiceLB from coming back.
    #[command(subcommand)]
    K3s(k3s::K3sCommand),
    /// Summarise the audit trail: hijacks blocked, binds denied, state of each port.
    Report(report::ReportArgs),
    /// Install the systemd unit and a default policy; enable the service when systemd runs.
    Install(install::InstallArgs),
    /// Crash-test helper: append a burst of audit records (hidden).
    #[command(hide = true)]
    AuditSelftest(audit_selftest::AuditSelftestArgs),
}

/// `--config FILE`, shared by every subcommand that reads the policy.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Policy file. Default: /etc/portguard/config.toml when it exists, else the
    /// built-in policy (tcp/80 and tcp/443 owned by Docker).
    #[arg(long, short = 'c', value_name = "FILE", env = "PORTGUARD_CONFIG")]
    pub config: Option<PathBuf>,
}
