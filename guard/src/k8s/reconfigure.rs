//! The least destructive remedy for k3s's packaged Traefik: a `HelmChartConfig`
//! `kube-system/traefik` (how k3s documents customising its packaged charts;
//! helm-controller merges its `valuesContent` over the HelmChart's) that makes
//! Traefik's Service `ClusterIP`, or moves it to other host ports. Traefik keeps
//! serving inside the cluster; ServiceLB drops its DaemonSet (no LoadBalancer
//! any more) or moves it; kube-proxy drops the LoadBalancer rules. Nothing is
//! deleted.
//!
//! A HelmChartConfig someone else wrote is never overwritten: it holds their
//! values. Ours carries [`REMEDY_ANNOTATION`]; undoing it deletes exactly that
//! object (uid precondition), and only while it is still ours.

use std::collections::BTreeMap;

use kube::{
    Client,
    api::{DeleteParams, DynamicObject, PostParams, Preconditions},
};
use serde::Serialize;

use super::{cluster::ClusterError, remove::api_for};
use crate::policy::{KubeKind, KubeObjectName};

/// Marks a HelmChartConfig portguard wrote; its value says what it does.
pub const REMEDY_ANNOTATION: &str = "portguard.io/remedy";

/// The packaged Traefik's HelmChartConfig: same name and namespace as its HelmChart.
pub fn traefik_config_name() -> KubeObjectName {
    KubeObjectName {
        namespace: "kube-system".into(),
        kind: KubeKind::HelmChartConfig,
        name: "traefik".into(),
    }
}

/// Traefik chart entry points behind k3s's host ports (`ports.web`, `ports.websecure`).
fn entry_point(host_port: u16) -> Option<&'static str> {
    match host_port {
        80 => Some("web"),
        443 => Some("websecure"),
        _ => None,
    }
}

/// The chart values: `service.type: ClusterIP`, or each remapped entry
/// point's `exposedPort`.
pub fn values_content(remap: &BTreeMap<u16, u16>) -> String {
    if remap.is_empty() {
        return "service:\n  type: ClusterIP\n".to_owned();
    }
    let mut out = String::from("ports:\n");
    for (from, to) in remap {
        if let Some(name) = entry_point(*from) {
            out.push_str(&format!("  {name}:\n    exposedPort: {to}\n"));
        }
    }
    out
}

/// The HelmChartConfig portguard creates.
pub fn traefik_config(remap: &BTreeMap<u16, u16>) -> serde_json::Value {
    let what = if remap.is_empty() {
        "traefik service ClusterIP".to_owned()
    } else {
        let moves: Vec<String> = remap.iter().map(|(f, t)| format!("{f}->{t}")).collect();
        format!("traefik ports {}", moves.join(","))
    };
    serde_json::json!({
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChartConfig",
        "metadata": {
            "name": "traefik",
            "namespace": "kube-system",
            "annotations": { REMEDY_ANNOTATION: what },
        },
        "spec": { "valuesContent": values_content(remap) },
    })
}

/// What the remedy did.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum ReconfigureStep {
    /// Recorded, then created.
    Created {
        manifest: serde_json::Value,
    },
    /// Ours is there already with the same values: nothing to do.
    AlreadyDone,
    /// Someone else's HelmChartConfig is there: left as it is.
    NotOurs {
        existing: serde_json::Value,
    },
    /// The recorder refused: nothing created.
    NotRecorded {
        error: String,
    },
    Failed {
        error: ClusterError,
    },
}

/// Applies the remedy: reads `kube-system/traefik` HelmChartConfig; absent,
/// hands the manifest to `record` (the audit log, before anything changes)
/// and creates it.
pub async fn reconfigure<E: std::fmt::Display>(
    client: &Client,
    remap: &BTreeMap<u16, u16>,
    record: impl FnOnce(&serde_json::Value) -> Result<(), E>,
) -> ReconfigureStep {
    let name = traefik_config_name();
    let api = api_for(client, &name);
    let wanted = traefik_config(remap);
    match api.get(&name.name).await {
        Ok(existing) => {
            let existing = serde_json::to_value(&existing).unwrap_or_default();
            let ours = existing["metadata"]["annotations"][REMEDY_ANNOTATION].is_string();
            if ours && existing["spec"]["valuesContent"] == wanted["spec"]["valuesContent"] {
                ReconfigureStep::AlreadyDone
            } else {
                ReconfigureStep::NotOurs { existing }
            }
        }
        Err(e) => {
            let e = ClusterError::from_kube(e, format!("reading {name}"));
            if !e.is_not_found() {
                return ReconfigureStep::Failed { error: e };
            }
            if let Err(error) = record(&wanted) {
                return ReconfigureStep::NotRecorded {
                    error: error.to_string(),
                };
            }
            let object: DynamicObject = match serde_json::from_value(wanted.clone()) {
                Ok(o) => o,
                Err(e) => {
                    return ReconfigureStep::Failed {
                        error: ClusterError::Unexpected {
                            action: format!("building {name}"),
                            message: e.to_string(),
                        },
                    };
                }
            };
            match api.create(&PostParams::default(), &object).await {
                Ok(_) => ReconfigureStep::Created { manifest: wanted },
                Err(e) => ReconfigureStep::Failed {
                    error: ClusterError::from_kube(e, format!("creating {name}")),
                },
            }
        }
    }
}

/// Undoes [`reconfigure`]: deletes the HelmChartConfig `manifest` names, only
/// if it still carries [`REMEDY_ANNOTATION`] (someone may have replaced it
/// since), with its uid as a precondition.
pub async fn undo(
    client: &Client,
    manifest: &serde_json::Value,
) -> Result<KubeObjectName, ClusterError> {
    let name = KubeObjectName {
        namespace: manifest["metadata"]["namespace"]
            .as_str()
            .unwrap_or("kube-system")
            .to_owned(),
        kind: KubeKind::HelmChartConfig,
        name: manifest["metadata"]["name"]
            .as_str()
            .unwrap_or("traefik")
            .to_owned(),
    };
    let api = api_for(client, &name);
    let current = api
        .get(&name.name)
        .await
        .map_err(|e| ClusterError::from_kube(e, format!("reading {name}")))?;
    let ours = current
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(REMEDY_ANNOTATION));
    if !ours {
        return Err(ClusterError::Unexpected {
            action: format!("undoing the reconfiguration {name}"),
            message: format!(
                "{name} no longer carries {REMEDY_ANNOTATION}: someone else's now, left alone"
            ),
        });
    }
    let params = DeleteParams {
        preconditions: current.metadata.uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    api.delete(&name.name, &params)
        .await
        .map_err(|e| ClusterError::from_kube(e, format!("deleting {name}")))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_make_the_service_clusterip_or_move_its_ports() {
        assert_eq!(
            values_content(&BTreeMap::new()),
            "service:\n  type: ClusterIP\n"
        );
        let remap = BTreeMap::from([(80, 8081), (443, 8444)]);
        assert_eq!(
            values_content(&remap),
            "ports:\n  web:\n    exposedPort: 8081\n  websecure:\n    exposedPort: 8444\n"
        );
        let m = traefik_config(&remap);
        assert_eq!(m["kind"], "HelmChartConfig");
        assert_eq!(
            m["metadata"]["annotations"][REMEDY_ANNOTATION],
            "traefik ports 80->8081,443->8444"
        );
    }
}
