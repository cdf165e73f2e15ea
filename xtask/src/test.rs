//! `cargo xtask test`: every test, unit and privileged integration, on real parts.

use std::process::Command;

use crate::{dockerd, setup, sh};

pub fn test(filter: Option<&str>) -> anyhow::Result<()> {
    setup::setup()?;
    sh::require_root("the integration tests")?;
    // A lint fails the run like a failing test (fmt, clippy -D warnings, the BPF crate too).
    crate::lint::lint()?;
    // The agent binary the integration tests start.
    sh::cargo(&["build", "--workspace", "--exclude", "guard-ebpf"])?;
    // The packaging test unpacks the real .deb.
    let deb = crate::deb()?;
    let _dockerd = dockerd::ensure_running()?;
    let bin = sh::workspace_root().join("target/debug/portguard");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(sh::workspace_root())
        .args(["test", "--workspace", "--exclude", "guard-ebpf"])
        .env("PORTGUARD_BIN", &bin)
        .env("PORTGUARD_DEB", &deb)
        .env("PORTGUARD_HELM", setup::helm_path());
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    let result = sh::run(&mut cmd);
    leftovers();
    result
}

/// Tests clean up after themselves (RAII guards); this only reports what a
/// killed test run might have left, and removes it.
fn leftovers() {
    if let Some(list) = sh::output(Command::new("ip").args(["netns", "list"])) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with("pg-") {
                eprintln!("xtask: removing leftover network namespace {name}");
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}
