//! The agent: a supervisor of layers that feed one loop, which owns the state,
//! decides and records.
//!
//! - [`supervisor`]: every layer (bind source, owners, probes, metrics
//!   endpoint, Kubernetes, rule guard) runs its tasks under a child of one
//!   cancellation token on its own task tracker, and stops one way: cancel,
//!   then wait. A task that ends on its own stops the agent with an error.
//! - [`events`]: sources translate the world (signals, timers, owners changes,
//!   bind records, rule guard reports, probe checks) into one enum,
//!   [`AgentEvent`], sent through one channel.
//! - [`state`]: the agent's state, one method per kind of event; only it
//!   changes the kernel maps, and every change is audited.
//! - [`layers`]: the layers that follow the policy, replaced together on SIGHUP.

mod binds;
mod events;
mod kube;
mod layers;
mod state;
mod supervisor;

use std::{io, net::SocketAddr, path::PathBuf, time::Duration};

use tokio::sync::mpsc;

pub use self::events::{AgentEvent, Signal};
pub use self::supervisor::TaskFailure;
use self::{
    events::AGENT_EVENT_QUEUE,
    state::{Agent, Next},
};
use crate::{
    audit::AuditError,
    ebpf::GuardError,
    metrics::MetricsError,
    policy::{Mode, Policy, PolicyError, PolicySource},
    probes::ProbeError,
    sys::cgroup::CgroupError,
};

/// Everything `portguard run` was told.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub policy_file: Option<PathBuf>,
    pub mode: Option<Mode>,
    pub cgroup: Option<PathBuf>,
    pub audit_log: PathBuf,
    /// Whether audit records also go to the systemd journal.
    pub journal: crate::audit::journal::JournalMode,
    pub metrics_listen: Option<SocketAddr>,
    pub kubeconfig: Option<PathBuf>,
    /// This host's Kubernetes node name (k3s uses the hostname).
    pub node_name: Option<String>,
    /// Guard the nftables ruleset of `/run/netns/NAME` instead of this namespace (tests).
    pub netns: Option<String>,
    /// How often iptables-legacy tables are re-read while any is in use.
    pub legacy_poll: Duration,
    /// How often the agent looks whether iptables-legacy is in use, while not.
    pub legacy_check: Duration,
}

impl AgentConfig {
    /// The policy file plus the command line's overrides.
    fn load_policy(&self) -> Result<(Policy, PolicySource), PolicyError> {
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

/// Why the agent could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("connecting to $NOTIFY_SOCKET")]
    NotifySocket(#[source] io::Error),
    #[error("telling systemd")]
    Systemd(#[source] io::Error),
    #[error("opening the audit log {}", path.display())]
    OpenAudit {
        path: PathBuf,
        #[source]
        source: AuditError,
    },
    #[error("writing the audit log")]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("reading the host network namespace cookie")]
    NetnsCookie(#[source] io::Error),
    #[error("listening for signals")]
    Signals(#[source] io::Error),
    #[error("serving metrics on {listen}")]
    Metrics {
        listen: SocketAddr,
        #[source]
        source: MetricsError,
    },
    #[error(transparent)]
    BindGuard(#[from] GuardError),
    #[error(transparent)]
    Probes(#[from] ProbeError),
    #[error("{layer} layer: task {task}")]
    TaskEnded {
        layer: &'static str,
        task: &'static str,
        #[source]
        failure: TaskFailure,
    },
}

/// Runs the agent until SIGTERM or SIGINT: start every layer, handle one
/// event at a time, stop every layer.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let (events, mut inbox) = mpsc::channel(AGENT_EVENT_QUEUE);
    let mut agent = Agent::start(config, events).await?;
    let outcome = loop {
        // The agent holds a sender (its layers clone it): the inbox never closes.
        let Some(event) = inbox.recv().await else {
            unreachable!("the agent holds a sender");
        };
        match agent.handle(event).await {
            Ok(Next::Continue) => {}
            Ok(Next::Stop(signal)) => break Ok(signal),
            Err(e) => break Err(e),
        }
    };
    agent.stop(outcome, inbox).await
}
