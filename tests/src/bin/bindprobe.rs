//! `bindprobe`: binds one socket the way a test asks and says what happened, as JSON.
//!
//! bindprobe --addr 127.0.0.1 --port 8080 [--proto tcp|udp] [--comm NAME]
//!           [--netns /run/netns/NAME] [--v6only 0|1] [--hold]
//!           [--uid UID] [--repeat N]
//!
//! Prints {"pid":…, "ok":true} or {"pid":…, "ok":false, "errno":…}; with --hold it
//! keeps the socket (listening, for tcp) until stdin closes. `--uid` drops to
//! that user (and group) before binding; `--repeat N` binds N fresh sockets one
//! after the other and prints {"pid":…, "bound":…, "denied":… (EPERM, the
//! guard), "refused":… (EACCES, the kernel)}.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
};

use socket2::{Domain, Socket, Type};

fn main() {
    let mut addr: IpAddr = "127.0.0.1".parse().unwrap();
    let mut port: u16 = 0;
    let mut udp = false;
    let mut comm: Option<String> = None;
    let mut netns: Option<String> = None;
    let mut v6only: Option<bool> = None;
    let mut hold = false;
    let mut uid: Option<u32> = None;
    let mut repeat: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| die(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--addr" => addr = val().parse().unwrap_or_else(|_| die("bad --addr")),
            "--port" => port = val().parse().unwrap_or_else(|_| die("bad --port")),
            "--proto" => udp = val() == "udp",
            "--comm" => comm = Some(val()),
            "--netns" => netns = Some(val()),
            "--v6only" => v6only = Some(val() == "1"),
            "--hold" => hold = true,
            "--uid" => uid = Some(val().parse().unwrap_or_else(|_| die("bad --uid"))),
            "--repeat" => repeat = Some(val().parse().unwrap_or_else(|_| die("bad --repeat"))),
            _ => die(&format!("unknown argument {a}")),
        }
    }
    if let Some(path) = netns {
        let f = std::fs::File::open(&path).unwrap_or_else(|e| die(&format!("{path}: {e}")));
        // SAFETY: a valid namespace fd.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            die(&format!("setns: {}", std::io::Error::last_os_error()));
        }
    }
    if let Some(name) = comm {
        let c = CString::new(name).unwrap();
        // SAFETY: PR_SET_NAME copies at most 16 bytes from a NUL-terminated string.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
    }
    if let Some(uid) = uid {
        // SAFETY: plain syscalls; group first, while still allowed to.
        if unsafe { libc::setgid(uid) } != 0 || unsafe { libc::setuid(uid) } != 0 {
            die(&format!(
                "setuid {uid}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let sa = SocketAddr::new(addr, port);
    let ty = if udp { Type::DGRAM } else { Type::STREAM };
    if let Some(n) = repeat {
        // denied: the guard's EPERM; refused: the kernel's own EACCES (a
        // privileged port, for an unprivileged user the guard let through).
        let (mut bound, mut denied, mut refused) = (0u64, 0u64, 0u64);
        for _ in 0..n {
            let sock = Socket::new(Domain::for_address(sa), ty, None)
                .unwrap_or_else(|e| die(&format!("socket: {e}")));
            let _ = sock.set_reuse_address(true);
            match sock.bind(&sa.into()) {
                Ok(()) => bound += 1,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => denied += 1,
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => refused += 1,
                Err(e) => die(&format!("bind: {e}")),
            }
        }
        let pid = std::process::id();
        println!("{{\"pid\":{pid},\"bound\":{bound},\"denied\":{denied},\"refused\":{refused}}}");
        return;
    }
    let sock = Socket::new(Domain::for_address(sa), ty, None)
        .unwrap_or_else(|e| die(&format!("socket: {e}")));
    let _ = sock.set_reuse_address(true);
    if let Some(only) = v6only {
        sock.set_only_v6(only)
            .unwrap_or_else(|e| die(&format!("IPV6_V6ONLY: {e}")));
    }
    let pid = std::process::id();
    if let Err(e) = sock.bind(&sa.into()) {
        let errno = e.raw_os_error().unwrap_or(0);
        println!("{{\"pid\":{pid},\"ok\":false,\"errno\":{errno}}}");
        std::process::exit(1);
    }
    if !udp {
        let _ = sock.listen(16);
    }
    println!("{{\"pid\":{pid},\"ok\":true}}");
    if hold {
        let _ = std::io::stdout().flush();
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    }
}

fn die(msg: &str) -> ! {
    eprintln!("bindprobe: {msg}");
    std::process::exit(2)
}
