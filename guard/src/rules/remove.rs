//! Acting on a decision: every rule is recorded whole in the audit log
//! (durably, as an intent: `rule_removing`) before one atomic batch deletes
//! them all by handle; only the deletions the kernel confirmed are then
//! recorded as `rule_removed` (the record `portguard restore` takes), made
//! durable in the background (the intent already holds the rule whole).
//!
//! The batch carries the generation the rules were judged on: if the ruleset
//! moved since (a table re-created, its handles started again), the kernel
//! refuses it whole ([`TransactionError::GenerationMoved`]) and the caller
//! reads and decides again. A batch is all or nothing: one rule already gone
//! (`ENOENT`) aborts every deletion in it, so on `ENOENT` the ruleset is read
//! again, the rules no longer there (same place, same expressions) are
//! dropped, and the others are committed again.

use std::time::Instant;

use super::{
    backend::{RulesetBackend, RulesetSnapshot},
    capture::ForeignRule,
    decide::removal_transaction,
    error::GuardError,
};
use crate::{
    audit::{AuditEvent, AuditHandle},
    nft::RulesetModel,
};

/// How many times a batch is committed again after `ENOENT` (each time
/// without the rules that went away) before it counts as an error.
const MAX_MISSING_RETRIES: usize = 3;

/// What [`remove_audited`] did.
#[derive(Debug, Default)]
pub struct Removal {
    /// The rules the kernel confirmed deleted, with the seq of their
    /// `rule_removed` record, in the order they were given.
    pub removed: Vec<(ForeignRule, u64)>,
    /// The rules that were gone before the batch could delete them (someone
    /// else deleted or replaced them): not removed by us, not recorded so.
    pub vanished: Vec<ForeignRule>,
    /// The ruleset as read again after an `ENOENT` (the caller's model is
    /// stale: take this one, then drop the removed rules from it).
    pub reread: Option<RulesetSnapshot>,
    /// The generation right after our batch, when it was checked (a batch
    /// moves the generation on by exactly one).
    pub generation: Option<u32>,
    /// Deleted (the kernel confirmed it), but the `rule_removed` record could
    /// not be written: the rule, the seq of its `rule_removing` intent (which
    /// holds it whole), and why.
    pub unrecorded: Vec<(ForeignRule, u64, String)>,
    /// When the intents were durable, the (last) batch sent, and acknowledged.
    pub intent_durable: Option<Instant>,
    pub sent: Option<Instant>,
    pub acked: Option<Instant>,
}

/// Records every rule whole (intent), deletes them all in one transaction
/// checked against `generation` (the one they were judged on; `None`: not
/// checked), and records each confirmed deletion. Rules that went away in the
/// meantime are dropped (see the module doc). A moved generation is returned
/// as [`GuardError::Transaction`] with
/// `TransactionError::GenerationMoved`: nothing was removed, read and
/// decide again.
pub async fn remove_audited<B: RulesetBackend>(
    audit: &AuditHandle,
    backend: &mut B,
    rules: &[ForeignRule],
    generation: Option<u32>,
) -> Result<Removal, GuardError> {
    // No intent on disk, no deletion: a failing write stops here.
    let mut intents = Vec::with_capacity(rules.len());
    for r in rules {
        let rec = audit
            .record(AuditEvent::RuleRemoving(r.audit_record()))
            .await?;
        intents.push(rec.seq);
    }
    let intent_durable = Some(Instant::now());
    let mut live: Vec<(ForeignRule, u64)> = rules.iter().cloned().zip(intents).collect();
    let mut generation = generation;
    let mut removal = Removal {
        intent_durable,
        ..Removal::default()
    };
    let mut retries = 0;
    loop {
        if live.is_empty() {
            return Ok(removal);
        }
        let batch: Vec<ForeignRule> = live.iter().map(|(r, _)| r.clone()).collect();
        let tx = removal_transaction(&batch).at_generation(generation);
        match backend.commit(&tx) {
            Ok(()) => {
                removal.acked = Some(Instant::now());
                removal.sent = backend.last_sent();
                break;
            }
            Err(e) if e.any_missing() && retries < MAX_MISSING_RETRIES => {
                retries += 1;
                let snapshot = backend.read().await?;
                let (still, gone): (Vec<_>, Vec<_>) = live
                    .into_iter()
                    .partition(|(r, _)| still_there(&snapshot.model, r));
                tracing::info!(
                    event = "removal_retried",
                    gone = gone.len(),
                    still = still.len(),
                    "a rule of the batch was gone: committing again without it"
                );
                removal.vanished.extend(gone.into_iter().map(|(r, _)| r));
                live = still;
                // Judged again on this read: checked against its generation.
                generation = snapshot.generation();
                removal.reread = Some(snapshot);
            }
            Err(e) => return Err(e.into()),
        }
    }
    removal.generation = generation.map(next_generation);
    // Deleted: that is what happened, whatever the disk says now. A record
    // that cannot be written is reported with the intent that holds the rule.
    for (r, intent) in live {
        // Its intent is durable already: this record is made durable behind
        // the guard's back (see `AuditHandle::record_soon_durable`).
        match audit
            .record_soon_durable(AuditEvent::RuleRemoved(r.removed_record()))
            .await
        {
            Ok(rec) => removal.removed.push((r, rec.seq)),
            Err(e) => removal.unrecorded.push((r, intent, e.to_string())),
        }
    }
    Ok(removal)
}

/// Whether the rule is still where it was judged, as it was judged: same
/// chain, same handle, same expressions (a handle alone may name another rule).
pub fn still_there(model: &RulesetModel, r: &ForeignRule) -> bool {
    model
        .tables
        .iter()
        .find(|t| t.family == r.family && t.name == r.table)
        .and_then(|t| t.chain(&r.chain))
        .and_then(|c| c.rules.iter().find(|x| x.handle == r.handle))
        .is_some_and(|x| x.raw_exprs() == Some(&r.exprs[..]))
}

/// The generation a committed batch creates (the kernel skips 0).
fn next_generation(generation: u32) -> u32 {
    match generation.wrapping_add(1) {
        0 => 1,
        g => g,
    }
}

/// Whether this error means the ruleset moved since the decision (read again).
pub fn generation_moved(e: &GuardError) -> bool {
    matches!(e, GuardError::Transaction(t) if t.generation_moved())
}
