//! The command line: one module per subcommand.

pub mod check;
pub mod config;
pub mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// Guards port ownership on a Linux host: sees every bind() and every NAT rule
/// on a protected port, and keeps them for the port's owner.
#[derive(Debug, Parser)]
#[command(name = "portguard", version, about, long_about = None, propagate_version = true)]
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
    /// One-shot audit: every foreign NAT rule on a protected port (exit 0 clean, 1 findings, 2 error).
    Check(check::CheckArgs),
    /// Validate or print the policy.
    #[command(subcommand)]
    Config(config::ConfigCommand),
}

/// `--config FILE`, shared by every subcommand that reads the policy.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Policy file. Default: /etc/portguard/config.toml when it exists, else the
    /// built-in policy (tcp/80 and tcp/443 owned by Docker).
    #[arg(long, short = 'c', value_name = "FILE", env = "PORTGUARD_CONFIG")]
    pub config: Option<PathBuf>,
}
