//! `portguard check` against the kernel: every case loads a ruleset into a fresh
//! network namespace (the "host"), a client namespace opens connections to the
//! protected ports over a veth, and the server that answers says where the kernel
//! sent them. The inspector's verdict (hijacked or not, active or latent) must
//! agree with the kernel.
//!
//! Topology, all inside namespaces made for the test:
//! - host `h`: 198.51.100.1/24 + 2001:db8:1::1/64 towards the client; Docker-like
//!   bridge `docker0` 203.0.113.1/26 + 2001:db8:d::1/64; CNI bridge `cni0`
//!   203.0.113.128/25 (made by the real CNI bridge plugin) + 2001:db8:c::1/64.
//! - owner `o` (the "container"): 203.0.113.2, 2001:db8:d::2, answers "owner".
//! - pod `p`: 203.0.113.130, 2001:db8:c::2, answers "pod".
//! - the host itself answers "redirect" on 8080.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use portguard_tests::{
    netns::{NetNs, Server, in_ns},
    portguard_bin, require_root, run, unique_name,
};
use serde_json::Value;

const HOST4: &str = "198.51.100.1";
const HOST6: &str = "2001:db8:1::1";
const OWNER4: &str = "203.0.113.2";
const OWNER6: &str = "2001:db8:d::2";
const POD4: &str = "203.0.113.130";
const POD6: &str = "2001:db8:c::2";
const CLUSTER_IP: &str = "192.0.2.10";
const REDIRECT_PORT: u16 = 8080;
const PROTECTED: [u16; 2] = [80, 443];
const POLICY: &str =
    "[[ports]]\nport = 80\nowner = \"docker\"\n[[ports]]\nport = 443\nowner = \"docker\"\n";
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Who answered a new connection from the client: the kernel's verdict.
fn ask(client: &NetNs, addr: IpAddr, port: u16) -> Option<String> {
    in_ns(client.name(), move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(addr, port), CONNECT_TIMEOUT).ok()?;
        s.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

struct Lab {
    h: NetNs,
    c: NetNs,
    _o: NetNs,
    _p: NetNs,
    _servers: Vec<Server>,
    pod_result: String,
    policy: PathBuf,
    ipam: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.policy);
        let _ = std::fs::remove_dir_all(&self.ipam);
    }
}

fn sh(ns: &NetNs, script: &str) {
    run(&mut ns.command(["sh", "-euc", script]));
}

impl Lab {
    fn new() -> Self {
        require_root();
        let h = NetNs::new("pg-nft-h");
        let c = NetNs::new("pg-nft-c");
        let o = NetNs::new("pg-nft-o");
        let p = NetNs::new("pg-nft-p");
        for ns in [&h, &c, &o, &p] {
            // No duplicate address detection: addresses are usable at once.
            sh(
                ns,
                "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
            );
        }
        sh(
            &h,
            &format!(
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
                 ip link add vclient type veth peer name eth0 netns {c}
                 ip addr add {HOST4}/24 dev vclient
                 ip -6 addr add {HOST6}/64 dev vclient nodad
                 ip link set vclient up
                 ip link add docker0 type bridge
                 ip addr add 203.0.113.1/26 dev docker0
                 ip -6 addr add 2001:db8:d::1/64 dev docker0 nodad
                 ip link set docker0 up
                 ip link add vowner type veth peer name eth0 netns {o}
                 ip link set vowner master docker0 up",
                c = c.name(),
                o = o.name()
            ),
        );
        sh(
            &c,
            "ip addr add 198.51.100.2/24 dev eth0
             ip -6 addr add 2001:db8:1::2/64 dev eth0 nodad
             ip link set eth0 up",
        );
        sh(
            &o,
            &format!(
                "ip addr add {OWNER4}/26 dev eth0
                 ip -6 addr add {OWNER6}/64 dev eth0 nodad
                 ip link set eth0 up
                 ip route add default via 203.0.113.1
                 ip -6 route add default via 2001:db8:d::1"
            ),
        );
        let ipam = std::env::temp_dir().join(unique_name("pg-nft-ipam"));
        let policy = std::env::temp_dir().join(unique_name("pg-nft-policy") + ".toml");
        std::fs::write(&policy, POLICY).unwrap();
        let lab = Self {
            h,
            c,
            _o: o,
            _p: p,
            _servers: Vec::new(),
            pod_result: String::new(),
            policy,
            ipam,
        };
        // The pod network: the real CNI bridge plugin, as k3s's flannel/bridge would.
        let bridge_conf = portguard_tests::cni::bridge_conf(&lab.ipam);
        let result = lab.cni("bridge", &bridge_conf);
        assert!(
            result.contains(POD4),
            "the bridge plugin gave the pod {result}"
        );
        sh(&lab.h, "ip -6 addr add 2001:db8:c::1/64 dev cni0 nodad");
        sh(
            &lab._p,
            &format!(
                "ip -6 addr add {POD6}/64 dev eth0 nodad\nip -6 route add default via 2001:db8:c::1"
            ),
        );
        let mut lab = lab;
        lab.pod_result = result;
        lab._servers = vec![
            Server::start(&lab._o, 80, "owner"),
            Server::start(&lab._o, 443, "owner"),
            Server::start(&lab._p, 80, "pod"),
            Server::start(&lab._p, 443, "pod"),
            Server::start(&lab.h, REDIRECT_PORT, "redirect"),
        ];
        lab
    }

    /// Runs a real CNI plugin (from containernetworking-plugins) for the pod, in the host namespace.
    fn cni(&self, plugin: &str, conf: &str) -> String {
        portguard_tests::cni::add(&self.h, &self._p, plugin, conf)
    }

    /// The CNI portmap plugin claims hostPort 80 and 443 for the pod (what ServiceLB does).
    fn portmap(&self) {
        let prev = &self.pod_result;
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"cbr0","type":"portmap","capabilities":{{"portMappings":true}},"runtimeConfig":{{"portMappings":[{{"hostPort":80,"containerPort":80,"protocol":"tcp"}},{{"hostPort":443,"containerPort":443,"protocol":"tcp"}}]}},"prevResult":{prev}}}"#
        );
        self.cni("portmap", &conf);
    }

    /// Docker's own rules for the owner container publishing 80 and 443
    /// (iptables-nft and ip6tables-nft, as dockerd writes them).
    fn docker(&self) {
        for (ipt, owner, lo) in [
            ("iptables", OWNER4.to_owned(), "127.0.0.0/8"),
            ("ip6tables", format!("[{OWNER6}]"), "::1/128"),
        ] {
            let mut s = format!(
                "{ipt} -t nat -N DOCKER
                 {ipt} -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
                 {ipt} -t nat -A OUTPUT ! -d {lo} -m addrtype --dst-type LOCAL -j DOCKER
                 {ipt} -t nat -A DOCKER -i docker0 -j RETURN\n"
            );
            for port in PROTECTED {
                s += &format!(
                    "{ipt} -t nat -A DOCKER ! -i docker0 -p tcp -m tcp --dport {port} -j DNAT --to-destination {owner}:{port}\n"
                );
            }
            sh(&self.h, &s);
        }
    }

    fn reset(&self) {
        sh(
            &self.h,
            "nft flush ruleset; conntrack -F >/dev/null 2>&1 || true",
        );
    }

    /// `portguard check --json` on the host namespace: exit code and findings.
    fn check(&self) -> (i32, Vec<Value>) {
        let (code, doc) = portguard_tests::check_json(self.h.name(), &self.policy, &[]);
        assert!(code == 0 || code == 1, "check failed ({code}): {doc}");
        let findings = doc["findings"].as_array().expect("findings").clone();
        assert_eq!(
            code == 1,
            !findings.is_empty(),
            "exit code {code} with {doc}"
        );
        (code, findings)
    }

    fn ruleset(&self) -> String {
        self.h.exec(["nft", "list", "ruleset"])
    }

    /// The kernel and the inspector agree on every protected port, v4 (and v6 when asked).
    fn assert_agree(&self, families: &[&str], context: &str) -> Vec<Value> {
        let (_, findings) = self.check();
        for fam in families {
            let addr: IpAddr = if *fam == "v6" { HOST6 } else { HOST4 }.parse().unwrap();
            for port in PROTECTED {
                let kernel = ask(&self.c, addr, port);
                let kernel_hijacked = kernel.as_deref() != Some("owner");
                let inspector_hijacked = active_for(&findings, addr, port);
                // "Possibly active" because the order of equal-priority base
                // chains in different tables cannot be read: either answer of
                // the kernel agrees (the README says so).
                if inspector_hijacked
                    && !kernel_hijacked
                    && order_unknown_for(&findings, addr, port)
                {
                    continue;
                }
                assert_eq!(
                    kernel_hijacked,
                    inspector_hijacked,
                    "{context}: {addr} port {port}: kernel answer {kernel:?}, inspector findings {}\n--- ruleset ---\n{}",
                    serde_json::to_string_pretty(&findings).unwrap(),
                    self.ruleset()
                );
            }
        }
        findings
    }
}

/// Whether the inspector says a new connection from outside to `addr:port` is hijacked.
fn active_for(findings: &[Value], addr: IpAddr, port: u16) -> bool {
    findings.iter().any(|f| {
        f["port"] == port
            && f["active_paths"].as_array().unwrap().iter().any(|p| {
                p["hook"] == "prerouting" && p["daddr"].as_str() == Some(&addr.to_string())
            })
    })
}

/// Whether every finding active for `addr:port` from outside is so only
/// because of an unknown equal-priority order.
fn order_unknown_for(findings: &[Value], addr: IpAddr, port: u16) -> bool {
    let active: Vec<&Value> = findings
        .iter()
        .filter(|f| {
            f["port"] == port
                && f["active_paths"].as_array().unwrap().iter().any(|p| {
                    p["hook"] == "prerouting" && p["daddr"].as_str() == Some(&addr.to_string())
                })
        })
        .collect();
    !active.is_empty() && active.iter().all(|f| f.get("order_unknown_with").is_some())
}

fn find<'a>(findings: &'a [Value], port: u16, chain: &str) -> &'a Value {
    findings
        .iter()
        .find(|f| f["port"] == port && f["chain"] == chain)
        .unwrap_or_else(|| {
            panic!(
                "no finding for port {port} in chain {chain}: {}",
                serde_json::to_string_pretty(findings).unwrap()
            )
        })
}

#[test]
fn docker_owned_dnat_only_is_clean() {
    let lab = Lab::new();
    lab.docker();
    let findings = lab.assert_agree(&["v4", "v6"], "docker only");
    assert!(findings.is_empty(), "{findings:?}");
    assert_eq!(
        ask(&lab.c, HOST4.parse().unwrap(), 80).as_deref(),
        Some("owner")
    );
}

#[test]
fn cni_portmap_ahead_of_docker_is_active() {
    let lab = Lab::new();
    // k3s started first: portmap's PREROUTING jump comes before Docker's.
    lab.portmap();
    lab.docker();
    let findings = lab.assert_agree(&["v4"], "portmap ahead");
    for port in PROTECTED {
        let f = find(
            &findings,
            port,
            &format!("CNI-DN-{}", &cni_dn_suffix(&findings)),
        );
        assert_eq!(f["active"], true, "{f}");
        assert_eq!(f["kind"], "dnat");
        assert_eq!(f["source"], "cni-portmap");
        assert_eq!(f["target"], format!("{POD4}:{port}"));
        assert_eq!(f["origin"], "iptables-nft");
        assert!(f["handle"].as_u64().unwrap() > 0);
    }
    assert_eq!(
        ask(&lab.c, HOST4.parse().unwrap(), 80).as_deref(),
        Some("pod")
    );
}

fn cni_dn_suffix(findings: &[Value]) -> String {
    findings
        .iter()
        .filter_map(|f| f["chain"].as_str())
        .find_map(|c| c.strip_prefix("CNI-DN-"))
        .unwrap_or_else(|| panic!("no CNI-DN chain in {findings:?}"))
        .to_owned()
}

#[test]
fn cni_portmap_after_docker_is_latent() {
    let lab = Lab::new();
    lab.docker();
    lab.portmap();
    let findings = lab.assert_agree(&["v4"], "portmap after");
    let suffix = cni_dn_suffix(&findings);
    for port in PROTECTED {
        let f = find(&findings, port, &format!("CNI-DN-{suffix}"));
        // Latent for connections from outside. Docker's OUTPUT jump skips
        // 127.0.0.0/8, so portmap's OUTPUT rule does take local connections to
        // 127.0.0.1 (a true finding, on the output hook only).
        let on: Vec<&str> = f["active_on"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        assert!(!on.contains(&"prerouting"), "{f}");
        assert!(
            f["active_paths"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["daddr"] == "127.0.0.1"),
            "{f}"
        );
    }
    assert_eq!(
        ask(&lab.c, HOST4.parse().unwrap(), 443).as_deref(),
        Some("owner")
    );
}

#[test]
fn kube_proxy_iptables_chains_hijack_the_loadbalancer_ip() {
    let lab = Lab::new();
    lab.docker();
    // kube-proxy (iptables mode) prepends its jump; the LoadBalancer IP is the node's.
    sh(
        &lab.h,
        &format!(
            "iptables -t nat -N KUBE-SERVICES
             iptables -t nat -N KUBE-NODEPORTS
             iptables -t nat -N KUBE-MARK-MASQ
             iptables -t nat -N KUBE-SVC-TRAEFIKWEBSECURE
             iptables -t nat -N KUBE-EXT-TRAEFIKWEBSECURE
             iptables -t nat -N KUBE-SEP-AAAA
             iptables -t nat -N KUBE-SEP-BBBB
             iptables -t nat -I PREROUTING 1 -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES
             iptables -t nat -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
             iptables -t nat -A KUBE-SERVICES -d {CLUSTER_IP}/32 -p tcp -m comment --comment 'kube-system/traefik:web cluster IP' -m tcp --dport 80 -j KUBE-SVC-TRAEFIKWEBSECURE
             iptables -t nat -A KUBE-SERVICES -d {HOST4}/32 -p tcp -m comment --comment 'kube-system/traefik:websecure loadbalancer IP' -m tcp --dport 443 -j KUBE-EXT-TRAEFIKWEBSECURE
             iptables -t nat -A KUBE-SERVICES -m comment --comment 'kubernetes service nodeports' -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
             iptables -t nat -A KUBE-EXT-TRAEFIKWEBSECURE -m comment --comment 'masquerade traffic for kube-system/traefik:websecure external destinations' -j KUBE-MARK-MASQ
             iptables -t nat -A KUBE-EXT-TRAEFIKWEBSECURE -j KUBE-SVC-TRAEFIKWEBSECURE
             iptables -t nat -A KUBE-SVC-TRAEFIKWEBSECURE -m statistic --mode random --probability 0.5 -j KUBE-SEP-AAAA
             iptables -t nat -A KUBE-SVC-TRAEFIKWEBSECURE -j KUBE-SEP-BBBB
             iptables -t nat -A KUBE-SEP-AAAA -s {POD4}/32 -j KUBE-MARK-MASQ
             iptables -t nat -A KUBE-SEP-AAAA -p tcp -m tcp -j DNAT --to-destination {POD4}:443
             iptables -t nat -A KUBE-SEP-BBBB -s {POD4}/32 -j KUBE-MARK-MASQ
             iptables -t nat -A KUBE-SEP-BBBB -p tcp -m tcp -j DNAT --to-destination {POD4}:443"
        ),
    );
    let findings = lab.assert_agree(&["v4"], "kube-proxy iptables");
    for chain in ["KUBE-SEP-AAAA", "KUBE-SEP-BBBB"] {
        let f = find(&findings, 443, chain);
        assert_eq!(f["active"], true, "{f}");
        assert_eq!(f["source"], "kube-proxy");
    }
    assert!(findings.iter().all(|f| f["port"] == 443), "{findings:?}");
}

#[test]
fn kube_proxy_nftables_mode_vmaps_and_concatenations() {
    let lab = Lab::new();
    lab.docker();
    lab.h.nft_load(&format!(
        "table ip kube-proxy {{
            map service-ips {{
                type ipv4_addr . inet_proto . inet_service : verdict
                elements = {{ {CLUSTER_IP} . tcp . 80 : goto service-web, {HOST4} . tcp . 443 : goto external-websecure }}
            }}
            map service-nodeports {{
                type inet_proto . inet_service : verdict
                elements = {{ tcp . 30443 : goto external-websecure }}
            }}
            chain nat-prerouting {{ type nat hook prerouting priority -110; policy accept; jump services; }}
            chain mark-for-masquerade {{ meta mark set meta mark or 0x4000; }}
            chain services {{
                ip daddr . meta l4proto . th dport vmap @service-ips
                fib daddr type local ip daddr != 127.0.0.0/8 jump nodeports;
            }}
            chain nodeports {{ meta l4proto . th dport vmap @service-nodeports; }}
            chain service-web {{ goto endpoint-web; }}
            chain external-websecure {{ jump mark-for-masquerade; goto service-websecure; }}
            chain service-websecure {{ numgen random mod 2 vmap {{ 0 : goto endpoint-a, 1 : goto endpoint-b }}; }}
            chain endpoint-web {{ ip saddr {POD4} jump mark-for-masquerade; meta l4proto tcp dnat to {POD4}:80; }}
            chain endpoint-a {{ ip saddr {POD4} jump mark-for-masquerade; meta l4proto tcp dnat to {POD4}:443; }}
            chain endpoint-b {{ ip saddr {POD4} jump mark-for-masquerade; meta l4proto tcp dnat to {POD4}:443; }}
        }}"
    ));
    let findings = lab.assert_agree(&["v4"], "kube-proxy nftables");
    for chain in ["endpoint-a", "endpoint-b"] {
        let f = find(&findings, 443, chain);
        assert_eq!(f["active"], true, "{f}");
        assert_eq!(f["source"], "kube-proxy");
        assert_eq!(f["origin"], "nft");
    }
    assert!(findings.iter().all(|f| f["port"] == 443), "{findings:?}");
}

#[test]
fn ip6_and_inet_families() {
    let lab = Lab::new();
    lab.docker();
    // An inet table ahead of Docker rewriting only IPv6 (dnat ip6), and an ip6
    // table behind Docker (latent).
    lab.h.nft_load(&format!(
        "table inet early {{
            chain pre {{ type nat hook prerouting priority -150; policy accept;
                tcp dport 80 fib daddr type local dnat ip6 to [{POD6}]:80; }}
         }}
         table ip6 late {{
            chain pre {{ type nat hook prerouting priority 10; policy accept;
                ip6 daddr {HOST6} tcp dport {{ 80, 443 }} dnat to [{POD6}]; }}
         }}"
    ));
    let findings = lab.assert_agree(&["v4", "v6"], "ip6/inet");
    assert_eq!(
        ask(&lab.c, HOST6.parse().unwrap(), 80).as_deref(),
        Some("pod")
    );
    assert_eq!(
        ask(&lab.c, HOST4.parse().unwrap(), 80).as_deref(),
        Some("owner")
    );
    let early = findings
        .iter()
        .find(|f| f["table"] == "early" && f["port"] == 80)
        .expect("inet finding");
    assert_eq!(early["active"], true);
    assert_eq!(early["family"], "inet");
    for port in PROTECTED {
        let late = findings
            .iter()
            .find(|f| f["table"] == "late" && f["port"] == port)
            .expect("ip6 finding");
        assert_eq!(late["active"], false, "{late}");
        assert_eq!(late["family"], "ip6");
    }
}

#[test]
fn redirect_active_and_latent() {
    let lab = Lab::new();
    lab.docker();
    lab.h.nft_load(&format!(
        "table ip early {{ chain pre {{ type nat hook prerouting priority -190; policy accept;
            ip daddr {HOST4} tcp dport 443 redirect to :{REDIRECT_PORT};
            }}
         }}
         table ip late {{ chain pre {{ type nat hook prerouting priority 50; policy accept;
            tcp dport 80 redirect to :{REDIRECT_PORT};
            }}
         }}"
    ));
    let findings = lab.assert_agree(&["v4"], "redirect");
    assert_eq!(
        ask(&lab.c, HOST4.parse().unwrap(), 443).as_deref(),
        Some("redirect")
    );
    let early = find(&findings, 443, "pre");
    assert_eq!(early["kind"], "redirect");
    assert_eq!(early["active"], true);
    let late = findings
        .iter()
        .find(|f| f["table"] == "late" && f["port"] == 80)
        .expect("late redirect");
    assert_eq!(late["active"], false);
}

#[test]
fn dnat_via_maps_sets_and_ranges() {
    let lab = Lab::new();
    lab.docker();
    lab.h.nft_load(&format!(
        "table ip maps {{
            set protected {{ type inet_service; elements = {{ 443 }}; }}
            map to-pod {{ type ipv4_addr . inet_service : ipv4_addr . inet_service;
                elements = {{ {HOST4} . 443 : {POD4} . 443 }}; }}
            chain pre {{ type nat hook prerouting priority -120; policy accept;
                tcp dport 400-450 tcp dport @protected dnat ip to ip daddr . tcp dport map @to-pod;
            }}
         }}
         table ip portmap {{
            chain pre {{ type nat hook prerouting priority -90; policy accept;
                dnat to tcp dport map {{ 80 : {POD4}, 443 : {POD4} }};
            }}
         }}"
    ));
    let findings = lab.assert_agree(&["v4"], "maps");
    let concat = findings
        .iter()
        .find(|f| f["table"] == "maps" && f["port"] == 443)
        .expect("concat map finding");
    assert_eq!(concat["active"], true);
    assert_eq!(concat["target"], format!("{POD4}:443"));
    for port in PROTECTED {
        let f = findings
            .iter()
            .find(|f| f["table"] == "portmap" && f["port"] == port)
            .expect("port map finding");
        assert_eq!(f["active"], false, "shadowed by Docker at -100: {f}");
    }
}

/// NETMAP rewrites the destination like a DNAT: to the probe's address with its
/// network part replaced. (Every target iptables ships is classified now; an
/// unknown target in a nat chain, "unclassified", is covered by the unit tests,
/// since a kernel only loads targets it has.)
#[test]
fn netmap_is_a_dnat_to_the_mapped_address() {
    let lab = Lab::new();
    lab.docker();
    sh(
        &lab.h,
        "iptables -t nat -I PREROUTING 1 -p tcp --dport 443 -j NETMAP --to 203.0.113.0/26",
    );
    let findings = lab.assert_agree(&["v4"], "netmap");
    let f = find(&findings, 443, "PREROUTING");
    assert_eq!(f["kind"], "dnat");
    assert_eq!(f["active"], true);
    assert_eq!(f["target"], "203.0.113.1:443", "{f}");
    assert_eq!(
        f["reason"],
        "DNAT to 203.0.113.1:443 in a nat chain at prerouting (iptables target NETMAP to 203.0.113.0/26)"
    );
}

#[test]
fn legacy_iptables_rules_are_read() {
    let lab = Lab::new();
    let probe = lab
        .h
        .command(["iptables-legacy", "-t", "nat", "-S"])
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "iptables-legacy cannot use the nat table here: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    // Everything in x_tables: Docker's DNAT, and a foreign one inserted ahead.
    sh(
        &lab.h,
        &format!(
            "iptables-legacy -t nat -N DOCKER
             iptables-legacy -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
             iptables-legacy -t nat -A DOCKER ! -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination {OWNER4}:80
             iptables-legacy -t nat -A DOCKER ! -i docker0 -p tcp -m tcp --dport 443 -j DNAT --to-destination {OWNER4}:443
             iptables-legacy -t nat -N CNI-HOSTPORT-DNAT
             iptables-legacy -t nat -I PREROUTING 1 -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
             iptables-legacy -t nat -A CNI-HOSTPORT-DNAT -p tcp -m multiport --dports 443 -j DNAT --to-destination {POD4}:443"
        ),
    );
    let findings = lab.assert_agree(&["v4"], "legacy");
    let f = find(&findings, 443, "CNI-HOSTPORT-DNAT");
    assert_eq!(f["origin"], "iptables-legacy");
    assert_eq!(f["active"], true);
    assert!(f["handle"].is_null());
    assert_eq!(f["position"], 1);
    sh(
        &lab.h,
        "iptables-legacy -t nat -F; iptables-legacy -t nat -X",
    );
}

/// A seeded generator of foreign rulesets around Docker's, checked against the kernel.
#[test]
fn random_rulesets_agree_with_the_kernel() {
    let cases: u64 = std::env::var("PG_NFT_RANDOM_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("PG_NFT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    let lab = Lab::new();
    let mut rng = Rng(seed);
    let mut hijacked = 0;
    let mut latent = 0;
    let mut shadows = 0;
    let mut skipped = 0;
    let mut iptables = 0;
    for case in 0..cases {
        lab.reset();
        let docker_first = rng.below(3) != 0;
        if docker_first {
            lab.docker();
        }
        let items = 1 + rng.below(3);
        let mut script = String::new();
        for i in 0..items {
            script += &random_item(&mut rng, i);
        }
        if !try_nft_load(&lab.h, &script) {
            // A combination nft itself rejects: not a case.
            skipped += 1;
            continue;
        }
        if !docker_first {
            lab.docker();
        }
        if rng.below(3) == 0 {
            iptables += 1;
            sh(&lab.h, &random_iptables_item(&mut rng));
        }
        let findings = lab.assert_agree(&["v4", "v6"], &format!("seed {seed} case {case}"));
        hijacked += findings
            .iter()
            .filter(|f| f["active"] == true && f["kind"] != "shadow")
            .count();
        latent += findings.iter().filter(|f| f["active"] == false).count();
        shadows += findings.iter().filter(|f| f["kind"] == "shadow").count();
    }
    eprintln!(
        "{cases} random rulesets ({skipped} rejected by nft, {iptables} with iptables-nft rules): \
         {hijacked} active and {latent} latent findings, {shadows} rules shadowing the owner, \
         all agreeing with the kernel"
    );
    assert!(
        skipped * 4 < cases,
        "too many generated rulesets rejected: {skipped}"
    );
    assert!(
        hijacked > 0 && latent > 0,
        "the generator must produce both kinds"
    );
}

/// A foreign chain written with iptables-nft commands, jumped to from PREROUTING
/// ahead of Docker's jump (`-I 1`) or behind it (`-A`).
fn random_iptables_item(rng: &mut Rng) -> String {
    let place = rng.pick(&["-I PREROUTING 1", "-A PREROUTING"]);
    let jump_cond = rng.pick(&["-m addrtype --dst-type LOCAL", "", "-d 198.51.100.1/32"]);
    let port = rng.pick(&[
        "-p tcp -m tcp --dport 443",
        "-p tcp -m multiport --dports 80,443",
        "-p tcp -m tcp --dport 79:81",
        "-p tcp -m tcp --dport 8443",
        "-p udp -m udp --dport 80",
    ]);
    let cond = rng.pick(&[
        "",
        "-d 198.51.100.1/32",
        "-d 192.0.2.1/32",
        "! -i docker0",
        "-i docker0",
        "-m conntrack --ctstate NEW",
        "-m conntrack --ctstate ESTABLISHED",
        "-m conntrack ! --ctstate NEW",
        "-m state --state NEW",
        "-m iprange --dst-range 198.51.100.0-198.51.100.9",
        "-m iprange --dst-range 192.0.2.1-192.0.2.9",
    ]);
    let target = rng.pick(&[
        "-j DNAT --to-destination 203.0.113.130",
        "-j REDIRECT --to-ports 8080",
        "-j MARK --set-mark 1",
        // Nothing rewritten, but the owner's mapping is skipped (issue 14,
        // class 5): ACCEPT ends the nat hook, RETURN too when in PREROUTING
        // itself (iptables refuses DROP in nat; the nft tables drop).
        "-j ACCEPT",
        "-j RETURN",
    ]);
    let comment = "-m comment --comment 'random foreign rule'";
    if rng.below(3) == 0 {
        // Straight into PREROUTING, where a RETURN skips Docker's jump.
        return format!("iptables -t nat {place} {port} {cond} {comment} {target}");
    }
    format!(
        "iptables -t nat -N FOREIGN
         iptables -t nat {place} {jump_cond} -j FOREIGN
         iptables -t nat -A FOREIGN {port} {cond} {comment} {target}"
    )
}

fn try_nft_load(ns: &NetNs, ruleset: &str) -> bool {
    let mut child = ns
        .command(["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ruleset.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        eprintln!(
            "nft rejected a generated ruleset: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// xorshift64*: enough randomness for rule shapes, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len() as u64) as usize]
    }
}

/// One foreign nft table: a nat base chain at a random priority (never Docker's
/// -100, where order is registration order), a random port match, address
/// condition and action, sometimes behind a jump, goto or verdict map.
fn random_item(rng: &mut Rng, i: u64) -> String {
    let prio = rng.pick(&["-190", "-150", "-101", "-100", "-99", "0", "100"]);
    let family = rng.pick(&["ip", "inet", "ip6"]);
    let port = rng.pick(&[
        "tcp dport 80",
        "tcp dport 443",
        "tcp dport { 80, 443 }",
        "tcp dport 79-81",
        "th dport 443",
        "tcp dport @ports",
        "tcp dport 8443",
        "udp dport 80",
        "",
    ]);
    const COMMON_CONDS: [&str; 5] = [
        "",
        "fib daddr type local",
        "ct state new",
        "iifname \"vclient\"",
        "iifname \"docker0\"",
    ];
    const V4_CONDS: [&str; 6] = [
        "ip daddr 198.51.100.1",
        "ip daddr 192.0.2.1",
        "ip saddr 198.51.100.0/24",
        "ip daddr != 198.51.100.1",
        // Concatenations, one with an interval.
        "ip daddr . tcp dport { 198.51.100.1 . 80, 192.0.2.1 . 443 }",
        "ip daddr . tcp dport { 198.51.100.0/28 . 440-450 }",
    ];
    const V6_CONDS: [&str; 6] = [
        "ip6 daddr 2001:db8:1::1",
        "ip6 daddr 2001:db8::99",
        "ip6 saddr 2001:db8:1::/64",
        "ip6 daddr != 2001:db8:1::1",
        "ip6 daddr . tcp dport { 2001:db8:1::1 . 80, 2001:db8::99 . 443 }",
        "ip6 daddr . tcp dport { 2001:db8:1::/64 . 440-450 }",
    ];
    const V4_ACTIONS: [&str; 6] = [
        "dnat ip to 203.0.113.130",
        "dnat ip to th dport map { 80 : 203.0.113.130, 443 : 203.0.113.130 }",
        // A catch-all element: every port but 22.
        "dnat ip to th dport map { 22 : 203.0.113.130, * : 203.0.113.130 }",
        // Load-balancing maps (what kube-proxy's nftables mode and others write).
        "dnat ip to numgen inc mod 2 map { 0 : 203.0.113.130, 1 : 203.0.113.130 }",
        "dnat ip to jhash ip saddr mod 2 map { 0 : 203.0.113.130, 1 : 203.0.113.130 }",
        // An interval map.
        "dnat ip to th dport map { 70-90 : 203.0.113.130, 440-450 : 203.0.113.130 }",
    ];
    const V6_ACTIONS: [&str; 6] = [
        "dnat ip6 to 2001:db8:c::2",
        "dnat ip6 to th dport map { 80 : 2001:db8:c::2, 443 : 2001:db8:c::2 }",
        "dnat ip6 to th dport map { 22 : 2001:db8:c::2, * : 2001:db8:c::2 }",
        "dnat ip6 to numgen inc mod 2 map { 0 : 2001:db8:c::2, 1 : 2001:db8:c::2 }",
        "dnat ip6 to jhash ip6 saddr mod 2 map { 0 : 2001:db8:c::2, 1 : 2001:db8:c::2 }",
        "dnat ip6 to th dport map { 70-90 : 2001:db8:c::2, 440-450 : 2001:db8:c::2 }",
    ];
    // `accept` ends only its own base chain (Docker's still runs); `drop`
    // ends the connection: the owner's mapping is shadowed.
    const COMMON_ACTIONS: [&str; 4] = [
        "meta l4proto tcp redirect to :8080",
        "accept",
        "counter",
        "drop",
    ];
    // inet tables carry either; one rule does not mix ip and ip6 (nft refuses).
    let v6 = match family {
        "ip" => false,
        "ip6" => true,
        _ => rng.below(2) == 0,
    };
    let (conds, actions): (Vec<&str>, Vec<&str>) = if v6 {
        (
            [&COMMON_CONDS[..], &V6_CONDS[..]].concat(),
            [&COMMON_ACTIONS[..], &V6_ACTIONS[..]].concat(),
        )
    } else {
        (
            [&COMMON_CONDS[..], &V4_CONDS[..]].concat(),
            [&COMMON_ACTIONS[..], &V4_ACTIONS[..]].concat(),
        )
    };
    let cond = rng.pick(&conds);
    let action = rng.pick(&actions);
    let action = match family {
        "ip" => action.replace("dnat ip to", "dnat to"),
        "ip6" => action.replace("dnat ip6 to", "dnat to"),
        _ => action.to_owned(),
    };
    // A rule with no port match rewrites every port: keep those on known ports.
    let (port, action) = if port.is_empty() && action.starts_with("redirect") {
        ("tcp dport 443", action)
    } else {
        (port, action)
    };
    let shape = rng.below(5);
    let body = format!("{cond} {port} {action}");
    let chains = match shape {
        0 => format!("chain pre {{ type nat hook prerouting priority {prio}; policy accept; {body}; }}"),
        1 => format!(
            "chain pre {{ type nat hook prerouting priority {prio}; policy accept; {cond} jump sub; counter; }}
             chain sub {{ {port} {action}; }}"
        ),
        2 => format!(
            "chain pre {{ type nat hook prerouting priority {prio}; policy accept; {port} goto sub; }}
             chain sub {{ {cond} {action}; }}"
        ),
        3 => format!(
            "chain pre {{ type nat hook prerouting priority {prio}; policy accept;
                 meta l4proto . th dport vmap {{ tcp . 80 : jump sub, tcp . 443 : jump sub, udp . 80 : jump sub }}; }}
             chain sub {{ {cond} {action}; }}"
        ),
        // A verdict map with a catch-all element.
        _ => format!(
            "chain pre {{ type nat hook prerouting priority {prio}; policy accept;
                 th dport vmap {{ 22 : accept, * : jump sub }}; }}
             chain sub {{ {cond} {port} {action}; }}"
        ),
    };
    // Now and then a dormant table: nothing in it runs.
    let dormant = if rng.below(6) == 0 {
        "flags dormant\n"
    } else {
        ""
    };
    // The named set `@ports`: plain, or an interval set.
    let set = if rng.below(2) == 0 {
        "set ports { type inet_service; elements = { 443, 8443 }; }"
    } else {
        "set ports { type inet_service; flags interval; elements = { 440-450, 8000-8999 }; }"
    };
    format!(
        "table {family} foreign{i} {{
            {dormant}{set}
            {chains}
        }}\n"
    )
}

#[test]
fn missing_netns_is_an_error_not_a_panic() {
    require_root();
    let out = Command::new(portguard_bin())
        .args(["check", "--json", "--netns", "pg-nft-does-not-exist"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("network namespace"));
}

#[test]
fn huge_ruleset_is_inspected_whole() {
    require_root();
    const RULES: usize = 20_000;
    let ns = NetNs::new("pg-nft-huge");
    sh(
        &ns,
        "ip link add big0 type veth peer name big1
         ip addr add 198.51.100.1/24 dev big0
         ip link set big0 up",
    );
    let mut text = String::from(
        "table ip big {\n chain pre {\n  type nat hook prerouting priority -100; policy accept;\n",
    );
    for i in 0..RULES {
        text += &format!(
            "  ip daddr 192.0.2.{} tcp dport {} dnat to 203.0.113.{}\n",
            i % 250 + 1,
            1024 + i,
            i % 250 + 1
        );
    }
    // The one rule that matters, last of 20,001.
    text += "  tcp dport 443 dnat to 203.0.113.9:8443\n }\n}\n";
    ns.nft_load(&text);
    let policy = std::env::temp_dir().join(unique_name("pg-nft-policy") + ".toml");
    std::fs::write(&policy, POLICY).unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(portguard_bin())
        .args(["check", "--json", "--netns", ns.name(), "--config"])
        .arg(&policy)
        .output()
        .unwrap();
    let took = started.elapsed();
    let _ = std::fs::remove_file(&policy);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = doc["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0]["port"], 443);
    assert_eq!(findings[0]["position"], RULES + 1);
    assert_eq!(findings[0]["target"], "203.0.113.9:8443");
    assert_eq!(findings[0]["active"], true);
    assert!(took < Duration::from_secs(20), "check took {took:?}");
}

#[test]
fn malformed_policy_is_an_error() {
    require_root();
    let policy = std::env::temp_dir().join(unique_name("pg-nft-policy") + ".toml");
    std::fs::write(&policy, "[[ports]]\nport = \"eighty\"\n").unwrap();
    let out = Command::new(portguard_bin())
        .args(["check", "--config"])
        .arg(&policy)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&policy);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// At equal priority the kernel runs the most recently registered nat chain
/// first: kube-proxy's nftables table at dstnat (-100), created after Docker's
/// iptables-nft nat table, wins; created before it, it is shadowed.
#[test]
fn equal_priority_in_other_tables_is_possibly_active_in_either_order() {
    let table = format!(
        "table ip kube-proxy {{
            chain nat-prerouting {{
                type nat hook prerouting priority dstnat; policy accept;
                ip daddr {HOST4} tcp dport 80 dnat to {POD4}
            }}
        }}"
    );
    for docker_first in [true, false] {
        let lab = Lab::new();
        if docker_first {
            lab.docker();
            lab.h.nft_load(&table);
        } else {
            lab.h.nft_load(&table);
            lab.docker();
        }
        let findings = lab.assert_agree(&["v4"], &format!("docker first: {docker_first}"));
        let f = find(&findings, 80, "nat-prerouting");
        // The kernel runs the newest-registered first, which a dump does not
        // show (a chain added later to an older table registers later): in
        // both orders the foreign DNAT counts as possibly active, naming
        // Docker's chain it may run before.
        assert_eq!(f["active"], true, "{f}");
        assert_eq!(
            f["order_unknown_with"],
            serde_json::json!(["ip nat PREROUTING"]),
            "{f}"
        );
        assert!(
            f["reason"].as_str().unwrap().contains("cannot be read"),
            "{f}"
        );
        let answer = ask(&lab.c, HOST4.parse().unwrap(), 80);
        let expected = if docker_first { "pod" } else { "owner" };
        assert_eq!(answer.as_deref(), Some(expected));
    }
}

/// Issue 14, class 1: catch-all (`*`) elements of maps and verdict maps are
/// what the kernel uses for every key no other element has.
#[test]
fn catch_all_elements_decide_like_the_kernel() {
    let lab = Lab::new();
    // A DNAT map whose catch-all takes every other port (80 and 443 too).
    lab.docker();
    lab.h.nft_load(&format!(
        "table ip f {{
            chain pre {{
                type nat hook prerouting priority -150; policy accept;
                dnat to tcp dport map {{ 22 : {POD4}, * : {POD4} }}
            }}
        }}"
    ));
    let f = lab.assert_agree(&["v4"], "catch-all map");
    assert!(active_for(&f, HOST4.parse().unwrap(), 80), "missed hijack");
    // A verdict map whose catch-all jumps to a chain that DNATs 443.
    lab.reset();
    lab.docker();
    lab.h.nft_load(&format!(
        "table ip g {{
            chain s {{
                tcp dport 443 dnat to {POD4}
            }}
            chain pre {{
                type nat hook prerouting priority -150; policy accept;
                tcp dport vmap {{ 22 : accept, * : jump s }}
            }}
        }}"
    ));
    let f = lab.assert_agree(&["v4"], "catch-all verdict map");
    assert!(active_for(&f, HOST4.parse().unwrap(), 443), "missed hijack");
    // The reverse: a catch-all accept ahead of a DNAT keeps it from running.
    lab.reset();
    lab.docker();
    lab.h.nft_load(&format!(
        "table ip h {{
            chain pre {{
                type nat hook prerouting priority -150; policy accept;
                fib daddr type vmap {{ unicast : return, * : accept }}
                tcp dport 80 dnat to {POD4}
            }}
        }}"
    ));
    let f = lab.assert_agree(&["v4"], "catch-all accept ahead of a DNAT");
    assert!(!active_for(&f, HOST4.parse().unwrap(), 80), "false alarm");
}

/// Issue 14, class 2: a dormant table's rules never run.
#[test]
fn a_dormant_table_is_not_analysed_as_live() {
    let lab = Lab::new();
    lab.docker();
    lab.h.nft_load(&format!(
        "table ip f {{
            flags dormant
            chain pre {{
                type nat hook prerouting priority -150; policy accept;
                tcp dport 80 dnat to {POD4}
            }}
        }}"
    ));
    let f = lab.assert_agree(&["v4"], "dormant table");
    assert!(
        f.iter().all(|f| f["active"] == false),
        "nothing in a dormant table is active: {f:?}"
    );
    // Woken up, it runs: the same rule is a live hijack.
    sh(&lab.h, "nft add table ip f");
    let f = lab.assert_agree(&["v4"], "the table woken up");
    assert!(active_for(&f, HOST4.parse().unwrap(), 80));
}

/// Issue 14, class 4: the xt matches iptables-nft emits for `-m state`,
/// `-m conntrack --ctstate` and `-m iprange` are decoded, not "maybe".
#[test]
fn xt_conntrack_state_and_iprange_decide_like_the_kernel() {
    let lab = Lab::new();
    let cases = [
        // Only established connections are sent away: a new one reaches the owner.
        format!(
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 80 -m conntrack --ctstate ESTABLISHED -j DNAT --to-destination {POD4}:80"
        ),
        // New ones are: a live hijack.
        format!(
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 80 -m conntrack --ctstate NEW -j DNAT --to-destination {POD4}:80"
        ),
        format!(
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 80 -m conntrack ! --ctstate NEW -j DNAT --to-destination {POD4}:80"
        ),
        // `-m state --state NEW -j RETURN` ahead of a DNAT, in a chain of its own.
        format!(
            "iptables -t nat -N HIJ
             iptables -t nat -I PREROUTING 1 -j HIJ
             iptables -t nat -A HIJ -m state --state NEW -j RETURN
             iptables -t nat -A HIJ -p tcp --dport 80 -j DNAT --to-destination {POD4}:80"
        ),
        // A destination range without this host's address, and one with it.
        format!(
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 80 -m iprange --dst-range 192.0.2.1-192.0.2.9 -j DNAT --to-destination {POD4}:80"
        ),
        format!(
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 80 -m iprange --dst-range 198.51.100.0-198.51.100.9 -j DNAT --to-destination {POD4}:80"
        ),
        format!(
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 80 -m iprange ! --dst-range 198.51.100.0-198.51.100.9 -j DNAT --to-destination {POD4}:80"
        ),
    ];
    for case in &cases {
        lab.reset();
        lab.docker();
        sh(&lab.h, case);
        let f = lab.assert_agree(&["v4"], case);
        assert!(
            f.iter().all(|f| f["reason"]
                .as_str()
                .is_none_or(|r| !r.contains("cannot be decoded"))),
            "{case}: {f:?}"
        );
    }
}

/// Class 5 of issue 14: a foreign rule that takes new connections away before
/// Docker's DNAT rewrites nothing, yet the owner's port is dead (the kernel
/// refuses the connection). `check` names the rule as its own kind, in every
/// shape that takes the connection: ACCEPT in a chain of its own, RETURN and
/// goto in PREROUTING, DROP; IPv6 too. What does not take it (another port,
/// a RETURN that goes back to PREROUTING) is not named.
#[test]
fn a_foreign_rule_that_shadows_dockers_mapping_is_named() {
    let lab = Lab::new();
    /// The family, port and chain of the rule named, or none.
    type Shadowed<'a> = Option<(&'a str, u16, &'a str)>;
    let cases: [(&str, Shadowed<'_>); 7] = [
        (
            "iptables -t nat -N FOREIGN
             iptables -t nat -I PREROUTING 1 -j FOREIGN
             iptables -t nat -A FOREIGN -p tcp -j ACCEPT",
            Some(("v4", 80, "FOREIGN")),
        ),
        (
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 443 -j RETURN",
            Some(("v4", 443, "PREROUTING")),
        ),
        (
            "iptables -t nat -N FOREIGN
             iptables -t nat -A FOREIGN -j RETURN
             iptables -t nat -I PREROUTING 1 -p tcp -g FOREIGN",
            Some(("v4", 80, "PREROUTING")),
        ),
        (
            "ip6tables -t nat -N FOREIGN
             ip6tables -t nat -I PREROUTING 1 -j FOREIGN
             ip6tables -t nat -A FOREIGN -p tcp --dport 80 -j ACCEPT",
            Some(("v6", 80, "FOREIGN")),
        ),
        (
            "nft add table ip f
             nft add chain ip f pre '{ type nat hook prerouting priority -150; }'
             nft add rule ip f pre tcp dport 80 drop",
            Some(("v4", 80, "pre")),
        ),
        (
            "iptables -t nat -I PREROUTING 1 -p tcp --dport 22 -j ACCEPT",
            None,
        ),
        (
            "iptables -t nat -N FOREIGN
             iptables -t nat -I PREROUTING 1 -j FOREIGN
             iptables -t nat -A FOREIGN -p tcp -j RETURN",
            None,
        ),
    ];
    for (rules, shadowed) in cases {
        lab.reset();
        lab.docker();
        sh(&lab.h, rules);
        let findings = lab.assert_agree(&["v4", "v6"], rules);
        let shadows: Vec<&Value> = findings.iter().filter(|f| f["kind"] == "shadow").collect();
        let Some((fam, port, chain)) = shadowed else {
            assert!(findings.is_empty(), "{rules}: {findings:?}");
            for port in PROTECTED {
                assert_eq!(
                    ask(&lab.c, HOST4.parse().unwrap(), port).as_deref(),
                    Some("owner")
                );
            }
            continue;
        };
        // The kernel: the owner's port is dead on that family.
        let addr: IpAddr = if fam == "v6" { HOST6 } else { HOST4 }.parse().unwrap();
        assert_eq!(
            ask(&lab.c, addr, port),
            None,
            "{rules}: the kernel still reached someone"
        );
        let on_port: Vec<&&Value> = shadows.iter().filter(|f| f["port"] == port).collect();
        assert_eq!(on_port.len(), 1, "{rules}: {findings:?}");
        let s = on_port[0];
        assert_eq!(
            (s["port"].as_u64(), s["chain"].as_str()),
            (Some(u64::from(port)), Some(chain)),
            "{s}"
        );
        assert_eq!(s["active"], true, "{s}");
        assert!(s.get("target").is_none_or(Value::is_null), "{s}");
        let owner = if fam == "v6" {
            format!("[{OWNER6}]:{port}")
        } else {
            format!("{OWNER4}:{port}")
        };
        assert_eq!(s["shadows"], serde_json::json!([owner]), "{s}");
        assert!(
            s["reason"]
                .as_str()
                .unwrap()
                .contains("ahead of the owner's mapping"),
            "{s}"
        );
        // Nothing else is reported: Docker's DNAT is the owner's.
        assert_eq!(shadows.len(), findings.len(), "{rules}: {findings:?}");
        // The table a person reads says it too.
        let out = lab
            .h
            .command([
                portguard_bin().to_str().unwrap(),
                "check",
                "--config",
                lab.policy.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("shadows the owner") && text.contains(&format!("keeps from {owner}")),
            "{text}"
        );
    }
}
