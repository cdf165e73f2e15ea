//! Owned or foreign, and who wrote a foreign rule (from what the rule says about
//! itself: table and chain names, comments, the target being a pod address).

use std::net::{IpAddr, SocketAddr};

use super::{
    OwnedTargets,
    analysis::Rewrite,
    local::LocalAddr,
    model::{Family, Table, TableOrigin},
};
use crate::policy::Proto;

/// Docker's nat chains, in the iptables table `nat` (iptables-nft or legacy):
/// `DOCKER` (published ports of bridge networks) and `DOCKER-INGRESS` (swarm's
/// routing mesh).
const DOCKER_NAT_CHAINS: [&str; 2] = ["DOCKER", "DOCKER-INGRESS"];
const DOCKER_TABLE: &str = "nat";
/// Docker's nftables firewall backend (Docker 29+, `--firewall-backend=nftables`)
/// keeps all its rules in its own tables `ip docker-bridges` / `ip6 docker-bridges`.
const DOCKER_NFT_TABLE: &str = "docker-bridges";
/// Interfaces that are Docker bridges whatever the owners model says: the
/// default one (`docker0`), swarm's `docker_gwbridge`, user-defined networks (`br-<id>`).
const DOCKER_BRIDGE_PREFIXES: [&str; 2] = ["docker", "br-"];
/// Pod and service ranges Kubernetes distributions use by default.
const KNOWN_POD_RANGES: [(&str, [u8; 4], u8); 4] = [
    ("k3s pod network", [10, 42, 0, 0], 16),
    ("k3s service network", [10, 43, 0, 0], 16),
    ("flannel pod network", [10, 244, 0, 0], 16),
    ("kubernetes service network", [10, 96, 0, 0], 12),
];

/// Whether the rewrite is the owner's own mapping for `proto`/`port`.
pub fn is_owned(
    rewrite: &Rewrite,
    proto: Proto,
    port: u16,
    table: &Table,
    chain: &str,
    owned: &OwnedTargets,
    local: &[LocalAddr],
) -> bool {
    let Rewrite::Dnat {
        addr: Some(addr),
        port: to_port,
    } = rewrite
    else {
        return false;
    };
    let target = SocketAddr::new(*addr, to_port.unwrap_or(port));
    if owned
        .targets
        .get(&(proto, port))
        .is_some_and(|t| t.contains(&target))
    {
        return true;
    }
    docker_managed(table, chain) && in_docker_bridge(*addr, local, owned)
}

/// Whether `chain` of `table` is a place Docker manages: its rules are the
/// owner's until shown otherwise, and portguard never removes them (it reports).
pub fn docker_managed(table: &Table, chain: &str) -> bool {
    if !matches!(table.family, Family::IP | Family::IP6) {
        return false;
    }
    match table.origin {
        TableOrigin::IptablesNft | TableOrigin::IptablesLegacy => {
            table.name == DOCKER_TABLE && DOCKER_NAT_CHAINS.contains(&chain)
        }
        TableOrigin::Nft => table.name == DOCKER_NFT_TABLE,
    }
}

/// Whether `addr` lies behind one of Docker's bridges (a subnet of this host's
/// address on that bridge).
fn in_docker_bridge(addr: IpAddr, local: &[LocalAddr], owned: &OwnedTargets) -> bool {
    local.iter().any(|l| {
        (DOCKER_BRIDGE_PREFIXES
            .iter()
            .any(|p| l.ifname.starts_with(p))
            || owned.docker_bridges.contains(&l.ifname))
            && l.subnet_contains(addr)
    })
}

/// The bridge interface behind which `addr` lives, if it is one of Docker's
/// (or any local subnet's interface, as a last resort): where traffic from
/// the owner's own containers arrives.
pub fn bridge_of(addr: IpAddr, local: &[LocalAddr]) -> Option<&str> {
    local
        .iter()
        .filter(|l| !l.addr.is_loopback() && l.subnet_contains(addr))
        .max_by_key(|l| l.prefix_len)
        .map(|l| l.ifname.as_str())
}

/// Who a foreign rule most likely belongs to, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    pub source: String,
    pub evidence: Vec<String>,
}

pub fn attribute(
    table: &Table,
    chain_path: &[&str],
    comment: Option<&str>,
    target: Option<IpAddr>,
) -> Attribution {
    let mut evidence = Vec::new();
    let mut source: Option<&str> = None;
    let mut claim = |s: &'static str, why: String, evidence: &mut Vec<String>| {
        source.get_or_insert(s);
        evidence.push(why);
    };
    match table.name.as_str() {
        "kube-proxy" => claim("kube-proxy", "table kube-proxy".into(), &mut evidence),
        "cni_hostport" | "cni_portmap" => {
            claim(
                "cni-portmap",
                format!("table {}", table.name),
                &mut evidence,
            );
        }
        _ => {}
    }
    for c in chain_path {
        if c.starts_with("KUBE-") {
            claim("kube-proxy", format!("chain {c}"), &mut evidence);
        } else if c.starts_with("CNI-") {
            claim("cni-portmap", format!("chain {c}"), &mut evidence);
        } else if c.starts_with("DOCKER") {
            claim("docker", format!("chain {c}"), &mut evidence);
        }
    }
    if let Some(c) = comment {
        let lc = c.to_ascii_lowercase();
        if lc.contains("dnat name:") {
            claim("cni-portmap", format!("comment {c:?}"), &mut evidence);
        } else if ["kube", "k8s", "traefik", "svclb", "k3s"]
            .iter()
            .any(|w| lc.contains(w))
        {
            claim("kubernetes", format!("comment {c:?}"), &mut evidence);
        } else {
            evidence.push(format!("comment {c:?}"));
        }
    }
    if let Some(IpAddr::V4(v4)) = target {
        for (what, net, bits) in KNOWN_POD_RANGES {
            let mask = u32::MAX << (32 - u32::from(bits));
            if u32::from(v4) & mask == u32::from_be_bytes(net) & mask {
                claim(
                    "kubernetes",
                    format!("target {v4} is in the {what}"),
                    &mut evidence,
                );
            }
        }
    }
    Attribution {
        source: source.unwrap_or("unknown").to_owned(),
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(family: Family, name: &str, origin: TableOrigin) -> Table {
        Table {
            family,
            name: name.into(),
            origin,
            ..Table::default()
        }
    }

    fn local(ifname: &str, addr: &str, prefix_len: u8) -> LocalAddr {
        LocalAddr {
            addr: addr.parse().unwrap(),
            prefix_len,
            ifindex: 3,
            ifname: ifname.into(),
        }
    }

    fn dnat(addr: &str, port: u16) -> Rewrite {
        Rewrite::Dnat {
            addr: Some(addr.parse().unwrap()),
            port: Some(port),
        }
    }

    /// The bug of a stock host: Docker writes its DNAT before it reports the
    /// container started, so the live model (Docker reachable) does not list
    /// the target yet. The rule is still the owner's: it sits in Docker's chain
    /// and points behind Docker's bridge.
    #[test]
    fn dockers_own_chain_is_owned_before_the_model_knows_the_container() {
        let nat = table(Family::IP, "nat", TableOrigin::IptablesNft);
        let addrs = [
            local("docker0", "172.17.0.1", 16),
            local("eth0", "198.51.100.1", 24),
        ];
        let model_knows_nothing = OwnedTargets {
            docker_known: true,
            ..OwnedTargets::default()
        };
        let rw = dnat("172.17.0.5", 8080);
        assert!(is_owned(
            &rw,
            Proto::Tcp,
            80,
            &nat,
            "DOCKER",
            &model_knows_nothing,
            &addrs
        ));
        // The same rule anywhere else is foreign; so is a target outside Docker's bridges.
        assert!(!is_owned(
            &rw,
            Proto::Tcp,
            80,
            &nat,
            "KUBE-SEP-X",
            &model_knows_nothing,
            &addrs
        ));
        assert!(!is_owned(
            &dnat("10.42.0.9", 80),
            Proto::Tcp,
            80,
            &nat,
            "DOCKER",
            &model_knows_nothing,
            &addrs
        ));
        // A redirect is no owner's mapping, even in Docker's chain (reported, not removed).
        assert!(!is_owned(
            &Rewrite::Redirect { port: Some(8080) },
            Proto::Tcp,
            80,
            &nat,
            "DOCKER",
            &model_knows_nothing,
            &addrs
        ));
    }

    #[test]
    fn custom_bridge_names_come_from_the_owners_model() {
        let nat = table(Family::IP, "nat", TableOrigin::IptablesNft);
        let addrs = [local("pgweb0", "192.0.2.129", 25)];
        let rw = dnat("192.0.2.130", 8080);
        let without = OwnedTargets::default();
        assert!(!is_owned(
            &rw,
            Proto::Tcp,
            80,
            &nat,
            "DOCKER",
            &without,
            &addrs
        ));
        let with = OwnedTargets {
            docker_bridges: ["pgweb0".to_owned()].into(),
            ..OwnedTargets::default()
        };
        assert!(is_owned(&rw, Proto::Tcp, 80, &nat, "DOCKER", &with, &addrs));
    }

    #[test]
    fn dockers_places() {
        let ipt = table(Family::IP6, "nat", TableOrigin::IptablesNft);
        assert!(docker_managed(&ipt, "DOCKER"));
        assert!(docker_managed(&ipt, "DOCKER-INGRESS"));
        assert!(!docker_managed(&ipt, "PREROUTING"));
        assert!(!docker_managed(&ipt, "DOCKER-USER"));
        let native_nat = table(Family::IP, "nat", TableOrigin::Nft);
        assert!(
            !docker_managed(&native_nat, "DOCKER"),
            "a native nft table named nat is nobody's in particular"
        );
        let backend = table(Family::IP, "docker-bridges", TableOrigin::Nft);
        assert!(docker_managed(&backend, "nat-prerouting"));
        assert!(!docker_managed(
            &table(Family::INET, "docker-bridges", TableOrigin::Nft),
            "x"
        ));
    }

    #[test]
    fn the_bridge_of_a_target_is_the_narrowest_local_subnet() {
        let addrs = [
            local("lo", "127.0.0.1", 8),
            local("docker0", "172.17.0.1", 16),
            local("eth0", "198.51.100.1", 24),
        ];
        assert_eq!(
            bridge_of("172.17.0.2".parse().unwrap(), &addrs),
            Some("docker0")
        );
        assert_eq!(bridge_of("203.0.113.9".parse().unwrap(), &addrs), None);
    }
}
