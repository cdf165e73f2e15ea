//! The body of the inspector's fuzz target (`fuzz/`), kept in this crate so
//! that it builds with every change and the seeds and past crash inputs in
//! `fuzz/seeds` run as unit tests.
//!
//! The first byte picks the input: bit 0 clear, nf_tables netlink messages as
//! a dump delivers them ([`netlink::decode_messages`]); set,
//! `iptables-legacy-save` text ([`legacy::parse_save`], bit 1 picks IPv6).
//! Bit 2 makes the analysis skip a pin table owned by one netlink port, as the
//! running agent does. Every rule is decoded and the inspection runs, with
//! long chains' port dispatch and walking every rule: both must agree. Nothing
//! may panic.

use super::{
    InspectInput, LocalAddr, OwnedTargets, PortSpec, RulesetModel, dispatch, inspect_whole_chains,
    inspect_with_owned, legacy, netlink,
};
use crate::{
    nft::model::Family,
    policy::{PortRange, Proto},
};

/// The agent's netlink port id the fuzzed inputs may name as a pin table owner.
const OWN_PORT_ID: u32 = 4242;

/// Runs one fuzz input through the decoders and the analysis.
pub fn one(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let model = if mode & 1 == 0 {
        netlink::decode_messages(rest)
    } else {
        let text = String::from_utf8_lossy(rest);
        let family = if mode & 2 == 0 {
            Family::IP
        } else {
            Family::IP6
        };
        RulesetModel {
            tables: vec![legacy::parse_save(&text, family)],
            ..Default::default()
        }
    };
    for rule in model
        .tables
        .iter()
        .flat_map(|t| &t.chains)
        .flat_map(|c| &c.rules)
    {
        // The raw scan for a port match agrees with the whole decode.
        let raw_dport = rule.raw_exprs().map(dispatch::matched_dport_raw);
        let decoded = dispatch::matched_dport(rule.exprs());
        if let Some(raw_dport) = raw_dport {
            assert_eq!(
                raw_dport, decoded,
                "the raw port scan disagrees with the decoder"
            );
        }
    }
    let input = input((mode & 4 != 0).then_some(OWN_PORT_ID));
    let fast = inspect_with_owned(&model, &input);
    // The port dispatch is an index, never a different answer.
    assert_eq!(
        fast,
        inspect_whole_chains(&model, &input),
        "the port dispatch changed the inspection's answer"
    );
}

fn input(own_pins: Option<u32>) -> InspectInput {
    let addr = |a: &str, prefix_len, ifindex, ifname: &str| LocalAddr {
        addr: a.parse().expect("literal address"),
        prefix_len,
        ifindex,
        ifname: ifname.into(),
    };
    InspectInput {
        ports: vec![
            PortSpec {
                proto: Proto::Tcp,
                ports: PortRange::single(80),
            },
            PortSpec {
                proto: Proto::Udp,
                ports: PortRange {
                    start: 440,
                    end: 450,
                },
            },
        ],
        owned: OwnedTargets::docker_fallback(),
        local_addrs: vec![
            addr("198.51.100.1", 24, 2, "eth0"),
            addr("2001:db8::1", 64, 2, "eth0"),
            addr("203.0.113.1", 24, 3, "docker0"),
        ],
        internal_ifaces: vec!["docker".into(), "lo".into()],
        own_pins,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed and every input that once crashed the target (kept in
    /// `fuzz/seeds`) still runs to the end.
    #[test]
    fn seeds_and_past_crashes_run_clean() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/seeds") {
            let path = entry.expect("entry").path();
            let data = std::fs::read(&path).expect("seed");
            // The seed as it is, then under every input kind.
            one(&data);
            for mode in [0u8, 1, 2, 3, 4, 5] {
                let mut other = data.clone();
                if let Some(first) = other.first_mut() {
                    *first = mode;
                }
                one(&other);
            }
            n += 1;
        }
        assert!(n >= 2, "fuzz/seeds holds the seeds: found {n}");
    }
}
