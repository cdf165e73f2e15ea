//! The incident, rebuilt in namespaces made for one test (the same topology as
//! `tests/nft_inspect.rs`):
//! - host `h`: 198.51.100.1/24 towards the client; a Docker-like bridge
//!   `docker0` 203.0.113.1/26; the CNI bridge `cni0` 203.0.113.128/25 made by
//!   the real CNI bridge plugin.
//! - owner `o` (the "container", 203.0.113.2) answers `site` on 80 and 443.
//! - pod `p` ("Traefik", 203.0.113.130) answers `404 page not found`.
//! - client `c` (198.51.100.2) opens connections to the host's address.
//!
//! Docker's DNAT is reproduced with iptables-nft inside `h`, exactly as dockerd
//! writes it (dockerd itself only programs the real host's ruleset); the
//! hijack is the real CNI `portmap` plugin giving the pod hostPort 80/443.

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use crate::{netns::NetNs, require_root, run, unique_name};

pub const HOST4: &str = "198.51.100.1";
pub const OWNER4: &str = "203.0.113.2";
pub const POD4: &str = "203.0.113.130";
pub const PROTECTED: [u16; 2] = [80, 443];
pub const SITE: &str = "site";
pub const TRAEFIK_404: &str = "404 page not found";

pub use crate::netns::{Server, in_ns};

/// One new connection from inside the current thread's namespace: who answered.
pub fn ask_here(addr: IpAddr, port: u16, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), timeout).ok()?;
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

pub fn sh(ns: &NetNs, script: &str) -> String {
    run(&mut ns.command(["sh", "-euc", script]))
}

pub struct IncidentLab {
    pub h: NetNs,
    pub c: NetNs,
    pub o: NetNs,
    pub p: NetNs,
    servers: Vec<Server>,
    pod_result: String,
    ipam: PathBuf,
    /// A policy file for tcp/80 and tcp/443 owned by Docker.
    pub policy: PathBuf,
}

impl Drop for IncidentLab {
    fn drop(&mut self) {
        self.servers.clear();
        let _ = std::fs::remove_file(&self.policy);
        let _ = std::fs::remove_dir_all(&self.ipam);
    }
}

impl IncidentLab {
    /// The namespaces, the bridges, the servers; `pin` goes into the policy.
    pub fn new(pin: bool) -> Self {
        require_root();
        let h = NetNs::new("pg-rem-h");
        let c = NetNs::new("pg-rem-c");
        let o = NetNs::new("pg-rem-o");
        let p = NetNs::new("pg-rem-p");
        sh(
            &h,
            &format!(
                "sysctl -qw net.ipv4.ip_forward=1
                 ip link add vclient type veth peer name eth0 netns {c}
                 ip addr add {HOST4}/24 dev vclient
                 ip link set vclient up
                 ip link add docker0 type bridge
                 ip addr add 203.0.113.1/26 dev docker0
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
             ip link set eth0 up",
        );
        sh(
            &o,
            &format!(
                "ip addr add {OWNER4}/26 dev eth0
                 ip link set eth0 up
                 ip route add default via 203.0.113.1"
            ),
        );
        let ipam = std::env::temp_dir().join(unique_name("pg-rem-ipam"));
        let policy = std::env::temp_dir().join(unique_name("pg-rem-policy") + ".toml");
        let mut text = String::from("mode = \"enforce\"\n");
        for port in PROTECTED {
            text += &format!("[[ports]]\nport = {port}\nowner = \"docker\"\npin = {pin}\n");
        }
        std::fs::write(&policy, text).unwrap();
        let mut lab = Self {
            h,
            c,
            o,
            p,
            servers: Vec::new(),
            pod_result: String::new(),
            ipam,
            policy,
        };
        let bridge_conf = crate::cni::bridge_conf(&lab.ipam);
        let result = lab.cni("bridge", &bridge_conf);
        assert!(
            result.contains(POD4),
            "the bridge plugin gave the pod {result}"
        );
        lab.pod_result = result;
        for port in PROTECTED {
            lab.servers.push(Server::start(&lab.o, port, SITE));
            lab.servers.push(Server::start(&lab.p, port, TRAEFIK_404));
        }
        lab
    }

    /// Runs a real CNI plugin for the pod, in the host namespace.
    fn cni(&self, plugin: &str, conf: &str) -> String {
        crate::cni::add(&self.h, &self.p, plugin, conf)
    }

    /// Docker's own rules for the owner publishing 80 and 443 (iptables-nft).
    pub fn docker(&self) {
        let mut s = "iptables -t nat -N DOCKER
             iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
             iptables -t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
             iptables -t nat -A DOCKER -i docker0 -j RETURN\n"
            .to_owned();
        for port in PROTECTED {
            s += &format!(
                "iptables -t nat -A DOCKER ! -i docker0 -p tcp -m tcp --dport {port} -j DNAT --to-destination {OWNER4}:{port}\n"
            );
        }
        sh(&self.h, &s);
    }

    /// The hijack: the CNI portmap plugin gives the pod hostPort 80 and 443 (what
    /// ServiceLB's svclb-traefik pods get), and its PREROUTING jump is moved
    /// first, ahead of Docker's (k3s started before Docker).
    pub fn hijack(&self) {
        let prev = &self.pod_result;
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"cbr0","type":"portmap","capabilities":{{"portMappings":true}},"runtimeConfig":{{"portMappings":[{{"hostPort":80,"containerPort":80,"protocol":"tcp"}},{{"hostPort":443,"containerPort":443,"protocol":"tcp"}}]}},"prevResult":{prev}}}"#
        );
        self.cni("portmap", &conf);
        sh(
            &self.h,
            "iptables -t nat -D PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
             iptables -t nat -I PREROUTING 1 -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        );
    }

    /// Who answers a new connection from the client to the host's address.
    pub fn ask(&self, port: u16) -> Option<String> {
        in_ns(self.c.name(), move || {
            ask_here(HOST4.parse().unwrap(), port, Duration::from_millis(1500))
        })
    }

    /// `iptables -t nat -S CHAIN` in the host namespace.
    pub fn iptables_chain(&self, chain: &str) -> String {
        sh(&self.h, &format!("iptables -t nat -S {chain}"))
    }

    /// The ruleset with handles and without counters (`-s`): a stray packet
    /// must not make two listings of the same rules differ.
    pub fn ruleset(&self) -> String {
        self.h.exec(["nft", "-a", "-s", "list", "ruleset"])
    }
}
