//! The incremental scope: what a batch of added rules can affect, so the hot
//! path re-inspects only the probes such a rule can meet.

use std::collections::BTreeSet;

pub use crate::nft::dispatch::matched_dport;
use crate::nft::{self, RulesetModel, model::Family};

/// One added rule's place and the one port it matches: (family, table, chain, port).
pub type AddedRule = (Family, String, String, Option<u16>);

/// What a batch of added rules can affect. A rule that matches one destination
/// port acts only on connections to that port; a rule in a base chain only on
/// that hook, and only on the families its table sees. Only probes inside the
/// scope can meet a new foreign rule; the others' findings were handled when
/// they appeared.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    ports: BTreeSet<u16>,
    /// Hooks (and v4/v6) of the base chains the rules were added to.
    hooks: BTreeSet<(nft::Hook, bool)>,
    /// A rule went into a regular chain: reachable from any hook.
    any_hook: bool,
}

impl Scope {
    /// Widens the scope by one added rule; none when the rule can affect every port.
    pub fn add(
        mut self,
        model: &RulesetModel,
        (family, table, chain, port): AddedRule,
    ) -> Option<Self> {
        self.ports.insert(port?);
        let base = model
            .tables
            .iter()
            .find(|t| t.family == family && t.name == table)
            .and_then(|t| t.chain(&chain))
            .and_then(|c| c.base.as_ref());
        match base {
            Some(b) => {
                for v6 in [false, true] {
                    if family.sees(v6) {
                        self.hooks.insert((b.hook, v6));
                    }
                }
            }
            None => self.any_hook = true,
        }
        Some(self)
    }

    /// Whether a probe can meet one of the added rules.
    pub fn wants(&self, probe: &nft::ProbePacket) -> bool {
        self.ports.contains(&probe.dport)
            && (self.any_hook || self.hooks.contains(&(probe.hook, probe.v6)))
    }

    /// Whether no added rule is in it (every change was dismissed).
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// The destination ports the added rules match.
    pub fn ports(&self) -> &BTreeSet<u16> {
        &self.ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{
        ProbePacket,
        model::Hook,
        netlink::{decode_messages, tests::sample_dump},
    };

    fn probe(hook: Hook, v6: bool, dport: u16) -> ProbePacket {
        ProbePacket {
            hook,
            v6,
            l4proto: 6,
            dport,
            daddr: "198.51.100.1".parse().unwrap(),
            iifname: None,
            iifindex: 0,
        }
    }

    #[test]
    fn a_rule_in_a_base_chain_matching_one_port_scopes_to_that_port_and_hook() {
        let model = decode_messages(&sample_dump());
        let rule = decode_messages(&sample_dump()).tables[0].chains[0].rules[0]
            .exprs()
            .to_vec();
        assert_eq!(matched_dport(&rule), Some(80));
        let scope = Scope::default()
            .add(&model, (Family::IP, "t".into(), "pre".into(), Some(80)))
            .unwrap();
        assert!(scope.wants(&probe(Hook::Prerouting, false, 80)));
        assert!(!scope.wants(&probe(Hook::Output, false, 80)));
        assert!(
            !scope.wants(&probe(Hook::Prerouting, true, 80)),
            "ip table: v4 only"
        );
        assert!(!scope.wants(&probe(Hook::Prerouting, false, 443)));
        // A regular chain: any hook; no port: no scope at all.
        let scope = scope
            .add(
                &model,
                (Family::IP, "t".into(), "regular".into(), Some(443)),
            )
            .unwrap();
        assert!(scope.wants(&probe(Hook::Output, false, 443)));
        assert!(
            Scope::default()
                .add(&model, (Family::IP, "t".into(), "pre".into(), None))
                .is_none()
        );
    }
}
