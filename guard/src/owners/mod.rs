//! Owners: who owns each protected port, resolved live.
//!
//! The policy names owners ([`OwnerSpec`]); this module turns each into things
//! the kernel and the ruleset can check, and keeps them current:
//!
//! | owner | source | identity |
//! |---|---|---|
//! | `docker`, `docker:NAME`, `docker-label:K=V` | [`docker`] (Engine API + events), [`docker_proxy`] (`/proc`) | container cgroup ids, the docker-proxy executable, NAT targets |
//! | `unit:NAME.service` | [`unit`] | the unit's cgroup id |
//! | `exe:/path` | [`exe`] | (device, inode) of the file |
//! | `cgroup:/path` | [`cgroup`] | cgroup id |
//!
//! Nothing here trusts `comm` or a process name: a renamed process is the
//! same file in the same cgroup.
//!
//! # How the agent consumes it
//!
//! ```no_run
//! # async fn agent(policy: portguard::policy::Policy) {
//! use portguard::owners::Owners;
//! let (mut owners, follow) = Owners::new(policy).start().await;
//! tokio::spawn(follow); // the agent runs it on its task tracker instead
//! loop {
//!     let model = owners.borrow_and_update().clone(); // Arc<ResolvedOwners>: cheap
//!     for allowed in model.bind_owners() {
//!         // allowed.proto, allowed.port: one protected port.
//!         // allowed.cgroups: cgroup ids that may bind it (OwnerCgroupKey per id).
//!         // allowed.exes: executables (ExeId: dev/ino, kernel_dev()) that may bind it:
//!         //   for Docker ports, docker-proxy and the daemon serving the API.
//!         // allowed.proxy_cgroups: docker-proxy's cgroup (dockerd's), only for a
//!         //   kernel side that cannot match executables; never the root cgroup.
//!     }
//!     for nat in model.nat_targets() {
//!         // nat.host_ip/host_port → nat.container_ip:container_port is the owner's
//!         // own DNAT: legitimate, never a hijack; what `pin` installs.
//!     }
//!     if owners.changed().await.is_err() { break } // the owners task ended
//! }
//! # }
//! ```
//!
//! Replace map contents as a whole set per port (add the new ids, then remove
//! the old): a model only changes when something an owner depends on did.
//! `resolve_once` gives the same model once, for one-shot commands.
//!
//! Known limits: Docker binds a published port before it reports the container
//! started: docker-proxy does (userland proxy on), or the daemon itself does
//! (current Docker, which hands the socket to `docker-proxy -use-listen-fd`,
//! and older Docker with `--userland-proxy=false`). Both are allowed by their
//! executables — dockerd's is the process serving the Engine API, by
//! `SO_PEERCRED`, never a name — for every port a Docker owner holds: a bind
//! cannot be told apart per container at bind time.

pub mod cgroup;
pub mod docker;
pub mod docker_proxy;
pub mod exe;
pub mod unit;
mod watch_fs;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::FutureExt as _;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, warn};

pub use self::{
    cgroup::{CgroupRef, CgroupSlot},
    docker::{
        Container, DockerDaemon, DockerFacts, DockerNetwork, DockerStatus, NetworkIp, Published,
    },
    docker_proxy::DockerProxy,
    exe::ExeId,
};
use crate::{
    policy::{OwnerSpec, Policy, ProtectedPort},
    sys,
    types::{PortRange, Proto},
};

/// The resolved model: every policy entry with what its owners are right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolvedOwners {
    pub docker: DockerStatus,
    /// Docker's bridge interfaces (its own DNAT targets live behind them).
    pub docker_bridges: Vec<String>,
    /// The cgroup v2 mount, when there is one.
    pub cgroup_root: Option<PathBuf>,
    /// One per policy entry, in policy order.
    pub ports: Vec<ResolvedPort>,
}

/// One policy entry and its owners.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolvedPort {
    pub proto: Proto,
    pub port: PortRange,
    pub owners: Vec<ResolvedOwner>,
}

/// One owner of an entry, as named and as found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolvedOwner {
    pub spec: OwnerSpec,
    pub found: Found,
    /// Where a `unit:` or `cgroup:` owner's cgroup is (re)made, when its
    /// parent exists: the kernel programs recognise the new cgroup by it
    /// before the agent has learned its id (a unit's restart makes it anew).
    /// Docker containers carry theirs ([`Container::cgroup_slots`]).
    #[serde(skip)]
    pub slots: Vec<CgroupSlot>,
}

/// What an owner resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Found {
    /// Docker owners: the matching running containers, and docker-proxy.
    Docker {
        containers: Vec<Container>,
        /// The proxies forwarding this entry's ports.
        proxies: Vec<DockerProxy>,
        proxy_exe: Option<ExeId>,
        /// dockerd's executable: it binds published ports itself in current
        /// Docker and with `--userland-proxy=false`.
        #[serde(skip_serializing_if = "Option::is_none")]
        daemon_exe: Option<ExeId>,
    },
    /// Docker owners while dockerd cannot be asked.
    DockerUnreachable { reason: String },
    /// `unit:` and `cgroup:` owners.
    Cgroup(CgroupRef),
    /// `exe:` owners.
    Exe { path: PathBuf, id: ExeId },
    /// Nothing on this host is that owner now.
    Missing { reason: String },
}

/// Who may bind one protected port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BindOwners {
    pub proto: Proto,
    pub port: u16,
    pub cgroups: BTreeSet<u64>,
    pub exes: BTreeSet<ExeId>,
    /// docker-proxy's cgroup (it inherits dockerd's): far broader than the
    /// proxy, so use it only when executables cannot be matched. Never `/`.
    pub proxy_cgroups: BTreeSet<u64>,
    /// Where owners' cgroups are made (containers' at each start, units' at
    /// each restart, `cgroup:` owners'): the new cgroup binds as the owner
    /// before the agent has learned its id.
    pub slots: BTreeSet<CgroupSlot>,
}

/// An owner's own NAT mapping: connections to `host_ip:host_port` go to
/// `container_ip:container_port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct NatTarget {
    pub proto: Proto,
    /// `None`: every host address.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
    pub container: String,
}

impl ResolvedOwners {
    /// The entry protecting `port`/`proto`.
    pub fn entry(&self, proto: Proto, port: u16) -> Option<&ResolvedPort> {
        self.ports
            .iter()
            .find(|p| p.proto == proto && p.port.contains(port))
    }

    /// Who may bind each protected port, port by port.
    pub fn bind_owners(&self) -> impl Iterator<Item = BindOwners> + '_ {
        self.ports
            .iter()
            .flat_map(|e| e.port.iter().map(move |port| e.bind_owners(port)))
    }

    /// Every owner's legitimate NAT mappings.
    pub fn nat_targets(&self) -> impl Iterator<Item = NatTarget> + '_ {
        self.ports.iter().flat_map(ResolvedPort::nat_targets)
    }

    /// What the nftables inspector needs from this model: every published
    /// mapping (legitimate NAT targets and pins), Docker's bridges, and whether
    /// Docker answered.
    pub fn owned_targets(&self) -> crate::nft::OwnedTargets {
        let mut owned = crate::nft::OwnedTargets {
            docker_known: matches!(self.docker, DockerStatus::Reachable { .. }),
            docker_bridges: self.docker_bridges.iter().cloned().collect(),
            ..crate::nft::OwnedTargets::default()
        };
        for nat in self.nat_targets() {
            owned.publish(nat.mapping());
        }
        owned
    }
}

impl NatTarget {
    /// The mapping alone, as nft knows it (without the container's name).
    pub fn mapping(&self) -> crate::nft::PublishedMapping {
        crate::nft::PublishedMapping {
            proto: self.proto,
            host_ip: self.host_ip,
            host_port: self.host_port,
            container_ip: self.container_ip,
            container_port: self.container_port,
        }
    }
}

impl ResolvedPort {
    /// Who may bind `port` (one port of this entry).
    pub fn bind_owners(&self, port: u16) -> BindOwners {
        let mut out = BindOwners {
            proto: self.proto,
            port,
            ..BindOwners::default()
        };
        for owner in &self.owners {
            out.slots.extend(owner.slots.iter().cloned());
            match &owner.found {
                Found::Docker {
                    containers,
                    proxies,
                    proxy_exe,
                    daemon_exe,
                } => {
                    // Bare `docker` owns a port through publishing it; a named or
                    // labelled container owns the whole entry (host networking binds directly).
                    let by_publishing = owner.spec == OwnerSpec::Docker;
                    let mine: Vec<&Container> = containers
                        .iter()
                        .filter(|c| !by_publishing || c.publishes(self.proto, port))
                        .collect();
                    out.cgroups
                        .extend(mine.iter().filter_map(|c| c.cgroup.as_ref()).map(|c| c.id));
                    out.slots
                        .extend(mine.iter().flat_map(|c| c.cgroup_slots.iter().cloned()));
                    out.exes.extend(*proxy_exe);
                    out.exes.extend(*daemon_exe);
                    out.proxy_cgroups.extend(
                        proxies
                            .iter()
                            .filter(|p| p.host_port == port && p.proto == self.proto)
                            .filter_map(|p| p.cgroup.as_ref())
                            .filter(|c| !c.is_root())
                            .map(|c| c.id),
                    );
                }
                Found::Cgroup(c) => {
                    out.cgroups.insert(c.id);
                }
                Found::Exe { id, .. } => {
                    out.exes.insert(*id);
                }
                Found::DockerUnreachable { .. } | Found::Missing { .. } => {}
            }
        }
        out
    }

    /// The owners' legitimate NAT mappings onto this entry's ports.
    pub fn nat_targets(&self) -> Vec<NatTarget> {
        let mut out = BTreeSet::new();
        for owner in &self.owners {
            let Found::Docker {
                containers,
                proxies,
                ..
            } = &owner.found
            else {
                continue;
            };
            for c in containers {
                let published = c
                    .published
                    .iter()
                    .filter(|p| p.proto == self.proto && self.port.contains(p.host_port));
                for p in published {
                    for container_ip in container_ips(c, p, proxies) {
                        out.insert(NatTarget {
                            proto: p.proto,
                            host_ip: p.host_ip,
                            host_port: p.host_port,
                            container_ip,
                            container_port: p.container_port,
                            container: c.name.clone(),
                        });
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

/// Where Docker forwards a published port: the proxy says so exactly when one
/// runs; else any of the container's addresses (of the published family).
fn container_ips(c: &Container, p: &Published, proxies: &[DockerProxy]) -> Vec<IpAddr> {
    let from_proxy: BTreeSet<IpAddr> = proxies
        .iter()
        .filter(|x| x.proto == p.proto && x.host_port == p.host_port)
        .filter(|x| x.container_port == Some(p.container_port))
        .filter_map(|x| x.container_ip)
        .filter(|ip| {
            c.networks
                .iter()
                .any(|n| n.ipv4.map(IpAddr::V4) == Some(*ip) || n.ipv6.map(IpAddr::V6) == Some(*ip))
        })
        .collect();
    if !from_proxy.is_empty() {
        return from_proxy.into_iter().collect();
    }
    c.networks
        .iter()
        .flat_map(|n| {
            let v6 = p.host_ip.is_none_or(|ip| ip.is_ipv6());
            let v4 = p.host_ip.is_none_or(|ip| ip.is_ipv4());
            [
                n.ipv4.filter(|_| v4).map(IpAddr::V4),
                n.ipv6.filter(|_| v6).map(IpAddr::V6),
            ]
        })
        .flatten()
        .collect()
}

/// Resolves `policy` against the facts at hand. Docker facts come in; the
/// filesystem-backed owners (units, executables, cgroups) are read here.
pub fn resolve(
    policy: &Policy,
    docker: &DockerFacts,
    cgroup_root: Option<&Path>,
) -> ResolvedOwners {
    ResolvedOwners {
        docker: docker.status.clone(),
        docker_bridges: docker.networks.iter().map(|n| n.bridge.clone()).collect(),
        cgroup_root: cgroup_root.map(Path::to_path_buf),
        ports: policy
            .ports
            .iter()
            .map(|entry| ResolvedPort {
                proto: entry.proto,
                port: entry.port,
                owners: entry
                    .owner
                    .iter()
                    .map(|spec| {
                        let found = resolve_owner(entry, spec, docker, cgroup_root);
                        ResolvedOwner {
                            slots: cgroup_root
                                .map(|root| owner_slots(spec, &found, root))
                                .unwrap_or_default(),
                            spec: spec.clone(),
                            found,
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The slot of a `unit:` or `cgroup:` owner: where its cgroup is now, else
/// where it will be made (a unit's under `system.slice`).
fn owner_slots(spec: &OwnerSpec, found: &Found, root: &Path) -> Vec<CgroupSlot> {
    let path = match (spec, found) {
        (OwnerSpec::Unit(_) | OwnerSpec::Cgroup(_), Found::Cgroup(c)) => c.path.clone(),
        (OwnerSpec::Unit(name), _) => format!("/system.slice/{name}"),
        (OwnerSpec::Cgroup(path), _) => path.to_string_lossy().into_owned(),
        _ => return Vec::new(),
    };
    CgroupSlot::resolve(root, &path).into_iter().collect()
}

fn resolve_owner(
    entry: &ProtectedPort,
    spec: &OwnerSpec,
    docker: &DockerFacts,
    root: Option<&Path>,
) -> Found {
    let no_cgroup2 = || Found::Missing {
        reason: "no cgroup v2 hierarchy is mounted".into(),
    };
    let docker_found = |matches: &dyn Fn(&Container) -> bool| match &docker.status {
        DockerStatus::Reachable { .. } => Found::Docker {
            containers: docker
                .containers
                .iter()
                .filter(|c| matches(c))
                .map(|c| Container {
                    // A starting container's cgroup exists before its process runs.
                    cgroup: c.cgroup_now(root),
                    cgroup_slots: root
                        .map(|root| {
                            c.cgroup_candidates
                                .iter()
                                .filter_map(|p| CgroupSlot::resolve(root, p))
                                .collect()
                        })
                        .unwrap_or_default(),
                    ..c.clone()
                })
                .collect(),
            proxies: docker
                .proxies
                .iter()
                .filter(|p| p.proto == entry.proto && entry.port.contains(p.host_port))
                .cloned()
                .collect(),
            proxy_exe: docker.proxy_exe,
            daemon_exe: docker.daemon.map(|d| d.exe),
        },
        DockerStatus::Connecting => Found::DockerUnreachable {
            reason: "not connected yet".into(),
        },
        DockerStatus::Unreachable { reason } => Found::DockerUnreachable {
            reason: reason.clone(),
        },
    };
    match spec {
        OwnerSpec::Docker => {
            docker_found(&|c| entry.port.iter().any(|p| c.publishes(entry.proto, p)))
        }
        OwnerSpec::DockerName(name) => docker_found(&|c| c.name == *name || c.id == *name),
        OwnerSpec::DockerLabel { key, value } => {
            docker_found(&|c| c.labels.get(key) == Some(value))
        }
        OwnerSpec::Unit(name) => match root {
            None => no_cgroup2(),
            Some(root) => match unit::resolve(root, name) {
                Ok(c) => Found::Cgroup(c),
                Err(e) => Found::Missing {
                    reason: e.to_string(),
                },
            },
        },
        OwnerSpec::Cgroup(path) => match root {
            None => no_cgroup2(),
            Some(root) => match CgroupRef::resolve(root, &path.to_string_lossy()) {
                Some(c) => Found::Cgroup(c),
                None => Found::Missing {
                    reason: format!("no cgroup {}", path.display()),
                },
            },
        },
        OwnerSpec::Exe(path) => match ExeId::of_path(path) {
            Ok(id) => Found::Exe {
                path: path.clone(),
                id,
            },
            Err(e) => Found::Missing {
                reason: format!("{}: {e}", path.display()),
            },
        },
    }
}

/// Resolves the owners of a policy, once or live.
#[derive(Clone, Debug)]
pub struct Owners {
    policy: Arc<Policy>,
    docker_socket: PathBuf,
}

impl Owners {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
            docker_socket: docker::default_socket(),
        }
    }

    /// Talk to dockerd at another socket (default: `DOCKER_HOST` or `/var/run/docker.sock`).
    pub fn docker_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.docker_socket = socket.into();
        self
    }

    /// One look at every source, for one-shot commands (`config show`, `check`).
    pub async fn resolve_once(&self) -> ResolvedOwners {
        let root = cgroup_root();
        let facts = docker::snapshot(&self.docker_socket, root.as_deref()).await;
        resolve(&self.policy, &facts, root.as_deref())
    }

    /// Starts resolving live. Returns once the first model is complete (dockerd
    /// answered or failed to) with the receiver, which then sees every change
    /// and only changes, and the future that keeps it current. The caller runs
    /// that future where it runs its tasks; dropping it stops everything this
    /// started (nothing here spawns). It ends by itself only when every
    /// receiver is gone.
    pub async fn start(
        self,
    ) -> (
        watch::Receiver<Arc<ResolvedOwners>>,
        impl Future<Output = ()> + Send + 'static,
    ) {
        let root = cgroup_root();
        let (docker_tx, mut docker_rx) = watch::channel(DockerFacts::new(DockerStatus::Connecting));
        let (learn_tx, learn_rx) = tokio::sync::mpsc::unbounded_channel();
        // Fused: it may end during the first wait, and is polled again after.
        let mut docker = Box::pin(
            docker::follow(
                self.docker_socket.clone(),
                root.clone(),
                docker_tx,
                learn_rx,
            )
            .fuse(),
        );
        // Only owners that bind for themselves need a starting container's identity.
        let learns = self
            .policy
            .ports
            .iter()
            .flat_map(|p| &p.owner)
            .any(|o| matches!(o, OwnerSpec::DockerName(_) | OwnerSpec::DockerLabel { .. }));
        // The first session's outcome, bounded: a hung dockerd must not hold the agent.
        tokio::select! {
            () = &mut docker => {}
            _ = tokio::time::timeout(
                FIRST_DOCKER_ANSWER,
                docker_rx.wait_for(|f| f.status != DockerStatus::Connecting),
            ) => {}
        }
        let first = resolve(
            &self.policy,
            &docker_rx.borrow_and_update(),
            root.as_deref(),
        );
        let (tx, rx) = watch::channel(Arc::new(first));
        let follow = async move {
            let mut fs_changes = watch_fs::FsChanges::new(&self.policy, &tx.borrow());
            loop {
                tokio::select! {
                    // Docker's follower only ends with its channel: so does this.
                    () = &mut docker => return,
                    changed = docker_rx.changed() => if changed.is_err() { return },
                    created = fs_changes.next() => {
                        debug!("owners: a watched path changed");
                        if learns {
                            // A container's cgroup appeared before Docker said who it
                            // is: ask (the list answers while the container starts).
                            let known = docker_rx.borrow();
                            for id in created.iter().filter_map(|n| docker::container_id_of_cgroup(n)) {
                                if !known.containers.iter().any(|c| c.id == id) {
                                    let _ = learn_tx.send(docker::Learn(id.to_owned()));
                                }
                            }
                        }
                    }
                    () = tx.closed() => return,
                }
                let mut model = resolve(
                    &self.policy,
                    &docker_rx.borrow_and_update(),
                    root.as_deref(),
                );
                // A directory watched only now may have filled before its watch
                // existed (runc makes a parent and the container's cgroup in one
                // go): look again until the watches stand still.
                for _ in 0..MAX_REARM_ROUNDS {
                    if !fs_changes.rearm(&self.policy, &model) {
                        break;
                    }
                    model = resolve(&self.policy, &docker_rx.borrow(), root.as_deref());
                }
                tx.send_if_modified(|old| {
                    if **old == model {
                        return false;
                    }
                    *old = Arc::new(model);
                    true
                });
            }
        };
        (rx, follow)
    }
}

/// How long the agent's start waits for dockerd's first answer.
const FIRST_DOCKER_ANSWER: Duration = Duration::from_secs(15);

/// Bound on re-resolving while new directories get watched (nesting depth).
const MAX_REARM_ROUNDS: usize = 4;

fn cgroup_root() -> Option<PathBuf> {
    sys::cgroup::unified_root()
        .inspect_err(|e| warn!(error = %e, "owners: no cgroup v2 hierarchy: cgroup owners resolve to nothing"))
        .ok()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::policy::PolicySource;

    /// A `cgroup:` owner has its slot whether or not its cgroup exists now
    /// (a unit's restart removes and makes it again); only `unit:` and
    /// `cgroup:` owners have one here.
    #[test]
    fn cgroup_owners_have_a_slot_made_or_not() {
        /// Removes the test's cgroups, also on panic.
        struct Dirs(PathBuf);
        impl Drop for Dirs {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir(self.0.join("owner"));
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let root = sys::cgroup::unified_root().unwrap();
        let parent = root.join(format!("pg-slot-unit-{}", std::process::id()));
        std::fs::create_dir(&parent).unwrap();
        let _dirs = Dirs(parent.clone());
        let parent_id = sys::cgroup::cgroup_id(&parent).unwrap();
        let rel = format!("/{}/owner", parent.file_name().unwrap().to_string_lossy());
        let spec = OwnerSpec::Cgroup(rel.clone().into());
        let missing = Found::Missing {
            reason: "not made yet".into(),
        };
        let want = vec![CgroupSlot {
            parent_id,
            name: "owner".into(),
        }];
        assert_eq!(owner_slots(&spec, &missing, &root), want);
        std::fs::create_dir(parent.join("owner")).unwrap();
        let made = Found::Cgroup(CgroupRef::resolve(&root, &rel).unwrap());
        assert_eq!(owner_slots(&spec, &made, &root), want);
        assert!(owner_slots(&OwnerSpec::Docker, &missing, &root).is_empty());
    }

    fn container(name: &str, cgroup_id: u64, ip: [u8; 4], published: &[(u16, u16)]) -> Container {
        Container {
            id: format!("{name}-id"),
            name: name.into(),
            running: true,
            pid: Some(100),
            cgroup: Some(CgroupRef {
                path: format!("/docker/{name}"),
                id: cgroup_id,
            }),
            labels: [("role".to_owned(), name.to_owned())].into(),
            networks: vec![NetworkIp {
                network: "bridge".into(),
                ipv4: Some(Ipv4Addr::from(ip)),
                ipv6: None,
            }],
            published: published
                .iter()
                .map(|&(host_port, container_port)| Published {
                    proto: Proto::Tcp,
                    host_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                    host_port,
                    container_port,
                })
                .collect(),
            cgroup_candidates: Vec::new(),
            cgroup_slots: Vec::new(),
        }
    }

    const PROXY_EXE: ExeId = ExeId { dev: 42, ino: 7 };
    const DAEMON_EXE: ExeId = ExeId { dev: 42, ino: 9 };

    fn facts() -> DockerFacts {
        DockerFacts {
            status: DockerStatus::Reachable {
                version: "20.10".into(),
                api_version: "1.41".into(),
            },
            containers: vec![
                container("web", 11, [172, 17, 0, 2], &[(8000, 80)]),
                container("api", 22, [172, 17, 0, 3], &[(8001, 5000)]),
            ],
            proxies: vec![DockerProxy {
                pid: 9,
                proto: Proto::Tcp,
                host_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                host_port: 8000,
                container_ip: Some(IpAddr::V4(Ipv4Addr::new(172, 17, 0, 2))),
                container_port: Some(80),
                cgroup: Some(CgroupRef {
                    path: "/".into(),
                    id: 1,
                }),
                exe: PROXY_EXE,
            }],
            proxy_exe: Some(PROXY_EXE),
            daemon: Some(DockerDaemon {
                pid: 8,
                exe: DAEMON_EXE,
            }),
            networks: vec![DockerNetwork {
                name: "bridge".into(),
                bridge: "docker0".into(),
            }],
        }
    }

    fn policy(text: &str) -> Policy {
        Policy::parse(text, PolicySource::Embedded).unwrap()
    }

    #[test]
    fn bare_docker_owns_each_port_through_the_container_publishing_it() {
        let p = policy("[[ports]]\nport = \"8000-8001\"\nowner = \"docker\"\n");
        let model = resolve(&p, &facts(), None);
        let by_port: Vec<(u16, Vec<u64>)> = model
            .bind_owners()
            .map(|b| (b.port, b.cgroups.into_iter().collect()))
            .collect();
        assert_eq!(by_port, [(8000, vec![11]), (8001, vec![22])]);
        let b = model.entry(Proto::Tcp, 8000).unwrap().bind_owners(8000);
        assert_eq!(
            b.exes,
            [PROXY_EXE, DAEMON_EXE].into(),
            "docker-proxy and the daemon (daemon-side binding) may bind a Docker port"
        );
        assert_eq!(model.docker_bridges, ["docker0"]);
        assert!(
            b.proxy_cgroups.is_empty(),
            "the root cgroup is never allowed"
        );
        assert!(model.entry(Proto::Udp, 8000).is_none());
    }

    #[test]
    fn a_named_container_owns_the_whole_entry_and_no_other() {
        let p = policy(
            "[[ports]]\nport = \"8000-8001\"\nowner = \"docker:web\"\n[[ports]]\nport = 9000\nowner = \"docker-label:role=api\"\n",
        );
        let model = resolve(&p, &facts(), None);
        let cgroups: Vec<Vec<u64>> = model
            .bind_owners()
            .map(|b| b.cgroups.into_iter().collect())
            .collect();
        assert_eq!(cgroups, [vec![11], vec![11], vec![22]]);
    }

    #[test]
    fn nat_targets_come_from_published_ports_in_the_entry() {
        let p = policy(
            "[[ports]]\nport = 8000\nowner = \"docker\"\n[[ports]]\nport = 8001\nowner = \"docker:web\"\n",
        );
        let nat: Vec<NatTarget> = resolve(&p, &facts(), None).nat_targets().collect();
        assert_eq!(
            nat,
            [NatTarget {
                proto: Proto::Tcp,
                host_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                host_port: 8000,
                container_ip: IpAddr::V4(Ipv4Addr::new(172, 17, 0, 2)),
                container_port: 80,
                container: "web".into(),
            }],
            "web does not publish 8001, and api is not docker:web"
        );
    }

    #[test]
    fn unreachable_docker_leaves_only_non_docker_owners() {
        let p = policy("[[ports]]\nport = 80\nowner = [\"docker\", \"exe:/bin/sh\"]\n");
        let facts = DockerFacts::new(DockerStatus::Unreachable {
            reason: "gone".into(),
        });
        let model = resolve(&p, &facts, None);
        assert_eq!(
            model.ports[0].owners[0].found,
            Found::DockerUnreachable {
                reason: "gone".into()
            }
        );
        let b = model.entry(Proto::Tcp, 80).unwrap().bind_owners(80);
        assert!(b.cgroups.is_empty());
        assert_eq!(
            b.exes,
            [ExeId::of_path(Path::new("/bin/sh")).unwrap()].into()
        );
    }

    #[test]
    fn cgroup_and_unit_owners_resolve_to_ids() {
        let root = sys::cgroup::unified_root().unwrap();
        let mine = sys::cgroup::process_cgroup(std::process::id()).unwrap();
        let p = policy(&format!(
            "[[ports]]\nport = 80\nowner = [\"cgroup:{mine}\", \"unit:pg-absent.service\"]\n"
        ));
        let model = resolve(&p, &DockerFacts::new(DockerStatus::Connecting), Some(&root));
        let id = sys::cgroup::cgroup_id(&cgroup::absolute(&root, &mine)).unwrap();
        assert_eq!(model.bind_owners().next().unwrap().cgroups, [id].into());
        assert!(matches!(
            model.ports[0].owners[1].found,
            Found::Missing { .. }
        ));
    }

    /// A unit restart makes its cgroup again with a new id: the model follows
    /// through inotify, with no Docker event and no polling.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recreated_cgroup_is_followed_without_polling() {
        let root = sys::cgroup::unified_root().unwrap();
        let name = format!("pg-owners-watch-{}", std::process::id());
        let dir = root.join(&name);
        let p = policy(&format!(
            "[[ports]]\nport = 80\nowner = \"cgroup:/{name}\"\n"
        ));
        let (mut rx, follow) = Owners::new(p)
            .docker_socket("/nonexistent/portguard/docker.sock")
            .start()
            .await;
        let task = tokio::spawn(follow);
        let id_of = |m: &ResolvedOwners| m.bind_owners().next().unwrap().cgroups.first().copied();
        assert_eq!(id_of(&rx.borrow_and_update()), None, "absent at first");
        let wait = |rx: &mut watch::Receiver<Arc<ResolvedOwners>>, want: u64| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    rx.wait_for(|m| id_of(m) == Some(want)),
                )
                .await
                .map(|_| ())
            }
        };
        std::fs::create_dir(&dir).unwrap();
        let first = sys::cgroup::cgroup_id(&dir).unwrap();
        let seen_first = wait(&mut rx, first).await;
        std::fs::remove_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let second = sys::cgroup::cgroup_id(&dir).unwrap();
        let seen_second = wait(&mut rx, second).await;
        std::fs::remove_dir(&dir).unwrap();
        task.abort();
        assert!(seen_first.is_ok(), "mkdir not seen");
        assert_ne!(first, second, "a new directory is a new cgroup id");
        assert!(seen_second.is_ok(), "re-creation not seen");
    }
}
