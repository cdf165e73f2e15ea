//! Per-chain port dispatch: which rules of a chain a probe to one destination
//! port can match at all. A rule that matches `th dport == N` (a payload load
//! of the transport header's destination port straight into a `cmp eq`)
//! evaluates to "no match" for every probe to another port, whatever else it
//! says (the analysis ANDs every comparison, and a probe's destination port is
//! always known). So a walk needs only the rules keyed with its port and the
//! rules with no single port, in chain order: on a kube-proxy host that turns
//! `KUBE-SERVICES` (one rule per service port) from thousands of evaluations
//! per probe into a handful.
//!
//! Built on first use per chain, kept with the chain's rules, and dropped
//! whenever they change (see [`Rules`](super::model::Rules)).

use std::collections::HashMap;

use super::model::{CmpOp, Expr, PayloadBase, Rule};

/// The transport header's destination port (`th dport`): offset and length.
const TH_DPORT_OFFSET: u32 = 2;
const TH_DPORT_LEN: u32 = 2;

/// Chains shorter than this are walked whole: an index would cost more than
/// it saves.
pub const DISPATCH_MIN_RULES: usize = 32;

/// The one destination port a rule matches (`th dport == N` as payload + cmp),
/// if it says so; such a rule matches no connection to another port.
pub fn matched_dport(exprs: &[Expr]) -> Option<u16> {
    exprs.windows(2).find_map(|w| match w {
        [
            Expr::Payload {
                base: PayloadBase::Transport,
                offset: TH_DPORT_OFFSET,
                len: TH_DPORT_LEN,
                dreg,
            },
            Expr::Cmp {
                sreg,
                op: CmpOp::Eq,
                data,
            },
        ] if dreg == sreg && data.len() == 2 => Some(u16::from_be_bytes([data[0], data[1]])),
        _ => None,
    })
}

/// A chain's rules by the one destination port each matches.
#[derive(Debug, Default)]
pub struct PortDispatch {
    /// Positions of the rules that match one port, per port, ascending.
    by_port: HashMap<u16, Vec<u32>>,
    /// Positions of the rules that may match any port, ascending.
    any_port: Vec<u32>,
}

impl PortDispatch {
    /// Indexes `rules` (decoding their expressions, which stay decoded).
    pub fn new(rules: &[Rule]) -> Self {
        let mut d = Self::default();
        for (i, r) in rules.iter().enumerate() {
            let at = u32::try_from(i).expect("a chain holds fewer than 2^32 rules");
            match matched_dport(r.exprs()) {
                Some(port) => d.by_port.entry(port).or_default().push(at),
                None => d.any_port.push(at),
            }
        }
        d
    }

    /// The positions a probe to `port` can match, ascending.
    pub fn positions(&self, port: u16) -> impl Iterator<Item = usize> + '_ {
        let keyed = self.by_port.get(&port).map_or(&[][..], Vec::as_slice);
        Merge {
            a: keyed,
            b: &self.any_port,
        }
        .map(|i| i as usize)
    }
}

/// Two ascending position lists, merged.
struct Merge<'a> {
    a: &'a [u32],
    b: &'a [u32],
}

impl Iterator for Merge<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(a), Some(b)) => a < b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let list = if take_a { &mut self.a } else { &mut self.b };
        let (first, rest) = list.split_first()?;
        *list = rest;
        Some(*first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::model::{Data, Verdict};

    fn dport(port: u16) -> Vec<Expr> {
        vec![
            Expr::Payload {
                base: PayloadBase::Transport,
                offset: 2,
                len: 2,
                dreg: 1,
            },
            Expr::Cmp {
                sreg: 1,
                op: CmpOp::Eq,
                data: port.to_be_bytes().to_vec(),
            },
            Expr::Immediate {
                dreg: 0,
                data: Data::Verdict(Verdict::Accept),
            },
        ]
    }

    #[test]
    fn a_probe_meets_its_ports_rules_and_the_portless_ones_in_chain_order() {
        let accept = vec![Expr::Immediate {
            dreg: 0,
            data: Data::Verdict(Verdict::Accept),
        }];
        let rules: Vec<Rule> = [dport(80), accept.clone(), dport(443), dport(80), accept]
            .into_iter()
            .enumerate()
            .map(|(i, e)| Rule::new(i as u64 + 1, e, None))
            .collect();
        let d = PortDispatch::new(&rules);
        assert_eq!(d.positions(80).collect::<Vec<_>>(), [0, 1, 3, 4]);
        assert_eq!(d.positions(443).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(d.positions(22).collect::<Vec<_>>(), [1, 4]);
    }

    #[test]
    fn only_an_equality_on_the_destination_port_keys_a_rule() {
        let mut neq = dport(80);
        neq[1] = Expr::Cmp {
            sreg: 1,
            op: CmpOp::Neq,
            data: 80u16.to_be_bytes().to_vec(),
        };
        assert_eq!(matched_dport(&neq), None);
        let mut other_reg = dport(80);
        other_reg[1] = Expr::Cmp {
            sreg: 2,
            op: CmpOp::Eq,
            data: 80u16.to_be_bytes().to_vec(),
        };
        assert_eq!(matched_dport(&other_reg), None);
        let mut sport = dport(80);
        sport[0] = Expr::Payload {
            base: PayloadBase::Transport,
            offset: 0,
            len: 2,
            dreg: 1,
        };
        assert_eq!(matched_dport(&sport), None);
        assert_eq!(matched_dport(&dport(8080)), Some(8080));
    }
}
