//! `portguard fix [--dry-run]`: the one-shot version of `run`'s remediation.
//! Every foreign rule on a protected port is recorded whole in the audit log,
//! then all are deleted by handle in one atomic transaction, checked against
//! the generation they were judged on: if the ruleset moved meanwhile (the
//! Docker lookups take a while), it is read and judged again.
//! Exit 0 clean, 1 findings fixed (or, with `--dry-run`, found), 2 error.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use super::{PolicyArgs, listeners::CgroupBlind};
use crate::{
    audit::{AuditHandle, AuditLog, DEFAULT_AUDIT_PATH, Rotation},
    nft::{self, InspectInput, OwnedTargets},
    owners::Owners,
    policy::{Mode, Policy},
    rules::{
        Action, GuardError, NetlinkBackend, decide, removal_transaction, remove::generation_moved,
        remove_audited,
    },
};

const EXIT_FINDINGS: u8 = 1;
/// How many times the ruleset is read and judged again when it moved between
/// the read and the commit.
const MAX_ATTEMPTS: usize = 5;

#[derive(Debug, clap::Args)]
pub struct FixArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print the exact transaction and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The audit log every removal is recorded in first.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_AUDIT_PATH, env = "PORTGUARD_AUDIT_LOG")]
    pub audit_log: PathBuf,
    /// Fix the network namespace /run/netns/NAME instead of this one (tests).
    #[arg(long, hide = true, value_name = "NAME")]
    pub netns: Option<String>,
}

pub fn main(args: FixArgs) -> anyhow::Result<ExitCode> {
    let (mut policy, _) = Policy::load(args.policy.config.as_deref())?;
    // Asked to fix: every protected port is enforced for this one run.
    policy.mode = Mode::Enforce;
    for p in &mut policy.ports {
        p.mode = None;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let owned = if args.netns.is_some() {
        OwnedTargets::docker_fallback()
    } else {
        let owners = runtime.block_on(Owners::new(policy.clone()).resolve_once());
        // NAT rules need no cgroups: fix them, and name what could not be resolved.
        if let Some(b) = CgroupBlind::of(&policy, &owners) {
            println!("{}", b.message);
        }
        owners.owned_targets()
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match fix_once(&args, &policy, &owned, &runtime) {
            Err(e)
                if attempt < MAX_ATTEMPTS
                    && e.downcast_ref::<GuardError>().is_some_and(generation_moved) =>
            {
                println!("# the ruleset moved while deciding: reading it again");
            }
            other => return other,
        }
    }
}

/// Reads, judges and removes once (see the module doc).
fn fix_once(
    args: &FixArgs,
    policy: &Policy,
    owned: &OwnedTargets,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<ExitCode> {
    let policy = policy.clone();
    let (model, addrs) =
        nft::read_with_addrs(args.netns.as_deref()).context("reading the ruleset")?;
    let input = InspectInput::from_policy(&policy, owned.clone(), addrs);
    let findings = nft::inspect(&model, &input);
    let mut remove = Vec::new();
    for action in decide(&model, &findings, &policy) {
        match action {
            Action::Remove(rule) => remove.push(rule),
            Action::Report { finding, why } => println!(
                "cannot fix {} {} {} position {} (port {}): {why}",
                finding.family, finding.table, finding.chain, finding.position, finding.port
            ),
        }
    }
    if findings.is_empty() {
        println!(
            "clean: no foreign NAT rule on a protected port ({} rules read)",
            model.rule_count()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let tx = removal_transaction(&remove);
    for r in &remove {
        let ports: Vec<String> = r
            .findings
            .iter()
            .map(|f| format!("{}/{}", f.proto, f.port))
            .collect();
        println!(
            "# {} ({}): {} -> {}{}",
            r.id(),
            r.source(),
            ports.join(","),
            r.findings[0].target.as_deref().unwrap_or("?"),
            if r.findings.iter().any(|f| f.active) {
                " ACTIVE"
            } else {
                " latent"
            }
        );
    }
    if args.dry_run {
        println!("# dry run: the transaction (one atomic batch), not applied");
        print!("{tx}");
        return Ok(ExitCode::from(EXIT_FINDINGS));
    }
    let log = AuditLog::open(&args.audit_log, Rotation::default())
        .with_context(|| format!("opening the audit log {}", args.audit_log.display()))?;
    let audit = AuditHandle::new(log);
    let mut backend = NetlinkBackend::open(args.netns.as_deref()).context("opening netlink")?;
    let removal = runtime.block_on(remove_audited(
        &audit,
        &mut backend,
        &remove,
        model.generation,
    ));
    audit.flush()?;
    let removal = removal.context("removing the foreign rules")?;
    for (r, seq) in &removal.removed {
        println!("removed {} (restore with: portguard restore {seq})", r.id());
    }
    for r in &removal.vanished {
        println!("gone before it could be removed (not by us): {}", r.id());
    }
    Ok(ExitCode::from(EXIT_FINDINGS))
}
