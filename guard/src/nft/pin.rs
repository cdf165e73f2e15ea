//! The pin: portguard's own nat table, whose chains run ahead of every other nat
//! chain and apply the owner's own mapping to new connections for a pinned port.
//! The first nat chain that sets a mapping for a connection wins, so a foreign
//! DNAT never sees a new connection to a pinned port.
//!
//! Priority: the kernel refuses nat chains at priority -200 or lower (they would
//! run before conntrack, `NF_IP_PRI_CONNTRACK`), so "-300" is impossible; the pin
//! uses [`PIN_PRIORITY`] = -199, ahead of Docker's and iptables' `dstnat` (-100)
//! and of any nat chain above -199. A chain at -199 too ties with it (the newest
//! chain runs first): [`chains_not_behind`] reports those.
//!
//! Installed and updated as one transaction that deletes the table and writes it
//! whole again (an atomic swap), removed as one transaction.
//!
//! Whose table: the pin table is created with `NFT_TABLE_F_OWNER` through the
//! agent's writer socket, so the kernel records that socket's netlink port id
//! as its owner and deletes it when the socket closes. A table is the agent's
//! own only by that id ([`is_pin_table`]), never by its name: any other table
//! called `portguard` (another program's, one left by an older portguard
//! without the flag, a second agent's) is a [`ForeignPinTable`], reported and
//! never deleted or written to; its family gets no pin while it is there.
//! Deletions name the table instance by handle, and the table is created
//! exclusively, so a table of that name appearing between read and commit
//! fails the batch instead of being deleted or adopted.
//!
//! A pin never widens exposure and never breaks the owner's own paths:
//! - it matches the host address the owner published on (`-p 127.0.0.1:80:80`
//!   pins `127.0.0.1` only), every local address only for a publish on all;
//! - it leaves alone connections arriving from the owner's own bridge (a
//!   container reaching a published port through the host address, "hairpin"):
//!   Docker's own rules handle those (docker-proxy, or its DNAT with hairpin
//!   masquerading), exactly as Docker's `! -i docker0` does;
//! - it does not rewrite connections to loopback from this host: with the
//!   userland proxy on, Docker serves those through docker-proxy, and a DNAT
//!   from 127.0.0.1 to a container is dropped as martian unless
//!   `route_localnet` is on. A loopback-only publish is pinned in no chain.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::{
    attr::{self, NLA_F_NESTED},
    expr::{NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LIST_ELEM},
    model::{Family, Hook, RulesetModel, Table},
    transaction::{Op, Placement, Transaction},
};
use crate::policy::Proto;
use crate::sys::uapi::{
    IFNAMSIZ, NFT_CMP_EQ, NFT_CMP_NEQ, NFT_FIB_RESULT_ADDRTYPE, NFT_META_IIFNAME, NFT_META_L4PROTO,
    NFT_NAT_DNAT, NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER, NFT_REG_1, NFT_REG_2,
    NFTA_CMP_DATA, NFTA_CMP_OP, NFTA_CMP_SREG, NFTA_DATA_VALUE, NFTA_FIB_DREG, NFTA_FIB_F_DADDR,
    NFTA_FIB_FLAGS, NFTA_FIB_RESULT, NFTA_IMMEDIATE_DATA, NFTA_IMMEDIATE_DREG, NFTA_META_DREG,
    NFTA_META_KEY, NFTA_NAT_FAMILY, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_PROTO_MIN, NFTA_NAT_TYPE,
    NFTA_PAYLOAD_BASE, NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_LEN, NFTA_PAYLOAD_OFFSET, RTN_LOCAL,
};

/// portguard's own table (one per family in use: `ip`, `ip6`).
pub const PIN_TABLE: &str = "portguard";
pub const PIN_PREROUTING_CHAIN: &str = "pin_prerouting";
pub const PIN_OUTPUT_CHAIN: &str = "pin_output";
/// The earliest priority the kernel accepts for a nat chain.
pub const PIN_PRIORITY: i32 = -199;

/// Whether a table has the pin table's name and family (anyone's).
pub fn has_pin_name(table: &Table) -> bool {
    table.name == PIN_TABLE && matches!(table.family, Family::IP | Family::IP6)
}

/// Whether a table is the pin table of the agent writing from netlink port
/// `ours`: the name, and owned by that port.
pub fn is_pin_table(table: &Table, ours: u32) -> bool {
    has_pin_name(table) && table.owner == Some(ours)
}

/// A table named like the pin table that is not this agent's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ForeignPinTable {
    pub family: Family,
    pub handle: u64,
    /// The netlink port id owning it (`flags owner`), or none.
    pub owner: Option<u32>,
}

/// The pin-named tables of a ruleset, split by whose they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinTables {
    /// This agent's, (family, handle).
    pub ours: Vec<(Family, u64)>,
    pub foreign: Vec<ForeignPinTable>,
}

impl PinTables {
    /// The pin-named tables of `model`, for the agent writing from port `ours`.
    pub fn of(model: &RulesetModel, ours: u32) -> Self {
        let mut out = Self::default();
        for t in model.tables.iter().filter(|t| has_pin_name(t)) {
            if is_pin_table(t, ours) {
                out.ours.push((t.family, t.handle));
            } else {
                out.foreign.push(ForeignPinTable {
                    family: t.family,
                    handle: t.handle,
                    owner: t.owner,
                });
            }
        }
        out
    }

    /// Whether another table holds the pin table's name in `family`: no pin
    /// can be installed there.
    pub fn blocked(&self, family: Family) -> bool {
        self.foreign.iter().any(|f| f.family == family)
    }
}

/// One pinned mapping: new connections to `port` on a local address (or `host`
/// only) go to `target`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Pin {
    pub proto: Proto,
    pub port: u16,
    /// The host address the owner published on; none: every local address.
    pub host: Option<IpAddr>,
    pub target: SocketAddr,
    /// Connections arriving on this interface (the bridge the owner's
    /// container sits behind) are left to the owner's own rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_iif: Option<String>,
}

impl Pin {
    /// The family of the pin table holding it (its target's).
    pub fn family(&self) -> Family {
        if self.target.is_ipv6() {
            Family::IP6
        } else {
            Family::IP
        }
    }

    /// Whether the pin has a rule in the chain of this hook: none on output
    /// for a loopback host (see the module doc).
    pub fn applies_to(&self, hook: Hook) -> bool {
        match hook {
            Hook::Output => !self.host.is_some_and(|h| h.is_loopback()),
            _ => true,
        }
    }

    /// `nft` syntax, for people.
    pub fn describe(&self, output: bool) -> String {
        let daddr = match self.host {
            Some(h) => format!("{} daddr {h}", if h.is_ipv6() { "ip6" } else { "ip" }),
            None if output => "fib daddr type local (not loopback)".into(),
            None => "fib daddr type local".into(),
        };
        let iif = match (&self.exclude_iif, output) {
            (Some(i), false) => format!(" iifname != {i:?}"),
            _ => String::new(),
        };
        format!(
            "{} dport {} {daddr}{iif} dnat to {}",
            self.proto, self.port, self.target
        )
    }

    /// The rule's `NFTA_RULE_EXPRESSIONS`.
    pub fn expressions(&self, output: bool) -> Vec<u8> {
        let v6 = self.target.is_ipv6();
        let mut list = Vec::new();
        // meta l4proto == proto
        push(
            &mut list,
            "meta",
            &[
                (NFTA_META_DREG, be(NFT_REG_1)),
                (NFTA_META_KEY, be(NFT_META_L4PROTO)),
            ],
        );
        push_cmp(&mut list, NFT_CMP_EQ, &[self.proto.ip_proto()]);
        // th dport == port
        push(
            &mut list,
            "payload",
            &[
                (NFTA_PAYLOAD_DREG, be(NFT_REG_1)),
                (NFTA_PAYLOAD_BASE, be(NFT_PAYLOAD_TRANSPORT_HEADER)),
                (NFTA_PAYLOAD_OFFSET, be(2)),
                (NFTA_PAYLOAD_LEN, be(2)),
            ],
        );
        push_cmp(&mut list, NFT_CMP_EQ, &self.port.to_be_bytes());
        if let (Some(iif), false) = (&self.exclude_iif, output) {
            // meta iifname != "bridge"
            push(
                &mut list,
                "meta",
                &[
                    (NFTA_META_DREG, be(NFT_REG_1)),
                    (NFTA_META_KEY, be(NFT_META_IIFNAME)),
                ],
            );
            push_cmp(&mut list, NFT_CMP_NEQ, &ifname_bytes(iif));
        }
        let (daddr_offset, daddr_len) = if v6 { (24, 16) } else { (16, 4) };
        match self.host {
            Some(host) => {
                push_daddr_load(&mut list, daddr_offset, daddr_len);
                push_cmp(&mut list, NFT_CMP_EQ, &ip_bytes(host));
            }
            None => {
                if output {
                    // Not to loopback: Docker's own OUTPUT rule leaves it alone too.
                    if v6 {
                        push_daddr_load(&mut list, daddr_offset, daddr_len);
                        push_cmp(
                            &mut list,
                            NFT_CMP_NEQ,
                            &ip_bytes("::1".parse().expect("ip")),
                        );
                    } else {
                        push_daddr_load(&mut list, daddr_offset, 1);
                        push_cmp(&mut list, NFT_CMP_NEQ, &[127]);
                    }
                }
                push(
                    &mut list,
                    "fib",
                    &[
                        (NFTA_FIB_DREG, be(NFT_REG_1)),
                        (NFTA_FIB_RESULT, be(NFT_FIB_RESULT_ADDRTYPE)),
                        (NFTA_FIB_FLAGS, be(NFTA_FIB_F_DADDR)),
                    ],
                );
                push_cmp(&mut list, NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes());
            }
        }
        push(
            &mut list,
            "immediate",
            &[
                (NFTA_IMMEDIATE_DREG, be(NFT_REG_1)),
                (
                    NFTA_IMMEDIATE_DATA | NLA_F_NESTED,
                    value(&ip_bytes(self.target.ip())),
                ),
            ],
        );
        push(
            &mut list,
            "immediate",
            &[
                (NFTA_IMMEDIATE_DREG, be(NFT_REG_2)),
                (
                    NFTA_IMMEDIATE_DATA | NLA_F_NESTED,
                    value(&self.target.port().to_be_bytes()),
                ),
            ],
        );
        push(
            &mut list,
            "nat",
            &[
                (NFTA_NAT_TYPE, be(NFT_NAT_DNAT)),
                (NFTA_NAT_FAMILY, be(u32::from(self.family().0))),
                (NFTA_NAT_REG_ADDR_MIN, be(NFT_REG_1)),
                (NFTA_NAT_REG_PROTO_MIN, be(NFT_REG_2)),
            ],
        );
        list
    }
}

fn be(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn value(v: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    attr::put(&mut b, NFTA_DATA_VALUE, v);
    b
}

/// An interface name as `meta iifname` loads it: NUL-padded to `IFNAMSIZ`.
fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes()[..name.len().min(IFNAMSIZ - 1)].to_vec();
    b.resize(IFNAMSIZ, 0);
    b
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn push(list: &mut Vec<u8>, name: &str, data: &[(u16, Vec<u8>)]) {
    let mut d = Vec::new();
    for (t, p) in data {
        attr::put(&mut d, *t, p);
    }
    let mut e = Vec::new();
    attr::put_str(&mut e, NFTA_EXPR_NAME, name);
    attr::put(&mut e, NFTA_EXPR_DATA | NLA_F_NESTED, &d);
    attr::put(list, NFTA_LIST_ELEM | NLA_F_NESTED, &e);
}

fn push_cmp(list: &mut Vec<u8>, op: u32, data: &[u8]) {
    push(
        list,
        "cmp",
        &[
            (NFTA_CMP_SREG, be(NFT_REG_1)),
            (NFTA_CMP_OP, be(op)),
            (NFTA_CMP_DATA | NLA_F_NESTED, value(data)),
        ],
    );
}

fn push_daddr_load(list: &mut Vec<u8>, offset: u32, len: u32) {
    push(
        list,
        "payload",
        &[
            (NFTA_PAYLOAD_DREG, be(NFT_REG_1)),
            (NFTA_PAYLOAD_BASE, be(NFT_PAYLOAD_NETWORK_HEADER)),
            (NFTA_PAYLOAD_OFFSET, be(offset)),
            (NFTA_PAYLOAD_LEN, be(len)),
        ],
    );
}

/// One transaction that makes the pin tables hold exactly `pins`: this
/// agent's `installed` tables (family, handle) are deleted by handle and
/// written again whole (an atomic swap, so no new connection ever meets a
/// half-written pin); a family left without pins loses its table. The caller
/// leaves out pins of a family another table of that name blocks.
pub fn sync_transaction(installed: &[(Family, u64)], pins: &[Pin]) -> Transaction {
    let mut tx = Transaction::new();
    for (family, handle) in installed {
        tx.push(Op::DeleteTable {
            family: *family,
            name: PIN_TABLE.into(),
            handle: *handle,
        });
    }
    for family in [Family::IP, Family::IP6] {
        let of_family: Vec<&Pin> = pins.iter().filter(|p| p.family() == family).collect();
        if of_family.is_empty() {
            continue;
        }
        // Owned by the committing socket (the agent's long-lived writer):
        // however the agent dies, the kernel removes the pins with it.
        tx.push(Op::AddTable {
            family,
            name: PIN_TABLE.into(),
            owner: true,
        });
        for (chain, hook) in [
            (PIN_PREROUTING_CHAIN, Hook::Prerouting),
            (PIN_OUTPUT_CHAIN, Hook::Output),
        ] {
            tx.push(Op::AddNatChain {
                family,
                table: PIN_TABLE.into(),
                name: chain.into(),
                hook,
                priority: PIN_PRIORITY,
            });
            let output = hook == Hook::Output;
            for pin in of_family.iter().filter(|p| p.applies_to(hook)) {
                tx.push(Op::AddRule {
                    family,
                    table: PIN_TABLE.into(),
                    chain: chain.into(),
                    exprs: pin.expressions(output),
                    userdata: Some(comment_udata(&format!(
                        "portguard pin {}/{}",
                        pin.proto, pin.port
                    ))),
                    compat_proto: None,
                    placement: Placement::Append,
                    summary: pin.describe(output),
                });
            }
        }
    }
    tx
}

/// The rule comment as libnftnl stores it (`NFTNL_UDATA_RULE_COMMENT`, NUL-terminated).
fn comment_udata(comment: &str) -> Vec<u8> {
    let mut v = vec![0u8, (comment.len() + 1) as u8];
    v.extend_from_slice(comment.as_bytes());
    v.push(0);
    v
}

/// A nat chain that runs at the pin's priority or ahead of it (so possibly
/// before the pin), for families the pins use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainAhead {
    pub family: Family,
    pub table: String,
    pub chain: String,
    pub hook: Hook,
    pub priority: i32,
}

/// Every other nat base chain on prerouting/output not behind the pin (of the
/// agent writing from port `ours`).
pub fn chains_not_behind(model: &RulesetModel, ours: u32) -> Vec<ChainAhead> {
    let mut out = Vec::new();
    for t in model.tables.iter().filter(|t| !is_pin_table(t, ours)) {
        for c in &t.chains {
            let Some(b) = &c.base else { continue };
            if b.kind == "nat"
                && matches!(b.hook, Hook::Prerouting | Hook::Output)
                && b.priority <= PIN_PRIORITY
            {
                out.push(ChainAhead {
                    family: t.family,
                    table: t.name.clone(),
                    chain: c.name.clone(),
                    hook: b.hook,
                    priority: b.priority,
                });
            }
        }
    }
    out
}

/// The lowest priority of the other nat chains (for "ahead of every other nat
/// chain present: lowest other is N").
pub fn lowest_other_nat_priority(model: &RulesetModel, ours: u32) -> Option<i32> {
    model
        .tables
        .iter()
        .filter(|t| !is_pin_table(t, ours))
        .flat_map(|t| &t.chains)
        .filter_map(|c| c.base.as_ref())
        .filter(|b| b.kind == "nat" && matches!(b.hook, Hook::Prerouting | Hook::Output))
        .map(|b| b.priority)
        .min()
}

/// One transaction that removes this agent's `installed` pin tables.
pub fn teardown_transaction(installed: &[(Family, u64)]) -> Transaction {
    sync_transaction(installed, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::expr::decode_list;
    use crate::nft::model::Expr;

    #[test]
    fn pin_rule_decodes_as_a_dnat_to_the_owner() {
        let pin = Pin {
            proto: Proto::Tcp,
            port: 80,
            host: None,
            target: "203.0.113.2:8080".parse().unwrap(),
            exclude_iif: None,
        };
        let exprs = decode_list(&pin.expressions(false));
        assert!(
            exprs.iter().any(|e| matches!(e, Expr::Nat { .. })),
            "{exprs:?}"
        );
        assert!(
            !exprs.iter().any(|e| matches!(e, Expr::Unknown { .. })),
            "{exprs:?}"
        );
        let tx = sync_transaction(&[(Family::IP, 7)], &[pin]);
        let text = tx.to_string();
        assert!(
            text.starts_with("delete table ip handle 7\nadd table ip portguard { flags owner; }\n"),
            "{text}"
        );
        assert!(text.contains("priority -199"), "{text}");
        assert_eq!(teardown_transaction(&[(Family::IP, 7)]).ops.len(), 1);
    }

    #[test]
    fn a_host_specific_pin_matches_its_address_and_spares_the_bridge() {
        let pin = Pin {
            proto: Proto::Tcp,
            port: 80,
            host: Some("198.51.100.1".parse().unwrap()),
            target: "203.0.113.2:8080".parse().unwrap(),
            exclude_iif: Some("docker0".into()),
        };
        let pre = decode_list(&pin.expressions(false));
        let iif = ifname_bytes("docker0");
        assert!(
            pre.iter()
                .any(|e| matches!(e, Expr::Cmp { data, .. } if *data == iif)),
            "prerouting leaves the owner's bridge alone: {pre:?}"
        );
        assert!(
            pre.iter()
                .any(|e| matches!(e, Expr::Cmp { data, .. } if data[..] == [198, 51, 100, 1])),
            "only the published address: {pre:?}"
        );
        assert!(
            !pre.iter().any(|e| matches!(e, Expr::Fib { .. })),
            "not every local address: {pre:?}"
        );
        let out = decode_list(&pin.expressions(true));
        assert!(
            !out.iter()
                .any(|e| matches!(e, Expr::Cmp { data, .. } if *data == iif)),
            "output has no input interface: {out:?}"
        );
        let text = sync_transaction(&[], &[pin]).to_string();
        assert!(text.contains("iifname != \"docker0\""), "{text}");
    }

    fn table(name: &str, family: Family, handle: u64, owner: Option<u32>) -> Table {
        Table {
            name: name.into(),
            family,
            handle,
            owner,
            ..Table::default()
        }
    }

    #[test]
    fn only_a_table_owned_by_our_port_is_ours() {
        let model = RulesetModel {
            tables: vec![
                table(PIN_TABLE, Family::IP, 1, Some(4242)),
                table(PIN_TABLE, Family::IP6, 2, None),
                table(PIN_TABLE, Family::INET, 3, None),
                table("nat", Family::IP, 4, Some(4242)),
            ],
            ..RulesetModel::default()
        };
        let ours = PinTables::of(&model, 4242);
        assert_eq!(ours.ours, vec![(Family::IP, 1)]);
        assert_eq!(
            ours.foreign,
            vec![ForeignPinTable {
                family: Family::IP6,
                handle: 2,
                owner: None
            }],
            "an unowned ip6 portguard is someone else's; inet is not a pin family"
        );
        assert!(ours.blocked(Family::IP6) && !ours.blocked(Family::IP));
        let other = PinTables::of(&model, 77);
        assert!(other.ours.is_empty(), "another agent's table is not ours");
        assert_eq!(other.foreign.len(), 2);
        assert!(other.blocked(Family::IP));
    }

    #[test]
    fn a_loopback_publish_is_not_pinned_on_output() {
        let pin = Pin {
            proto: Proto::Tcp,
            port: 8081,
            host: Some("127.0.0.1".parse().unwrap()),
            target: "203.0.113.2:8080".parse().unwrap(),
            exclude_iif: None,
        };
        assert!(!pin.applies_to(Hook::Output));
        let tx = sync_transaction(&[], &[pin]);
        let rules = tx
            .ops
            .iter()
            .filter(|op| matches!(op, Op::AddRule { chain, .. } if chain == PIN_OUTPUT_CHAIN))
            .count();
        assert_eq!(rules, 0, "{tx}");
    }
}
