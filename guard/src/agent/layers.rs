//! The layers that follow the policy (owners, Kubernetes, rule guard, health
//! probes): how each starts on the agent's supervisor, and the set of them a
//! SIGHUP replaces.

use std::{convert::Infallible, sync::Arc};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    AgentConfig,
    events::{self, AgentEvent},
    kube::{self, KubeLayer},
    supervisor::Layer,
};
use crate::{
    audit::AuditHandle,
    k8s::{ClusterView, NodeIdentity},
    owners::{Owners, ResolvedOwners},
    policy::Policy,
    probes::HealthProbe,
    rules::{GuardReport, RuleGuard},
};

/// Bounded queue from the rule guard to its forwarder (reports only; never blocks the guard).
const RULE_GUARD_QUEUE: usize = 1024;

/// What every layer is started with.
pub struct LayerContext {
    /// The agent's token: every layer's is a child of it.
    pub root: CancellationToken,
    pub events: mpsc::Sender<AgentEvent>,
    pub config: AgentConfig,
    pub audit: AuditHandle,
    pub node: NodeIdentity,
}

impl LayerContext {
    /// A new, empty layer under the agent's token.
    pub fn layer(&self, name: &'static str) -> Layer {
        Layer::new(name, &self.root, self.events.clone())
    }
}

/// The live owners model and the layer that keeps it current.
pub struct OwnersLayer {
    pub model: watch::Receiver<Arc<ResolvedOwners>>,
    pub layer: Layer,
}

/// Resolves the owners (returns once the first model is complete) and follows
/// them; each change reaches the agent tagged with `generation`.
pub async fn start_owners(ctx: &LayerContext, policy: &Policy, generation: u64) -> OwnersLayer {
    let layer = ctx.layer("owners");
    let (model, follow) = Owners::new(policy.clone()).start().await;
    layer.spawn("owners", async move {
        follow.await;
        Ok::<_, Infallible>(())
    });
    layer.spawn(
        "owners-changes",
        events::owners_changes(model.clone(), generation, ctx.events.clone()),
    );
    OwnersLayer { model, layer }
}

/// The rule guard on its own layer. It stops on a watch flag: the layer's
/// token sets it, and the layer waits for the teardown (pins removed).
pub fn start_rules(
    ctx: &LayerContext,
    policy: &Policy,
    owners: &watch::Receiver<Arc<ResolvedOwners>>,
    cluster: &watch::Receiver<ClusterView>,
) -> Layer {
    let layer = ctx.layer("rules");
    let (reports, reports_rx) = mpsc::channel::<GuardReport>(RULE_GUARD_QUEUE);
    let guard = RuleGuard {
        netns: ctx.config.netns.clone(),
        policy: policy.clone(),
        audit: ctx.audit.clone(),
        owners: owners.clone(),
        reports,
        legacy_poll: ctx.config.legacy_poll,
        legacy_check: ctx.config.legacy_check,
        // Removals name the pod and Service behind their target when the cluster knows it.
        cluster: Some(cluster.clone()),
    };
    layer.spawn_graceful("rule-guard", move |token| async move {
        let (stop, stop_rx) = watch::channel(false);
        let run = guard.run_netlink(stop_rx);
        tokio::pin!(run);
        tokio::select! {
            done = &mut run => done,
            () = token.cancelled() => {
                let _ = stop.send(true);
                run.await
            }
        }
    });
    layer.spawn(
        "rule-guard-reports",
        events::guard_reports(reports_rx, ctx.events.clone()),
    );
    layer
}

/// Every health probe of the policy, each its own task.
pub fn start_probes(ctx: &LayerContext, probes: Vec<HealthProbe>) -> Layer {
    let layer = ctx.layer("probes");
    for probe in probes {
        let events = ctx.events.clone();
        layer.spawn("probe", async move {
            probe.run(events).await;
            Ok::<_, Infallible>(())
        });
    }
    layer
}

/// The layers of one policy.
pub struct PolicyLayers {
    /// Counts policies (0 at start, +1 per reload): stale events are ignored.
    pub generation: u64,
    pub owners: OwnersLayer,
    pub kube: KubeLayer,
    pub rules: Layer,
    pub probes: Layer,
}

impl PolicyLayers {
    /// Replaces the layers of the running policy with `policy`'s, keeping the
    /// gap small: the new owners and Kubernetes view are up before the old rule
    /// guard removes its pins; the new rule guard starts right after.
    pub async fn replace(&mut self, ctx: &LayerContext, policy: &Policy, probes: Vec<HealthProbe>) {
        let generation = self.generation + 1;
        let owners = start_owners(ctx, policy, generation).await;
        let kube = kube::start(ctx, policy).await;
        self.rules.stop().await;
        let rules = start_rules(ctx, policy, &owners.model, &kube.view);
        self.probes.stop().await;
        let probes = start_probes(ctx, probes);
        let old = std::mem::replace(
            self,
            Self {
                generation,
                owners,
                kube,
                rules,
                probes,
            },
        );
        old.kube.layer.stop().await;
        old.owners.layer.stop().await;
    }

    /// Stops every layer, the rule guard first (its pins go with the agent).
    pub async fn stop(&self) {
        self.rules.stop().await;
        self.probes.stop().await;
        self.kube.layer.stop().await;
        self.owners.layer.stop().await;
    }
}
