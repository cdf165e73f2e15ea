//! Network namespaces made for one test and deleted on drop.

use std::{
    io::Write as _,
    net::TcpListener,
    os::fd::AsRawFd as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{run, unique_name};

/// A named network namespace (`ip netns add`), loopback up; deleted on drop,
/// which also removes its nftables tables, veths and conntrack entries.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.exec(["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace.
    pub fn command<I, S>(&self, argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs a command inside the namespace; panics when it fails.
    pub fn exec<I, S>(&self, argv: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run(&mut self.command(argv))
    }

    /// Loads an nftables ruleset (`nft -f -`) inside the namespace.
    pub fn nft_load(&self, ruleset: &str) {
        self.feed(&["nft", "-f", "-"], ruleset);
    }

    /// Loads iptables-nft tables (`iptables-nft-restore`, with `--noflush`
    /// or without: without, each table in `input` is deleted and created
    /// again, handles starting over).
    pub fn iptables_restore(&self, input: &str, noflush: bool) {
        let argv: &[&str] = if noflush {
            &["iptables-nft-restore", "--noflush"]
        } else {
            &["iptables-nft-restore"]
        };
        self.feed(argv, input);
    }

    /// Runs `argv` in the namespace with `input` on its stdin; panics (with
    /// its stderr and the input) unless it succeeds.
    fn feed(&self, argv: &[&str], input: &str) {
        use std::io::Write as _;
        let mut child = self
            .command(argv)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{} failed: {}\n--- input ---\n{input}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Connects `other` to this namespace with a veth pair and addresses them
    /// (`local_cidr` here, `peer_cidr` there), e.g. "198.51.100.1/24".
    pub fn link(&self, other: &NetNs, local_cidr: &str, peer_cidr: &str) {
        let a = format!("v{}", &short_hash(&self.name, &other.name));
        let b = format!("{a}p");
        run(Command::new("ip").args([
            "link",
            "add",
            &a,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ]));
        self.exec(["ip", "addr", "add", local_cidr, "dev", &a]);
        self.exec(["ip", "link", "set", &a, "up"]);
        other.exec(["ip", "addr", "add", peer_cidr, "dev", &b]);
        other.exec(["ip", "link", "set", &b, "up"]);
    }
}

fn short_hash(a: &str, b: &str) -> String {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let mut h = DefaultHasher::new();
    (a, b).hash(&mut h);
    format!("{:010x}", h.finish() & 0xff_ffff_ffff)
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Processes still inside keep it alive only as long as they run; the name goes now.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|out| {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a thread inside the named network namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace fd we hold.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

/// A TCP server in a namespace (dual stack: `[::]`) that writes its answer to
/// every connection; stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &NetNs, port: u16, answer: &'static str) -> Self {
        let listener = in_ns(ns.name(), move || {
            TcpListener::bind(("::", port)).unwrap_or_else(|e| panic!("bind [::]:{port}: {e}"))
        });
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(answer.as_bytes());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
