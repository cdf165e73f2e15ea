//! Decoding nf_tables expressions (`NFTA_EXPR_NAME` + `NFTA_EXPR_DATA`) and
//! `nft_data`, attribute numbers from `linux/netfilter/nf_tables.h`.
//!
//! Shaped so it could go upstream into `netlink-packet-netfilter`: one function
//! per expression, attributes by their kernel names, nothing portguard-specific.
//! An expression that does not decode becomes `Expr::Unknown { name }`.
//!
//! The expression types live here, with their codec; [`super::model`] holds
//! them in rules and re-exports them.

use super::attr::{Attrs, be_i32, be_u32, string, until_nul};
use crate::sys::uapi::{
    NF_ACCEPT, NF_DROP, NFT_BREAK, NFT_CONTINUE, NFT_GOTO, NFT_JUMP, NFT_RETURN,
};
use crate::sys::uapi::{
    NFT_BITWISE_BOOL, NFT_CMP_EQ, NFT_CMP_GT, NFT_CMP_GTE, NFT_CMP_LT, NFT_CMP_LTE, NFT_CMP_NEQ,
    NFT_LOOKUP_F_INV, NFT_NAT_SNAT, NFT_PAYLOAD_LL_HEADER, NFT_PAYLOAD_NETWORK_HEADER,
    NFT_PAYLOAD_TRANSPORT_HEADER, NFT_RANGE_NEQ, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN,
    NFTA_BITWISE_MASK, NFTA_BITWISE_OP, NFTA_BITWISE_SREG, NFTA_BITWISE_XOR, NFTA_CMP_DATA,
    NFTA_CMP_OP, NFTA_CMP_SREG, NFTA_CT_DIRECTION, NFTA_CT_DREG, NFTA_CT_KEY, NFTA_DATA_VALUE,
    NFTA_DATA_VERDICT, NFTA_DYNSET_OP, NFTA_DYNSET_SET_NAME, NFTA_FIB_DREG, NFTA_FIB_FLAGS,
    NFTA_FIB_RESULT, NFTA_IMMEDIATE_DATA, NFTA_IMMEDIATE_DREG, NFTA_LOOKUP_DREG, NFTA_LOOKUP_FLAGS,
    NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_META_DREG, NFTA_META_KEY, NFTA_META_SREG,
    NFTA_NAT_FAMILY, NFTA_NAT_FLAGS, NFTA_NAT_REG_ADDR_MAX, NFTA_NAT_REG_ADDR_MIN,
    NFTA_NAT_REG_PROTO_MAX, NFTA_NAT_REG_PROTO_MIN, NFTA_NAT_TYPE, NFTA_PAYLOAD_BASE,
    NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_LEN, NFTA_PAYLOAD_OFFSET, NFTA_PAYLOAD_SREG,
    NFTA_RANGE_FROM_DATA, NFTA_RANGE_OP, NFTA_RANGE_SREG, NFTA_RANGE_TO_DATA, NFTA_REDIR_FLAGS,
    NFTA_REDIR_REG_PROTO_MAX, NFTA_REDIR_REG_PROTO_MIN, NFTA_TPROXY_FAMILY, NFTA_TPROXY_REG_ADDR,
    NFTA_TPROXY_REG_PORT, NFTA_VERDICT_CHAIN, NFTA_VERDICT_CODE, NFTA_XT_INFO, NFTA_XT_NAME,
    NFTA_XT_REV,
};
pub use crate::sys::uapi::{NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LIST_ELEM};

/// A verdict, as in `nft_verdict`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Drop,
    Accept,
    Continue,
    Break,
    Return,
    Jump(String),
    Goto(String),
    /// A code this model does not name (queue, stolen…).
    Other(i32),
}

impl Verdict {
    pub fn from_code(code: i32, chain: Option<String>) -> Self {
        match (code, chain) {
            (NF_DROP, _) => Self::Drop,
            (NF_ACCEPT, _) => Self::Accept,
            (NFT_CONTINUE, _) => Self::Continue,
            (NFT_BREAK, _) => Self::Break,
            (NFT_RETURN, _) => Self::Return,
            (NFT_JUMP, Some(c)) => Self::Jump(c),
            (NFT_GOTO, Some(c)) => Self::Goto(c),
            (code, _) => Self::Other(code),
        }
    }
}

/// `nft_data`: a value or a verdict.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Data {
    Value(Vec<u8>),
    Verdict(Verdict),
}

/// Where a payload expression reads (`NFT_PAYLOAD_*_HEADER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadBase {
    LinkLayer,
    Network,
    Transport,
    Other(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    Snat,
    Dnat,
}

/// One expression of a rule. Registers are kept as the kernel numbers them
/// (0 verdict, 1–4 the 16-byte registers, 8–23 the 32-bit ones).
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// A payload write (mangling); harmless for reachability.
    PayloadSet,
    Meta {
        key: u32,
        dreg: u32,
    },
    /// `meta set …`: a statement, no match.
    MetaSet {
        key: u32,
    },
    Cmp {
        sreg: u32,
        op: CmpOp,
        data: Vec<u8>,
    },
    Range {
        sreg: u32,
        negate: bool,
        from: Vec<u8>,
        to: Vec<u8>,
    },
    /// Boolean bitwise: `dreg = (sreg & mask) ^ xor`. Shifts decode as `Unknown`.
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Immediate {
        dreg: u32,
        data: Data,
    },
    Lookup {
        set: String,
        sreg: u32,
        dreg: Option<u32>,
        invert: bool,
    },
    Nat {
        kind: NatKind,
        /// `NFPROTO_IPV4`/`NFPROTO_IPV6` (2/10).
        family: u32,
        reg_addr_min: Option<u32>,
        reg_addr_max: Option<u32>,
        reg_proto_min: Option<u32>,
        reg_proto_max: Option<u32>,
        flags: u32,
    },
    Redir {
        reg_proto_min: Option<u32>,
        reg_proto_max: Option<u32>,
        flags: u32,
    },
    Masq,
    Tproxy {
        family: u32,
        reg_addr: Option<u32>,
        reg_port: Option<u32>,
    },
    Fib {
        dreg: u32,
        result: u32,
        flags: u32,
    },
    Ct {
        key: u32,
        dreg: Option<u32>,
        direction: Option<u8>,
    },
    Counter,
    Log,
    Limit,
    Reject,
    Notrack,
    Dynset {
        set: String,
        op: u32,
    },
    /// An iptables match (`xt`), with its raw `info` struct in host byte order.
    XtMatch {
        name: String,
        rev: u32,
        info: Vec<u8>,
    },
    /// An iptables target (`xt`): DNAT, REDIRECT, MARK…
    XtTarget {
        name: String,
        rev: u32,
        info: Vec<u8>,
    },
    /// Anything this model does not decode, kept by name.
    Unknown {
        name: String,
    },
}

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
    match std::str::from_utf8(until_nul(raw)) {
        Ok(name) => decode(name, data).unwrap_or_else(|| unknown(name)),
        Err(_) => unknown(&string(raw)),
    }
}

/// A raw `NFTA_RULE_EXPRESSIONS` list, one item per element as
/// [`decode_list`] gives them, each the answer of `each` to the expression's
/// name and data (`None` where [`decode_list`] would give `Unknown` for want
/// of a name): a scan for a few kinds that decodes nothing else.
pub fn decode_list_with<'a, T>(
    list: &'a [u8],
    each: impl Fn(&str, &'a [u8]) -> Option<T> + 'a,
) -> impl Iterator<Item = Option<T>> + 'a {
    Attrs::new(list).map(move |e| match e {
        Ok((NFTA_LIST_ELEM, elem)) => {
            let mut name: Option<&[u8]> = None;
            let mut data: &[u8] = &[];
            for attr in Attrs::new(elem) {
                let (ty, payload) = attr.ok()?;
                match ty {
                    NFTA_EXPR_NAME => name = Some(payload),
                    NFTA_EXPR_DATA => data = payload,
                    _ => {}
                }
            }
            let raw = name?;
            each(std::str::from_utf8(until_nul(raw)).ok()?, data)
        }
        _ => None,
    })
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
        "payload" => payload(&a)?,
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
        "cmp" => {
            let (sreg, op, data) = cmp(&a)?;
            Expr::Cmp {
                sreg,
                op,
                data: data.to_vec(),
            }
        }
        "range" => Expr::Range {
            sreg: u32_of(&a, NFTA_RANGE_SREG)?,
            negate: u32_of(&a, NFTA_RANGE_OP)? == NFT_RANGE_NEQ,
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
    value_slice(nest).map(<[u8]>::to_vec)
}

/// [`value`], borrowed from the message: the first value or verdict of the
/// nest decides, as in [`data_of`] (a verdict is no value).
fn value_slice(nest: &[u8]) -> Option<&[u8]> {
    for attr in Attrs::new(nest) {
        match attr.ok()? {
            (NFTA_DATA_VALUE, payload) => return Some(payload),
            (NFTA_DATA_VERDICT, _) => return None,
            _ => {}
        }
    }
    None
}

/// A `payload` expression: a load ([`Expr::Payload`]) or a write
/// ([`Expr::PayloadSet`]).
fn payload(a: &AttrTable<'_>) -> Option<Expr> {
    if get(a, NFTA_PAYLOAD_SREG).is_some() {
        return Some(Expr::PayloadSet);
    }
    Some(Expr::Payload {
        base: match u32_of(a, NFTA_PAYLOAD_BASE)? {
            NFT_PAYLOAD_LL_HEADER => PayloadBase::LinkLayer,
            NFT_PAYLOAD_NETWORK_HEADER => PayloadBase::Network,
            NFT_PAYLOAD_TRANSPORT_HEADER => PayloadBase::Transport,
            n => PayloadBase::Other(n),
        },
        offset: u32_of(a, NFTA_PAYLOAD_OFFSET)?,
        len: u32_of(a, NFTA_PAYLOAD_LEN)?,
        dreg: u32_of(a, NFTA_PAYLOAD_DREG)?,
    })
}

/// A `cmp` expression's register, operator and value, the value borrowed
/// from the message.
fn cmp<'a>(a: &AttrTable<'a>) -> Option<(u32, CmpOp, &'a [u8])> {
    let op = match u32_of(a, NFTA_CMP_OP)? {
        NFT_CMP_EQ => CmpOp::Eq,
        NFT_CMP_NEQ => CmpOp::Neq,
        NFT_CMP_LT => CmpOp::Lt,
        NFT_CMP_LTE => CmpOp::Lte,
        NFT_CMP_GT => CmpOp::Gt,
        NFT_CMP_GTE => CmpOp::Gte,
        _ => return None,
    };
    Some((
        u32_of(a, NFTA_CMP_SREG)?,
        op,
        value_slice(get(a, NFTA_CMP_DATA)?)?,
    ))
}

/// What [`decode`] makes of a `payload` or `cmp` expression, the `cmp`
/// value borrowed rather than copied (`None` for any other expression, and
/// where [`decode`] gives none): for scans over many rules, such as a long
/// chain's port dispatch.
pub enum LoadOrCmp<'a> {
    Payload(Expr),
    Cmp {
        sreg: u32,
        op: CmpOp,
        data: &'a [u8],
    },
}

/// [`LoadOrCmp`] of expression `name` with attributes `data`.
pub fn load_or_cmp<'a>(name: &str, data: &'a [u8]) -> Option<LoadOrCmp<'a>> {
    match name {
        "payload" => payload(&attrs(data)?).map(LoadOrCmp::Payload),
        "cmp" => {
            let (sreg, op, data) = cmp(&attrs(data)?)?;
            Some(LoadOrCmp::Cmp { sreg, op, data })
        }
        _ => None,
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
