//! The agent: sources feed one loop that owns the state, decides and records.
//!
//! Sources (bind ring buffer, owners model, probes, signals) translate the
//! world into events; this loop alone changes the kernel maps, and every
//! change is audited.

mod binds;
pub mod kube;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use self::binds::{BindSource, read_kernel_log};
use crate::{
    audit::{AuditEvent, AuditHandle, AuditLog, Rotation},
    ebpf::{BindGuard, BindPolicy, btf},
    k8s::NodeIdentity,
    metrics::{Health, Metrics, MetricsEndpoint},
    owners::{Found, Owners, ResolvedOwners},
    policy::{Mode, Policy, PolicySource},
    probes::{Probe, ProbeReport, spawn_probes},
    rules::{GuardReport, RuleGuard},
    service::{Notifier, watchdog_interval},
    sys::{
        cgroup::{self, CgroupPaths},
        netns,
    },
};

/// Everything `portguard run` was told.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub policy_file: Option<PathBuf>,
    pub mode: Option<Mode>,
    pub cgroup: Option<PathBuf>,
    pub audit_log: PathBuf,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub kubeconfig: Option<PathBuf>,
    /// This host's Kubernetes node name (k3s uses the hostname).
    pub node_name: Option<String>,
    /// Guard the nftables ruleset of `/run/netns/NAME` instead of this namespace (tests).
    pub netns: Option<String>,
    /// How often iptables-legacy tables are re-read while any is in use.
    pub legacy_poll: Duration,
}

impl AgentConfig {
    /// The policy file plus the command line's overrides.
    fn load_policy(&self) -> anyhow::Result<(Policy, PolicySource)> {
        let (mut policy, source) = Policy::load(self.policy_file.as_deref())?;
        if let Some(listen) = self.metrics_listen {
            policy.metrics.listen = listen;
        }
        if let Some(mode) = self.mode {
            policy.mode = mode;
            for port in &mut policy.ports {
                port.mode = None;
            }
        }
        Ok((policy, source))
    }
}

/// How long after a removal a failing probe on that port is linked to it.
const PROBE_LINK_WINDOW: Duration = Duration::from_secs(120);

/// Bounded queue from the bind source to the audit writer.
const BIND_AUDIT_QUEUE: usize = 8192;

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let (mut policy, source) = config.load_policy()?;
    let notifier = Notifier::from_env().context("connecting to $NOTIFY_SOCKET")?;
    let audit = open_audit(&config)?;
    audit
        .record(AuditEvent::AgentStarted {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            mode: policy.mode.to_string(),
            policy: source.to_string(),
        })
        .await?;

    let root = cgroup::unified_root()?;
    let target = config.cgroup.clone().unwrap_or_else(|| root.clone());
    cgroup::check_inside(&root, &target)?;
    let host_cookie =
        netns::current_netns_cookie().context("reading the host network namespace cookie")?;
    let exe_offsets = btf::running_kernel_exe_offsets().unwrap_or_else(|e| {
        warn!("executable owners cannot be recognised on this kernel: {e}");
        Default::default()
    });

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let mut tasks = tokio::task::JoinSet::new();
    if policy.metrics.enabled {
        let endpoint = MetricsEndpoint::bind(policy.metrics.listen)
            .await
            .with_context(|| format!("serving metrics on {}", policy.metrics.listen))?;
        info!(listen = %endpoint.local_addr(), "metrics served");
        let (m, h) = (metrics.clone(), health.clone());
        tasks.spawn(async move {
            endpoint.serve(m, h).await;
            Ok(())
        });
    }

    // Owners first: the guard must know them before it denies anyone.
    let (mut owners, mut owners_task) = Owners::new(policy.clone()).spawn().await;
    let (mut guard, logger) = BindGuard::load_and_attach(&target)?;
    let mut maps = BindPolicy::from_owners(&policy, &owners.borrow_and_update());
    apply(&mut guard, None, &maps)?;
    report_owners(&metrics, &owners.borrow());
    guard.arm(host_cookie, exe_offsets)?;

    let (audit_tx, mut audit_rx) = mpsc::channel(BIND_AUDIT_QUEUE);
    let binds = BindSource {
        host_cookie,
        cgroups: CgroupPaths::new(root.clone()),
        metrics: metrics.clone(),
        audit: audit_tx,
    };
    tasks.spawn(binds.run(guard.take_events()?));
    if let Some(logger) = logger {
        tasks.spawn(read_kernel_log(logger));
    }
    let node = NodeIdentity {
        name: config.node_name.clone().unwrap_or_else(hostname),
        addresses: crate::nft::local::local_addresses()
            .map(|a| a.into_iter().map(|a| a.addr).collect())
            .unwrap_or_default(),
    };
    let kube = kube::start(config.kubeconfig.as_deref(), &policy, node, audit.clone()).await;
    let (guard_tx, mut guard_rx) = mpsc::channel::<GuardReport>(RULE_GUARD_QUEUE);
    let mut rules = spawn_rule_guard(&config, &policy, &audit, &owners, &guard_tx, &kube);
    let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeReport>(64);
    let mut probes = spawn_probes(Probe::from_policy(&policy)?, probe_tx.clone());

    // Ready (systemd, /readyz) once the first ruleset inspection is done too.
    let mut inspected_once = false;
    // The last foreign rule removed per port: a probe failing meanwhile links to it.
    let mut last_removal: HashMap<u16, (String, u64, Instant)> = HashMap::new();
    info!(
        policy = %source,
        mode = %policy.mode,
        cgroup = %target.display(),
        ports = maps.ports.len(),
        audit_log = %config.audit_log.display(),
        "agent ready: guarding binds"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut drops_seen = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut watchdog = tokio::time::interval(watchdog_interval().unwrap_or(Duration::MAX / 4));
    let reason = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => {
                notifier.reloading()?;
                // A bad policy is rejected with its error; the old one stays in force.
                match config.load_policy() {
                    Ok((new, source)) => {
                        owners_task.abort();
                        (owners, owners_task) = Owners::new(new.clone()).spawn().await;
                        rules.stop().await;
                        rules = spawn_rule_guard(&config, &new, &audit, &owners, &guard_tx, &kube);
                        let new_maps = BindPolicy::from_owners(&new, &owners.borrow_and_update());
                        apply(&mut guard, Some(&maps), &new_maps)?;
                        probes.abort_all();
                        probes = spawn_probes(Probe::from_policy(&new)?, probe_tx.clone());
                        audit.record(AuditEvent::PolicyReloaded {
                            policy: source.to_string(),
                            ports: new_maps.ports.len(),
                        }).await?;
                        info!(policy = %source, mode = %new.mode, ports = new_maps.ports.len(), "policy reloaded");
                        (policy, maps) = (new, new_maps);
                    }
                    Err(e) => {
                        audit.record(AuditEvent::PolicyRejected {
                            policy: config.policy_file.as_ref().map_or("<built-in>".into(), |p| p.display().to_string()),
                            error: format!("{e:#}"),
                        }).await?;
                        error!("policy reload rejected, keeping the current policy: {e:#}");
                    }
                }
                notifier.reloaded(&format!("guarding {} ports", maps.ports.len()))?;
            }
            changed = owners.changed() => {
                // Owners come and go (a container restarts, a unit gets a new cgroup, a
                // binary is replaced); the kernel follows without a restart.
                changed.context("the owners task stopped")?;
                let model = owners.borrow_and_update().clone();
                report_owners(&metrics, &model);
                let fresh = BindPolicy::from_owners(&policy, &model);
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
            Some(event) = audit_rx.recv() => {
                audit.record(event).await?;
                metrics.audit_record_written();
            }
            Some(report) = guard_rx.recv() => {
                match &report {
                    GuardReport::Inspected { .. } if !inspected_once => {
                        inspected_once = true;
                        health.set_ready(true);
                        notifier.ready(&format!("guarding {} ports", maps.ports.len()))?;
                        info!("first ruleset inspection done: ready");
                    }
                    GuardReport::Removed { port, id, seq, .. } => {
                        last_removal.insert(*port, (id.clone(), *seq, Instant::now()));
                    }
                    _ => {}
                }
                report_rules(&metrics, report);
            }
            done = &mut rules.task => {
                done.context("the rule guard panicked")?.context("the rule guard stopped")?;
                anyhow::bail!("the rule guard stopped unexpectedly");
            }
            Some(report) = probe_rx.recv() => {
                metrics.probe_status(report.port, &report.url, report.result.is_ok());
                // A probe failing soon after a hijack on its port is most likely its victim.
                let foreign = last_removal
                    .get(&report.port)
                    .filter(|(_, _, at)| at.elapsed() < PROBE_LINK_WINDOW)
                    .map(|(id, seq, _)| (id.clone(), *seq));
                if let Some(event) = report.audit_event(foreign) {
                    warn!(port = report.port, url = %report.url, "probe {}", event.kind());
                    audit.record(event).await?;
                }
            }
            _ = tick.tick() => {
                // A full ring buffer is never silent.
                let dropped = guard.counters()?.ringbuf_dropped;
                metrics.ringbuf_drops_total(dropped);
                if dropped > drops_seen {
                    warn!(dropped = dropped - drops_seen, total = dropped, "bind events lost: ring buffer full");
                    drops_seen = dropped;
                }
            }
            _ = watchdog.tick() => notifier.watchdog()?,
            Some(done) = tasks.join_next() => {
                done.context("an agent task panicked")??;
                anyhow::bail!("an agent task stopped unexpectedly");
            }
        }
    };

    notifier.stopping()?;
    health.set_ready(false);
    // The pins go with the agent (every teardown error is reported).
    rules.stop().await;
    tasks.abort_all();
    probes.abort_all();
    owners_task.abort();
    // What the bind source had queued is still written.
    while let Ok(event) = audit_rx.try_recv() {
        audit.record(event).await?;
    }
    let counters = guard.counters()?;
    drop(guard);
    audit
        .record(AuditEvent::AgentStopped {
            reason: reason.into(),
        })
        .await?;
    audit.flush()?;
    info!(
        host_binds = counters.host_binds,
        denied = counters.denied,
        other_netns_binds = counters.other_netns_binds,
        dropped = counters.ringbuf_dropped,
        "agent stopped: programs detached"
    );
    Ok(())
}

/// Bounded queue from the rule guard to this loop (reports only; never blocks the guard).
const RULE_GUARD_QUEUE: usize = 1024;
/// How long the rule guard may take to remove its pins on stop.
const RULE_GUARD_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The running rule guard: its task and the switch that stops it.
struct RuleGuardTask {
    task: tokio::task::JoinHandle<Result<(), crate::rules::GuardError>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl RuleGuardTask {
    /// Stops it and waits for its teardown (pins removed), logging what failed.
    async fn stop(self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(RULE_GUARD_STOP_TIMEOUT, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => error!("rule guard: {e}"),
            Ok(Err(e)) if e.is_cancelled() => {}
            Ok(Err(e)) => error!("rule guard panicked: {e}"),
            Err(_) => error!("rule guard did not stop within {RULE_GUARD_STOP_TIMEOUT:?}"),
        }
    }
}

fn spawn_rule_guard(
    config: &AgentConfig,
    policy: &Policy,
    audit: &AuditHandle,
    owners: &tokio::sync::watch::Receiver<Arc<ResolvedOwners>>,
    reports: &mpsc::Sender<GuardReport>,
    kube: &kube::KubeLayer,
) -> RuleGuardTask {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let guard = RuleGuard {
        netns: config.netns.clone(),
        policy: policy.clone(),
        audit: audit.clone(),
        owners: owners.clone(),
        reports: reports.clone(),
        legacy_poll: config.legacy_poll,
        // Removals name the pod and Service behind their target when the cluster knows it.
        cluster: Some(kube.view.clone()),
    };
    RuleGuardTask {
        task: tokio::spawn(guard.run_netlink(stop_rx)),
        stop,
    }
}

fn report_rules(metrics: &Metrics, report: GuardReport) {
    match report {
        GuardReport::Removed {
            port,
            source,
            latency,
            ..
        } => {
            metrics.hijack_detected(port, &source);
            metrics.hijack_removed(port, &source, latency.unwrap_or_default());
        }
        GuardReport::Observed { finding, .. } => {
            metrics.hijack_detected(finding.port, &finding.source);
        }
        GuardReport::Inspected { took, .. } => metrics.ruleset_inspected(took),
        GuardReport::PinSynced { .. } | GuardReport::PinOvertaken { .. } => {}
    }
}

fn open_audit(config: &AgentConfig) -> anyhow::Result<AuditHandle> {
    let log = AuditLog::open(&config.audit_log, Rotation::default())
        .with_context(|| format!("opening the audit log {}", config.audit_log.display()))?;
    if let Some(torn) = log.torn_tail() {
        warn!(
            ?torn,
            "the audit log ended in a torn line (a crash mid-write): moved aside"
        );
    }
    Ok(AuditHandle::new(log))
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn report_owners(metrics: &Metrics, model: &ResolvedOwners) {
    for entry in &model.ports {
        let present = entry.owners.iter().any(|o| match &o.found {
            Found::Docker { containers, .. } => containers.iter().any(|c| c.running),
            Found::Cgroup(_) | Found::Exe { .. } => true,
            Found::DockerUnreachable { .. } | Found::Missing { .. } => false,
        });
        for port in entry.port.iter() {
            metrics.owner_present(port, entry.proto, present);
        }
    }
}
