//! iptables-legacy: x_tables rules, invisible to nft. When the legacy `nat` table
//! is in use (`/proc/thread-self/net/ip{,6}_tables_names`), its rules are read
//! with `iptables-legacy-save` / `ip6tables-legacy-save` and translated into the
//! same model, with the expressions iptables-nft would have produced. Options this
//! code does not know become `Expr::Unknown` (a "maybe" match), never an error.

use std::{net::IpAddr, process::Command};

use super::model::{
    BaseHook, Chain, CmpOp, Data, Expr, Family, Hook, NatKind, PayloadBase, Rule, RulesetModel,
    Table, TableOrigin, Verdict,
};
use crate::sys::uapi::{
    NF_IP_PRI_NAT_DST, NF_IP_PRI_NAT_SRC, NFPROTO_IPV4, NFPROTO_IPV6, NFT_FIB_RESULT_ADDRTYPE,
    NFT_META_IIFNAME, NFT_META_L4PROTO, NFT_META_OIFNAME, NFT_REG_1, NFT_REG_2, NFTA_FIB_F_DADDR,
    RTN_LOCAL, XT_MULTI_PORTS,
};

/// `NF_IP_PRI_NAT_DST` / `NF_IP_PRI_NAT_SRC`.
const XT_MULTIPORT_V1_LEN: usize = 48;

/// Whether an iptables-legacy nat table (v4 or v6) exists in the calling
/// thread's namespace: one small `/proc` read, for polling.
pub fn nat_in_use() -> bool {
    [
        "/proc/thread-self/net/ip_tables_names",
        "/proc/thread-self/net/ip6_tables_names",
    ]
    .iter()
    .any(|names| {
        std::fs::read_to_string(names)
            .map(|s| s.lines().any(|l| l.trim() == "nat"))
            .unwrap_or(false)
    })
}

/// The legacy nat tables in use in a namespace, read apart from the nf_tables
/// dump (a read runs this on its decoder thread, beside the dump).
#[derive(Debug, Default)]
pub struct LegacyTables {
    tables: Vec<Table>,
    /// What could not be read, as the model's warnings.
    warnings: Vec<String>,
}

impl LegacyTables {
    /// Reads the legacy nat tables in use in the calling thread's namespace;
    /// problems become warnings.
    pub fn read() -> Self {
        let mut found = Self::default();
        for (names, save, family) in [
            (
                "/proc/thread-self/net/ip_tables_names",
                "iptables-legacy-save",
                Family::IP,
            ),
            (
                "/proc/thread-self/net/ip6_tables_names",
                "ip6tables-legacy-save",
                Family::IP6,
            ),
        ] {
            let in_use = std::fs::read_to_string(names)
                .map(|s| s.lines().any(|l| l.trim() == "nat"))
                .unwrap_or(false);
            if !in_use {
                continue;
            }
            match Command::new(save).args(["-t", "nat"]).output() {
                Ok(out) if out.status.success() => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    found.tables.push(parse_save(&text, family));
                }
                Ok(out) => found.warnings.push(format!(
                    "{save} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => found.warnings.push(format!(
                    "legacy nat table in use, but cannot run {save}: {e}"
                )),
            }
        }
        found
    }

    /// Adds the tables and the warnings to `model`.
    pub fn add_to(self, model: &mut RulesetModel) {
        model.tables.extend(self.tables);
        model.warnings.extend(self.warnings);
    }
}

/// Parses the `*nat` section of `iptables-save` output.
pub fn parse_save(text: &str, family: Family) -> Table {
    let mut table = Table {
        family,
        name: "nat".into(),
        origin: TableOrigin::IptablesLegacy,
        ..Table::default()
    };
    let mut in_nat = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(t) = line.strip_prefix('*') {
            in_nat = t == "nat";
            continue;
        }
        if !in_nat || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let mut parts = decl.split_whitespace();
            let name = parts.next().unwrap_or_default().to_owned();
            let policy = parts.next().unwrap_or("-");
            let base = builtin_hook(&name).map(|(hook, priority)| BaseHook {
                hook,
                priority,
                kind: "nat".into(),
                policy: Some(if policy == "DROP" {
                    Verdict::Drop
                } else {
                    Verdict::Accept
                }),
            });
            table.chains.push(Chain {
                name,
                base,
                ..Chain::default()
            });
            continue;
        }
        let tokens = split(line);
        if tokens.first().map(String::as_str) != Some("-A") || tokens.len() < 2 {
            continue;
        }
        let chain = tokens[1].clone();
        let names: Vec<String> = table.chains.iter().map(|c| c.name.clone()).collect();
        let rule = parse_rule(&tokens[2..], family, &names);
        if let Some(c) = table.chains.iter_mut().find(|c| c.name == chain) {
            let handle = c.rules.len() as u64 + 1;
            c.rules
                .push(Rule::new(handle, rule.exprs().to_vec(), rule.comment));
        }
    }
    table
}

fn builtin_hook(name: &str) -> Option<(Hook, i32)> {
    match name {
        "PREROUTING" => Some((Hook::Prerouting, NF_IP_PRI_NAT_DST)),
        "OUTPUT" => Some((Hook::Output, NF_IP_PRI_NAT_DST)),
        "INPUT" => Some((Hook::Input, NF_IP_PRI_NAT_SRC)),
        "POSTROUTING" => Some((Hook::Postrouting, NF_IP_PRI_NAT_SRC)),
        _ => None,
    }
}

/// Splits a save line into words, honouring double quotes.
fn split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut has = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                has = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if has || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => cur.push(c),
        }
    }
    if has || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn cmp(sreg: u32, neg: bool, data: Vec<u8>) -> Expr {
    Expr::Cmp {
        sreg,
        op: if neg { CmpOp::Neq } else { CmpOp::Eq },
        data,
    }
}

fn unknown(what: &str) -> Expr {
    Expr::Unknown {
        name: format!("legacy {what}"),
    }
}

fn parse_rule(t: &[String], family: Family, chains: &[String]) -> Rule {
    let v6 = family == Family::IP6;
    let mut exprs = Vec::new();
    let mut comment = None;
    let mut i = 0;
    let mut neg = false;
    let arg = |i: usize| t.get(i + 1).map(String::as_str).unwrap_or("");
    while i < t.len() {
        let tok = t[i].as_str();
        match tok {
            "!" => {
                neg = true;
                i += 1;
                continue;
            }
            "-p" | "--protocol" => {
                let p = match arg(i) {
                    "tcp" | "6" => Some(6u8),
                    "udp" | "17" => Some(17),
                    "sctp" | "132" => Some(132),
                    _ => None,
                };
                match p {
                    Some(p) => {
                        exprs.push(Expr::Meta {
                            key: NFT_META_L4PROTO,
                            dreg: NFT_REG_1,
                        });
                        exprs.push(cmp(NFT_REG_1, neg, vec![p]));
                    }
                    None => exprs.push(unknown("-p")),
                }
                i += 2;
            }
            "-d" | "--destination" => {
                match parse_cidr(arg(i)) {
                    Some((addr, bits)) => {
                        let (offset, bytes) = match addr {
                            IpAddr::V4(a) => (16, a.octets().to_vec()),
                            IpAddr::V6(a) => (24, a.octets().to_vec()),
                        };
                        let len = bytes.len();
                        exprs.push(Expr::Payload {
                            base: PayloadBase::Network,
                            offset,
                            len: len as u32,
                            dreg: NFT_REG_1,
                        });
                        let mask: Vec<u8> = (0..len)
                            .map(|b| {
                                let bits_here = (bits as usize).saturating_sub(b * 8).min(8);
                                (0xffu16 << (8 - bits_here)) as u8
                            })
                            .collect();
                        exprs.push(Expr::Bitwise {
                            sreg: NFT_REG_1,
                            dreg: NFT_REG_1,
                            len: len as u32,
                            xor: vec![0; len],
                            mask: mask.clone(),
                        });
                        let masked = bytes.iter().zip(&mask).map(|(b, m)| b & m).collect();
                        exprs.push(cmp(NFT_REG_1, neg, masked));
                    }
                    None => exprs.push(unknown("-d")),
                }
                i += 2;
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                let key = if tok.starts_with("-i") || tok == "--in-interface" {
                    NFT_META_IIFNAME
                } else {
                    NFT_META_OIFNAME
                };
                let name = arg(i);
                let mut data = name.trim_end_matches('+').as_bytes().to_vec();
                if !name.ends_with('+') {
                    data.push(0);
                }
                exprs.push(Expr::Meta {
                    key,
                    dreg: NFT_REG_1,
                });
                exprs.push(cmp(NFT_REG_1, neg, data));
                i += 2;
            }
            "--dport" | "--destination-port" => {
                let (lo, hi) = parse_port_range(arg(i));
                exprs.push(Expr::Payload {
                    base: PayloadBase::Transport,
                    offset: 2,
                    len: 2,
                    dreg: NFT_REG_1,
                });
                match (lo, hi) {
                    (Some(lo), Some(hi)) if lo == hi => {
                        exprs.push(cmp(NFT_REG_1, neg, lo.to_be_bytes().to_vec()))
                    }
                    (Some(lo), Some(hi)) => exprs.push(Expr::Range {
                        sreg: NFT_REG_1,
                        negate: neg,
                        from: lo.to_be_bytes().to_vec(),
                        to: hi.to_be_bytes().to_vec(),
                    }),
                    _ => exprs.push(unknown("--dport")),
                }
                i += 2;
            }
            "--dports" | "--destination-ports" => {
                exprs.push(multiport(arg(i), neg).unwrap_or_else(|| unknown("--dports")));
                i += 2;
            }
            "--dst-type" => {
                if arg(i) == "LOCAL" {
                    exprs.push(Expr::Fib {
                        dreg: NFT_REG_1,
                        result: NFT_FIB_RESULT_ADDRTYPE,
                        flags: NFTA_FIB_F_DADDR,
                    });
                    exprs.push(cmp(NFT_REG_1, neg, RTN_LOCAL.to_ne_bytes().to_vec()));
                } else {
                    exprs.push(unknown("--dst-type"));
                }
                i += 2;
            }
            "--comment" => {
                comment = Some(arg(i).to_owned());
                i += 2;
            }
            "-m" | "--match" => {
                // Matches whose options are handled above, or that always match.
                if !matches!(arg(i), "tcp" | "udp" | "comment" | "addrtype" | "multiport") {
                    exprs.push(unknown(&format!("-m {}", arg(i))));
                }
                i += 2;
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                let goto = tok == "-g" || tok == "--goto";
                target(
                    arg(i),
                    t.get(i + 2..).unwrap_or(&[]),
                    goto,
                    v6,
                    chains,
                    &mut exprs,
                );
                break;
            }
            "-s" | "--source" | "--sport" | "--source-port" => {
                exprs.push(unknown(tok));
                i += 2;
            }
            _ => {
                // An option of a match this code does not know: it and its argument
                // (the match itself is already "maybe").
                i += 1;
                while i < t.len() && !t[i].starts_with('-') && t[i] != "!" {
                    i += 1;
                }
            }
        }
        neg = false;
    }
    Rule::new(0, exprs, comment)
}

fn target(
    name: &str,
    opts: &[String],
    goto: bool,
    v6: bool,
    chains: &[String],
    exprs: &mut Vec<Expr>,
) {
    let opt = |o: &str| {
        opts.iter()
            .position(|x| x == o)
            .and_then(|p| opts.get(p + 1))
            .map(String::as_str)
    };
    let verdict = |v: Verdict| Expr::Immediate {
        dreg: 0,
        data: Data::Verdict(v),
    };
    if chains.iter().any(|c| c == name) {
        exprs.push(verdict(if goto {
            Verdict::Goto(name.into())
        } else {
            Verdict::Jump(name.into())
        }));
        return;
    }
    match name {
        "ACCEPT" => exprs.push(verdict(Verdict::Accept)),
        "DROP" => exprs.push(verdict(Verdict::Drop)),
        "RETURN" => exprs.push(verdict(Verdict::Return)),
        "DNAT" => {
            let Some((addr, port)) = opt("--to-destination").and_then(parse_sockaddr) else {
                exprs.push(Expr::XtTarget {
                    name: "DNAT".into(),
                    rev: u32::MAX,
                    info: Vec::new(),
                });
                return;
            };
            let mut nat_addr = None;
            if let Some(a) = addr {
                let b = match a {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                exprs.push(Expr::Immediate {
                    dreg: NFT_REG_1,
                    data: Data::Value(b),
                });
                nat_addr = Some(NFT_REG_1);
            }
            let mut nat_port = None;
            if let Some(p) = port {
                exprs.push(Expr::Immediate {
                    dreg: NFT_REG_2,
                    data: Data::Value(p.to_be_bytes().to_vec()),
                });
                nat_port = Some(NFT_REG_2);
            }
            exprs.push(Expr::Nat {
                kind: NatKind::Dnat,
                family: u32::from(if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }),
                reg_addr_min: nat_addr,
                reg_addr_max: nat_addr,
                reg_proto_min: nat_port,
                reg_proto_max: nat_port,
                flags: 0,
            });
        }
        "REDIRECT" => {
            let port = opt("--to-ports").and_then(|p| parse_port_range(p).0);
            let mut reg = None;
            if let Some(p) = port {
                exprs.push(Expr::Immediate {
                    dreg: NFT_REG_1,
                    data: Data::Value(p.to_be_bytes().to_vec()),
                });
                reg = Some(NFT_REG_1);
            }
            exprs.push(Expr::Redir {
                reg_proto_min: reg,
                reg_proto_max: reg,
                flags: 0,
            });
        }
        n => exprs.push(Expr::XtTarget {
            name: n.into(),
            rev: 0,
            info: Vec::new(),
        }),
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, bits) = match s.split_once('/') {
        Some((a, m)) => (a, Some(m)),
        None => (s, None),
    };
    let addr: IpAddr = a.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        None => max,
        Some(m) => match m.parse::<u8>() {
            Ok(b) if b <= max => b,
            _ => {
                // A dotted mask: count its bits.
                let m: IpAddr = m.parse().ok()?;
                match m {
                    IpAddr::V4(m) => u32::from(m).count_ones() as u8,
                    IpAddr::V6(m) => u128::from(m).count_ones() as u8,
                }
            }
        },
    };
    Some((addr, bits))
}

fn parse_port_range(s: &str) -> (Option<u16>, Option<u16>) {
    let mut parts = s.splitn(2, [':', '-']);
    let lo = parts.next().and_then(|p| p.parse().ok());
    let hi = parts.next().and_then(|p| p.parse().ok()).or(lo);
    (lo, hi)
}

/// `--to-destination 10.0.0.1:80`, `[2001:db8::1]:80`, `10.0.0.1`, `:80`.
fn parse_sockaddr(s: &str) -> Option<(Option<IpAddr>, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest.split_once(']')?;
        let port = p.strip_prefix(':').and_then(|p| parse_port_range(p).0);
        return Some((Some(a.parse().ok()?), port));
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Some((Some(a), None));
    }
    let (a, p) = s.rsplit_once(':')?;
    let addr = if a.is_empty() {
        None
    } else {
        Some(a.parse().ok()?)
    };
    Some((addr, parse_port_range(p).0))
}

/// An `xt_multiport_v1` info struct, as iptables would have built it.
fn multiport(list: &str, invert: bool) -> Option<Expr> {
    let mut ports = Vec::new();
    let mut pflags = Vec::new();
    for item in list.split(',') {
        match parse_port_range(item) {
            (Some(lo), Some(hi)) if lo != hi => {
                ports.extend([lo, hi]);
                pflags.extend([1u8, 0]);
            }
            (Some(p), _) => {
                ports.push(p);
                pflags.push(0);
            }
            _ => return None,
        }
    }
    if ports.len() > XT_MULTI_PORTS {
        return None;
    }
    let mut info = vec![0u8; XT_MULTIPORT_V1_LEN];
    info[0] = 1; // XT_MULTIPORT_DESTINATION
    info[1] = ports.len() as u8;
    for (i, p) in ports.iter().enumerate() {
        info[2 + 2 * i..4 + 2 * i].copy_from_slice(&p.to_ne_bytes());
    }
    for (i, f) in pflags.iter().enumerate() {
        info[2 + 2 * XT_MULTI_PORTS + i] = *f;
    }
    info[2 + 3 * XT_MULTI_PORTS] = u8::from(invert);
    Some(Expr::XtMatch {
        name: "multiport".into(),
        rev: 1,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER_SAVE: &str = r#"# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 80 -m comment --comment "web \"front\"" -j DNAT --to-destination 172.17.0.2:80
-A DOCKER -p tcp -m multiport --dports 443,8000:8080 -j REDIRECT --to-ports 8443
-A DOCKER -m frobnicate --frob 1 2 -j FROB
COMMIT
"#;

    #[test]
    fn docker_save_parses() {
        let t = parse_save(DOCKER_SAVE, Family::IP);
        assert_eq!(t.chains.len(), 3);
        let docker = t.chain("DOCKER").unwrap();
        assert_eq!(docker.rules.len(), 3);
        assert_eq!(docker.rules[0].comment.as_deref(), Some("web \"front\""));
        assert!(matches!(
            docker.rules[0].exprs().last(),
            Some(Expr::Nat { .. })
        ));
        assert!(matches!(
            docker.rules[1].exprs().last(),
            Some(Expr::Redir { .. })
        ));
        assert!(matches!(
            docker.rules[2].exprs().last(),
            Some(Expr::XtTarget { name, .. }) if name == "FROB"
        ));
        let pre = t.chain("PREROUTING").unwrap();
        assert_eq!(pre.base.as_ref().unwrap().priority, NF_IP_PRI_NAT_DST);
        assert!(matches!(
            pre.rules[0].exprs().last(),
            Some(Expr::Immediate { data: Data::Verdict(Verdict::Jump(c)), .. }) if c == "DOCKER"
        ));
    }

    #[test]
    fn garbage_does_not_panic() {
        for text in [
            "*nat\n-A",
            "*nat\n-A X -j",
            "*nat\n:X\n-A X -d / -j DNAT --to-destination [",
            "\u{0}\u{1}*nat\n-A X ! ! ! -p",
        ] {
            let _ = parse_save(text, Family::IP);
        }
    }
}
