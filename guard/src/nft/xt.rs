//! iptables-nft's opaque `xt` expressions: the match and target `info` structs
//! that matter for NAT on a port, read in host byte order as x_tables defines them
//! (`linux/netfilter/xt_*.h`, `nf_nat.h`). What is not decoded stays opaque, and
//! the analysis treats an opaque match as "may match".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::analysis::{Probe, Tri};

const XT_ADDRTYPE_LOCAL: u16 = 1 << 2;
const XT_ADDRTYPE_INVERT_SOURCE: u32 = 0x1;
const XT_ADDRTYPE_INVERT_DEST: u32 = 0x2;
const XT_TCP_INV_DSTPT: u8 = 0x02;
const XT_UDP_INV_DSTPT: u8 = 0x02;
const XT_MULTIPORT_SOURCE: u8 = 0;
const XT_MULTIPORT_DESTINATION: u8 = 1;
const XT_MULTIPORT_EITHER: u8 = 2;
const XT_MULTI_PORTS: usize = 15;
const XT_STATE_NEW: u32 = 1 << (2 + 1);
const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
/// `struct nf_nat_ipv4_multi_range_compat` (20 bytes) versus `struct nf_nat_range` (40+).
const NAT_RANGE_COMPAT_LEN: usize = 20;
const NAT_RANGE_LEN: usize = 40;
const XT_COMMENT_MAX: usize = 256;

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
        let b = &info[..info.len().min(XT_COMMENT_MAX)];
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    })
}

/// Whether an xt match matches the probe packet.
pub fn eval_match(name: &str, rev: u32, info: &[u8], probe: &Probe) -> Tri {
    eval_match_inner(name, rev, info, probe).unwrap_or(Tri::Maybe)
}

fn eval_match_inner(name: &str, rev: u32, info: &[u8], probe: &Probe) -> Option<Tri> {
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
        "state" => Tri::from(u32_at(info, 0)? & XT_STATE_NEW != 0),
        _ => Tri::Maybe,
    })
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
    Redirect {
        port: Option<u16>,
    },
    Tproxy,
    /// Terminal, but no destination rewrite (SNAT, MASQUERADE, REJECT…).
    Terminal,
    /// A target this code cannot decode.
    Opaque(String),
}

pub fn decode_target(name: &str, rev: u32, info: &[u8], v6: bool) -> XtAction {
    match name {
        "DNAT" => nat_range(rev, info, v6)
            .map(|(addr, port)| XtAction::Dnat { addr, port })
            .unwrap_or_else(|| XtAction::Opaque(format!("DNAT rev {rev}"))),
        "REDIRECT" => nat_range(rev, info, v6)
            .map(|(_, port)| XtAction::Redirect { port })
            .unwrap_or_else(|| XtAction::Opaque(format!("REDIRECT rev {rev}"))),
        "TPROXY" => XtAction::Tproxy,
        "MARK" | "CONNMARK" | "LOG" | "NFLOG" | "TRACE" | "CT" | "NOTRACK" | "CLASSIFY"
        | "DSCP" | "TOS" | "TCPMSS" | "CHECKSUM" | "CONNSECMARK" | "SECMARK" | "AUDIT" => {
            XtAction::Continue
        }
        "SNAT" | "MASQUERADE" | "REJECT" => XtAction::Terminal,
        other => XtAction::Opaque(other.to_owned()),
    }
}

/// The destination of a NAT range struct: compat (IPv4 rev 0) or `nf_nat_range[2]`.
fn nat_range(rev: u32, info: &[u8], v6: bool) -> Option<(Option<IpAddr>, Option<u16>)> {
    if info.len() >= NAT_RANGE_LEN && (rev >= 1 || v6) {
        let flags = u32_at(info, 0)?;
        let addr = (flags & NF_NAT_RANGE_MAP_IPS != 0).then(|| {
            if v6 {
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&info[4..20]).expect("16 bytes"),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&info[4..8]).expect("4 bytes"),
                ))
            }
        });
        let port = (flags & NF_NAT_RANGE_PROTO_SPECIFIED != 0)
            .then(|| be16_at(info, 36))
            .flatten();
        Some((addr, port))
    } else if info.len() >= NAT_RANGE_COMPAT_LEN && !v6 {
        let flags = u32_at(info, 4)?;
        let addr = (flags & NF_NAT_RANGE_MAP_IPS != 0).then(|| {
            IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&info[8..12]).expect("4 bytes"),
            ))
        });
        let port = (flags & NF_NAT_RANGE_PROTO_SPECIFIED != 0)
            .then(|| be16_at(info, 16))
            .flatten();
        Some((addr, port))
    } else {
        None
    }
}
