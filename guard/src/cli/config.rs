//! `portguard config check|show`.

use std::process::ExitCode;

use clap::Subcommand;

use super::PolicyArgs;
use crate::policy::Policy;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the policy: exit 0 when valid, 2 with the file, line and column of the first error.
    Check(PolicyArgs),
    /// Print the effective policy as TOML.
    Show(PolicyArgs),
}

pub fn main(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::Check(args) => {
            let (policy, source) = Policy::load(args.config.as_deref())?;
            println!(
                "{source}: ok ({} protected port entr{}, mode {})",
                policy.ports.len(),
                if policy.ports.len() == 1 { "y" } else { "ies" },
                policy.mode
            );
        }
        ConfigCommand::Show(args) => {
            let (policy, source) = Policy::load(args.config.as_deref())?;
            println!("# effective policy from {source}");
            print!("{}", policy.to_toml());
        }
    }
    Ok(ExitCode::SUCCESS)
}
