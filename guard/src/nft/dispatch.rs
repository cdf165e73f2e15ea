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

use super::expr::{CmpOp, Expr, LoadOrCmp, PayloadBase, decode_list_with, load_or_cmp};

/// The transport header's destination port (`th dport`): offset and length.
const TH_DPORT_OFFSET: u32 = 2;
const TH_DPORT_LEN: u32 = 2;

/// Chains shorter than this are walked whole: an index would cost more than
/// it saves.
pub const DISPATCH_MIN_RULES: usize = 32;

/// The one destination port a rule matches (`th dport == N` as payload + cmp),
/// if it says so; such a rule matches no connection to another port.
pub fn matched_dport(exprs: &[Expr]) -> Option<u16> {
    exprs.windows(2).find_map(|w| dport_pair(&w[0], &w[1]))
}

/// [`matched_dport`] of a rule's raw expression list, looking only at its
/// `payload` and `cmp` expressions (the same decoder's parts, so the same
/// answer; checked by the fuzz target), nothing copied: a long chain is
/// indexed without decoding every rule whole.
pub fn matched_dport_raw(list: &[u8]) -> Option<u16> {
    let mut prev: Option<LoadOrCmp<'_>> = None;
    for cur in decode_list_with(list, load_or_cmp) {
        if let (Some(LoadOrCmp::Payload(load)), Some(LoadOrCmp::Cmp { sreg, op, data })) =
            (&prev, &cur)
            && let Some(port) = dport_of(load, *sreg, *op, data)
        {
            return Some(port);
        }
        prev = cur;
    }
    None
}

/// A load of the transport header's destination port straight into a `cmp eq`.
fn dport_pair(load: &Expr, cmp: &Expr) -> Option<u16> {
    match cmp {
        Expr::Cmp { sreg, op, data } => dport_of(load, *sreg, *op, data),
        _ => None,
    }
}

/// [`dport_pair`] of a load and a `cmp`'s parts.
fn dport_of(load: &Expr, sreg: u32, op: CmpOp, data: &[u8]) -> Option<u16> {
    match load {
        Expr::Payload {
            base: PayloadBase::Transport,
            offset: TH_DPORT_OFFSET,
            len: TH_DPORT_LEN,
            dreg,
        } if *dreg == sreg && op == CmpOp::Eq && data.len() == 2 => {
            Some(u16::from_be_bytes([data[0], data[1]]))
        }
        _ => None,
    }
}

/// A chain's rules by the one destination port each matches.
#[derive(Debug, Default)]
pub struct PortDispatch {
    /// Positions of the rules that match one port, per port, ascending.
    by_port: HashMap<u16, Vec<u32>>,
    /// Positions of the rules that may match any port, ascending.
    any_port: Vec<u32>,
    /// How many rules it indexes.
    len: usize,
}

impl PortDispatch {
    /// Indexes a chain's rules by the port each matches, in chain order (see
    /// `Rule::matched_dport`).
    pub fn new(ports: impl IntoIterator<Item = Option<u16>>) -> Self {
        let mut d = Self::default();
        for port in ports {
            d.push(port);
        }
        d
    }

    /// Adds the chain's next rule (a read indexes a long chain as its rules
    /// arrive).
    pub fn push(&mut self, port: Option<u16>) {
        let at = u32::try_from(self.len).expect("a chain holds fewer than 2^32 rules");
        match port {
            Some(port) => self.by_port.entry(port).or_default().push(at),
            None => self.any_port.push(at),
        }
        self.len += 1;
    }

    /// How many rules it indexes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
    use crate::nft::model::{Data, Rule, Verdict};

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
        let d = PortDispatch::new(rules.iter().map(Rule::matched_dport));
        assert_eq!(d.positions(80).collect::<Vec<_>>(), [0, 1, 3, 4]);
        assert_eq!(d.positions(443).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(d.positions(22).collect::<Vec<_>>(), [1, 4]);
    }

    #[test]
    fn a_dispatch_for_other_rules_is_not_taken() {
        let rules: crate::nft::model::Rules = (0..40)
            .map(|i| Rule::new(i, dport(1000 + i as u16), None))
            .collect();
        // One rule short: refused, and the chain builds its own on first use.
        rules.set_dispatch(PortDispatch::new((0..39).map(|i| Some(1000 + i))));
        let d = rules.dispatch().expect("long: a dispatch");
        assert_eq!(d.len(), 40);
        assert_eq!(d.positions(1039).collect::<Vec<_>>(), [39]);
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

    #[test]
    fn the_raw_scan_reads_what_the_decoder_reads() {
        use crate::{nft::pin::Pin, policy::Proto};
        for (port, host) in [(80, None), (8443, Some("198.51.100.7".parse().unwrap()))] {
            let raw = Pin {
                proto: Proto::Tcp,
                port,
                host,
                target: "203.0.113.9:80".parse().unwrap(),
                exclude_iif: Some("docker0".into()),
            }
            .expressions(false);
            let decoded = crate::nft::expr::decode_list(&raw);
            assert_eq!(matched_dport(&decoded), Some(port));
            assert_eq!(matched_dport_raw(&raw), Some(port));
            // Cut short: whatever is left, both read the same.
            for cut in (0..raw.len()).step_by(7) {
                assert_eq!(
                    matched_dport_raw(&raw[..cut]),
                    matched_dport(&crate::nft::expr::decode_list(&raw[..cut])),
                    "cut at {cut}"
                );
            }
        }
    }
}
