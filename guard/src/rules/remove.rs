//! Acting on a decision: every rule is recorded whole in the audit log
//! (durably) before one atomic batch deletes them all by handle.

use super::{
    backend::RulesetBackend, capture::ForeignRule, decide::removal_transaction, error::GuardError,
};
use crate::audit::{AuditEvent, AuditHandle};

/// Records every rule whole, then deletes them all in one transaction. Returns
/// the audit seq of each removal. Rules already gone (`ENOENT`: someone else
/// deleted them) are not an error.
pub async fn remove_audited<B: RulesetBackend>(
    audit: &AuditHandle,
    backend: &mut B,
    rules: &[ForeignRule],
) -> Result<Vec<u64>, GuardError> {
    let mut seqs = Vec::with_capacity(rules.len());
    for r in rules {
        let rec = audit
            .record(AuditEvent::RuleRemoved(r.audit_record()))
            .await?;
        seqs.push(rec.seq);
    }
    match backend.commit(&removal_transaction(rules)) {
        Ok(()) => Ok(seqs),
        Err(e) if e.all_missing() => Ok(seqs),
        Err(e) => Err(e.into()),
    }
}
