//! Ruleset change notifications: the `NFNLGRP_NFTABLES` multicast group (what
//! `nft monitor` listens to), and rtnetlink address changes.
//!
//! Rule additions and deletions are applied to the [`RulesetModel`] in place
//! ([`apply`]): the notification carries the whole rule (expressions, handle,
//! and the handle of the rule it follows). Anything else (tables, chains, sets,
//! elements) asks for a full re-read, and so does an overflowing socket
//! (`ENOBUFS`): a change is never missed, at worst re-read.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::Arc,
};

use super::{
    attr,
    model::{Family, RulesetModel},
    netlink::{
        self, NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWGEN, NFT_MSG_NEWRULE,
        NLMSG_HDRLEN, RuleMessage, open_netlink,
    },
};

const NFNLGRP_NFTABLES: libc::c_int = 7;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NFT_MSG_DELRULE: u16 = 8;
const NLM_F_APPEND: u16 = 0x800;
const NFGENMSG_LEN: usize = 4;
/// Notification socket buffer (SO_RCVBUFFORCE as root): a burst of kube-proxy
/// changes fits; beyond it ENOBUFS triggers a full re-read.
const MONITOR_RCVBUF: libc::c_int = 16 * 1024 * 1024;
const NETLINK_ROUTE: libc::c_int = 0;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// One change the kernel announced.
#[derive(Debug)]
pub enum Change {
    RuleAdded {
        msg: RuleMessage,
        appended: bool,
    },
    RuleDeleted(RuleMessage),
    /// The end of one committed transaction (`NFT_MSG_NEWGEN`).
    Generation,
    /// A table, chain, set or element changed: re-read the ruleset.
    Structural {
        msg: u16,
        family: Family,
    },
    /// The socket overflowed (ENOBUFS): changes were lost, re-read everything.
    Overrun,
}

fn netlink_socket(protocol: libc::c_int, rcvbuf: libc::c_int) -> io::Result<OwnedFd> {
    let fd = open_netlink(protocol, libc::SOCK_NONBLOCK)?;
    let size = rcvbuf;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: an int-sized option on our socket.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
    }
    Ok(fd)
}

/// Binds a netlink socket (the kernel picks the port id) to `groups`.
fn bind(fd: &OwnedFd, groups: u32) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = groups;
    // SAFETY: binding our socket to a valid sockaddr_nl.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads every datagram waiting on a non-blocking socket; `Ok(None)` when none is.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: receiving into our own buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// A subscription to nf_tables change notifications in the network namespace
/// of the thread that opened it. Non-blocking: poll its fd, then [`Self::drain`].
pub struct RulesetMonitor {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl AsRawFd for RulesetMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl RulesetMonitor {
    pub fn open() -> io::Result<Self> {
        Self::open_with_buffer(MONITOR_RCVBUF)
    }

    /// With a receive buffer of `bytes` (tests use a small one to overflow it).
    pub fn open_with_buffer(bytes: libc::c_int) -> io::Result<Self> {
        let fd = netlink_socket(NETLINK_NETFILTER, bytes)?;
        // Multicast is delivered to bound sockets only.
        bind(&fd, 0)?;
        let group = NFNLGRP_NFTABLES;
        // SAFETY: an int-sized option on our socket.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&raw const group).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            buf: vec![0; 256 * 1024],
        })
    }

    /// Every change waiting on the socket, in order, appended to `out`.
    pub fn drain(&mut self, out: &mut Vec<Change>) -> io::Result<()> {
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    out.push(Change::Overrun);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let buf = Arc::new(self.buf[..n].to_vec());
            parse(&buf, out);
        }
    }
}

/// The changes in one notification datagram.
pub fn parse(buf: &Arc<Vec<u8>>, out: &mut Vec<Change>) {
    let mut pos = 0;
    while pos + NLMSG_HDRLEN + NFGENMSG_LEN <= buf.len() {
        let h = &buf[pos..];
        let len = u32::from_ne_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes([h[4], h[5]]);
        let flags = u16::from_ne_bytes([h[6], h[7]]);
        if len < NLMSG_HDRLEN + NFGENMSG_LEN || pos + len > buf.len() {
            break;
        }
        if ty >> 8 == NFNL_SUBSYS_NFTABLES {
            let msg = ty & 0xff;
            let family = buf[pos + NLMSG_HDRLEN];
            let range = pos + NLMSG_HDRLEN + NFGENMSG_LEN..pos + len;
            match msg {
                NFT_MSG_NEWGEN => out.push(Change::Generation),
                NFT_MSG_NEWRULE | NFT_MSG_DELRULE => {
                    match netlink::decode_rule(buf, family, range) {
                        Some(rule) if msg == NFT_MSG_NEWRULE => out.push(Change::RuleAdded {
                            msg: rule,
                            appended: flags & NLM_F_APPEND != 0,
                        }),
                        Some(rule) => out.push(Change::RuleDeleted(rule)),
                        None => out.push(Change::Structural {
                            msg,
                            family: Family(family),
                        }),
                    }
                }
                // Trace events (17) say nothing about the ruleset.
                17 => {}
                _ => out.push(Change::Structural {
                    msg,
                    family: Family(family),
                }),
            }
        }
        pos += attr::align4(len);
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

/// Applies one change to the model in place.
pub fn apply(model: &mut RulesetModel, change: Change) -> Applied {
    match change {
        Change::Generation => Applied::Unchanged,
        Change::Structural { .. } | Change::Overrun => Applied::Resync,
        Change::RuleAdded { msg, appended } => {
            let Some(chain) = model
                .tables
                .iter_mut()
                .find(|t| t.family == msg.family && t.name == msg.table)
                .and_then(|t| t.chains.iter_mut().find(|c| c.name == msg.chain))
            else {
                return Applied::Resync;
            };
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
                .and_then(|t| t.chains.iter_mut().find(|c| c.name == msg.chain))
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
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl AsRawFd for AddressMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AddressMonitor {
    pub fn open() -> io::Result<Self> {
        let fd = netlink_socket(NETLINK_ROUTE, MONITOR_RCVBUF)?;
        bind(&fd, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)?;
        Ok(Self {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Whether any address changed since the last call (drains the socket).
    pub fn changed(&mut self) -> io::Result<bool> {
        let mut any = false;
        loop {
            match recv(self.fd.as_raw_fd(), &mut self.buf) {
                Ok(Some(_)) => any = true,
                Ok(None) => return Ok(any),
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
        assert_eq!(apply(&mut model, Change::Generation), Applied::Unchanged);
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
