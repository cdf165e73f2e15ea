//! `cargo xtask bench remediate`: how long a foreign rule lives, and how much
//! traffic it takes. One line per figure: `name value unit`.
//!
//! Everything runs inside the incident lab's namespaces (see
//! `portguard_tests::incident`); the rule guard (what `portguard run` runs) is
//! started in this process against the lab's host namespace.
//!
//! - latency: a hijack rule (`tcp dport 80 dnat to` the pod, in a nat chain at
//!   priority -110, ahead of Docker's) is committed over netlink; the time from
//!   just before the commit to the `DELRULE` notification of its removal, over
//!   `--insertions` hijacks; also with a kube-proxy-shaped ruleset of
//!   `--kube-rules` rules loaded.
//! - share: a client opens new connections at `--rate` per second while the
//!   hijack is re-inserted every 100 ms; the share answered by anyone but the
//!   owner, with and without the pin.
//! - baseline: the same with a polling loop at 1 s instead of notifications.

use std::{
    fmt::Write as _,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portguard::{
    audit::{AuditHandle, AuditLog, Rotation},
    nft::{
        self, InspectInput, OwnedTargets,
        model::Family,
        monitor::{Change, RulesetMonitor},
        netlink::in_netns,
        pin::Pin,
        transaction::{NftWriter, Op, Placement, Transaction},
    },
    owners::{DockerStatus, ResolvedOwners},
    policy::{Policy, PolicySource, Proto},
    rules::{
        Action, GuardReport, RuleGuard, Stages, decide, removal_transaction, timing::STAGE_NAMES,
    },
};
use portguard_tests::{
    incident::{HOST4, IncidentLab, POD4, SITE, ask_here, in_ns, sh},
    unique_name,
};

const HIJACK_TABLE: &str = "hijack";
const HIJACK_CHAIN: &str = "pre";
const HIJACK_INTERVAL: Duration = Duration::from_millis(100);
const SHARE_DURATION: Duration = Duration::from_secs(6);
const POLL_INTERVAL: Duration = Duration::from_secs(1);
const INCIDENT_POLL: Duration = Duration::from_secs(60);

struct Args {
    insertions: usize,
    kube_rules: usize,
    rate: u32,
    baseline_insertions: usize,
    /// Skip everything but the kube-proxy-ruleset latency.
    kube_only: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        insertions: 200,
        kube_rules: 40_000,
        rate: 500,
        baseline_insertions: 8,
        kube_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--kube-only" {
            a.kube_only = true;
            continue;
        }
        let v: usize = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} needs a number"));
        match k.as_str() {
            "--insertions" => a.insertions = v,
            "--kube-rules" => a.kube_rules = v,
            "--rate" => a.rate = v as u32,
            "--baseline-insertions" => a.baseline_insertions = v,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn policy(pin: bool) -> Policy {
    let mut text = String::from("mode = \"enforce\"\n");
    for port in [80, 443] {
        let _ = write!(
            text,
            "[[ports]]\nport = {port}\nowner = \"docker\"\npin = {pin}\n"
        );
    }
    Policy::parse(&text, PolicySource::Embedded).expect("bench policy")
}

/// The hijack rule: `tcp dport 80 (to a local address) dnat to POD:80`.
fn hijack_op() -> Op {
    let rule = Pin {
        proto: Proto::Tcp,
        port: 80,
        host: None,
        target: format!("{POD4}:80").parse().unwrap(),
        exclude_iif: None,
    };
    Op::AddRule {
        family: Family::IP,
        table: HIJACK_TABLE.into(),
        chain: HIJACK_CHAIN.into(),
        exprs: rule.expressions(false),
        userdata: None,
        compat_proto: None,
        placement: Placement::Prepend,
        summary: "hijack".into(),
    }
}

/// The rule guard running in this process (its own runtime thread).
struct Guard {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<thread::JoinHandle<()>>,
    audit: std::path::PathBuf,
    /// Each removal's stages, as the guard reported them.
    stages: Arc<std::sync::Mutex<Vec<Stages>>>,
    /// How long each dismissal of changes no probe meets took.
    dismissed: Arc<std::sync::Mutex<Vec<Duration>>>,
    /// Each incremental inspection's time.
    inspected: Arc<std::sync::Mutex<Vec<Duration>>>,
}

impl Guard {
    /// `label`: print the median incremental inspection time under it on stop.
    fn start(lab: &IncidentLab, pin: bool, label: &'static str) -> Self {
        let audit = std::env::temp_dir().join(unique_name("pg-bench-audit") + ".jsonl");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = lab.h.name().to_owned();
        let path = audit.clone();
        let stages = Arc::new(std::sync::Mutex::new(Vec::new()));
        let removals = stages.clone();
        let dismissed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let dismissals = dismissed.clone();
        let inspected = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inspections_seen = inspected.clone();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let log = AuditLog::open(&path, Rotation::default()).expect("audit log");
                let (_owners_tx, owners) = tokio::sync::watch::channel(Arc::new(ResolvedOwners {
                    docker: DockerStatus::Connecting,
                    docker_bridges: Vec::new(),
                    cgroup_root: None,
                    ports: Vec::new(),
                }));
                let (reports, mut rx) = tokio::sync::mpsc::channel(4096);
                let guard = RuleGuard {
                    netns: Some(netns),
                    policy: policy(pin),
                    audit: AuditHandle::new(log),
                    owners,
                    reports,
                    legacy_poll: Duration::from_secs(5),
                    legacy_check: Duration::from_secs(60),
                    cluster: None,
                };
                let task = tokio::spawn(guard.run_netlink(stop_rx));
                let mut ready = Some(ready_tx);
                let mut inspections = Vec::new();
                // The first incremental inspection follows the start-up read.
                while let Some(r) = rx.recv().await {
                    match &r {
                        GuardReport::Removed { stages, .. } => {
                            removals.lock().unwrap().push(*stages);
                        }
                        GuardReport::Dismissed { took } => dismissals.lock().unwrap().push(*took),
                        GuardReport::Inspected {
                            full_read: false,
                            took,
                            ..
                        } => inspections_seen.lock().unwrap().push(*took),
                        _ => {}
                    }
                    if let GuardReport::Inspected {
                        full_read: false,
                        took,
                        ..
                    } = r
                    {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        } else {
                            inspections.push(took);
                        }
                    }
                    if task.is_finished() {
                        break;
                    }
                }
                task.await.unwrap().expect("rule guard");
                if !inspections.is_empty() && !label.is_empty() {
                    println!(
                        "{label}_inspect_p50 {} us",
                        us(percentile(&inspections, 0.5))
                    );
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("rule guard ready");
        thread::sleep(Duration::from_millis(300));
        Self {
            stop,
            thread: Some(thread),
            audit,
            stages,
            dismissed,
            inspected,
        }
    }

    /// The stages of every removal so far.
    fn stages(&self) -> Vec<Stages> {
        self.stages.lock().unwrap().clone()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for f in portguard_tests::audit_files(&self.audit) {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Inserts the hijack `n` times, at spread offsets within `gap` after the
/// previous removal; each time waits for its removal (the `DELRULE`
/// notification). Each commit's instant, and the latency from just before it.
fn latencies(lab: &IncidentLab, n: usize, gap: Duration) -> Vec<(Instant, Duration)> {
    in_netns(lab.h.name(), move || {
        let mut mon = RulesetMonitor::open().expect("monitor");
        let mut writer = NftWriter::open().expect("writer");
        let mut tx = Transaction::new();
        tx.push(hijack_op());
        let mut out = Vec::with_capacity(n);
        let mut changes = Vec::new();
        for i in 0..n {
            // Spread the insertions over `gap` (golden-ratio steps): a poller's
            // phase must not line up with them.
            thread::sleep(gap.mul_f64((i as f64 * 0.618_034).fract()));
            let t0 = Instant::now();
            writer.commit(&tx).expect("insert the hijack");
            let mut handle = None;
            'wait: loop {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "the hijack was not removed"
                );
                let mut pfd = libc::pollfd {
                    fd: mon.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd we own.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                changes.clear();
                mon.drain(&mut changes).expect("monitor");
                for c in changes.drain(..) {
                    match c {
                        Change::RuleAdded { msg, .. } if msg.table == HIJACK_TABLE => {
                            handle = Some(msg.rule.handle);
                        }
                        Change::RuleDeleted(msg)
                            if msg.table == HIJACK_TABLE
                                && handle.is_none_or(|h| h == msg.rule.handle) =>
                        {
                            out.push((t0, t0.elapsed()));
                            break 'wait;
                        }
                        _ => {}
                    }
                }
            }
        }
        out
    })
    .expect("enter the namespace")
}

fn totals(v: &[(Instant, Duration)]) -> Vec<Duration> {
    v.iter().map(|(_, d)| *d).collect()
}

/// The kernel's part alone, with no guard running: the hijack committed,
/// then (as soon as its `NEWRULE` is read) its deletion committed from here,
/// until the `DELRULE` is read. Two commits and two notifications: on a
/// ruleset of many chains, each commit walks every chain of every table
/// (`nf_tables_commit`, step 2 in net/netfilter/nf_tables_api.c), so this is
/// the floor under any remover's latency.
fn kernel_floor(lab: &IncidentLab, n: usize) -> Vec<Duration> {
    in_netns(lab.h.name(), move || {
        let mut mon = RulesetMonitor::open().expect("monitor");
        let mut writer = NftWriter::open().expect("writer");
        let mut add = Transaction::new();
        add.push(hijack_op());
        let mut out = Vec::with_capacity(n);
        let mut changes = Vec::new();
        let mut wait = |mon: &mut RulesetMonitor, t0: Instant| loop {
            assert!(t0.elapsed() < Duration::from_secs(30), "no notification");
            let mut pfd = libc::pollfd {
                fd: mon.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            changes.clear();
            mon.drain(&mut changes).expect("monitor");
            for c in changes.drain(..) {
                match c {
                    Change::RuleAdded { msg, .. } if msg.table == HIJACK_TABLE => {
                        return Some(msg.rule.handle);
                    }
                    Change::RuleDeleted(msg) if msg.table == HIJACK_TABLE => return None,
                    _ => {}
                }
            }
        };
        for i in 0..n {
            thread::sleep(Duration::from_millis(10).mul_f64((i as f64 * 0.618_034).fract()));
            let t0 = Instant::now();
            writer.commit(&add).expect("insert the hijack");
            let handle = wait(&mut mon, t0).expect("its NEWRULE first");
            let mut del = Transaction::new();
            del.push(Op::DeleteRule {
                family: Family::IP,
                table: HIJACK_TABLE.into(),
                chain: HIJACK_CHAIN.into(),
                handle,
            });
            writer.commit(&del).expect("delete the hijack");
            assert_eq!(wait(&mut mon, t0), None, "then its DELRULE");
            out.push(t0.elapsed());
        }
        out
    })
    .expect("enter the namespace")
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// New connections at `rate`/s while the hijack is re-inserted every
/// [`HIJACK_INTERVAL`]; returns (answered by the owner, by anyone else or no one).
fn share(lab: &IncidentLab, rate: u32, duration: Duration) -> (u64, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (site, other) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (s, a, b) = (stop.clone(), site.clone(), other.clone());
    let client = lab.c.name().to_owned();
    let load = thread::spawn(move || {
        in_ns(&client, move || {
            let period = Duration::from_secs(1) / rate;
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                match ask_here(HOST4.parse().unwrap(), 80, Duration::from_millis(500)) {
                    Some(x) if x == SITE => a.fetch_add(1, Ordering::Relaxed),
                    _ => b.fetch_add(1, Ordering::Relaxed),
                };
                next += period;
                match next.checked_duration_since(Instant::now()) {
                    Some(d) => thread::sleep(d),
                    None => next = Instant::now(),
                }
            }
        })
    });
    let host = lab.h.name().to_owned();
    let hijacks = in_netns(&host, move || {
        let mut writer = NftWriter::open().expect("writer");
        let mut tx = Transaction::new();
        tx.push(hijack_op());
        let t0 = Instant::now();
        let mut n = 0;
        while t0.elapsed() < duration {
            if writer.commit(&tx).is_ok() {
                n += 1;
            }
            thread::sleep(HIJACK_INTERVAL);
        }
        n
    })
    .expect("enter the namespace");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    // Leave no hijack behind for the next phase.
    let _ = lab
        .h
        .command(["nft", "flush", "chain", "ip", HIJACK_TABLE, HIJACK_CHAIN])
        .status();
    (
        site.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
        hijacks,
    )
}

/// The baseline: every `interval`, read everything, inspect, delete (what a
/// cron-style checker does, at best).
struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Poller {
    fn start(lab: &IncidentLab, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns = lab.h.name().to_owned();
        let thread = thread::spawn(move || {
            in_netns(&ns, move || {
                let policy = policy(false);
                let mut writer = NftWriter::open().expect("writer");
                while !flag.load(Ordering::Relaxed) {
                    let (model, addrs) = nft::read_with_addrs(None).expect("read");
                    let input =
                        InspectInput::from_policy(&policy, OwnedTargets::docker_fallback(), addrs);
                    let rules: Vec<_> = decide(&model, &nft::inspect(&model, &input), &policy)
                        .into_iter()
                        .filter_map(|a| match a {
                            Action::Remove(r) => Some(r),
                            Action::Report { .. } => None,
                        })
                        .collect();
                    let _ = writer.commit(&removal_transaction(&rules));
                    let until = Instant::now() + interval;
                    while Instant::now() < until && !flag.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            })
            .expect("enter the namespace")
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// kube-proxy's iptables-mode nat chains, `rules` rules (8 per service), none
/// of them on the lab's host address (no standing hijack).
fn kube_proxy_rules(rules: usize) -> String {
    let services = rules / 8;
    let addr = |i: usize| {
        const NETS: [&str; 2] = ["192.0.2", "198.51.100"];
        format!("{}.{}", NETS[i % 2], 10 + (i / 2) % 240)
    };
    let mut s = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    for i in 0..services {
        let _ = write!(
            s,
            ":KUBE-SVC-{i:08X} - [0:0]\n:KUBE-EXT-{i:08X} - [0:0]\n:KUBE-SEP-{i:08X}A - [0:0]\n:KUBE-SEP-{i:08X}B - [0:0]\n"
        );
    }
    s += "-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
          -I OUTPUT 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
          -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n";
    for i in 0..services {
        let port = 1024 + (i % 60_000);
        let (vip, ep) = (addr(i), addr(i + 7));
        let _ = write!(
            s,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"ns/svc{i}:web cluster IP\" -m tcp --dport {port} -j KUBE-EXT-{i:08X}\n\
             -A KUBE-EXT-{i:08X} -j KUBE-SVC-{i:08X}\n\
             -A KUBE-SVC-{i:08X} -m comment --comment \"ns/svc{i}:web -> {ep}:{port}\" -m statistic --mode random --probability 0.5 -j KUBE-SEP-{i:08X}A\n\
             -A KUBE-SVC-{i:08X} -j KUBE-SEP-{i:08X}B\n\
             -A KUBE-SEP-{i:08X}A -s {ep}/32 -j KUBE-MARK-MASQ\n\
             -A KUBE-SEP-{i:08X}A -p tcp -m tcp -j DNAT --to-destination {ep}:{port}\n\
             -A KUBE-SEP-{i:08X}B -s {ep}/32 -j KUBE-MARK-MASQ\n\
             -A KUBE-SEP-{i:08X}B -p tcp -m tcp -j DNAT --to-destination {ep}:{port}\n"
        );
    }
    s += "COMMIT\n";
    s
}

/// Rule changes kube-proxy makes all day, against a running guard: a rule
/// added to one of the ~20,000 endpoint chains no protected port's connection
/// enters (dismissed, see `ReachedChains`), and for contrast the same rule
/// added to `KUBE-SERVICES` (which every probe walks: no port match, so a full
/// inspection). Each is a copy of an endpoint chain's `-s EP -j
/// KUBE-MARK-MASQ`, committed from here, one per batch. From the notification
/// to the guard's decision, p50 each.
fn unrelated_changes(lab: &IncidentLab, label: &str, services: usize) {
    const CHANGES: usize = 40;
    let model = in_netns(lab.h.name(), || nft::read_host_ruleset(None))
        .expect("enter")
        .expect("read");
    let nat = model
        .tables
        .iter()
        .find(|t| t.family == Family::IP && t.name == "nat")
        .expect("kube-proxy's nat table");
    let masq = nat
        .chain("KUBE-SEP-00000000A")
        .and_then(|c| c.rules.first())
        .and_then(|r| r.raw_exprs())
        .expect("an endpoint chain's first rule")
        .to_vec();
    let add = |chain: String| Op::AddRule {
        family: Family::IP,
        table: "nat".into(),
        chain,
        exprs: masq.clone(),
        userdata: None,
        compat_proto: None,
        placement: Placement::Append,
        summary: "kube-proxy-like".into(),
    };
    let unrelated: Vec<Op> = (0..CHANGES)
        .map(|i| {
            add(format!(
                "KUBE-SEP-{:08X}B",
                (1 + i * 7919) % services.max(2)
            ))
        })
        .collect();
    let walked: Vec<Op> = (0..CHANGES).map(|_| add("KUBE-SERVICES".into())).collect();
    let guard = Guard::start(lab, false, "");
    in_netns(lab.h.name(), move || {
        let mut writer = NftWriter::open().expect("writer");
        for op in unrelated.into_iter().chain(walked) {
            let mut tx = Transaction::new();
            tx.push(op);
            writer.commit(&tx).expect("add a kube-proxy-like rule");
            thread::sleep(Duration::from_millis(20));
        }
    })
    .expect("enter the namespace");
    thread::sleep(Duration::from_millis(300));
    let dismissed = guard.dismissed.lock().unwrap().clone();
    let inspected = guard.inspected.lock().unwrap().clone();
    drop(guard);
    println!(
        "{label}_unrelated_rule_dismissed {} changes",
        dismissed.len()
    );
    if !dismissed.is_empty() {
        println!(
            "{label}_unrelated_rule_p50 {} us",
            us(percentile(&dismissed, 0.5))
        );
    }
    println!(
        "{label}_walked_chain_rule_inspected {} changes",
        inspected.len()
    );
    if !inspected.is_empty() {
        println!(
            "{label}_walked_chain_rule_inspect_p50 {} us",
            us(percentile(&inspected, 0.5))
        );
    }
}

fn load_kube_rules(lab: &IncidentLab, rules: usize) {
    lab.h.iptables_restore(&kube_proxy_rules(rules), true);
}

/// Where the time of each hijack went: its removal's stages (the one whose
/// notification falls between the commit and the removal the bench saw), from
/// the commit to the acknowledgement, then on to the bench seeing the
/// `DELRULE`. p50 and p99 of each stage, one line each.
fn print_breakdown(label: &str, hijacks: &[(Instant, Duration)], stages: &[Stages]) {
    let mut per_stage: Vec<Vec<Duration>> = vec![Vec::new(); STAGE_NAMES.len() + 1];
    let mut matched = 0;
    for &(t0, total) in hijacks {
        let end = t0 + total;
        let Some(s) = stages
            .iter()
            .find(|s| s.notified.is_some_and(|n| n >= t0 && n <= end))
        else {
            continue;
        };
        let durations = s.durations(t0);
        let Some(acked) = s.acked else { continue };
        matched += 1;
        for (i, d) in durations.iter().enumerate() {
            if let Some(d) = d {
                per_stage[i].push(*d);
            }
        }
        per_stage[STAGE_NAMES.len()].push(end.saturating_duration_since(acked));
    }
    println!("{label}_stages_matched {matched} hijacks");
    let names = STAGE_NAMES.iter().copied().chain(["delrule_seen"]);
    for (name, v) in names.zip(&per_stage) {
        if v.is_empty() {
            continue;
        }
        println!("{label}_stage_{name}_p50 {} us", us(percentile(v, 0.50)));
        println!("{label}_stage_{name}_p99 {} us", us(percentile(v, 0.99)));
        println!("{label}_stage_{name}_max {} us", us(percentile(v, 1.0)));
    }
}

fn print_latencies(label: &str, v: &[Duration]) {
    println!("{label}_p50 {} us", us(percentile(v, 0.50)));
    println!("{label}_p99 {} us", us(percentile(v, 0.99)));
    println!("{label}_max {} us", us(percentile(v, 1.0)));
}

/// kube-proxy's default sync period: how often a fight brings the rule back.
const KUBE_PROXY_SYNC: Duration = Duration::from_secs(30);

fn print_share(label: &str, rate: u32, (site, other, hijacks): (u64, u64, u64)) {
    let total = site + other;
    println!("{label}_connections {total} connections");
    println!("{label}_hijacks {hijacks} hijacks");
    println!(
        "{label}_not_owner {:.3} %",
        100.0 * other as f64 / total.max(1) as f64
    );
    if label.starts_with("baseline") {
        // Hijacks overlap (a poller leaves each for up to a second): no
        // per-hijack figure.
        return;
    }
    // Traffic lost per hijack, as time at this connection rate; and the share
    // that implies when the rule comes back once per kube-proxy sync period.
    let lost_ms = 1000.0 * other as f64 / f64::from(rate) / hijacks.max(1) as f64;
    println!("{label}_lost_per_hijack {lost_ms:.3} ms");
    println!(
        "{label}_implied_not_owner_at_30s_returns {:.4} %",
        100.0 * lost_ms / 1000.0 / KUBE_PROXY_SYNC.as_secs_f64()
    );
}

fn main() {
    let args = parse_args();
    let lab = IncidentLab::new(false);
    lab.docker();
    sh(
        &lab.h,
        &format!(
            "nft add table ip {HIJACK_TABLE}
             nft 'add chain ip {HIJACK_TABLE} {HIJACK_CHAIN} {{ type nat hook prerouting priority -110; }}'"
        ),
    );
    assert_eq!(lab.ask(80).as_deref(), Some(SITE), "the lab works");

    // Event-driven, small ruleset.
    if !args.kube_only {
        print_latencies(
            "remediate_kernel_floor",
            &kernel_floor(&lab, args.insertions),
        );
        let guard = Guard::start(&lab, false, "remediate");
        let v = latencies(&lab, args.insertions, Duration::from_millis(10));
        println!("remediate_insertions {} hijacks", v.len());
        print_latencies("remediate_latency", &totals(&v));
        print_breakdown("remediate", &v, &guard.stages());
        print_share(
            &format!("remediate_share_{}per_s_nopin", args.rate),
            args.rate,
            share(&lab, args.rate, SHARE_DURATION),
        );
    }
    if !args.kube_only {
        let _guard = Guard::start(&lab, true, "");
        print_share(
            &format!("remediate_share_{}per_s_pin", args.rate),
            args.rate,
            share(&lab, args.rate, SHARE_DURATION),
        );
    }
    // Baseline: polling at 1 s.
    if !args.kube_only {
        let _poller = Poller::start(&lab, POLL_INTERVAL);
        thread::sleep(Duration::from_millis(200));
        let v = totals(&latencies(&lab, args.baseline_insertions, POLL_INTERVAL));
        print_latencies("baseline_poll_1s_latency", &v);
        print_share(
            &format!("baseline_poll_1s_share_{}per_s", args.rate),
            args.rate,
            share(&lab, args.rate, SHARE_DURATION),
        );
        let mean_s = v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len() as f64;
        let scale = INCIDENT_POLL.as_secs_f64() / POLL_INTERVAL.as_secs_f64();
        println!(
            "baseline_poll_60s_implied_mean_latency {:.1} s",
            mean_s * scale
        );
        println!(
            "baseline_poll_60s_implied_worst_latency {:.0} s",
            INCIDENT_POLL.as_secs_f64()
        );
        // A rule returning every 30 s and living its mean latency each time.
        println!(
            "baseline_poll_1s_implied_not_owner_at_30s_returns {:.2} %",
            100.0 * mean_s / KUBE_PROXY_SYNC.as_secs_f64()
        );
        println!(
            "baseline_poll_60s_implied_not_owner_at_30s_returns {:.0} %",
            (100.0 * mean_s * scale / KUBE_PROXY_SYNC.as_secs_f64()).min(100.0)
        );
    }
    // Event-driven with a kube-proxy-shaped ruleset loaded.
    if args.kube_rules > 0 {
        load_kube_rules(&lab, args.kube_rules);
        let rules = in_netns(lab.h.name(), || {
            nft::read_host_ruleset(None).map(|m| m.rule_count())
        })
        .expect("enter")
        .expect("read");
        println!("remediate_kube_ruleset {rules} rules");
        let label = format!("remediate_kube{}k", args.kube_rules / 1000);
        let floor = kernel_floor(&lab, args.insertions);
        let guard = Guard::start(&lab, false, "remediate_kube");
        let v = latencies(&lab, args.insertions, Duration::from_millis(10));
        let stages = guard.stages();
        drop(guard);
        print_latencies(&format!("{label}_latency"), &totals(&v));
        print_latencies(&format!("{label}_kernel_floor"), &floor);
        print_breakdown(&label, &v, &stages);
        unrelated_changes(&lab, &label, args.kube_rules / 8);
    }
}
