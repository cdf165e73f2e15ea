//! The validated policy, as the rest of the agent reads it.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::Serialize;

use crate::types::{self, DEFAULT_METRICS_ADDR, PortRange, Proto};

/// What the agent does about a stranger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny strangers' binds and remove foreign rules.
    #[default]
    Enforce,
    /// Report only; change nothing.
    Observe,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Observe => "observe",
        })
    }
}

/// What the agent does about a foreign rule that shadows the owner's mapping
/// (an accept, return, drop or goto ahead of it: nothing rewritten, the port
/// dead for new connections). A pin defeats such a rule without touching it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnShadow {
    /// Report it (log, audit, metrics); never remove it.
    #[default]
    Report,
    /// In enforce mode, remove it like a hijack (recorded whole first).
    Remove,
}

impl fmt::Display for OnShadow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Report => "report",
            Self::Remove => "remove",
        })
    }
}

/// Who may own a port, as the policy names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OwnerSpec {
    /// Any container publishing the port, and Docker's docker-proxy for it.
    Docker,
    /// The container with this name.
    DockerName(String),
    /// Containers carrying this label.
    DockerLabel { key: String, value: String },
    /// Processes of this systemd unit.
    Unit(String),
    /// Processes running this executable (matched by device and inode).
    Exe(PathBuf),
    /// Processes in this cgroup v2 subtree (path relative to the hierarchy root).
    Cgroup(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerSpecError {
    #[error(
        "unknown owner kind {0:?}: expected docker, docker:NAME, docker-label:KEY=VALUE, unit:NAME.service, exe:/PATH or cgroup:/PATH"
    )]
    UnknownKind(String),
    #[error("owner {0:?} names nothing after the colon")]
    Empty(String),
    #[error("owner {0:?}: a label selector is docker-label:KEY=VALUE")]
    BadLabel(String),
    #[error("owner {0:?}: the path must be absolute")]
    RelativePath(String),
    #[error("owner {0:?}: a unit name ends in .service, .scope or .slice")]
    BadUnit(String),
    #[error(
        "owner {0:?}: a socket unit's listening sockets are bound by systemd (PID 1) itself, never by a process in the unit's cgroup, so this owner could never bind; name the service it activates (unit:{1}.service) for the processes that serve it, and add exe:/usr/lib/systemd/systemd only if PID 1 must be allowed to bind the port for the socket unit"
    )]
    SocketUnit(String, String),
}

impl FromStr for OwnerSpec {
    type Err = OwnerSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "docker" {
            return Ok(Self::Docker);
        }
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| OwnerSpecError::UnknownKind(s.to_owned()))?;
        if rest.is_empty() {
            return Err(OwnerSpecError::Empty(s.to_owned()));
        }
        match kind {
            "docker" => Ok(Self::DockerName(rest.to_owned())),
            "docker-label" => match rest.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok(Self::DockerLabel {
                    key: k.to_owned(),
                    value: v.to_owned(),
                }),
                _ => Err(OwnerSpecError::BadLabel(s.to_owned())),
            },
            "unit" => {
                if let Some(stem) = rest.strip_suffix(".socket") {
                    return Err(OwnerSpecError::SocketUnit(s.to_owned(), stem.to_owned()));
                }
                const SUFFIXES: [&str; 3] = [".service", ".scope", ".slice"];
                if SUFFIXES
                    .iter()
                    .any(|x| rest.ends_with(x) && rest.len() > x.len())
                {
                    Ok(Self::Unit(rest.to_owned()))
                } else {
                    Err(OwnerSpecError::BadUnit(s.to_owned()))
                }
            }
            "exe" | "cgroup" => {
                if !rest.starts_with('/') {
                    return Err(OwnerSpecError::RelativePath(s.to_owned()));
                }
                let path = PathBuf::from(rest);
                Ok(if kind == "exe" {
                    Self::Exe(path)
                } else {
                    Self::Cgroup(path)
                })
            }
            _ => Err(OwnerSpecError::UnknownKind(s.to_owned())),
        }
    }
}

impl fmt::Display for OwnerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Docker => f.write_str("docker"),
            Self::DockerName(n) => write!(f, "docker:{n}"),
            Self::DockerLabel { key, value } => write!(f, "docker-label:{key}={value}"),
            Self::Unit(u) => write!(f, "unit:{u}"),
            Self::Exe(p) => write!(f, "exe:{}", p.display()),
            Self::Cgroup(p) => write!(f, "cgroup:{}", p.display()),
        }
    }
}

impl Serialize for OwnerSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One `[[ports]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProtectedPort {
    pub port: PortRange,
    pub proto: Proto,
    pub owner: Vec<OwnerSpec>,
    /// Install the owner's NAT mapping ahead of every other nat chain.
    pub pin: bool,
    /// Overrides the global mode for this port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Overrides the global `on_shadow` for this port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_shadow: Option<OnShadow>,
    /// An HTTP(S) health check of the service that owns the port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeSpec>,
}

/// `[ports.probe]`: what a healthy owner answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeSpec {
    pub url: String,
    pub expect_status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_body: Option<String>,
    /// Accept any certificate (self-signed, wrong name) for this probe only.
    pub insecure_tls: bool,
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
}

impl ProbeSpec {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
}

/// `[metrics]`: where Prometheus scrapes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MetricsSpec {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// A non-loopback `listen` needs this said out loud.
    pub allow_remote: bool,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: DEFAULT_METRICS_ADDR
                .parse()
                .expect("the default metrics address parses"),
            allow_remote: false,
        }
    }
}

/// `remap` prints as the policy writes it: `{ 80 = 8081 }` (TOML keys are strings).
fn serialize_remap<S: serde::Serializer>(
    remap: &std::collections::BTreeMap<u16, u16>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(remap.iter().map(|(from, to)| (from.to_string(), to)))
}

/// Durations print the way the policy writes them: `10s`, `250ms`.
fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&types::format_duration(*d))
}

/// What the agent does about a Kubernetes object that claims a protected port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnClaim {
    /// Report the claim (finding + audit record); change nothing in the cluster.
    #[default]
    Report,
    /// Remove k3s's packaged Traefik, and objects that `removable` names.
    Remove,
    /// Reconfigure k3s's packaged Traefik with a HelmChartConfig (its Service
    /// becomes ClusterIP, or moves to the `remap` ports): Traefik keeps serving
    /// in the cluster, nothing is deleted; undone by deleting that object.
    Reconfigure,
}

/// A kind of Kubernetes object the policy may name as removable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KubeKind {
    Service,
    Pod,
    DaemonSet,
    Deployment,
    StatefulSet,
    /// k3s's helm.cattle.io/v1 HelmChart.
    HelmChart,
    /// k3s's helm.cattle.io/v1 HelmChartConfig (values merged over a HelmChart's).
    HelmChartConfig,
}

impl KubeKind {
    /// The lowercase name used in the policy (`namespace/KIND/name`).
    pub fn policy_name(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Pod => "pod",
            Self::DaemonSet => "daemonset",
            Self::Deployment => "deployment",
            Self::StatefulSet => "statefulset",
            Self::HelmChart => "helmchart",
            Self::HelmChartConfig => "helmchartconfig",
        }
    }

    /// The API's `kind` field.
    pub fn api_kind(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::Pod => "Pod",
            Self::DaemonSet => "DaemonSet",
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::HelmChart => "HelmChart",
            Self::HelmChartConfig => "HelmChartConfig",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "service" | "svc" => Self::Service,
            "pod" => Self::Pod,
            "daemonset" | "ds" => Self::DaemonSet,
            "deployment" | "deploy" => Self::Deployment,
            "statefulset" | "sts" => Self::StatefulSet,
            "helmchart" => Self::HelmChart,
            "helmchartconfig" => Self::HelmChartConfig,
            _ => return None,
        })
    }

    /// Parses an API `kind` ("DaemonSet") back.
    pub fn from_api_kind(kind: &str) -> Option<Self> {
        Self::parse(kind)
    }
}

/// One object by namespace, kind and name: `kube-system/service/traefik`. Always
/// one exact object: the policy never allows a blanket delete.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KubeObjectName {
    pub namespace: String,
    pub kind: KubeKind,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeObjectNameError {
    #[error("{0:?}: name one object as NAMESPACE/KIND/NAME, e.g. \"kube-system/service/traefik\"")]
    Shape(String),
    #[error(
        "{0:?}: unknown kind {1:?}: expected service, pod, daemonset, deployment, statefulset or helmchart"
    )]
    Kind(String, String),
    #[error(
        "{0:?}: {1:?} is not an object name (lowercase letters, digits, '-' and '.'; no wildcards: name each object)"
    )]
    Name(String, String),
}

impl FromStr for KubeObjectName {
    type Err = KubeObjectNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let [namespace, kind, name] = parts[..] else {
            return Err(KubeObjectNameError::Shape(s.to_owned()));
        };
        let kind = KubeKind::parse(kind)
            .ok_or_else(|| KubeObjectNameError::Kind(s.to_owned(), kind.to_owned()))?;
        for part in [namespace, name] {
            if !is_object_name(part) {
                return Err(KubeObjectNameError::Name(s.to_owned(), part.to_owned()));
            }
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            kind,
            name: name.to_owned(),
        })
    }
}

/// RFC 1123 subdomain, as the API server validates names (without the length cap).
fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

impl fmt::Display for KubeObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.namespace,
            self.kind.policy_name(),
            self.name
        )
    }
}

impl Serialize for KubeObjectName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The namespace k3s's ServiceLB keeps its DaemonSets in unless started with
/// `--servicelb-namespace` (k3s `pkg/cloudprovider/servicelb.go`, `DefaultLBNS`).
pub const DEFAULT_SERVICELB_NAMESPACE: &str = "kube-system";

/// The optional `[kubernetes]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KubernetesPolicy {
    /// Overrides the default kubeconfig (/etc/rancher/k3s/k3s.yaml when it exists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    pub on_claim: OnClaim,
    /// Objects other than k3s's packaged Traefik that `remove` may delete.
    pub removable: Vec<KubeObjectName>,
    /// `remove` of the packaged Traefik also deletes HelmChart `traefik-crd`,
    /// and with it every Traefik CRD and every IngressRoute, Middleware, TLSOption…
    /// anyone made: only when said (default false). `portguard check` counts
    /// what that would delete ([`crate::k8s::crd_impact`]) and warns.
    pub remove_crds: bool,
    /// Where ServiceLB keeps its DaemonSets (k3s `--servicelb-namespace`).
    pub servicelb_namespace: String,
    /// `reconfigure`: host port → the port Traefik's Service moves to
    /// (80 → `web`, 443 → `websecure`); empty: the Service becomes ClusterIP.
    #[serde(
        skip_serializing_if = "std::collections::BTreeMap::is_empty",
        serialize_with = "serialize_remap"
    )]
    pub remap: std::collections::BTreeMap<u16, u16>,
}

impl Default for KubernetesPolicy {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            on_claim: OnClaim::default(),
            removable: Vec::new(),
            remove_crds: false,
            servicelb_namespace: DEFAULT_SERVICELB_NAMESPACE.to_owned(),
            remap: std::collections::BTreeMap::new(),
        }
    }
}

impl KubernetesPolicy {
    pub fn may_remove(&self, object: &KubeObjectName) -> bool {
        self.removable.contains(object)
    }
}

/// The whole validated policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub mode: Mode,
    /// What to do about rules that shadow an owner's mapping (default: report).
    #[serde(skip_serializing_if = "is_default")]
    pub on_shadow: OnShadow,
    pub metrics: MetricsSpec,
    pub ports: Vec<ProtectedPort>,
    /// Absent table: defaults (report only, default kubeconfig).
    #[serde(skip_serializing_if = "is_default")]
    pub kubernetes: KubernetesPolicy,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Policy {
    /// The mode in force for one entry.
    pub fn mode_of(&self, port: &ProtectedPort) -> Mode {
        port.mode.unwrap_or(self.mode)
    }

    /// What to do about a rule shadowing the owner's mapping of one entry.
    pub fn on_shadow_of(&self, port: &ProtectedPort) -> OnShadow {
        port.on_shadow.unwrap_or(self.on_shadow)
    }

    /// The entry that protects `port`/`proto`, if any.
    pub fn find(&self, port: u16, proto: Proto) -> Option<&ProtectedPort> {
        self.ports
            .iter()
            .find(|p| p.proto == proto && p.port.contains(port))
    }

    /// Prints the policy in the file's own format: `config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a policy always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_specs_parse_and_print_back() {
        for s in [
            "docker",
            "docker:frontend",
            "docker-label:com.example.role=web",
            "unit:nginx.service",
            "exe:/usr/sbin/nginx",
            "cgroup:/system.slice/k3s.service",
        ] {
            let spec: OwnerSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
    }

    #[test]
    fn owner_spec_errors_are_specific() {
        assert_eq!(
            "podman:x".parse::<OwnerSpec>(),
            Err(OwnerSpecError::UnknownKind("podman:x".into()))
        );
        assert_eq!(
            "exe:nginx".parse::<OwnerSpec>(),
            Err(OwnerSpecError::RelativePath("exe:nginx".into()))
        );
        assert_eq!(
            "docker-label:novalue".parse::<OwnerSpec>(),
            Err(OwnerSpecError::BadLabel("docker-label:novalue".into()))
        );
        assert_eq!(
            "unit:nginx".parse::<OwnerSpec>(),
            Err(OwnerSpecError::BadUnit("unit:nginx".into()))
        );
        // PID 1 binds for socket units: such an owner could never bind.
        let err = "unit:cups.socket".parse::<OwnerSpec>().unwrap_err();
        assert_eq!(
            err,
            OwnerSpecError::SocketUnit("unit:cups.socket".into(), "cups".into())
        );
        let text = err.to_string();
        assert!(
            text.contains("PID 1") && text.contains("unit:cups.service"),
            "{text}"
        );
        assert_eq!(
            "docker:".parse::<OwnerSpec>(),
            Err(OwnerSpecError::Empty("docker:".into()))
        );
    }

    #[test]
    fn kube_object_names_parse_exactly_one_object() {
        let n: KubeObjectName = "kube-system/svc/traefik".parse().unwrap();
        assert_eq!(n.kind, KubeKind::Service);
        assert_eq!(n.to_string(), "kube-system/service/traefik");
        let ds: KubeObjectName = "kube-system/DaemonSet/svclb-traefik-1a2b3c4d"
            .parse()
            .unwrap();
        assert_eq!(ds.kind, KubeKind::DaemonSet);
        assert!(matches!(
            "kube-system/service/*".parse::<KubeObjectName>(),
            Err(KubeObjectNameError::Name(_, n)) if n == "*"
        ));
        assert!(matches!(
            "kube-system/traefik".parse::<KubeObjectName>(),
            Err(KubeObjectNameError::Shape(_))
        ));
        assert!(matches!(
            "kube-system/ingress/traefik".parse::<KubeObjectName>(),
            Err(KubeObjectNameError::Kind(_, k)) if k == "ingress"
        ));
        assert!(matches!(
            "Kube-System/service/traefik".parse::<KubeObjectName>(),
            Err(KubeObjectNameError::Name(..))
        ));
    }
}
