//! `portguard listeners`: who holds each protected port right now, and whether
//! it is the owner. The incident's `netstat` check, done right (though a NAT
//! hijack holds no socket: `portguard check` finds those).
//!
//! Where no cgroup v2 hierarchy is visible (`ip netns exec` remounts `/sys`; a
//! cgroup-v1-only host), `unit:` and `cgroup:` owners and the cgroups of the
//! processes holding sockets cannot be known: holders are then matched by
//! executable only, one that is not is "unknown" rather than a stranger, and
//! [`CgroupBlind`] names what could not be resolved.

use std::{os::unix::fs::MetadataExt as _, process::ExitCode};

use serde::Serialize;

use super::PolicyArgs;
use crate::{
    ebpf::{BindPolicy, Ownership, ProcessIdentity, kernel_dev},
    owners::{Owners, ResolvedOwners},
    policy::{OwnerSpec, Policy},
    sys::{process::ProcessInfo, sockets, workload::Workload},
};

#[derive(Debug, clap::Args)]
pub struct ListenersArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print JSON (`{"listeners":[…]}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One holder of a socket on a protected port.
#[derive(Debug, Serialize)]
pub struct Holder {
    pub proto: String,
    pub addr: String,
    pub port: u16,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    #[serde(flatten)]
    pub process: ProcessInfo,
    #[serde(flatten)]
    pub workload: Workload,
    pub ownership: Ownership,
}

/// What a one-shot command could not know because no cgroup v2 hierarchy is
/// visible here (`ip netns exec` hides `/sys/fs/cgroup`; cgroup-v1-only hosts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupBlind {
    /// The whole of it, in one line.
    pub message: String,
    /// Owner kinds that are cgroups: never resolvable without the hierarchy.
    pub owner_kinds: Vec<&'static str>,
    /// This policy's owners of those kinds (`unit:nginx.service tcp/8080`).
    pub unresolved_owners: Vec<String>,
    /// The processes holding sockets are matched by executable only.
    pub listener_cgroups_unknown: bool,
}

/// The owner kinds that name cgroups.
const CGROUP_OWNER_KINDS: [&str; 2] = ["unit", "cgroup"];

impl CgroupBlind {
    /// `None` when the owners were resolved with a cgroup v2 hierarchy.
    pub fn of(policy: &Policy, owners: &ResolvedOwners) -> Option<Self> {
        if owners.cgroup_root.is_some() {
            return None;
        }
        let unresolved_owners: Vec<String> = policy
            .ports
            .iter()
            .flat_map(|p| {
                p.owner
                    .iter()
                    .filter(|o| matches!(o, OwnerSpec::Unit(_) | OwnerSpec::Cgroup(_)))
                    .map(move |o| format!("{o} {}/{}", p.proto, p.port))
            })
            .collect();
        let mut message = String::from(
            "cgroup v2 not visible here: unit:/cgroup: owners and listener cgroups unknown \
             (holders are matched by executable only)",
        );
        if !unresolved_owners.is_empty() {
            message += &format!("; unresolved: {}", unresolved_owners.join(", "));
        }
        Some(Self {
            message,
            owner_kinds: CGROUP_OWNER_KINDS.to_vec(),
            unresolved_owners,
            listener_cgroups_unknown: true,
        })
    }
}

/// Exit 0 when every protected port is held by its owner (or nobody), 1 when a
/// non-owner holds one, 2 on error.
pub fn main(args: ListenersArgs) -> anyhow::Result<ExitCode> {
    let (policy, _) = Policy::load(args.policy.config.as_deref())?;
    let owners = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(Owners::new(policy.clone()).resolve_once());
    let holders = holders(&policy, &owners);
    let blind = CgroupBlind::of(&policy, &owners);
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "listeners": holders, "unknown": blind })
        );
    } else {
        print_table(&holders);
        if let Some(b) = &blind {
            println!("{}", b.message);
        }
    }
    let foreign = holders.iter().any(|h| h.ownership == Ownership::Stranger);
    Ok(if foreign {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Every socket on a protected port in this network namespace, with its holder
/// and whether the holder owns the port. Without a cgroup v2 hierarchy
/// (`owners.cgroup_root` is none) a holder is matched by its executable only;
/// one that does not match is "unknown" on a port that has an owner other
/// than `exe:` (it may be that owner's process), a stranger otherwise.
pub fn holders(policy: &Policy, owners: &ResolvedOwners) -> Vec<Holder> {
    let root = owners.cgroup_root.as_deref();
    let maps = BindPolicy::from_owners(policy, owners);
    let mut holders = Vec::new();
    for l in sockets::listeners() {
        if policy.find(l.port, l.proto).is_none() {
            continue;
        }
        // An orphaned socket (no pid) is still held: by nobody we can name.
        let pids: Vec<Option<u32>> = if l.pids.is_empty() {
            vec![None]
        } else {
            l.pids.iter().copied().map(Some).collect()
        };
        for pid in pids {
            let (process, identity) = pid
                .map(|p| {
                    let identity = match root {
                        Some(root) => ProcessIdentity::of(p, root),
                        None => ProcessIdentity {
                            exe: exe_identity(p),
                            ..ProcessIdentity::default()
                        },
                    };
                    (ProcessInfo::read(p), identity)
                })
                .unwrap_or_default();
            let workload = process
                .cgroup
                .as_deref()
                .map(Workload::from_cgroup_path)
                .unwrap_or_default();
            let comm = pid.and_then(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .ok()
                    .map(|s| s.trim_end().to_owned())
            });
            holders.push(Holder {
                proto: l.proto.to_string(),
                addr: l.addr.to_string(),
                port: l.port,
                pid,
                comm,
                ownership: match maps.ownership(l.port, l.proto.ip_proto(), &identity) {
                    Ownership::Stranger
                        if root.is_none() && has_non_exe_owner(policy, l.port, l.proto) =>
                    {
                        Ownership::Unknown
                    }
                    o => o,
                },
                process,
                workload,
            });
        }
    }
    holders.sort_by(|a, b| (a.port, &a.proto, a.pid).cmp(&(b.port, &b.proto, b.pid)));
    holders
}

/// A process's executable as the kernel programs see it: (inode, kernel dev).
fn exe_identity(pid: u32) -> Option<(u64, u32)> {
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.ino(), kernel_dev(m.dev())))
}

/// Whether the entry protecting `port` has an owner recognised by cgroup
/// (units, cgroups, Docker containers' processes), not by executable alone.
fn has_non_exe_owner(policy: &Policy, port: u16, proto: crate::policy::Proto) -> bool {
    policy
        .find(port, proto)
        .is_some_and(|p| p.owner.iter().any(|o| !matches!(o, OwnerSpec::Exe(_))))
}

pub fn print_table(holders: &[Holder]) {
    if holders.is_empty() {
        println!("no process holds a protected port");
        return;
    }
    println!(
        "{:<5} {:<24} {:>7} {:<16} {:<10} WORKLOAD / EXE",
        "PROTO", "ADDRESS", "PID", "COMM", "OWNER?"
    );
    for h in holders {
        let who = h
            .workload
            .unit
            .clone()
            .or_else(|| {
                h.workload
                    .container_id
                    .as_ref()
                    .map(|c| format!("container {}", &c[..12]))
            })
            .or_else(|| h.process.exe.as_ref().map(|e| e.display().to_string()))
            .unwrap_or_else(|| "-".into());
        let addr = if h.addr.contains(':') {
            format!("[{}]:{}", h.addr, h.port)
        } else {
            format!("{}:{}", h.addr, h.port)
        };
        println!(
            "{:<5} {:<24} {:>7} {:<16} {:<10} {}",
            h.proto,
            addr,
            h.pid.map_or("-".into(), |p| p.to_string()),
            h.comm.as_deref().unwrap_or("-"),
            match h.ownership {
                Ownership::Owner => "owner",
                Ownership::Stranger => "STRANGER",
                Ownership::Unknown => "unknown",
            },
            who
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::{
        owners::{self, DockerFacts, DockerStatus},
        policy::PolicySource,
        sys::cgroup,
    };

    /// A policy protecting `port` for `owner`, resolved with the cgroup root
    /// given (none: as under `ip netns exec` or on a cgroup-v1-only host).
    fn resolved(
        port: u16,
        owner: &str,
        root: Option<&std::path::Path>,
    ) -> (Policy, ResolvedOwners) {
        let policy = Policy::parse(
            &format!("[[ports]]\nport = {port}\nowner = {owner:?}\n"),
            PolicySource::Embedded,
        )
        .unwrap();
        let docker = DockerFacts::new(DockerStatus::Unreachable {
            reason: "not asked in this test".into(),
        });
        let owners = owners::resolve(&policy, &docker, root);
        (policy, owners)
    }

    fn own_holder(holders: &[Holder], port: u16) -> &Holder {
        holders
            .iter()
            .find(|h| h.port == port && h.pid == Some(std::process::id()))
            .unwrap_or_else(|| panic!("this process holds port {port}: {holders:?}"))
    }

    #[test]
    fn without_a_cgroup_root_a_unit_owned_port_is_unknown_not_foreign() {
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let (policy, owners) = resolved(port, "unit:pg-absent-owner.service", None);
        let holders = holders(&policy, &owners);
        let h = own_holder(&holders, port);
        assert_eq!(h.ownership, Ownership::Unknown, "{h:?}");
        assert!(h.process.exe.is_some(), "the holder is still named: {h:?}");
        let blind =
            CgroupBlind::of(&policy, &owners).expect("no cgroup root: something is unknown");
        assert_eq!(blind.owner_kinds, ["unit", "cgroup"]);
        assert_eq!(
            blind.unresolved_owners,
            [format!("unit:pg-absent-owner.service tcp/{port}")]
        );
        assert!(
            blind.message.starts_with(
                "cgroup v2 not visible here: unit:/cgroup: owners and listener cgroups unknown"
            ),
            "{}",
            blind.message
        );
        assert!(blind.message.contains("unit:pg-absent-owner.service"));
    }

    #[test]
    fn without_a_cgroup_root_executables_still_decide() {
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let me = std::env::current_exe().unwrap();
        let (policy, owners) = resolved(port, &format!("exe:{}", me.display()), None);
        assert_eq!(
            own_holder(&holders(&policy, &owners), port).ownership,
            Ownership::Owner
        );
        // Owned by another executable only: this process is surely a stranger.
        let (policy, owners) = resolved(port, "exe:/bin/sh", None);
        assert_eq!(
            own_holder(&holders(&policy, &owners), port).ownership,
            Ownership::Stranger
        );
        let blind = CgroupBlind::of(&policy, &owners).unwrap();
        assert!(blind.unresolved_owners.is_empty(), "{blind:?}");
    }

    #[test]
    fn with_a_cgroup_root_nothing_is_blind_and_strangers_are_strangers() {
        let Ok(root) = cgroup::unified_root() else {
            panic!(
                "this test needs the cgroup v2 hierarchy mounted (as every host portguard runs on)"
            );
        };
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let (policy, owners) = resolved(port, "unit:pg-absent-owner.service", Some(&root));
        assert_eq!(CgroupBlind::of(&policy, &owners), None);
        assert_eq!(
            own_holder(&holders(&policy, &owners), port).ownership,
            Ownership::Stranger
        );
    }
}
