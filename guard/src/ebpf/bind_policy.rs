//! Policy + resolved owner identities → what the kernel programs enforce.
//!
//! A pure translation, so it is tested without a kernel; [`super::BindGuard`]
//! applies the result to the maps, touching only what changed.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use guard_common::{OwnerCgroupKey, OwnerExeKey};

use super::PortEntry;
use crate::{
    owners::{Found, ResolvedOwners},
    policy::{Mode, Policy},
    sys::cgroup,
};

/// The maps' contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BindPolicy {
    pub ports: Vec<PortEntry>,
    pub owner_cgroups: Vec<OwnerCgroupKey>,
    pub owner_exes: Vec<OwnerExeKey>,
    /// Ports with an owner that could not be resolved: who owns them is unknown.
    pub unresolved: Vec<(u16, u8)>,
    /// Why, one line per entry and owner, for the agent to log.
    pub warnings: Vec<String>,
}

/// Whether a process may hold a port, as far as the policy knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ownership {
    Owner,
    Stranger,
    /// Some owner of the port could not be resolved (e.g. Docker unreachable).
    Unknown,
}

impl BindPolicy {
    /// What the kernel enforces for `policy`, given its owners as resolved now.
    ///
    /// docker-proxy is allowed by its executable (the model lists it among a
    /// Docker port's executables), not by its cgroup, which is dockerd's and
    /// far broader than the proxy.
    pub fn from_owners(policy: &Policy, owners: &ResolvedOwners) -> Self {
        let mut out = Self::default();
        for (entry, resolved) in policy.ports.iter().zip(&owners.ports) {
            let proto = entry.proto.ip_proto();
            let mut enforce = policy.mode_of(entry) == Mode::Enforce;
            for owner in &resolved.owners {
                if let Found::DockerUnreachable { reason } = &owner.found {
                    // Denying while the owner cannot be known would lock Docker out of
                    // its own ports the moment dockerd comes back: observe instead.
                    if enforce {
                        out.warnings.push(format!(
                            "{}/{}: observing instead of enforcing, owner {} unresolved: {reason}",
                            entry.proto, entry.port, owner.spec
                        ));
                    }
                    enforce = false;
                    out.unresolved
                        .extend(entry.port.iter().map(|port| (port, proto)));
                }
            }
            for port in entry.port.iter() {
                let allowed = resolved.bind_owners(port);
                out.owner_cgroups.extend(
                    allowed
                        .cgroups
                        .iter()
                        .map(|id| OwnerCgroupKey::new(*id, port, proto)),
                );
                out.owner_exes.extend(
                    allowed
                        .exes
                        .iter()
                        .map(|e| OwnerExeKey::new(e.ino, e.kernel_dev(), port, proto)),
                );
                out.ports.push(PortEntry {
                    port,
                    proto,
                    enforce,
                });
            }
        }
        out
    }
}

impl BindPolicy {
    /// The same decision the kernel programs make, for a process already
    /// holding `port`: its cgroup or an ancestor, or its executable, is an owner.
    pub fn ownership(&self, port: u16, proto: u8, who: &ProcessIdentity) -> Ownership {
        let by_cgroup = who.cgroup_ids.iter().any(|id| {
            self.owner_cgroups
                .contains(&OwnerCgroupKey::new(*id, port, proto))
        });
        let by_exe = who.exe.is_some_and(|(ino, dev)| {
            self.owner_exes
                .contains(&OwnerExeKey::new(ino, dev, port, proto))
        });
        if by_cgroup || by_exe {
            Ownership::Owner
        } else if self.unresolved.contains(&(port, proto)) {
            Ownership::Unknown
        } else {
            Ownership::Stranger
        }
    }
}

/// What the kernel would see of a process: its cgroup and every ancestor's id,
/// and its executable's inode and device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub cgroup_ids: Vec<u64>,
    pub exe: Option<(u64, u32)>,
}

impl ProcessIdentity {
    pub fn of(pid: u32, cgroup_root: &Path) -> Self {
        let mut cgroup_ids = Vec::new();
        if let Some(path) = cgroup::process_cgroup(pid) {
            let mut dir = cgroup_root.to_path_buf();
            cgroup_ids.extend(cgroup::cgroup_id(&dir).ok());
            for part in path.split('/').filter(|p| !p.is_empty()) {
                dir.push(part);
                cgroup_ids.extend(cgroup::cgroup_id(&dir).ok());
            }
        }
        let exe = std::fs::metadata(format!("/proc/{pid}/exe"))
            .ok()
            .map(|m| (m.ino(), kernel_dev(m.dev())));
        Self { cgroup_ids, exe }
    }
}

/// The kernel's internal dev_t (major << 20 | minor) for a userspace `st_dev`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    (libc::major(st_dev) << 20) | libc::minor(st_dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        owners::{CgroupRef, DockerStatus, ExeId, ResolvedOwner, ResolvedPort},
        policy::{OwnerSpec, PolicySource},
        types::Proto,
    };

    fn policy(text: &str) -> Policy {
        Policy::parse(text, PolicySource::Embedded).unwrap()
    }

    /// A model where every owner of every entry resolved to `found(spec)`.
    fn owners(policy: &Policy, found: impl Fn(&OwnerSpec) -> Found) -> ResolvedOwners {
        ResolvedOwners {
            docker: DockerStatus::Unreachable {
                reason: "test".into(),
            },
            docker_bridges: Vec::new(),
            cgroup_root: None,
            ports: policy
                .ports
                .iter()
                .map(|e| ResolvedPort {
                    proto: e.proto,
                    port: e.port,
                    owners: e
                        .owner
                        .iter()
                        .map(|spec| ResolvedOwner {
                            spec: spec.clone(),
                            found: found(spec),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn cgroup(id: u64) -> Found {
        Found::Cgroup(CgroupRef {
            path: "/x".into(),
            id,
        })
    }

    fn exe(ino: u64) -> Found {
        Found::Exe {
            path: "/bin/x".into(),
            id: ExeId {
                dev: libc::makedev(8, 1),
                ino,
            },
        }
    }

    #[test]
    fn ranges_expand_and_identities_attach_to_every_port() {
        let p =
            policy("[[ports]]\nport = \"8000-8002\"\nowner = [\"cgroup:/a\", \"exe:/bin/x\"]\n");
        let bp = BindPolicy::from_owners(
            &p,
            &owners(&p, |o| match o {
                OwnerSpec::Cgroup(_) => cgroup(7),
                _ => exe(9),
            }),
        );
        assert_eq!(bp.ports.len(), 3);
        assert!(
            bp.ports
                .iter()
                .all(|p| p.enforce && p.proto == Proto::Tcp.ip_proto())
        );
        assert_eq!(
            bp.owner_cgroups,
            (8000..=8002)
                .map(|p| OwnerCgroupKey::new(7, p, 6))
                .collect::<Vec<_>>()
        );
        assert_eq!(bp.owner_exes[2], OwnerExeKey::new(9, 8 << 20 | 1, 8002, 6));
        assert!(bp.warnings.is_empty());
    }

    #[test]
    fn unreachable_docker_turns_enforce_into_observe() {
        let p = policy(
            "[[ports]]\nport = 80\nowner = \"docker\"\n[[ports]]\nport = 81\nowner = \"cgroup:/x\"\n",
        );
        let bp = BindPolicy::from_owners(
            &p,
            &owners(&p, |o| match o {
                OwnerSpec::Docker => Found::DockerUnreachable {
                    reason: "down".into(),
                },
                _ => Found::Missing {
                    reason: "absent".into(),
                },
            }),
        );
        assert_eq!(
            bp.ports,
            [
                PortEntry {
                    port: 80,
                    proto: 6,
                    enforce: false
                },
                PortEntry {
                    port: 81,
                    proto: 6,
                    enforce: true
                },
            ]
        );
        assert_eq!(bp.unresolved, [(80, 6)]);
        assert_eq!(bp.warnings.len(), 1);
        assert!(bp.warnings[0].contains("tcp/80") && bp.warnings[0].contains("down"));
    }

    #[test]
    fn ownership_matches_ancestors_exes_and_unknowns() {
        let p = policy(
            "[[ports]]\nport = 80\nowner = [\"cgroup:/a\", \"exe:/x\"]\n[[ports]]\nport = 443\nowner = \"docker\"\n",
        );
        let bp = BindPolicy::from_owners(
            &p,
            &owners(&p, |o| match o {
                OwnerSpec::Cgroup(_) => cgroup(5),
                OwnerSpec::Exe(_) => exe(9),
                _ => Found::DockerUnreachable {
                    reason: "no docker".into(),
                },
            }),
        );
        let dev = 8 << 20 | 1;
        let child_of_owner = ProcessIdentity {
            cgroup_ids: vec![1, 5, 77],
            exe: None,
        };
        let runs_owner_exe = ProcessIdentity {
            cgroup_ids: vec![1],
            exe: Some((9, dev)),
        };
        let stranger = ProcessIdentity {
            cgroup_ids: vec![1, 2],
            exe: Some((9, dev + 1)),
        };
        assert_eq!(bp.ownership(80, 6, &child_of_owner), Ownership::Owner);
        assert_eq!(bp.ownership(80, 6, &runs_owner_exe), Ownership::Owner);
        assert_eq!(bp.ownership(80, 6, &stranger), Ownership::Stranger);
        assert_eq!(bp.ownership(80, 17, &child_of_owner), Ownership::Stranger);
        assert_eq!(bp.ownership(443, 6, &stranger), Ownership::Unknown);
    }

    #[test]
    fn own_process_identity_has_ancestors_and_exe() {
        let root = cgroup::unified_root().unwrap();
        let me = ProcessIdentity::of(std::process::id(), &root);
        assert_eq!(
            me.cgroup_ids.first(),
            cgroup::cgroup_id(&root).ok().as_ref()
        );
        assert!(me.exe.is_some());
    }

    #[test]
    fn observe_mode_never_enforces() {
        let p = policy("mode = \"observe\"\n[[ports]]\nport = 80\nowner = \"cgroup:/x\"\n");
        let bp = BindPolicy::from_owners(&p, &owners(&p, |_| cgroup(1)));
        assert!(!bp.ports[0].enforce);
        assert_eq!(bp.owner_cgroups.len(), 1);
    }
}
