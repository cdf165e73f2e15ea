//! The addresses of this host (of the calling thread's network namespace), live
//! from rtnetlink: an `RTM_GETADDR` dump, built and parsed with
//! `netlink-packet-route` and framed by [`crate::sys::netlink`].

use std::{io, net::IpAddr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, Parseable as _};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
};
use serde::Serialize;

use crate::sys::{
    netlink::{self, Body, Messages},
    uapi::{NLM_F_DUMP, NLM_F_REQUEST, RTM_NEWADDR},
};

/// The sequence number of the one request a dump socket sends.
const DUMP_SEQ: u32 = 1;

/// One address of this host and the interface that holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub ifindex: u32,
    pub ifname: String,
}

/// Every address of the calling thread's network namespace.
pub fn local_addresses() -> io::Result<Vec<LocalAddr>> {
    let sock = netlink::open(libc::NETLINK_ROUTE)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = DUMP_SEQ;
    let mut req = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetAddress(AddressMessage::default())),
    );
    req.finalize();
    let mut bytes = vec![0; req.buffer_len()];
    req.serialize(&mut bytes);
    netlink::send(&sock, &bytes)?;
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(netlink::RECV_BUF);
    loop {
        netlink::recv(&sock, &mut buf)?;
        for m in Messages::new(&buf) {
            let m = m?;
            match m.body {
                Body::Done | Body::Ack => return Ok(out),
                Body::Error(e) => return Err(e),
                Body::Data(p) if m.ty == RTM_NEWADDR => {
                    if let Some(a) = AddressMessage::parse(p).ok().as_ref().and_then(local_addr) {
                        out.push(a);
                    }
                }
                Body::Data(_) => {}
            }
        }
    }
}

/// The address an `RTM_NEWADDR` names: `IFA_LOCAL` (the address itself on a
/// point-to-point link), else `IFA_ADDRESS`.
fn local_addr(msg: &AddressMessage) -> Option<LocalAddr> {
    let mut address = None;
    let mut local = None;
    for a in &msg.attributes {
        match a {
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Local(ip) => local = Some(*ip),
            _ => {}
        }
    }
    let ifindex = msg.header.index;
    local.or(address).map(|addr| LocalAddr {
        addr,
        prefix_len: msg.header.prefix_len,
        ifindex,
        ifname: ifname(ifindex),
    })
}

impl LocalAddr {
    /// Whether `ip` is inside this address's subnet.
    pub fn subnet_contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_local() {
        let addrs = super::local_addresses().unwrap();
        assert!(
            addrs
                .iter()
                .any(|a| a.addr.is_loopback() && a.ifname == "lo"),
            "{addrs:?}"
        );
    }
}
