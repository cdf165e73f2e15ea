//! `portguard fix [--dry-run]`: the one-shot version of `run`'s remediation.
//! Every foreign rule on a protected port is recorded whole in the audit log,
//! then all are deleted by handle in one atomic transaction.
//! Exit 0 clean, 1 findings fixed (or, with `--dry-run`, found), 2 error.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use super::{PolicyArgs, listeners::CgroupBlind};
use crate::{
    audit::{AuditHandle, AuditLog, DEFAULT_AUDIT_PATH, Rotation},
    nft::{self, InspectInput, OwnedTargets},
    owners::Owners,
    policy::{Mode, Policy},
    rules::{Action, NetlinkBackend, decide, removal_transaction, remove_audited},
};

const EXIT_FINDINGS: u8 = 1;

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
    let (model, addrs) =
        nft::read_with_addrs(args.netns.as_deref()).context("reading the ruleset")?;
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
    let input = InspectInput::from_policy(&policy, owned, addrs);
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
    let seqs = runtime
        .block_on(remove_audited(&audit, &mut backend, &remove))
        .context("removing the foreign rules")?;
    audit.flush()?;
    for (r, seq) in remove.iter().zip(seqs) {
        println!("removed {} (restore with: portguard restore {seq})", r.id());
    }
    Ok(ExitCode::from(EXIT_FINDINGS))
}
