//! `cargo xtask bench bind`: what the bind guard costs on bind(), and how many
//! events it carries without loss. One line per figure: `name value unit`.
//!
//! The process alternates between two cgroups made for the run, one with the
//! guard attached and one without, so both are measured in the same run under
//! the same machine noise; the ratio is the figure that matters. First with
//! the programs alone (loaded here), then with the whole agent: a real
//! `portguard run` (this tree's release binary, or `PORTGUARD_BIN`) guarding
//! the same cgroup, its event reader, timers and layers running as they do on
//! a host.
//!
//! Rounds are paired: each pair measures both sides back to back, in an order
//! that alternates between pairs (so neither side always runs second, after
//! the other warmed the caches), and the ratio figure is the median of the
//! pairs' ratios, printed with its quartiles: the spread is the noise.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use guard_common::IPPROTO_TCP;
use portguard::ebpf::{BindGuard, BindPolicy, PortEntry};
use portguard_tests::cgroup::Cgroup;
use socket2::{Domain, Socket, Type};

const ROUNDS: usize = 31;
const BINDS_PER_ROUND: u32 = 20_000;
const STORM: Duration = Duration::from_secs(2);
const STORM_THREADS: usize = 2;

fn main() {
    portguard_tests::require_root();
    let guarded = Cgroup::new("pg-bench-guarded");
    let plain = Cgroup::new("pg-bench-plain");
    let protected = free_port();
    let unprotected = free_port();

    let (mut guard, _logger) = BindGuard::load_and_attach(guarded.path()).expect("load guard");
    guard
        .apply(&BindPolicy {
            ports: vec![PortEntry {
                port: protected,
                proto: IPPROTO_TCP,
                enforce: false,
            }],
            ..Default::default()
        })
        .unwrap();
    let cookie = portguard::sys::netns::current_netns_cookie().unwrap();
    guard.arm(cookie, Default::default()).unwrap();
    let mut events = guard.take_events().unwrap();

    // Drain events in the background, as the agent does.
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (received, stop) = (received.clone(), stop.clone());
        thread::spawn(move || {
            let fd = events.as_raw_fd();
            while !stop.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
                // Routine events come without a wakeup: the agent drains every 50 ms too.
                while let Some(item) = events.next() {
                    if portguard::ebpf::read_bind_event(&item).is_some() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    // Cost on bind: the common case (an unprotected port) and a protected port
    // (observed, so every bind also emits an event).
    for (name, port) in [("unprotected", unprotected), ("protected", protected)] {
        let pairs = paired(&guarded, &plain, port);
        println!(
            "bind_{name}_ns_per_op_without_guard {:.0} ns",
            pairs.without_ns
        );
        println!("bind_{name}_ns_per_op_with_guard {:.0} ns", pairs.with_ns);
        // Throughput with the guard relative to without: 1.0 = free.
        pairs.print(&format!("bind_{name}_throughput_ratio"));
    }

    // Bind storm: every CPU binding the protected port as fast as it can.
    enter(&guarded);
    // Let the reader drain what the ratio rounds left behind before counting.
    thread::sleep(Duration::from_millis(300));
    let before = guard.counters().unwrap();
    let received_before = received.load(Ordering::Relaxed);
    let start = Instant::now();
    let workers: Vec<_> = (0..STORM_THREADS)
        .map(|_| {
            thread::spawn(move || {
                let mut n = 0u64;
                let deadline = Instant::now() + STORM;
                while Instant::now() < deadline {
                    bind_loop(protected, 1000);
                    n += 1000;
                }
                n
            })
        })
        .collect();
    let attempted: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let elapsed = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(300));
    let after = guard.counters().unwrap();
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let got = received.load(Ordering::Relaxed) - received_before;
    let dropped = after.ringbuf_dropped - before.ringbuf_dropped;
    let seen = after.host_binds - before.host_binds;
    enter_path(&portguard_tests::cgroup::unified_root());
    println!("storm_binds_attempted {attempted} binds");
    println!("storm_binds_seen_by_kernel {seen} binds");
    println!("storm_events_received {got} events");
    println!("storm_events_dropped {dropped} events");
    println!(
        "storm_events_per_second {:.0} events/s",
        got as f64 / elapsed
    );
    println!(
        "storm_loss_ratio {:.6} ratio",
        dropped as f64 / seen.max(1) as f64
    );
    drop(guard);
    whole_agent(&guarded, &plain, protected, unprotected);
}

/// The unprotected-port ratio again with the whole agent guarding `guarded`
/// (the programs it loads, and everything it runs beside them).
fn whole_agent(guarded: &Cgroup, plain: &Cgroup, protected: u16, unprotected: u16) {
    enter_path(&portguard_tests::cgroup::unified_root());
    let ns = portguard_tests::netns::NetNs::new("pg-bench-bind");
    let policy = std::env::temp_dir().join(portguard_tests::unique_name("pg-bench-bind") + ".toml");
    fs::write(
        &policy,
        format!(
            "mode = \"enforce\"\n[[ports]]\nport = {protected}\nowner = \"unit:pg-bench-bind.service\"\n"
        ),
    )
    .unwrap();
    let mut agent = portguard_tests::agent::Agent::start([
        "run".as_ref(),
        "--journal".as_ref(),
        "off".as_ref(),
        "--cgroup".as_ref(),
        guarded.path().as_os_str(),
        "--netns".as_ref(),
        ns.name().as_ref(),
        "--config".as_ref(),
        policy.as_os_str(),
    ]);
    agent.wait_for_event(Duration::from_secs(20), "rule_guard_ready");
    let pairs = paired(guarded, plain, unprotected);
    enter_path(&portguard_tests::cgroup::unified_root());
    println!(
        "bind_unprotected_ns_per_op_with_agent {:.0} ns",
        pairs.with_ns
    );
    // The whole agent's cost on the common case: 1.0 = free, goal >= 0.99.
    pairs.print("bind_unprotected_throughput_ratio_with_agent");
    let (status, _) = agent.stop();
    let _ = fs::remove_file(&policy);
    assert!(status.success(), "the agent stopped badly: {status}");
}

/// Paired rounds with the guard and without (see the module docs).
struct Pairs {
    with_ns: f64,
    without_ns: f64,
    /// Throughput with over without, per pair, sorted.
    ratios: Vec<f64>,
}

impl Pairs {
    fn print(&self, name: &str) {
        let q = |f: f64| self.ratios[((self.ratios.len() - 1) as f64 * f).round() as usize];
        println!("{name} {:.3} ratio", q(0.5));
        println!("{name}_p25 {:.3} ratio", q(0.25));
        println!("{name}_p75 {:.3} ratio", q(0.75));
    }
}

fn paired(guarded: &Cgroup, plain: &Cgroup, port: u16) -> Pairs {
    let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let side = |cg: &Cgroup| {
            enter(cg);
            bind_loop(port, BINDS_PER_ROUND)
        };
        let (w, wo) = if round % 2 == 0 {
            let wo = side(plain);
            (side(guarded), wo)
        } else {
            let w = side(guarded);
            (w, side(plain))
        };
        with.push(w);
        without.push(wo);
        ratios.push(wo / w);
    }
    ratios.sort_by(f64::total_cmp);
    let per_op = |v: &mut [f64]| median(v) * 1e9 / f64::from(BINDS_PER_ROUND);
    Pairs {
        with_ns: per_op(&mut with),
        without_ns: per_op(&mut without),
        ratios,
    }
}

fn bind_loop(port: u16, n: u32) -> f64 {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into();
    let start = Instant::now();
    for _ in 0..n {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        // Every thread binds the same port; with SO_REUSEADDR and no listen() they may.
        let _ = s.bind(&addr);
    }
    start.elapsed().as_secs_f64()
}

fn enter(cg: &Cgroup) {
    enter_path(cg.path());
}

/// Moves the whole process (every thread) into the cgroup.
fn enter_path(dir: &Path) {
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).unwrap();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
