//! Pod IP → the pod, its controller and the Services behind it: links a foreign
//! DNAT whose target is a pod IP to the Kubernetes objects that caused it, so a
//! finding can say "DNAT to 10.42.0.9 = pod kube-system/traefik-…, Service
//! kube-system/traefik" instead of a bare address.

use std::{collections::HashMap, fmt, net::IpAddr};

use k8s_openapi::api::core::v1::{Pod, Service};
use serde::Serialize;

use super::claims::{controller_of, svclb_service_of};
use crate::policy::{KubeKind, KubeObjectName};

/// The Kubernetes side of a DNAT target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct K8sSource {
    pub pod: KubeObjectName,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<KubeObjectName>,
    /// Services selecting the pod, plus the Service a svclb pod serves.
    pub services: Vec<KubeObjectName>,
}

impl fmt::Display for K8sSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pod {}/{}", self.pod.namespace, self.pod.name)?;
        if let Some(c) = &self.controller {
            write!(f, " ({c})")?;
        }
        for s in &self.services {
            write!(f, ", Service {}/{}", s.namespace, s.name)?;
        }
        Ok(())
    }
}

/// The index, rebuilt from the watched Services and Pods on every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIndex {
    by_ip: HashMap<IpAddr, K8sSource>,
}

impl PodIndex {
    pub fn build(services: &[Service], pods: &[Pod]) -> Self {
        let mut by_ip = HashMap::new();
        for pod in pods {
            let Some(spec) = &pod.spec else { continue };
            // A hostNetwork pod's IP is the node's: it names no single pod.
            if spec.host_network == Some(true) {
                continue;
            }
            let status = pod.status.as_ref();
            if matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ) {
                continue;
            }
            let ips: Vec<IpAddr> = status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|p| p.ip.as_str())
                .chain(status.and_then(|s| s.pod_ip.as_deref()))
                .filter_map(|ip| ip.parse().ok())
                .collect();
            if ips.is_empty() {
                continue;
            }
            let namespace = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let labels = pod.metadata.labels.as_ref();
            let mut services: Vec<KubeObjectName> = services
                .iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
                .filter(|s| selects(s, labels))
                .map(|s| KubeObjectName {
                    namespace: namespace.clone(),
                    kind: KubeKind::Service,
                    name: s.metadata.name.clone().unwrap_or_default(),
                })
                .chain(svclb_service_of(labels))
                .collect();
            services.sort();
            services.dedup();
            let source = K8sSource {
                pod: KubeObjectName {
                    namespace,
                    kind: KubeKind::Pod,
                    name: pod.metadata.name.clone().unwrap_or_default(),
                },
                node: spec.node_name.clone(),
                controller: controller_of(pod),
                services,
            };
            for ip in ips {
                by_ip.insert(ip, source.clone());
            }
        }
        Self { by_ip }
    }

    /// The pod (and Services) behind a DNAT target address, if it is a pod IP.
    pub fn lookup_target(&self, ip: IpAddr) -> Option<&K8sSource> {
        self.by_ip.get(&ip)
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// A Service with a non-empty selector selects the pods whose labels include it.
/// A selector-less Service has hand-made Endpoints and selects nothing here.
fn selects(service: &Service, labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    !selector.is_empty()
        && labels.is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus, ServiceSpec};

    use super::*;

    #[test]
    fn pod_ip_names_pod_and_selecting_service_only_in_its_namespace() {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("web".into());
        pod.metadata.name = Some("shop-0".into());
        pod.metadata.labels = Some([("app".to_owned(), "shop".to_owned())].into());
        pod.spec = Some(PodSpec::default());
        pod.status = Some(PodStatus {
            pod_ip: Some("10.42.0.9".into()),
            pod_ips: Some(vec![PodIP {
                ip: "10.42.0.9".into(),
            }]),
            ..Default::default()
        });
        let svc = |ns: &str, name: &str| {
            let mut s = Service::default();
            s.metadata.namespace = Some(ns.into());
            s.metadata.name = Some(name.into());
            s.spec = Some(ServiceSpec {
                selector: Some([("app".to_owned(), "shop".to_owned())].into()),
                ..Default::default()
            });
            s
        };
        let index = PodIndex::build(&[svc("web", "shop"), svc("other", "shop")], &[pod]);
        let found = index.lookup_target("10.42.0.9".parse().unwrap()).unwrap();
        assert_eq!(found.pod.name, "shop-0");
        assert_eq!(found.services.len(), 1);
        assert_eq!(found.to_string(), "pod web/shop-0, Service web/shop");
        assert!(index.lookup_target("10.42.0.10".parse().unwrap()).is_none());
    }
}
