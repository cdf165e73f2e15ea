//! Support for portguard's privileged integration tests: RAII guards for the
//! real things the tests create (network namespaces, cgroups, agent processes,
//! Docker images, containers and networks, a dockerd of their own in a
//! network namespace),
//! each removed on drop, also when a test panics.
//!
//! Tests run as root. A test that cannot get what it needs panics with the reason:
//! nothing skips itself into green.

pub mod agent;
pub mod cgroup;
pub mod cni;
pub mod docker;
pub mod dockerd_ns;
pub mod incident;
pub mod k8s_api;
pub mod netns;

use std::{path::PathBuf, process::Command};

/// A short name unique to this process and call, for namespaces, cgroups and tables.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A policy file written for one test, removed when it goes out of scope
/// (also when the test panics).
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(contents: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name("pg-policy") + ".toml");
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A TCP port nobody holds right now (the kernel's pick, released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port on loopback")
        .port()
}

/// An audit log and what rotation and torn-tail repair put beside it.
pub fn audit_files(log: &std::path::Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (log.parent(), log.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy().into_owned();
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&name))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `portguard` binary under test: `$PORTGUARD_BIN` (set by `cargo xtask test`),
/// else the debug build next to this test binary.
pub fn portguard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTGUARD_BIN") {
        return p.into();
    }
    // target/debug/deps/this-test (a test) or target/release/bench_x (a
    // helper binary) → target/<profile>/portguard
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("an executable lives in a directory");
    let profile = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>/deps")
    } else {
        dir
    };
    let candidate = profile.join("portguard");
    assert!(
        candidate.exists(),
        "{} does not exist: build it first (`cargo build -p portguard`) or run `cargo xtask test`",
        candidate.display()
    );
    candidate
}

/// `portguard check --json --netns NS --config POLICY EXTRA…`: the exit code and
/// the JSON document it printed; panics with stdout and stderr when it printed
/// no JSON.
pub fn check_json(
    netns: &str,
    policy: &std::path::Path,
    extra: &[&str],
) -> (i32, serde_json::Value) {
    let out = Command::new(portguard_bin())
        .args(["check", "--json", "--netns", netns, "--config"])
        .arg(policy)
        .args(extra)
        .output()
        .expect("run portguard check");
    let code = out.status.code().unwrap_or(-1);
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check printed no JSON ({e}), exit {code}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, doc)
}

/// A helper binary of this crate (see `src/bin/`), built alongside the tests.
pub fn helper_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} does not exist: `cargo test -p portguard-tests` builds it",
        path.display()
    );
    path
}

/// Panics unless running as root: these tests create namespaces and cgroups.
pub fn require_root() {
    // SAFETY: no arguments, no side effects.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests need root (they create cgroups, network namespaces and load eBPF): run `cargo xtask test`"
    );
}
