//! Ruleset change notifications: the `NFNLGRP_NFTABLES` multicast group (what
//! `nft monitor` listens to), and rtnetlink address changes.
//!
//! Rule additions and deletions are applied to the [`RulesetModel`] in place
//! ([`apply`]): the notification carries the whole rule (expressions, handle,
//! and the handle of the rule it follows). Anything else (tables, chains, sets,
//! elements) asks for a full re-read, and so does an overflowing socket
//! (`ENOBUFS`): a change is never missed, at worst re-read.
//!
//! Every committed batch ends with `NFT_MSG_NEWGEN`, which names the
//! generation the batch created ([`Change::Generation`]). The subscription is
//! opened before the first dump, so a batch may be both in the dump and in the
//! stream: the caller applies a batch only when its generation is newer than
//! the model's ([`is_newer`]), and [`apply`] never puts a second rule with one
//! handle into a chain.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
};

use super::{
    attr::{self, Attrs, be_u32},
    model::{Family, RulesetModel},
    netlink::{self, RuleMessage},
};
use crate::sys::{
    netlink::{self as nl, Body, Messages, Socket},
    uapi::{
        NFGENMSG_LEN, NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES, NFT_MSG_DELRULE, NFT_MSG_NEWGEN,
        NFT_MSG_NEWRULE, NFT_MSG_TRACE, NFTA_GEN_ID, NFTA_GEN_PROC_NAME, NFTA_GEN_PROC_PID,
        NLM_F_APPEND, RTM_DELADDR, RTM_NEWADDR, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR,
    },
};

/// Notification socket buffer (SO_RCVBUFFORCE as root): a burst of kube-proxy
/// changes fits; beyond it ENOBUFS triggers a full re-read.
const MONITOR_RCVBUF: usize = 16 * 1024 * 1024;
/// Room for one notification datagram of the ruleset monitor.
const RULESET_RECV_BUF: usize = 256 * 1024;

/// One change the kernel announced.
#[derive(Debug)]
pub enum Change {
    RuleAdded {
        msg: RuleMessage,
        appended: bool,
    },
    RuleDeleted(RuleMessage),
    /// The end of one committed transaction (`NFT_MSG_NEWGEN`): the
    /// generation it created and who committed it.
    Generation(NewGen),
    /// A table, chain, set or element changed: re-read the ruleset.
    Structural {
        msg: u16,
        family: Family,
    },
    /// The socket overflowed (ENOBUFS): changes were lost, re-read everything.
    Overrun,
}

/// What an `NFT_MSG_NEWGEN` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewGen {
    /// `NFTA_GEN_ID`, when the message carries it.
    pub id: Option<u32>,
    /// `NFTA_GEN_PROC_PID` and `NFTA_GEN_PROC_NAME`: the committing process
    /// (the kernel writes both since Linux 5.2; a netlink batch sent by the
    /// kernel itself has neither).
    pub by: Option<(u32, String)>,
}

impl NewGen {
    pub fn id(id: u32) -> Self {
        Self {
            id: Some(id),
            by: None,
        }
    }
}

/// A subscription to nf_tables change notifications in the network namespace
/// of the thread that opened it. Non-blocking: poll its fd, then [`Self::drain`].
pub struct RulesetMonitor {
    sock: Socket,
    buf: Vec<u8>,
}

impl AsRawFd for RulesetMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl RulesetMonitor {
    pub fn open() -> io::Result<Self> {
        Self::open_with_buffer(MONITOR_RCVBUF as libc::c_int)
    }

    /// With a receive buffer of `bytes` (tests use a small one to overflow it).
    pub fn open_with_buffer(bytes: libc::c_int) -> io::Result<Self> {
        let sock = nl::subscribe(
            libc::NETLINK_NETFILTER,
            0,
            &[NFNLGRP_NFTABLES],
            usize::try_from(bytes).unwrap_or(0),
        )?;
        Ok(Self {
            sock,
            buf: Vec::with_capacity(RULESET_RECV_BUF),
        })
    }

    /// Every change waiting on the socket, in order, appended to `out`.
    pub fn drain(&mut self, out: &mut Vec<Change>) -> io::Result<()> {
        loop {
            match nl::recv(&self.sock, &mut self.buf) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    out.push(Change::Overrun);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let buf = Arc::new(self.buf.clone());
            parse(&buf, out);
        }
    }
}

/// The changes in one notification datagram (a malformed tail is dropped).
pub fn parse(buf: &Arc<Vec<u8>>, out: &mut Vec<Change>) {
    for m in Messages::new(buf).map_while(Result::ok) {
        let Body::Data(p) = m.body else { continue };
        if m.ty >> 8 != NFNL_SUBSYS_NFTABLES || p.len() < NFGENMSG_LEN {
            continue;
        }
        let msg = m.ty & 0xff;
        let family = p[0];
        let range = m.payload.start + NFGENMSG_LEN..m.payload.end;
        match msg {
            NFT_MSG_NEWGEN => out.push(Change::Generation(new_gen(&buf[range]))),
            NFT_MSG_NEWRULE | NFT_MSG_DELRULE => match netlink::decode_rule(buf, family, range) {
                Some(rule) if msg == NFT_MSG_NEWRULE => out.push(Change::RuleAdded {
                    msg: rule,
                    appended: m.flags & NLM_F_APPEND != 0,
                }),
                Some(rule) => out.push(Change::RuleDeleted(rule)),
                None => out.push(Change::Structural {
                    msg,
                    family: Family(family),
                }),
            },
            // Trace events say nothing about the ruleset.
            NFT_MSG_TRACE => {}
            _ => out.push(Change::Structural {
                msg,
                family: Family(family),
            }),
        }
    }
}

/// The attributes of an `NFT_MSG_NEWGEN`.
fn new_gen(attrs: &[u8]) -> NewGen {
    let (mut id, mut pid, mut name) = (None, None, None);
    for (t, p) in Attrs::new(attrs).flatten() {
        match t {
            NFTA_GEN_ID => id = be_u32(p),
            NFTA_GEN_PROC_PID => pid = be_u32(p),
            NFTA_GEN_PROC_NAME => name = Some(attr::string(p)),
            _ => {}
        }
    }
    NewGen {
        id,
        by: pid.map(|pid| (pid, name.unwrap_or_default())),
    }
}

/// What applying a change did to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Updated,
    /// Nothing to do (a deleted rule already gone, a generation marker).
    Unchanged,
    /// The model cannot follow this change in place: re-read it.
    Resync,
}

/// Whether generation `generation` comes after `than` (serial number
/// arithmetic: the kernel's counter wraps). Unknown generations count as newer:
/// applying a change twice is harmless ([`apply`] keeps handles unique),
/// dropping one is not.
pub fn is_newer(generation: Option<u32>, than: Option<u32>) -> bool {
    match (generation, than) {
        (Some(g), Some(than)) => (g.wrapping_sub(than) as i32) > 0,
        _ => true,
    }
}

/// Applies one change to the model in place. A generation marker moves the
/// model's generation on.
pub fn apply(model: &mut RulesetModel, change: Change) -> Applied {
    match change {
        Change::Generation(generation) => {
            if generation.id.is_some() {
                model.generation = generation.id;
            }
            Applied::Unchanged
        }
        Change::Structural { .. } | Change::Overrun => Applied::Resync,
        Change::RuleAdded { msg, appended } => {
            let Some(chain) = model
                .tables
                .iter_mut()
                .find(|t| t.family == msg.family && t.name == msg.table)
                .and_then(|t| t.chain_mut(&msg.chain))
            else {
                return Applied::Resync;
            };
            // One handle, one rule: a rule the model holds already (a dump
            // and a notification of the same batch) is not added twice.
            if let Some(held) = chain.rules.iter().find(|r| r.handle == msg.rule.handle) {
                return if held.raw_exprs().is_some() && held.raw_exprs() == msg.rule.raw_exprs() {
                    Applied::Unchanged
                } else {
                    Applied::Resync
                };
            }
            let at = match msg.position {
                Some(prev) => match chain.rules.iter().position(|r| r.handle == prev) {
                    Some(i) => i + 1,
                    None => return Applied::Resync,
                },
                None if appended => chain.rules.len(),
                None => 0,
            };
            chain.rules.insert(at, msg.rule);
            Applied::Updated
        }
        Change::RuleDeleted(msg) => {
            let Some(chain) = model
                .tables
                .iter_mut()
                .find(|t| t.family == msg.family && t.name == msg.table)
                .and_then(|t| t.chain_mut(&msg.chain))
            else {
                return Applied::Unchanged;
            };
            match chain.rules.iter().position(|r| r.handle == msg.rule.handle) {
                Some(i) => {
                    chain.rules.remove(i);
                    Applied::Updated
                }
                None => Applied::Unchanged,
            }
        }
    }
}

/// Address changes (rtnetlink `RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR`) in the
/// network namespace of the thread that opened it. Any datagram means "re-read
/// the addresses".
pub struct AddressMonitor {
    sock: Socket,
    buf: Vec<u8>,
}

impl AsRawFd for AddressMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AddressMonitor {
    pub fn open() -> io::Result<Self> {
        let sock = nl::subscribe(
            libc::NETLINK_ROUTE,
            RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
            &[],
            MONITOR_RCVBUF,
        )?;
        Ok(Self {
            sock,
            buf: Vec::with_capacity(nl::RECV_BUF),
        })
    }

    /// Whether any address changed since the last call (drains the socket).
    pub fn changed(&mut self) -> io::Result<bool> {
        let mut any = false;
        loop {
            match nl::recv(&self.sock, &mut self.buf) {
                // An address added or removed; anything malformed counts too
                // (re-reading the addresses is never wrong).
                Ok(true) => {
                    any |= Messages::new(&self.buf).any(|m| {
                        m.is_err() || m.is_ok_and(|m| matches!(m.ty, RTM_NEWADDR | RTM_DELADDR))
                    });
                }
                Ok(false) => return Ok(any),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => any = true,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{
        model::Rule,
        netlink::{decode_messages, tests::sample_dump},
    };

    fn added(handle: u64, position: Option<u64>, appended: bool) -> Change {
        Change::RuleAdded {
            msg: RuleMessage {
                family: Family::IP,
                table: "t".into(),
                chain: "pre".into(),
                position,
                rule: Rule::new(handle, Vec::new(), None),
            },
            appended,
        }
    }

    fn handles(model: &RulesetModel) -> Vec<u64> {
        model.tables[0].chains[0]
            .rules
            .iter()
            .map(|r| r.handle)
            .collect()
    }

    #[test]
    fn rules_land_where_the_notification_says() {
        let mut model = decode_messages(&sample_dump());
        assert_eq!(handles(&model), vec![7]);
        // Appended (last: no position), inserted first, and after a named rule.
        assert_eq!(apply(&mut model, added(8, None, true)), Applied::Updated);
        assert_eq!(apply(&mut model, added(9, None, false)), Applied::Updated);
        assert_eq!(
            apply(&mut model, added(10, Some(7), true)),
            Applied::Updated
        );
        assert_eq!(handles(&model), vec![9, 7, 10, 8]);
        // A position the model does not know, or an unknown chain: re-read.
        assert_eq!(
            apply(&mut model, added(11, Some(99), true)),
            Applied::Resync
        );
        let Change::RuleAdded { mut msg, appended } = added(12, None, true) else {
            unreachable!()
        };
        msg.chain = "elsewhere".into();
        assert_eq!(
            apply(&mut model, Change::RuleAdded { msg, appended }),
            Applied::Resync
        );
        // Deleted by handle; twice is a no-op.
        let del = |h| {
            Change::RuleDeleted(RuleMessage {
                family: Family::IP,
                table: "t".into(),
                chain: "pre".into(),
                position: None,
                rule: Rule::new(h, Vec::new(), None),
            })
        };
        assert_eq!(apply(&mut model, del(7)), Applied::Updated);
        assert_eq!(apply(&mut model, del(7)), Applied::Unchanged);
        assert_eq!(handles(&model), vec![9, 10, 8]);
        assert_eq!(apply(&mut model, Change::Overrun), Applied::Resync);
        assert_eq!(
            apply(&mut model, Change::Generation(NewGen::default())),
            Applied::Unchanged
        );
    }

    #[test]
    fn a_handle_the_chain_holds_is_never_added_twice() {
        let mut model = decode_messages(&sample_dump());
        let held = model.tables[0].chains[0].rules[0].clone();
        // The same rule (a dump and a notification of one batch): nothing to do.
        let again = Change::RuleAdded {
            msg: RuleMessage {
                family: Family::IP,
                table: "t".into(),
                chain: "pre".into(),
                position: None,
                rule: held,
            },
            appended: true,
        };
        assert_eq!(apply(&mut model, again), Applied::Unchanged);
        // Another rule under a handle the model holds: the model is stale, re-read.
        assert_eq!(apply(&mut model, added(7, None, true)), Applied::Resync);
        assert_eq!(handles(&model), vec![7]);
    }

    #[test]
    fn only_newer_generations_are_applied_and_a_generation_moves_the_model_on() {
        assert!(is_newer(Some(5), Some(4)));
        assert!(!is_newer(Some(4), Some(4)), "in the dump already");
        assert!(!is_newer(Some(3), Some(4)));
        // The counter wraps.
        assert!(is_newer(Some(1), Some(u32::MAX)));
        assert!(!is_newer(Some(u32::MAX), Some(1)));
        // Unknown: applied (a duplicate is harmless, a lost change is not).
        assert!(is_newer(None, Some(4)) && is_newer(Some(4), None));
        let mut model = decode_messages(&sample_dump());
        assert_eq!(
            apply(&mut model, Change::Generation(NewGen::id(9))),
            Applied::Unchanged
        );
        assert_eq!(model.generation, Some(9));
    }

    #[test]
    fn a_newgen_notification_carries_its_generation_and_committer() {
        let mut buf = Vec::new();
        let mut attrs = Vec::new();
        attr::put(&mut attrs, NFTA_GEN_ID, &42u32.to_be_bytes());
        attr::put(&mut attrs, NFTA_GEN_PROC_PID, &4242u32.to_be_bytes());
        attr::put_str(&mut attrs, NFTA_GEN_PROC_NAME, "iptables-nft-re");
        let len = crate::sys::uapi::NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
        nl::put_header(
            &mut buf,
            len,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN,
            0,
            1,
        );
        buf.extend_from_slice(&[0, 0, 0, 0]);
        buf.extend_from_slice(&attrs);
        let mut out = Vec::new();
        parse(&Arc::new(buf), &mut out);
        let [Change::Generation(g)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(g.id, Some(42));
        assert_eq!(g.by, Some((4242, "iptables-nft-re".to_owned())));
    }

    #[test]
    fn a_notification_datagram_is_parsed_into_changes() {
        // A dump's NEWRULE message reads the same as a notification's.
        let buf = Arc::new(sample_dump());
        let mut out = Vec::new();
        parse(&buf, &mut out);
        assert!(
            matches!(out[0], Change::Structural { msg: 0, .. }),
            "{out:?}"
        );
        assert!(
            matches!(out[1], Change::Structural { msg: 3, .. }),
            "{out:?}"
        );
        let Change::RuleAdded { msg, appended } = &out[2] else {
            panic!("{out:?}")
        };
        assert!(!appended);
        assert_eq!(
            (msg.table.as_str(), msg.chain.as_str(), msg.rule.handle),
            ("t", "pre", 7)
        );
        assert!(msg.rule.raw_exprs().is_some_and(|e| !e.is_empty()));
    }
}
