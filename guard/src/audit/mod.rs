//! The audit trail: append-only JSON Lines, one record per event, each
//! durable before the action it describes is reported done.
//!
//! Writers open an [`AuditLog`] (or share it through an [`AuditHandle`]);
//! `report` and `restore` read an [`AuditTrail`].

pub mod aggregate;
mod host;
pub mod journal;
mod log;
mod reader;
mod record;

pub use aggregate::BindAggregator;
pub use host::Host;
pub use log::{
    AUDIT_FILE_MODE, AuditError, AuditHandle, AuditLog, DEFAULT_AUDIT_PATH, Rotation, TornTail,
};
pub use reader::{AuditTrail, UnreadableLine, rotated_files};
pub use record::{
    AuditEvent, AuditRecord, BindAttempt, Committer, ForeignRuleRecord, K8sObjectRecord, ProcessRef,
};
