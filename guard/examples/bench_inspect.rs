//! Timing of the nftables inspector on the ruleset of one network namespace,
//! for `cargo xtask bench inspect`: one line per figure, `name value unit`.
//!
//! `bench_inspect --netns NAME --label LABEL [--rounds N]`

use std::time::{Duration, Instant};

use portguard::{
    nft::{self, InspectInput, OwnedTargets, PortSpec, netlink::NftSocket},
    policy::{PortRange, Proto},
};

const DEFAULT_ROUNDS: usize = 7;
const PROTECTED: [u16; 2] = [80, 443];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let mut netns = None;
    let mut label = "ruleset".to_owned();
    let mut rounds = DEFAULT_ROUNDS;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--netns" => netns = args.next(),
            "--label" => label = args.next().expect("--label VALUE"),
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .expect("--rounds N")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let netns = netns.expect("--netns NAME");
    let figures = nft::netlink::in_netns(&netns, move || {
        let mut dump = Vec::new();
        let mut decode = Vec::new();
        let mut full = Vec::new();
        let mut analysis = Vec::new();
        let (mut read, mut legacy, mut addresses) = (Vec::new(), Vec::new(), Vec::new());
        let mut rules = 0;
        let mut findings = 0;
        let mut bytes = 0;
        for _ in 0..rounds {
            // The raw dump: requests sent and every datagram received, nothing decoded.
            let mut sock = NftSocket::open().expect("netlink socket");
            let t = sock.dump_only().expect("dump");
            dump.push(t.dump);
            bytes = t.bytes;
            // The full inspection, from nothing: read, decode, addresses, legacy, inspect.
            let t0 = Instant::now();
            let (mut model, timings) = NftSocket::open()
                .and_then(|mut s| s.read_ruleset())
                .expect("read ruleset");
            decode.push(timings.decode);
            let t_read = Instant::now();
            read.push(t_read - t0);
            nft::legacy::add_legacy_tables(&mut model);
            let t_legacy = Instant::now();
            legacy.push(t_legacy - t_read);
            let addrs = nft::local::local_addresses().expect("addresses");
            addresses.push(t_legacy.elapsed());
            let input = InspectInput {
                ports: PROTECTED
                    .iter()
                    .map(|p| PortSpec {
                        proto: Proto::Tcp,
                        ports: PortRange::single(*p),
                    })
                    .collect(),
                owned: OwnedTargets::docker_fallback(),
                local_addrs: addrs,
                internal_ifaces: nft::INTERNAL_IFACE_PREFIXES
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
                own_pins: None,
            };
            let t1 = Instant::now();
            let found = nft::inspect(&model, &input);
            analysis.push(t1.elapsed());
            full.push(t0.elapsed());
            rules = model.rule_count();
            findings = found.len();
        }
        let (dump, full) = (median(dump), median(full));
        vec![
            format!("inspect_{label}_rules {rules} rules"),
            format!("inspect_{label}_dump_bytes {bytes} bytes"),
            format!("inspect_{label}_raw_dump {} ms", ms(dump)),
            format!("inspect_{label}_decode_tail {} ms", ms(median(decode))),
            format!("inspect_{label}_read {} ms", ms(median(read))),
            format!("inspect_{label}_legacy_check {} ms", ms(median(legacy))),
            format!("inspect_{label}_addresses {} ms", ms(median(addresses))),
            format!("inspect_{label}_analysis {} ms", ms(median(analysis))),
            format!("inspect_{label}_full {} ms", ms(full)),
            format!(
                "inspect_{label}_full_over_raw {:.2} ratio",
                full.as_secs_f64() / dump.as_secs_f64()
            ),
            format!("inspect_{label}_findings {findings} findings"),
        ]
    })
    .expect("enter the namespace");
    for f in figures {
        println!("{f}");
    }
}
