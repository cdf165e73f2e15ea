//! iptables-nft's opaque `xt` expressions: the match and target `info` structs
//! that matter for NAT on a port, read in host byte order as x_tables defines them
//! (`linux/netfilter/xt_*.h`, `nf_nat.h`). What is not decoded stays opaque, and
//! the analysis treats an opaque match as "may match".
//!
//! Targets are sorted by what they do to where a new connection goes
//! ([`XT_TARGETS`]): only those that rewrite the destination (DNAT, REDIRECT,
//! NETMAP, TPROXY, DNPT) can hijack a port. NFQUEUE, TEE, MARK and the like
//! never do, wherever they sit; a target missing from the table is "may
//! hijack" only in a nat chain (the analysis decides that, knowing the chain).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    attr::string,
    packet::{ProbePacket, Tri},
};
use crate::sys::uapi::{
    IPRANGE_DST, IPRANGE_DST_INV, IPRANGE_SRC, NF_CT_STATE_NEW_BIT, NF_NAT_RANGE_MAP_IPS,
    NF_NAT_RANGE_PROTO_SPECIFIED, XT_ADDRTYPE_INVERT_DEST, XT_ADDRTYPE_INVERT_SOURCE,
    XT_ADDRTYPE_LOCAL, XT_CONNTRACK_DIRECTION, XT_CONNTRACK_INVERT_FLAGS_OFFSET,
    XT_CONNTRACK_L4PROTO_OFFSET, XT_CONNTRACK_MATCH_FLAGS_OFFSET, XT_CONNTRACK_ORIGDST,
    XT_CONNTRACK_ORIGDST_ADDR_OFFSET, XT_CONNTRACK_ORIGDST_MASK_OFFSET, XT_CONNTRACK_ORIGDST_PORT,
    XT_CONNTRACK_ORIGDST_PORT_OFFSET, XT_CONNTRACK_PROTO, XT_CONNTRACK_STATE,
    XT_CONNTRACK_STATE_ALIAS, XT_CONNTRACK_STATE_MASK_OFFSET,
    XT_CONNTRACK_V3_ORIGDST_PORT_HIGH_OFFSET, XT_IPRANGE_DST_MAX_OFFSET, XT_IPRANGE_DST_MIN_OFFSET,
    XT_IPRANGE_FLAGS_OFFSET, XT_MAX_COMMENT_LEN, XT_MULTI_PORTS, XT_MULTIPORT_DESTINATION,
    XT_MULTIPORT_EITHER, XT_MULTIPORT_SOURCE, XT_TCP_INV_DSTPT, XT_UDP_INV_DSTPT,
};

/// `struct nf_nat_ipv4_multi_range_compat` (20 bytes) versus `struct nf_nat_range` (40+).
const NAT_RANGE_COMPAT_LEN: usize = 20;
const NAT_RANGE_LEN: usize = 40;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// The text of an `-m comment` match.
pub fn comment(name: &str, info: &[u8]) -> Option<String> {
    (name == "comment").then(|| {
        let b = &info[..info.len().min(XT_MAX_COMMENT_LEN)];
        string(b)
    })
}

/// Whether an xt match matches the probe packet.
pub fn eval_match(name: &str, rev: u32, info: &[u8], probe: &ProbePacket) -> Tri {
    eval_match_inner(name, rev, info, probe).unwrap_or(Tri::Maybe)
}

fn eval_match_inner(name: &str, rev: u32, info: &[u8], probe: &ProbePacket) -> Option<Tri> {
    Some(match name {
        "comment" => Tri::Yes,
        "addrtype" => {
            let (source, dest, inv_src, inv_dst) = if rev == 0 {
                (
                    u16_at(info, 0)?,
                    u16_at(info, 2)?,
                    u32_at(info, 4)? != 0,
                    u32_at(info, 8)? != 0,
                )
            } else {
                let flags = u32_at(info, 4)?;
                (
                    u16_at(info, 0)?,
                    u16_at(info, 2)?,
                    flags & XT_ADDRTYPE_INVERT_SOURCE != 0,
                    flags & XT_ADDRTYPE_INVERT_DEST != 0,
                )
            };
            let _ = inv_src;
            let dst = if dest == 0 {
                Tri::Yes
            } else {
                Tri::from(dest & XT_ADDRTYPE_LOCAL != 0).negate_if(inv_dst)
            };
            let src = if source == 0 { Tri::Yes } else { Tri::Maybe };
            dst.and(src)
        }
        "tcp" | "udp" => {
            let want = if name == "tcp" { 6 } else { 17 };
            if probe.l4proto != want {
                return Some(Tri::No);
            }
            let (lo, hi) = (u16_at(info, 4)?, u16_at(info, 6)?);
            let spts = (u16_at(info, 0)?, u16_at(info, 2)?);
            let inv = if name == "tcp" {
                *info.get(11)? & XT_TCP_INV_DSTPT != 0
            } else {
                *info.get(8)? & XT_UDP_INV_DSTPT != 0
            };
            let dst = Tri::from((lo..=hi).contains(&probe.dport)).negate_if(inv);
            let src = if spts == (0, u16::MAX) {
                Tri::Yes
            } else {
                Tri::Maybe
            };
            dst.and(src)
        }
        "multiport" => {
            let flags = *info.first()?;
            let count = (*info.get(1)? as usize).min(XT_MULTI_PORTS);
            let ports: Vec<u16> = (0..count)
                .map(|i| u16_at(info, 2 + 2 * i))
                .collect::<Option<_>>()?;
            let hit = if rev >= 1 {
                let pflags = info.get(2 + 2 * XT_MULTI_PORTS..2 + 3 * XT_MULTI_PORTS)?;
                let invert = *info.get(2 + 3 * XT_MULTI_PORTS)? != 0;
                let mut hit = false;
                let mut i = 0;
                while i < count {
                    if pflags[i] != 0 && i + 1 < count {
                        hit |= (ports[i]..=ports[i + 1]).contains(&probe.dport);
                        i += 2;
                    } else {
                        hit |= ports[i] == probe.dport;
                        i += 1;
                    }
                }
                hit != invert
            } else {
                ports.contains(&probe.dport)
            };
            match flags {
                XT_MULTIPORT_DESTINATION => Tri::from(hit),
                XT_MULTIPORT_EITHER => {
                    if hit {
                        Tri::Yes
                    } else {
                        Tri::Maybe
                    }
                }
                XT_MULTIPORT_SOURCE => Tri::Maybe,
                _ => Tri::Maybe,
            }
        }
        "state" => Tri::from(u32_at(info, 0)? & NF_CT_STATE_NEW_BIT != 0),
        "conntrack" => conntrack(rev, info, probe)?,
        "iprange" if rev >= 1 => iprange(info, probe)?,
        _ => Tri::Maybe,
    })
}

/// What an x_tables target does to where a new connection goes: the whole
/// classification, by target name (revisions do not change what a target is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetClass {
    /// Changes where the connection goes: a hijack when it is not the owner's.
    RewritesDestination,
    /// Ends evaluation whenever the rule matches, destination untouched
    /// (source NAT, reject).
    Terminal,
    /// May end evaluation, destination untouched: the packet is queued to
    /// userspace (NFQUEUE: an inline IPS decides), answered by a SYN proxy, or
    /// dropped by the target's own logic.
    MayEnd,
    /// Marks, logs, copies, mangles other fields: the packet goes on to the next rule.
    Continue,
}

/// Every x_tables target iptables ships (`extensions/libxt_*.c`, `libipt_*.c`,
/// `libip6t_*.c`), plus the xtables-addons ones that rewrite a destination,
/// sorted by what they do to where a new connection goes.
pub const XT_TARGETS: &[(&str, TargetClass)] = {
    use TargetClass::*;
    &[
        // Rewrites the destination.
        ("DNAT", RewritesDestination),
        ("REDIRECT", RewritesDestination),
        // In nat PREROUTING/OUTPUT: the destination address, mapped into a prefix.
        ("NETMAP", RewritesDestination),
        ("TPROXY", RewritesDestination),
        // IPv6 destination network prefix translation (mangle PREROUTING), stateless.
        ("DNPT", RewritesDestination),
        // xtables-addons: stateless destination rewrite (raw), destination netmap (nat).
        ("RAWDNAT", RewritesDestination),
        ("DNETMAP", RewritesDestination),
        // Terminal, destination untouched.
        ("SNAT", Terminal),
        ("MASQUERADE", Terminal),
        ("REJECT", Terminal),
        // The obsolete source-NAT variant.
        ("SAME", Terminal),
        // Obsolete: sent the packet back with addresses swapped.
        ("MIRROR", Terminal),
        // May end evaluation, destination untouched.
        ("NFQUEUE", MayEnd),
        ("SYNPROXY", MayEnd),
        // Drops what this cluster node does not serve.
        ("CLUSTERIP", MayEnd),
        // Continue.
        ("AUDIT", Continue),
        ("CHECKSUM", Continue),
        ("CLASSIFY", Continue),
        ("CONNMARK", Continue),
        ("CONNSECMARK", Continue),
        ("CT", Continue),
        ("DSCP", Continue),
        ("ECN", Continue),
        ("HL", Continue),
        ("HMARK", Continue),
        ("IDLETIMER", Continue),
        ("LED", Continue),
        ("LOG", Continue),
        ("MARK", Continue),
        ("NFLOG", Continue),
        ("NOTRACK", Continue),
        ("RATEEST", Continue),
        ("SECMARK", Continue),
        ("SET", Continue),
        // IPv6 source network prefix translation.
        ("SNPT", Continue),
        ("TCPMSS", Continue),
        ("TCPOPTSTRIP", Continue),
        // Sends a copy elsewhere; the original goes on untouched.
        ("TEE", Continue),
        ("TOS", Continue),
        ("TRACE", Continue),
        ("TTL", Continue),
        ("ULOG", Continue),
    ]
};

/// The class of a target, `None` for a target this table does not know.
pub fn target_class(name: &str) -> Option<TargetClass> {
    XT_TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, class)| *class)
}

/// What an xt target does to a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XtAction {
    /// Marks, logs, counters: the packet goes on to the next rule.
    Continue,
    /// DNAT; `None` parts are not rewritten (or not decodable).
    Dnat {
        addr: Option<IpAddr>,
        port: Option<u16>,
    },
    /// NETMAP: the destination address's network part becomes `min`'s, where
    /// `min` and `max` differ in the host part (`--to 203.0.113.0/26`).
    Netmap {
        min: IpAddr,
        max: IpAddr,
    },
    Redirect {
        port: Option<u16>,
    },
    /// TPROXY; `None` parts keep the packet's own (address 0, port 0).
    Tproxy {
        addr: Option<IpAddr>,
        port: Option<u16>,
    },
    /// A known destination rewrite this code does not decode (DNPT, RAWDNAT…).
    Rewrites(String),
    /// Terminal, but no destination rewrite (SNAT, MASQUERADE, REJECT…).
    Terminal,
    /// May end evaluation, no destination rewrite (NFQUEUE, SYNPROXY…).
    MayEnd,
    /// A target this code does not know, or a known rewrite whose `info` does
    /// not decode.
    Opaque(String),
}

/// `struct xt_tproxy_target_info` (IPv4, rev 0) and `_v1` (rev 1, IPv4 or IPv6).
const TPROXY_V0_LEN: usize = 16;
const TPROXY_V1_LEN: usize = 28;

pub fn decode_target(name: &str, rev: u32, info: &[u8], v6: bool) -> XtAction {
    match name {
        "DNAT" => nat_range(rev, info, v6)
            .map(|r| XtAction::Dnat {
                addr: r.map_ips.then_some(r.min_addr),
                port: r.min_port,
            })
            .unwrap_or_else(|| XtAction::Opaque(format!("DNAT rev {rev}"))),
        "NETMAP" => nat_range(rev, info, v6)
            .filter(|r| r.map_ips && r.min_addr.is_ipv6() == r.max_addr.is_ipv6())
            .map(|r| XtAction::Netmap {
                min: r.min_addr,
                max: r.max_addr,
            })
            .unwrap_or_else(|| XtAction::Opaque(format!("NETMAP rev {rev}"))),
        "REDIRECT" => nat_range(rev, info, v6)
            .map(|r| XtAction::Redirect { port: r.min_port })
            .unwrap_or_else(|| XtAction::Opaque(format!("REDIRECT rev {rev}"))),
        "TPROXY" => tproxy(rev, info, v6).unwrap_or(XtAction::Tproxy {
            addr: None,
            port: None,
        }),
        other => match target_class(other) {
            Some(TargetClass::Continue) => XtAction::Continue,
            Some(TargetClass::Terminal) => XtAction::Terminal,
            Some(TargetClass::MayEnd) => XtAction::MayEnd,
            Some(TargetClass::RewritesDestination) => XtAction::Rewrites(other.to_owned()),
            None => XtAction::Opaque(other.to_owned()),
        },
    }
}

/// The probe's destination address as `union nf_inet_addr` holds it (an IPv4
/// address in its first 4 bytes).
fn inet_addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `-m conntrack` (rev 1–3; iptables-nft 1.8 also writes `-m state` as rev 3
/// with `STATE_ALIAS`) for the first packet of a new connection, original
/// direction, not yet NATed: its state is NEW. The state, protocol, original
/// destination and its port, and the direction are decided; any other
/// criterion (sources, reply tuple, status, expiry) may match.
fn conntrack(rev: u32, info: &[u8], probe: &ProbePacket) -> Option<Tri> {
    if !(1..=3).contains(&rev) {
        return Some(Tri::Maybe);
    }
    let flags = u16_at(info, XT_CONNTRACK_MATCH_FLAGS_OFFSET)?;
    let invert = u16_at(info, XT_CONNTRACK_INVERT_FLAGS_OFFSET)?;
    let inv = |bit: u16| invert & bit != 0;
    let decided = XT_CONNTRACK_STATE
        | XT_CONNTRACK_STATE_ALIAS
        | XT_CONNTRACK_PROTO
        | XT_CONNTRACK_ORIGDST
        | XT_CONNTRACK_ORIGDST_PORT
        | XT_CONNTRACK_DIRECTION;
    let mut t = if flags & !decided == 0 {
        Tri::Yes
    } else {
        Tri::Maybe
    };
    if flags & XT_CONNTRACK_STATE != 0 {
        let mask = if rev == 1 {
            u32::from(*info.get(XT_CONNTRACK_STATE_MASK_OFFSET)?)
        } else {
            u32::from(u16_at(info, XT_CONNTRACK_STATE_MASK_OFFSET)?)
        };
        t = t.and(Tri::from(mask & NF_CT_STATE_NEW_BIT != 0).negate_if(inv(XT_CONNTRACK_STATE)));
    }
    if flags & XT_CONNTRACK_PROTO != 0 {
        let proto = u16_at(info, XT_CONNTRACK_L4PROTO_OFFSET)?;
        t = t.and(Tri::from(proto == u16::from(probe.l4proto)).negate_if(inv(XT_CONNTRACK_PROTO)));
    }
    if flags & XT_CONNTRACK_ORIGDST != 0 {
        let d = inet_addr_bytes(probe.daddr);
        let addr =
            info.get(XT_CONNTRACK_ORIGDST_ADDR_OFFSET..XT_CONNTRACK_ORIGDST_ADDR_OFFSET + d.len())?;
        let mask =
            info.get(XT_CONNTRACK_ORIGDST_MASK_OFFSET..XT_CONNTRACK_ORIGDST_MASK_OFFSET + d.len())?;
        let hit = d
            .iter()
            .zip(addr)
            .zip(mask)
            .all(|((d, a), m)| d & m == a & m);
        t = t.and(Tri::from(hit).negate_if(inv(XT_CONNTRACK_ORIGDST)));
    }
    if flags & XT_CONNTRACK_ORIGDST_PORT != 0 {
        let hit = if rev == 3 {
            // A range (`port_high`): decided only where reading both ports
            // in either byte order agrees, since the two halves of the
            // struct are written differently by different iptables versions.
            let (lo, hi) = (
                u16_at(info, XT_CONNTRACK_ORIGDST_PORT_OFFSET)?,
                u16_at(info, XT_CONNTRACK_V3_ORIGDST_PORT_HIGH_OFFSET)?,
            );
            let host = (lo..=hi).contains(&probe.dport);
            let net = (u16::from_be(lo)..=u16::from_be(hi)).contains(&probe.dport);
            if host == net {
                Tri::from(host)
            } else {
                Tri::Maybe
            }
        } else {
            Tri::from(be16_at(info, XT_CONNTRACK_ORIGDST_PORT_OFFSET)? == probe.dport)
        };
        t = t.and(hit.negate_if(inv(XT_CONNTRACK_ORIGDST_PORT)));
    }
    if flags & XT_CONNTRACK_DIRECTION != 0 {
        // `--ctdir ORIGINAL` is the inverted flag: the kernel refuses the
        // packet when "original" XOR inverted.
        t = t.and(Tri::from(inv(XT_CONNTRACK_DIRECTION)));
    }
    Some(t)
}

/// `-m iprange` (rev 1): the destination range is decided; a source range may match.
fn iprange(info: &[u8], probe: &ProbePacket) -> Option<Tri> {
    let flags = *info.get(XT_IPRANGE_FLAGS_OFFSET)?;
    let mut t = if flags & IPRANGE_SRC != 0 {
        Tri::Maybe
    } else {
        Tri::Yes
    };
    if flags & IPRANGE_DST != 0 {
        let d = inet_addr_bytes(probe.daddr);
        let lo = info.get(XT_IPRANGE_DST_MIN_OFFSET..XT_IPRANGE_DST_MIN_OFFSET + d.len())?;
        let hi = info.get(XT_IPRANGE_DST_MAX_OFFSET..XT_IPRANGE_DST_MAX_OFFSET + d.len())?;
        // Big-endian bytes compare as the addresses do.
        let inside = lo <= d.as_slice() && d.as_slice() <= hi;
        t = t.and(Tri::from(inside).negate_if(flags & IPRANGE_DST_INV != 0));
    }
    Some(t)
}

/// The TPROXY destination: address 0 and port 0 mean "the packet's own".
fn tproxy(rev: u32, info: &[u8], v6: bool) -> Option<XtAction> {
    let (addr, port) = match rev {
        0 if info.len() >= TPROXY_V0_LEN => (
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(info.get(8..12)?).ok()?)),
            be16_at(info, 12)?,
        ),
        1 if info.len() >= TPROXY_V1_LEN => (
            if v6 {
                IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(info.get(8..24)?).ok()?))
            } else {
                IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(info.get(8..12)?).ok()?))
            },
            be16_at(info, 24)?,
        ),
        _ => return None,
    };
    Some(XtAction::Tproxy {
        addr: (!addr.is_unspecified()).then_some(addr),
        port: (port != 0).then_some(port),
    })
}

/// Where NETMAP sends a connection to `daddr`: the network part of `min`
/// (the bits `min` and `max` share), the host part of `daddr`.
pub fn netmap(daddr: IpAddr, min: IpAddr, max: IpAddr) -> Option<IpAddr> {
    match (daddr, min, max) {
        (IpAddr::V4(d), IpAddr::V4(lo), IpAddr::V4(hi)) => {
            let (d, lo, hi) = (u32::from(d), u32::from(lo), u32::from(hi));
            let net = !(lo ^ hi);
            Some(IpAddr::V4(Ipv4Addr::from((d & !net) | (lo & net))))
        }
        (IpAddr::V6(d), IpAddr::V6(lo), IpAddr::V6(hi)) => {
            let (d, lo, hi) = (u128::from(d), u128::from(lo), u128::from(hi));
            let net = !(lo ^ hi);
            Some(IpAddr::V6(Ipv6Addr::from((d & !net) | (lo & net))))
        }
        _ => None,
    }
}

/// A decoded NAT range: the first address and port of the mapping.
struct NatRange {
    map_ips: bool,
    min_addr: IpAddr,
    max_addr: IpAddr,
    min_port: Option<u16>,
}

/// A NAT range struct: compat (IPv4 rev 0) or `nf_nat_range[2]`.
fn nat_range(rev: u32, info: &[u8], v6: bool) -> Option<NatRange> {
    let addr_at = |at: usize, v6: bool| -> Option<IpAddr> {
        Some(if v6 {
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(info.get(at..at + 16)?).ok()?,
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(info.get(at..at + 4)?).ok()?,
            ))
        })
    };
    if info.len() >= NAT_RANGE_LEN && (rev >= 1 || v6) {
        let flags = u32_at(info, 0)?;
        Some(NatRange {
            map_ips: flags & NF_NAT_RANGE_MAP_IPS != 0,
            min_addr: addr_at(4, v6)?,
            max_addr: addr_at(20, v6)?,
            min_port: (flags & NF_NAT_RANGE_PROTO_SPECIFIED != 0)
                .then(|| be16_at(info, 36))
                .flatten(),
        })
    } else if info.len() >= NAT_RANGE_COMPAT_LEN && !v6 {
        let flags = u32_at(info, 4)?;
        Some(NatRange {
            map_ips: flags & NF_NAT_RANGE_MAP_IPS != 0,
            min_addr: addr_at(8, false)?,
            max_addr: addr_at(12, false)?,
            min_port: (flags & NF_NAT_RANGE_PROTO_SPECIFIED != 0)
                .then(|| be16_at(info, 16))
                .flatten(),
        })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new TCP connection to 198.51.100.1:80 from outside.
    fn new_conn() -> ProbePacket {
        ProbePacket {
            hook: crate::nft::Hook::Prerouting,
            v6: false,
            l4proto: 6,
            dport: 80,
            daddr: "198.51.100.1".parse().unwrap(),
            iifname: Some("eth0".into()),
            iifindex: 2,
        }
    }

    /// `struct xt_conntrack_mtinfo{rev}` with `--ctstate` (`mask`), inverted or not.
    fn ctstate(rev: u32, mask: u16, invert: bool) -> Vec<u8> {
        let mut info = vec![0u8; 168];
        info[XT_CONNTRACK_MATCH_FLAGS_OFFSET..][..2]
            .copy_from_slice(&XT_CONNTRACK_STATE.to_ne_bytes());
        if invert {
            info[XT_CONNTRACK_INVERT_FLAGS_OFFSET..][..2]
                .copy_from_slice(&XT_CONNTRACK_STATE.to_ne_bytes());
        }
        if rev == 1 {
            info[XT_CONNTRACK_STATE_MASK_OFFSET] = mask as u8;
        } else {
            info[XT_CONNTRACK_STATE_MASK_OFFSET..][..2].copy_from_slice(&mask.to_ne_bytes());
        }
        info
    }

    #[test]
    fn conntrack_state_decides_for_a_new_connection() {
        const ESTABLISHED: u16 = 1 << 1;
        const NEW: u16 = 1 << 3;
        let p = new_conn();
        for rev in 1..=3 {
            assert_eq!(
                eval_match("conntrack", rev, &ctstate(rev, ESTABLISHED, false), &p),
                Tri::No
            );
            assert_eq!(
                eval_match("conntrack", rev, &ctstate(rev, NEW, false), &p),
                Tri::Yes
            );
            assert_eq!(
                eval_match("conntrack", rev, &ctstate(rev, NEW, true), &p),
                Tri::No
            );
            assert_eq!(
                eval_match(
                    "conntrack",
                    rev,
                    &ctstate(rev, ESTABLISHED | NEW, false),
                    &p
                ),
                Tri::Yes
            );
        }
        // A criterion this code does not decide (the original source) may match.
        let mut info = ctstate(3, NEW, false);
        info[XT_CONNTRACK_MATCH_FLAGS_OFFSET..][..2]
            .copy_from_slice(&(XT_CONNTRACK_STATE | 1 << 2).to_ne_bytes());
        assert_eq!(eval_match("conntrack", 3, &info, &p), Tri::Maybe);
        // Truncated: may match, never a panic.
        assert_eq!(eval_match("conntrack", 3, &info[..100], &p), Tri::Maybe);
    }

    #[test]
    fn iprange_decides_the_destination_range() {
        let range = |lo: [u8; 4], hi: [u8; 4], flags: u8| {
            let mut info = vec![0u8; 68];
            info[XT_IPRANGE_DST_MIN_OFFSET..][..4].copy_from_slice(&lo);
            info[XT_IPRANGE_DST_MAX_OFFSET..][..4].copy_from_slice(&hi);
            info[XT_IPRANGE_FLAGS_OFFSET] = flags;
            info
        };
        let p = new_conn();
        let outside = range([192, 0, 2, 1], [192, 0, 2, 9], IPRANGE_DST);
        let inside = range([198, 51, 100, 0], [198, 51, 100, 9], IPRANGE_DST);
        assert_eq!(eval_match("iprange", 1, &outside, &p), Tri::No);
        assert_eq!(eval_match("iprange", 1, &inside, &p), Tri::Yes);
        let inverted = range(
            [198, 51, 100, 0],
            [198, 51, 100, 9],
            IPRANGE_DST | IPRANGE_DST_INV,
        );
        assert_eq!(eval_match("iprange", 1, &inverted, &p), Tri::No);
        let with_source = range(
            [198, 51, 100, 0],
            [198, 51, 100, 9],
            IPRANGE_DST | IPRANGE_SRC,
        );
        assert_eq!(eval_match("iprange", 1, &with_source, &p), Tri::Maybe);
    }

    /// The compat struct iptables writes for IPv4 DNAT/NETMAP/REDIRECT rev 0.
    fn compat(flags: u32, min: [u8; 4], max: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&min);
        b.extend_from_slice(&max);
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b
    }

    /// `struct nf_nat_range2` (rev 2), IPv6.
    fn range2(flags: u32, min: Ipv6Addr, max: Ipv6Addr, port: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&min.octets());
        b.extend_from_slice(&max.octets());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&[0; 2]);
        b
    }

    #[test]
    fn every_target_iptables_ships_is_classified() {
        use TargetClass::*;
        // extensions/libxt_*.c, libipt_*.c, libip6t_*.c of iptables 1.8.
        let shipped = [
            "AUDIT",
            "CHECKSUM",
            "CLASSIFY",
            "CLUSTERIP",
            "CONNMARK",
            "CONNSECMARK",
            "CT",
            "DNAT",
            "DNPT",
            "DSCP",
            "ECN",
            "HL",
            "HMARK",
            "IDLETIMER",
            "LED",
            "LOG",
            "MARK",
            "MASQUERADE",
            "NETMAP",
            "NFLOG",
            "NFQUEUE",
            "NOTRACK",
            "RATEEST",
            "REDIRECT",
            "REJECT",
            "SECMARK",
            "SET",
            "SNAT",
            "SNPT",
            "SYNPROXY",
            "TCPMSS",
            "TCPOPTSTRIP",
            "TEE",
            "TOS",
            "TPROXY",
            "TRACE",
            "TTL",
            "ULOG",
        ];
        for name in shipped {
            assert!(target_class(name).is_some(), "{name} is not classified");
        }
        let rewrites: Vec<&str> = XT_TARGETS
            .iter()
            .filter(|(_, c)| *c == RewritesDestination)
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(
            rewrites,
            [
                "DNAT", "REDIRECT", "NETMAP", "TPROXY", "DNPT", "RAWDNAT", "DNETMAP"
            ]
        );
        for name in ["NFQUEUE", "SYNPROXY"] {
            assert_eq!(target_class(name), Some(MayEnd), "{name}");
        }
        for name in ["SNAT", "MASQUERADE", "REJECT"] {
            assert_eq!(target_class(name), Some(Terminal), "{name}");
        }
        for name in [
            "MARK", "CONNMARK", "TTL", "HL", "TEE", "SET", "HMARK", "LOG", "NFLOG", "CT",
            "NOTRACK", "TRACE",
        ] {
            assert_eq!(target_class(name), Some(Continue), "{name}");
        }
        assert_eq!(target_class("FROB"), None);
        assert_eq!(target_class("mark"), None, "names are case-sensitive");
        let mut names: Vec<&str> = XT_TARGETS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a target is listed twice");
    }

    #[test]
    fn non_rewriting_targets_decode_without_a_rewrite() {
        for (name, want) in [
            ("NFQUEUE", XtAction::MayEnd),
            ("SYNPROXY", XtAction::MayEnd),
            ("TEE", XtAction::Continue),
            ("TTL", XtAction::Continue),
            ("MARK", XtAction::Continue),
            ("CONNMARK", XtAction::Continue),
            ("SET", XtAction::Continue),
            ("HMARK", XtAction::Continue),
            ("REJECT", XtAction::Terminal),
            ("MASQUERADE", XtAction::Terminal),
        ] {
            // The info bytes do not matter for these: garbage must not change the class.
            assert_eq!(decode_target(name, 1, &[0xff; 40], false), want, "{name}");
        }
        assert_eq!(
            decode_target("DNPT", 0, &[], true),
            XtAction::Rewrites("DNPT".into())
        );
        assert_eq!(
            decode_target("FROB", 0, &[], false),
            XtAction::Opaque("FROB".into())
        );
    }

    #[test]
    fn dnat_netmap_redirect_decode_their_ranges() {
        let maps_both = NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED;
        assert_eq!(
            decode_target(
                "DNAT",
                0,
                &compat(maps_both, [10, 42, 0, 2], [10, 42, 0, 2], 80),
                false
            ),
            XtAction::Dnat {
                addr: Some("10.42.0.2".parse().unwrap()),
                port: Some(80)
            }
        );
        assert_eq!(
            decode_target(
                "NETMAP",
                0,
                &compat(NF_NAT_RANGE_MAP_IPS, [203, 0, 113, 0], [203, 0, 113, 63], 0),
                false
            ),
            XtAction::Netmap {
                min: "203.0.113.0".parse().unwrap(),
                max: "203.0.113.63".parse().unwrap()
            }
        );
        let v6 = decode_target(
            "NETMAP",
            2,
            &range2(
                NF_NAT_RANGE_MAP_IPS,
                "2001:db8:d::".parse().unwrap(),
                "2001:db8:d::ffff".parse().unwrap(),
                0,
            ),
            true,
        );
        assert_eq!(
            v6,
            XtAction::Netmap {
                min: "2001:db8:d::".parse().unwrap(),
                max: "2001:db8:d::ffff".parse().unwrap()
            }
        );
        // NETMAP without addresses is not something this code understands.
        assert_eq!(
            decode_target("NETMAP", 0, &compat(0, [0; 4], [0; 4], 0), false),
            XtAction::Opaque("NETMAP rev 0".into())
        );
        assert_eq!(
            decode_target(
                "REDIRECT",
                0,
                &compat(NF_NAT_RANGE_PROTO_SPECIFIED, [0; 4], [0; 4], 8080),
                false
            ),
            XtAction::Redirect { port: Some(8080) }
        );
        assert_eq!(
            decode_target("DNAT", 0, &[0; 3], false),
            XtAction::Opaque("DNAT rev 0".into())
        );
    }

    #[test]
    fn netmap_keeps_the_host_part() {
        let to = |d: &str, lo: &str, hi: &str| {
            netmap(d.parse().unwrap(), lo.parse().unwrap(), hi.parse().unwrap())
        };
        assert_eq!(
            to("198.51.100.1", "203.0.113.0", "203.0.113.63"),
            Some("203.0.113.1".parse().unwrap())
        );
        assert_eq!(
            to("198.51.100.77", "203.0.113.64", "203.0.113.127"),
            Some("203.0.113.77".parse().unwrap())
        );
        assert_eq!(
            to("2001:db8:1::1", "2001:db8:d::", "2001:db8:d::ffff"),
            Some("2001:db8:d::1".parse().unwrap())
        );
        assert_eq!(to("198.51.100.1", "2001:db8::", "2001:db8::ff"), None);
    }

    #[test]
    fn tproxy_decodes_address_and_port() {
        let mut v0 = Vec::new();
        v0.extend_from_slice(&0u32.to_ne_bytes());
        v0.extend_from_slice(&0u32.to_ne_bytes());
        v0.extend_from_slice(&[127, 0, 0, 1]);
        v0.extend_from_slice(&3128u16.to_be_bytes());
        v0.extend_from_slice(&[0; 2]);
        assert_eq!(
            decode_target("TPROXY", 0, &v0, false),
            XtAction::Tproxy {
                addr: Some("127.0.0.1".parse().unwrap()),
                port: Some(3128)
            }
        );
        let mut v1 = vec![0u8; TPROXY_V1_LEN];
        v1[24..26].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(
            decode_target("TPROXY", 1, &v1, true),
            XtAction::Tproxy {
                addr: None,
                port: Some(8080)
            }
        );
        assert_eq!(
            decode_target("TPROXY", 7, &[], false),
            XtAction::Tproxy {
                addr: None,
                port: None
            }
        );
    }
}
