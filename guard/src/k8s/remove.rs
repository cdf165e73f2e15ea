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
    claims::{
        PortClaim, SVCLB_SVCNAME_LABEL, SVCLB_SVCNAMESPACE_LABEL, is_packaged_traefik_service,
    },
    cluster::ClusterError,
};
use crate::policy::{KubeKind, KubeObjectName, KubernetesPolicy, OnClaim};

/// Before k3s 1.25 ServiceLB named a Service's DaemonSet `svclb-<service>`, in
/// the Service's own namespace, owned by the Service (an ownerReference).
const LEGACY_SVCLB_PREFIX: &str = "svclb-";

/// The API resource behind each kind the policy can name.
pub fn api_resource(kind: KubeKind) -> ApiResource {
    let (group, version, plural) = match kind {
        KubeKind::Service => ("", "v1", "services"),
        KubeKind::Pod => ("", "v1", "pods"),
        KubeKind::DaemonSet => ("apps", "v1", "daemonsets"),
        KubeKind::Deployment => ("apps", "v1", "deployments"),
        KubeKind::StatefulSet => ("apps", "v1", "statefulsets"),
        KubeKind::HelmChart => ("helm.cattle.io", "v1", "helmcharts"),
        KubeKind::HelmChartConfig => ("helm.cattle.io", "v1", "helmchartconfigs"),
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind.api_kind()),
        plural,
    )
}

/// One entry of a plan.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "target")]
pub enum RemovalTarget {
    /// Exactly this object.
    Object { object: KubeObjectName },
    /// The DaemonSet ServiceLB runs for one Service (`svclb-<service>-<uid
    /// prefix>`: its name is not known in advance), found by the labels
    /// ServiceLB puts on it (`svccontroller.k3s.cattle.io/svcname` and
    /// `/svcnamespace`) in its namespace; on k3s before 1.25, `svclb-<service>`
    /// in the Service's namespace with an ownerReference to it. Never by name
    /// prefix: `svclb-traefik-` also starts a user's `traefik-internal`'s.
    ServiceLbDaemonSets {
        servicelb_namespace: String,
        service_namespace: String,
        service: String,
    },
}

impl fmt::Display for RemovalTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Object { object } => write!(f, "{object}"),
            Self::ServiceLbDaemonSets {
                servicelb_namespace,
                service_namespace,
                service,
            } => write!(
                f,
                "{servicelb_namespace}/daemonset/<ServiceLB's for {service_namespace}/service/{service}>"
            ),
        }
    }
}

/// What to remove for one claim, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RemovalPlan {
    pub reason: String,
    pub targets: Vec<RemovalTarget>,
    /// The plan is for k3s's packaged Traefik: it runs only once HelmChart
    /// `kube-system/traefik` is seen to be k3s's ([`verify_packaged_traefik`]).
    pub packaged_traefik: bool,
}

/// The annotation k3s's deploy controller puts on what it applies from an
/// addon manifest (`/var/lib/rancher/k3s/server/manifests/traefik.yaml`):
/// wrangler's objectset owner, the `Addon` object.
const OWNER_GVK_ANNOTATION: &str = "objectset.rio.cattle.io/owner-gvk";
const ADDON_OWNER_GVK: &str = "k3s.cattle.io/v1, Kind=Addon";
const OWNER_NAME_ANNOTATION: &str = "objectset.rio.cattle.io/owner-name";

/// Whether HelmChart `kube-system/traefik` is k3s's packaged one: applied by
/// k3s from its `traefik` addon manifest. A user's own Helm release named
/// `traefik` has no such HelmChart (or not k3s's), and is never touched.
pub async fn verify_packaged_traefik(client: &Client) -> Result<(), ClusterError> {
    let chart = KubeObjectName {
        namespace: "kube-system".into(),
        kind: KubeKind::HelmChart,
        name: "traefik".into(),
    };
    let not_k3s = |why: String| ClusterError::Unexpected {
        action: "checking that Traefik is k3s's packaged one".into(),
        message: format!(
            "{why}: not k3s's packaged Traefik (a release of someone's own?), left alone"
        ),
    };
    let found = match api_for(client, &chart).get(&chart.name).await {
        Ok(found) => found,
        Err(e) => {
            let e = ClusterError::from_kube(e, format!("reading {chart}"));
            return Err(if e.is_not_found() {
                not_k3s(format!("no {chart}"))
            } else {
                e
            });
        }
    };
    let annotations = found.metadata.annotations.unwrap_or_default();
    let k3s = annotations.get(OWNER_GVK_ANNOTATION).map(String::as_str) == Some(ADDON_OWNER_GVK)
        && annotations.get(OWNER_NAME_ANNOTATION).map(String::as_str) == Some("traefik");
    if k3s {
        Ok(())
    } else {
        Err(not_k3s(format!(
            "{chart} lacks k3s's addon annotations ({OWNER_GVK_ANNOTATION}: {ADDON_OWNER_GVK}, \
             {OWNER_NAME_ANNOTATION}: traefik)"
        )))
    }
}

/// k3s's packaged Traefik. Order matters: the Service first (kube-proxy drops
/// its rules and ServiceLB its DaemonSet at once), then ServiceLB's DaemonSet
/// for that Service (its hostPort DNAT goes with its pods), then HelmChart
/// `traefik`, without which k3s's helm controller would re-install the chart
/// (and with it the Service). HelmChart `traefik-crd` only with
/// `remove_crds`: its uninstall deletes every Traefik CRD, and with them every
/// IngressRoute, Middleware and TLSOption in the cluster.
pub fn k3s_traefik_plan(policy: &KubernetesPolicy) -> RemovalPlan {
    let object = |kind, name: &str| RemovalTarget::Object {
        object: KubeObjectName {
            namespace: "kube-system".into(),
            kind,
            name: name.into(),
        },
    };
    let mut targets = vec![
        object(KubeKind::Service, "traefik"),
        RemovalTarget::ServiceLbDaemonSets {
            servicelb_namespace: policy.servicelb_namespace.clone(),
            service_namespace: "kube-system".into(),
            service: "traefik".into(),
        },
        object(KubeKind::HelmChart, "traefik"),
    ];
    if policy.remove_crds {
        targets.push(object(KubeKind::HelmChart, "traefik-crd"));
    }
    RemovalPlan {
        reason: "k3s packaged Traefik".into(),
        targets,
        packaged_traefik: true,
    }
}

/// The plan for one claim under the policy, or None: report only. Never more than
/// the packaged Traefik plan or objects the policy names one by one.
pub fn plan_for_claim(claim: &PortClaim, policy: &KubernetesPolicy) -> Option<RemovalPlan> {
    if policy.on_claim != OnClaim::Remove {
        return None;
    }
    if claim.packaged_traefik || is_packaged_traefik_service(&claim.object) {
        return Some(k3s_traefik_plan(policy));
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
        packaged_traefik: false,
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
    /// Already being deleted (`metadata.deletionTimestamp`: a finalizer such
    /// as `wrangler.cattle.io/on-helm-chart-remove` holds it): waited for,
    /// neither recorded nor deleted again.
    BeingDeleted {
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
            RemovalTarget::ServiceLbDaemonSets {
                servicelb_namespace,
                service_namespace,
                service,
            } => {
                let list = |namespace: &str, params: ListParams| {
                    let api: Api<DynamicObject> = Api::namespaced_with(
                        client.clone(),
                        namespace,
                        &api_resource(KubeKind::DaemonSet),
                    );
                    let namespace = namespace.to_owned();
                    async move {
                        api.list(&params).await.map_err(|e| {
                            ClusterError::from_kube(e, format!("listing DaemonSets in {namespace}"))
                        })
                    }
                };
                let selector = format!(
                    "{SVCLB_SVCNAME_LABEL}={service},{SVCLB_SVCNAMESPACE_LABEL}={service_namespace}"
                );
                let current =
                    list(servicelb_namespace, ListParams::default().labels(&selector)).await?;
                // The labels are checked here too: only what carries both is ServiceLB's
                // for this very Service.
                let mut names: Vec<(String, String)> = current
                    .items
                    .iter()
                    .filter(|ds| serves(ds, service_namespace, service))
                    .filter_map(|ds| ds.metadata.name.clone())
                    .map(|n| (servicelb_namespace.clone(), n))
                    .collect();
                if names.is_empty() {
                    let legacy = list(service_namespace, ListParams::default()).await?;
                    names = legacy
                        .items
                        .iter()
                        .filter(|ds| legacy_serves(ds, service))
                        .filter_map(|ds| ds.metadata.name.clone())
                        .map(|n| (service_namespace.clone(), n))
                        .collect();
                }
                names.sort();
                names.dedup();
                out.extend(names.into_iter().map(|(namespace, name)| KubeObjectName {
                    namespace,
                    kind: KubeKind::DaemonSet,
                    name,
                }));
            }
        }
    }
    Ok(out)
}

/// ServiceLB's DaemonSet for `namespace/service`, by the labels it writes.
fn serves(ds: &DynamicObject, namespace: &str, service: &str) -> bool {
    let labels = ds.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    label(SVCLB_SVCNAME_LABEL) == Some(service)
        && label(SVCLB_SVCNAMESPACE_LABEL) == Some(namespace)
}

/// k3s before 1.25: `svclb-<service>`, owned by that Service.
fn legacy_serves(ds: &DynamicObject, service: &str) -> bool {
    let named = ds.metadata.name.as_deref() == Some(&format!("{LEGACY_SVCLB_PREFIX}{service}"));
    let owned = ds.metadata.owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| r.kind == "Service" && r.api_version == "v1" && r.name == service)
    });
    named && owned
}

/// Whether a manifest is ServiceLB's DaemonSet: ServiceLB makes it again from
/// its Service, so it is never re-created from a record (that would leave an
/// orphan fighting the new one for the host ports).
pub fn is_servicelb_daemonset(manifest: &serde_json::Value) -> bool {
    manifest["kind"] == "DaemonSet"
        && (manifest["metadata"]["labels"][SVCLB_SVCNAME_LABEL].is_string()
            || manifest["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(LEGACY_SVCLB_PREFIX))
                && manifest["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|o| o["kind"] == "Service")))
}

pub(super) fn api_for(client: &Client, object: &KubeObjectName) -> Api<DynamicObject> {
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
    if plan.packaged_traefik {
        verify_packaged_traefik(client).await?;
    }
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
        if recorded.manifest["metadata"]["deletionTimestamp"].is_string() {
            steps.push(RemovalStep::BeingDeleted { object });
            continue;
        }
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
    if is_servicelb_daemonset(manifest) {
        return Err(unexpected(format!(
            "{}/{} is ServiceLB's DaemonSet: ServiceLB makes it again from its Service \
             (restore the Service instead); re-created from the record it would be an \
             orphan fighting the new one for the host ports",
            manifest["metadata"]["namespace"].as_str().unwrap_or("?"),
            manifest["metadata"]["name"].as_str().unwrap_or("?")
        )));
    }
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
                "kube-system/daemonset/<ServiceLB's for kube-system/service/traefik>",
                "kube-system/helmchart/traefik",
            ],
            "traefik-crd (every Traefik CRD and custom resource) only when said"
        );
        let policy = KubernetesPolicy {
            on_claim: OnClaim::Remove,
            remove_crds: true,
            servicelb_namespace: "lb".into(),
            ..Default::default()
        };
        let plan =
            plan_for_claim(&claim("kube-system/service/traefik", None, true), &policy).unwrap();
        let shown: Vec<String> = plan.targets.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown[1],
            "lb/daemonset/<ServiceLB's for kube-system/service/traefik>"
        );
        assert_eq!(shown[3], "kube-system/helmchart/traefik-crd");
    }

    #[test]
    fn servicelb_daemonsets_are_told_by_labels_not_by_name() {
        let ds = |name: &str, labels: serde_json::Value, owners: serde_json::Value| {
            serde_json::from_value::<DynamicObject>(serde_json::json!({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": name, "namespace": "kube-system", "labels": labels,
                             "ownerReferences": owners}
            }))
            .unwrap()
        };
        let labels = |svc: &str, ns: &str| serde_json::json!({SVCLB_SVCNAME_LABEL: svc, SVCLB_SVCNAMESPACE_LABEL: ns});
        let none = serde_json::json!([]);
        assert!(serves(
            &ds(
                "svclb-traefik-3f3ed2e1",
                labels("traefik", "kube-system"),
                none.clone()
            ),
            "kube-system",
            "traefik"
        ));
        // A user's `traefik-internal`, and a user's `traefik` in `web`.
        assert!(!serves(
            &ds(
                "svclb-traefik-internal-1a2b3c4d",
                labels("traefik-internal", "kube-system"),
                none.clone()
            ),
            "kube-system",
            "traefik"
        ));
        assert!(!serves(
            &ds(
                "svclb-traefik-9f8e7d6c",
                labels("traefik", "web"),
                none.clone()
            ),
            "kube-system",
            "traefik"
        ));
        assert!(!serves(
            &ds(
                "svclb-traefik-3f3ed2e1",
                serde_json::json!({}),
                none.clone()
            ),
            "kube-system",
            "traefik"
        ));
        let owner = serde_json::json!([{"apiVersion": "v1", "kind": "Service", "name": "traefik", "uid": "u"}]);
        assert!(legacy_serves(
            &ds("svclb-traefik", serde_json::json!({}), owner.clone()),
            "traefik"
        ));
        assert!(!legacy_serves(
            &ds("svclb-traefik-internal", serde_json::json!({}), owner),
            "traefik"
        ));
        assert!(!legacy_serves(
            &ds("svclb-traefik", serde_json::json!({}), none),
            "traefik"
        ));
    }

    #[test]
    fn servicelbs_daemonset_is_never_restored() {
        let current = serde_json::json!({"kind": "DaemonSet", "metadata": {"name": "svclb-traefik-3f3ed2e1",
            "labels": {SVCLB_SVCNAME_LABEL: "traefik"}}});
        let legacy = serde_json::json!({"kind": "DaemonSet", "metadata": {"name": "svclb-traefik",
            "ownerReferences": [{"kind": "Service", "name": "traefik"}]}});
        let users = serde_json::json!({"kind": "DaemonSet", "metadata": {"name": "edge"}});
        assert!(is_servicelb_daemonset(&current));
        assert!(is_servicelb_daemonset(&legacy));
        assert!(!is_servicelb_daemonset(&users));
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
