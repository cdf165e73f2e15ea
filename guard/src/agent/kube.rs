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
        claims::is_packaged_traefik_service,
        reconfigure::{self, ReconfigureStep},
        remove::{self, RemovalPlan, plan_for_claim},
    },
    policy::{Mode, OnClaim, Policy},
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
                policy.clone(),
                ctx.audit.clone(),
            ),
        );
    }
    KubeLayer { view, layer }
}

/// Reports each claim once when it appears; removes its cause when the policy
/// says so for the claimed port (its own `mode` or the global one). Claims
/// that share a cause (the packaged Traefik claims 80 and 443, by its Service
/// and by ServiceLB's pods) run its plan once. A claim that comes back (k3s
/// re-applies its manifests) is acted on again.
async fn act_on_claims(
    client: Client,
    mut view: watch::Receiver<ClusterView>,
    policy: Policy,
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
        let mut plans: BTreeSet<RemovalPlan> = BTreeSet::new();
        let mut reconfigure = false;
        for claim in current.difference(&known) {
            warn!(event = "kube_claim", claim = %claim, "a Kubernetes object claims a protected port");
            if policy.kubernetes.on_claim == OnClaim::Reconfigure
                && (claim.packaged_traefik || is_packaged_traefik_service(&claim.object))
            {
                if enforced(&policy, claim) {
                    reconfigure = true;
                } else {
                    info!(event = "kube_reconfigure_observed", claim = %claim, "the port is observed: reported, nothing reconfigured");
                }
                continue;
            }
            if let Some(plan) = plan_for_claim(claim, &policy.kubernetes) {
                // Observe mode (the port's own, or the global one) changes
                // nothing, in the cluster either.
                if enforced(&policy, claim) {
                    plans.insert(plan);
                } else {
                    info!(event = "kube_removal_observed", claim = %claim, reason = %plan.reason, "the port is observed: reported, nothing removed");
                }
            }
        }
        if reconfigure && let Err(error) = remove::verify_packaged_traefik(&client).await {
            warn!(event = "kube_reconfigure_refused", %error, "not reconfigured");
        } else if reconfigure {
            let recorder = |m: &serde_json::Value| record_creation(&audit, m);
            log_reconfigure(
                &reconfigure::reconfigure(&client, &policy.kubernetes.remap, recorder).await,
            );
        }
        for plan in plans {
            info!(event = "kube_removing", reason = %plan.reason, "removing the source of the claim");
            let recorder = |rec: &RecordedObject| record_removal(&audit, rec);
            match remove::remove(&client, &plan, recorder).await {
                Ok(steps) => steps.iter().for_each(log_step),
                Err(e) => {
                    error!(event = "kube_removal_failed", error = %e, "removal plan could not start")
                }
            }
        }
        known = current;
        if view.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// The audit record of an object portguard is about to create (its undo).
fn record_creation(audit: &AuditHandle, manifest: &serde_json::Value) -> Result<(), AuditError> {
    let event = AuditEvent::K8sObjectCreated(K8sObjectRecord {
        finding: None,
        api_version: manifest["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        object_kind: manifest["kind"].as_str().unwrap_or_default().to_owned(),
        namespace: manifest["metadata"]["namespace"]
            .as_str()
            .map(str::to_owned),
        name: manifest["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        manifest: manifest.clone(),
    });
    tokio::task::block_in_place(|| audit.record_blocking(event)).map(drop)
}

fn log_reconfigure(step: &ReconfigureStep) {
    match step {
        ReconfigureStep::Created { .. } => info!(
            event = "kube_reconfigured",
            "HelmChartConfig kube-system/traefik created (recorded first): k3s's Traefik leaves the host ports, nothing deleted"
        ),
        ReconfigureStep::AlreadyDone => info!(
            event = "kube_reconfigured",
            "HelmChartConfig kube-system/traefik is portguard's already"
        ),
        ReconfigureStep::NotOurs { .. } => warn!(
            event = "kube_reconfigure_refused",
            "a HelmChartConfig kube-system/traefik exists with someone's values: not overwritten; \
             set `service: {{type: ClusterIP}}` in it yourself, or use on_claim = \"remove\""
        ),
        ReconfigureStep::NotRecorded { error } => error!(
            event = "kube_reconfigure_not_recorded",
            %error,
            "not reconfigured: the audit record could not be written"
        ),
        ReconfigureStep::Failed { error } => error!(
            event = "kube_reconfigure_failed",
            %error,
            "HelmChartConfig kube-system/traefik could not be created"
        ),
    }
}

/// Whether the claimed port is in enforce mode (its entry's mode, else the global one).
fn enforced(policy: &Policy, claim: &PortClaim) -> bool {
    policy
        .find(claim.port, claim.proto)
        .map_or(policy.mode, |p| policy.mode_of(p))
        == Mode::Enforce
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
        RemovalStep::BeingDeleted { object } => {
            info!(event = "kube_object_being_deleted", object = %object, "already being deleted (a finalizer holds it): waited for, not deleted again")
        }
        RemovalStep::Failed { object, error, .. } => {
            error!(event = "kube_object_not_removed", object = %object, %error, "Kubernetes object not removed")
        }
        RemovalStep::NotRecorded { object, error } => {
            error!(event = "kube_object_not_recorded", object = %object, %error, "not removed: the audit record could not be written")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySource;

    #[test]
    fn a_ports_own_observe_mode_keeps_the_cluster_untouched() {
        let policy = Policy::parse(
            "mode = \"enforce\"\n[[ports]]\nport = 80\nowner = \"docker\"\nmode = \"observe\"\n\
             [[ports]]\nport = 443\nowner = \"docker\"\n",
            PolicySource::Embedded,
        )
        .unwrap();
        let claim = |port| PortClaim {
            port,
            proto: crate::types::Proto::Tcp,
            object: "kube-system/service/traefik".parse().unwrap(),
            via: k8s::claims::ClaimVia::NodePort,
            controller: None,
            service: None,
            packaged_traefik: true,
        };
        assert!(!enforced(&policy, &claim(80)));
        assert!(enforced(&policy, &claim(443)));
    }
}
