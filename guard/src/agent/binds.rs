//! Source: the bind guard's ring buffer. Translates kernel events into
//! [`BindRecord`]s, logs them (`event = "bind"`), counts them and hands
//! strangers' binds to the agent for the audit log; decides nothing.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use guard_common::ROUTINE_WAKEUP_GAP_NS;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tracing::{info, warn};

use super::events::{AgentEvent, SourceError, TickGate};
use crate::{
    audit::{AuditEvent, BindAggregator, BindAttempt},
    ebpf::{BindRecord, KernelLogger, read_bind_event},
    metrics::Metrics,
    policy::Proto,
    sys::cgroup::CgroupPaths,
};

pub struct BindSource {
    pub host_cookie: u64,
    pub cgroups: CgroupPaths,
    pub metrics: Arc<Metrics>,
    /// Strangers' binds for the audit log; full means the agent lags: counted, never silent.
    pub events: mpsc::Sender<AgentEvent>,
    /// Bind records are aggregated here, before the queue to the agent, so a
    /// flood costs the queue what it costs the log: a record per kind and
    /// window (the agent writes the windows' summaries).
    pub aggregator: Arc<Mutex<BindAggregator>>,
    /// Opened after events were read: the agent's tick then writes the
    /// windows' summaries and reads the drop counter, and stops when idle.
    pub ticks: Arc<TickGate>,
}

impl BindSource {
    pub async fn run(mut self, events: RingBuf<MapData>) -> Result<(), SourceError> {
        let poll = |source| SourceError::Poll {
            what: "bind ring buffer",
            source,
        };
        // SAFETY: the ring buffer owns its map fd and keeps it open until dropped with the AsyncFd.
        let mut fd = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| poll(e.into()))?;
        let mut audit_lost = 0u64;
        // The program wakes us for a denial, and for a routine event once per
        // gap at most: routine events within a gap of a wakeup come without
        // one, so we read again a gap later, and again while that finds any.
        // Idle: no timer at all.
        let gap = Duration::from_nanos(ROUTINE_WAKEUP_GAP_NS);
        let tail = tokio::time::sleep(gap);
        tokio::pin!(tail);
        let mut tailing = false;
        loop {
            tokio::select! {
                ready = fd.readable_mut() => {
                    let mut ready = ready.map_err(poll)?;
                    self.drain(ready.get_inner_mut(), &mut audit_lost);
                    ready.clear_ready();
                    tailing = true;
                    tail.as_mut().reset(tokio::time::Instant::now() + gap);
                }
                () = &mut tail, if tailing => {
                    tailing = self.drain(fd.get_mut(), &mut audit_lost) > 0;
                    tail.as_mut().reset(tokio::time::Instant::now() + gap);
                }
            }
        }
    }

    /// Reads every event waiting; how many.
    fn drain(&mut self, ring: &mut RingBuf<MapData>, audit_lost: &mut u64) -> usize {
        let mut read = 0usize;
        while let Some(item) = ring.next() {
            read += 1;
            let Some(raw) = read_bind_event(&item) else {
                warn!(len = item.len(), "short bind event ignored");
                continue;
            };
            drop(item);
            let rec = BindRecord::new(&raw, self.host_cookie, &mut self.cgroups);
            log_bind(&rec);
            let proto = if rec.proto == "udp" {
                Proto::Udp
            } else {
                Proto::Tcp
            };
            let event = match rec.verdict {
                "denied" => {
                    self.metrics.bind_denied(rec.port, proto);
                    AuditEvent::BindDenied(attempt(&rec, proto))
                }
                "observed" => AuditEvent::BindObserved(attempt(&rec, proto)),
                _ => continue,
            };
            let admitted = self
                .aggregator
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .admit(event, Instant::now());
            let Some(event) = admitted else {
                continue;
            };
            if self.events.try_send(AgentEvent::Bind(event)).is_err() {
                *audit_lost += 1;
                if audit_lost.is_power_of_two() {
                    warn!(
                        event = "bind_records_lost",
                        lost = *audit_lost,
                        "audit writer lags: bind records not written"
                    );
                }
            }
        }
        if read > 0 {
            // Under the aggregator's lock, as the agent decides idleness under
            // it: a wake is never overwritten by a stale "idle".
            let _agg = self
                .aggregator
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.ticks.wake();
        }
        read
    }
}

fn attempt(rec: &BindRecord, proto: Proto) -> BindAttempt {
    BindAttempt {
        port: rec.port,
        proto,
        address: Some(rec.addr),
        pid: rec.tgid,
        comm: rec.comm.clone(),
        exe: rec.exe.as_ref().map(|p| p.display().to_string()),
        cgroup: rec.cgroup.clone(),
        owner: None,
        repeats: 0,
    }
}

fn log_bind(rec: &BindRecord) {
    info!(
        target: "portguard::bind",
        event = "bind",
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

/// The kernel programs' own log lines (aya-log), forwarded into `tracing`.
pub async fn read_kernel_log(logger: KernelLogger) -> Result<(), SourceError> {
    let poll = |source| SourceError::Poll {
        what: "kernel log ring buffer",
        source,
    };
    // SAFETY: the logger owns its ring buffer's fd and keeps it open until dropped.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| poll(e.into()))?;
    loop {
        let mut ready = fd.readable_mut().await.map_err(poll)?;
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
