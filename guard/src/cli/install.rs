//! `portguard install`: writes the systemd unit and a default policy, and
//! enables the service when systemd is the init system (else says what to run).

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};

use crate::{
    policy::{DEFAULT_POLICY_PATH, DEFAULT_POLICY_TOML, Policy, PolicySource},
    service::systemd_is_init,
};

pub const UNIT_NAME: &str = "portguard.service";
pub const UNIT_TEXT: &str = include_str!("../../../packaging/portguard.service");
const UNIT_DIR: &str = "/etc/systemd/system";
const PACKAGED_BIN: &str = "/usr/bin/portguard";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Install below this directory instead of / (a scratch root; never enables anything).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// The binary the unit starts. Default: this binary.
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
    /// Write the files only; do not enable or start the service.
    #[arg(long)]
    pub no_enable: bool,
}

/// `path` below `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

pub fn main(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let bin = match args.bin {
        Some(b) => b,
        None => std::env::current_exe().context("finding this binary")?,
    };
    let bin = bin
        .to_str()
        .context("the binary's path is not UTF-8")?
        .to_owned();
    if bin.chars().any(char::is_whitespace) {
        bail!("the binary's path {bin:?} has whitespace: install it somewhere plainer");
    }
    let unit = UNIT_TEXT.replace(PACKAGED_BIN, &bin);
    let unit_path = under(&args.root, &format!("{UNIT_DIR}/{UNIT_NAME}"));
    write_file(&unit_path, unit.as_bytes(), 0o644, true)?;
    println!("wrote {}", unit_path.display());

    let policy_path = under(&args.root, DEFAULT_POLICY_PATH);
    if policy_path.exists() {
        // Never overwrite someone's policy; check it instead.
        Policy::load(Some(&policy_path)).context("the existing policy does not validate")?;
        println!("kept {} (exists and validates)", policy_path.display());
    } else {
        Policy::parse(DEFAULT_POLICY_TOML, PolicySource::Embedded)?;
        write_file(&policy_path, DEFAULT_POLICY_TOML.as_bytes(), 0o640, false)?;
        println!(
            "wrote {} (tcp/80 and tcp/443 owned by Docker: edit to taste)",
            policy_path.display()
        );
    }

    let enable = ["systemctl", "enable", "--now", UNIT_NAME];
    if args.root != Path::new("/") || args.no_enable {
        println!(
            "not enabling anything; on the target host run:\n  systemctl daemon-reload\n  {}",
            enable.join(" ")
        );
    } else if systemd_is_init() {
        run(&["systemctl", "daemon-reload"])?;
        run(&enable)?;
        println!("portguard is enabled and started: `systemctl status portguard` shows it");
    } else {
        println!(
            "systemd is not the init system here, so nothing was enabled; on a systemd host run:\n  \
             systemctl daemon-reload\n  {}\nor start the agent directly: {bin} run",
            enable.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    // Write aside and rename: a unit is never seen half-written.
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    if !replace && path.exists() {
        fs::remove_file(&tmp)?;
        bail!("{} appeared while installing: left alone", path.display());
    }
    fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))
}

fn run(cmd: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(cmd[0])
        .args(&cmd[1..])
        .status()
        .with_context(|| format!("running {}", cmd.join(" ")))?;
    if !status.success() {
        bail!("`{}` failed: {status}", cmd.join(" "));
    }
    Ok(())
}
