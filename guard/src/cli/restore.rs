//! `portguard restore ID`: puts a removed rule back from its audit record, in
//! the same chain, at the same position as far as the ruleset allows (after the
//! rule that preceded it, else before the one that followed it); or re-creates a
//! removed Kubernetes object from its recorded manifest; or undoes an object
//! portguard created (the reconfigure remedy) by deleting it. Exit 0 / 2.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;

use super::PolicyArgs;
use crate::{
    audit::{
        AuditEvent, AuditHandle, AuditLog, AuditTrail, DEFAULT_AUDIT_PATH, K8sObjectRecord,
        Rotation,
    },
    k8s::{
        cluster::{K3S_KUBECONFIG, choose_kubeconfig, connect_choice, in_pod},
        reconfigure, remove,
    },
    policy::Policy,
    rules::{NetlinkBackend, RecordedRule, RulesetBackend as _},
};

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The `seq` of the `rule_removed` record (printed by `fix`, in the audit log).
    pub id: u64,
    /// The audit log to read the removal from (and record the restore in).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_AUDIT_PATH, env = "PORTGUARD_AUDIT_LOG")]
    pub audit_log: PathBuf,
    /// Restore into the network namespace /run/netns/NAME instead of this one (tests).
    #[arg(long, hide = true, value_name = "NAME")]
    pub netns: Option<String>,
    /// kubeconfig for restoring a removed Kubernetes object (default: the
    /// policy's, else /etc/rancher/k3s/k3s.yaml).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The policy (for its `[kubernetes] kubeconfig`).
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub fn main(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let trail = AuditTrail::read(&args.audit_log)
        .with_context(|| format!("reading {}", args.audit_log.display()))?;
    let record = trail.removal(args.id).with_context(|| {
        format!(
            "no removal with id {} in {}",
            args.id,
            args.audit_log.display()
        )
    })?;
    let removed = match &record.event {
        AuditEvent::RuleRemoved(removed) => removed,
        AuditEvent::K8sObjectRemoved(object) => return restore_k8s_object(&args, object, false),
        AuditEvent::K8sObjectCreated(object) => return restore_k8s_object(&args, object, true),
        other => anyhow::bail!(
            "record {} is a {}: only rule and Kubernetes object removals, and objects \
             portguard created, can be undone",
            args.id,
            other.kind()
        ),
    };
    let rule: RecordedRule = serde_json::from_value(removed.rule.clone())
        .context("the recorded rule cannot be read back")?;
    let mut backend = NetlinkBackend::open(args.netns.as_deref()).context("opening netlink")?;
    let ruleset = backend.read_blocking().context("reading the ruleset")?;
    let (tx, placement) = rule.restore_transaction(&ruleset.model)?;
    backend.commit(&tx).context("putting the rule back")?;
    let log = AuditLog::open(&args.audit_log, Rotation::default())
        .with_context(|| format!("opening the audit log {}", args.audit_log.display()))?;
    let audit = AuditHandle::new(log);
    let rec = audit.record_blocking(AuditEvent::RuleRestored {
        removal_seq: args.id,
        port: removed.port,
        proto: removed.proto,
        rule: removed.rule.clone(),
    })?;
    audit.flush()?;
    println!(
        "restored rule {} into {} {} {} ({placement:?}); audit seq {}",
        removed.finding, rule.family, rule.table, rule.chain, rec.seq
    );
    Ok(ExitCode::SUCCESS)
}

/// Re-creates a removed Kubernetes object from its recorded manifest
/// (server-owned fields stripped), or deletes one portguard created
/// (`created`: the reconfigure remedy's HelmChartConfig, only while still
/// ours), and records it.
fn restore_k8s_object(
    args: &RestoreArgs,
    object: &K8sObjectRecord,
    created: bool,
) -> anyhow::Result<ExitCode> {
    let (policy, _) = Policy::load(args.policy.config.as_deref())?;
    let kubeconfig = choose_kubeconfig(
        args.kubeconfig.as_deref(),
        &policy.kubernetes,
        Path::new(K3S_KUBECONFIG),
        in_pod(),
    )
    .context("no kubeconfig: pass --kubeconfig (or set [kubernetes] kubeconfig in the policy)")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let name = runtime.block_on(async {
        let client = connect_choice(&kubeconfig).await?;
        if created {
            reconfigure::undo(&client, &object.manifest).await
        } else {
            remove::restore(&client, &object.manifest).await
        }
    })?;
    let log = AuditLog::open(&args.audit_log, Rotation::default())
        .with_context(|| format!("opening the audit log {}", args.audit_log.display()))?;
    let audit = AuditHandle::new(log);
    let rec = audit.record_blocking(AuditEvent::K8sObjectRestored {
        removal_seq: args.id,
        object: object.clone(),
    })?;
    audit.flush()?;
    let done = if created {
        "deleted (undone)"
    } else {
        "restored"
    };
    println!("{done} {name}; audit seq {}", rec.seq);
    Ok(ExitCode::SUCCESS)
}
