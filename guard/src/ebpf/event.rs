//! Bind events: the raw kernel record and its enriched, printable form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use guard_common::{AF_INET, BindEvent, IPPROTO_TCP, IPPROTO_UDP, Verdict};
use serde::Serialize;

use crate::sys::process::ProcessInfo;

/// Decodes one ring buffer item; `None` when it is not a whole event.
pub fn read_bind_event(bytes: &[u8]) -> Option<BindEvent> {
    if bytes.len() < size_of::<BindEvent>() {
        return None;
    }
    // SAFETY: BindEvent is plain old data, valid for any bytes; the read is unaligned.
    Some(unsafe { bytes.as_ptr().cast::<BindEvent>().read_unaligned() })
}

/// A bind to a protected port, with what `/proc` adds about the binder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BindRecord {
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub host_netns: bool,
    pub family: &'static str,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: &'static str,
    pub verdict: &'static str,
    #[serde(flatten)]
    pub process: ProcessInfo,
}

impl BindRecord {
    pub fn new(ev: &BindEvent, host_netns_cookie: u64) -> Self {
        let addr = if ev.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(
                ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3],
            ))
        } else {
            IpAddr::V6(Ipv6Addr::from(ev.addr))
        };
        let comm_len = ev
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(ev.comm.len());
        Self {
            pid: ev.pid,
            tgid: ev.tgid,
            uid: ev.uid,
            gid: ev.gid,
            comm: String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned(),
            cgroup_id: ev.cgroup_id,
            netns_cookie: ev.netns_cookie,
            host_netns: ev.netns_cookie == host_netns_cookie,
            family: if ev.family == AF_INET { "ipv4" } else { "ipv6" },
            addr,
            port: ev.port,
            proto: match ev.proto {
                IPPROTO_TCP => "tcp",
                IPPROTO_UDP => "udp",
                _ => "other",
            },
            verdict: match Verdict::from_u8(ev.verdict) {
                Some(Verdict::Owner) => "owner",
                Some(Verdict::Denied) => "denied",
                Some(Verdict::Observed) => "observed",
                Some(Verdict::OtherNetns) => "other-netns",
                None => "unknown",
            },
            process: ProcessInfo::read(ev.tgid),
        }
    }
}

#[cfg(test)]
mod tests {
    use guard_common::AF_INET6;

    use super::*;

    fn raw(family: u16, addr: [u8; 16]) -> BindEvent {
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"nginx");
        BindEvent {
            cgroup_id: 7,
            netns_cookie: 1,
            pid: 10,
            tgid: 9,
            uid: 0,
            gid: 0,
            addr,
            port: 80,
            family,
            proto: IPPROTO_TCP,
            verdict: Verdict::Denied as u8,
            _pad: [0; 2],
            comm,
        }
    }

    #[test]
    fn decodes_ipv4_event_bytes() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let ev = raw(AF_INET, addr);
        // SAFETY: a POD struct viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<BindEvent>())
        };
        let back = read_bind_event(bytes).unwrap();
        assert_eq!(back, ev);
        let rec = BindRecord::new(&back, 1);
        assert_eq!(rec.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(rec.comm, "nginx");
        assert_eq!(rec.verdict, "denied");
        assert!(rec.host_netns);
        assert!(read_bind_event(&bytes[..10]).is_none());
    }

    #[test]
    fn decodes_ipv6_event() {
        let rec = BindRecord::new(&raw(AF_INET6, Ipv6Addr::LOCALHOST.octets()), 2);
        assert_eq!(rec.addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(rec.family, "ipv6");
        assert!(!rec.host_netns);
    }
}
