//! `portguard check`: a one-shot audit of the NAT rules on protected ports.
//! Exit 0 clean, 1 findings, 2 error.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    PolicyArgs,
    listeners::{self, CgroupBlind, Holder},
};
use crate::{
    ebpf::Ownership,
    k8s::{
        self, ClusterState, ClusterView, K8sSource, NodeIdentity, cluster,
        crd_impact::{CrdImpact, traefik_crd_impact},
        hardening_status,
    },
    nft::{self, Finding, InspectInput, OwnedTargets},
    owners::{Owners, ResolvedOwners},
    policy::{OnClaim, Policy},
};

const EXIT_FINDINGS: u8 = 1;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print `{"findings":[…], "listeners":[…], "hardening":{…}, "kubernetes":{…},
    /// "crd_removal":{…}, "unknown":{…}}` instead of tables (`crd_removal`: with
    /// `remove_crds = true`, what deleting HelmChart traefik-crd would take with
    /// it, else null; `unknown`: what could not be resolved without a visible
    /// cgroup v2 hierarchy, else null).
    #[arg(long)]
    pub json: bool,
    /// kubeconfig for naming the pods and Services behind foreign rules
    /// (default: the policy's, else /etc/rancher/k3s/k3s.yaml when it exists).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Inspect the network namespace /run/netns/NAME instead of this one.
    #[arg(long, hide = true, value_name = "NAME")]
    pub netns: Option<String>,
}

/// How long `check` waits for the Kubernetes watches' first lists.
const KUBE_SYNC_WAIT: Duration = Duration::from_secs(5);

/// With `remove_crds = true`: what deleting HelmChart `traefik-crd` would
/// delete, counted now, or why it could not be counted.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum CrdRemoval {
    Counted(CrdImpact),
    Uncounted(String),
}

impl CrdRemoval {
    fn warning(&self) -> String {
        let what = match self {
            Self::Counted(impact) => impact.to_string(),
            Self::Uncounted(why) => format!(
                "deleting HelmChart kube-system/traefik-crd uninstalls every Traefik CRD of k3s \
                 and every object of theirs, which could not be counted: {why}"
            ),
        };
        format!("remove_crds = true: {what}; no audit record can bring these back")
    }
}

/// A finding, with the Kubernetes objects behind its target when known.
#[derive(Serialize)]
struct CheckedFinding<'a> {
    #[serde(flatten)]
    finding: &'a Finding,
    #[serde(skip_serializing_if = "Option::is_none")]
    kubernetes: Option<K8sSource>,
    /// Who committed the rule: always null here. Only the kernel's commit
    /// notice names the committer, and `check` reads a ruleset that was
    /// committed before it ran; the running agent records it.
    committer: Option<crate::audit::Committer>,
}

pub fn main(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let (policy, _source) = Policy::load(args.policy.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (model, addrs) =
        nft::read_with_addrs(args.netns.as_deref()).context("reading the ruleset")?;
    // Another namespace is not this host: its Docker, sockets and cluster are not ours.
    let this_host = args.netns.is_none();
    let owners = this_host.then(|| runtime.block_on(Owners::new(policy.clone()).resolve_once()));
    let owned = owners
        .as_ref()
        .map_or_else(OwnedTargets::docker_fallback, ResolvedOwners::owned_targets);
    let node = NodeIdentity {
        name: hostname(),
        addresses: addrs.iter().map(|a| a.addr).collect(),
    };
    let input = InspectInput::from_policy(&policy, owned, addrs);
    let findings = nft::inspect(&model, &input);
    for w in &model.warnings {
        eprintln!("portguard: warning: {w}");
    }

    // Without a cgroup v2 hierarchy the NAT findings stand; what needs cgroups
    // is named instead of failing the whole audit.
    let strangers: Vec<Holder> = match &owners {
        Some(owners) => listeners::holders(&policy, owners)
            .into_iter()
            .filter(|h| h.ownership == Ownership::Stranger)
            .collect(),
        None => Vec::new(),
    };
    let blind = owners.as_ref().and_then(|o| CgroupBlind::of(&policy, o));
    let hardening = this_host.then(|| hardening_status(Path::new("/")));
    let cluster = if !findings.is_empty() {
        Some(runtime.block_on(cluster_view(&args, &policy, node)))
    } else {
        None
    };
    let crd_removal = (policy.kubernetes.on_claim == OnClaim::Remove
        && policy.kubernetes.remove_crds)
        .then(|| runtime.block_on(crd_removal(&args, &policy)));
    let checked: Vec<CheckedFinding<'_>> = findings
        .iter()
        .map(|f| CheckedFinding {
            finding: f,
            kubernetes: cluster
                .as_ref()
                .and_then(|c| target_ip(f).and_then(|ip| c.lookup_target(ip)).cloned()),
            committer: None,
        })
        .collect();

    if args.json {
        let doc = serde_json::json!({
            "findings": checked,
            "listeners": strangers,
            "hardening": hardening,
            "kubernetes": cluster.as_ref().map(|c| &c.state),
            "crd_removal": crd_removal,
            "warnings": model.warnings,
            "unknown": blind,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", table(&checked, model.rule_count()));
        if !strangers.is_empty() {
            println!();
            println!("non-owners holding protected ports:");
            listeners::print_table(&strangers);
        }
        if let Some(h) = &hardening
            && h.k3s_present
        {
            println!("k3s: {}", h.summary());
        }
        if let Some(b) = &blind {
            println!("{}", b.message);
        }
        if let Some(c) = &crd_removal {
            println!("warning: {}", c.warning());
        }
    }
    Ok(if findings.is_empty() && strangers.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FINDINGS)
    })
}

/// The cluster's view once its first lists are in (or the wait ran out, or the
/// layer is off or failing: then it says so and names nothing).
async fn cluster_view(args: &CheckArgs, policy: &Policy, node: NodeIdentity) -> ClusterView {
    let mut watch = k8s::start(args.kubeconfig.as_deref(), policy, node).await;
    let _ = tokio::time::timeout(
        KUBE_SYNC_WAIT,
        watch
            .view
            .wait_for(|v| !matches!(v.state, ClusterState::Syncing)),
    )
    .await;
    watch.view.borrow().clone()
}

/// Counts what `remove_crds` would delete, in the cluster `check` talks to.
async fn crd_removal(args: &CheckArgs, policy: &Policy) -> CrdRemoval {
    let count = async {
        let connection = cluster::open(args.kubeconfig.as_deref(), &policy.kubernetes)
            .await
            .map_err(|e| e.to_string())?;
        traefik_crd_impact(&connection.client).await.map_err(|e| {
            k8s::ClusterError::from_kube(e, "counting the objects of Traefik's CRDs").to_string()
        })
    };
    match tokio::time::timeout(KUBE_SYNC_WAIT, count).await {
        Ok(Ok(impact)) => CrdRemoval::Counted(impact),
        Ok(Err(why)) => CrdRemoval::Uncounted(why),
        Err(_) => CrdRemoval::Uncounted(format!("no answer within {}s", KUBE_SYNC_WAIT.as_secs())),
    }
}

/// The address a rule sends connections to (`198.51.100.7:80`, `[2001:db8::7]:80`, an address alone).
fn target_ip(f: &Finding) -> Option<IpAddr> {
    let t = f.target.as_deref()?;
    t.parse::<SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| t.parse::<IpAddr>())
        .ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The table a person reads.
fn table(findings: &[CheckedFinding<'_>], rules: usize) -> String {
    let mut out = String::new();
    if findings.is_empty() {
        let _ = writeln!(
            out,
            "clean: no foreign NAT rule on a protected port ({rules} rules read)"
        );
        return out;
    }
    let rows: Vec<[String; 6]> = findings
        .iter()
        .map(
            |CheckedFinding {
                 finding: f,
                 kubernetes,
                 ..
             }| {
                let source = match kubernetes {
                    Some(k) => format!("{} [{k}]", f.source),
                    None => f.source.clone(),
                };
                [
                    if f.active {
                        format!("ACTIVE ({})", join(&f.active_on))
                    } else {
                        "latent".into()
                    },
                    f.kind.to_string(),
                    format!("{}/{}", f.proto, f.port),
                    format!(
                        "{} {} {} {}",
                        f.family,
                        f.table,
                        f.chain,
                        f.handle
                            .map_or_else(|| format!("#{}", f.position), |h| format!("handle {h}"))
                    ),
                    if f.is_shadow() {
                        format!("keeps from {}", f.shadows.join(", "))
                    } else {
                        f.target.clone().unwrap_or_else(|| "?".into())
                    },
                    if f.evidence.is_empty() {
                        source
                    } else {
                        format!("{source} ({})", f.evidence.join("; "))
                    },
                ]
            },
        )
        .collect();
    let header = ["STATE", "KIND", "PORT", "RULE", "TARGET", "SOURCE"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        l
    };
    let _ = writeln!(out, "{}", line(&header));
    for (r, f) in rows.iter().zip(findings) {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
        let _ = writeln!(out, "  why: {}", f.finding.reason);
    }
    let shadows = findings.iter().filter(|f| f.finding.is_shadow()).count();
    let rewrites = findings.len() - shadows;
    let active = findings
        .iter()
        .filter(|f| f.finding.active && !f.finding.is_shadow())
        .count();
    let _ = writeln!(
        out,
        "{rewrites} foreign rule(s) on protected ports: {active} active, {} latent",
        rewrites - active
    );
    let _ = writeln!(
        out,
        "committed by: unknown (only the kernel's notice of each commit names the process, and \
         these were committed before check ran; the running agent records it: portguard report)"
    );
    if shadows > 0 {
        let _ = writeln!(
            out,
            "{shadows} foreign rule(s) shadowing an owner's mapping: new connections skip it \
             (a pin defeats them; the agent reports them unless on_shadow = \"remove\")"
        );
    }
    out
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
