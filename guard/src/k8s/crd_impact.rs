//! What `remove_crds = true` would destroy, counted in the cluster now.
//!
//! k3s packages Traefik's CRDs as the templates of a Helm release of their own,
//! `traefik-crd` in kube-system: deleting HelmChart `kube-system/traefik-crd`
//! makes helm-controller uninstall that release, which deletes every one of its
//! CRDs, and the API server then deletes every object of those kinds in every
//! namespace (IngressRoutes, Middlewares, TLSOptions, …). No audit record can
//! bring those back, so `check` says how many there are before anyone turns
//! the switch on.
//!
//! The CRDs are found the way Helm marks what it installed
//! (`meta.helm.sh/release-name: traefik-crd`, `meta.helm.sh/release-namespace:
//! kube-system`), never by group: a Traefik CRD someone installed apart from
//! k3s's release does not go with it, and is not counted.

use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};
use serde::Serialize;

/// The Helm release k3s installs Traefik's CRDs with.
pub const TRAEFIK_CRD_RELEASE: &str = "traefik-crd";
/// Its namespace (the HelmChart's).
pub const TRAEFIK_CRD_RELEASE_NAMESPACE: &str = "kube-system";
const RELEASE_NAME_ANNOTATION: &str = "meta.helm.sh/release-name";
const RELEASE_NAMESPACE_ANNOTATION: &str = "meta.helm.sh/release-namespace";
/// Objects asked for per page while counting.
const PAGE: u32 = 500;

/// One CRD of the release and the objects that would go with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CrdObjects {
    /// `ingressroutes.traefik.io`
    pub crd: String,
    /// `IngressRoute`
    pub kind: String,
    /// How many objects of it exist now, in every namespace.
    pub objects: u64,
}

/// Everything deleting HelmChart `traefik-crd` would take with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CrdImpact {
    pub crds: Vec<CrdObjects>,
}

impl CrdImpact {
    pub fn objects(&self) -> u64 {
        self.crds.iter().map(|c| c.objects).sum()
    }
}

impl fmt::Display for CrdImpact {
    /// `deleting HelmChart kube-system/traefik-crd uninstalls 19 CRDs and with
    /// them 4 objects: 2 IngressRoute, 1 Middleware, 1 TLSOption`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deleting HelmChart {TRAEFIK_CRD_RELEASE_NAMESPACE}/{TRAEFIK_CRD_RELEASE} uninstalls {} CRD(s)",
            self.crds.len()
        )?;
        let objects = self.objects();
        if objects == 0 {
            return write!(f, "; no object of theirs exists now");
        }
        write!(f, " and with them {objects} object(s) in every namespace: ")?;
        let mut first = true;
        for c in self.crds.iter().filter(|c| c.objects > 0) {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{} {} ({})", c.objects, c.kind, c.crd)?;
        }
        Ok(())
    }
}

/// Whether a CRD belongs to k3s's `traefik-crd` release.
pub fn in_traefik_crd_release(crd: &CustomResourceDefinition) -> bool {
    let Some(ann) = crd.metadata.annotations.as_ref() else {
        return false;
    };
    ann.get(RELEASE_NAME_ANNOTATION).map(String::as_str) == Some(TRAEFIK_CRD_RELEASE)
        && ann.get(RELEASE_NAMESPACE_ANNOTATION).map(String::as_str)
            == Some(TRAEFIK_CRD_RELEASE_NAMESPACE)
}

/// Counts, now, what deleting HelmChart `traefik-crd` would delete. Reads only
/// (list CRDs, then list each of the release's kinds across namespaces).
pub async fn traefik_crd_impact(client: &Client) -> Result<CrdImpact, kube::Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut impact = CrdImpact::default();
    for crd in crds.list(&ListParams::default()).await? {
        if !in_traefik_crd_release(&crd) {
            continue;
        }
        let spec = &crd.spec;
        // Objects are counted once, through the version the API stores them in.
        let Some(version) = spec
            .versions
            .iter()
            .find(|v| v.storage)
            .or_else(|| spec.versions.iter().find(|v| v.served))
        else {
            continue;
        };
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&spec.group, &version.name, &spec.names.kind),
            &spec.names.plural,
        );
        let objects = count_all(client, &resource).await?;
        impact.crds.push(CrdObjects {
            crd: crd.metadata.name.clone().unwrap_or_default(),
            kind: spec.names.kind.clone(),
            objects,
        });
    }
    impact.crds.sort_by(|a, b| a.crd.cmp(&b.crd));
    Ok(impact)
}

/// Every object of one kind in every namespace, page by page.
async fn count_all(client: &Client, resource: &ApiResource) -> Result<u64, kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
    let mut params = ListParams::default().limit(PAGE);
    let mut total = 0u64;
    loop {
        let page = api.list_metadata(&params).await?;
        total += page.items.len() as u64;
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd(annotations: &[(&str, &str)]) -> CustomResourceDefinition {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "ingressroutes.traefik.io",
                         "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                             .collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {"group": "traefik.io", "scope": "Namespaced",
                     "names": {"kind": "IngressRoute", "plural": "ingressroutes"},
                     "versions": [{"name": "v1alpha1", "served": true, "storage": true}]}
        }))
        .expect("crd")
    }

    #[test]
    fn only_the_crds_of_k3ss_release_count() {
        assert!(in_traefik_crd_release(&crd(&[
            (RELEASE_NAME_ANNOTATION, "traefik-crd"),
            (RELEASE_NAMESPACE_ANNOTATION, "kube-system"),
        ])));
        // Someone's own release of the same chart elsewhere, or no release at all.
        assert!(!in_traefik_crd_release(&crd(&[
            (RELEASE_NAME_ANNOTATION, "traefik-crd"),
            (RELEASE_NAMESPACE_ANNOTATION, "traefik"),
        ])));
        assert!(!in_traefik_crd_release(&crd(&[(
            RELEASE_NAME_ANNOTATION,
            "traefik"
        )])));
        assert!(!in_traefik_crd_release(&crd(&[])));
    }

    #[test]
    fn the_warning_names_each_kind_that_would_lose_objects() {
        let impact = CrdImpact {
            crds: vec![
                CrdObjects {
                    crd: "ingressroutes.traefik.io".into(),
                    kind: "IngressRoute".into(),
                    objects: 2,
                },
                CrdObjects {
                    crd: "tlsstores.traefik.io".into(),
                    kind: "TLSStore".into(),
                    objects: 0,
                },
            ],
        };
        assert_eq!(
            impact.to_string(),
            "deleting HelmChart kube-system/traefik-crd uninstalls 2 CRD(s) and with them \
             2 object(s) in every namespace: 2 IngressRoute (ingressroutes.traefik.io)"
        );
        let empty = CrdImpact {
            crds: vec![impact.crds[1].clone()],
        };
        assert_eq!(
            empty.to_string(),
            "deleting HelmChart kube-system/traefik-crd uninstalls 1 CRD(s); no object of theirs exists now"
        );
    }
}
