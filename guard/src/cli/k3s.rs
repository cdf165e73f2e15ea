//! `portguard k3s harden [--root DIR] [--servicelb] [--check]`.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use crate::k8s::harden::{self, FileChange, K3sPaths};

#[derive(Debug, Subcommand)]
pub enum K3sCommand {
    /// Keep k3s from deploying its packaged Traefik (and ServiceLB with --servicelb):
    /// writes a config drop-in and the traefik.yaml.skip marker. Idempotent; k3s must
    /// restart to apply it. Exit 0 ok, 2 error; with --check 0 hardened, 1 not, 2 error.
    Harden(HardenArgs),
}

#[derive(Debug, clap::Args)]
pub struct HardenArgs {
    /// Root below which the k3s paths live (for images, chroots and tests).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Also disable ServiceLB (klipper-lb), which turns every LoadBalancer Service
    /// into hostPorts on every node.
    #[arg(long)]
    pub servicelb: bool,
    /// Only report whether the host is hardened; change nothing.
    #[arg(long, conflicts_with = "servicelb")]
    pub check: bool,
}

pub fn main(cmd: K3sCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        K3sCommand::Harden(args) => harden_cmd(&args),
    }
}

fn harden_cmd(args: &HardenArgs) -> anyhow::Result<ExitCode> {
    if args.check {
        let status = harden::hardening_status(&args.root);
        println!("{}", status.summary());
        for file in &status.disabled_by {
            println!("  disabled by {}", file.display());
        }
        for problem in &status.unreadable {
            println!("  unreadable: {problem}");
        }
        return Ok(if status.hardened() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let outcome = harden::harden(&K3sPaths::new(&args.root), args.servicelb)?;
    let disabled: Vec<_> = outcome.disabled.iter().map(|c| c.name()).collect();
    let say = |change: &FileChange, path: &std::path::Path, what: &str| match change {
        FileChange::Created => println!("created {} ({what})", path.display()),
        FileChange::Updated => println!("updated {} ({what})", path.display()),
        FileChange::Unchanged => println!("unchanged {} ({what})", path.display()),
    };
    say(
        &outcome.drop_in_change,
        &outcome.drop_in,
        &format!("disable+: [{}]", disabled.join(", ")),
    );
    say(
        &outcome.skip_marker_change,
        &outcome.skip_marker,
        "k3s skips its packaged traefik.yaml",
    );
    if outcome.changed() {
        println!(
            "k3s must restart to apply this (systemctl restart k3s); until then the running \
             k3s keeps what it deployed"
        );
    } else {
        println!("already hardened: nothing changed");
    }
    Ok(ExitCode::SUCCESS)
}
