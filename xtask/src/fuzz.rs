//! `cargo xtask fuzz`: the inspector's fuzz target (`fuzz/`) built with
//! libFuzzer's coverage instrumentation and run for a fixed time on several
//! workers, without cargo-fuzz (the flags are the ones cargo-fuzz passes).
//!
//! The corpus lives in `target/fuzz/corpus` (seeded from `fuzz/seeds`) and
//! grows from run to run; a crash is written to `target/fuzz/artifacts/` and
//! fails the command with the reproducer's path.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{setup, sh};

/// The one fuzz target (fuzz/Cargo.toml).
const TARGET: &str = "nft_decode_inspect";
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// Inputs longer than this are not tried: a dump of a few rules fits.
const MAX_LEN: &str = "4096";

/// The instrumentation cargo-fuzz asks rustc for (cargo-fuzz's `project.rs`).
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// One worker's result, read from libFuzzer's last line (`Done N runs in S second(s)`).
struct Worker {
    runs: u64,
    seconds: u64,
}

pub fn fuzz(seconds: u64, jobs: usize) -> anyhow::Result<()> {
    if seconds == 0 || jobs == 0 {
        bail!("--time and --jobs must be at least 1");
    }
    let root = sh::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let bin = build(&fuzz_dir)?;
    let out = root.join("target/fuzz");
    let corpus = out.join("corpus");
    let artifacts = out.join("artifacts");
    std::fs::create_dir_all(&corpus).context("creating target/fuzz/corpus")?;
    std::fs::create_dir_all(&artifacts).context("creating target/fuzz/artifacts")?;
    seed(&fuzz_dir.join("seeds"), &corpus)?;
    let before = crashes(&artifacts)?;

    eprintln!(
        "xtask: fuzzing {TARGET} for {seconds} s on {jobs} worker(s) ({} CPU-seconds); corpus {}",
        seconds * jobs as u64,
        corpus.display()
    );
    let started = Instant::now();
    let children = (0..jobs)
        .map(|i| {
            Command::new(&bin)
                .arg(&corpus)
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-max_len={MAX_LEN}"))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .arg(format!("-seed={}", 1 + i))
                .arg("-print_final_stats=1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut workers = Vec::new();
    let mut failed = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        let log = String::from_utf8_lossy(&out.stderr);
        match parse_done(&log) {
            Some(w) if out.status.success() => workers.push(w),
            _ => {
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("xtask: worker {i} ended with {}:", out.status);
                for line in tail.iter().rev() {
                    eprintln!("  {line}");
                }
                failed.push(i);
            }
        }
    }
    let runs: u64 = workers.iter().map(|w| w.runs).sum();
    let cpu: u64 = workers.iter().map(|w| w.seconds).sum();
    let new_crashes: Vec<PathBuf> = crashes(&artifacts)?
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    println!("fuzz_wall_seconds {} s", started.elapsed().as_secs());
    println!("fuzz_cpu_seconds {cpu} s");
    println!("fuzz_executions {runs} runs");
    println!("fuzz_corpus {} inputs", count(&corpus)?);
    println!("fuzz_crashes {} inputs", new_crashes.len());
    if !new_crashes.is_empty() || !failed.is_empty() {
        for c in &new_crashes {
            eprintln!(
                "xtask: crash reproducer {} (replay: {} {})",
                c.display(),
                bin.display(),
                c.display()
            );
        }
        bail!(
            "the fuzz target failed: {} new reproducer(s), worker(s) {failed:?} did not finish cleanly",
            new_crashes.len()
        );
    }
    Ok(())
}

/// Builds the instrumented target in the fuzz workspace and returns the binary.
fn build(fuzz_dir: &Path) -> anyhow::Result<PathBuf> {
    let toolchain = setup::ebpf_toolchain_name();
    sh::run(
        Command::new("rustup")
            .args([
                "run",
                toolchain,
                "cargo",
                "build",
                "--release",
                "--target",
                TRIPLE,
            ])
            .args(["--bin", TARGET])
            .current_dir(fuzz_dir)
            .env(
                format!(
                    "CARGO_TARGET_{}_RUSTFLAGS",
                    TRIPLE.to_uppercase().replace('-', "_")
                ),
                RUSTFLAGS,
            )
            // guard/build.rs builds the kernel programs unless told not to;
            // the fuzz target never loads them.
            .env("AYA_BUILD_SKIP", "1"),
    )
    .context("building the fuzz target")?;
    Ok(fuzz_dir
        .join("target")
        .join(TRIPLE)
        .join("release")
        .join(TARGET))
}

fn seed(seeds: &Path, corpus: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(seeds).with_context(|| format!("reading {}", seeds.display()))? {
        let entry = entry?;
        let to = corpus.join(entry.file_name());
        if !to.exists() {
            std::fs::copy(entry.path(), &to)
                .with_context(|| format!("copying seed {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn crashes(artifacts: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(artifacts)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

fn count(dir: &Path) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(dir)?.count())
}

/// libFuzzer ends a clean run with `Done 123 runs in 60 second(s)`.
fn parse_done(log: &str) -> Option<Worker> {
    let line = log.lines().rev().find(|l| l.starts_with("Done "))?;
    let mut words = line.split_whitespace();
    let runs = words.nth(1)?.parse().ok()?;
    let seconds = words.nth(2)?.parse().ok()?;
    Some(Worker { runs, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_last_line() {
        let log = "#1024 pulse cov: 10\nstat::number_of_executed_units: 5\nDone 4096 runs in 61 second(s)\n";
        let w = parse_done(log).expect("parsed");
        assert_eq!((w.runs, w.seconds), (4096, 61));
        assert!(parse_done("==1== ERROR: libFuzzer: deadly signal\n").is_none());
    }
}
