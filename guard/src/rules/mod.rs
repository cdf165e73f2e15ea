//! The rule guard: foreign NAT rules on protected ports are removed before
//! traffic is lost, and owners are pinned.
//!
//! Data flows one way:
//!
//! ```text
//!  backend (RulesetBackend)          model            decision          action                   record
//!  read + changes + addresses ──► RulesetModel ──► decide (pure) ──► remove_audited ─► commit ──► audit log
//!  owners model, legacy tick  ──►  (GuardLoop)      + wanted pins      PinSet::sync ──►           GuardReport
//! ```
//!
//! - [`backend`]: the seam to the ruleset: read (with the local addresses and
//!   the generation), changes, atomic commits. [`NetlinkBackend`] is the
//!   kernel; [`MemoryBackend`] its deterministic in-memory twin for tests.
//! - [`attribution`]: who committed a rule (the kernel's `NEWGEN`, resolved
//!   through `/proc` while the committer lives).
//! - [`capture`]: a [`ForeignRule`] captured whole (raw expressions, userdata,
//!   chain, position, neighbours) so it can be recorded and put back.
//! - [`scope`]: what a batch of added rules can affect (the hot path inspects
//!   only that).
//! - [`decide`](mod@decide): pure, ruleset + findings + policy → [`Action`]s.
//! - [`remove`]: audit whole (durably), then delete in one atomic batch.
//! - [`restore`]: the audit log's [`RecordedRule`] and the batch that puts it back.
//! - [`timing`]: where one removal's time goes ([`Stages`]).
//! - [`pins`]: which pins are wanted, and keeping the pin tables in sync.
//! - [`guard`]: [`RuleGuard`], the agent's event-driven loop, one method per
//!   event kind: ruleset changes (applied to the model in place; full reads
//!   only at start, on structural changes and on overruns), address changes,
//!   owner changes, the legacy tick (iptables-legacy is polled only while in
//!   use), stop (pins removed).

pub mod attribution;
pub mod backend;
pub mod capture;
pub mod decide;
pub mod error;
pub mod guard;
pub mod pins;
pub mod remove;
pub mod restore;
pub mod scope;
pub mod timing;

#[cfg(test)]
mod tests;

pub use self::{
    backend::{MemoryBackend, MemoryControl, NetlinkBackend, RulesetBackend, RulesetSnapshot},
    capture::ForeignRule,
    decide::{Action, decide, removal_transaction},
    error::GuardError,
    guard::{GuardReport, RuleGuard},
    pins::{PinSet, PinSync},
    remove::remove_audited,
    restore::{RecordedRule, RestoreError},
    timing::Stages,
};
