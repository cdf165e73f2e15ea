//! Rules that are not hijacks are never reported as hijacks: real iptables-nft
//! and nft rules in raw and mangle PREROUTING on a protected port (NFQUEUE, as
//! Suricata runs inline; TEE; TTL; MARK; CONNMARK; SET; HMARK; native `dup`,
//! `mark set`, `ct mark set`, `notrack`…) leave `portguard check` clean, and the kernel agrees: a
//! new connection still reaches the host's own server. TPROXY (mangle),
//! REDIRECT and DNAT (nat) are still found, each with its reason.
//!
//! Topology, all inside namespaces made for the test: host `h` 198.51.100.1/24,
//! client `c` 198.51.100.2/24 over a veth; the host's own server answers "host"
//! on the protected port 80 and "elsewhere" on 8080.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use portguard_tests::{
    netns::{NetNs, Server, in_ns},
    portguard_bin, require_root, run, unique_name,
};
use serde_json::Value;

const HOST4: &str = "198.51.100.1";
const CLIENT4: &str = "198.51.100.2";
const PROTECTED: u16 = 80;
const ELSEWHERE: u16 = 8080;
const POLICY: &str = "[[ports]]\nport = 80\nowner = \"docker\"\n";
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

struct Host {
    h: NetNs,
    c: NetNs,
    _servers: Vec<Server>,
    policy: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.policy);
    }
}

impl Host {
    fn new() -> Self {
        require_root();
        let h = NetNs::new("pg-cls-h");
        let c = NetNs::new("pg-cls-c");
        h.link(&c, &format!("{HOST4}/24"), &format!("{CLIENT4}/24"));
        let policy = std::env::temp_dir().join(unique_name("pg-cls-policy") + ".toml");
        std::fs::write(&policy, POLICY).unwrap();
        let servers = vec![
            Server::start(&h, PROTECTED, "host"),
            Server::start(&h, ELSEWHERE, "elsewhere"),
        ];
        Self {
            h,
            c,
            _servers: servers,
            policy,
        }
    }

    fn sh(&self, script: &str) {
        run(&mut self.h.command(["sh", "-euc", script]));
    }

    /// `iptables -t TABLE -A PREROUTING -p tcp --dport 80 -j TARGET…`; a
    /// refusal (the kernel lacks the target) fails the test and says so.
    fn iptables(&self, table: &str, target: &str) {
        let out = self
            .h
            .command(["sh", "-c"])
            .arg(format!(
                "iptables -t {table} -A PREROUTING -p tcp --dport {PROTECTED} -j {target}"
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the kernel refused `-t {table} -j {target}`: is xt_{name} built in or loadable \
             (`modprobe xt_{name}`)?\n{}",
            String::from_utf8_lossy(&out.stderr),
            name = target.split_whitespace().next().unwrap()
        );
        let listed = self.h.exec(["iptables", "-t", table, "-S", "PREROUTING"]);
        let name = target.split_whitespace().next().unwrap();
        assert!(
            listed.contains(&format!("-j {name}")),
            "{name} is not in {table} PREROUTING: {listed}"
        );
    }

    /// `portguard check --json --netns h`: exit code and findings.
    fn check(&self) -> (i32, Vec<Value>) {
        let (code, doc) = portguard_tests::check_json(self.h.name(), &self.policy, &[]);
        (code, doc["findings"].as_array().expect("findings").clone())
    }

    /// Who answers a new connection from the client to the protected port.
    fn ask(&self) -> Option<String> {
        let addr = SocketAddr::new(HOST4.parse().unwrap(), PROTECTED);
        in_ns(self.c.name(), move || {
            let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).ok()?;
            s.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })
    }

    fn ruleset(&self) -> String {
        self.h.exec(["nft", "list", "ruleset"])
    }

    /// Nothing found, and the kernel sends the connection to the host's own
    /// server. Then a foreign DNAT in nat PREROUTING is found: the probe did
    /// cover the protected port on this address, so "clean" meant something.
    fn assert_clean_then_control(&self, what: &str) {
        let (code, findings) = self.check();
        assert!(
            findings.is_empty() && code == 0,
            "{what}: reported as a hijack (exit {code}): {}\n--- ruleset ---\n{}",
            serde_json::to_string_pretty(&findings).unwrap(),
            self.ruleset()
        );
        assert_eq!(
            self.ask().as_deref(),
            Some("host"),
            "{what}: the kernel did not deliver the connection to the host's server\n{}",
            self.ruleset()
        );
        self.iptables("nat", &format!("DNAT --to-destination {HOST4}:{ELSEWHERE}"));
        let (code, findings) = self.check();
        assert_eq!(code, 1, "{what}: control DNAT: {findings:?}");
        assert_eq!(findings.len(), 1, "{what}: {findings:#?}");
        let f = &findings[0];
        assert_eq!(f["kind"], "dnat", "{f}");
        assert_eq!(f["table"], "nat", "{f}");
        assert_eq!(
            f["reason"],
            format!(
                "DNAT to {HOST4}:{ELSEWHERE} in a nat chain at prerouting (iptables target DNAT)"
            ),
            "{f}"
        );
        assert_eq!(self.ask().as_deref(), Some("elsewhere"));
    }
}

/// One target, in raw and in mangle PREROUTING together.
fn raw_and_mangle(target: &str) {
    let host = Host::new();
    for table in ["raw", "mangle"] {
        host.iptables(table, target);
    }
    host.assert_clean_then_control(target);
}

/// Suricata inline: the IPS decides, nobody rewrites. `--queue-bypass` lets
/// packets through while no IPS listens, so the kernel check can pass.
#[test]
fn nfqueue_is_not_a_hijack() {
    raw_and_mangle("NFQUEUE --queue-num 3 --queue-bypass");
}

#[test]
fn tee_is_not_a_hijack() {
    raw_and_mangle(&format!("TEE --gateway {CLIENT4}"));
}

#[test]
fn mark_is_not_a_hijack() {
    raw_and_mangle("MARK --set-mark 0x10");
}

#[test]
fn connmark_is_not_a_hijack() {
    raw_and_mangle("CONNMARK --set-mark 0x20");
}

#[test]
fn hmark_is_not_a_hijack() {
    raw_and_mangle("HMARK --hmark-tuple src,dst --hmark-mod 10 --hmark-rnd 0xfeedcafe");
}

#[test]
fn set_is_not_a_hijack() {
    let host = Host::new();
    let made = host
        .h
        .command(["ipset", "create", "pg-cls-seen", "hash:ip"])
        .output()
        .unwrap_or_else(|e| {
            panic!("ipset is needed for the SET target (`cargo xtask setup`): {e}")
        });
    assert!(
        made.status.success(),
        "ipset create failed (kernel without ip_set?): {}",
        String::from_utf8_lossy(&made.stderr)
    );
    for table in ["raw", "mangle"] {
        host.iptables(table, "SET --add-set pg-cls-seen src");
    }
    host.assert_clean_then_control("SET");
    // The set lives in the namespace's netns, so it goes with it.
}

/// TTL is a mangle-only target: the kernel refuses it in raw.
#[test]
fn ttl_is_not_a_hijack() {
    let host = Host::new();
    let refused = host
        .h
        .command([
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-j",
            "TTL",
            "--ttl-set",
            "64",
        ])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "the kernel took TTL in raw: extend this test to raw"
    );
    host.iptables("mangle", "TTL --ttl-set 64");
    host.assert_clean_then_control("TTL");
}

/// Native nftables statements in filter-type prerouting chains at raw and
/// mangle priority: dup, mark set, ct mark set, notrack, nftrace. (Native
/// `queue` is not here: this kernel is built without nft_queue,
/// CONFIG_NFT_QUEUE; the unit tests cover it. iptables' NFQUEUE above is the
/// xt target, which is how iptables-nft writes it.)
#[test]
fn native_statements_in_raw_and_mangle_chains_are_not_hijacks() {
    let host = Host::new();
    host.h.nft_load(&format!(
        "table ip ips {{
            chain raw {{ type filter hook prerouting priority raw; policy accept;
                tcp dport {PROTECTED} meta nftrace set 1
                tcp dport {PROTECTED} notrack
                tcp dport {PROTECTED} dup to {CLIENT4}
            }}
            chain mangle {{ type filter hook prerouting priority mangle; policy accept;
                tcp dport {PROTECTED} meta mark set 0x10
                tcp dport {PROTECTED} ct mark set 0x20
            }}
        }}"
    ));
    // `notrack` leaves the connection untracked: no nat chain sees it. Take it
    // out again for the control, which needs conntrack for its DNAT.
    let (code, findings) = host.check();
    assert!(
        code == 0 && findings.is_empty(),
        "exit {code}: {findings:#?}\n{}",
        host.ruleset()
    );
    host.sh(
        "nft -a list chain ip ips raw | sed -n 's/.*notrack # handle \\([0-9]*\\)$/\\1/p' \
         | xargs -r -I{} nft delete rule ip ips raw handle {}
         nft list chain ip ips raw | grep -q dup
         ! nft list chain ip ips raw | grep -q notrack",
    );
    host.assert_clean_then_control("native statements");
}

/// TPROXY in mangle is a hijack: found, active, with its reason; the kernel
/// agrees (the host's own server never gets the connection).
#[test]
fn tproxy_in_mangle_is_found_with_its_reason() {
    let host = Host::new();
    host.iptables(
        "mangle",
        &format!("TPROXY --on-port {ELSEWHERE} --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1"),
    );
    let (code, findings) = host.check();
    assert_eq!(code, 1, "{findings:#?}");
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!(f["kind"], "tproxy", "{f}");
    assert_eq!(f["table"], "mangle", "{f}");
    assert_eq!(f["active"], true, "{f}");
    assert_eq!(f["target"], format!("127.0.0.1:{ELSEWHERE}"), "{f}");
    assert_eq!(
        f["reason"],
        format!(
            "TPROXY to 127.0.0.1:{ELSEWHERE} in a filter chain at prerouting (iptables target TPROXY)"
        ),
        "{f}"
    );
    assert_ne!(host.ask().as_deref(), Some("host"), "{}", host.ruleset());
}

#[test]
fn redirect_in_nat_is_found_with_its_reason() {
    let host = Host::new();
    host.iptables("nat", &format!("REDIRECT --to-ports {ELSEWHERE}"));
    let (code, findings) = host.check();
    assert_eq!(code, 1, "{findings:#?}");
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!(f["kind"], "redirect", "{f}");
    assert_eq!(f["active"], true, "{f}");
    assert_eq!(
        f["reason"],
        format!(
            "REDIRECT to :{ELSEWHERE} on this host in a nat chain at prerouting (iptables target REDIRECT)"
        ),
        "{f}"
    );
    assert_eq!(host.ask().as_deref(), Some("elsewhere"));
}

/// DNAT in nat is found; so is NETMAP, which sends 198.51.100.1 to the same
/// host part of its prefix. The text output carries the reason too.
#[test]
fn dnat_and_netmap_in_nat_are_found_with_their_reason() {
    let host = Host::new();
    host.sh(&format!(
        "iptables -t nat -A PREROUTING -p tcp --dport {PROTECTED} -j NETMAP --to 203.0.113.0/24"
    ));
    let (code, findings) = host.check();
    assert_eq!(code, 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!(f["kind"], "dnat", "{f}");
    assert_eq!(f["target"], "203.0.113.1:80", "{f}");
    assert_eq!(
        f["reason"],
        "DNAT to 203.0.113.1:80 in a nat chain at prerouting (iptables target NETMAP to 203.0.113.0/24)",
        "{f}"
    );
    host.sh("iptables -t nat -F PREROUTING");
    host.iptables(
        "nat",
        &format!("DNAT --to-destination 203.0.113.9:{PROTECTED}"),
    );
    let out = Command::new(portguard_bin())
        .args(["check", "--netns", host.h.name(), "--config"])
        .arg(&host.policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "why: DNAT to 203.0.113.9:80 in a nat chain at prerouting (iptables target DNAT)"
        ),
        "{text}"
    );
}
