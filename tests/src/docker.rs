//! A real dockerd for the tests: a tiny image built from busybox-static, and
//! containers and networks that are removed on drop, also when a test panics.
//!
//! Everything a test creates is named `pgtest-<pid>-<n>…`; nothing else is
//! touched. The docker CLI is the oracle here, independent of portguard's own
//! Engine API client. Every helper talks to one [`Daemon`]: the shared one
//! (`Image::busybox()`, `Network::create()`) or a daemon of the test's own,
//! such as [`crate::dockerd_ns::NsDockerd`] runs in a network namespace
//! (`Image::busybox_on(&daemon)`; containers follow their image's daemon).

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

/// The port busybox httpd listens on inside the containers these helpers run.
pub const HTTPD_PORT: u16 = 8080;

/// Panics unless a dockerd answers: these tests need the real thing.
pub fn require_docker() {
    Daemon::host().require();
}

/// Which dockerd the docker CLI talks to: the shared one the tests run against
/// (the CLI's default, [`SOCKET`]), or a daemon on its own socket such as
/// [`crate::dockerd_ns::NsDockerd`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    /// `-H` for the CLI; `None` leaves the CLI's default.
    host: Option<String>,
}

impl Daemon {
    /// The shared daemon (`cargo xtask test` starts one when none runs).
    pub fn host() -> Self {
        Self { host: None }
    }

    /// A daemon listening on the unix socket `socket`.
    pub fn at(socket: &Path) -> Self {
        Self {
            host: Some(format!("unix://{}", socket.display())),
        }
    }

    /// The `-H` value for the CLI (`None`: the CLI's default).
    pub fn host_arg(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// `docker [-H …]`, ready for arguments.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("docker");
        if let Some(h) = &self.host {
            cmd.args(["-H", h]);
        }
        cmd
    }

    /// Runs the docker CLI against this daemon; panics with its output when it fails.
    pub fn docker(&self, args: &[&str]) -> String {
        run(self.command().args(args)).trim().to_owned()
    }

    /// Runs the docker CLI; `None` when it fails (for clean-ups and probes).
    pub fn try_docker(&self, args: &[&str]) -> Option<String> {
        let out = self.command().args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// True when the daemon answers now.
    pub fn answers(&self) -> bool {
        self.try_docker(&["version", "--format", "{{.Server.Version}}"])
            .is_some()
    }

    /// Panics unless the daemon answers.
    pub fn require(&self) {
        let out = self
            .command()
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .expect("the docker CLI (package docker.io)");
        assert!(
            out.status.success(),
            "no dockerd answers on {}: start one (`cargo xtask test` does): {}",
            self.host.as_deref().unwrap_or(SOCKET),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An image holding only `/bin/busybox` (static) and a few applet links.
#[derive(Debug)]
pub struct Image {
    tag: String,
    daemon: Daemon,
}

impl Image {
    /// Imported into the shared daemon.
    pub fn busybox() -> Self {
        Self::busybox_on(&Daemon::host())
    }

    /// Imported into `daemon` from a tarball (no registry is reachable here).
    pub fn busybox_on(daemon: &Daemon) -> Self {
        daemon.require();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("busybox-static is installed");
        let name = unique_name("pgtest");
        let rootfs = std::env::temp_dir().join(format!("{name}-rootfs"));
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "httpd", "sleep", "mkdir", "cat", "wget"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let tag = format!("{name}-busybox:1");
        let mut import = daemon.command();
        import.args(["import", "-", &tag]);
        let imported = Command::new("sh")
            .args(["-c", r#"d="$1"; shift; tar -C "$d" -c . | "$@""#, "sh"])
            .arg(&rootfs)
            .arg(import.get_program())
            .args(import.get_args())
            .output()
            .unwrap();
        let _ = fs::remove_dir_all(&rootfs);
        assert!(
            imported.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&imported.stderr)
        );
        Self {
            tag,
            daemon: daemon.clone(),
        }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The daemon that holds it (and runs containers made from it).
    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self
            .daemon
            .try_docker(&["image", "rm", "--force", &self.tag]);
    }
}

/// A container this test made; `docker rm --force` on drop.
#[derive(Debug)]
pub struct Container {
    name: String,
    id: String,
    daemon: Daemon,
    /// `docker run` arguments after `--name NAME`, for [`Container::recreate`].
    run_args: Vec<String>,
}

impl Container {
    /// `docker run -d --name pgtest-… OPTIONS IMAGE CMD…`, on the image's daemon.
    pub fn run(image: &Image, options: &[&str], cmd: &[&str]) -> Self {
        let name = unique_name("pgtest");
        let mut run_args: Vec<String> = options.iter().map(|s| s.to_string()).collect();
        run_args.push(image.tag().to_owned());
        run_args.extend(cmd.iter().map(|s| s.to_string()));
        Self::start_new(image.daemon().clone(), name, run_args)
    }

    fn start_new(daemon: Daemon, name: String, run_args: Vec<String>) -> Self {
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend(run_args.iter().map(String::as_str));
        let id = daemon.docker(&args);
        Self {
            name,
            id,
            daemon,
            run_args,
        }
    }

    /// busybox httpd on 8080, published as `publish` (e.g. `127.0.0.1:18080:8080`).
    pub fn httpd(image: &Image, publish: &str, options: &[&str]) -> Self {
        let mut opts = vec!["-p", publish];
        opts.extend_from_slice(options);
        Self::run(image, &opts, &["/bin/busybox", "httpd", "-f", "-p", "8080"])
    }

    /// busybox httpd on `port` inside the container, serving `/` with a page
    /// that contains `marker`; `options` publish it (`-p 80:8080`), put it on
    /// `--network host`, and so on. `--init` makes it stop at once on SIGTERM
    /// (busybox as PID 1 ignores SIGTERM), so daemon restarts stay fast.
    pub fn serving(image: &Image, marker: &str, port: u16, options: &[&str]) -> Self {
        let mut opts = vec!["--init"];
        opts.extend_from_slice(options);
        let script = format!(
            "/bin/busybox mkdir -p /www && echo '<p>{marker}</p>' > /www/index.html && exec /bin/busybox httpd -f -p {port} -h /www"
        );
        Self::run(image, &opts, &["/bin/sh", "-c", &script])
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

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    pub fn inspect(&self) -> Value {
        let out = self.daemon.docker(&["inspect", &self.id]);
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

    /// The IPv4 address on its only network; panics unless there is exactly one.
    pub fn address(&self) -> String {
        let v = self.inspect();
        let nets = v["NetworkSettings"]["Networks"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            nets.len(),
            1,
            "{} is on {} networks, name one: {:?}",
            self.name,
            nets.len(),
            nets.keys().collect::<Vec<_>>()
        );
        nets.values().next().unwrap()["IPAddress"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Stops at once (SIGKILL): busybox as PID 1 ignores SIGTERM.
    pub fn stop(&self) {
        self.daemon.docker(&["stop", "--time", "0", &self.id]);
    }

    pub fn start(&self) {
        self.daemon.docker(&["start", &self.id]);
    }

    pub fn restart(&self) {
        self.daemon.docker(&["restart", "--time", "0", &self.id]);
    }

    /// Removes it now (drop does nothing more).
    pub fn remove(self) {
        self.daemon.docker(&["rm", "--force", &self.id]);
    }

    /// Removes it and runs a new container with the same name and the same
    /// `docker run` arguments: a new id and a new cgroup. Docker's IPAM hands
    /// out the lowest free address, so it gets its old address back unless
    /// something took it meanwhile (see [`Container::recreate_with`]).
    pub fn recreate(self) -> Self {
        self.recreate_with(|| {})
    }

    /// Like [`Container::recreate`], running `between` after the removal and
    /// before the new `docker run` (e.g. a sleeper that takes the freed address).
    pub fn recreate_with(mut self, between: impl FnOnce()) -> Self {
        self.daemon.docker(&["rm", "--force", &self.id]);
        // An empty id tells drop that nothing is left to remove.
        self.id.clear();
        between();
        Self::start_new(
            self.daemon.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.run_args),
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        let _ = self.daemon.try_docker(&["rm", "--force", &self.id]);
    }
}

/// A user-defined bridge network; addresses come from the daemon's own pool
/// unless a subnet is given.
#[derive(Debug)]
pub struct Network {
    name: String,
    daemon: Daemon,
}

impl Network {
    /// On the shared daemon, with Docker's defaults.
    pub fn create() -> Self {
        Self::create_on(&Daemon::host(), &[])
    }

    /// `docker network create OPTIONS pgtest-…-net` on `daemon`.
    pub fn create_on(daemon: &Daemon, options: &[&str]) -> Self {
        let name = unique_name("pgtest") + "-net";
        let mut args = vec!["network", "create"];
        args.extend_from_slice(options);
        args.push(&name);
        daemon.docker(&args);
        Self {
            name,
            daemon: daemon.clone(),
        }
    }

    /// A bridge network whose Linux bridge is named `bridge` (at most 15
    /// bytes), as `-o com.docker.network.bridge.name=…` sets it.
    pub fn with_bridge(daemon: &Daemon, bridge: &str, options: &[&str]) -> Self {
        assert!(
            bridge.len() <= 15,
            "interface names have at most 15 bytes: {bridge}"
        );
        let opt = format!("com.docker.network.bridge.name={bridge}");
        let mut all = vec!["-o", &opt];
        all.extend_from_slice(options);
        Self::create_on(daemon, &all)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn connect(&self, c: &Container) {
        self.daemon
            .docker(&["network", "connect", &self.name, c.id()]);
    }

    pub fn disconnect(&self, c: &Container) {
        self.daemon
            .docker(&["network", "disconnect", &self.name, c.id()]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = self.daemon.try_docker(&["network", "rm", &self.name]);
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
