//! `cargo xtask lint`: formatting and clippy, warnings as errors, for every
//! crate — the kernel programs included, linted for their own BPF target.
//! `cargo xtask test` runs it first, so CI fails on a lint as on a test.

use std::process::Command;

use crate::sh;

/// The kernel crate's folder: its `.cargo/config.toml` sets the BPF target
/// and `build-std = ["core"]`.
const EBPF_CRATE: &str = "guard-ebpf";

pub fn lint() -> anyhow::Result<()> {
    sh::cargo(&["fmt", "--all", "--", "--check"])?;
    sh::cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    lint_ebpf()
}

/// clippy on the kernel programs for `bpfel-unknown-none`: nightly when it is
/// installed, else stable with `RUSTC_BOOTSTRAP=1` (as guard/build.rs builds it).
fn lint_ebpf() -> anyhow::Result<()> {
    let nightly =
        sh::output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_some();
    let mut cmd = Command::new("rustup");
    cmd.current_dir(sh::workspace_root().join(EBPF_CRATE));
    if nightly {
        cmd.args(["run", "nightly", "cargo"]);
    } else {
        cmd.args(["run", "stable", "cargo"])
            .env("RUSTC_BOOTSTRAP", "1");
    }
    // A target dir of its own: the BPF target's std build must not churn the host one.
    cmd.args([
        "clippy",
        "--target-dir",
        "../target/ebpf-lint",
        "--",
        "-D",
        "warnings",
    ]);
    sh::run(&mut cmd)
}
