//! Restore records: a removed rule as the audit log holds it
//! (`rule_removed.rule`), and the transaction that puts it back next to the
//! neighbours that are left.

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};

use crate::nft::{
    RulesetModel,
    model::Family,
    transaction::{Op, Placement, Transaction},
};

/// A removed rule as the audit log holds it (`rule_removed.rule`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedRule {
    pub family: String,
    pub family_code: u8,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub position: usize,
    pub prev_handle: Option<u64>,
    pub next_handle: Option<u64>,
    /// base64 of the raw `NFTA_RULE_EXPRESSIONS`.
    pub expressions: String,
    /// base64 of the raw `NFTA_RULE_USERDATA`.
    #[serde(default)]
    pub userdata: Option<String>,
    #[serde(default)]
    pub compat_proto: Option<u32>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_source: Option<String>,
    #[serde(default)]
    pub findings: Vec<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the recorded rule is not readable: {0}")]
    Record(#[from] base64::DecodeError),
    #[error(
        "the chain {family} {table} {chain} no longer exists: nothing to put the rule back into"
    )]
    ChainGone {
        family: String,
        table: String,
        chain: String,
    },
}

impl RecordedRule {
    /// The transaction that puts the rule back: after the rule that preceded it
    /// when that one is still there, else before the one that followed it, else
    /// at its old end of the chain (start when it was first, end otherwise).
    pub fn restore_transaction(
        &self,
        model: &RulesetModel,
    ) -> Result<(Transaction, Placement), RestoreError> {
        let family = Family(self.family_code);
        let chain = model
            .tables
            .iter()
            .find(|t| t.family == family && t.name == self.table)
            .and_then(|t| t.chain(&self.chain))
            .ok_or_else(|| RestoreError::ChainGone {
                family: self.family.clone(),
                table: self.table.clone(),
                chain: self.chain.clone(),
            })?;
        let has = |h: Option<u64>| h.filter(|h| chain.rules.iter().any(|r| r.handle == *h));
        let placement = if let Some(h) = has(self.prev_handle) {
            Placement::After(h)
        } else if let Some(h) = has(self.next_handle) {
            Placement::Before(h)
        } else if self.position <= 1 {
            Placement::Prepend
        } else {
            Placement::Append
        };
        let mut tx = Transaction::new();
        tx.push(Op::AddRule {
            family,
            table: self.table.clone(),
            chain: self.chain.clone(),
            exprs: B64.decode(&self.expressions)?,
            userdata: self
                .userdata
                .as_deref()
                .map(|u| B64.decode(u))
                .transpose()?,
            compat_proto: self.compat_proto,
            placement,
            summary: format!("(the rule removed from handle {})", self.handle),
        });
        Ok((tx, placement))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        nft::{
            self,
            model::Rule,
            netlink::{
                decode_messages,
                tests::{sample_dump, sample_input},
            },
        },
        rules::ForeignRule,
    };

    /// The sample rule (handle 7) recorded between neighbours 5 and 9.
    fn recorded() -> (RulesetModel, RecordedRule) {
        let model = decode_messages(&sample_dump());
        let findings = nft::inspect(&model, &sample_input());
        let mut rule = ForeignRule::capture(&model, findings).unwrap();
        (rule.prev_handle, rule.next_handle, rule.position) = (Some(5), Some(9), 2);
        let rec = serde_json::from_value(rule.audit_record().rule).unwrap();
        (model, rec)
    }

    fn with_rules(mut model: RulesetModel, handles: &[u64]) -> RulesetModel {
        model.tables[0].chains[0].rules = handles
            .iter()
            .map(|h| Rule::new(*h, Vec::new(), None))
            .collect();
        model
    }

    #[test]
    fn a_restore_goes_back_next_to_the_neighbours_that_are_left() {
        let (model, rec) = recorded();
        let at = |handles: &[u64]| {
            rec.restore_transaction(&with_rules(model.clone(), handles))
                .unwrap()
                .1
        };
        assert_eq!(at(&[5, 9]), Placement::After(5));
        assert_eq!(at(&[9]), Placement::Before(9));
        assert_eq!(
            at(&[1]),
            Placement::Append,
            "was not first: back at the end"
        );
        let mut gone = model.clone();
        gone.tables[0].chains.clear();
        assert!(matches!(
            rec.restore_transaction(&gone),
            Err(RestoreError::ChainGone { .. })
        ));
    }

    #[test]
    fn an_unreadable_record_is_an_error_not_a_panic() {
        let (model, mut rec) = recorded();
        rec.expressions = "not base64!".into();
        assert!(matches!(
            rec.restore_transaction(&model),
            Err(RestoreError::Record(_))
        ));
    }
}
