//! Removing what claims a protected port, and putting it back.
//!
//! Only two kinds of objects are ever removed: k3s's packaged Traefik (a fixed
//! plan, below) and objects the policy names one by one in `removable`. Every
//! object is fetched and recorded whole (its manifest) before it is deleted, and
//! deleted with a uid precondition, so what is deleted is exactly what was recorded.

use std::fmt;

use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, PostParams, Preconditions},
    core::{ApiResource, GroupVersionKind},
};
use serde::Serialize;

use super::{
    claims::{PortClaim, is_packaged_traefik_service},
    cluster::ClusterError,
};
use crate::policy::{KubeKind, KubeObjectName, KubernetesPolicy, OnClaim};

/// ServiceLB names its DaemonSet for a Service `svclb-<service>-<suffix>`.
pub const SVCLB_TRAEFIK_PREFIX: &str = "svclb-traefik";

/// The API resource behind each kind the policy can name.
pub fn api_resource(kind: KubeKind) -> ApiResource {
    let (group, version, plural) = match kind {
        KubeKind::Service => ("", "v1", "services"),
        KubeKind::Pod => ("", "v1", "pods"),
        KubeKind::DaemonSet => ("apps", "v1", "daemonsets"),
        KubeKind::Deployment => ("apps", "v1", "deployments"),
        KubeKind::StatefulSet => ("apps", "v1", "statefulsets"),
        KubeKind::HelmChart => ("helm.cattle.io", "v1", "helmcharts"),
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind.api_kind()),
        plural,
    )
}

/// One entry of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "target")]
pub enum RemovalTarget {
    /// Exactly this object.
    Object { object: KubeObjectName },
    /// The DaemonSets in `namespace` whose names start with `prefix` (ServiceLB's
    /// `svclb-traefik-<hash>`: the hash is not known in advance).
    DaemonSetsNamed { namespace: String, prefix: String },
}

impl fmt::Display for RemovalTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Object { object } => write!(f, "{object}"),
            Self::DaemonSetsNamed { namespace, prefix } => {
                write!(f, "{namespace}/daemonset/{prefix}*")
            }
        }
    }
}

/// What to remove for one claim, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemovalPlan {
    pub reason: String,
    pub targets: Vec<RemovalTarget>,
}

/// k3s's packaged Traefik, whole. Order matters: the Service first (kube-proxy drops
/// its rules and ServiceLB its DaemonSet at once), then ServiceLB's DaemonSet (its
/// hostPort DNAT goes with its pods), then the HelmCharts, without which k3s's helm
/// controller would re-install the chart (and with it the Service).
pub fn k3s_traefik_plan() -> RemovalPlan {
    let object = |kind, name: &str| RemovalTarget::Object {
        object: KubeObjectName {
            namespace: "kube-system".into(),
            kind,
            name: name.into(),
        },
    };
    RemovalPlan {
        reason: "k3s packaged Traefik".into(),
        targets: vec![
            object(KubeKind::Service, "traefik"),
            RemovalTarget::DaemonSetsNamed {
                namespace: "kube-system".into(),
                prefix: format!("{SVCLB_TRAEFIK_PREFIX}-"),
            },
            object(KubeKind::HelmChart, "traefik"),
            object(KubeKind::HelmChart, "traefik-crd"),
        ],
    }
}

/// The plan for one claim under the policy, or None: report only. Never more than
/// the packaged Traefik plan or objects the policy names one by one.
pub fn plan_for_claim(claim: &PortClaim, policy: &KubernetesPolicy) -> Option<RemovalPlan> {
    if policy.on_claim != OnClaim::Remove {
        return None;
    }
    if claim.packaged_traefik || is_packaged_traefik_service(&claim.object) {
        return Some(k3s_traefik_plan());
    }
    // The claimer itself, its controller, or the Service it serves, when named.
    let named: Vec<RemovalTarget> = [
        Some(&claim.object),
        claim.controller.as_ref(),
        claim.service.as_ref(),
    ]
    .into_iter()
    .flatten()
    .filter(|o| policy.may_remove(o))
    .map(|o| RemovalTarget::Object { object: o.clone() })
    .collect();
    (!named.is_empty()).then(|| RemovalPlan {
        reason: format!("named removable in the policy ({claim})"),
        targets: named,
    })
}

/// One object as it was before removal: enough to audit it and to restore it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordedObject {
    pub object: KubeObjectName,
    /// The whole object as the API returned it.
    pub manifest: serde_json::Value,
}

impl RecordedObject {
    fn uid(&self) -> Option<&str> {
        self.manifest.pointer("/metadata/uid")?.as_str()
    }
}

/// What happened to one object of a plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum RemovalStep {
    Removed {
        recorded: RecordedObject,
    },
    /// Not there (404): nothing to do, which is what the plan wants.
    AlreadyGone {
        object: KubeObjectName,
    },
    /// Recorded (when `recorded` is Some) but not deleted, or not even fetched.
    Failed {
        object: KubeObjectName,
        #[serde(skip_serializing_if = "Option::is_none")]
        recorded: Option<RecordedObject>,
        error: ClusterError,
    },
    /// The recorder refused the manifest: nothing was deleted.
    NotRecorded {
        object: KubeObjectName,
        error: String,
    },
}

/// Expands a plan into exact objects (lists DaemonSets for a prefix target).
pub async fn resolve(
    client: &Client,
    plan: &RemovalPlan,
) -> Result<Vec<KubeObjectName>, ClusterError> {
    let mut out = Vec::new();
    for target in &plan.targets {
        match target {
            RemovalTarget::Object { object } => out.push(object.clone()),
            RemovalTarget::DaemonSetsNamed { namespace, prefix } => {
                let api: Api<DynamicObject> = Api::namespaced_with(
                    client.clone(),
                    namespace,
                    &api_resource(KubeKind::DaemonSet),
                );
                let list = api.list(&ListParams::default()).await.map_err(|e| {
                    ClusterError::from_kube(e, format!("listing DaemonSets in {namespace}"))
                })?;
                let mut names: Vec<String> = list
                    .items
                    .into_iter()
                    .filter_map(|ds| ds.metadata.name)
                    .filter(|n| n.starts_with(prefix.as_str()))
                    .collect();
                names.sort();
                out.extend(names.into_iter().map(|name| KubeObjectName {
                    namespace: namespace.clone(),
                    kind: KubeKind::DaemonSet,
                    name,
                }));
            }
        }
    }
    Ok(out)
}

fn api_for(client: &Client, object: &KubeObjectName) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        &object.namespace,
        &api_resource(object.kind),
    )
}

/// Fetches one object whole.
pub async fn fetch_manifest(
    client: &Client,
    object: &KubeObjectName,
) -> Result<RecordedObject, ClusterError> {
    let found = api_for(client, object)
        .get(&object.name)
        .await
        .map_err(|e| ClusterError::from_kube(e, format!("reading {object}")))?;
    let manifest = serde_json::to_value(&found).map_err(|e| ClusterError::Unexpected {
        action: format!("recording {object}"),
        message: e.to_string(),
    })?;
    Ok(RecordedObject {
        object: object.clone(),
        manifest,
    })
}

/// Deletes exactly the recorded object: the uid precondition makes the API refuse
/// (409) when the object was re-created since it was recorded, instead of deleting
/// an object nobody recorded.
pub async fn delete_recorded(
    client: &Client,
    recorded: &RecordedObject,
) -> Result<(), ClusterError> {
    let params = DeleteParams {
        preconditions: recorded.uid().map(|uid| Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    api_for(client, &recorded.object)
        .delete(&recorded.object.name, &params)
        .await
        .map(drop)
        .map_err(|e| ClusterError::from_kube(e, format!("deleting {}", recorded.object)))
}

/// Carries out a plan: for each object, fetch it whole, hand the record to `record`
/// (the audit log: it is written before anything is deleted), then delete it. A
/// refused record stops that object's deletion. One object's failure does not stop
/// the others; the resolve failure (listing DaemonSets) is returned as is.
pub async fn remove<E: fmt::Display>(
    client: &Client,
    plan: &RemovalPlan,
    mut record: impl FnMut(&RecordedObject) -> Result<(), E>,
) -> Result<Vec<RemovalStep>, ClusterError> {
    let objects = resolve(client, plan).await?;
    let mut steps = Vec::with_capacity(objects.len());
    for object in objects {
        let recorded = match fetch_manifest(client, &object).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => {
                steps.push(RemovalStep::AlreadyGone { object });
                continue;
            }
            Err(error) => {
                steps.push(RemovalStep::Failed {
                    object,
                    recorded: None,
                    error,
                });
                continue;
            }
        };
        if let Err(e) = record(&recorded) {
            steps.push(RemovalStep::NotRecorded {
                object,
                error: e.to_string(),
            });
            continue;
        }
        steps.push(match delete_recorded(client, &recorded).await {
            Ok(()) => RemovalStep::Removed { recorded },
            Err(e) if e.is_not_found() => RemovalStep::AlreadyGone { object },
            Err(error) => RemovalStep::Failed {
                object,
                recorded: Some(recorded),
                error,
            },
        });
    }
    Ok(steps)
}

/// Metadata the API server owns: a create with them is refused (resourceVersion) or
/// they would lie about the new object. ownerReferences go too: they name the
/// owner by uid, a restored owner has a new one, and the garbage collector would
/// delete a restored object whose owner uid no longer exists.
const SERVER_OWNED_METADATA: [&str; 9] = [
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "managedFields",
    "generation",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
];

/// The manifest as it can be created again: server-owned metadata and status removed.
pub fn strip_for_restore(manifest: &serde_json::Value) -> serde_json::Value {
    let mut m = manifest.clone();
    if let Some(obj) = m.as_object_mut() {
        obj.remove("status");
        if let Some(meta) = obj.get_mut("metadata").and_then(|v| v.as_object_mut()) {
            for key in SERVER_OWNED_METADATA {
                meta.remove(key);
            }
        }
    }
    m
}

/// Re-creates an object from its recorded manifest (POST of the stripped manifest).
pub async fn restore(
    client: &Client,
    manifest: &serde_json::Value,
) -> Result<KubeObjectName, ClusterError> {
    let unexpected = |message: String| ClusterError::Unexpected {
        action: "reading a recorded manifest".into(),
        message,
    };
    let kind = manifest
        .get("kind")
        .and_then(|k| k.as_str())
        .and_then(KubeKind::from_api_kind)
        .ok_or_else(|| {
            unexpected(format!(
                "kind {:?} is not one portguard removes",
                manifest.get("kind")
            ))
        })?;
    let stripped = strip_for_restore(manifest);
    let object: DynamicObject =
        serde_json::from_value(stripped).map_err(|e| unexpected(e.to_string()))?;
    let name = KubeObjectName {
        namespace: object
            .metadata
            .namespace
            .clone()
            .ok_or_else(|| unexpected("no metadata.namespace".into()))?,
        kind,
        name: object
            .metadata
            .name
            .clone()
            .ok_or_else(|| unexpected("no metadata.name".into()))?,
    };
    api_for(client, &name)
        .create(&PostParams::default(), &object)
        .await
        .map_err(|e| ClusterError::from_kube(e, format!("re-creating {name}")))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{k8s::claims::ClaimVia, policy::Proto};

    fn claim(object: &str, controller: Option<&str>, packaged: bool) -> PortClaim {
        PortClaim {
            port: 443,
            proto: Proto::Tcp,
            object: object.parse().unwrap(),
            via: ClaimVia::NodePort,
            controller: controller.map(|c| c.parse().unwrap()),
            service: None,
            packaged_traefik: packaged,
        }
    }

    #[test]
    fn report_policy_plans_nothing_even_for_traefik() {
        let policy = KubernetesPolicy::default();
        assert_eq!(
            plan_for_claim(&claim("kube-system/service/traefik", None, true), &policy),
            None
        );
    }

    #[test]
    fn packaged_traefik_gets_the_fixed_plan() {
        let policy = KubernetesPolicy {
            on_claim: OnClaim::Remove,
            ..Default::default()
        };
        let plan =
            plan_for_claim(&claim("kube-system/service/traefik", None, true), &policy).unwrap();
        let shown: Vec<String> = plan.targets.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "kube-system/service/traefik",
                "kube-system/daemonset/svclb-traefik-*",
                "kube-system/helmchart/traefik",
                "kube-system/helmchart/traefik-crd",
            ]
        );
    }

    #[test]
    fn other_objects_only_when_named() {
        let mut policy = KubernetesPolicy {
            on_claim: OnClaim::Remove,
            ..Default::default()
        };
        let c = claim("web/pod/edge-x1", Some("web/daemonset/edge"), false);
        assert_eq!(plan_for_claim(&c, &policy), None, "unnamed: report only");
        policy.removable = vec!["web/daemonset/edge".parse().unwrap()];
        let plan = plan_for_claim(&c, &policy).unwrap();
        assert_eq!(
            plan.targets,
            [RemovalTarget::Object {
                object: "web/daemonset/edge".parse().unwrap()
            }]
        );
    }

    #[test]
    fn strip_removes_server_owned_fields_and_keeps_the_rest() {
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "traefik", "namespace": "kube-system", "uid": "u", "resourceVersion": "1",
                         "creationTimestamp": "2024-01-01T00:00:00Z", "managedFields": [], "labels": {"a": "b"}},
            "spec": {"type": "LoadBalancer"},
            "status": {"loadBalancer": {}}
        });
        let s = strip_for_restore(&manifest);
        assert_eq!(
            s,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "traefik", "namespace": "kube-system", "labels": {"a": "b"}},
                "spec": {"type": "LoadBalancer"}
            })
        );
    }

    #[test]
    fn helmchart_resource_is_helm_cattle_io() {
        let ar = api_resource(KubeKind::HelmChart);
        assert_eq!(ar.api_version, "helm.cattle.io/v1");
        assert_eq!(ar.plural, "helmcharts");
        assert_eq!(api_resource(KubeKind::Service).api_version, "v1");
    }
}
