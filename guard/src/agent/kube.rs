//! Source and actor for the Kubernetes layer: watches who claims a protected
//! port, and under `on_claim = "remove"` removes the cause (k3s's packaged
//! Traefik, or objects the policy names), each object audited whole first.

use std::{collections::BTreeSet, path::Path};

use kube::Client;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    audit::{AuditEvent, AuditHandle, K8sObjectRecord},
    k8s::{
        self, ClusterState, ClusterView, NodeIdentity, PortClaim, RecordedObject, RemovalStep,
        cluster::{self as kcluster, K3S_KUBECONFIG},
        remove::{self, plan_for_claim},
    },
    policy::{KubernetesPolicy, Mode, Policy},
};

/// The running layer: its view (for naming pods behind DNAT targets) and tasks.
pub struct KubeLayer {
    pub view: watch::Receiver<ClusterView>,
    _watch: k8s::ClusterWatch,
    actor: Option<JoinHandle<()>>,
}

impl Drop for KubeLayer {
    fn drop(&mut self) {
        if let Some(t) = &self.actor {
            t.abort();
        }
    }
}

/// Starts the watches, and the remover when the policy asks for removals.
/// Never fails: without a kubeconfig, or with a broken one, the layer says so
/// and the other layers keep guarding.
pub async fn start(
    kubeconfig_flag: Option<&Path>,
    policy: &Policy,
    node: NodeIdentity,
    audit: AuditHandle,
) -> KubeLayer {
    let choice = kcluster::choose_kubeconfig(
        kubeconfig_flag,
        &policy.kubernetes,
        Path::new(K3S_KUBECONFIG),
    );
    let client = match &choice {
        Some(c) => kcluster::connect(c.path()).await.ok(),
        None => None,
    };
    let Some(client) = client else {
        // k8s::start says why (no kubeconfig, or it cannot connect) and keeps a fixed view.
        let watch = k8s::start(kubeconfig_flag, policy, node).await;
        return KubeLayer {
            view: watch.view.clone(),
            _watch: watch,
            actor: None,
        };
    };
    info!("Kubernetes layer: watching Services and Pods");
    let watch = k8s::spawn_watches(client.clone(), node, policy.ports.clone());
    let actor = tokio::spawn(act_on_claims(
        client,
        watch.view.clone(),
        policy.kubernetes.clone(),
        policy.mode == Mode::Enforce,
        audit,
    ));
    KubeLayer {
        view: watch.view.clone(),
        _watch: watch,
        actor: Some(actor),
    }
}

/// Reports each claim once when it appears; removes its cause when the policy says so.
/// A claim that comes back (k3s re-applies its manifests) is acted on again.
async fn act_on_claims(
    client: Client,
    mut view: watch::Receiver<ClusterView>,
    policy: KubernetesPolicy,
    enforce: bool,
    audit: AuditHandle,
) {
    let mut known: BTreeSet<PortClaim> = BTreeSet::new();
    let mut last_state: Option<String> = None;
    loop {
        let (state, claims) = {
            let v = view.borrow_and_update();
            (v.state.clone(), v.claims.clone())
        };
        let state_text = format!("{state:?}");
        if last_state.as_ref() != Some(&state_text) {
            match &state {
                ClusterState::Failing { error } => {
                    warn!(%error, "Kubernetes layer failing: other layers keep guarding")
                }
                ClusterState::Watching => info!("Kubernetes layer: in sync"),
                _ => {}
            }
            last_state = Some(state_text);
        }
        let current: BTreeSet<PortClaim> = claims.into_iter().collect();
        for claim in current.difference(&known) {
            warn!(claim = %claim, "a Kubernetes object claims a protected port");
            // Observe mode changes nothing, in the cluster either.
            if let Some(plan) = plan_for_claim(claim, &policy).filter(|_| enforce) {
                info!(reason = %plan.reason, "removing the source of the claim");
                let recorder = |rec: &RecordedObject| record_removal(&audit, rec);
                match remove::remove(&client, &plan, recorder).await {
                    Ok(steps) => steps.iter().for_each(log_step),
                    Err(e) => error!(error = %e, "removal plan could not start"),
                }
            }
        }
        known = current;
        if view.changed().await.is_err() {
            return;
        }
    }
}

/// The audit record, durable before the object is deleted.
fn record_removal(audit: &AuditHandle, rec: &RecordedObject) -> Result<(), String> {
    let m = &rec.manifest;
    let event = AuditEvent::K8sObjectRemoved(K8sObjectRecord {
        finding: None,
        api_version: m["apiVersion"].as_str().unwrap_or_default().to_owned(),
        object_kind: m["kind"].as_str().unwrap_or_default().to_owned(),
        namespace: Some(rec.object.namespace.clone()),
        name: rec.object.name.clone(),
        manifest: m.clone(),
    });
    // The remover's callback is synchronous; the append blocks on fdatasync.
    tokio::task::block_in_place(|| audit.record_blocking(event))
        .map(drop)
        .map_err(|e| e.to_string())
}

fn log_step(step: &RemovalStep) {
    match step {
        RemovalStep::Removed { recorded } => {
            info!(object = %recorded.object, "Kubernetes object removed (recorded whole)")
        }
        RemovalStep::AlreadyGone { object } => info!(object = %object, "already gone"),
        RemovalStep::Failed { object, error, .. } => {
            error!(object = %object, %error, "Kubernetes object not removed")
        }
        RemovalStep::NotRecorded { object, error } => {
            error!(object = %object, %error, "not removed: the audit record could not be written")
        }
    }
}
