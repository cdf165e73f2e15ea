//! The one netlink layer every reader and writer of portguard goes through:
//!
//! - [`open`] and [`subscribe`]: the sockets (`netlink-sys`), close-on-exec, in
//!   the network namespace of the calling thread (see [`super::netns::run_in`]);
//! - [`Messages`]: the one iterator over the messages of a received datagram,
//!   framed with `netlink-packet-core` (`NetlinkBuffer`, `ErrorBuffer`), which
//!   decodes `NLMSG_DONE` and `NLMSG_ERROR` (ack or errno) once for all: the
//!   nf_tables dump, transaction acks, the ruleset monitor, the address dump
//!   and address changes;
//! - [`put_header`]: the `nlmsghdr` of a message being built.
//!
//! What is inside a message (nf_tables attributes, `ifaddrmsg`) is each
//! reader's business.

use std::{io, ops::Range, os::fd::AsRawFd as _};

use netlink_packet_core::{ErrorBuffer, NetlinkBuffer};
pub use netlink_sys::Socket;
use netlink_sys::SocketAddr;

use super::uapi::{NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN};

/// Room for one received datagram: the kernel sends at most 32 KiB per dump
/// read (notifications of the ruleset monitor use a bigger buffer).
pub const RECV_BUF: usize = 64 * 1024;

/// A malformed datagram: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink datagram at byte {offset}: {what}")]
pub struct FrameError {
    pub offset: usize,
    pub what: &'static str,
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        Self::new(io::ErrorKind::InvalidData, e)
    }
}

/// What one message says.
#[derive(Debug)]
pub enum Body<'a> {
    /// Any other message type: its payload (after `nlmsghdr`).
    Data(&'a [u8]),
    /// `NLMSG_DONE`: the end of a dump.
    Done,
    /// `NLMSG_ERROR` with code 0: the request it answers succeeded.
    Ack,
    /// `NLMSG_ERROR` with an errno: the request it answers failed.
    Error(io::Error),
}

/// One message of a datagram.
#[derive(Debug)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// Where the payload is in the datagram (for readers that keep the buffer).
    pub payload: Range<usize>,
    pub body: Body<'a>,
}

/// The messages of one datagram, in order. A message that does not fit the
/// datagram ends the iteration with one `Err`; tolerant readers stop there,
/// strict ones fail.
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Messages<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let at = self.pos;
        let Ok(nl) = NetlinkBuffer::new_checked(&self.buf[at..]) else {
            self.pos = self.buf.len();
            return Some(Err(FrameError {
                offset: at,
                what: "message shorter than its header or longer than the datagram",
            }));
        };
        let len = nl.length() as usize;
        self.pos = (at + align4(len)).min(self.buf.len());
        let payload = nl.payload();
        let body = match nl.message_type() {
            NLMSG_DONE => Body::Done,
            NLMSG_ERROR => match ErrorBuffer::new_checked(payload) {
                Ok(e) => match e.code() {
                    None => Body::Ack,
                    // The kernel sends -errno; anything else (i32::MIN too) must not overflow.
                    Some(code) => {
                        Body::Error(io::Error::from_raw_os_error(code.get().saturating_neg()))
                    }
                },
                Err(_) => {
                    self.pos = self.buf.len();
                    return Some(Err(FrameError {
                        offset: at,
                        what: "NLMSG_ERROR without an error code",
                    }));
                }
            },
            _ => Body::Data(payload),
        };
        Some(Ok(Message {
            ty: nl.message_type(),
            flags: nl.flags(),
            seq: nl.sequence_number(),
            payload: at + NLMSG_HDRLEN..at + len,
            body,
        }))
    }
}

/// Netlink messages and attributes are 4-byte aligned.
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends an `nlmsghdr` for a message of `len` bytes in all (header included);
/// the caller appends the payload.
pub fn put_header(out: &mut Vec<u8>, len: usize, ty: u16, flags: u16, seq: u32) {
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid: the kernel is the peer.
    out.extend_from_slice(&0u32.to_ne_bytes());
}

/// A blocking netlink socket of `protocol` (`libc::NETLINK_*`) in the calling
/// thread's network namespace (it stays there), close-on-exec.
pub fn open(protocol: libc::c_int) -> io::Result<Socket> {
    Socket::new(protocol as isize)
}

/// A non-blocking socket subscribed to multicast `groups` (`nl_groups` bits)
/// and to the group numbers in `memberships`, with a receive buffer of
/// `rcvbuf` bytes (forced past `rmem_max` when root; best effort).
pub fn subscribe(
    protocol: libc::c_int,
    groups: u32,
    memberships: &[u32],
    rcvbuf: usize,
) -> io::Result<Socket> {
    let mut sock = open(protocol)?;
    sock.set_non_blocking(true)?;
    set_receive_buffer(&sock, rcvbuf);
    // Multicast is delivered to bound sockets only; the kernel picks the port id.
    sock.bind(&SocketAddr::new(0, groups))?;
    for &group in memberships {
        sock.add_membership(group)?;
    }
    Ok(sock)
}

/// `SO_RCVBUFFORCE` (root), else `SO_RCVBUF`; best effort.
pub fn set_receive_buffer(sock: &Socket, bytes: usize) {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: an int-sized option on our socket.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Receives one datagram into `buf` (cleared first; its capacity is the most
/// read), retrying on `EINTR`. `Ok(false)` when a non-blocking socket has none.
pub fn recv(sock: &Socket, buf: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        buf.clear();
        match sock.recv(buf, 0) {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Sends one datagram to the kernel.
pub fn send(sock: &Socket, bytes: &[u8]) -> io::Result<()> {
    sock.send(bytes, 0).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        put_header(&mut b, NLMSG_HDRLEN + payload.len(), ty, 0, seq);
        b.extend_from_slice(payload);
        b.resize(align4(b.len()), 0);
        b
    }

    #[test]
    fn data_ack_error_done_and_a_truncated_tail() {
        let mut d = message(0x10a, 1, &[1, 2, 3]);
        d.extend(message(NLMSG_ERROR, 2, &[0; 20]));
        d.extend(message(NLMSG_ERROR, 3, &(-libc::ENOENT).to_ne_bytes()));
        d.extend(message(NLMSG_DONE, 4, &0i32.to_ne_bytes()));
        d.extend_from_slice(&[40, 0, 0, 0]);
        let got: Vec<_> = Messages::new(&d).collect();
        assert_eq!(got.len(), 5, "{got:?}");
        let m = got[0].as_ref().unwrap();
        assert!(matches!(m.body, Body::Data([1, 2, 3])));
        assert_eq!(
            (m.ty, m.seq, &d[m.payload.clone()]),
            (0x10a, 1, &[1, 2, 3][..])
        );
        assert!(matches!(got[1].as_ref().unwrap().body, Body::Ack));
        assert!(matches!(&got[2].as_ref().unwrap().body,
            Body::Error(e) if e.raw_os_error() == Some(libc::ENOENT)));
        assert!(matches!(got[3].as_ref().unwrap().body, Body::Done));
        assert!(got[4].is_err());
    }

    /// Found by `cargo xtask fuzz` (kept in fuzz/seeds/crash-neg-overflow).
    #[test]
    fn an_error_code_of_i32_min_is_an_error_not_an_overflow() {
        let d = message(NLMSG_ERROR, 1, &i32::MIN.to_ne_bytes());
        let got: Vec<_> = Messages::new(&d).collect();
        assert!(matches!(&got[0].as_ref().unwrap().body,
            Body::Error(e) if e.raw_os_error() == Some(i32::MAX)));
    }

    #[test]
    fn every_truncation_ends_in_one_error_never_a_panic() {
        let mut d = message(0x10a, 1, &[1, 2, 3, 4, 5]);
        d.extend(message(NLMSG_ERROR, 2, &[0; 4]));
        for cut in 0..d.len() {
            let items: Vec<_> = Messages::new(&d[..cut]).collect();
            assert!(items.iter().filter(|i| i.is_err()).count() <= 1);
        }
    }

    #[test]
    fn the_address_dump_of_this_namespace_ends_with_done() {
        // A real socket: RTM_GETADDR dump, answered by messages then NLMSG_DONE.
        let sock = open(libc::NETLINK_ROUTE).unwrap();
        let mut req = Vec::new();
        let len = NLMSG_HDRLEN + 8;
        put_header(
            &mut req,
            len,
            super::super::uapi::RTM_GETADDR,
            super::super::uapi::NLM_F_REQUEST | super::super::uapi::NLM_F_DUMP,
            7,
        );
        req.extend_from_slice(&[0; 8]);
        send(&sock, &req).unwrap();
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut done = false;
        while !done {
            assert!(recv(&sock, &mut buf).unwrap());
            for m in Messages::new(&buf) {
                done |= matches!(m.unwrap().body, Body::Done);
            }
        }
    }
}
