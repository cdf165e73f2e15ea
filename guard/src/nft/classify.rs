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

/// Docker's nat chain, in the iptables table `nat` (iptables-nft or legacy).
const DOCKER_CHAIN: &str = "DOCKER";
const DOCKER_TABLE: &str = "nat";
/// Interfaces that are Docker bridges: the default one and user-defined networks.
const DOCKER_BRIDGE_PREFIXES: [&str; 2] = ["docker0", "br-"];
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
    owned.docker_fallback
        && chain == DOCKER_CHAIN
        && table.name == DOCKER_TABLE
        && matches!(table.family, Family::IP | Family::IP6)
        && matches!(
            table.origin,
            TableOrigin::IptablesNft | TableOrigin::IptablesLegacy
        )
        && in_docker_bridge(*addr, local)
}

fn in_docker_bridge(addr: IpAddr, local: &[LocalAddr]) -> bool {
    local.iter().any(|l| {
        DOCKER_BRIDGE_PREFIXES
            .iter()
            .any(|p| l.ifname.starts_with(p))
            && l.subnet_contains(addr)
    })
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
