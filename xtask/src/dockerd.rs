//! A real dockerd for the tests: used when one runs, started (and later
//! stopped) when none does.

use std::{
    fs::File,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::sh;

const SOCKET: &str = "/var/run/docker.sock";

/// A dockerd this run started; stopped on drop so the machine is left as found.
pub struct Dockerd {
    child: Option<Child>,
}

fn answers() -> bool {
    sh::output(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]))
        .is_some()
}

pub fn ensure_running() -> anyhow::Result<Dockerd> {
    if answers() {
        eprintln!("xtask: dockerd: already running, using it");
        return Ok(Dockerd { child: None });
    }
    let log_path = sh::workspace_root().join("target/dockerd.log");
    std::fs::create_dir_all(log_path.parent().unwrap())?;
    let log = File::create(&log_path)?;
    eprintln!("xtask: dockerd: starting (log: {})", log_path.display());
    let child = Command::new("dockerd")
        .args(["--host", &format!("unix://{SOCKET}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dockerd (package docker.io)")?;
    let dockerd = Dockerd { child: Some(child) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers() {
        if Instant::now() > deadline {
            bail!(
                "dockerd did not answer within 60 s; see {}",
                log_path.display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("xtask: dockerd: ready");
    Ok(dockerd)
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        eprintln!("xtask: dockerd: stopping the instance this run started");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
