//! Which Kubernetes object claims which protected port on this node, and how.
//!
//! Pure functions over k8s-openapi types: the watches feed them, the tests feed
//! them recorded API answers. Nothing here talks to the API.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use serde::Serialize;

use crate::{
    policy::{KubeKind, KubeObjectName, ProtectedPort},
    types::Proto,
};

/// Labels k3s's ServiceLB (klipper-lb) puts on its svclb pods: the Service they serve.
pub const SVCLB_SVCNAME_LABEL: &str = "svccontroller.k3s.cattle.io/svcname";
pub const SVCLB_SVCNAMESPACE_LABEL: &str = "svccontroller.k3s.cattle.io/svcnamespace";

/// This node as the claims see it: its Kubernetes node name (pods are scheduled by
/// name) and the host's addresses (LoadBalancer ingress and externalIPs are IPs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub addresses: BTreeSet<IpAddr>,
}

impl NodeIdentity {
    /// From the Node object: its name and `status.addresses` that are IPs
    /// (InternalIP/ExternalIP; Hostname entries are skipped).
    pub fn from_node(node: &Node) -> Self {
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| a.address.parse().ok())
            .collect();
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            addresses,
        }
    }
}

/// How an object claims the port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "via")]
pub enum ClaimVia {
    /// A LoadBalancer Service whose status.loadBalancer.ingress holds this node's
    /// address (k3s ServiceLB publishes the node IPs there).
    LoadBalancerIngress { ip: IpAddr },
    /// A NodePort (also every LoadBalancer's node port): open on every node address.
    NodePort,
    /// spec.externalIPs holds this node's address.
    ExternalIp { ip: IpAddr },
    /// A container's hostPort: CNI portmap DNATs the host port to the pod.
    HostPort {
        container: String,
        container_port: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        host_ip: Option<IpAddr>,
    },
    /// A hostNetwork pod's container port: the container binds the host's port itself.
    HostNetwork { container: String },
}

impl fmt::Display for ClaimVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LoadBalancerIngress { ip } => write!(f, "LoadBalancer ingress {ip}"),
            Self::NodePort => f.write_str("NodePort"),
            Self::ExternalIp { ip } => write!(f, "externalIP {ip}"),
            Self::HostPort {
                container,
                container_port,
                host_ip,
            } => {
                write!(f, "hostPort of container {container} (→ {container_port}")?;
                if let Some(ip) = host_ip {
                    write!(f, ", hostIP {ip}")?;
                }
                f.write_str(")")
            }
            Self::HostNetwork { container } => write!(f, "hostNetwork container {container}"),
        }
    }
}

/// One object claiming one protected port on this node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PortClaim {
    pub port: u16,
    pub proto: Proto,
    /// The Service or Pod that claims it.
    pub object: KubeObjectName,
    #[serde(flatten)]
    pub via: ClaimVia,
    /// The pod's controller (DaemonSet, Deployment, …) when the claimer is a pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<KubeObjectName>,
    /// The Service a svclb pod serves (ServiceLB's labels), or None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<KubeObjectName>,
    /// Part of k3s's packaged Traefik (its Service, or ServiceLB's pods for it):
    /// removable as a whole under `on_claim = "remove"` without naming it.
    pub packaged_traefik: bool,
}

impl fmt::Display for PortClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} claimed by {} via {}",
            self.proto, self.port, self.object, self.via
        )?;
        if let Some(c) = &self.controller {
            write!(f, ", controller {c}")?;
        }
        if let Some(s) = &self.service {
            write!(f, ", for {s}")?;
        }
        Ok(())
    }
}

/// The Service of k3s's packaged Traefik.
pub fn is_packaged_traefik_service(object: &KubeObjectName) -> bool {
    object.kind == KubeKind::Service
        && object.namespace == "kube-system"
        && object.name == "traefik"
}

/// Every claim of `services` and `pods` on protected `ports` of `node`, sorted.
pub fn claims(
    services: &[Service],
    pods: &[Pod],
    node: &NodeIdentity,
    ports: &[ProtectedPort],
) -> Vec<PortClaim> {
    let mut all: Vec<PortClaim> = services
        .iter()
        .flat_map(|s| service_claims(s, node, ports))
        .chain(pods.iter().flat_map(|p| pod_claims(p, node, ports)))
        .collect();
    all.sort();
    all.dedup();
    all
}

fn protected(ports: &[ProtectedPort], port: i32, proto: Proto) -> Option<u16> {
    let port = u16::try_from(port).ok()?;
    ports
        .iter()
        .any(|p| p.proto == proto && p.port.contains(port))
        .then_some(port)
}

/// The API's protocol name; SCTP is not guarded, so it yields None.
fn proto_of(protocol: Option<&str>) -> Option<Proto> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        _ => None,
    }
}

fn name_of(
    kind: KubeKind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> KubeObjectName {
    KubeObjectName {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        kind,
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Claims of one Service: its LoadBalancer ingress IPs and externalIPs that are this
/// node's addresses (on the Service's `port`), and its NodePorts (on every node).
pub fn service_claims(
    service: &Service,
    node: &NodeIdentity,
    ports: &[ProtectedPort],
) -> Vec<PortClaim> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let object = name_of(KubeKind::Service, &service.metadata);
    let packaged_traefik = is_packaged_traefik_service(&object);
    let mut out = Vec::new();
    let mut push = |port: u16, proto: Proto, via: ClaimVia| {
        out.push(PortClaim {
            port,
            proto,
            object: object.clone(),
            via,
            controller: None,
            service: None,
            packaged_traefik,
        });
    };
    let ingress_ips: Vec<IpAddr> = if spec.type_.as_deref() == Some("LoadBalancer") {
        service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .filter(|ip| node.addresses.contains(ip))
            .collect()
    } else {
        Vec::new()
    };
    let external_ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .filter(|ip| node.addresses.contains(ip))
        .collect();
    for sp in spec.ports.iter().flatten() {
        let Some(proto) = proto_of(sp.protocol.as_deref()) else {
            continue;
        };
        if let Some(port) = protected(ports, sp.port, proto) {
            for ip in &ingress_ips {
                push(port, proto, ClaimVia::LoadBalancerIngress { ip: *ip });
            }
            for ip in &external_ips {
                push(port, proto, ClaimVia::ExternalIp { ip: *ip });
            }
        }
        let node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        if node_port_type
            && let Some(port) = sp.node_port.and_then(|np| protected(ports, np, proto))
        {
            push(port, proto, ClaimVia::NodePort);
        }
    }
    out
}

/// The controller of a pod, from its controller ownerReference. A ReplicaSet is named
/// by the Deployment behind it (its name minus the pod-template-hash), because
/// deleting the ReplicaSet alone would only have the Deployment re-create it.
pub fn controller_of(pod: &Pod) -> Option<KubeObjectName> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    if owner.kind == "ReplicaSet" {
        let hash = pod.metadata.labels.as_ref()?.get("pod-template-hash")?;
        let deployment = owner.name.strip_suffix(&format!("-{hash}"))?;
        return Some(KubeObjectName {
            namespace,
            kind: KubeKind::Deployment,
            name: deployment.to_owned(),
        });
    }
    Some(KubeObjectName {
        namespace,
        kind: KubeKind::from_api_kind(&owner.kind)?,
        name: owner.name.clone(),
    })
}

/// The Service a ServiceLB (svclb) pod serves, from klipper-lb's labels.
pub fn svclb_service_of(labels: Option<&BTreeMap<String, String>>) -> Option<KubeObjectName> {
    let labels = labels?;
    Some(KubeObjectName {
        namespace: labels.get(SVCLB_SVCNAMESPACE_LABEL)?.clone(),
        kind: KubeKind::Service,
        name: labels.get(SVCLB_SVCNAME_LABEL)?.clone(),
    })
}

/// Claims of one Pod scheduled on this node: hostPorts, and the container ports of a
/// hostNetwork pod. Finished pods (Succeeded/Failed) hold nothing.
pub fn pod_claims(pod: &Pod, node: &NodeIdentity, ports: &[ProtectedPort]) -> Vec<PortClaim> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    if spec.node_name.as_deref() != Some(node.name.as_str()) {
        return Vec::new();
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let object = name_of(KubeKind::Pod, &pod.metadata);
    let controller = controller_of(pod);
    let service = svclb_service_of(pod.metadata.labels.as_ref());
    let packaged_traefik = service.as_ref().is_some_and(is_packaged_traefik_service);
    let host_network = spec.host_network == Some(true);
    let mut out = Vec::new();
    for container in &spec.containers {
        for cp in container.ports.iter().flatten() {
            let Some(proto) = proto_of(cp.protocol.as_deref()) else {
                continue;
            };
            let via = if host_network {
                // With hostNetwork the API defaults hostPort to containerPort.
                protected(ports, cp.container_port, proto).map(|port| {
                    (
                        port,
                        ClaimVia::HostNetwork {
                            container: container.name.clone(),
                        },
                    )
                })
            } else {
                cp.host_port
                    .and_then(|hp| protected(ports, hp, proto))
                    .map(|port| {
                        (
                            port,
                            ClaimVia::HostPort {
                                container: container.name.clone(),
                                container_port: u16::try_from(cp.container_port).unwrap_or(0),
                                host_ip: cp.host_ip.as_deref().and_then(|ip| ip.parse().ok()),
                            },
                        )
                    })
            };
            if let Some((port, via)) = via {
                out.push(PortClaim {
                    port,
                    proto,
                    object: object.clone(),
                    via,
                    controller: controller.clone(),
                    service: service.clone(),
                    packaged_traefik,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, ServicePort, ServiceSpec};

    use super::*;
    use crate::policy::{Policy, PolicySource};

    fn ports() -> Vec<ProtectedPort> {
        Policy::parse(crate::policy::DEFAULT_POLICY_TOML, PolicySource::Embedded)
            .unwrap()
            .ports
    }

    fn node() -> NodeIdentity {
        NodeIdentity {
            name: "node-a".into(),
            addresses: ["198.51.100.10".parse().unwrap()].into(),
        }
    }

    fn service(type_: &str, port: i32, node_port: Option<i32>) -> Service {
        let mut s = Service::default();
        s.metadata.namespace = Some("web".into());
        s.metadata.name = Some("shop".into());
        s.spec = Some(ServiceSpec {
            type_: Some(type_.into()),
            ports: Some(vec![ServicePort {
                port,
                node_port,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        s
    }

    #[test]
    fn node_port_on_a_protected_port_is_a_claim_cluster_ip_is_not() {
        assert!(service_claims(&service("ClusterIP", 80, None), &node(), &ports()).is_empty());
        let claims = service_claims(&service("NodePort", 8080, Some(443)), &node(), &ports());
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].port, 443);
        assert_eq!(claims[0].via, ClaimVia::NodePort);
        assert!(!claims[0].packaged_traefik);
    }

    #[test]
    fn external_ip_counts_only_when_it_is_this_node() {
        let mut s = service("ClusterIP", 80, None);
        s.spec.as_mut().unwrap().external_ips =
            Some(vec!["203.0.113.7".into(), "198.51.100.10".into()]);
        let claims = service_claims(&s, &node(), &ports());
        assert_eq!(claims.len(), 1, "{claims:?}");
        assert_eq!(
            claims[0].via,
            ClaimVia::ExternalIp {
                ip: "198.51.100.10".parse().unwrap()
            }
        );
    }

    #[test]
    fn host_port_pod_on_another_node_or_finished_claims_nothing() {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("web".into());
        pod.metadata.name = Some("edge".into());
        pod.spec = Some(PodSpec {
            node_name: Some("node-b".into()),
            containers: vec![Container {
                name: "lb".into(),
                ports: Some(vec![ContainerPort {
                    container_port: 8443,
                    host_port: Some(443),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(pod_claims(&pod, &node(), &ports()).is_empty());
        pod.spec.as_mut().unwrap().node_name = Some("node-a".into());
        let claims = pod_claims(&pod, &node(), &ports());
        assert_eq!(claims.len(), 1);
        assert_eq!(
            claims[0].to_string(),
            "tcp/443 claimed by web/pod/edge via hostPort of container lb (→ 8443)"
        );
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert!(pod_claims(&pod, &node(), &ports()).is_empty());
    }

    #[test]
    fn host_network_pod_claims_its_container_port() {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("web".into());
        pod.metadata.name = Some("nginx".into());
        pod.spec = Some(PodSpec {
            node_name: Some("node-a".into()),
            host_network: Some(true),
            containers: vec![Container {
                name: "nginx".into(),
                ports: Some(vec![ContainerPort {
                    container_port: 80,
                    host_port: Some(80),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        });
        let claims = pod_claims(&pod, &node(), &ports());
        assert_eq!(claims.len(), 1);
        assert_eq!(
            claims[0].via,
            ClaimVia::HostNetwork {
                container: "nginx".into()
            }
        );
    }
}
