//! Docker owners, through the Engine API (bollard): running containers, their
//! published ports, their IPs per network and their cgroups.
//!
//! Docker's event stream keeps the facts current; nothing polls. One session
//! is: connect, negotiate the API version, list, then follow events from the
//! moment before the list (so nothing falls between them). A session ends when
//! dockerd goes away; that is a state ([`DockerStatus::Unreachable`]), logged
//! once, and the next session starts after a backoff.
//!
//! Besides containers, a session learns two things the rest of portguard needs
//! to never harm the owner:
//! - **the daemon itself** ([`DockerDaemon`]): the process serving the Engine API,
//!   by the kernel's word (`SO_PEERCRED` on the socket), never by a name. Current
//!   Docker (and older Docker with `--userland-proxy=false`) binds published
//!   ports in the daemon, so its executable may bind the ports Docker publishes;
//! - **its networks' bridges** ([`DockerNetwork`]): the interfaces behind which
//!   Docker's own DNAT targets live, including custom bridge names
//!   (`com.docker.network.bridge.name`).
//!
//! Containers are known from `create` on, in every state, not only while they
//! run: a container that binds its own ports (`--network host`) binds as soon
//! as its process starts, before Docker reports it started. Each container
//! carries the cgroup paths its processes will live in
//! ([`Container::cgroup_candidates`], from the cgroup driver and parents),
//! and, once resolved, the same as slots ([`Container::cgroup_slots`]: the
//! parent's id and the name): the kernel programs recognise the container's
//! new cgroup by its slot at its first bind, which may come before the agent
//! has learned the new id (a loaded agent is slower than runc and the
//! container's process). The owners model also watches those directories and
//! learns the cgroup's id when runc creates it.
//!
//! dockerd holds a container's lock for the whole of its start, and
//! `inspect` waits for that lock: asking `inspect` about a starting container
//! answers only once it runs (and has bound). The container *list* reads a
//! lock-free view, so identity (name, labels) is learned from it: for
//! `create` events, and when a cgroup named for an unknown container appears
//! ([`Learn`], sent by the owners model).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum, Network},
    query_parameters::{EventsOptions, ListContainersOptions, ListNetworksOptions},
};
use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    cgroup::{CgroupRef, CgroupSlot},
    docker_proxy,
    docker_proxy::DockerProxy,
    exe::ExeId,
};
use crate::types::Proto;

/// dockerd's socket unless `DOCKER_HOST=unix://…` names another.
pub fn default_socket() -> PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"))
}

/// Seconds a single API request may take (not the event stream, which is endless).
const REQUEST_TIMEOUT_SECS: u64 = 10;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Short: while dockerd cannot be asked its ports are only observed, so the
/// guard must be back within a second of dockerd (a refused connect costs nothing).
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While Docker's socket does not exist, its creation is waited for; this is
/// only the safety net for a socket that appears unseen (a new mount).
const SOCKET_ABSENT_RECHECK: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("{socket}: {source}")]
    Api {
        socket: PathBuf,
        source: bollard::errors::Error,
    },
    #[error("{0}: the event stream ended")]
    EventsEnded(PathBuf),
}

/// Can portguard talk to dockerd?
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DockerStatus {
    /// The first attempt has not finished yet.
    Connecting,
    Reachable {
        version: String,
        api_version: String,
    },
    Unreachable {
        reason: String,
    },
}

/// A published port: `host_ip:host_port` → `container_port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Published {
    pub proto: Proto,
    /// `None`: every host address.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
}

/// A container's address on one network.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct NetworkIp {
    pub network: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// A container, as far as port ownership goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    /// Running (or paused) now; a created or stopped container owns no NAT
    /// mapping, but its cgroup is watched for.
    pub running: bool,
    /// The init process, as seen from the host.
    pub pid: Option<u32>,
    pub cgroup: Option<CgroupRef>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub networks: Vec<NetworkIp>,
    pub published: Vec<Published>,
    /// Where the container's cgroup appears when it starts (relative to the
    /// cgroup v2 root), most likely first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cgroup_candidates: Vec<String>,
    /// The candidates whose parent exists now, as slots (filled when the
    /// owners are resolved): the kernel programs recognise the container's
    /// new cgroup by these before the agent has learned its id.
    #[serde(skip)]
    pub cgroup_slots: Vec<CgroupSlot>,
}

/// How Docker lays out container cgroups: its driver and default parent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupLayout {
    pub systemd: bool,
    /// dockerd's `--cgroup-parent`, when given.
    pub daemon_parent: Option<String>,
}

/// Docker's default parents: `/docker` (cgroupfs driver), `system.slice` (systemd).
const CGROUPFS_DEFAULT_PARENT: &str = "/docker";
const SYSTEMD_DEFAULT_SLICE: &str = "system.slice";

impl CgroupLayout {
    /// The cgroup paths a container's processes will live in: under the
    /// container's own parent, else the daemon's, else Docker's default, for
    /// the driver in use (and the other driver's default, last).
    pub fn candidates(&self, id: &str, container_parent: Option<&str>) -> Vec<String> {
        let parents: Vec<&str> = container_parent
            .into_iter()
            .chain(self.daemon_parent.as_deref())
            .filter(|p| !p.is_empty())
            .collect();
        let mut out = Vec::new();
        let cgroupfs = |parent: &str| format!("/{}/{id}", parent.trim_matches('/'));
        let systemd = |slice: &str| format!("{}/docker-{id}.scope", slice_path(slice));
        for parent in parents {
            if self.systemd && parent.ends_with(".slice") {
                out.push(systemd(parent));
            } else {
                out.push(cgroupfs(parent));
            }
        }
        if self.systemd {
            out.push(systemd(SYSTEMD_DEFAULT_SLICE));
            out.push(cgroupfs(CGROUPFS_DEFAULT_PARENT));
        } else {
            out.push(cgroupfs(CGROUPFS_DEFAULT_PARENT));
            out.push(systemd(SYSTEMD_DEFAULT_SLICE));
        }
        out.dedup();
        out
    }

    /// The layout of the daemon `pid` reports `driver` for.
    fn of_daemon(systemd: bool, daemon_pid: Option<u32>) -> Self {
        let args = daemon_pid
            .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let daemon_parent = args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix("--cgroup-parent=")
                .map(str::to_owned)
                .or_else(|| (a == "--cgroup-parent").then(|| args.get(i + 1).cloned())?)
        });
        Self {
            systemd,
            daemon_parent,
        }
    }
}

/// A systemd slice's directory: `a-b.slice` lives in `/a.slice/a-b.slice`.
fn slice_path(slice: &str) -> String {
    let stem = slice.strip_suffix(".slice").unwrap_or(slice);
    let mut path = String::new();
    let mut prefix = String::new();
    for (i, part) in stem.split('-').enumerate() {
        if i > 0 {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push('/');
        path.push_str(&prefix);
        path.push_str(".slice");
    }
    path
}

impl Container {
    /// A container from `docker inspect`; `None` when it is being removed or dead.
    pub fn from_inspect(
        c: &ContainerInspectResponse,
        cgroup_root: Option<&Path>,
        layout: &CgroupLayout,
    ) -> Option<Self> {
        use bollard::models::ContainerStateStatusEnum as S;
        let state = c.state.as_ref()?;
        if matches!(state.status, Some(S::REMOVING | S::DEAD)) {
            return None;
        }
        let running = state.running == Some(true);
        let pid = state
            .pid
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p != 0 && running);
        let cgroup = pid
            .zip(cgroup_root)
            .and_then(|(pid, root)| CgroupRef::of_process(root, pid));
        let labels = c
            .config
            .as_ref()
            .and_then(|cfg| cfg.labels.clone())
            .map(|l| l.into_iter().collect())
            .unwrap_or_default();
        let settings = c.network_settings.as_ref();
        let mut networks: Vec<NetworkIp> = settings
            .and_then(|s| s.networks.as_ref())
            .into_iter()
            .flatten()
            .map(|(name, ep)| NetworkIp {
                network: name.clone(),
                ipv4: ep.ip_address.as_deref().and_then(|s| s.parse().ok()),
                ipv6: ep
                    .global_ipv6_address
                    .as_deref()
                    .and_then(|s| s.parse().ok()),
            })
            .collect();
        networks.sort();
        let mut published: Vec<Published> = settings
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .flat_map(|(key, bindings)| {
                let parsed = parse_port_key(key);
                bindings.iter().flatten().filter_map(move |b| {
                    let (container_port, proto) = parsed?;
                    Some(Published {
                        proto,
                        host_ip: b
                            .host_ip
                            .as_deref()
                            .and_then(|s| s.parse::<IpAddr>().ok())
                            .filter(|ip| !ip.is_unspecified()),
                        host_port: b.host_port.as_deref()?.parse().ok()?,
                        container_port,
                    })
                })
            })
            .collect();
        published.sort();
        published.dedup();
        if !running {
            // Stale settings of a stopped container are nobody's mapping.
            networks.clear();
            published.clear();
        }
        let id = c.id.clone()?;
        let container_parent = c.host_config.as_ref().and_then(|h| h.cgroup_parent.clone());
        Some(Self {
            cgroup_candidates: layout.candidates(&id, container_parent.as_deref()),
            cgroup_slots: Vec::new(),
            id,
            name: c.name.as_deref()?.trim_start_matches('/').to_owned(),
            running,
            pid,
            cgroup,
            labels,
            networks,
            published,
        })
    }

    /// A container's identity from the container list: name, labels and where
    /// its cgroup will be; nothing it owns yet (it is not running as far as
    /// this says). `inspect` fills the rest once it answers.
    pub fn from_summary(
        c: &bollard::models::ContainerSummary,
        layout: &CgroupLayout,
    ) -> Option<Self> {
        let id = c.id.clone()?;
        let name = c
            .names
            .as_ref()?
            .first()?
            .trim_start_matches('/')
            .to_owned();
        Some(Self {
            cgroup_candidates: layout.candidates(&id, None),
            cgroup_slots: Vec::new(),
            id,
            name,
            running: false,
            pid: None,
            cgroup: None,
            labels: c
                .labels
                .clone()
                .map(|l| l.into_iter().collect())
                .unwrap_or_default(),
            networks: Vec::new(),
            published: Vec::new(),
        })
    }

    pub fn publishes(&self, proto: Proto, port: u16) -> bool {
        self.running
            && self
                .published
                .iter()
                .any(|p| p.proto == proto && p.host_port == port)
    }

    /// The container's cgroup: where its process lives, else the first of
    /// its candidate paths that exists now (runc made it, the process may
    /// not have run yet).
    pub fn cgroup_now(&self, cgroup_root: Option<&Path>) -> Option<CgroupRef> {
        if let Some(c) = &self.cgroup {
            return Some(c.clone());
        }
        let root = cgroup_root?;
        self.cgroup_candidates
            .iter()
            .find_map(|p| CgroupRef::resolve(root, p))
    }
}

/// `"8080/tcp"` → (8080, tcp); other protocols (sctp) are not ours.
fn parse_port_key(key: &str) -> Option<(u16, Proto)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    Some((port.parse().ok()?, proto))
}

/// The process serving the Engine API: dockerd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DockerDaemon {
    pub pid: u32,
    pub exe: ExeId,
}

/// dockerd's default pidfile: who dockerd is when systemd holds its socket.
const DEFAULT_PIDFILE: &str = "/var/run/docker.pid";

impl DockerDaemon {
    /// The process at the other end of `socket`, by `SO_PEERCRED`: the kernel
    /// says who listens, so a process calling itself dockerd cannot pose as it.
    /// Under systemd socket activation (`docker.socket`) the listener is PID 1,
    /// not dockerd; then dockerd's pidfile names it (when that process is not
    /// PID 1 either).
    pub fn of_socket(socket: &Path) -> Option<Self> {
        let pid = peer_pid(socket)?;
        let pid = if pid == 1 {
            let from_file: u32 = std::fs::read_to_string(DEFAULT_PIDFILE)
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (from_file != 1).then_some(from_file)?
        } else {
            pid
        };
        Some(Self {
            pid,
            exe: ExeId::of_process(pid).ok()?,
        })
    }
}

/// `SO_PEERCRED` of a fresh connection to `socket`.
fn peer_pid(socket: &Path) -> Option<u32> {
    use std::os::fd::AsRawFd as _;
    let stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the size passed; the fd is
    // open for the call (owned by `stream`).
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then(|| cred.pid.unsigned_abs())
}

/// One of Docker's networks, as far as NAT goes: the bridge interface its
/// containers sit behind (bridge driver only).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DockerNetwork {
    pub name: String,
    /// The host interface: `docker0` for the default network, `br-<id12>`
    /// for user-defined ones, or the `com.docker.network.bridge.name` option.
    pub bridge: String,
}

/// The option naming a bridge network's interface.
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
/// Docker names a user-defined bridge `br-` and the first 12 characters of its id.
const BRIDGE_ID_PREFIX_LEN: usize = 12;

impl DockerNetwork {
    /// A bridge network from the Engine API; `None` for other drivers.
    pub fn from_api(n: &Network) -> Option<Self> {
        if n.driver.as_deref() != Some("bridge") {
            return None;
        }
        let name = n.name.clone()?;
        let bridge = match n.options.as_ref().and_then(|o| o.get(BRIDGE_NAME_OPTION)) {
            Some(b) if !b.is_empty() => b.clone(),
            _ => {
                let id = n.id.as_deref()?;
                format!("br-{}", id.get(..BRIDGE_ID_PREFIX_LEN).unwrap_or(id))
            }
        };
        Some(Self { name, bridge })
    }
}

/// What Docker contributes to the owners model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DockerFacts {
    pub status: DockerStatus,
    /// Running containers, by name.
    pub containers: Vec<Container>,
    /// docker-proxy processes running now.
    pub proxies: Vec<DockerProxy>,
    /// The docker-proxy executable, known even before a proxy runs.
    pub proxy_exe: Option<ExeId>,
    /// The daemon serving the API (it binds published ports itself in
    /// current Docker and with `--userland-proxy=false`).
    pub daemon: Option<DockerDaemon>,
    /// Docker's bridge networks.
    pub networks: Vec<DockerNetwork>,
}

impl DockerFacts {
    pub fn new(status: DockerStatus) -> Self {
        Self {
            status,
            containers: Vec::new(),
            proxies: Vec::new(),
            proxy_exe: None,
            daemon: None,
            networks: Vec::new(),
        }
    }

    /// Reads the facts `/proc` holds (docker-proxy processes); they need no API.
    fn refresh_proxies(&mut self, cgroup_root: Option<&Path>) {
        self.proxies = docker_proxy::scan(cgroup_root);
        self.proxy_exe = docker_proxy::proxy_exe(&self.proxies);
    }
}

fn connect(socket: &Path, timeout_secs: u64) -> Result<Docker, DockerError> {
    Docker::connect_with_unix(&socket.to_string_lossy(), timeout_secs, API_DEFAULT_VERSION).map_err(
        |source| DockerError::Api {
            socket: socket.into(),
            source,
        },
    )
}

/// One connection to dockerd with its version negotiated.
struct Session {
    docker: Docker,
    socket: PathBuf,
    status: DockerStatus,
    daemon: Option<DockerDaemon>,
    layout: CgroupLayout,
}

impl Session {
    async fn open(socket: &Path, timeout_secs: u64) -> Result<Self, DockerError> {
        let api = |source| DockerError::Api {
            socket: socket.into(),
            source,
        };
        // negotiate_version lowers the client's API version to the daemon's (1.41 for 20.10).
        let docker = connect(socket, timeout_secs)?
            .negotiate_version()
            .await
            .map_err(api)?;
        let version = docker.version().await.map_err(api)?;
        let daemon = DockerDaemon::of_socket(socket);
        if daemon.is_none() {
            warn!(socket = %socket.display(), "docker: the daemon's process cannot be identified: its own binds of published ports are not recognised");
        }
        let info = docker.info().await.map_err(api)?;
        let systemd = matches!(
            info.cgroup_driver,
            Some(bollard::models::SystemInfoCgroupDriverEnum::SYSTEMD)
        );
        let layout = CgroupLayout::of_daemon(systemd, daemon.map(|d| d.pid));
        Ok(Self {
            layout,
            status: DockerStatus::Reachable {
                version: version.version.unwrap_or_default(),
                api_version: docker.client_version().to_string(),
            },
            docker,
            socket: socket.into(),
            daemon,
        })
    }

    /// Docker's bridge networks.
    async fn networks(&self) -> Result<Vec<DockerNetwork>, DockerError> {
        let list = self
            .docker
            .list_networks(None::<ListNetworksOptions>)
            .await
            .map_err(|e| self.err(e))?;
        let mut out: Vec<DockerNetwork> = list.iter().filter_map(DockerNetwork::from_api).collect();
        out.sort();
        Ok(out)
    }

    /// Facts with this session's daemon and `containers`/`networks`.
    fn facts(&self, containers: Vec<Container>, networks: Vec<DockerNetwork>) -> DockerFacts {
        DockerFacts {
            containers,
            networks,
            daemon: self.daemon,
            ..DockerFacts::new(self.status.clone())
        }
    }

    fn err(&self, source: bollard::errors::Error) -> DockerError {
        DockerError::Api {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Every container, in any state (a stopped one may start at any moment).
    async fn containers(&self, cgroup_root: Option<&Path>) -> Result<Vec<Container>, DockerError> {
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                ..ListContainersOptions::default()
            }))
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(list.len());
        for summary in list {
            let Some(id) = summary.id else { continue };
            if let Some(c) = self.container(&id, cgroup_root).await? {
                out.push(c);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// A container's identity from the lock-free list (it answers while the
    /// container starts, when `inspect` would wait): `None` when it is gone.
    async fn summary(&self, id: &str) -> Result<Option<Container>, DockerError> {
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("id".to_owned(), vec![id.to_owned()])])),
                ..ListContainersOptions::default()
            }))
            .await
            .map_err(|e| self.err(e))?;
        Ok(list
            .into_iter()
            .find(|c| c.id.as_deref() == Some(id))
            .and_then(|c| Container::from_summary(&c, &self.layout)))
    }

    /// One container; `None` when it is gone or not running.
    async fn container(
        &self,
        id: &str,
        cgroup_root: Option<&Path>,
    ) -> Result<Option<Container>, DockerError> {
        match self.docker.inspect_container(id, None).await {
            Ok(c) => Ok(Container::from_inspect(&c, cgroup_root, &self.layout)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// Takes one look: for `portguard config show` and other one-shot commands.
pub async fn snapshot(socket: &Path, cgroup_root: Option<&Path>) -> DockerFacts {
    let mut facts = match Session::open(socket, 3).await {
        Ok(session) => match (
            session.containers(cgroup_root).await,
            session.networks().await,
        ) {
            (Ok(containers), Ok(networks)) => session.facts(containers, networks),
            (Err(e), _) | (_, Err(e)) => DockerFacts::new(DockerStatus::Unreachable {
                reason: e.to_string(),
            }),
        },
        Err(e) => DockerFacts::new(DockerStatus::Unreachable {
            reason: e.to_string(),
        }),
    };
    facts.refresh_proxies(cgroup_root);
    facts
}

/// What a Docker event changes.
#[derive(Debug, PartialEq, Eq)]
enum Relevant {
    /// This container's facts: read it again.
    Container(String),
    /// A new container: learn who it is (from the list, which a starting
    /// container does not block).
    Created(String),
    /// The set of networks.
    Networks,
}

/// What a Docker event is about, when it can change port ownership.
fn relevant(event: &EventMessage) -> Option<Relevant> {
    match (event.typ?, event.action.as_deref()?) {
        (EventMessageTypeEnum::NETWORK, "create" | "destroy" | "remove") => {
            return Some(Relevant::Networks);
        }
        (EventMessageTypeEnum::CONTAINER, "create") => {
            return event.actor.as_ref()?.id.clone().map(Relevant::Created);
        }
        _ => {}
    }
    relevant_container(event).map(Relevant::Container)
}

/// A request from the owners model: a cgroup named for container `0` appeared
/// and no container by that id is known; learn who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learn(pub String);

/// The container id a cgroup directory is named for: `<64 hex>` (cgroupfs
/// driver) or `docker-<64 hex>.scope` (systemd driver).
pub fn container_id_of_cgroup(name: &str) -> Option<&str> {
    let id = name
        .strip_prefix("docker-")
        .and_then(|n| n.strip_suffix(".scope"))
        .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The container a Docker event is about, when it can change port ownership.
fn relevant_container(event: &EventMessage) -> Option<String> {
    let actor = event.actor.as_ref()?;
    match (event.typ?, event.action.as_deref()?) {
        (
            EventMessageTypeEnum::CONTAINER,
            "start" | "restart" | "die" | "stop" | "kill" | "destroy" | "rename" | "pause"
            | "unpause" | "update",
        ) => actor.id.clone(),
        // The container is an attribute; the actor is the network.
        (EventMessageTypeEnum::NETWORK, "connect" | "disconnect") => {
            actor.attributes.as_ref()?.get("container").cloned()
        }
        _ => None,
    }
}

/// Follows dockerd forever, publishing [`DockerFacts`] whenever they change,
/// and learning the containers `learn` asks about.
pub async fn follow(
    socket: PathBuf,
    cgroup_root: Option<PathBuf>,
    tx: watch::Sender<DockerFacts>,
    mut learn: mpsc::UnboundedReceiver<Learn>,
) {
    let root = cgroup_root.as_deref();
    let mut backoff = BACKOFF_MIN;
    let mut down_logged = false;
    loop {
        let result = follow_session(&socket, root, &tx, &mut learn, &mut || {
            if down_logged {
                info!(event = "docker_reachable", socket = %socket.display(), "docker: reachable again");
            }
            down_logged = false;
            backoff = BACKOFF_MIN;
        })
        .await;
        let Err(e) = result else { return };
        if !down_logged {
            warn!(event = "docker_unreachable", socket = %socket.display(), error = %e, "docker: not reachable; Docker owners resolve to nothing until it is back, retrying");
            down_logged = true;
        } else {
            debug!(error = %e, "docker: still not reachable");
        }
        let mut facts = DockerFacts::new(DockerStatus::Unreachable {
            reason: e.to_string(),
        });
        facts.refresh_proxies(root);
        tx.send_if_modified(|old| replace_if_changed(old, facts));
        if socket.exists() {
            // dockerd starting, or refusing: try again soon.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else {
            // No socket, no dockerd: wait for the socket to appear (inotify)
            // rather than waking every second on a host without Docker.
            super::watch_fs::appears(&socket, SOCKET_ABSENT_RECHECK).await;
        }
    }
}

/// Ok(()) only when every receiver is gone.
async fn follow_session(
    socket: &Path,
    root: Option<&Path>,
    tx: &watch::Sender<DockerFacts>,
    learn: &mut mpsc::UnboundedReceiver<Learn>,
    connected: &mut impl FnMut(),
) -> Result<(), DockerError> {
    let session = Session::open(socket, REQUEST_TIMEOUT_SECS).await?;
    // Events from one second before the list on: none can fall between the two.
    // Replayed ones are harmless, each just re-reads its container.
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().saturating_sub(1));
    let mut containers: HashMap<String, Container> = session
        .containers(root)
        .await?
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    let mut networks = session.networks().await?;
    connected();
    let publish = |containers: &HashMap<String, Container>, networks: &[DockerNetwork]| {
        let mut list: Vec<Container> = containers.values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        let mut facts = session.facts(list, networks.to_vec());
        facts.refresh_proxies(root);
        tx.send_if_modified(|old| replace_if_changed(old, facts));
    };
    publish(&containers, &networks);
    let filters = HashMap::from([(
        "type".to_owned(),
        vec!["container".to_owned(), "network".to_owned()],
    )]);
    let mut events = session.docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        until: None,
        filters: Some(filters),
    }));
    loop {
        let relevant = tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                let event = event.map_err(|e| session.err(e))?;
                let Some(r) = relevant(&event) else { continue };
                debug!(action = event.action.as_deref(), "docker event");
                r
            }
            Some(Learn(id)) = learn.recv() => {
                if containers.contains_key(&id) {
                    continue;
                }
                debug!(container = %id, "docker: a cgroup appeared for an unknown container");
                Relevant::Created(id)
            }
        };
        match relevant {
            Relevant::Networks => networks = session.networks().await?,
            Relevant::Created(id) => {
                if let Some(c) = session.summary(&id).await? {
                    // Never replace what inspect said with less.
                    containers.entry(id).or_insert(c);
                }
            }
            Relevant::Container(id) => {
                match session.container(&id, root).await? {
                    Some(c) => containers.insert(id, c),
                    None => containers.remove(&id),
                };
            }
        }
        publish(&containers, &networks);
        if tx.is_closed() {
            return Ok(());
        }
    }
    Err(DockerError::EventsEnded(socket.into()))
}

fn replace_if_changed<T: PartialEq>(old: &mut T, new: T) -> bool {
    if *old == new {
        return false;
    }
    *old = new;
    true
}

#[cfg(test)]
mod tests {
    use bollard::models::{ContainerState, EndpointSettings, NetworkSettings, PortBinding};

    use super::*;

    fn inspect(running: bool) -> ContainerInspectResponse {
        ContainerInspectResponse {
            id: Some("abc".into()),
            name: Some("/web".into()),
            state: Some(ContainerState {
                running: Some(running),
                pid: Some(0),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                ports: Some(HashMap::from([
                    (
                        "8080/tcp".to_owned(),
                        Some(vec![
                            PortBinding {
                                host_ip: Some("127.0.0.1".into()),
                                host_port: Some("18080".into()),
                            },
                            PortBinding {
                                host_ip: Some("::".into()),
                                host_port: Some("18080".into()),
                            },
                        ]),
                    ),
                    ("9090/tcp".to_owned(), None),
                    ("53/sctp".to_owned(), Some(vec![PortBinding::default()])),
                ])),
                networks: Some(HashMap::from([(
                    "bridge".to_owned(),
                    EndpointSettings {
                        ip_address: Some("172.17.0.2".into()),
                        global_ipv6_address: Some(String::new()),
                        ..Default::default()
                    },
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_running_container_is_read_from_inspect() {
        let c = Container::from_inspect(&inspect(true), None, &CgroupLayout::default()).unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(c.pid, None, "pid 0 is no process");
        assert_eq!(
            c.networks,
            [NetworkIp {
                network: "bridge".into(),
                ipv4: Some(Ipv4Addr::new(172, 17, 0, 2)),
                ipv6: None
            }]
        );
        // "::" means every address, like 0.0.0.0; exposed-only and sctp ports are not published.
        assert_eq!(
            c.published,
            [
                Published {
                    proto: Proto::Tcp,
                    host_ip: None,
                    host_port: 18080,
                    container_port: 8080
                },
                Published {
                    proto: Proto::Tcp,
                    host_ip: Some("127.0.0.1".parse().unwrap()),
                    host_port: 18080,
                    container_port: 8080
                },
            ]
        );
        assert!(c.publishes(Proto::Tcp, 18080));
        assert!(!c.publishes(Proto::Udp, 18080));
    }

    #[test]
    fn a_stopped_container_owns_nothing_but_is_watched_for() {
        let c = Container::from_inspect(&inspect(false), None, &CgroupLayout::default()).unwrap();
        assert!(!c.running);
        assert!(c.published.is_empty() && c.networks.is_empty(), "{c:?}");
        assert!(!c.publishes(Proto::Tcp, 18080));
        assert_eq!(c.cgroup_candidates[0], "/docker/abc");
    }

    #[test]
    fn cgroup_candidates_follow_driver_and_parents() {
        let fs = CgroupLayout {
            systemd: false,
            daemon_parent: Some("/pgtest-7".into()),
        };
        assert_eq!(
            fs.candidates("abc", None),
            [
                "/pgtest-7/abc",
                "/docker/abc",
                "/system.slice/docker-abc.scope"
            ]
        );
        assert_eq!(fs.candidates("abc", Some("mine/"))[0], "/mine/abc");
        let sd = CgroupLayout {
            systemd: true,
            daemon_parent: None,
        };
        assert_eq!(
            sd.candidates("abc", Some("web-front.slice"))[0],
            "/web.slice/web-front.slice/docker-abc.scope"
        );
        assert_eq!(
            sd.candidates("abc", None)[0],
            "/system.slice/docker-abc.scope"
        );
    }

    #[test]
    fn container_ids_from_cgroup_names() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(container_id_of_cgroup(id), Some(id));
        assert_eq!(
            container_id_of_cgroup(&format!("docker-{id}.scope")),
            Some(id)
        );
        assert_eq!(container_id_of_cgroup("system.slice"), None);
        assert_eq!(container_id_of_cgroup(&id[1..]), None);
    }

    #[test]
    fn port_keys() {
        assert_eq!(parse_port_key("80/tcp"), Some((80, Proto::Tcp)));
        assert_eq!(parse_port_key("53/udp"), Some((53, Proto::Udp)));
        assert_eq!(parse_port_key("53/sctp"), None);
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_state() {
        let facts = snapshot(Path::new("/nonexistent/portguard/docker.sock"), None).await;
        let DockerStatus::Unreachable { reason } = &facts.status else {
            panic!("{:?}", facts.status)
        };
        assert!(
            reason.contains("/nonexistent/portguard/docker.sock"),
            "{reason}"
        );
        assert!(facts.containers.is_empty());
    }
}
