//! Network namespaces: the cookie that tells the host namespace from the others.

use std::{io, net::UdpSocket, os::fd::AsRawFd as _};

/// `SO_NETNS_COOKIE` (Linux 5.14); not in every libc release yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace the calling thread is in; the same value
/// `bpf_get_netns_cookie()` gives the kernel programs.
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = UdpSocket::bind("127.0.0.1:0").or_else(|_| UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cookie_is_stable_and_nonzero() {
        let a = super::current_netns_cookie().unwrap();
        let b = super::current_netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, b);
    }
}
