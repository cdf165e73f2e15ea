//! Network namespaces: running code inside a named one ([`run_in`],
//! [`in_netns`]) and the cookie that tells the host namespace from the others.

use std::{io, net::UdpSocket, os::fd::AsRawFd as _};

/// Runs `f` in the network namespace `netns` (`/run/netns/NAME`, or a path),
/// or right here on the calling thread when `None`. Sockets `f` opens stay in
/// that namespace. The one way portguard runs code "here or in that namespace".
pub fn run_in<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    match netns {
        None => Ok(f()),
        Some(name) => in_netns(name, f),
    }
}

/// Runs `f` on a thread inside the network namespace `/run/netns/NAME` (or a
/// path): sockets opened there stay in that namespace.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let path = if name.starts_with('/') {
        name.into()
    } else {
        format!("/run/netns/{name}")
    };
    let file = std::fs::File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {path}: {e}")))?;
    let handle = std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace fd we hold.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// The cookie of the network namespace the calling thread is in; the same value
/// `bpf_get_netns_cookie()` gives the kernel programs (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = UdpSocket::bind("127.0.0.1:0").or_else(|_| UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
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

    #[test]
    fn run_in_none_runs_here_and_a_missing_namespace_is_an_error() {
        let here = super::current_netns_cookie().unwrap();
        let got = super::run_in(None, super::current_netns_cookie).unwrap();
        assert_eq!(got.unwrap(), here);
        let err = super::run_in(Some("portguard-no-such-netns"), || ()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
