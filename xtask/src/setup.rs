//! `cargo xtask setup`: installs only what is missing, says what it does, and
//! names the missing piece when it cannot.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::sh;

/// Debian packages: the eBPF linker's LLVM, and what the tests drive for real.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker is built against LLVM 22 (rustc's own LLVM)",
    ),
    ("libpolly-22-dev", "bpf-linker links LLVM statically"),
    ("libzstd-dev", "bpf-linker links LLVM statically"),
    ("zlib1g-dev", "bpf-linker links LLVM statically"),
    (
        "nftables",
        "the nftables inspector's tests load real rulesets",
    ),
    ("iproute2", "tests create network namespaces and veths"),
    (
        "iptables",
        "tests reproduce kube-proxy and Docker rules with iptables-nft",
    ),
    ("docker.io", "tests run a real dockerd"),
    (
        "containernetworking-plugins",
        "tests run the CNI bridge and portmap plugins",
    ),
    (
        "busybox-static",
        "the tests' tiny container image is built from it",
    ),
    ("curl", "tests talk HTTP to containers and probes"),
    ("conntrack", "tests ask the kernel where a connection went"),
    (
        "ipset",
        "a test puts an iptables SET target on a protected port",
    ),
    (
        "chromium",
        "the HTML report test screenshots the report in a real browser",
    ),
    (
        "fonts-dejavu-core",
        "the report screenshot needs a font to draw text",
    ),
    (
        "systemd",
        "the unit test runs systemd-analyze verify and security",
    ),
];

/// Builds the Debian package (`cargo xtask deb`).
const CARGO_DEB_VERSION: &str = "3.8.0";

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn setup() -> anyhow::Result<()> {
    apt_packages()?;
    ebpf_toolchain()?;
    bpf_linker()?;
    cargo_deb()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn installed(package: &str) -> bool {
    sh::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<_> = APT_PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("xtask: apt packages: all {} present", APT_PACKAGES.len());
        return Ok(());
    }
    for (p, why) in &missing {
        eprintln!("xtask: missing apt package {p}: {why}");
    }
    sh::require_root("installing apt packages")?;
    sh::run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed: is a Debian mirror reachable?")?;
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    sh::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&names)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", names.join(" ")))?;
    Ok(())
}

/// The toolchain that builds the kernel programs: nightly with rust-src, or,
/// where no nightly is installed, stable with rust-src (guard/build.rs then
/// builds with RUSTC_BOOTSTRAP=1).
pub fn ebpf_toolchain_name() -> &'static str {
    if sh::output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_some() {
        "nightly"
    } else {
        "stable"
    }
}

fn ebpf_toolchain() -> anyhow::Result<()> {
    let toolchain = ebpf_toolchain_name();
    let installed = sh::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .context("rustup is needed to manage the eBPF toolchain")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: rust-src for {toolchain}: present");
        return Ok(());
    }
    eprintln!("xtask: rust-src for {toolchain} is missing: build-std needs it for the BPF target");
    sh::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain]))
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(v) = sh::output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            eprintln!("xtask: bpf-linker {BPF_LINKER_VERSION}: present");
            return Ok(());
        }
        eprintln!(
            "xtask: bpf-linker is {}, want {BPF_LINKER_VERSION}",
            v.trim()
        );
    } else {
        eprintln!("xtask: bpf-linker is missing: it links the kernel programs");
    }
    if !std::path::Path::new(LLVM_BIN).join("llvm-config").exists() {
        bail!(
            "{LLVM_BIN}/llvm-config is missing: install llvm-22-dev (cargo xtask setup does, as root)"
        );
    }
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    sh::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path),
    )
    .context("building bpf-linker from crates.io")
}

fn cargo_deb() -> anyhow::Result<()> {
    if let Some(v) = sh::output(Command::new("cargo").args(["deb", "--version"])) {
        eprintln!("xtask: cargo-deb: present ({})", v.trim());
        return Ok(());
    }
    eprintln!("xtask: cargo-deb is missing: `cargo xtask deb` builds the Debian package with it");
    sh::run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))
    .context("building cargo-deb from crates.io")
}
