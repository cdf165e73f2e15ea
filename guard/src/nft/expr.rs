//! Decoding nf_tables expressions (`NFTA_EXPR_NAME` + `NFTA_EXPR_DATA`) and
//! `nft_data`, attribute numbers from `linux/netfilter/nf_tables.h`.
//!
//! Shaped so it could go upstream into `netlink-packet-netfilter`: one function
//! per expression, attributes by their kernel names, nothing portguard-specific.
//! An expression that does not decode becomes `Expr::Unknown { name }`.

use super::{
    attr::{Attrs, be_i32, be_u32, string},
    model::{CmpOp, Data, Expr, NatKind, PayloadBase, Verdict},
};

// NFTA_LIST_* / NFTA_EXPR_*
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
// NFTA_DATA_* / NFTA_VERDICT_*
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
// payload
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_PAYLOAD_SREG: u16 = 5;
// meta
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
// cmp
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
// range
const NFTA_RANGE_SREG: u16 = 1;
const NFTA_RANGE_OP: u16 = 2;
const NFTA_RANGE_FROM_DATA: u16 = 3;
const NFTA_RANGE_TO_DATA: u16 = 4;
// bitwise
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_BITWISE_OP: u16 = 6;
const NFT_BITWISE_BOOL: u32 = 0;
// immediate
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
// lookup
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFT_LOOKUP_F_INV: u32 = 1;
// nat
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_ADDR_MAX: u16 = 4;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_REG_PROTO_MAX: u16 = 6;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_SNAT: u32 = 0;
// redir
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_REG_PROTO_MAX: u16 = 2;
const NFTA_REDIR_FLAGS: u16 = 3;
// tproxy
const NFTA_TPROXY_FAMILY: u16 = 1;
const NFTA_TPROXY_REG_ADDR: u16 = 2;
const NFTA_TPROXY_REG_PORT: u16 = 3;
// fib
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
// ct
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_DIRECTION: u16 = 3;
// dynset
const NFTA_DYNSET_SET_NAME: u16 = 1;
const NFTA_DYNSET_OP: u16 = 3;
// match / target (xt)
const NFTA_XT_NAME: u16 = 1;
const NFTA_XT_REV: u16 = 2;
const NFTA_XT_INFO: u16 = 3;

/// A whole `NFTA_RULE_EXPRESSIONS` list; what does not decode stays as `Unknown`.
pub fn decode_list(list: &[u8]) -> Vec<Expr> {
    Attrs::new(list)
        .map(|e| match e {
            Ok((NFTA_LIST_ELEM, e)) => decode_list_elem(e),
            _ => unknown("<malformed>"),
        })
        .collect()
}

/// One `NFTA_LIST_ELEM` of `NFTA_RULE_EXPRESSIONS`.
pub fn decode_list_elem(elem: &[u8]) -> Expr {
    let mut name: Option<&[u8]> = None;
    let mut data: &[u8] = &[];
    for attr in Attrs::new(elem) {
        let Ok((ty, payload)) = attr else {
            return unknown(&name.map(string).unwrap_or_else(|| "<malformed>".into()));
        };
        match ty {
            NFTA_EXPR_NAME => name = Some(payload),
            NFTA_EXPR_DATA => data = payload,
            _ => {}
        }
    }
    let Some(raw) = name else {
        return unknown("<unnamed>");
    };
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    match std::str::from_utf8(&raw[..end]) {
        Ok(name) => decode(name, data).unwrap_or_else(|| unknown(name)),
        Err(_) => unknown(&string(raw)),
    }
}

fn unknown(name: &str) -> Expr {
    Expr::Unknown {
        name: name.to_owned(),
    }
}

/// An expression's attributes indexed by type (no allocation); `None` when malformed.
struct AttrTable<'a>([Option<&'a [u8]>; MAX_EXPR_ATTR]);

/// Expression attribute types are small numbers; anything above is ignored.
const MAX_EXPR_ATTR: usize = 24;

fn attrs(data: &[u8]) -> Option<AttrTable<'_>> {
    let mut t = AttrTable([None; MAX_EXPR_ATTR]);
    for a in Attrs::new(data) {
        let (ty, p) = a.ok()?;
        if let Some(slot) = t.0.get_mut(ty as usize) {
            *slot = Some(p);
        }
    }
    Some(t)
}

fn get<'a>(a: &AttrTable<'a>, ty: u16) -> Option<&'a [u8]> {
    a.0.get(ty as usize).copied().flatten()
}

fn u32_of(a: &AttrTable<'_>, ty: u16) -> Option<u32> {
    get(a, ty).and_then(be_u32)
}

/// Decodes one expression's data; `None` when it cannot.
pub fn decode(name: &str, data: &[u8]) -> Option<Expr> {
    let a = attrs(data)?;
    Some(match name {
        "payload" => {
            if get(&a, NFTA_PAYLOAD_SREG).is_some() {
                Expr::PayloadSet
            } else {
                Expr::Payload {
                    base: match u32_of(&a, NFTA_PAYLOAD_BASE)? {
                        0 => PayloadBase::LinkLayer,
                        1 => PayloadBase::Network,
                        2 => PayloadBase::Transport,
                        n => PayloadBase::Other(n),
                    },
                    offset: u32_of(&a, NFTA_PAYLOAD_OFFSET)?,
                    len: u32_of(&a, NFTA_PAYLOAD_LEN)?,
                    dreg: u32_of(&a, NFTA_PAYLOAD_DREG)?,
                }
            }
        }
        "meta" => match u32_of(&a, NFTA_META_DREG) {
            Some(dreg) => Expr::Meta {
                key: u32_of(&a, NFTA_META_KEY)?,
                dreg,
            },
            None if get(&a, NFTA_META_SREG).is_some() => Expr::MetaSet {
                key: u32_of(&a, NFTA_META_KEY)?,
            },
            None => return None,
        },
        "cmp" => Expr::Cmp {
            sreg: u32_of(&a, NFTA_CMP_SREG)?,
            op: match u32_of(&a, NFTA_CMP_OP)? {
                0 => CmpOp::Eq,
                1 => CmpOp::Neq,
                2 => CmpOp::Lt,
                3 => CmpOp::Lte,
                4 => CmpOp::Gt,
                5 => CmpOp::Gte,
                _ => return None,
            },
            data: value(get(&a, NFTA_CMP_DATA)?)?,
        },
        "range" => Expr::Range {
            sreg: u32_of(&a, NFTA_RANGE_SREG)?,
            negate: u32_of(&a, NFTA_RANGE_OP)? == 1,
            from: value(get(&a, NFTA_RANGE_FROM_DATA)?)?,
            to: value(get(&a, NFTA_RANGE_TO_DATA)?)?,
        },
        "bitwise" => {
            if u32_of(&a, NFTA_BITWISE_OP).unwrap_or(NFT_BITWISE_BOOL) != NFT_BITWISE_BOOL {
                return None;
            }
            Expr::Bitwise {
                sreg: u32_of(&a, NFTA_BITWISE_SREG)?,
                dreg: u32_of(&a, NFTA_BITWISE_DREG)?,
                len: u32_of(&a, NFTA_BITWISE_LEN)?,
                mask: value(get(&a, NFTA_BITWISE_MASK)?)?,
                xor: value(get(&a, NFTA_BITWISE_XOR)?)?,
            }
        }
        "immediate" => Expr::Immediate {
            dreg: u32_of(&a, NFTA_IMMEDIATE_DREG)?,
            data: data_of(get(&a, NFTA_IMMEDIATE_DATA)?)?,
        },
        "lookup" => Expr::Lookup {
            set: string(get(&a, NFTA_LOOKUP_SET)?),
            sreg: u32_of(&a, NFTA_LOOKUP_SREG)?,
            dreg: u32_of(&a, NFTA_LOOKUP_DREG),
            invert: u32_of(&a, NFTA_LOOKUP_FLAGS).unwrap_or(0) & NFT_LOOKUP_F_INV != 0,
        },
        "nat" => Expr::Nat {
            kind: if u32_of(&a, NFTA_NAT_TYPE)? == NFT_NAT_SNAT {
                NatKind::Snat
            } else {
                NatKind::Dnat
            },
            family: u32_of(&a, NFTA_NAT_FAMILY)?,
            reg_addr_min: u32_of(&a, NFTA_NAT_REG_ADDR_MIN),
            reg_addr_max: u32_of(&a, NFTA_NAT_REG_ADDR_MAX),
            reg_proto_min: u32_of(&a, NFTA_NAT_REG_PROTO_MIN),
            reg_proto_max: u32_of(&a, NFTA_NAT_REG_PROTO_MAX),
            flags: u32_of(&a, NFTA_NAT_FLAGS).unwrap_or(0),
        },
        "redir" => Expr::Redir {
            reg_proto_min: u32_of(&a, NFTA_REDIR_REG_PROTO_MIN),
            reg_proto_max: u32_of(&a, NFTA_REDIR_REG_PROTO_MAX),
            flags: u32_of(&a, NFTA_REDIR_FLAGS).unwrap_or(0),
        },
        "masq" => Expr::Masq,
        "tproxy" => Expr::Tproxy {
            family: u32_of(&a, NFTA_TPROXY_FAMILY).unwrap_or(0),
            reg_addr: u32_of(&a, NFTA_TPROXY_REG_ADDR),
            reg_port: u32_of(&a, NFTA_TPROXY_REG_PORT),
        },
        "fib" => Expr::Fib {
            dreg: u32_of(&a, NFTA_FIB_DREG)?,
            result: u32_of(&a, NFTA_FIB_RESULT)?,
            flags: u32_of(&a, NFTA_FIB_FLAGS)?,
        },
        "ct" => Expr::Ct {
            key: u32_of(&a, NFTA_CT_KEY)?,
            dreg: u32_of(&a, NFTA_CT_DREG),
            direction: get(&a, NFTA_CT_DIRECTION).and_then(|b| b.first().copied()),
        },
        "counter" => Expr::Counter,
        "log" => Expr::Log,
        "limit" => Expr::Limit,
        "reject" => Expr::Reject,
        "notrack" => Expr::Notrack,
        "dynset" => Expr::Dynset {
            set: string(get(&a, NFTA_DYNSET_SET_NAME)?),
            op: u32_of(&a, NFTA_DYNSET_OP).unwrap_or(0),
        },
        "match" | "target" => {
            let name_ = string(get(&a, NFTA_XT_NAME)?);
            let rev = u32_of(&a, NFTA_XT_REV).unwrap_or(0);
            let info = get(&a, NFTA_XT_INFO).unwrap_or(&[]).to_vec();
            if name == "match" {
                Expr::XtMatch {
                    name: name_,
                    rev,
                    info,
                }
            } else {
                Expr::XtTarget {
                    name: name_,
                    rev,
                    info,
                }
            }
        }
        _ => return None,
    })
}

/// `NFTA_DATA_VALUE` inside an `nft_data` nest.
fn value(nest: &[u8]) -> Option<Vec<u8>> {
    match data_of(nest)? {
        Data::Value(v) => Some(v),
        Data::Verdict(_) => None,
    }
}

/// An `nft_data` nest: a value or a verdict.
pub fn data_of(nest: &[u8]) -> Option<Data> {
    for attr in Attrs::new(nest) {
        let (ty, payload) = attr.ok()?;
        match ty {
            NFTA_DATA_VALUE => return Some(Data::Value(payload.to_vec())),
            NFTA_DATA_VERDICT => {
                let mut code = None;
                let mut chain = None;
                for v in Attrs::new(payload) {
                    let (ty, p) = v.ok()?;
                    match ty {
                        NFTA_VERDICT_CODE => code = be_i32(p),
                        NFTA_VERDICT_CHAIN => chain = Some(string(p)),
                        _ => {}
                    }
                }
                return Some(Data::Verdict(Verdict::from_code(code?, chain)));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::attr::put;

    fn nest(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (t, p) in attrs {
            put(&mut b, *t, p);
        }
        b
    }

    #[test]
    fn cmp_decodes_and_garbage_is_unknown() {
        let data = nest(&[(NFTA_DATA_VALUE, vec![0, 80])]);
        let cmp = nest(&[
            (NFTA_CMP_SREG, 1u32.to_be_bytes().to_vec()),
            (NFTA_CMP_OP, 0u32.to_be_bytes().to_vec()),
            (NFTA_CMP_DATA, data),
        ]);
        assert_eq!(
            decode("cmp", &cmp),
            Some(Expr::Cmp {
                sreg: 1,
                op: CmpOp::Eq,
                data: vec![0, 80]
            })
        );
        assert_eq!(decode("cmp", &cmp[..cmp.len() - 3]), None);
        assert_eq!(decode("frobnicate", &cmp), None);
        let elem = nest(&[
            (NFTA_EXPR_NAME, b"frobnicate\0".to_vec()),
            (NFTA_EXPR_DATA, cmp),
        ]);
        assert_eq!(
            decode_list_elem(&elem),
            Expr::Unknown {
                name: "frobnicate".into()
            }
        );
    }
}
