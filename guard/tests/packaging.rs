//! The service as shipped: the unit passes `systemd-analyze verify` and its
//! offline security exposure is at most 4.0; `portguard install` writes the
//! unit and a policy into a scratch root; the .deb from `cargo xtask deb`
//! unpacks (dpkg -x) to the binary, unit, policy and README.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use portguard::policy::{Policy, PolicySource};

const UNIT: &str = include_str!("../../packaging/portguard.service");

fn run(cmd: &mut Command) -> String {
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

/// Verify and score the unit with its ExecStart pointed at `bin` (verify
/// insists the binary exists and is executable).
fn verify_and_score(unit: &str, bin: &Path) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portguard.service");
    fs::write(
        &path,
        unit.replace("/usr/bin/portguard", bin.to_str().unwrap()),
    )
    .unwrap();
    run(Command::new("systemd-analyze").arg("verify").arg(&path));
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path));
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure figure in:\n{out}"));
    let figure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the figure in {line:?}"));
    eprintln!("systemd-analyze security --offline=true: exposure {figure}");
    figure
}

#[test]
fn unit_verifies_and_exposure_is_at_most_4() {
    let figure = verify_and_score(UNIT, Path::new(env!("CARGO_BIN_EXE_portguard")));
    assert!(figure <= 4.0, "exposure {figure} > 4.0");
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=always",
        "ProtectSystem=strict",
        "StateDirectory=portguard",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "SystemCallFilter=",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_RESOURCE",
    ] {
        assert!(UNIT.contains(needed), "the unit lacks {needed}");
    }
}

#[test]
fn install_writes_unit_and_policy_into_a_root() {
    let root = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_portguard");
    let install = || {
        run(Command::new(bin)
            .args(["install", "--root"])
            .arg(root.path()))
    };
    let said = install();
    let unit =
        fs::read_to_string(root.path().join("etc/systemd/system/portguard.service")).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={bin} run")),
        "the unit starts this binary:\n{unit}"
    );
    let policy_path = root.path().join("etc/portguard/config.toml");
    let policy = fs::read_to_string(&policy_path).unwrap();
    Policy::parse(&policy, PolicySource::File(policy_path.clone())).unwrap();
    assert_eq!(
        fs::metadata(&policy_path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert!(
        said.contains("systemctl enable --now portguard.service"),
        "{said}"
    );

    // A second install keeps an edited policy.
    fs::write(&policy_path, "mode = \"observe\"\n").unwrap();
    let said = install();
    assert!(said.contains("kept"), "{said}");
    assert_eq!(
        fs::read_to_string(&policy_path).unwrap(),
        "mode = \"observe\"\n"
    );

    // ...and refuses to go on over a broken one.
    fs::write(&policy_path, "mode = \"block\"\n").unwrap();
    let out = Command::new(bin)
        .args(["install", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown mode"));
}

/// `$PORTGUARD_DEB` (set by `cargo xtask test`), else the newest target/debian/*.deb.
fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTGUARD_DEB") {
        return p.into();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .unwrap_or_else(|| {
            panic!(
                "no .deb in {}: run `cargo xtask deb` (cargo xtask test does)",
                dir.display()
            )
        })
}

#[test]
fn deb_unpacks_to_binary_unit_policy_and_readme() {
    let deb = deb();
    let control = run(Command::new("dpkg-deb").arg("--field").arg(&deb));
    assert!(control.contains("Package: portguard"), "{control}");
    let root = tempfile::tempdir().unwrap();
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(root.path()));

    let bin = root.path().join("usr/bin/portguard");
    assert_eq!(
        fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let version = run(Command::new(&bin).arg("--version"));
    assert!(version.starts_with("portguard "), "{version}");

    let unit =
        fs::read_to_string(root.path().join("lib/systemd/system/portguard.service")).unwrap();
    assert_eq!(
        unit, UNIT,
        "the packaged unit is packaging/portguard.service"
    );
    assert!(verify_and_score(&unit, &bin) <= 4.0);

    let policy_path = root.path().join("etc/portguard/config.toml");
    Policy::parse(
        &fs::read_to_string(&policy_path).unwrap(),
        PolicySource::File(policy_path),
    )
    .unwrap();
    let readme = fs::read_to_string(root.path().join("usr/share/doc/portguard/README.md")).unwrap();
    assert!(readme.starts_with("# portguard"));
    let listing = run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --ctrl-tarfile '{}' | tar -xO ./conffiles",
        deb.display()
    )));
    assert!(
        listing.contains("/etc/portguard/config.toml"),
        "the policy is a conffile: {listing}"
    );
}
