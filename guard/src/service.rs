//! Talking to systemd: `sd_notify` (READY, WATCHDOG, RELOADING, STOPPING) and
//! the watchdog interval. Without `$NOTIFY_SOCKET` (not under systemd) every
//! call is a no-op.

use std::{
    io,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    time::Duration,
};

/// Where to send notifications, from `$NOTIFY_SOCKET`.
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<(UnixDatagram, PathBuf)>,
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> io::Result<Self> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) if !path.is_empty() => Self::new(Path::new(&path)),
            _ => Ok(Self::default()),
        }
    }

    /// To a given socket path (`@name` is an abstract socket).
    pub fn new(path: &Path) -> io::Result<Self> {
        Ok(Self {
            socket: Some((UnixDatagram::unbound()?, path.to_path_buf())),
        })
    }

    pub fn is_active(&self) -> bool {
        self.socket.is_some()
    }

    fn send(&self, state: &str) -> io::Result<()> {
        let Some((socket, path)) = &self.socket else {
            return Ok(());
        };
        let bytes = path.as_os_str().as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            socket.send_to(state.as_bytes(), path)?;
        }
        Ok(())
    }

    /// Programs attached and first inspection done.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ))
    }

    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }

    pub fn reloading(&self) -> io::Result<()> {
        self.send("RELOADING=1")
    }

    /// After a reload: ready again.
    pub fn reloaded(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={status}"))
    }

    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1")
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={status}"))
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC` when it is meant
/// for this process (`$WATCHDOG_PID` absent or ours), else never.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Whether systemd is the init system (PID 1): the same test as `sd_booted()`.
pub fn systemd_is_init() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(&path).unwrap();
        assert!(n.is_active());
        n.ready("guarding 2 ports").unwrap();
        n.watchdog().unwrap();
        n.stopping().unwrap();
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        for _ in 0..3 {
            let len = systemd.recv(&mut buf).unwrap();
            got.push(String::from_utf8(buf[..len].to_vec()).unwrap());
        }
        assert!(
            got[0].starts_with("READY=1\nSTATUS=guarding 2 ports\nMAINPID="),
            "{}",
            got[0]
        );
        assert_eq!(got[1], "WATCHDOG=1");
        assert_eq!(got[2], "STOPPING=1");
    }

    #[test]
    fn abstract_sockets_work_too() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("portguard-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(Path::new(&format!("@{name}")))
            .unwrap()
            .watchdog()
            .unwrap();
        let mut buf = [0u8; 64];
        let len = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn without_systemd_nothing_happens() {
        let n = Notifier::default();
        assert!(!n.is_active());
        n.ready("x").unwrap();
    }
}
