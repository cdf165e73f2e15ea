//! Policy + resolved owner identities → what the kernel programs enforce.
//!
//! A pure translation, so it is tested without a kernel; [`super::BindGuard`]
//! applies the result to the maps, touching only what changed.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use guard_common::{OwnerCgroupKey, OwnerExeKey, OwnerSlotKey};

use super::PortEntry;
use crate::{
    owners::{CgroupSlot, Found, ResolvedOwners},
    policy::{Mode, Policy},
    sys::cgroup,
};

/// The maps' contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BindPolicy {
    pub ports: Vec<PortEntry>,
    pub owner_cgroups: Vec<OwnerCgroupKey>,
    pub owner_exes: Vec<OwnerExeKey>,
    /// Where owners' cgroups are made (parent id and name): containers',
    /// units' and `cgroup:` owners'.
    pub owner_slots: Vec<OwnerSlotKey>,
    /// Ports with an owner that could not be resolved: who owns them is unknown.
    pub unresolved: Vec<(u16, u8)>,
    /// Why, one line per entry and owner, for the agent to log.
    pub warnings: Vec<String>,
    /// Owner cgroups the kernel programs cannot recognise by slot (a name
    /// too long): they count once the agent has learned their id.
    pub slot_warnings: Vec<String>,
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
                for slot in &allowed.slots {
                    match slot_key(slot, port, proto) {
                        Some(key) => out.owner_slots.push(key),
                        // Recognised once its id is learned, as before slots.
                        None => out.slot_warnings.push(format!(
                            "{}/{port}: cgroup name {:?} is too long for the kernel programs' slot: \
                             the owner's new cgroup counts once the agent has learned it",
                            entry.proto, slot.name
                        )),
                    }
                }
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
        let by_slot = who
            .slot
            .as_ref()
            .and_then(|slot| slot_key(slot, port, proto))
            .is_some_and(|key| self.owner_slots.contains(&key));
        if by_cgroup || by_exe || by_slot {
            Ownership::Owner
        } else if self.unresolved.contains(&(port, proto)) {
            Ownership::Unknown
        } else {
            Ownership::Stranger
        }
    }
}

/// The kernel programs' key for `slot` on `port`/`proto` (`None`: a name
/// they cannot hold).
fn slot_key(slot: &CgroupSlot, port: u16, proto: u8) -> Option<OwnerSlotKey> {
    OwnerSlotKey::new(slot.parent_id, slot.name.as_bytes(), port, proto)
}

/// What the kernel would see of a process: its cgroup and every ancestor's id,
/// its own cgroup's slot, and its executable's inode and device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub cgroup_ids: Vec<u64>,
    pub slot: Option<CgroupSlot>,
    pub exe: Option<(u64, u32)>,
}

impl ProcessIdentity {
    pub fn of(pid: u32, cgroup_root: &Path) -> Self {
        let mut cgroup_ids = Vec::new();
        let mut slot = None;
        if let Some(path) = cgroup::process_cgroup(pid) {
            let mut dir = cgroup_root.to_path_buf();
            let mut parent = cgroup::cgroup_id(&dir).ok();
            cgroup_ids.extend(parent);
            for part in path.split('/').filter(|p| !p.is_empty()) {
                dir.push(part);
                let id = cgroup::cgroup_id(&dir).ok();
                slot = parent.map(|parent_id| CgroupSlot {
                    parent_id,
                    name: part.to_owned(),
                });
                cgroup_ids.extend(id);
                parent = id;
            }
        }
        let exe = std::fs::metadata(format!("/proc/{pid}/exe"))
            .ok()
            .map(|m| (m.ino(), kernel_dev(m.dev())));
        Self {
            cgroup_ids,
            slot,
            exe,
        }
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
        owners::{CgroupRef, Container, DockerStatus, ExeId, ResolvedOwner, ResolvedPort},
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
                            slots: Vec::new(),
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
            ..ProcessIdentity::default()
        };
        let runs_owner_exe = ProcessIdentity {
            cgroup_ids: vec![1],
            exe: Some((9, dev)),
            ..ProcessIdentity::default()
        };
        let stranger = ProcessIdentity {
            cgroup_ids: vec![1, 2],
            exe: Some((9, dev + 1)),
            ..ProcessIdentity::default()
        };
        assert_eq!(bp.ownership(80, 6, &child_of_owner), Ownership::Owner);
        assert_eq!(bp.ownership(80, 6, &runs_owner_exe), Ownership::Owner);
        assert_eq!(bp.ownership(80, 6, &stranger), Ownership::Stranger);
        assert_eq!(bp.ownership(80, 17, &child_of_owner), Ownership::Stranger);
        assert_eq!(bp.ownership(443, 6, &stranger), Ownership::Unknown);
    }

    /// A named container's slots (where its cgroup is made at each start)
    /// become slot keys for every port of its entries; a process in a cgroup
    /// of that name under that parent is the owner, under another parent or
    /// with another name a stranger.
    #[test]
    fn a_named_containers_slots_make_its_new_cgroup_the_owner() {
        let p = policy("[[ports]]\nport = 8080\nowner = \"docker:web\"\n");
        let id = "ab".repeat(32);
        let web = Container {
            id: id.clone(),
            name: "web".into(),
            running: false,
            pid: None,
            cgroup: None,
            labels: Default::default(),
            networks: Vec::new(),
            published: Vec::new(),
            cgroup_candidates: vec![format!("/docker/{id}")],
            cgroup_slots: vec![CgroupSlot {
                parent_id: 40,
                name: id.clone(),
            }],
        };
        let bp = BindPolicy::from_owners(
            &p,
            &owners(&p, |_| Found::Docker {
                containers: vec![web.clone()],
                proxies: Vec::new(),
                proxy_exe: None,
                daemon_exe: None,
            }),
        );
        assert_eq!(
            bp.owner_slots,
            [OwnerSlotKey::new(40, id.as_bytes(), 8080, 6).unwrap()]
        );
        assert!(bp.owner_cgroups.is_empty(), "not started: no id yet");
        let in_slot = |parent: u64, name: &str| ProcessIdentity {
            cgroup_ids: vec![1, parent, 99],
            slot: Some(CgroupSlot {
                parent_id: parent,
                name: name.to_owned(),
            }),
            ..ProcessIdentity::default()
        };
        assert_eq!(bp.ownership(8080, 6, &in_slot(40, &id)), Ownership::Owner);
        assert_eq!(
            bp.ownership(8080, 6, &in_slot(41, &id)),
            Ownership::Stranger
        );
        assert_eq!(
            bp.ownership(8080, 6, &in_slot(40, "other")),
            Ownership::Stranger
        );
        assert_eq!(
            bp.ownership(8081, 6, &in_slot(40, &id)),
            Ownership::Stranger
        );
    }

    /// A cgroup name the kernel side cannot hold gets no slot and says so,
    /// apart from the observe warnings (enforcement is unchanged).
    #[test]
    fn a_name_too_long_for_a_slot_is_a_slot_warning_not_an_observe_one() {
        let p = policy("mode = \"enforce\"\n[[ports]]\nport = 80\nowner = \"cgroup:/x\"\n");
        let mut model = owners(&p, |_| cgroup(5));
        model.ports[0].owners[0].slots = vec![CgroupSlot {
            parent_id: 1,
            name: "n".repeat(guard_common::CGROUP_NAME_LEN),
        }];
        let bp = BindPolicy::from_owners(&p, &model);
        assert!(bp.owner_slots.is_empty());
        assert!(bp.warnings.is_empty(), "{:?}", bp.warnings);
        assert_eq!(bp.slot_warnings.len(), 1);
        assert!(bp.slot_warnings[0].starts_with("tcp/80: cgroup name"));
        assert!(bp.ports[0].enforce);
    }

    #[test]
    fn own_process_identity_has_ancestors_slot_and_exe() {
        let root = cgroup::unified_root().unwrap();
        let me = ProcessIdentity::of(std::process::id(), &root);
        assert_eq!(
            me.cgroup_ids.first(),
            cgroup::cgroup_id(&root).ok().as_ref()
        );
        assert!(me.exe.is_some());
        // The slot is the own cgroup's name under its parent's id.
        let path = cgroup::process_cgroup(std::process::id()).unwrap();
        if let Some((_, name)) = path.rsplit_once('/').filter(|(_, n)| !n.is_empty()) {
            let n = me.cgroup_ids.len();
            let want = CgroupSlot {
                parent_id: me.cgroup_ids[n - 2],
                name: name.to_owned(),
            };
            assert_eq!(me.slot, Some(want));
        } else {
            assert_eq!(me.slot, None, "in the root cgroup: no slot");
        }
    }

    #[test]
    fn observe_mode_never_enforces() {
        let p = policy("mode = \"observe\"\n[[ports]]\nport = 80\nowner = \"cgroup:/x\"\n");
        let bp = BindPolicy::from_owners(&p, &owners(&p, |_| cgroup(1)));
        assert!(!bp.ports[0].enforce);
        assert_eq!(bp.owner_cgroups.len(), 1);
    }
}
