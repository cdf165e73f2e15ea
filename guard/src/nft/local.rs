//! The addresses of this host (of the calling thread's network namespace), live
//! from rtnetlink: an `RTM_GETADDR` dump.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
};

use serde::Serialize;

use super::attr::Attrs;

const NETLINK_ROUTE: libc::c_int = 0;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;

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
    let fd = super::netlink::open_netlink(NETLINK_ROUTE, 0)?;
    let len = NLMSG_HDRLEN + IFADDRMSG_LEN;
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETADDR.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0, 0, 0, 0, 0]);
    // SAFETY: our buffer, our socket.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our own buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let mut pos = 0;
        while pos + NLMSG_HDRLEN <= n {
            let h = &buf[pos..n];
            let len = u32::from_ne_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes([h[4], h[5]]);
            if len < NLMSG_HDRLEN || len > h.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated rtnetlink message",
                ));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = h
                        .get(16..20)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .unwrap_or(0);
                    return if code == 0 {
                        Ok(out)
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                RTM_NEWADDR if len >= NLMSG_HDRLEN + IFADDRMSG_LEN => {
                    let ifa = &h[NLMSG_HDRLEN..NLMSG_HDRLEN + IFADDRMSG_LEN];
                    let family = ifa[0];
                    let prefix_len = ifa[1];
                    let ifindex = u32::from_ne_bytes(ifa[4..8].try_into().expect("4 bytes"));
                    let mut address = None;
                    let mut local = None;
                    for (t, p) in Attrs::new(&h[NLMSG_HDRLEN + IFADDRMSG_LEN..len]).flatten() {
                        let ip = parse_ip(family, p);
                        match t {
                            IFA_ADDRESS => address = ip,
                            IFA_LOCAL => local = ip,
                            _ => {}
                        }
                    }
                    if let Some(addr) = local.or(address) {
                        out.push(LocalAddr {
                            addr,
                            prefix_len,
                            ifindex,
                            ifname: ifname(ifindex),
                        });
                    }
                }
                _ => {}
            }
            pos += (len + 3) & !3;
        }
    }
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

fn parse_ip(family: u8, p: &[u8]) -> Option<IpAddr> {
    match family as i32 {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(p.get(..4)?).ok()?,
        ))),
        libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(p.get(..16)?).ok()?,
        ))),
        _ => None,
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
