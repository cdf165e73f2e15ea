//! Foreign rules that make the owner's mapping unreachable: an `accept`,
//! `return`, `drop` or `goto` that new connections to a protected port meet
//! before the owner's DNAT (`iptables -t nat -I PREROUTING 1 -j FOREIGN` with
//! `-A FOREIGN -p tcp -j ACCEPT`). Nothing is rewritten, yet the owner's port is
//! dead: the connection is accepted un-NATed and refused, or dropped.
//!
//! Which rules are to blame is asked of the analysis itself, by walking the
//! probe again without them: a set of rules shadows the owner's mapping when,
//! taken out, the owner's own rules are reached more surely than with them in.
//! Each round takes out the rules that took the probe in the previous walk;
//! after the first round foreign rewrites are taken out too, to see past a
//! latent hijack sitting between a shadowing rule and the owner. Then each
//! rule is put back in turn, and kept out only if putting it back matters. A
//! foreign rewrite is never named here: it is a finding of its own.

use std::collections::BTreeSet;

use super::analysis::{Reach, RuleRef, RulesetIndex, Taker, Walk, Walker};
use super::packet::ProbePacket;

/// A shadow deeper than this many layers of rules is not looked for.
const MAX_ROUNDS: usize = 8;

/// The foreign rules that keep the probe from the owner's mapping, or none.
///
/// `serving`: the rules that send the probe where its owner wants it (the
/// owner's own, the pins, faithful copies). `ours`: rules of this agent's own
/// pin table, never named. `walk`: the probe's walk with every rule in.
pub fn shadowing(
    idx: &RulesetIndex<'_>,
    probe: &ProbePacket,
    walk: &Walk,
    serving: &BTreeSet<RuleRef>,
    ours: impl Fn(&RuleRef) -> bool,
) -> Vec<Taker> {
    let served = |w: &Walk| {
        w.hits
            .iter()
            .filter(|h| serving.contains(&h.at))
            .map(|h| h.reach)
            .max()
    };
    // The common case, a hijack alone (or nothing) keeping the owner away:
    // no rule of anyone's took the probe without rewriting it.
    if walk.takers.iter().all(|t| ours(&t.at)) {
        return Vec::new();
    }
    let Some(before) = served(walk) else {
        // No mapping of the owner's on this path: nothing to shadow.
        return Vec::new();
    };
    if before == Reach::Definite {
        return Vec::new();
    }
    let mut skip: Vec<RuleRef> = Vec::new();
    let mut named: Vec<Taker> = Vec::new();
    let mut current: Option<Walk> = None;
    for _ in 0..MAX_ROUNDS {
        let w = current.as_ref().unwrap_or(walk);
        let takers: Vec<&Taker> = w
            .takers
            .iter()
            .filter(|t| !ours(&t.at) && !skip.contains(&t.at))
            .collect();
        let rewrites: Vec<RuleRef> = w
            .hits
            .iter()
            .filter(|h| h.reach > Reach::Shadowed && !serving.contains(&h.at) && !ours(&h.at))
            .map(|h| h.at)
            .filter(|at| !skip.contains(at))
            .collect();
        // Round one with foreign rewrites alone: the hijack findings say it.
        if takers.is_empty() && (rewrites.is_empty() || skip.is_empty()) {
            break;
        }
        skip.extend(takers.iter().map(|t| t.at));
        skip.extend(rewrites);
        named.extend(takers.into_iter().cloned());
        let next = Walker::new(idx, probe).skipping(&skip).run_full();
        let after = served(&next);
        current = Some(next);
        if after == Some(Reach::Definite) {
            break;
        }
    }
    let Some(after) = current.as_ref().and_then(served).filter(|a| *a > before) else {
        return Vec::new();
    };
    // Keep only the rules that matter: one put back that changes nothing
    // (the RETURN at the end of a chain a goto jumps to, say) is not to blame.
    let mut i = named.len();
    while i > 0 {
        i -= 1;
        let at = named[i].at;
        let without: Vec<RuleRef> = skip.iter().copied().filter(|r| *r != at).collect();
        let w = Walker::new(idx, probe).skipping(&without).run_full();
        if served(&w).is_some_and(|a| a >= after) {
            skip = without;
            named.remove(i);
        }
    }
    named
}

#[cfg(test)]
mod tests {
    use crate::{
        nft::{
            Finding, FindingKind, INTERNAL_IFACE_PREFIXES, InspectInput, LocalAddr, OwnedTargets,
            PortSpec, RulesetModel, inspect,
            legacy::parse_save,
            model::{Family, Hook},
        },
        policy::{PortRange, Proto},
    };

    const HOST: &str = "198.51.100.1";

    /// Docker's rules for a container publishing 80 (as iptables-save prints
    /// them), with `foreign` inserted at the top of PREROUTING and `chain`
    /// holding the foreign chain's rules.
    fn ruleset(foreign_chain: &[&str], prerouting_first: &[&str]) -> RulesetModel {
        let mut text = String::from(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n:FOREIGN - [0:0]\n",
        );
        for r in prerouting_first {
            text += &format!("-A PREROUTING {r}\n");
        }
        text += "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
                 -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER\n\
                 -A DOCKER -i docker0 -j RETURN\n\
                 -A DOCKER ! -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.2:80\n";
        for r in foreign_chain {
            text += &format!("-A FOREIGN {r}\n");
        }
        text += "COMMIT\n";
        RulesetModel {
            tables: vec![parse_save(&text, Family::IP)],
            ..Default::default()
        }
    }

    fn check(model: &RulesetModel) -> Vec<Finding> {
        let addr = |a: &str, prefix_len, ifindex, ifname: &str| LocalAddr {
            addr: a.parse().unwrap(),
            prefix_len,
            ifindex,
            ifname: ifname.into(),
        };
        inspect(
            model,
            &InspectInput {
                ports: vec![PortSpec {
                    proto: Proto::Tcp,
                    ports: PortRange::single(80),
                }],
                owned: OwnedTargets::docker_fallback(),
                local_addrs: vec![
                    addr(HOST, 24, 2, "eth0"),
                    addr("172.17.0.1", 16, 3, "docker0"),
                ],
                internal_ifaces: INTERNAL_IFACE_PREFIXES.map(str::to_owned).to_vec(),
                own_pins: None,
            },
        )
    }

    fn shadows(findings: &[Finding]) -> Vec<(&str, usize, Vec<Hook>)> {
        findings
            .iter()
            .filter(|f| f.kind == FindingKind::Shadow)
            .map(|f| (f.chain.as_str(), f.position, f.active_on.clone()))
            .collect()
    }

    #[test]
    fn an_accept_ahead_of_dockers_dnat_shadows_it_and_is_named() {
        let m = ruleset(&["-p tcp -j ACCEPT"], &["-j FOREIGN"]);
        let f = check(&m);
        assert_eq!(shadows(&f), [("FOREIGN", 1, vec![Hook::Prerouting])]);
        let s = &f[0];
        assert!(s.active && s.target.is_none(), "{s:?}");
        assert_eq!(s.shadows, ["172.17.0.2:80"]);
        assert_eq!(s.chain_path, ["PREROUTING", "FOREIGN"]);
        assert!(
            s.reason.starts_with(
                "accept in a nat chain at prerouting, ahead of the owner's mapping to 172.17.0.2:80"
            ),
            "{}",
            s.reason
        );
        // Nothing else is a finding: the owner's DNAT is not a hijack.
        assert_eq!(f.len(), 1, "{f:?}");
    }

    #[test]
    fn return_and_goto_in_prerouting_and_drop_shadow_too() {
        for (chain, first, name) in [
            (&[][..], &["-p tcp -j RETURN"][..], "PREROUTING"),
            (&["-j RETURN"][..], &["-p tcp -g FOREIGN"][..], "PREROUTING"),
            (&["-j DROP"][..], &["-j FOREIGN"][..], "FOREIGN"),
        ] {
            let f = check(&ruleset(chain, first));
            let s = shadows(&f);
            assert_eq!(s.len(), 1, "{first:?} {chain:?}: {f:?}");
            assert_eq!(s[0].0, name, "{f:?}");
        }
    }

    #[test]
    fn what_does_not_take_the_connection_is_not_named() {
        for (chain, first) in [
            // Another port, another protocol, a RETURN inside a jumped-to chain.
            (&["-p tcp --dport 22 -j ACCEPT"][..], &["-j FOREIGN"][..]),
            (&["-p udp -j ACCEPT"][..], &["-j FOREIGN"][..]),
            (&["-p tcp -j RETURN"][..], &["-j FOREIGN"][..]),
            // After Docker's jump: the connection was already DNATed.
            (&[][..], &[][..]),
        ] {
            let mut m = ruleset(chain, first);
            if first.is_empty() {
                // An ACCEPT appended after Docker's jump.
                let t = &mut m.tables[0];
                let extra = parse_save(
                    "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -j ACCEPT\nCOMMIT\n",
                    Family::IP,
                );
                let rule = extra.chains[0].rules[0].clone();
                t.chains
                    .iter_mut()
                    .find(|c| c.name == "PREROUTING")
                    .unwrap()
                    .rules
                    .push(rule);
            }
            let f = check(&m);
            assert!(f.is_empty(), "{first:?} {chain:?}: {f:?}");
        }
    }

    #[test]
    fn two_accepts_in_a_row_are_both_named_and_a_hijack_stays_a_hijack() {
        // Either ACCEPT alone would still shadow: both must go.
        let f = check(&ruleset(
            &["-p tcp -j ACCEPT"],
            &["-p tcp -j ACCEPT", "-j FOREIGN"],
        ));
        let s = shadows(&f);
        assert_eq!(
            s.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
            [("PREROUTING", 1), ("FOREIGN", 1)],
            "{f:?}"
        );
        // A hijack first: the hijack is the finding, nothing is "shadowing".
        let f = check(&ruleset(
            &["-p tcp -j DNAT --to-destination 10.42.0.2:80"],
            &["-j FOREIGN"],
        ));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].kind, FindingKind::Dnat);
        assert!(f[0].active);
        // An ACCEPT ahead of a hijack ahead of Docker: the ACCEPT shadows the
        // owner (the hijack behind it is latent).
        let f = check(&ruleset(
            &["-p tcp -j DNAT --to-destination 10.42.0.2:80"],
            &["-p tcp -j ACCEPT", "-j FOREIGN"],
        ));
        let hijack = f
            .iter()
            .find(|f| f.kind == FindingKind::Dnat)
            .expect("hijack");
        assert!(!hijack.active, "{f:?}");
        assert_eq!(
            shadows(&f).iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
            [("PREROUTING", 1)]
        );
    }

    #[test]
    fn a_shadow_on_output_only_is_active_on_output_only() {
        let mut m = ruleset(&[], &[]);
        let extra = parse_save(
            "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j ACCEPT\nCOMMIT\n",
            Family::IP,
        );
        let rule = extra.chains[0].rules[0].clone();
        let out = m.tables[0]
            .chains
            .iter_mut()
            .find(|c| c.name == "OUTPUT")
            .unwrap();
        out.rules.insert(0, rule);
        let f = check(&m);
        assert_eq!(shadows(&f), [("OUTPUT", 1, vec![Hook::Output])], "{f:?}");
    }
}
