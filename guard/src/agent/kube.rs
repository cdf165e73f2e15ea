//! The Kubernetes layer: watches who claims a protected port, and under
//! `on_claim = "remove"` removes the cause (k3s's packaged Traefik, or objects
//! the policy names), each object audited whole first.
//!
//! Started in one place ([`start`]): the kubeconfig is chosen and connected
//! once, and that one attempt's outcome is what the layer says (off, failing,
//! watching). Its tasks run on the layer's tracker and stop with its token.

use std::{collections::BTreeSet, convert::Infallible};

use kube::Client;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{layers::LayerContext, supervisor::Layer};
use crate::{
    audit::{AuditError, AuditEvent, AuditHandle, K8sObjectRecord},
    k8s::{
        self, ClusterState, ClusterView, PortClaim, RecordedObject, RemovalStep,
        remove::{self, plan_for_claim},
    },
    policy::{KubernetesPolicy, Mode, Policy},
};

/// The running layer: its view (for naming pods behind DNAT targets) and tasks.
pub struct KubeLayer {
    pub view: watch::Receiver<ClusterView>,
    pub layer: Layer,
}

/// Connects once, starts the watches, and the remover when there is a client.
/// Never fails: without a kubeconfig, or with a broken one, the layer says so
/// and the other layers keep guarding.
pub async fn start(ctx: &LayerContext, policy: &Policy) -> KubeLayer {
    let layer = ctx.layer("kubernetes");
    let connection = k8s::cluster::open(ctx.config.kubeconfig.as_deref(), &policy.kubernetes).await;
    let (view, follow) = k8s::watch_connection(&connection, ctx.node.clone(), policy.ports.clone());
    if let Some(follow) = follow {
        layer.spawn("kube-watches", async move {
            follow.await;
            Ok::<_, Infallible>(())
        });
    }
    if let Ok(connection) = connection {
        layer.spawn(
            "kube-claims",
            act_on_claims(
                connection.client,
                view.clone(),
                policy.kubernetes.clone(),
                policy.mode == Mode::Enforce,
                ctx.audit.clone(),
            ),
        );
    }
    KubeLayer { view, layer }
}

/// Reports each claim once when it appears; removes its cause when the policy says so.
/// A claim that comes back (k3s re-applies its manifests) is acted on again.
async fn act_on_claims(
    client: Client,
    mut view: watch::Receiver<ClusterView>,
    policy: KubernetesPolicy,
    enforce: bool,
    audit: AuditHandle,
) -> Result<(), Infallible> {
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
                ClusterState::Failing { error } => warn!(
                    event = "kube_failing",
                    %error,
                    "Kubernetes layer failing: other layers keep guarding"
                ),
                ClusterState::Watching => {
                    info!(event = "kube_in_sync", "Kubernetes layer: in sync")
                }
                _ => {}
            }
            last_state = Some(state_text);
        }
        let current: BTreeSet<PortClaim> = claims.into_iter().collect();
        for claim in current.difference(&known) {
            warn!(event = "kube_claim", claim = %claim, "a Kubernetes object claims a protected port");
            // Observe mode changes nothing, in the cluster either.
            if let Some(plan) = plan_for_claim(claim, &policy).filter(|_| enforce) {
                info!(event = "kube_removing", reason = %plan.reason, "removing the source of the claim");
                let recorder = |rec: &RecordedObject| record_removal(&audit, rec);
                match remove::remove(&client, &plan, recorder).await {
                    Ok(steps) => steps.iter().for_each(log_step),
                    Err(e) => {
                        error!(event = "kube_removal_failed", error = %e, "removal plan could not start")
                    }
                }
            }
        }
        known = current;
        if view.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// The audit record, durable before the object is deleted.
fn record_removal(audit: &AuditHandle, rec: &RecordedObject) -> Result<(), AuditError> {
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
    tokio::task::block_in_place(|| audit.record_blocking(event)).map(drop)
}

fn log_step(step: &RemovalStep) {
    match step {
        RemovalStep::Removed { recorded } => {
            info!(event = "kube_object_removed", object = %recorded.object, "Kubernetes object removed (recorded whole)")
        }
        RemovalStep::AlreadyGone { object } => {
            info!(event = "kube_object_gone", object = %object, "already gone")
        }
        RemovalStep::Failed { object, error, .. } => {
            error!(event = "kube_object_not_removed", object = %object, %error, "Kubernetes object not removed")
        }
        RemovalStep::NotRecorded { object, error } => {
            error!(event = "kube_object_not_recorded", object = %object, %error, "not removed: the audit record could not be written")
        }
    }
}
