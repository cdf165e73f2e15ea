//! Builds the kernel programs in `guard-ebpf` for the BPF target and leaves the
//! object in `OUT_DIR`, where `src/ebpf` embeds it.
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker` (`cargo xtask setup`).
//! `AYA_BUILD_SKIP=1` writes an empty object instead, for `cargo check`/`clippy` on a
//! machine without that toolchain; the agent then refuses to load programs.

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "guard-ebpf")
        .ok_or_else(|| anyhow!("guard-ebpf is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        ebpf_toolchain(),
    )?;
    // aya-build returns early under AYA_BUILD_SKIP without writing the object;
    // src/ebpf embeds it, so leave an empty one that the agent refuses to load.
    let object = std::path::Path::new(&std::env::var("OUT_DIR").context("OUT_DIR not set")?)
        .join(ebpf.name.as_str());
    if !object.exists() {
        std::fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}

/// Nightly when it is installed; otherwise stable, with RUSTC_BOOTSTRAP=1 so that
/// `-Z build-std=core` works for the BPF target (verified on this kind of machine).
fn ebpf_toolchain() -> Toolchain<'static> {
    let nightly = std::process::Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if nightly {
        return Toolchain::Nightly;
    }
    println!(
        "cargo:warning=no nightly toolchain: building the kernel programs with stable and RUSTC_BOOTSTRAP=1"
    );
    // SAFETY: build scripts are single-threaded; aya-build's cargo child inherits it.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    Toolchain::Custom("stable")
}
