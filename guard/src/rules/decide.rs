//! The pure decision: ruleset + findings + policy → one [`Action`] per foreign
//! rule, and the one transaction that deletes the rules to remove. No I/O: the
//! same code serves `check`, `fix` and the agent's loop.

use std::collections::{BTreeMap, BTreeSet};

use super::capture::ForeignRule;
use crate::{
    nft::{self, Finding, RulesetModel, TableOrigin, model::Family, transaction::Transaction},
    policy::{Mode, OnShadow, Policy},
};

/// What to do about a foreign rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enforce mode: audit, then delete by handle.
    Remove(ForeignRule),
    /// Observe mode, or a rule that cannot be deleted over netlink
    /// (iptables-legacy): report only.
    Report { finding: Finding, why: &'static str },
}

/// A rule's place: family, table, chain, handle, position.
type RuleKey = (Family, String, String, Option<u64>, usize);

/// The pure decision: one action per foreign rule (a rule that rewrites
/// several protected ports is one action). A rule is removed when any port it
/// rewrites is in enforce mode, latent or active (a latent hijack becomes active
/// as soon as the rule ahead of it goes).
pub fn decide(model: &RulesetModel, findings: &[Finding], policy: &Policy) -> Vec<Action> {
    let mut by_rule: BTreeMap<RuleKey, Vec<Finding>> = BTreeMap::new();
    for f in findings {
        by_rule
            .entry((
                f.family,
                f.table.clone(),
                f.chain.clone(),
                f.handle,
                f.position,
            ))
            .or_default()
            .push(f.clone());
    }
    let mut out = Vec::new();
    for (_, fs) in by_rule {
        let first = fs[0].clone();
        let enforced = |want_remove_shadow: bool| {
            fs.iter().any(|f| {
                policy.find(f.port, f.proto).is_some_and(|p| {
                    policy.mode_of(p) == Mode::Enforce
                        && (!want_remove_shadow || policy.on_shadow_of(p) == OnShadow::Remove)
                })
            })
        };
        if !enforced(false) {
            out.push(Action::Report {
                finding: first,
                why: "observe mode",
            });
        } else if first.is_shadow() && !enforced(true) {
            // Nothing rewritten: removing it is asked for explicitly, or never.
            out.push(Action::Report {
                finding: first,
                why: "shadows the owner's mapping: reported (on_shadow = \"report\"; a pin defeats it)",
            });
        } else if first.origin == TableOrigin::IptablesLegacy {
            out.push(Action::Report {
                finding: first,
                why: "iptables-legacy rule: not removable over netlink",
            });
        } else if in_docker_managed_chain(model, &first) {
            // The owner's place: Docker may be mid-way through starting a
            // container the owners model does not know yet. Never delete there.
            out.push(Action::Report {
                finding: first,
                why: "in a chain Docker manages: reported, never removed",
            });
        } else {
            match ForeignRule::capture(model, fs) {
                Some(rule) => out.push(Action::Remove(rule)),
                None => out.push(Action::Report {
                    finding: first,
                    why: "the rule's raw expressions are not in the model",
                }),
            }
        }
    }
    out
}

/// Whether the finding's rule sits in one of Docker's own chains.
fn in_docker_managed_chain(model: &RulesetModel, f: &Finding) -> bool {
    model
        .tables
        .iter()
        .find(|t| t.family == f.family && t.name == f.table && t.origin == f.origin)
        .is_some_and(|t| nft::classify::docker_managed(t, &f.chain))
}

/// The one transaction that deletes `rules` by handle (each rule once).
pub fn removal_transaction(rules: &[ForeignRule]) -> Transaction {
    let mut tx = Transaction::new();
    let mut seen = BTreeSet::new();
    for r in rules {
        if seen.insert(r.id()) {
            tx.push(r.delete_op());
        }
    }
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        nft::{
            netlink::{
                decode_messages,
                tests::{sample_dump, sample_input},
            },
            transaction::{Op, Placement},
        },
        policy::PolicySource,
        rules::RecordedRule,
    };

    #[test]
    fn enforce_removes_observe_reports() {
        let model = decode_messages(&sample_dump());
        let input = sample_input();
        let findings = nft::inspect(&model, &input);
        assert_eq!(findings.len(), 1);
        let mut policy = Policy::parse(
            "[[ports]]\nport = 80\nowner = \"docker\"\n",
            PolicySource::Embedded,
        )
        .expect("policy");
        policy.mode = Mode::Enforce;
        let actions = decide(&model, &findings, &policy);
        let [Action::Remove(rule)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(rule.handle, 7);
        assert_eq!(rule.position, 1);
        assert!(!rule.exprs.is_empty());
        let tx = removal_transaction(&[rule.clone(), rule.clone()]);
        assert_eq!(
            tx.to_string(),
            "delete rule ip t pre handle 7\n",
            "one delete per rule, however often it is named"
        );
        // Recorded whole, restorable at the start of its chain.
        let rec: RecordedRule =
            serde_json::from_value(rule.audit_record().rule).expect("record round-trips");
        let mut emptied = model.clone();
        emptied.tables[0].chains[0].rules.clear();
        let (tx, placement) = rec.restore_transaction(&emptied).unwrap();
        assert_eq!(placement, Placement::Prepend);
        let Op::AddRule { exprs, .. } = &tx.ops[0] else {
            panic!()
        };
        assert_eq!(exprs, &rule.exprs);
        policy.mode = Mode::Observe;
        assert!(matches!(
            decide(&model, &findings, &policy).as_slice(),
            [Action::Report { .. }]
        ));
    }
}
