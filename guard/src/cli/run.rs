//! `portguard run`: the agent.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use guard_common::OwnerCgroupKey;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::SignalKind,
};
use tracing::{info, warn};

use super::PolicyArgs;
use crate::{
    ebpf::{BindGuard, BindRecord, PortEntry, read_bind_event},
    policy::{Mode, OwnerSpec, Policy},
    sys::{cgroup, netns},
};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Override the policy's mode: `enforce` denies strangers, `observe` only reports.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Attach below this cgroup v2 directory instead of the hierarchy's root
    /// (guards only processes in that subtree; for tests and staged roll-outs).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
}

pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (mut policy, source) = Policy::load(args.policy.config.as_deref())?;
    if let Some(mode) = args.mode {
        policy.mode = mode;
        for port in &mut policy.ports {
            port.mode = None;
        }
    }
    let root = cgroup::unified_root()?;
    let target = args.cgroup.clone().unwrap_or_else(|| root.clone());
    cgroup::check_inside(&root, &target)?;
    let host_cookie =
        netns::current_netns_cookie().context("reading the host network namespace cookie")?;

    let (mut guard, logger) = BindGuard::load_and_attach(&target)?;
    let ports = port_entries(&policy);
    guard.set_ports(ports.iter().copied())?;
    guard.set_owner_cgroups(owner_cgroups(&policy, &root))?;
    guard.arm(host_cookie)?;
    let events = guard.take_events()?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(read_binds(events, host_cookie));
    if let Some(logger) = logger {
        tasks.spawn(read_kernel_log(logger));
    }

    info!(
        policy = %source,
        mode = %policy.mode,
        cgroup = %target.display(),
        ports = ports.len(),
        "agent ready: guarding binds"
    );

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut drops_seen = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(done) = tasks.join_next() => {
                done.context("a reader task panicked")??;
                anyhow::bail!("a reader task stopped unexpectedly");
            }
            _ = tick.tick() => {
                // A full ring buffer is never silent.
                let dropped = guard.counters()?.ringbuf_dropped;
                if dropped > drops_seen {
                    warn!(dropped = dropped - drops_seen, total = dropped, "bind events lost: ring buffer full");
                    drops_seen = dropped;
                }
            }
        }
    }
    tasks.abort_all();
    let counters = guard.counters()?;
    drop(guard);
    info!(
        host_binds = counters.host_binds,
        denied = counters.denied,
        other_netns_binds = counters.other_netns_binds,
        dropped = counters.ringbuf_dropped,
        "agent stopped: programs detached"
    );
    Ok(ExitCode::SUCCESS)
}

/// What the kernel programs enforce. Owners are not resolved yet (the owners
/// layer does that), so a port is enforced only when its owners are all kinds
/// the kernel can check by cgroup; others are observed, and we say so.
fn port_entries(policy: &Policy) -> Vec<PortEntry> {
    let mut out = Vec::new();
    for entry in &policy.ports {
        let mut enforce = policy.mode_of(entry) == Mode::Enforce;
        if enforce
            && entry
                .owner
                .iter()
                .any(|o| !matches!(o, OwnerSpec::Cgroup(_)))
        {
            warn!(
                port = %entry.port,
                proto = %entry.proto,
                "owners of this port cannot be resolved yet: observing it instead of enforcing"
            );
            enforce = false;
        }
        for port in entry.port.iter() {
            out.push(PortEntry {
                port,
                proto: entry.proto.ip_proto(),
                enforce,
            });
        }
    }
    out
}

/// Owner cgroups named directly in the policy (`cgroup:/path`), by cgroup id.
fn owner_cgroups(policy: &Policy, root: &std::path::Path) -> Vec<OwnerCgroupKey> {
    let mut out = Vec::new();
    for entry in &policy.ports {
        for owner in &entry.owner {
            let OwnerSpec::Cgroup(path) = owner else {
                continue;
            };
            let dir = root.join(path.strip_prefix("/").unwrap_or(path));
            match cgroup::cgroup_id(&dir) {
                Ok(id) => out.extend(
                    entry
                        .port
                        .iter()
                        .map(|port| OwnerCgroupKey::new(id, port, entry.proto.ip_proto())),
                ),
                Err(e) => {
                    warn!(owner = %owner, "owner cgroup not found, nobody there may bind: {e}")
                }
            }
        }
    }
    out
}

async fn read_binds(events: RingBuf<MapData>, host_cookie: u64) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open until dropped with the AsyncFd.
    let mut fd = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the bind ring buffer")?;
    loop {
        let mut ready = fd.readable_mut().await?;
        let ring = ready.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(raw) = read_bind_event(&item) else {
                warn!(len = item.len(), "short bind event ignored");
                continue;
            };
            drop(item);
            let rec = BindRecord::new(&raw, host_cookie);
            info!(
                target: "portguard::bind",
                pid = rec.pid,
                tgid = rec.tgid,
                uid = rec.uid,
                comm = %rec.comm,
                exe = rec.process.exe.as_ref().map(|p| p.display().to_string()),
                cgroup = rec.process.cgroup,
                cgroup_id = rec.cgroup_id,
                netns_cookie = rec.netns_cookie,
                host_netns = rec.host_netns,
                family = rec.family,
                addr = %rec.addr,
                port = rec.port,
                proto = rec.proto,
                verdict = rec.verdict,
                "bind to protected port"
            );
        }
        ready.clear_ready();
    }
}

async fn read_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> anyhow::Result<()> {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open until dropped.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the kernel log ring buffer")?;
    loop {
        let mut ready = fd.readable_mut().await?;
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
