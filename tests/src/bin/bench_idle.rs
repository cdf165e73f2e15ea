//! `cargo xtask bench idle`: what a running agent costs when nothing happens.
//! One line per figure: `name value unit`.
//!
//! A real `portguard run` (this tree's release binary, or `PORTGUARD_BIN`)
//! guards an empty network namespace and a cgroup made for the run, with a
//! policy that names no Docker owner (no Docker to reconnect to) and no
//! probe. Once it is ready and has settled, its threads' context switches
//! (`/proc/PID/task/*/status`: voluntary and involuntary) are counted over a
//! quiet window: every wakeup of the agent is one. Also its memory: resident
//! now, and the peak (`VmHWM`, mostly the start: program load and the first
//! ruleset read).

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use portguard_tests::{TempFile, agent::Agent, cgroup::Cgroup, netns::NetNs, portguard_bin};

/// Settling after `agent_ready`: the first inspection, the first ticks.
const SETTLE: Duration = Duration::from_secs(15);
/// The quiet window the wakeups are counted over.
const WINDOW: Duration = Duration::from_secs(10);

fn main() {
    portguard_tests::require_root();
    let ns = NetNs::new("pg-bench-idle");
    let cgroup = Cgroup::new("pg-bench-idle");
    let policy = TempFile::new(
        "mode = \"enforce\"\n[[ports]]\nport = 80\nowner = \"unit:pg-bench-idle.service\"\n",
    );
    eprintln!("bench_idle: agent {}", portguard_bin().display());
    let mut agent = Agent::start([
        "run".as_ref(),
        "--journal".as_ref(),
        "off".as_ref(),
        "--cgroup".as_ref(),
        cgroup.path().as_os_str(),
        "--netns".as_ref(),
        ns.name().as_ref(),
        "--config".as_ref(),
        policy.path().as_os_str(),
    ]);
    agent.wait_for_event(Duration::from_secs(20), "rule_guard_ready");
    let pid = agent.pid();
    thread::sleep(SETTLE);

    let before = context_switches(pid);
    let t0 = Instant::now();
    thread::sleep(WINDOW);
    let after = context_switches(pid);
    let seconds = t0.elapsed().as_secs_f64();
    let switches = after.saturating_sub(before);
    let (rss, hwm) = memory_kib(pid);
    println!("idle_context_switches {switches} count");
    println!("idle_window {seconds:.1} s");
    println!("idle_wakeups_per_s {:.2} 1/s", switches as f64 / seconds);
    println!("idle_threads {} count", threads(pid));
    println!("idle_rss {:.1} MB", rss as f64 / 1024.0);
    println!("peak_rss {:.1} MB", hwm as f64 / 1024.0);
    let (status, _) = agent.stop();
    assert!(status.success(), "the agent stopped badly: {status}");
}

/// Voluntary and involuntary context switches of every thread of `pid`.
fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("the agent's tasks") {
        let status =
            fs::read_to_string(task.expect("task").path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

fn threads(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}

/// `VmRSS` and `VmHWM` in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
