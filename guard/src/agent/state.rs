//! The agent's state: the one owner of the bind guard's maps, the policy in
//! force and what the other layers reported; one method per kind of event.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    AgentConfig, AgentError,
    binds::{BindSource, read_kernel_log},
    events::{self, AgentEvent, Signal, Signals, TickGate},
    kube,
    layers::{self, LayerContext, PolicyLayers},
    supervisor::{Layer, TaskFailure},
};
use crate::{
    audit::{AuditEvent, AuditHandle, AuditLog, BindAggregator, Rotation, journal::JournalExport},
    ebpf::{BindGuard, BindPolicy, btf},
    k8s::NodeIdentity,
    logging::ErrorChain,
    metrics::{Health, Metrics, MetricsEndpoint},
    owners::{Found, ResolvedOwners},
    policy::Policy,
    probes::{HealthProbe, ProbeReport},
    rules::GuardReport,
    service::{Notifier, watchdog_interval},
    sys::{
        cgroup::{self, CgroupPaths},
        netns,
    },
};

/// How long after a removal a failing probe on that port is linked to it.
const PROBE_LINK_WINDOW: Duration = Duration::from_secs(120);

/// What the loop does after an event.
pub enum Next {
    Continue,
    Stop(Signal),
}

pub struct Agent {
    ctx: LayerContext,
    policy: Policy,
    notifier: Notifier,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The kernel side: its maps change here only.
    guard: BindGuard,
    maps: BindPolicy,
    /// Signals, timers, metrics endpoint, bind source: never restarted.
    base: Layer,
    /// Owners, Kubernetes, rule guard, probes: restarted on SIGHUP.
    layers: PolicyLayers,
    /// Ready (systemd, /readyz) once the first ruleset inspection is done too.
    inspected_once: bool,
    /// The last foreign rule removed per port: a probe failing meanwhile links to it.
    last_removal: HashMap<u16, (String, u64, Instant)>,
    drops_seen: u64,
    /// Bind records: the first of each kind per window, then one summary
    /// (admitted by the bind source, summaries written here).
    binds: Arc<std::sync::Mutex<BindAggregator>>,
    /// Closed after a tick that left nothing pending (see [`TickGate`]).
    ticks: Arc<TickGate>,
    /// The agent's own records that could not be written (the disk full…):
    /// counted and warned about, never fatal (the bind guard needs no disk).
    records_unwritten: u64,
}

impl Agent {
    /// Starts every layer (owners first: the guard must know them before it
    /// denies anyone) and says "agent ready".
    pub async fn start(
        config: AgentConfig,
        events: mpsc::Sender<AgentEvent>,
    ) -> Result<Self, AgentError> {
        let (policy, source) = config.load_policy()?;
        let notifier = Notifier::from_env().map_err(AgentError::NotifySocket)?;
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
        // Loaded and attached first, unarmed (every bind passes until `arm`):
        // the loader parses the kernel's whole BTF (aya's `EbpfLoader::new`),
        // the agent's largest allocation, and here it happens before the
        // layers hold anything, which keeps the peak memory low.
        let (mut guard, logger) = BindGuard::load_and_attach(&target)?;
        let host_cookie = netns::current_netns_cookie().map_err(AgentError::NetnsCookie)?;
        let (offsets, btf_errors) = btf::running_kernel_offsets();
        for e in &btf_errors {
            warn!(event = "kernel_offsets_unknown", error = %ErrorChain(e), "kernel struct offsets unknown: executable owners, or an owner container binding before its new cgroup is learned, are not recognised");
        }
        let signals = Signals::register().map_err(AgentError::Signals)?;
        let node = NodeIdentity {
            name: config.node_name.clone().unwrap_or_else(hostname),
            addresses: crate::nft::local::local_addresses()
                .map(|a| a.into_iter().map(|a| a.addr).collect())
                .unwrap_or_default(),
        };
        let ctx = LayerContext {
            root: CancellationToken::new(),
            events,
            config,
            audit,
            node,
        };

        let base = ctx.layer("base");
        base.spawn("signals", signals.run(ctx.events.clone()));
        let ticks = Arc::new(TickGate::default());
        base.spawn(
            "timers",
            events::timers(ctx.events.clone(), watchdog_interval(), ticks.clone()),
        );
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        if policy.metrics.enabled {
            let listen = policy.metrics.listen;
            let endpoint = MetricsEndpoint::bind(listen)
                .await
                .map_err(|source| AgentError::Metrics { listen, source })?;
            info!(event = "metrics_served", listen = %endpoint.local_addr(), "metrics served");
            let (m, h) = (metrics.clone(), health.clone());
            base.spawn("metrics", async move {
                endpoint.serve(m, h).await;
                Ok::<_, std::convert::Infallible>(())
            });
        }

        let owners = layers::start_owners(&ctx, &policy, 0).await;
        let maps = BindPolicy::from_owners(&policy, &owners.model.borrow());
        apply(&mut guard, None, &maps)?;
        report_owners(&metrics, &owners.model.borrow());
        guard.arm(host_cookie, offsets)?;
        let aggregator = Arc::new(std::sync::Mutex::new(BindAggregator::default()));
        let binds = BindSource {
            aggregator: aggregator.clone(),
            host_cookie,
            cgroups: CgroupPaths::new(root),
            metrics: metrics.clone(),
            events: ctx.events.clone(),
            ticks: ticks.clone(),
        };
        base.spawn("bind-source", binds.run(guard.take_events()?));
        if let Some(logger) = logger {
            base.spawn("kernel-log", read_kernel_log(logger));
        }
        let kube = kube::start(&ctx, &policy).await;
        let rules = layers::start_rules(&ctx, &policy, &owners.model, &kube.view);
        let probes = layers::start_probes(&ctx, HealthProbe::from_policy(&policy)?);
        info!(
            event = "agent_ready",
            policy = %source,
            mode = %policy.mode,
            cgroup = %target.display(),
            ports = maps.ports.len(),
            audit_log = %ctx.config.audit_log.display(),
            "agent ready: guarding binds"
        );
        Ok(Self {
            policy,
            notifier,
            metrics,
            health,
            guard,
            maps,
            base,
            layers: PolicyLayers {
                generation: 0,
                owners,
                kube,
                rules,
                probes,
            },
            inspected_once: false,
            last_removal: HashMap::new(),
            drops_seen: 0,
            binds: aggregator,
            ticks,
            records_unwritten: 0,
            ctx,
        })
    }

    /// One event, to the method for its kind.
    pub async fn handle(&mut self, event: AgentEvent) -> Result<Next, AgentError> {
        match event {
            AgentEvent::Signal(Signal::Hangup) => self.on_reload().await?,
            AgentEvent::Signal(stop) => return Ok(Next::Stop(stop)),
            AgentEvent::OwnersChanged { generation, model } => {
                self.on_owners_changed(generation, &model)?
            }
            AgentEvent::Bind(record) => self.on_bind(record).await?,
            AgentEvent::Guard(report) => self.on_guard_report(report)?,
            AgentEvent::Probe(report) => self.on_probe_report(report).await?,
            AgentEvent::Tick => self.on_tick().await?,
            AgentEvent::Watchdog => self.notifier.watchdog().map_err(AgentError::Systemd)?,
            AgentEvent::TaskEnded {
                layer,
                task,
                failure,
            } => return Err(on_task_ended(layer, task, failure)),
        }
        Ok(Next::Continue)
    }

    /// SIGHUP: a bad policy is rejected with its error and the old one stays in
    /// force; a good one replaces every layer that follows the policy.
    async fn on_reload(&mut self) -> Result<(), AgentError> {
        self.notifier.reloading().map_err(AgentError::Systemd)?;
        match self.ctx.config.load_policy() {
            Ok((new, source)) => {
                let probes = HealthProbe::from_policy(&new)?;
                self.layers.replace(&self.ctx, &new, probes).await;
                let new_maps =
                    BindPolicy::from_owners(&new, &self.layers.owners.model.borrow_and_update());
                apply(&mut self.guard, Some(&self.maps), &new_maps)?;
                self.write_record(AuditEvent::PolicyReloaded {
                    policy: source.to_string(),
                    ports: new_maps.ports.len(),
                })
                .await;
                info!(event = "policy_reloaded", policy = %source, mode = %new.mode, ports = new_maps.ports.len(), "policy reloaded");
                (self.policy, self.maps) = (new, new_maps);
            }
            Err(e) => {
                let policy = self
                    .ctx
                    .config
                    .policy_file
                    .as_ref()
                    .map_or("<built-in>".into(), |p| p.display().to_string());
                let error = ErrorChain(&e).to_string();
                self.write_record(AuditEvent::PolicyRejected {
                    policy,
                    error: error.clone(),
                })
                .await;
                error!(event = "policy_rejected", %error, "policy reload rejected, keeping the current policy");
            }
        }
        let status = format!("guarding {} ports", self.maps.ports.len());
        self.notifier.reloaded(&status).map_err(AgentError::Systemd)
    }

    /// Owners come and go (a container restarts, a unit gets a new cgroup, a
    /// binary is replaced); the kernel follows without a restart.
    fn on_owners_changed(
        &mut self,
        generation: u64,
        model: &ResolvedOwners,
    ) -> Result<(), AgentError> {
        if generation != self.layers.generation {
            return Ok(()); // a replaced policy's model, still queued
        }
        report_owners(&self.metrics, model);
        let fresh = BindPolicy::from_owners(&self.policy, model);
        if fresh != self.maps {
            apply(&mut self.guard, Some(&self.maps), &fresh)?;
            info!(
                event = "owners_changed",
                owner_cgroups = fresh.owner_cgroups.len(),
                owner_exes = fresh.owner_exes.len(),
                "owners changed: bind guard updated"
            );
            self.maps = fresh;
        }
        Ok(())
    }

    /// A stranger's bind, for the audit log.
    /// A bind record the bind source admitted (the first of its kind in a window).
    async fn on_bind(&mut self, record: AuditEvent) -> Result<(), AgentError> {
        self.write_record(record).await;
        Ok(())
    }

    /// The bind windows' summaries: those due by now, or all (`now` none).
    fn bind_summaries(&self, now: Option<Instant>) -> Vec<AuditEvent> {
        let mut agg = self
            .binds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match now {
            Some(now) => agg.due(now),
            None => agg.drain_all(),
        }
    }

    /// One record of the agent's own (binds, probes, reloads). A failure is
    /// counted and warned about (at powers of two), never fatal: the bind
    /// guard works without the disk, and the rule guard withholds what it
    /// cannot record on its own (see `GuardReport::AuditUnavailable`).
    async fn write_record(&mut self, record: AuditEvent) {
        let kind = record.kind();
        match self.ctx.audit.record(record).await {
            Ok(_) => self.metrics.audit_record_written(),
            Err(e) => {
                self.records_unwritten += 1;
                self.metrics.audit_write_failed();
                if self.records_unwritten.is_power_of_two() {
                    warn!(
                        event = "audit_record_failed",
                        kind,
                        error = %ErrorChain(&e),
                        unwritten = self.records_unwritten,
                        "an audit record could not be written (binds are still guarded)"
                    );
                }
            }
        }
    }

    fn on_guard_report(&mut self, report: GuardReport) -> Result<(), AgentError> {
        match &report {
            GuardReport::Inspected { .. } if !self.inspected_once => {
                self.inspected_once = true;
                self.health.set_ready(true);
                let status = format!("guarding {} ports", self.maps.ports.len());
                self.notifier.ready(&status).map_err(AgentError::Systemd)?;
                info!(
                    event = "agent_inspected",
                    "first ruleset inspection done: ready"
                );
            }
            GuardReport::Removed { port, id, seq, .. } => {
                self.last_removal
                    .insert(*port, (id.clone(), *seq, Instant::now()));
            }
            GuardReport::AuditUnavailable { error } => {
                self.metrics.audit_writable(error.is_none());
                self.health.set_degraded(error.as_ref().map(|e| {
                    format!(
                        "the audit log cannot be written ({e}): foreign rules are reported, \
                         not removed; binds are still guarded"
                    )
                }));
            }
            _ => {}
        }
        report_rules(&self.metrics, report);
        Ok(())
    }

    async fn on_probe_report(&mut self, report: ProbeReport) -> Result<(), AgentError> {
        self.metrics
            .probe_status(report.port, &report.url, report.result.is_ok());
        // A probe failing soon after a hijack on its port is most likely its victim.
        let foreign = self
            .last_removal
            .get(&report.port)
            .filter(|(_, _, at)| at.elapsed() < PROBE_LINK_WINDOW)
            .map(|(id, seq, _)| (id.clone(), *seq));
        if let Some(event) = report.audit_event(foreign) {
            warn!(event = "probe_changed", change = event.kind(), port = report.port, url = %report.url, "probe state changed");
            self.write_record(event).await;
        }
        Ok(())
    }

    /// A full ring buffer is never silent.
    async fn on_tick(&mut self) -> Result<(), AgentError> {
        for summary in self.bind_summaries(Some(Instant::now())) {
            self.write_record(summary).await;
        }
        let dropped = self.guard.counters()?.ringbuf_dropped;
        self.metrics.ringbuf_drops_total(dropped);
        if dropped > self.drops_seen {
            warn!(
                event = "bind_events_lost",
                dropped = dropped - self.drops_seen,
                total = dropped,
                "bind events lost: ring buffer full"
            );
            self.drops_seen = dropped;
        }
        // Nothing left for a tick: no window open. Decided under the
        // aggregator's lock, which the bind source holds to wake the gate.
        let agg = self
            .binds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.ticks.set_idle(agg.tracked() == 0);
        Ok(())
    }

    /// Stops every layer (the rule guard first: the pins go with the agent),
    /// writes what the bind source had queued, detaches the programs.
    pub async fn stop(
        mut self,
        outcome: Result<Signal, AgentError>,
        mut inbox: mpsc::Receiver<AgentEvent>,
    ) -> Result<(), AgentError> {
        let _ = self.notifier.stopping();
        self.health.set_ready(false);
        self.layers.stop().await;
        self.base.stop().await;
        self.ctx.root.cancel();
        let signal = outcome?;
        while let Ok(event) = inbox.try_recv() {
            if let AgentEvent::Bind(record) = event {
                self.write_record(record).await;
            }
        }
        for summary in self.bind_summaries(None) {
            self.write_record(summary).await;
        }
        let counters = self.guard.counters()?;
        drop(self.guard);
        self.ctx
            .audit
            .record(AuditEvent::AgentStopped {
                reason: signal.name().into(),
            })
            .await?;
        self.ctx.audit.flush()?;
        info!(
            event = "agent_stopped",
            host_binds = counters.host_binds,
            denied = counters.denied,
            other_netns_binds = counters.other_netns_binds,
            dropped = counters.ringbuf_dropped,
            "agent stopped: programs detached"
        );
        Ok(())
    }
}

fn on_task_ended(layer: &'static str, task: &'static str, failure: TaskFailure) -> AgentError {
    error!(event = "task_ended", layer, task, error = %ErrorChain(&failure), "an agent task stopped");
    AgentError::TaskEnded {
        layer,
        task,
        failure,
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
        GuardReport::Observed { finding, .. } if finding.is_shadow() => {
            metrics.owner_shadowed(finding.port, &finding.source);
        }
        GuardReport::Observed { finding, .. } => {
            metrics.hijack_detected(finding.port, &finding.source);
        }
        GuardReport::Inspected { took, .. } => metrics.ruleset_inspected(took),
        GuardReport::ForeignPinTables { tables, withheld } => {
            metrics.foreign_pin_tables(tables.len(), withheld.len());
        }
        GuardReport::PinSynced { .. }
        | GuardReport::Dismissed { .. }
        | GuardReport::PinOvertaken { .. }
        | GuardReport::AuditUnavailable { .. } => {}
    }
}

fn open_audit(config: &AgentConfig) -> Result<AuditHandle, AgentError> {
    let log = AuditLog::open(&config.audit_log, Rotation::default()).map_err(|source| {
        AgentError::OpenAudit {
            path: config.audit_log.clone(),
            source,
        }
    })?;
    let mut log = log;
    match JournalExport::start(config.journal) {
        Ok(Some(journal)) => {
            info!(
                event = "journal_export",
                "audit records also go to the systemd journal"
            );
            log.export_to_journal(journal);
        }
        Ok(None) => {}
        // The audit log is what must work; the journal is a copy.
        Err(error) => warn!(
            event = "journal_export_failed",
            %error,
            "the journal exporter could not start: audit records stay in the audit log only"
        ),
    }
    if let Some(torn) = log.torn_tail() {
        warn!(
            event = "audit_torn_tail",
            ?torn,
            "the audit log ended in a torn line (a crash mid-write): moved aside"
        );
    }
    Ok(AuditHandle::new(log))
}

/// Applies new map contents, saying once why a port is observed instead of enforced.
fn apply(
    guard: &mut BindGuard,
    old: Option<&BindPolicy>,
    new: &BindPolicy,
) -> Result<(), AgentError> {
    guard.apply(new)?;
    for w in &new.warnings {
        if old.is_none_or(|o| !o.warnings.contains(w)) {
            warn!(event = "port_observed", reason = %w, "port observed instead of enforced");
        }
    }
    for w in &new.slot_warnings {
        if old.is_none_or(|o| !o.slot_warnings.contains(w)) {
            warn!(event = "owner_slot_unavailable", reason = %w, "an owner's new cgroup is recognised only once learned");
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
