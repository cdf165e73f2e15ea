//! `portguard listeners`: who holds each protected port right now, and whether
//! it is the owner. The incident's `netstat` check, done right (though a NAT
//! hijack holds no socket: `portguard check` finds those).

use std::process::ExitCode;

use serde::Serialize;

use super::PolicyArgs;
use crate::{
    ebpf::{BindPolicy, Ownership, ProcessIdentity},
    owners::{Owners, ResolvedOwners},
    policy::Policy,
    sys::{cgroup, process::ProcessInfo, sockets, workload::Workload},
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

/// Exit 0 when every protected port is held by its owner (or nobody), 1 when a
/// non-owner holds one, 2 on error.
pub fn main(args: ListenersArgs) -> anyhow::Result<ExitCode> {
    let (policy, _) = Policy::load(args.policy.config.as_deref())?;
    let owners = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(Owners::new(policy.clone()).resolve_once());
    let holders = holders(&policy, &owners)?;
    if args.json {
        println!("{}", serde_json::json!({ "listeners": holders }));
    } else {
        print_table(&holders);
    }
    let foreign = holders.iter().any(|h| h.ownership == Ownership::Stranger);
    Ok(if foreign {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Every socket on a protected port in this network namespace, with its holder
/// and whether the holder owns the port.
pub fn holders(policy: &Policy, owners: &ResolvedOwners) -> anyhow::Result<Vec<Holder>> {
    let root = cgroup::unified_root()?;
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
                .map(|p| (ProcessInfo::read(p), ProcessIdentity::of(p, &root)))
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
                ownership: maps.ownership(l.port, l.proto.ip_proto(), &identity),
                process,
                workload,
            });
        }
    }
    holders.sort_by(|a, b| (a.port, &a.proto, a.pid).cmp(&(b.port, &b.proto, b.pid)));
    Ok(holders)
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
