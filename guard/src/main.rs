//! `portguard`: clap wiring only; each subcommand lives in `cli/`.

use std::process::ExitCode;

use clap::Parser as _;
use portguard::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    portguard::logging::init(cli.log_format, cli.verbose);
    let result = match cli.command {
        Command::Run(args) => portguard::cli::run::main(args),
        Command::Check(args) => portguard::cli::check::main(args),
        Command::Fix(args) => portguard::cli::fix::main(args),
        Command::Restore(args) => portguard::cli::restore::main(args),
        Command::Config(args) => portguard::cli::config::main(args),
        Command::Listeners(args) => portguard::cli::listeners::main(args),
        Command::K3s(args) => portguard::cli::k3s::main(args),
        Command::Report(args) => portguard::cli::report::main(args),
        Command::Install(args) => portguard::cli::install::main(args),
        Command::AuditSelftest(args) => portguard::cli::audit_selftest::main(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // anyhow's alternate form prints the whole cause chain on one line.
            eprintln!("portguard: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
