//! The agent under test as a real process: `portguard run …` with JSON logs,
//! read line by line; stopped with SIGTERM on drop (killed if it hangs).

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::portguard_bin;

/// Whether a JSON log line carries `event = NAME`.
pub fn is_event(v: &Value, name: &str) -> bool {
    v["event"] == name
}

/// How many of the agent's log lines a failing test prints.
const AGENT_LINES_ON_PANIC: usize = 60;

#[derive(Debug)]
pub struct Agent {
    child: Child,
    /// This agent's own audit log, removed on drop.
    audit_log: std::path::PathBuf,
    lines: Receiver<String>,
    /// Every line read so far, for failure messages.
    seen: Vec<String>,
    /// Lines read but not matched by any wait yet: a later wait may want one
    /// that arrived early (the agent's tasks log in no fixed order).
    unmatched: std::collections::VecDeque<Value>,
}

impl Agent {
    /// Starts `portguard ARGS` with JSON logs and waits for `event = "agent_ready"`.
    pub fn start<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::start_in(None, &[], args)
    }

    /// [`Agent::start`] inside the network namespace `/run/netns/NETNS` as if
    /// it were the host's (`nsenter --net`, which keeps `/sys` and so the
    /// cgroup v2 mount; `ip netns exec` would hide it), with extra environment
    /// (e.g. `DOCKER_HOST` of a dockerd running there).
    pub fn start_in<I, S>(netns: Option<&str>, envs: &[(&str, &std::ffi::OsStr)], args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        match netns {
            None => Self::spawn(Command::new(portguard_bin()), envs, args),
            Some(ns) => {
                let net = format!("--net=/run/netns/{ns}");
                Self::start_via(
                    &["nsenter".as_ref(), net.as_ref(), "--".as_ref()],
                    envs,
                    args,
                )
            }
        }
    }

    /// [`Agent::start`] as if on another host: in a UTS namespace of its own
    /// named `hostname`, and a mount namespace where `/etc/machine-id` is
    /// `machine_id` (a file). `unshare` and the shell exec the agent: the
    /// child's pid is the agent's.
    pub fn start_as_host<I, S>(
        hostname: &str,
        machine_id: &std::path::Path,
        envs: &[(&str, &std::ffi::OsStr)],
        args: I,
    ) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let script =
            r#"hostname "$1" && mount --bind "$2" /etc/machine-id && shift 2 && exec "$@""#;
        let launcher: Vec<&std::ffi::OsStr> = [
            "unshare",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            hostname,
        ]
        .into_iter()
        .map(std::ffi::OsStr::new)
        .chain([machine_id.as_os_str()])
        .collect();
        Self::start_via(&launcher, envs, args)
    }

    /// [`Agent::start`] through a launcher that execs it (`nsenter
    /// --mount=… --`, say): the child's pid is the agent's.
    pub fn start_via<I, S>(
        launcher: &[&std::ffi::OsStr],
        envs: &[(&str, &std::ffi::OsStr)],
        args: I,
    ) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let (program, rest) = launcher.split_first().expect("a launcher");
        let mut cmd = Command::new(program);
        cmd.args(rest).arg(portguard_bin());
        Self::spawn(cmd, envs, args)
    }

    fn spawn<I, S>(mut cmd: Command, envs: &[(&str, &std::ffi::OsStr)], args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        // The test's own audit log path (PORTGUARD_AUDIT_LOG in `envs`), or a fresh one.
        let audit_log = envs
            .iter()
            .find(|(k, _)| *k == "PORTGUARD_AUDIT_LOG")
            .map_or_else(
                || std::env::temp_dir().join(crate::unique_name("pg-audit") + ".jsonl"),
                |(_, v)| std::path::PathBuf::from(v),
            );
        cmd.envs(envs.iter().copied());
        cmd.args(args)
            .env("PORTGUARD_LOG_FORMAT", "json")
            // Tests run agents side by side: each its own audit log and metrics port.
            .env("PORTGUARD_AUDIT_LOG", &audit_log)
            .env("PORTGUARD_METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info,portguard=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Self {
            child,
            audit_log,
            lines,
            seen: Vec::new(),
            unmatched: Default::default(),
        };
        agent.wait_for_event(Duration::from_secs(20), "agent_ready");
        agent
    }

    /// The audit log this agent writes.
    pub fn audit_log(&self) -> &std::path::Path {
        &self.audit_log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line with `event = NAME` (the structured field the agent
    /// sets on every line a test waits on; messages may be reworded freely).
    pub fn wait_for_event(&mut self, timeout: Duration, name: &str) -> Value {
        self.wait_for(timeout, |v| is_event(v, name))
    }

    /// Waits for a JSON log line matching `pred`; panics with every line seen on timeout.
    /// Each line matches at most one wait.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.unmatched.iter().position(&pred) {
            return self.unmatched.remove(i).expect("index from position");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if pred(&v) {
                            return v;
                        }
                        self.unmatched.push_back(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no matching agent log line within {timeout:?}; lines seen:\n{}",
                    self.seen.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "agent exited ({:?}) before a matching line; lines seen:\n{}",
                    self.child.try_wait(),
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Whether any line read so far (matched or not) carries `event = NAME`.
    pub fn saw_event(&mut self, name: &str) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                self.unmatched.push_back(v);
            }
            self.seen.push(line);
        }
        self.seen
            .iter()
            .any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| is_event(&v, name)))
    }

    /// Sends SIGTERM and waits for a clean exit, returning the remaining lines.
    pub fn stop(self) -> (std::process::ExitStatus, Vec<String>) {
        let (status, lines, _) = self.stop_with_audit();
        (status, lines)
    }

    /// Like [`Agent::stop`], also returning every audit record it wrote.
    pub fn stop_with_audit(mut self) -> (std::process::ExitStatus, Vec<String>, Vec<Value>) {
        let status = self.terminate();
        let rest: Vec<String> = self.lines.try_iter().collect();
        self.seen.extend(rest);
        let audit = std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect();
        (status, std::mem::take(&mut self.seen), audit)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait agent") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait agent");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The agent stopped outright (SIGSTOP) while this lives: only the kernel
/// programs act. Continued (SIGCONT) on drop, also on panic.
#[must_use = "the agent is continued when this is dropped"]
pub struct Frozen(u32);

impl Agent {
    /// Stops the agent until the returned guard is dropped.
    pub fn freeze(&self) -> Frozen {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, libc::SIGSTOP) }, 0);
        Frozen(self.pid())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as in Agent::freeze.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
        if thread::panicking() {
            // The test failed with the agent running: what it said is the
            // first thing to read (the panic message has only the test's view).
            let rest: Vec<String> = self.lines.try_iter().collect();
            self.seen.extend(rest);
            let from = self.seen.len().saturating_sub(AGENT_LINES_ON_PANIC);
            eprintln!("the agent's last {} log lines:", self.seen.len() - from);
            for line in &self.seen[from..] {
                eprintln!("  {line}");
            }
            if let Ok(audit) = std::fs::read_to_string(&self.audit_log) {
                eprintln!("its audit log:\n{audit}");
            }
        }
        for path in crate::audit_files(&self.audit_log) {
            let _ = std::fs::remove_file(path);
        }
    }
}
