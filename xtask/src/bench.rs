//! `cargo xtask bench …`: one line per figure, `name value unit`.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::Context as _;

use crate::{setup, sh};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// bind()+close() with the guard attached versus not (the programs alone,
    /// then the whole agent), and a bind storm.
    Bind,
    /// The nftables inspector on kube-proxy-shaped rulesets (1k, 10k, 40k rules,
    /// and a 50k-rule single chain): raw netlink dump versus full inspection.
    Inspect,
    /// Remediation: hijack insertion-to-removal latency (also with a 40k-rule
    /// kube-proxy ruleset), traffic share lost with and without the pin, and a
    /// 1 s polling baseline.
    Remediate,
    /// A running agent with nothing happening: wakeups (context switches) over
    /// 10 s, resident and peak memory.
    Idle,
}

pub fn bench(which: Which, baseline: Option<&Path>) -> anyhow::Result<()> {
    setup::setup()?;
    sh::require_root("the benchmarks")?;
    if let Some(bin) = baseline {
        anyhow::ensure!(
            !matches!(which, Which::Bind | Which::Idle),
            "--baseline is for `bench inspect` and `bench remediate`"
        );
        anyhow::ensure!(
            bin.is_file(),
            "--baseline {}: no such file (in a worktree of the other commit: `cargo build --release -p portguard --example bench_inspect` for inspect, `cargo build --release -p portguard-tests --bin bench_remediate` for remediate)",
            bin.display()
        );
    }
    match which {
        // Its whole-agent part runs this tree's release agent.
        Which::Bind => bench_bin("bench_bind", true),
        Which::Inspect => inspect(baseline),
        Which::Remediate => match baseline {
            None => bench_bin("bench_remediate", false),
            Some(base) => remediate_versus(base),
        },
        // The agent measured is this tree's release binary.
        Which::Idle => bench_bin("bench_idle", true),
    }
}

/// Runs the release benchmark binary `name` of the tests crate; `agent`:
/// it starts `portguard run`, so this tree's release agent is built first.
fn bench_bin(name: &str, agent: bool) -> anyhow::Result<()> {
    if agent {
        sh::cargo(&["build", "--quiet", "--release", "--package", "portguard"])?;
    }
    sh::cargo(&[
        "run",
        "--quiet",
        "--release",
        "--package",
        "portguard-tests",
        "--bin",
        name,
    ])
}

/// Runs of each `bench_remediate` in `--baseline` mode, alternating.
const REMEDIATE_BASELINE_RUNS: usize = 3;

/// This tree's `bench_remediate` against another commit's, alternating runs;
/// every figure in microseconds or percent: the median over the runs of each
/// side and their ratio (this tree / baseline).
fn remediate_versus(base: &Path) -> anyhow::Result<()> {
    sh::cargo(&[
        "build",
        "--release",
        "--package",
        "portguard-tests",
        "--bin",
        "bench_remediate",
    ])?;
    let ours = sh::workspace_root().join("target/release/bench_remediate");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..REMEDIATE_BASELINE_RUNS {
        a.push(run_figures(&mut Command::new(&ours))?);
        b.push(run_figures(&mut Command::new(base))?);
    }
    for Figure { name, unit, .. } in &a[0] {
        if !matches!(unit.as_str(), "us" | "%") {
            continue;
        }
        let (Some(x), Some(y)) = (median_figure(&a, name), median_figure(&b, name)) else {
            continue;
        };
        println!("{name} {x:.3} {unit}");
        println!("{name}_baseline {y:.3} {unit}");
        if y > 0.0 {
            println!("{name}_vs_baseline {:.2} ratio", x / y);
        }
    }
    Ok(())
}

/// Rules per generated service: the KUBE-SERVICES match, two in KUBE-SVC, two
/// per endpoint (masquerade mark + DNAT) for two endpoints, one in KUBE-EXT.
const RULES_PER_SERVICE: usize = 8;
const SIZES: [(&str, usize); 3] = [("1k", 1_000), ("10k", 10_000), ("40k", 40_000)];
const SINGLE_CHAIN_RULES: usize = 50_000;

fn inspect(baseline: Option<&Path>) -> anyhow::Result<()> {
    sh::require_root("bench inspect (it makes network namespaces)")?;
    sh::cargo(&[
        "build",
        "--release",
        "--package",
        "portguard",
        "--example",
        "bench_inspect",
    ])?;
    let bin = sh::workspace_root().join("target/release/examples/bench_inspect");
    for (label, rules) in SIZES {
        let ns = BenchNs::new(label)?;
        ns.load(&kube_proxy_rules(rules))?;
        match baseline {
            None => ns.measure(&bin, &format!("kube_{label}"), true)?,
            Some(base) => ns.versus(&bin, base, &format!("kube_{label}"))?,
        }
    }
    let ns = BenchNs::new("chain50k")?;
    ns.load(&single_chain(SINGLE_CHAIN_RULES))?;
    match baseline {
        None => ns.measure(&bin, "single_chain_50k", false)?,
        Some(base) => ns.versus(&bin, base, "single_chain_50k")?,
    }
    Ok(())
}

/// Runs of each binary in `--baseline` mode, alternating (this tree first),
/// so that a noisy neighbour hits both sides alike.
const BASELINE_RUNS: usize = 5;
/// The figures compared against the baseline (each a median of its run).
const COMPARED: [&str; 3] = ["raw_dump", "full", "analysis"];

/// One `name value unit` line of a benchmark's output.
struct Figure {
    name: String,
    value: f64,
    unit: String,
}

/// The figures of one benchmark run's output.
fn figures(stdout: &str) -> Vec<Figure> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (name, value) = (it.next()?, it.next()?.parse().ok()?);
            Some(Figure {
                name: name.to_owned(),
                value,
                unit: it.next().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// Runs a benchmark binary (its log to our stderr) and reads its figures.
fn run_figures(cmd: &mut Command) -> anyhow::Result<Vec<Figure>> {
    let what = format!("{:?}", cmd.get_program());
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| what.clone())?;
    anyhow::ensure!(out.status.success(), "{what} failed");
    Ok(figures(&String::from_utf8_lossy(&out.stdout)))
}

/// The median of figure `name` over runs; none when a run lacks it.
fn median_figure(runs: &[Vec<Figure>], name: &str) -> Option<f64> {
    let values: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.iter().find(|f| f.name == name).map(|f| f.value))
        .collect();
    (values.len() == runs.len()).then(|| median_of(values))
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A network namespace for one ruleset, deleted on drop (with its ruleset).
struct BenchNs(String);

impl BenchNs {
    fn new(label: &str) -> anyhow::Result<Self> {
        let name = format!("pg-bench-{label}-{}", std::process::id());
        sh::run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self(name);
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ns.exec(&[
            "ip", "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
        ])?;
        ns.exec(&["ip", "addr", "add", "198.51.100.1/24", "dev", "bench0"])?;
        ns.exec(&["ip", "link", "set", "bench0", "up"])?;
        Ok(ns)
    }

    fn exec(&self, argv: &[&str]) -> anyhow::Result<()> {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(argv)
            .status()?;
        anyhow::ensure!(status.success(), "{argv:?} failed in {}", self.0);
        Ok(())
    }

    fn load(&self, restore: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables-nft-restore"])
            .stdin(Stdio::piped())
            .spawn()
            .context("iptables-nft-restore")?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(restore.as_bytes())?;
        anyhow::ensure!(child.wait()?.success(), "iptables-nft-restore failed");
        Ok(())
    }

    fn measure(&self, bin: &Path, label: &str, with_nft_json: bool) -> anyhow::Result<()> {
        let status = Command::new(bin)
            .args(["--netns", &self.0, "--label", label])
            .status()
            .context("bench_inspect")?;
        anyhow::ensure!(status.success(), "bench_inspect failed");
        if with_nft_json {
            let t = Instant::now();
            let out = Command::new("ip")
                .args(["netns", "exec", &self.0, "nft", "-j", "list", "ruleset"])
                .stdout(Stdio::null())
                .status()?;
            anyhow::ensure!(out.success(), "nft -j list ruleset failed");
            println!(
                "inspect_{label}_nft_json_list {:.2} ms",
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        Ok(())
    }
}

impl BenchNs {
    /// One `bench_inspect` run; its figures.
    fn run(&self, bin: &Path, label: &str) -> anyhow::Result<Vec<Figure>> {
        run_figures(Command::new(bin).args(["--netns", &self.0, "--label", label]))
    }

    /// This tree's inspector against `base` on the same ruleset, interleaved:
    /// for each compared figure the median over the runs of each side, and
    /// their ratio (this tree / baseline).
    fn versus(&self, bin: &Path, base: &Path, label: &str) -> anyhow::Result<()> {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..BASELINE_RUNS {
            ours.push(self.run(bin, label)?);
            theirs.push(self.run(base, label)?);
        }
        let pick = |runs: &[Vec<Figure>], name: &str| {
            median_figure(runs, name).with_context(|| format!("figure {name} missing from a run"))
        };
        for what in COMPARED {
            let name = format!("inspect_{label}_{what}");
            let (a, b) = (pick(&ours, &name)?, pick(&theirs, &name)?);
            println!("{name} {a:.2} ms");
            println!("{name}_baseline {b:.2} ms");
            println!("{name}_vs_baseline {:.2} ratio", a / b);
        }
        Ok(())
    }
}

impl Drop for BenchNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Documentation-range addresses for service and endpoint IPs (ports make them unique).
fn doc_addr(i: usize) -> String {
    const NETS: [&str; 3] = ["192.0.2", "198.51.100", "203.0.113"];
    format!("{}.{}", NETS[i % 3], 2 + (i / 3) % 250)
}

/// kube-proxy's iptables-mode nat table, `rules` rules, plus Docker's chain and
/// one LoadBalancer service on the node address's port 443.
fn kube_proxy_rules(rules: usize) -> String {
    let services = rules / RULES_PER_SERVICE;
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :DOCKER - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for i in 0..services {
        let _ = write!(
            s,
            ":KUBE-SVC-{i:08X} - [0:0]\n:KUBE-EXT-{i:08X} - [0:0]\n:KUBE-SEP-{i:08X}A - [0:0]\n:KUBE-SEP-{i:08X}B - [0:0]\n"
        );
    }
    s += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
          -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
          -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
          -A DOCKER ! -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 203.0.113.250:80\n\
          -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n";
    for i in 0..services {
        let port = 1024 + (i % 60_000);
        let (vip, ep) = if i == 0 {
            ("198.51.100.1".to_owned(), "203.0.113.200".to_owned())
        } else {
            (doc_addr(i), doc_addr(i + 7))
        };
        let port = if i == 0 { 443 } else { port };
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
    s += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n";
    s
}

/// One nat chain of `rules` rules, every one a DNAT on its own address and port.
fn single_chain(rules: usize) -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:BIG - [0:0]\n\
         -A PREROUTING -j BIG\n",
    );
    for i in 0..rules {
        let port = 1024 + (i % 60_000);
        let _ = writeln!(
            s,
            "-A BIG -d {}/32 -p tcp -m tcp --dport {port} -j DNAT --to-destination {}:{port}",
            doc_addr(i),
            doc_addr(i + 11)
        );
    }
    s += "COMMIT\n";
    s
}
