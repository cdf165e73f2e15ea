//! Reaching the API server: which kubeconfig, the client, and what a failure means.
//!
//! On a host the agent uses a kubeconfig file (the flag, the policy's, or
//! k3s's admin kubeconfig); in a pod (the DaemonSet in
//! `packaging/kubernetes/`) none of those exists and it uses the pod's
//! ServiceAccount, the way client-go's `rest.InClusterConfig` does.
//!
//! Every failure is a [`ClusterError`] with a message a person can act on; the
//! callers turn it into a [`ClusterState`] and keep guarding with the other layers.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Serialize;

use crate::policy::KubernetesPolicy;

/// k3s writes its admin kubeconfig here on servers.
pub const K3S_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";

/// Where the kubeconfig in use came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "from", content = "path")]
pub enum KubeconfigChoice {
    /// `--kubeconfig`.
    Flag(PathBuf),
    /// `[kubernetes] kubeconfig` in the policy.
    Policy(PathBuf),
    /// k3s's default, present on this host.
    K3sDefault(PathBuf),
    /// In a pod: the ServiceAccount's token and CA
    /// (`/var/run/secrets/kubernetes.io/serviceaccount/`) and the API server
    /// at `KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT`.
    InCluster,
}

impl KubeconfigChoice {
    /// The kubeconfig file, None for the in-cluster ServiceAccount.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Flag(p) | Self::Policy(p) | Self::K3sDefault(p) => Some(p),
            Self::InCluster => None,
        }
    }
}

impl fmt::Display for KubeconfigChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag(p) => write!(f, "{} (--kubeconfig)", p.display()),
            Self::Policy(p) => write!(f, "{} (policy)", p.display()),
            Self::K3sDefault(p) => write!(f, "{} (k3s default)", p.display()),
            Self::InCluster => write!(f, "the pod's ServiceAccount (in-cluster)"),
        }
    }
}

/// The flag wins over the policy, the policy over k3s's default, and k3s's
/// default over the in-cluster ServiceAccount (`in_pod`: [`in_pod`]), the last
/// fallback so that a host agent never picks up a pod's identity by accident;
/// with none of them the Kubernetes layer is off (None), which the caller says once.
pub fn choose_kubeconfig(
    flag: Option<&Path>,
    policy: &KubernetesPolicy,
    k3s_default: &Path,
    in_pod: bool,
) -> Option<KubeconfigChoice> {
    if let Some(p) = flag {
        return Some(KubeconfigChoice::Flag(p.to_owned()));
    }
    if let Some(p) = &policy.kubeconfig {
        return Some(KubeconfigChoice::Policy(p.clone()));
    }
    if k3s_default.exists() {
        return Some(KubeconfigChoice::K3sDefault(k3s_default.to_owned()));
    }
    in_pod.then_some(KubeconfigChoice::InCluster)
}

/// Whether this process runs in a pod: the kubelet sets both
/// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT` in every
/// container (client-go's `InClusterConfig` requires both, and so does kube's).
pub fn in_pod() -> bool {
    ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"]
        .iter()
        .all(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Why the Kubernetes layer cannot do its work right now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ClusterError {
    #[error(
        "no kubeconfig (no --kubeconfig, none in the policy, no {K3S_KUBECONFIG}, not in a pod): the Kubernetes layer is off"
    )]
    NoKubeconfig,
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("in-cluster ServiceAccount: {message}")]
    InCluster { message: String },
    #[error("Kubernetes API unreachable: {message}")]
    Unreachable { message: String },
    #[error("Kubernetes API rejected the credentials (401) while {action}: {message}")]
    Unauthorized { action: String, message: String },
    #[error("Kubernetes API forbids {action} (403): {message}")]
    Forbidden { action: String, message: String },
    #[error("not found while {action} (404): {message}")]
    NotFound { action: String, message: String },
    #[error("Kubernetes API error {code} while {action}: {message}")]
    Api {
        code: u16,
        action: String,
        message: String,
    },
    #[error("unexpected answer while {action}: {message}")]
    Unexpected { action: String, message: String },
}

impl ClusterError {
    /// Classifies a kube error; `action` says what was being done ("listing Services").
    pub fn from_kube(err: kube::Error, action: impl Into<String>) -> Self {
        let action = action.into();
        match err {
            kube::Error::Api(status) => {
                let message = if status.message.is_empty() {
                    status.reason.clone()
                } else {
                    status.message.clone()
                };
                match status.code {
                    401 => Self::Unauthorized { action, message },
                    403 => Self::Forbidden { action, message },
                    404 => Self::NotFound { action, message },
                    code => Self::Api {
                        code,
                        action,
                        message,
                    },
                }
            }
            kube::Error::SerdeError(e) => Self::Unexpected {
                action,
                message: e.to_string(),
            },
            // Connection refused, DNS, TLS, timeouts: the transport never got an answer.
            other => Self::Unreachable {
                message: format!("{action}: {}", chain(&other)),
            },
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}

/// The error and its sources on one line: kube's top-level messages alone
/// ("ServiceError: client error (Connect)") hide the useful part.
fn chain(err: &dyn std::error::Error) -> String {
    crate::logging::ErrorChain(err).to_string()
}

/// A client, and the kubeconfig it was built from.
#[derive(Clone)]
pub struct Connection {
    pub kubeconfig: KubeconfigChoice,
    pub client: Client,
}

/// Chooses the kubeconfig ([`choose_kubeconfig`] with k3s's default) and builds
/// its client: the one attempt whose outcome every caller reports. Without any
/// kubeconfig the error is [`ClusterError::NoKubeconfig`] (the layer is off).
pub async fn open(
    flag: Option<&Path>,
    policy: &KubernetesPolicy,
) -> Result<Connection, ClusterError> {
    let kubeconfig = choose_kubeconfig(flag, policy, Path::new(K3S_KUBECONFIG), in_pod())
        .ok_or(ClusterError::NoKubeconfig)?;
    let client = connect_choice(&kubeconfig).await?;
    Ok(Connection { kubeconfig, client })
}

/// Builds the client for a choice: its kubeconfig file, or in a pod the
/// ServiceAccount (kube's `Config::incluster`: the token file is re-read as
/// the kubelet rotates it).
pub async fn connect_choice(choice: &KubeconfigChoice) -> Result<Client, ClusterError> {
    match choice.path() {
        Some(path) => connect(path).await,
        None => {
            let bad = |e: &dyn std::error::Error| ClusterError::InCluster { message: chain(e) };
            let config = Config::incluster().map_err(|e| bad(&e))?;
            Client::try_from(config).map_err(|e| bad(&e))
        }
    }
}

/// Builds a client from a kubeconfig file (its current context). Does not talk to
/// the server: [`probe`] does.
pub async fn connect(kubeconfig: &Path) -> Result<Client, ClusterError> {
    let bad = |message: String| ClusterError::Kubeconfig {
        path: kubeconfig.to_owned(),
        message,
    };
    if !kubeconfig.exists() {
        return Err(bad("does not exist".into()));
    }
    let file = Kubeconfig::read_from(kubeconfig).map_err(|e| bad(chain(&e)))?;
    let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(chain(&e)))?;
    Client::try_from(config).map_err(|e| bad(chain(&e)))
}

/// One cheap authenticated request (the server version) to tell "reachable and
/// accepted" from the failure states.
pub async fn probe(client: &Client) -> Result<String, ClusterError> {
    let info = client
        .apiserver_version()
        .await
        .map_err(|e| ClusterError::from_kube(e, "asking the server version"))?;
    Ok(info.git_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_policy_beats_k3s_default_beats_in_cluster_and_none_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let k3s = dir.path().join("k3s.yaml");
        let mut policy = KubernetesPolicy::default();
        assert_eq!(choose_kubeconfig(None, &policy, &k3s, false), None);
        // In a pod with nothing else: the ServiceAccount, the last fallback.
        let in_cluster = choose_kubeconfig(None, &policy, &k3s, true).unwrap();
        assert_eq!(in_cluster, KubeconfigChoice::InCluster);
        assert_eq!(in_cluster.path(), None);
        assert_eq!(
            in_cluster.to_string(),
            "the pod's ServiceAccount (in-cluster)"
        );
        assert_eq!(
            serde_json::to_value(&in_cluster).unwrap(),
            serde_json::json!({"from": "in_cluster"})
        );
        std::fs::write(&k3s, "").unwrap();
        for in_pod in [false, true] {
            assert_eq!(
                choose_kubeconfig(None, &policy, &k3s, in_pod),
                Some(KubeconfigChoice::K3sDefault(k3s.clone())),
                "a kubeconfig file present beats the pod's identity"
            );
        }
        policy.kubeconfig = Some("/srv/kube.yaml".into());
        assert_eq!(
            choose_kubeconfig(None, &policy, &k3s, true)
                .unwrap()
                .to_string(),
            "/srv/kube.yaml (policy)"
        );
        assert_eq!(
            choose_kubeconfig(Some(Path::new("/x.yaml")), &policy, &k3s, true),
            Some(KubeconfigChoice::Flag("/x.yaml".into()))
        );
    }

    #[test]
    fn missing_kubeconfig_file_is_a_clear_state() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt
            .block_on(connect(Path::new("/nonexistent/k3s.yaml")))
            .err()
            .expect("a missing file cannot give a client");
        assert_eq!(
            err.to_string(),
            "kubeconfig /nonexistent/k3s.yaml: does not exist"
        );
    }

    #[test]
    fn api_status_codes_map_to_states() {
        let status = |code: u16, reason: &str| {
            kube::Error::Api(
                kube::core::Status::failure(
                    "services is forbidden: User \"system:anonymous\"",
                    reason,
                )
                .with_code(code)
                .boxed(),
            )
        };
        assert!(matches!(
            ClusterError::from_kube(status(403, "Forbidden"), "listing Services"),
            ClusterError::Forbidden { .. }
        ));
        assert!(ClusterError::from_kube(status(404, "NotFound"), "x").is_not_found());
        assert!(matches!(
            ClusterError::from_kube(status(401, "Unauthorized"), "x"),
            ClusterError::Unauthorized { .. }
        ));
        assert_eq!(
            ClusterError::from_kube(status(403, "Forbidden"), "listing Services").to_string(),
            "Kubernetes API forbids listing Services (403): services is forbidden: User \"system:anonymous\""
        );
    }
}
