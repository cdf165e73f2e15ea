//! `portguard run`: the agent.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use super::PolicyArgs;
use crate::{
    ebpf::{BindGuard, BindPolicy, BindRecord, KernelLogger, btf, read_bind_event},
    owners::Owners,
    policy::{Mode, Policy, PolicySource},
    sys::{
        cgroup::{self, CgroupPaths},
        netns,
    },
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

/// The policy file plus the command line's overrides.
fn load_policy(args: &RunArgs) -> anyhow::Result<(Policy, PolicySource)> {
    let (mut policy, source) = Policy::load(args.policy.config.as_deref())?;
    if let Some(mode) = args.mode {
        policy.mode = mode;
        for port in &mut policy.ports {
            port.mode = None;
        }
    }
    Ok((policy, source))
}

/// Applies new map contents, saying once why a port is observed instead of enforced.
fn apply(guard: &mut BindGuard, old: Option<&BindPolicy>, new: &BindPolicy) -> anyhow::Result<()> {
    guard.apply(new)?;
    for w in &new.warnings {
        if old.is_none_or(|o| !o.warnings.contains(w)) {
            warn!("{w}");
        }
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (mut policy, source) = load_policy(&args)?;
    let root = cgroup::unified_root()?;
    let target = args.cgroup.clone().unwrap_or_else(|| root.clone());
    cgroup::check_inside(&root, &target)?;
    let host_cookie =
        netns::current_netns_cookie().context("reading the host network namespace cookie")?;
    let exe_offsets = btf::running_kernel_exe_offsets().unwrap_or_else(|e| {
        warn!("executable owners cannot be recognised on this kernel: {e}");
        Default::default()
    });

    // Owners first: the guard must know them before it denies anyone.
    let (mut owners, mut owners_task) = Owners::new(policy.clone()).spawn().await;
    let (mut guard, logger) = BindGuard::load_and_attach(&target)?;
    let mut maps = BindPolicy::from_owners(&policy, &owners.borrow_and_update());
    apply(&mut guard, None, &maps)?;
    guard.arm(host_cookie, exe_offsets)?;
    let events = guard.take_events()?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(read_binds(
        events,
        host_cookie,
        CgroupPaths::new(root.clone()),
    ));
    if let Some(logger) = logger {
        tasks.spawn(read_kernel_log(logger));
    }

    info!(
        policy = %source,
        mode = %policy.mode,
        cgroup = %target.display(),
        ports = maps.ports.len(),
        "agent ready: guarding binds"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut drops_seen = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                // A bad policy is rejected with its error; the old one stays in force.
                match load_policy(&args) {
                    Ok((new, source)) => {
                        owners_task.abort();
                        (owners, owners_task) = Owners::new(new.clone()).spawn().await;
                        let new_maps = BindPolicy::from_owners(&new, &owners.borrow_and_update());
                        apply(&mut guard, Some(&maps), &new_maps)?;
                        info!(policy = %source, mode = %new.mode, ports = new_maps.ports.len(), "policy reloaded");
                        (policy, maps) = (new, new_maps);
                    }
                    Err(e) => error!("policy reload rejected, keeping the current policy: {e:#}"),
                }
            }
            changed = owners.changed() => {
                // Owners come and go (a container restarts, a unit gets a new cgroup, a
                // binary is replaced); the kernel follows without a restart.
                changed.context("the owners task stopped")?;
                let fresh = BindPolicy::from_owners(&policy, &owners.borrow_and_update());
                if fresh != maps {
                    apply(&mut guard, Some(&maps), &fresh)?;
                    info!(
                        owner_cgroups = fresh.owner_cgroups.len(),
                        owner_exes = fresh.owner_exes.len(),
                        "owners changed: bind guard updated"
                    );
                    maps = fresh;
                }
            }
            _ = tick.tick() => {
                // A full ring buffer is never silent.
                let dropped = guard.counters()?.ringbuf_dropped;
                if dropped > drops_seen {
                    warn!(dropped = dropped - drops_seen, total = dropped, "bind events lost: ring buffer full");
                    drops_seen = dropped;
                }
            }
            Some(done) = tasks.join_next() => {
                done.context("a reader task panicked")??;
                anyhow::bail!("a reader task stopped unexpectedly");
            }
        }
    }
    tasks.abort_all();
    owners_task.abort();
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

async fn read_binds(
    events: RingBuf<MapData>,
    host_cookie: u64,
    mut cgroups: CgroupPaths,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open until dropped with the AsyncFd.
    let mut fd = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the bind ring buffer")?;
    // Routine events are submitted without a wakeup (denials and a filling
    // buffer wake us): drain on readiness and on a short timer.
    let mut drain = tokio::time::interval(BIND_DRAIN_INTERVAL);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut ready = ready?;
                drain_binds(ready.get_inner_mut(), host_cookie, &mut cgroups);
                ready.clear_ready();
            }
            _ = drain.tick() => drain_binds(fd.get_mut(), host_cookie, &mut cgroups),
        }
    }
}

/// Longest an observed (not denied) bind waits in the ring buffer.
const BIND_DRAIN_INTERVAL: Duration = Duration::from_millis(50);

fn drain_binds(ring: &mut RingBuf<MapData>, host_cookie: u64, cgroups: &mut CgroupPaths) {
    while let Some(item) = ring.next() {
        let Some(raw) = read_bind_event(&item) else {
            warn!(len = item.len(), "short bind event ignored");
            continue;
        };
        drop(item);
        log_bind(&BindRecord::new(&raw, host_cookie, cgroups));
    }
}

fn log_bind(rec: &BindRecord) {
    info!(
        target: "portguard::bind",
        pid = rec.pid,
        tgid = rec.tgid,
        uid = rec.uid,
        comm = %rec.comm,
        exe = rec.exe.as_ref().map(|p| p.display().to_string()),
        exe_ino = rec.exe_ino,
        exe_dev = rec.exe_dev,
        cmdline = rec.cmdline,
        cgroup = rec.cgroup,
        unit = rec.workload.unit,
        container_id = rec.workload.container_id,
        pod_uid = rec.workload.pod_uid,
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

async fn read_kernel_log(logger: KernelLogger) -> anyhow::Result<()> {
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
