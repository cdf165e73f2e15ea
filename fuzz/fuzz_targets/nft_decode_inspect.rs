//! The inspector's parsers and classifier on arbitrary input: nf_tables netlink
//! messages (as a dump delivers them) or `iptables-legacy-save` text. Nothing
//! may panic; whatever decodes is analysed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portguard::{
    nft::{self, InspectInput, LocalAddr, OwnedTargets, PortSpec, model::Family},
    policy::{PortRange, Proto},
};

fn input() -> InspectInput {
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
            LocalAddr {
                addr: "198.51.100.1".parse().unwrap(),
                prefix_len: 24,
                ifindex: 2,
                ifname: "eth0".into(),
            },
            LocalAddr {
                addr: "2001:db8::1".parse().unwrap(),
                prefix_len: 64,
                ifindex: 2,
                ifname: "eth0".into(),
            },
            LocalAddr {
                addr: "203.0.113.1".parse().unwrap(),
                prefix_len: 24,
                ifindex: 3,
                ifname: "docker0".into(),
            },
        ],
        internal_ifaces: vec!["docker".into(), "lo".into()],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let model = if mode & 1 == 0 {
        nft::netlink::decode_messages(rest)
    } else {
        let text = String::from_utf8_lossy(rest);
        let family = if mode & 2 == 0 {
            Family::IP
        } else {
            Family::IP6
        };
        nft::RulesetModel {
            tables: vec![nft::legacy::parse_save(&text, family)],
            ..Default::default()
        }
    };
    for rule in model
        .tables
        .iter()
        .flat_map(|t| &t.chains)
        .flat_map(|c| &c.rules)
    {
        let _ = rule.exprs();
    }
    let _ = nft::inspect(&model, &input());
});
