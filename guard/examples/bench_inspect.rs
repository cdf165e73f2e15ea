//! Timing of the nftables inspector on the ruleset of one network namespace,
//! for `cargo xtask bench inspect`: one line per figure, `name value unit`.
//!
//! `bench_inspect --netns NAME --label LABEL [--rounds N]`
//!
//! Without `--rounds`, rounds go on until there are at least
//! [`MIN_ROUNDS`] and [`BUDGET`] has passed (at most [`MAX_ROUNDS`]): a small
//! ruleset's median then rests on hundreds of rounds, not seven.

use std::time::{Duration, Instant};

use portguard::{
    nft::{self, InspectInput, OwnedTargets, PortSpec, netlink::NftSocket},
    policy::{PortRange, Proto},
};

const MIN_ROUNDS: usize = 15;
const MAX_ROUNDS: usize = 201;
const BUDGET: Duration = Duration::from_secs(3);
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
    let mut rounds = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--netns" => netns = args.next(),
            "--label" => label = args.next().expect("--label VALUE"),
            "--rounds" => {
                rounds = Some(
                    args.next()
                        .and_then(|r| r.parse::<usize>().ok())
                        .filter(|n| *n > 0)
                        .expect("--rounds N (at least 1)"),
                )
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
        let (mut read, mut meanwhile) = (Vec::new(), Vec::new());
        let mut rules = 0;
        let mut findings = 0;
        let mut bytes = 0;
        let started = Instant::now();
        let more = |done: usize| match rounds {
            Some(n) => done < n,
            None => done < MIN_ROUNDS || (done < MAX_ROUNDS && started.elapsed() < BUDGET),
        };
        // The raw dump: requests sent and every datagram received, nothing decoded.
        let raw = |dump: &mut Vec<Duration>| {
            let mut sock = NftSocket::open().expect("netlink socket");
            let t = sock.dump_only().expect("dump");
            dump.push(t.dump);
            t.bytes
        };
        while more(full.len()) {
            // Which goes first alternates: the second dump of a round may
            // find the kernel's rules warmer in the cache.
            let raw_first = full.len() % 2 == 0;
            if raw_first {
                bytes = raw(&mut dump);
            }
            // The full inspection, from nothing, as the agent reads: the
            // dump decoded beside it, the legacy tables and the addresses
            // read on the decoder thread meanwhile, then the analysis.
            let t0 = Instant::now();
            let (model, addrs, timings) = nft::read_timed(None).expect("read ruleset");
            read.push(t0.elapsed());
            decode.push(timings.decode);
            meanwhile.push(timings.meanwhile);
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
            drop(model);
            if !raw_first {
                bytes = raw(&mut dump);
            }
        }
        let done = full.len();
        // Each round's inspection over the dump beside it: a paired
        // ratio, which a slow phase of a noisy machine moves less than a
        // ratio of medians.
        let mut ratios: Vec<f64> = full
            .iter()
            .zip(&dump)
            .map(|(f, d)| f.as_secs_f64() / d.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        let quartile = |q: usize| ratios[(ratios.len() - 1) * q / 4];
        // Interference only ever adds time: the fastest round of each is
        // the closest to its own cost, when rounds swing too much for a median.
        let fastest = full.iter().min().expect("a round").as_secs_f64()
            / dump.iter().min().expect("a round").as_secs_f64();
        let (dump, full) = (median(dump), median(full));
        vec![
            format!("inspect_{label}_rounds {done} rounds"),
            format!("inspect_{label}_rules {rules} rules"),
            format!("inspect_{label}_dump_bytes {bytes} bytes"),
            format!("inspect_{label}_raw_dump {} ms", ms(dump)),
            format!("inspect_{label}_decode_tail {} ms", ms(median(decode))),
            format!("inspect_{label}_read {} ms", ms(median(read))),
            format!(
                "inspect_{label}_legacy_and_addresses {} ms",
                ms(median(meanwhile))
            ),
            format!("inspect_{label}_analysis {} ms", ms(median(analysis))),
            format!("inspect_{label}_full {} ms", ms(full)),
            format!("inspect_{label}_full_over_raw {:.2} ratio", quartile(2)),
            format!("inspect_{label}_full_over_raw_p25 {:.2} ratio", quartile(1)),
            format!("inspect_{label}_full_over_raw_p75 {:.2} ratio", quartile(3)),
            format!("inspect_{label}_fastest_full_over_fastest_raw {fastest:.2} ratio"),
            format!("inspect_{label}_findings {findings} findings"),
        ]
    })
    .expect("enter the namespace");
    for f in figures {
        println!("{f}");
    }
}
