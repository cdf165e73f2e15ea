//! Watches (not polls) on Services and Pods, turned into the current claims and
//! pod index on a `tokio::sync::watch` channel.
//!
//! The agent reads the newest [`ClusterView`] whenever it decides; a failing API
//! shows up as `state`, never as a stopped agent. Pods of every node are watched
//! (not only this node's) because a kube-proxy DNAT may target a pod elsewhere and
//! the finding should still name it; claims only count pods on this node.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path, pin::Pin};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::{
    claims::{NodeIdentity, PortClaim, claims},
    cluster::{self, ClusterError, Connection},
    pod_index::{K8sSource, PodIndex},
};
use crate::policy::{Policy, ProtectedPort};

/// Where the Kubernetes layer stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ClusterState {
    /// No kubeconfig, or turned off: said once, the other layers guard alone.
    Off { reason: String },
    /// Watches started, first full lists not yet in: claims may be incomplete.
    Syncing,
    /// Both watches listed everything and follow changes.
    Watching,
    /// The last request failed; the watches retry with backoff. Claims are the
    /// last known ones.
    Failing { error: ClusterError },
}

impl fmt::Display for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off { reason } => write!(f, "off: {reason}"),
            Self::Syncing => f.write_str("syncing"),
            Self::Watching => f.write_str("watching"),
            Self::Failing { error } => write!(f, "failing: {error}"),
        }
    }
}

/// What the agent reads: the state, the claims on protected ports, the pod index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    pub state: ClusterState,
    pub claims: Vec<PortClaim>,
    pub pods: PodIndex,
}

impl ClusterView {
    pub fn off(reason: impl Into<String>) -> Self {
        Self {
            state: ClusterState::Off {
                reason: reason.into(),
            },
            claims: Vec::new(),
            pods: PodIndex::default(),
        }
    }

    /// The pod (and Services) behind a DNAT target, for findings and audit records.
    pub fn lookup_target(&self, ip: IpAddr) -> Option<&K8sSource> {
        self.pods.lookup_target(ip)
    }
}

/// The running watches on their own task (one-shot commands and tests; the
/// agent runs [`watches`] on its task tracker); dropping it stops them.
pub struct ClusterWatch {
    pub view: watch::Receiver<ClusterView>,
    task: Option<JoinHandle<()>>,
}

impl ClusterWatch {
    /// Spawns `follow` when there is one (None: the view is fixed).
    pub fn new(view: watch::Receiver<ClusterView>, follow: Option<Follow>) -> Self {
        Self {
            view,
            task: follow.map(tokio::spawn),
        }
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The watches for one-shot commands (`check`): picks the kubeconfig
/// (`--kubeconfig`, else the policy's, else k3s's when it exists), connects and
/// starts the watches. Never fails; see [`watch_connection`].
pub async fn start(
    kubeconfig_flag: Option<&Path>,
    policy: &Policy,
    node: NodeIdentity,
) -> ClusterWatch {
    let connection = cluster::open(kubeconfig_flag, &policy.kubernetes).await;
    let (view, follow) = watch_connection(&connection, node, policy.ports.clone());
    ClusterWatch::new(view, follow)
}

/// The view for one attempt to connect ([`cluster::open`]), and the future
/// that keeps it current (None: the view is fixed). Without a kubeconfig the
/// layer is off and says so once; a bad kubeconfig is a `Failing` state said
/// once. Either way the other layers keep guarding. The caller runs the future
/// where it runs its tasks; dropping it stops the watches.
pub fn watch_connection(
    connection: &Result<Connection, ClusterError>,
    node: NodeIdentity,
    ports: Vec<ProtectedPort>,
) -> (watch::Receiver<ClusterView>, Option<Follow>) {
    let fixed = |view: ClusterView| (watch::channel(view).1, None);
    match connection {
        Ok(c) => {
            info!(
                event = "kube_watching",
                kubeconfig = %c.kubeconfig,
                "Kubernetes layer: watching Services and Pods"
            );
            let (view, follow) = watches(c.client.clone(), node, ports);
            (view, Some(follow))
        }
        Err(ClusterError::NoKubeconfig) => {
            let reason = ClusterError::NoKubeconfig.to_string();
            info!(event = "kube_off", %reason, "Kubernetes layer off");
            fixed(ClusterView::off(reason))
        }
        Err(error) => {
            warn!(
                event = "kube_failing",
                %error,
                "Kubernetes layer cannot start: other layers keep guarding"
            );
            fixed(ClusterView {
                state: ClusterState::Failing {
                    error: error.clone(),
                },
                claims: Vec::new(),
                pods: PodIndex::default(),
            })
        }
    }
}

/// The Service and Pod watches, as a future to run.
pub type Follow = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The Service and Pod watches as a future, and the view they feed.
pub fn watches(
    client: Client,
    node: NodeIdentity,
    ports: Vec<ProtectedPort>,
) -> (watch::Receiver<ClusterView>, Follow) {
    let (tx, view) = watch::channel(ClusterView {
        state: ClusterState::Syncing,
        claims: Vec::new(),
        pods: PodIndex::default(),
    });
    (view, Box::pin(follow(client, node, ports, tx)))
}

/// Starts the Service and Pod watches on the current runtime.
pub fn spawn_watches(
    client: Client,
    node: NodeIdentity,
    ports: Vec<ProtectedPort>,
) -> ClusterWatch {
    let (view, follow) = watches(client, node, ports);
    ClusterWatch::new(view, Some(follow))
}

// Boxed: a Pod event is kilobytes, a Service event a fraction of that.
enum Change {
    Service(Box<watcher::Event<Service>>),
    Pod(Box<watcher::Event<Pod>>),
}

/// One resource's objects as the watch reports them, by namespace/name.
struct Store<K> {
    live: BTreeMap<String, K>,
    /// Objects of a re-list in progress (between Init and InitDone).
    pending: Option<BTreeMap<String, K>>,
    listed: bool,
}

impl<K: Resource + Clone> Store<K> {
    fn new() -> Self {
        Self {
            live: BTreeMap::new(),
            pending: None,
            listed: false,
        }
    }

    fn key(obj: &K) -> String {
        format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
    }

    fn apply(&mut self, event: watcher::Event<K>) {
        match event {
            watcher::Event::Apply(o) => {
                self.live.insert(Self::key(&o), o);
            }
            watcher::Event::Delete(o) => {
                self.live.remove(&Self::key(&o));
            }
            watcher::Event::Init => self.pending = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                self.pending
                    .get_or_insert_default()
                    .insert(Self::key(&o), o);
            }
            // A re-list replaces everything at once: objects deleted while the
            // watch was down disappear here.
            watcher::Event::InitDone => {
                self.live = self.pending.take().unwrap_or_default();
                self.listed = true;
            }
        }
    }

    fn objects(&self) -> Vec<K> {
        self.live.values().cloned().collect()
    }
}

fn watch_error(resource: &str, err: watcher::Error) -> ClusterError {
    let action = format!("watching {resource}");
    match err {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => ClusterError::from_kube(e, action),
        watcher::Error::WatchError(status) => {
            ClusterError::from_kube(kube::Error::Api(status), action)
        }
        watcher::Error::NoResourceVersion => ClusterError::Unexpected {
            action,
            message: "no resourceVersion in the list answer".into(),
        },
    }
}

async fn follow(
    client: Client,
    node: NodeIdentity,
    ports: Vec<ProtectedPort>,
    tx: watch::Sender<ClusterView>,
) {
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|r| {
        r.map(|e| Change::Service(Box::new(e)))
            .map_err(|e| watch_error("Services", e))
    });
    let pods = watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .map(|r| {
            r.map(|e| Change::Pod(Box::new(e)))
                .map_err(|e| watch_error("Pods", e))
        });
    let mut changes = std::pin::pin!(stream::select(services, pods));
    let mut service_store = Store::<Service>::new();
    let mut pod_store = Store::<Pod>::new();
    let mut last_error: Option<ClusterError> = None;
    while let Some(change) = changes.next().await {
        match change {
            Ok(Change::Service(e)) => service_store.apply(*e),
            Ok(Change::Pod(e)) => pod_store.apply(*e),
            Err(error) => {
                // Say it once per distinct failure, not once per retry.
                if last_error.as_ref() != Some(&error) {
                    warn!(%error, "Kubernetes layer: other layers keep guarding");
                    last_error = Some(error.clone());
                }
                tx.send_if_modified(|v| {
                    let state = ClusterState::Failing { error };
                    let changed = v.state != state;
                    v.state = state;
                    changed
                });
                continue;
            }
        }
        if last_error.take().is_some() {
            info!("Kubernetes API answers again");
        }
        let state = if service_store.listed && pod_store.listed {
            ClusterState::Watching
        } else {
            ClusterState::Syncing
        };
        let (svcs, pods) = (service_store.objects(), pod_store.objects());
        let next = ClusterView {
            state,
            claims: claims(&svcs, &pods, &node, &ports),
            pods: PodIndex::build(&svcs, &pods),
        };
        tx.send_if_modified(|v| {
            let changed = *v != next;
            if changed {
                *v = next;
            }
            changed
        });
        if tx.is_closed() {
            return;
        }
    }
}
