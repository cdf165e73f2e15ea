//! A real dockerd for the tests: a tiny image built from busybox-static, and
//! containers and networks that are removed on drop, also when a test panics.
//!
//! Everything a test creates is named `pgtest-<pid>-<n>…`; nothing else is
//! touched. The docker CLI is the oracle here, independent of portguard's own
//! Engine API client.

use std::{
    fs,
    io::{self, ErrorKind},
    net::Shutdown,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use serde_json::Value;

use crate::{run, unique_name};

/// dockerd's socket, as the daemon started for the tests listens on it.
pub const SOCKET: &str = "/var/run/docker.sock";

/// Panics unless a dockerd answers: these tests need the real thing.
pub fn require_docker() {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .expect("the docker CLI (package docker.io)");
    assert!(
        out.status.success(),
        "no dockerd answers on {SOCKET}: start one (`cargo xtask test` does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args)).trim().to_owned()
}

/// An image holding only `/bin/busybox` (static) and a few applet links.
#[derive(Debug)]
pub struct Image {
    tag: String,
}

impl Image {
    pub fn busybox() -> Self {
        require_docker();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("busybox-static is installed");
        let name = unique_name("pgtest");
        let rootfs = std::env::temp_dir().join(format!("{name}-rootfs"));
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "httpd", "sleep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let tag = format!("{name}-busybox:1");
        let imported = Command::new("sh")
            .args(["-c", r#"tar -C "$1" -c . | docker import - "$2""#, "sh"])
            .arg(&rootfs)
            .arg(&tag)
            .output()
            .unwrap();
        let _ = fs::remove_dir_all(&rootfs);
        assert!(
            imported.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&imported.stderr)
        );
        Self { tag }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["image", "rm", "--force", &self.tag])
            .output();
    }
}

/// A container this test made; `docker rm --force` on drop.
#[derive(Debug)]
pub struct Container {
    name: String,
    id: String,
}

impl Container {
    /// `docker run -d --name pgtest-… OPTIONS IMAGE CMD…`.
    pub fn run(image: &Image, options: &[&str], cmd: &[&str]) -> Self {
        let name = unique_name("pgtest");
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend_from_slice(options);
        args.push(image.tag());
        args.extend_from_slice(cmd);
        let id = docker(&args);
        Self { name, id }
    }

    /// busybox httpd on 8080, published as `publish` (e.g. `127.0.0.1:18080:8080`).
    pub fn httpd(image: &Image, publish: &str, options: &[&str]) -> Self {
        let mut opts = vec!["-p", publish];
        opts.extend_from_slice(options);
        Self::run(image, &opts, &["/bin/busybox", "httpd", "-f", "-p", "8080"])
    }

    /// A container that only sleeps (holds an address, publishes nothing).
    pub fn sleeper(image: &Image) -> Self {
        Self::run(image, &[], &["/bin/busybox", "sleep", "3600"])
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn inspect(&self) -> Value {
        let out = docker(&["inspect", &self.id]);
        let mut v: Value = serde_json::from_str(&out).unwrap();
        v[0].take()
    }

    /// The init process's pid on the host (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.inspect()["State"]["Pid"].as_u64().unwrap() as u32
    }

    /// The IPv4 address on `network` ("" when not connected or stopped).
    pub fn ip(&self, network: &str) -> String {
        self.inspect()["NetworkSettings"]["Networks"][network]["IPAddress"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Stops at once (SIGKILL): busybox as PID 1 ignores SIGTERM.
    pub fn stop(&self) {
        docker(&["stop", "--time", "0", &self.id]);
    }

    pub fn start(&self) {
        docker(&["start", &self.id]);
    }

    pub fn restart(&self) {
        docker(&["restart", "--time", "0", &self.id]);
    }

    /// Removes it now (drop does nothing more).
    pub fn remove(self) {
        docker(&["rm", "--force", &self.id]);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "--force", &self.id])
            .output();
    }
}

/// A user-defined bridge network; addresses come from Docker's own pool.
#[derive(Debug)]
pub struct Network {
    name: String,
}

impl Network {
    pub fn create() -> Self {
        let name = unique_name("pgtest") + "-net";
        docker(&["network", "create", &name]);
        Self { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn connect(&self, c: &Container) {
        docker(&["network", "connect", &self.name, c.id()]);
    }

    pub fn disconnect(&self, c: &Container) {
        docker(&["network", "disconnect", &self.name, c.id()]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.name])
            .output();
    }
}

/// A second path to dockerd that a test can open and close: dockerd "comes
/// and goes" for a client of this socket, while the shared daemon keeps running.
pub struct SocketForward {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl SocketForward {
    /// A socket path in the temp dir, not yet listening.
    pub fn path_for_test() -> PathBuf {
        std::env::temp_dir().join(unique_name("pgtest") + ".sock")
    }

    /// Listens on `path` and forwards every connection to dockerd.
    pub fn start(path: &Path) -> Self {
        let _ = fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, conns) = (stop.clone(), conns.clone());
            thread::spawn(move || accept(listener, &stop, &conns))
        };
        Self {
            path: path.into(),
            stop,
            conns,
            acceptor: Some(acceptor),
        }
    }

    /// Stops listening, cuts every open connection and removes the socket.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        let _ = fs::remove_file(&self.path);
    }
}

impl Drop for SocketForward {
    fn drop(&mut self) {
        self.shut();
    }
}

fn accept(listener: UnixListener, stop: &AtomicBool, conns: &Mutex<Vec<UnixStream>>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let Ok(upstream) = UnixStream::connect(SOCKET) else {
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let mut all = conns.lock().unwrap();
                all.push(client.try_clone().unwrap());
                all.push(upstream.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pipe(upstream, client);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn pipe(mut from: UnixStream, mut to: UnixStream) {
    thread::spawn(move || {
        let _: io::Result<u64> = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}
