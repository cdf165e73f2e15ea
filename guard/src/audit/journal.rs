//! Audit records to the systemd journal, as structured entries: one stable
//! `MESSAGE_ID` per kind of record, the record's facts as `PORTGUARD_*`
//! fields, and the whole record as `PORTGUARD_RECORD` (JSON). Log shippers
//! that already read the journal (journald's forwarding, Fluent Bit, Vector,
//! promtail…) carry them with nothing to configure, and
//! `journalctl MESSAGE_ID=<id>` finds every record of one kind.
//!
//! Sent with the native protocol by `libsystemd` (the journald socket), from
//! a thread of its own fed through a bounded queue: the audit log never
//! waits for the journal. When the queue is full (journald stalled, a flood)
//! the entry is dropped and counted; the audit log keeps the record either way.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
};

use libsystemd::logging::{Priority, SD_JOURNAL_SOCK_PATH, journal_send};
use tracing::warn;

use super::record::{AuditEvent, AuditRecord};

/// Entries waiting for the journal at most.
const QUEUE: usize = 4096;
/// `SYSLOG_IDENTIFIER` of every entry.
pub const IDENTIFIER: &str = "portguard";

/// `MESSAGE_ID` of each kind of record. Never change one: dashboards and
/// `journalctl MESSAGE_ID=…` filters depend on them (documented in the README).
pub const MESSAGE_IDS: &[(&str, &str)] = &[
    ("agent_started", "d55eb10967f84954bfc9f35659fd20e3"),
    ("agent_stopped", "3d41bf7c45c94ccbbc6ef6f430354f18"),
    ("policy_reloaded", "dfc89bcbaa7c4dffa7bc1439535995d6"),
    ("policy_rejected", "977a9c41b7e842968225afed8e53889b"),
    ("bind_observed", "a484efa6c8f043f681baaed12e8597f3"),
    ("bind_denied", "2674790ced8e4d278270c5eb2ee547d5"),
    ("rule_found", "98646b7737da469ab5d42fd987eba412"),
    ("owner_shadowed", "d061ef6091cf4496a5a224e1fc494b96"),
    ("rule_removing", "c8fcd221eda8469f949728a228eb4b11"),
    ("rule_removed", "1a0750533ed74ca882c22bb2be8fdb94"),
    ("rule_restored", "d311333070624b24846c1a1db12a7e91"),
    ("pin_installed", "4571b18a44f74f8982e9e42eee97dedf"),
    ("pin_updated", "b379bf248d104f0482ae487c6ebfe4ea"),
    ("pin_removed", "c29889af356a497abd82c749ddbfcf7c"),
    ("k8s_object_removed", "0915c2b29fe14cfe9222575df17651c8"),
    ("k8s_object_created", "8f1dd73423bf48ddae90ec1e23020a6a"),
    ("k8s_object_restored", "cfdedb311a5e40c7a8825c29743f948d"),
    ("probe_failed", "307c9879de2a4254a853c553c003f7c0"),
    ("probe_recovered", "fd15cfa6af7c43bc8eebf21810e5de68"),
    ("audit_torn_tail", "e709f43638864ad5be15f8ebf019e4e5"),
    ("audit_resumed", "21a5565b24b44efba811da883850b426"),
];

/// The `MESSAGE_ID` of a kind of record.
pub fn message_id(kind: &str) -> Option<&'static str> {
    MESSAGE_IDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, id)| *id)
}

/// Whether audit records go to the journal (`portguard run --journal`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum JournalMode {
    /// When journald's socket exists as the agent starts.
    #[default]
    Auto,
    /// Always (entries are dropped and counted while journald is away).
    On,
    /// Never.
    Off,
}

/// The exporter: a queue and the thread that empties it into the journal.
#[derive(Debug)]
pub struct JournalExport {
    queue: SyncSender<AuditRecord>,
    dropped: Arc<AtomicU64>,
}

impl JournalExport {
    /// Starts the exporter the mode asks for (None: not exporting).
    pub fn start(mode: JournalMode) -> std::io::Result<Option<Self>> {
        let wanted = match mode {
            JournalMode::Off => false,
            JournalMode::On => true,
            JournalMode::Auto => Path::new(SD_JOURNAL_SOCK_PATH).exists(),
        };
        if !wanted {
            return Ok(None);
        }
        let (queue, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        std::thread::Builder::new()
            .name("journal-export".into())
            .spawn(move || export(&rx))?;
        Ok(Some(Self { queue, dropped }))
    }

    /// Queues a record for the journal; never waits.
    pub fn offer(&self, record: &AuditRecord) {
        match self.queue.try_send(record.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Entries dropped so far (queue full or the exporter gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The exporter thread: one entry per record, a failure said once until
/// the journal takes entries again.
fn export(rx: &Receiver<AuditRecord>) {
    let mut failing = false;
    for record in rx {
        match journal_send(
            priority(&record.event),
            &message(&record),
            fields(&record).into_iter(),
        ) {
            Ok(()) => failing = false,
            Err(error) => {
                if !failing {
                    warn!(
                        event = "journal_export_failed",
                        %error,
                        socket = SD_JOURNAL_SOCK_PATH,
                        "audit records could not be sent to the journal (the audit log keeps them)"
                    );
                }
                failing = true;
            }
        }
    }
}

/// How urgent a record is, as syslog priorities: a hijack or a denied bind
/// is a notice or a warning, the agent's own life is info, damage is an error.
pub fn priority(event: &AuditEvent) -> Priority {
    match event {
        AuditEvent::AuditTornTail { .. } | AuditEvent::PolicyRejected { .. } => Priority::Error,
        AuditEvent::BindDenied(_)
        | AuditEvent::RuleFound(_)
        | AuditEvent::OwnerShadowed(_)
        | AuditEvent::ProbeFailed { .. } => Priority::Warning,
        AuditEvent::RuleRemoved(_)
        | AuditEvent::RuleRemoving(_)
        | AuditEvent::RuleRestored { .. }
        | AuditEvent::K8sObjectRemoved(_)
        | AuditEvent::K8sObjectCreated(_)
        | AuditEvent::K8sObjectRestored { .. } => Priority::Notice,
        _ => Priority::Info,
    }
}

/// `MESSAGE`: one line for people.
pub fn message(record: &AuditRecord) -> String {
    let kind = record.event.kind().replace('_', " ");
    let mut m = format!("portguard: {kind}");
    if let Some((port, proto)) = record.event.port() {
        m += &format!(" on {proto}/{port}");
    }
    match &record.event {
        AuditEvent::RuleFound(r)
        | AuditEvent::OwnerShadowed(r)
        | AuditEvent::RuleRemoving(r)
        | AuditEvent::RuleRemoved(r) => {
            m += &format!(" ({})", r.source);
            if let Some(c) = &r.committer {
                m += &format!(", committed by {c}");
            }
        }
        AuditEvent::BindDenied(b) | AuditEvent::BindObserved(b) => {
            m += &format!(" by {} (pid {})", b.comm, b.pid);
        }
        AuditEvent::K8sObjectRemoved(o) | AuditEvent::K8sObjectCreated(o) => {
            m += &format!(
                ": {} {}/{}",
                o.object_kind,
                o.namespace.as_deref().unwrap_or("-"),
                o.name
            );
        }
        _ => {}
    }
    m + &format!(" (audit #{})", record.seq)
}

/// The structured fields of an entry.
pub fn fields(record: &AuditRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("SYSLOG_IDENTIFIER", IDENTIFIER.to_owned()),
        ("PORTGUARD_KIND", record.event.kind().to_owned()),
        ("PORTGUARD_SEQ", record.seq.to_string()),
        (
            "PORTGUARD_RECORD",
            serde_json::to_string(record).unwrap_or_default(),
        ),
    ];
    if let Some(id) = message_id(record.event.kind()) {
        f.push(("MESSAGE_ID", id.to_owned()));
    }
    if let Some((port, proto)) = record.event.port() {
        f.push(("PORTGUARD_PORT", port.to_string()));
        f.push(("PORTGUARD_PROTO", proto.to_string()));
    }
    match &record.event {
        AuditEvent::RuleFound(r)
        | AuditEvent::OwnerShadowed(r)
        | AuditEvent::RuleRemoving(r)
        | AuditEvent::RuleRemoved(r) => {
            f.push(("PORTGUARD_FINDING", r.finding.clone()));
            f.push(("PORTGUARD_SOURCE", r.source.clone()));
            if let Some(c) = &r.committer {
                f.push(("PORTGUARD_COMMITTER_PID", c.pid.to_string()));
                f.push(("PORTGUARD_COMMITTER_NAME", c.name.clone()));
                if let Some(exe) = &c.exe {
                    f.push(("PORTGUARD_COMMITTER_EXE", exe.clone()));
                }
                if let Some(unit) = &c.unit {
                    f.push(("PORTGUARD_COMMITTER_UNIT", unit.clone()));
                }
                if let Some(cgroup) = &c.cgroup {
                    f.push(("PORTGUARD_COMMITTER_CGROUP", cgroup.clone()));
                }
            }
        }
        AuditEvent::BindDenied(b) | AuditEvent::BindObserved(b) => {
            f.push(("PORTGUARD_PID", b.pid.to_string()));
            f.push(("PORTGUARD_COMM", b.comm.clone()));
            if let Some(exe) = &b.exe {
                f.push(("PORTGUARD_EXE", exe.clone()));
            }
        }
        _ => {}
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_valid_message_id() {
        let mut seen = std::collections::BTreeSet::new();
        for (kind, id) in MESSAGE_IDS {
            assert_eq!(id.len(), 32, "{kind}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{kind}"
            );
            assert!(seen.insert(*id), "{kind} shares its MESSAGE_ID");
        }
        // Every kind the audit log writes (see AuditEvent::kind) has one.
        for kind in [
            "agent_started",
            "agent_stopped",
            "policy_reloaded",
            "policy_rejected",
            "bind_observed",
            "bind_denied",
            "rule_found",
            "owner_shadowed",
            "rule_removing",
            "rule_removed",
            "rule_restored",
            "pin_installed",
            "pin_updated",
            "pin_removed",
            "k8s_object_removed",
            "k8s_object_created",
            "k8s_object_restored",
            "probe_failed",
            "probe_recovered",
            "audit_torn_tail",
            "audit_resumed",
        ] {
            assert!(message_id(kind).is_some(), "{kind} has no MESSAGE_ID");
        }
    }

    #[test]
    fn field_names_are_what_journald_accepts() {
        let record = AuditRecord {
            seq: 9,
            ts: time::OffsetDateTime::UNIX_EPOCH,
            host: None,
            event: AuditEvent::AgentStopped {
                reason: "SIGTERM".into(),
            },
        };
        for (name, _) in fields(&record) {
            // journald: [A-Z0-9_], not starting with a digit or '_', ≤ 64 bytes.
            assert!(name.len() <= 64 && !name.starts_with('_'), "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
        }
        assert_eq!(message(&record), "portguard: agent stopped (audit #9)");
    }
}
