//! What the agent's loop reacts to: one enum, fed by the sources through one
//! channel. Sources translate (a signal, a tick, a changed owners model, a rule
//! guard report); the agent's state decides ([`super::state`]).

use std::{io, sync::Arc, time::Duration};

use tokio::{
    signal::unix::{Signal as SignalStream, SignalKind, signal},
    sync::{mpsc, watch},
};

use super::supervisor::TaskFailure;
use crate::{audit::AuditEvent, owners::ResolvedOwners, probes::ProbeReport, rules::GuardReport};

/// Queue from every source to the agent's loop. Bind records share it and are
/// the only ones dropped (counted) when it is full; the others wait.
pub const AGENT_EVENT_QUEUE: usize = 8192;

/// How often the ring buffer's drop counter is read.
const TICK: Duration = Duration::from_secs(1);

/// One thing that happened, for the agent's loop.
#[derive(Debug)]
pub enum AgentEvent {
    /// SIGTERM, SIGINT (stop) or SIGHUP (reload).
    Signal(Signal),
    /// The owners model of policy `generation` changed.
    OwnersChanged {
        generation: u64,
        model: Arc<ResolvedOwners>,
    },
    /// A bind the audit log records (a stranger's, denied or observed).
    Bind(AuditEvent),
    /// What the rule guard saw or did.
    Guard(GuardReport),
    /// One health probe check.
    Probe(ProbeReport),
    /// Time to read the kernel's counters.
    Tick,
    /// Time to tell systemd we are alive.
    Watchdog,
    /// A task ended while its layer was running: the agent stops with an error.
    TaskEnded {
        layer: &'static str,
        task: &'static str,
        failure: TaskFailure,
    },
}

impl From<ProbeReport> for AgentEvent {
    fn from(report: ProbeReport) -> Self {
        Self::Probe(report)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
    Hangup,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
            Self::Hangup => "SIGHUP",
        }
    }
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("polling the {what}")]
    Poll {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the owners model stopped")]
    OwnersStopped,
}

/// The signals the agent handles, registered before it says it is ready (an
/// unhandled SIGHUP would end the process).
pub struct Signals {
    term: SignalStream,
    int: SignalStream,
    hup: SignalStream,
}

impl Signals {
    pub fn register() -> io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Source: every signal, until the agent's loop is gone.
    pub async fn run(mut self, events: mpsc::Sender<AgentEvent>) -> Result<(), SourceError> {
        loop {
            let signal = tokio::select! {
                _ = self.term.recv() => Signal::Terminate,
                _ = self.int.recv() => Signal::Interrupt,
                _ = self.hup.recv() => Signal::Hangup,
            };
            if events.send(AgentEvent::Signal(signal)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// When the tick runs: only while there is something for it to do (bind
/// summaries whose window is open, a ring buffer that may have dropped
/// events). An idle agent has no periodic wakeup of its own.
#[derive(Debug, Default)]
pub struct TickGate {
    /// Set by the agent after a tick that left nothing pending.
    idle: std::sync::atomic::AtomicBool,
    /// Raised by the bind source when it read events.
    activity: tokio::sync::Notify,
}

impl TickGate {
    /// Something happened that a tick must follow up (the bind source read events).
    pub fn wake(&self) {
        self.idle.store(false, std::sync::atomic::Ordering::Release);
        self.activity.notify_one();
    }

    /// After a tick: whether anything is left for the next one.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, std::sync::atomic::Ordering::Release);
    }

    fn is_idle(&self) -> bool {
        self.idle.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Source: the tick (while the gate is open), and systemd's watchdog when it
/// asks for one.
pub async fn timers(
    events: mpsc::Sender<AgentEvent>,
    watchdog: Option<Duration>,
    gate: Arc<TickGate>,
) -> Result<(), SourceError> {
    let mut tick = tokio::time::interval(TICK);
    let mut watchdog = tokio::time::interval(watchdog.unwrap_or(Duration::MAX / 4));
    loop {
        let event = tokio::select! {
            _ = tick.tick(), if !gate.is_idle() => AgentEvent::Tick,
            // Woken while idle: tick again a TICK from now.
            () = gate.activity.notified(), if gate.is_idle() => {
                tick.reset();
                continue;
            }
            _ = watchdog.tick() => AgentEvent::Watchdog,
        };
        if events.send(event).await.is_err() {
            return Ok(());
        }
    }
}

/// Source: each new owners model, tagged with its policy's generation (a model
/// of a replaced policy still queued is then ignored).
pub async fn owners_changes(
    mut owners: watch::Receiver<Arc<ResolvedOwners>>,
    generation: u64,
    events: mpsc::Sender<AgentEvent>,
) -> Result<(), SourceError> {
    loop {
        owners
            .changed()
            .await
            .map_err(|_| SourceError::OwnersStopped)?;
        let model = owners.borrow_and_update().clone();
        let event = AgentEvent::OwnersChanged { generation, model };
        if events.send(event).await.is_err() {
            return Ok(());
        }
    }
}

/// Source: the rule guard's reports (its own queue never blocks it).
pub async fn guard_reports(
    mut reports: mpsc::Receiver<GuardReport>,
    events: mpsc::Sender<AgentEvent>,
) -> Result<(), SourceError> {
    while let Some(report) = reports.recv().await {
        if events.send(AgentEvent::Guard(report)).await.is_err() {
            break;
        }
    }
    Ok(())
}
