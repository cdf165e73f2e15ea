//! Policy + resolved owner identities → what the kernel programs enforce.
//!
//! A pure translation, so it is tested without a kernel; [`super::BindGuard`]
//! applies the result to the maps, touching only what changed.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use guard_common::{OwnerCgroupKey, OwnerExeKey};

use super::PortEntry;
use crate::{
    policy::{Mode, OwnerSpec, Policy},
    sys::cgroup,
};

/// An identity the kernel can check for one owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindIdentity {
    /// Processes in this cgroup v2 (or below it), by cgroup id.
    Cgroup(u64),
    /// Processes running this file, by inode and kernel device number.
    Exe { ino: u64, dev: u32 },
}

/// What one owner spec resolved to right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// These identities may bind (possibly none: the owner is absent right now).
    Resolved(Vec<BindIdentity>),
    /// The owner cannot be resolved by the bind guard yet (e.g. its source is
    /// unreachable): strangers are observed, not denied, so an owner is never locked out.
    Unresolvable(String),
}

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
    /// `resolve` says what each owner spec of the policy is right now.
    pub fn build(policy: &Policy, mut resolve: impl FnMut(&OwnerSpec) -> Resolution) -> Self {
        let mut out = Self::default();
        for entry in &policy.ports {
            let proto = entry.proto.ip_proto();
            let mut enforce = policy.mode_of(entry) == Mode::Enforce;
            for owner in &entry.owner {
                match resolve(owner) {
                    Resolution::Resolved(ids) => {
                        for id in ids {
                            for port in entry.port.iter() {
                                match id {
                                    BindIdentity::Cgroup(cg) => {
                                        out.owner_cgroups.push(OwnerCgroupKey::new(cg, port, proto))
                                    }
                                    BindIdentity::Exe { ino, dev } => {
                                        out.owner_exes.push(OwnerExeKey::new(ino, dev, port, proto))
                                    }
                                }
                            }
                        }
                    }
                    Resolution::Unresolvable(why) => {
                        if enforce {
                            out.warnings.push(format!(
                                "{}/{}: observing instead of enforcing, owner {owner} unresolved: {why}",
                                entry.proto, entry.port
                            ));
                        }
                        enforce = false;
                        out.unresolved
                            .extend(entry.port.iter().map(|port| (port, proto)));
                    }
                }
            }
            out.ports.extend(entry.port.iter().map(|port| PortEntry {
                port,
                proto,
                enforce,
            }));
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

/// Resolves the owner kinds that need no outside service: `cgroup:` and `exe:`
/// (by the file's inode, so a renamed or copied binary is a stranger) and
/// `unit:` (the unit's cgroup under system.slice). Docker owners need the
/// Docker owners source and are unresolvable here.
pub fn resolve_local(owner: &OwnerSpec, cgroup_root: &Path) -> Resolution {
    match owner {
        OwnerSpec::Cgroup(path) => {
            let dir = cgroup_root.join(path.strip_prefix("/").unwrap_or(path));
            Resolution::Resolved(
                cgroup::cgroup_id(&dir)
                    .map(BindIdentity::Cgroup)
                    .into_iter()
                    .collect(),
            )
        }
        OwnerSpec::Exe(path) => Resolution::Resolved(
            std::fs::metadata(path)
                .map(|m| BindIdentity::Exe {
                    ino: m.ino(),
                    dev: kernel_dev(m.dev()),
                })
                .into_iter()
                .collect(),
        ),
        OwnerSpec::Unit(unit) => {
            let dir = cgroup_root.join("system.slice").join(unit);
            Resolution::Resolved(
                cgroup::cgroup_id(&dir)
                    .map(BindIdentity::Cgroup)
                    .into_iter()
                    .collect(),
            )
        }
        OwnerSpec::Docker | OwnerSpec::DockerName(_) | OwnerSpec::DockerLabel { .. } => {
            Resolution::Unresolvable("Docker owners are not resolved by this agent yet".into())
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
    use crate::policy::{PolicySource, Proto};

    fn policy(text: &str) -> Policy {
        Policy::parse(text, PolicySource::Embedded).unwrap()
    }

    #[test]
    fn ranges_expand_and_identities_attach_to_every_port() {
        let p =
            policy("[[ports]]\nport = \"8000-8002\"\nowner = [\"cgroup:/a\", \"exe:/bin/x\"]\n");
        let bp = BindPolicy::build(&p, |o| match o {
            OwnerSpec::Cgroup(_) => Resolution::Resolved(vec![BindIdentity::Cgroup(7)]),
            _ => Resolution::Resolved(vec![BindIdentity::Exe { ino: 9, dev: 3 }]),
        });
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
        assert_eq!(bp.owner_exes[2], OwnerExeKey::new(9, 3, 8002, 6));
    }

    #[test]
    fn unresolvable_owner_turns_enforce_into_observe() {
        let p = policy(
            "[[ports]]\nport = 80\nowner = \"docker\"\n[[ports]]\nport = 81\nowner = \"cgroup:/x\"\n",
        );
        let bp = BindPolicy::build(&p, |o| match o {
            OwnerSpec::Docker => Resolution::Unresolvable("down".into()),
            _ => Resolution::Resolved(vec![]),
        });
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
    }

    #[test]
    fn ownership_matches_ancestors_exes_and_unknowns() {
        let p = policy(
            "[[ports]]\nport = 80\nowner = [\"cgroup:/a\", \"exe:/x\"]\n[[ports]]\nport = 443\nowner = \"docker\"\n",
        );
        let bp = BindPolicy::build(&p, |o| match o {
            OwnerSpec::Cgroup(_) => Resolution::Resolved(vec![BindIdentity::Cgroup(5)]),
            OwnerSpec::Exe(_) => Resolution::Resolved(vec![BindIdentity::Exe { ino: 9, dev: 1 }]),
            _ => Resolution::Unresolvable("no docker".into()),
        });
        let child_of_owner = ProcessIdentity {
            cgroup_ids: vec![1, 5, 77],
            exe: None,
        };
        let runs_owner_exe = ProcessIdentity {
            cgroup_ids: vec![1],
            exe: Some((9, 1)),
        };
        let stranger = ProcessIdentity {
            cgroup_ids: vec![1, 2],
            exe: Some((9, 2)),
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
        let bp = BindPolicy::build(&p, |_| Resolution::Resolved(vec![BindIdentity::Cgroup(1)]));
        assert!(!bp.ports[0].enforce);
        assert_eq!(bp.owner_cgroups.len(), 1);
    }

    #[test]
    fn local_exe_identity_is_the_inode_not_the_name() {
        let dir = std::env::temp_dir().join(format!("pg-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("nginx"), dir.join("copy"));
        std::fs::write(&a, b"#!/bin/true\n").unwrap();
        std::fs::copy(&a, &b).unwrap();
        let root = Path::new("/nonexistent");
        let ra = resolve_local(&OwnerSpec::Exe(a.clone()), root);
        let rb = resolve_local(&OwnerSpec::Exe(b), root);
        assert_ne!(ra, rb, "a copy is another file");
        let Resolution::Resolved(ids) = ra else {
            panic!()
        };
        assert_eq!(ids.len(), 1);
        assert_eq!(
            resolve_local(&OwnerSpec::Exe(dir.join("missing")), root),
            Resolution::Resolved(vec![])
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
