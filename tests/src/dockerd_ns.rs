//! The owner's real software in a box: a real dockerd (Debian's docker.io,
//! dockerd 20.10) running inside a test network namespace, with its own
//! socket, data root, exec root, containerd, bridge and cgroup, so that the
//! host's ruleset, interfaces and the host's own dockerd are never touched.
//!
//! [`NsDockerd::start`] builds:
//!
//! - a network namespace `pgdk-…` (loopback up) where dockerd, its containerd,
//!   docker-proxy and every container network live; its uplink `pgup0` holds
//!   the host's "public" addresses [`HOST_V4`]/24 and [`HOST_V6`]/64;
//! - a client namespace `pgcl-…` at the other end of that veth (`pgcl0`,
//!   [`CLIENT_V4`], [`CLIENT_V6`]): traffic from there arrives the way a
//!   visitor's does (PREROUTING), traffic from inside the dockerd namespace
//!   takes the OUTPUT path (loopback, the host address);
//! - a cgroup v2 directory that dockerd is spawned into, also given to dockerd
//!   as `--cgroup-parent`;
//! - a temp dir holding `--data-root`, `--exec-root`, `--pidfile`, the socket
//!   (`-H unix://…/docker.sock`), `--config-file` (its only key moves the
//!   trust key out of `/etc/docker`) and dockerd's log.
//!
//! dockerd is started with `nsenter --net=/run/netns/NAME`, not `ip netns
//! exec` (which remounts `/sys` and so hides the cgroup v2 mount). It runs in
//! the host's mount namespace, so its mounts (the data root bind-mounts
//! itself, overlay2 `merged` dirs, `exec-root/netns/*` nsfs bind mounts) are
//! host mounts under the temp dir; drop unmounts whatever is left there.
//!
//! # Living next to the host's dockerd
//!
//! dockerd 20.10 starts its own managed containerd with everything below the
//! exec root (`exec/containerd/containerd.sock`, its state `exec/containerd/daemon`,
//! runc's `exec/runtime-runc`) and its content below the data root, so it never
//! meets the host daemon's `/var/run/docker`, `/var/lib/docker` or
//! `/var/run/docker.pid`. What the two do share: `/run/containerd/s/<hash>`
//! (shim sockets, named by a hash of containerd's address, so they cannot
//! collide, and removed when the shims exit), `/run/docker/plugins` (plugin
//! discovery, created empty), and `/run/xtables.lock` (a lock).
//!
//! # What dockerd 20.10 does here (observed on this machine, Debian 12,
//! iptables 1.8.9 nf_tables backend, runc 1.1.5, containerd 1.6.20)
//!
//! - Start to first API answer: 0.5–0.8 s fresh, 1.3–2.2 s on existing dirs
//!   (a restart); `--restart always` containers answer within milliseconds
//!   of the API. A SIGTERM stop takes about 1.5 s when the running containers
//!   stop on SIGTERM (the helpers here use `--init`), 12–16 s otherwise: a
//!   busybox PID 1 ignores SIGTERM, so dockerd waits out the 10 s stop timeout.
//! - A SIGTERM'd dockerd stops its containers and containerd, and unmounts its
//!   own mounts; what drop finds left over comes from a kill or a crash.
//! - The default bridge's IPAM hands out the lowest free address: a container
//!   removed and re-created gets its old address back unless something took it.
//! - It writes its rules with iptables-nft: tables `ip nat` and `ip filter`
//!   with chains `DOCKER`, `DOCKER-USER`, `DOCKER-ISOLATION-STAGE-1/2`, base
//!   chains `PREROUTING`/`OUTPUT` (`fib daddr type local jump DOCKER`),
//!   `POSTROUTING` (masquerade) and `FORWARD` (policy drop).
//! - `--userland-proxy=true` (the default): docker-proxy processes, children
//!   of dockerd, bind each published port, for an unspecified host IP on both
//!   `0.0.0.0` and `[::]` (even without `--ipv6`). `nat DOCKER` starts with
//!   `iifname "docker0" return` and each DNAT carries `iifname != "docker0"`;
//!   `nat OUTPUT` skips `127.0.0.0/8` (loopback is served by docker-proxy).
//! - `--userland-proxy=false`: no docker-proxy; dockerd itself holds each
//!   published port (libnetwork's dummy proxy: a listening socket that never
//!   accepts, only to reserve the port), IPv4 only. The DNATs carry no
//!   `iifname`, `nat OUTPUT` has no loopback exception, and `POSTROUTING`
//!   gains `oifname "docker0" fib saddr type local masquerade` (hairpin and
//!   `route_localnet` for loopback).
//! - `ipv6: true` (`--ipv6 --ip6tables`, experimental in 20.10): the same
//!   chains in `ip6 nat`/`ip6 filter`, a DNAT to the container's IPv6 address,
//!   and without the proxy dockerd also holds `[::]:PORT`.
//! - iptables-nft writes Docker's matches and targets as xtables-compat
//!   expressions (`match addrtype`, `match conntrack`, `target DNAT rev 2`,
//!   `target MASQUERADE`); nft prints them translated (`fib daddr type local`,
//!   `dnat to …`), except that a whole `nft list ruleset` (nft 1.0.6) fails to
//!   translate the ip6 targets once ip ones were printed ("XT target … not
//!   found" on stderr) and prints those rules with no statement at all.
//! - Cgroups: this host is hybrid (v1 controllers, v2 at
//!   `/sys/fs/cgroup/unified`), so dockerd uses cgroup v1 with the cgroupfs
//!   driver. runc 1.1 in hybrid mode also puts every container into the
//!   unified hierarchy: a container's `0::` line in `/proc/PID/cgroup` is
//!   `<test cgroup>/<container id>`. dockerd, containerd, the shims and
//!   docker-proxy stay in the test cgroup itself (dockerd was spawned there).
//!   runc also creates `<controller>/<test cgroup>/<id>` in every v1
//!   hierarchy; drop removes those directories too.

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use crate::{
    cgroup::{Cgroup, unified_root},
    docker::{Container, Daemon, HTTPD_PORT, Image},
    netns::{NetNs, in_ns},
    run, unique_name,
};

/// The host's "public" IPv4 address, on the uplink of the dockerd namespace.
pub const HOST_V4: &str = "198.51.100.1";
/// The client's address at the other end of the uplink.
pub const CLIENT_V4: &str = "198.51.100.2";
/// The host's "public" IPv6 address.
pub const HOST_V6: &str = "2001:db8::1";
/// The client's IPv6 address.
pub const CLIENT_V6: &str = "2001:db8::2";
/// The uplink's name inside the dockerd namespace.
pub const UPLINK: &str = "pgup0";
/// Its peer's name inside the client namespace.
pub const CLIENT_LINK: &str = "pgcl0";

/// How long dockerd may take to answer after a start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERM stop may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How the test's dockerd runs.
#[derive(Debug, Clone)]
pub struct DockerdOptions {
    /// true: docker-proxy binds published ports (Docker's default);
    /// false: `--userland-proxy=false`, dockerd itself holds them.
    pub userland_proxy: bool,
    /// `--bip`: the default bridge's address and prefix.
    pub bridge_cidr: String,
    /// `--default-address-pool base=…,size=24`: where user-defined networks
    /// get their subnets.
    pub address_pool: String,
    /// `--ipv6 --fixed-cidr-v6 <ipv6_cidr> --experimental --ip6tables`.
    pub ipv6: bool,
    /// The default bridge's IPv6 subnet when `ipv6` is on.
    pub ipv6_cidr: String,
    /// More dockerd arguments, appended as given.
    pub extra_args: Vec<String>,
}

impl Default for DockerdOptions {
    /// Docker's defaults, with addresses from the benchmarking range
    /// 198.18.0.0/15 (RFC 2544) so nothing is mistaken for a real network.
    fn default() -> Self {
        Self {
            userland_proxy: true,
            bridge_cidr: "198.18.0.1/24".into(),
            address_pool: "198.18.64.0/18".into(),
            ipv6: false,
            ipv6_cidr: "fd00:198:18::/64".into(),
            extra_args: Vec::new(),
        }
    }
}

impl DockerdOptions {
    /// Defaults with the userland proxy on or off.
    pub fn with_proxy(userland_proxy: bool) -> Self {
        Self {
            userland_proxy,
            ..Self::default()
        }
    }

    fn args(&self, dir: &Path, cgroup_parent: &str) -> Vec<String> {
        let p = |name: &str| dir.join(name).display().to_string();
        let mut args = vec![
            format!("--host=unix://{}", p("docker.sock")),
            format!("--data-root={}", p("data")),
            format!("--exec-root={}", p("exec")),
            format!("--pidfile={}", p("docker.pid")),
            format!("--config-file={}", p("daemon.json")),
            format!("--cgroup-parent={cgroup_parent}"),
            format!("--bip={}", self.bridge_cidr),
            format!("--default-address-pool=base={},size=24", self.address_pool),
            format!("--userland-proxy={}", self.userland_proxy),
        ];
        if self.ipv6 {
            args.extend([
                "--ipv6".into(),
                format!("--fixed-cidr-v6={}", self.ipv6_cidr),
                "--experimental".into(),
                "--ip6tables".into(),
            ]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// A dockerd of the test's own inside a network namespace; on drop its
/// containers are removed, dockerd is stopped (SIGTERM, then SIGKILL), every
/// process left in its cgroup is killed, its mounts are unmounted, and its
/// namespaces, cgroups and temp dir are deleted — also when a test panics.
pub struct NsDockerd {
    opts: DockerdOptions,
    dir: PathBuf,
    daemon: Daemon,
    child: Option<Child>,
    last_start: Duration,
    image: OnceLock<Image>,
    // Dropped by hand, in this order, in `Drop`.
    cgroup: Option<Cgroup>,
    netns: Option<NetNs>,
    client: Option<NetNs>,
}

impl std::fmt::Debug for NsDockerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsDockerd")
            .field("netns", &self.netns().name())
            .field("dir", &self.dir)
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("userland_proxy", &self.opts.userland_proxy)
            .finish()
    }
}

impl NsDockerd {
    /// Builds the namespaces, cgroup and dirs, starts dockerd and waits until it answers.
    pub fn start(opts: DockerdOptions) -> Self {
        crate::require_root();
        for tool in ["dockerd", "containerd", "runc", "nsenter", "docker-proxy"] {
            assert!(
                which(tool).is_some(),
                "{tool} is not installed (packages docker.io, util-linux): run `cargo xtask setup`"
            );
        }
        let netns = NetNs::new("pgdk");
        let client = NetNs::new("pgcl");
        run(Command::new("ip").args([
            "link",
            "add",
            UPLINK,
            "netns",
            netns.name(),
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_LINK,
            "netns",
            client.name(),
        ]));
        for (ns, dev, v4, v6) in [
            (&netns, UPLINK, HOST_V4, HOST_V6),
            (&client, CLIENT_LINK, CLIENT_V4, CLIENT_V6),
        ] {
            ns.exec(["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.exec([
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ns.exec(["ip", "link", "set", dev, "up"]);
        }
        let cgroup = Cgroup::new("pgdockerd");
        let dir = std::env::temp_dir().join(unique_name("pgdockerd"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        // The only setting without a flag in 20.10: keep key.json out of /etc/docker.
        fs::write(
            dir.join("daemon.json"),
            serde_json::json!({ "deprecated-key-path": dir.join("key.json") }).to_string(),
        )
        .unwrap();
        let mut this = Self {
            daemon: Daemon::at(&dir.join("docker.sock")),
            opts,
            dir,
            child: None,
            last_start: Duration::ZERO,
            image: OnceLock::new(),
            cgroup: Some(cgroup),
            netns: Some(netns),
            client: Some(client),
        };
        this.spawn();
        this
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns().name()))
            .arg("dockerd")
            .args(self.opts.args(&self.dir, &self.cgroup().relative()))
            // docker-proxy, runc, containerd and docker-init are found on PATH.
            .env("PATH", path_with_sbin())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let started = Instant::now();
        // nsenter joins the namespace and execs dockerd: the child's pid is dockerd's.
        self.child = Some(crate::cgroup::spawn_in(self.cgroup(), &mut cmd));
        loop {
            if self.daemon.answers() {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "dockerd exited ({status}) before answering; log {}:\n{}",
                    self.log_path().display(),
                    self.log_tail()
                );
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "dockerd did not answer within {START_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(100));
        }
        self.last_start = started.elapsed();
    }

    /// Stops dockerd with SIGTERM (SIGKILL after a minute) and waits for it to exit.
    fn stop(&mut self) -> Option<Duration> {
        let mut child = self.child.take()?;
        let started = Instant::now();
        // SAFETY: signalling our own child, by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        while started.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(started.elapsed());
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "warning: dockerd {} ignored SIGTERM for {STOP_TIMEOUT:?}: killing it",
            child.id()
        );
        let _ = child.kill();
        let _ = child.wait();
        Some(started.elapsed())
    }

    /// Stops dockerd (SIGTERM to its pid, waits for it to exit) and starts it
    /// again on the same dirs and socket; containers with `--restart always`
    /// come back. Returns (stop time, start time).
    pub fn restart(&mut self) -> (Duration, Duration) {
        let stopped = self.stop().expect("dockerd is running");
        self.spawn();
        (stopped, self.last_start)
    }

    /// How long the last start took until the API answered.
    pub fn start_time(&self) -> Duration {
        self.last_start
    }

    pub fn options(&self) -> &DockerdOptions {
        &self.opts
    }

    /// The daemon handle for the helpers in [`crate::docker`].
    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    /// dockerd's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// The namespace dockerd and its containers' networks live in.
    pub fn netns(&self) -> &NetNs {
        self.netns.as_ref().expect("alive")
    }

    /// The client namespace at the other end of the uplink.
    pub fn client(&self) -> &NetNs {
        self.client.as_ref().expect("alive")
    }

    /// The cgroup dockerd runs in; containers land below it.
    pub fn cgroup(&self) -> &Cgroup {
        self.cgroup.as_ref().expect("alive")
    }

    /// The temp dir holding data root, exec root, socket, pidfile and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// The last 40 lines of dockerd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Every container with its state and the tail of its output, for
    /// failure messages (a container that exited at once says why here).
    pub fn containers_report(&self) -> String {
        let Some(list) = self.daemon.try_docker(&[
            "ps",
            "--all",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Names}} {{.Status}}",
        ]) else {
            return "(docker ps failed)".into();
        };
        let mut out = String::new();
        for line in list.lines() {
            out.push_str(line);
            out.push('\n');
            let Some(id) = line.split(' ').next() else {
                continue;
            };
            let logs = self
                .daemon
                .command()
                .args(["logs", "--tail", "10", id])
                .output();
            if let Ok(logs) = logs {
                for l in String::from_utf8_lossy(&logs.stdout)
                    .lines()
                    .chain(String::from_utf8_lossy(&logs.stderr).lines())
                {
                    out.push_str("  | ");
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// dockerd's pid (the same as its pidfile says).
    pub fn dockerd_pid(&self) -> u32 {
        self.child.as_ref().expect("dockerd is running").id()
    }

    /// The environment an agent process needs to talk to this daemon.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(
            "DOCKER_HOST".into(),
            format!("unix://{}", self.socket().display()),
        )]
    }

    /// The docker CLI against this daemon; panics with its output when it fails.
    pub fn docker(&self, args: &[&str]) -> String {
        self.daemon.docker(args)
    }

    /// A command that runs inside the dockerd namespace (`nsenter --net`, so
    /// `/sys` and the cgroup v2 mount stay as they are), with [`Self::env`] set.
    pub fn command<I, S>(&self, argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns().name()))
            .args(argv)
            .envs(self.env());
        cmd
    }

    /// The busybox image in this daemon, imported on first use.
    pub fn image(&self) -> &Image {
        self.image.get_or_init(|| Image::busybox_on(&self.daemon))
    }

    /// A busybox httpd container serving a page with `marker` on 8080, published
    /// as `publish` (`[HOST_IP:]HOST_PORT:8080`), plus `options`.
    pub fn httpd(&self, marker: &str, publish: &str, options: &[&str]) -> Container {
        let mut opts = vec!["-p", publish];
        opts.extend_from_slice(options);
        Container::serving(self.image(), marker, HTTPD_PORT, &opts)
    }

    /// A `--network host` busybox httpd serving `marker` on `port` in the namespace.
    pub fn host_httpd(&self, marker: &str, port: u16, options: &[&str]) -> Container {
        let mut opts = vec!["--network", "host"];
        opts.extend_from_slice(options);
        Container::serving(self.image(), marker, port, &opts)
    }

    /// `nft list ruleset` inside the namespace.
    pub fn ruleset(&self) -> String {
        self.netns().exec(["nft", "list", "ruleset"])
    }

    /// Every listening TCP socket in the namespace, with its holders.
    pub fn listeners(&self) -> Vec<Listener> {
        Listener::parse(&self.netns().exec(["ss", "-ltnpH"]))
    }

    /// Names of the processes listening on TCP `port` (any address), deduplicated.
    pub fn port_holders(&self, port: u16) -> Vec<String> {
        let mut names: Vec<String> = self
            .listeners()
            .into_iter()
            .filter(|l| l.port == port)
            .flat_map(|l| l.processes.into_iter().map(|(name, _)| name))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Pids of every process in the test cgroup's subtree right now.
    pub fn cgroup_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        collect_pids(self.cgroup().path(), &mut pids);
        pids
    }

    /// What this instance put on the machine, to check after drop that it is gone.
    pub fn footprint(&self) -> Footprint {
        let mut pids = self.cgroup_pids();
        if let Some(c) = &self.child {
            pids.push(c.id());
        }
        Footprint {
            processes: pids
                .into_iter()
                .filter_map(|p| start_time(p).map(|t| (p, t)))
                .collect(),
            netns: vec![
                self.netns().name().to_owned(),
                self.client().name().to_owned(),
            ],
            cgroups: std::iter::once(self.cgroup().path().to_owned())
                .chain(v1_cgroup_dirs(&self.cgroup().relative()))
                .collect(),
            dir: self.dir.clone(),
        }
    }
}

impl Drop for NsDockerd {
    fn drop(&mut self) {
        if self.child.is_some() && self.daemon.answers() {
            if let Some(image) = self.image.take() {
                drop(image);
            }
            // Removing containers first makes the stop quick and lets the shims
            // clean up their sockets and mounts themselves.
            if let Some(ids) = self.daemon.try_docker(&["ps", "-aq"]) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "--force"];
                    args.extend(ids);
                    let _ = self.daemon.try_docker(&args);
                }
            }
        } else {
            // Its daemon is gone: do not let the image's drop ask it.
            std::mem::forget(self.image.take());
        }
        self.stop();
        let relative = self.cgroup.as_ref().map(Cgroup::relative);
        // Kills what is left (containerd, shims, containers) and removes the v2 dirs.
        drop(self.cgroup.take());
        unmount_below(&self.dir);
        if let Some(relative) = relative {
            for d in v1_cgroup_dirs(&relative) {
                remove_cgroup_tree(&d);
            }
        }
        drop(self.netns.take());
        drop(self.client.take());
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// One listening socket as `ss -ltnp` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The local address without the port (`0.0.0.0`, `[::]`, `127.0.0.1`).
    pub addr: String,
    pub port: u16,
    /// (process name, pid) of every holder.
    pub processes: Vec<(String, u32)>,
}

impl Listener {
    fn parse(ss: &str) -> Vec<Self> {
        ss.lines()
            .filter_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // State Recv-Q Send-Q Local Peer [Process]
                let local = cols.get(3)?;
                let (addr, port) = local.rsplit_once(':')?;
                let procs = cols.get(5..).map(|c| c.join(" ")).unwrap_or_default();
                Some(Self {
                    addr: addr.to_owned(),
                    port: port.parse().ok()?,
                    processes: parse_users(&procs),
                })
            })
            .collect()
    }
}

/// `users:(("dockerd",pid=8766,fd=26),("x",pid=1,fd=3))` → [("dockerd", 8766), …].
fn parse_users(s: &str) -> Vec<(String, u32)> {
    s.split("(\"")
        .skip(1)
        .filter_map(|part| {
            let (name, rest) = part.split_once('"')?;
            let pid = rest.split("pid=").nth(1)?.split([',', ')']).next()?;
            Some((name.to_owned(), pid.parse().ok()?))
        })
        .collect()
}

/// What an [`NsDockerd`] put on the machine (see [`NsDockerd::footprint`]).
#[derive(Debug, Clone)]
pub struct Footprint {
    /// (pid, start time in clock ticks): the same process, not a reused pid.
    pub processes: Vec<(u32, u64)>,
    pub netns: Vec<String>,
    pub cgroups: Vec<PathBuf>,
    pub dir: PathBuf,
}

impl Footprint {
    /// Whatever of it still exists, described; empty when all is gone.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for &(pid, start) in &self.processes {
            // Killed processes may stay zombies a moment, until their parent
            // (PID 1 for the daemonized shims) reaps them; they hold nothing.
            let deadline = Instant::now() + Duration::from_secs(5);
            while start_time(pid) == Some(start) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            if start_time(pid) == Some(start) {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default();
                let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                left.push(format!(
                    "process {pid} still runs: {cmdline:?} in {:?}",
                    cgroup
                        .lines()
                        .find(|l| l.starts_with("0::"))
                        .unwrap_or_default()
                ));
            }
        }
        for ns in &self.netns {
            if Path::new("/run/netns").join(ns).exists() {
                left.push(format!("netns {ns} still exists"));
            }
        }
        for cg in &self.cgroups {
            if cg.exists() {
                left.push(format!("cgroup {} still exists", cg.display()));
            }
        }
        for m in mounts_below(&self.dir) {
            left.push(format!("mount {} still exists", m.display()));
        }
        if self.dir.exists() {
            left.push(format!("dir {} still exists", self.dir.display()));
        }
        left
    }
}

/// An HTTP/1.0 GET from inside the network namespace `ns` (a thread that
/// joins it), with bounded timeouts (2 s to connect, 3 s to answer): the body
/// of a `200` answer, `None` for anything else.
pub fn fetch(ns: &str, url: &str) -> Option<String> {
    get(ns, url).ok()
}

/// Like [`fetch`], with the reason when there is no `200` answer.
pub fn get(ns: &str, url: &str) -> Result<String, String> {
    let (addr, host, path) = parse_url(url)?;
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) == Some("200") {
            Ok(body.to_owned())
        } else {
            Err(format!("{addr} answered {status:?}"))
        }
    })
}

/// Polls `url` from `ns` until the body contains `marker`; the time it took,
/// or the last failure after `timeout`.
pub fn await_page(
    ns: &str,
    url: &str,
    marker: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let last = match get(ns, url) {
            Ok(body) if body.contains(marker) => return Ok(started.elapsed()),
            Ok(body) => format!("answered without {marker:?}: {body:?}"),
            Err(e) => e,
        };
        if started.elapsed() > timeout {
            return Err(format!("{url} from {ns} after {timeout:?}: {last}"));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `http://HOST[:PORT]/PATH` with HOST an IPv4 address, `[IPv6]` or a name.
fn parse_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    Ok((addr, authority.to_owned(), path.to_owned()))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&path_with_sbin())
        .map(|d| d.join(tool))
        .find(|p| p.exists())
}

/// `$PATH` with the sbin dirs dockerd's helpers live in (docker-proxy, runc).
fn path_with_sbin() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(d.into());
        }
    }
    std::env::join_paths(dirs).unwrap()
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

/// A process's start time (field 22 of `/proc/PID/stat`), `None` when it is gone.
/// Zombies count as gone: they hold nothing but their pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 2..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The cgroup v1 hierarchies' copies of `relative` (runc makes one per controller).
fn v1_cgroup_dirs(relative: &str) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let unified = unified_root();
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = PathBuf::from(pre.split_whitespace().nth(4)?);
            (post.split_whitespace().next()? == "cgroup" && mount_point != unified)
                .then(|| mount_point.join(relative.trim_start_matches('/')))
        })
        .filter(|p| p.exists())
        .collect()
}

fn remove_cgroup_tree(path: &Path) {
    fn remove(path: &Path) -> std::io::Result<()> {
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                remove(&entry.path())?;
            }
        }
        fs::remove_dir(path)
    }
    for _ in 0..100 {
        if remove(path).is_ok() || !path.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", path.display());
}

/// Mount points at or below `dir`, deepest (latest) first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.reverse();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&oct, 8) {
                out.push(b as char);
                continue;
            }
            out.push(c);
            out.push_str(&oct);
        } else {
            out.push(c);
        }
    }
    out
}

/// Detaches every mount left below `dir` (dockerd's data-root bind mount,
/// overlay `merged` dirs, `exec-root/netns/*`), deepest first.
fn unmount_below(dir: &Path) {
    for _ in 0..3 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a plain syscall on a path we own; MNT_DETACH cannot block.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    for m in mounts_below(dir) {
        eprintln!("warning: could not unmount {}", m.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_lines() {
        let ss = "LISTEN 0      4096         0.0.0.0:80        0.0.0.0:*    users:((\"dockerd\",pid=8766,fd=26))\n\
                  LISTEN 0      4096            [::]:80           [::]:*    users:((\"docker-proxy\",pid=16997,fd=4),(\"docker-proxy\",pid=16998,fd=4))\n";
        let l = Listener::parse(ss);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].addr, "0.0.0.0");
        assert_eq!(l[0].port, 80);
        assert_eq!(l[0].processes, vec![("dockerd".into(), 8766)]);
        assert_eq!(l[1].addr, "[::]");
        assert_eq!(
            l[1].processes,
            vec![
                ("docker-proxy".into(), 16997),
                ("docker-proxy".into(), 16998)
            ]
        );
    }

    #[test]
    fn parses_urls() {
        let (a, h, p) = parse_url("http://198.51.100.1/").unwrap();
        assert_eq!(
            (a.to_string(), h.as_str(), p.as_str()),
            ("198.51.100.1:80".into(), "198.51.100.1", "/")
        );
        let (a, _, p) = parse_url("http://[2001:db8::1]:8080/x").unwrap();
        assert_eq!(
            (a.to_string(), p.as_str()),
            ("[2001:db8::1]:8080".into(), "/x")
        );
        let (a, _, _) = parse_url("http://127.0.0.1:8081").unwrap();
        assert_eq!(a.to_string(), "127.0.0.1:8081");
    }
}
