//! What can stop the rule guard, or fail one of its actions.

use super::backend::BackendError;
use crate::{audit::AuditError, nft::transaction::TransactionError};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// The kernel refused a batch (the ruleset moved under it).
    #[error(transparent)]
    Transaction(#[from] TransactionError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Removing the pins on stop: every failure, one per table or audit record.
    #[error("removing the pins: {}", .0.join("; "))]
    PinTeardown(Vec<String>),
}
