//! Developer automation: `cargo xtask setup|run|lint|test|deb|bench|fuzz`.
//!
//! Everything a fresh machine needs is installed here, never by hand.

mod bench;
mod dockerd;
mod fuzz;
mod lint;
mod setup;
mod sh;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and benchmark portguard"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what is missing: apt packages, rust-src, bpf-linker (idempotent).
    Setup,
    /// Set up if needed, build release and run `portguard ARGS` as root
    /// (no ARGS: the agent in the foreground with the built-in policy).
    Run {
        /// Arguments for portguard, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Formatting and clippy (warnings are errors), the kernel crate included.
    Lint,
    /// Set up if needed, lint, start the services the tests need, run every test.
    Test {
        /// Only tests whose name contains this (passed to the test harness).
        filter: Option<String>,
    },
    /// Set up if needed and build the Debian package (target/debian/portguard_*.deb).
    Deb,
    /// Benchmarks, one line per figure: `name value unit`.
    Bench {
        #[arg(value_enum)]
        which: bench::Which,
        /// `inspect` and `remediate`: the same benchmark built from another
        /// commit, run alternately with this tree's (inspect: on the same
        /// namespaces); each figure gets a `_vs_baseline` ratio (above 1: this
        /// tree is slower). Build it in a worktree of that commit: `cargo build
        /// --release -p portguard --example bench_inspect` (target/release/examples/)
        /// or `cargo build --release -p portguard-tests --bin bench_remediate`.
        #[arg(long, value_name = "BIN")]
        baseline: Option<std::path::PathBuf>,
    },
    /// Fuzz the nftables inspector (decoder, legacy parser, analysis) with
    /// libFuzzer for a fixed time; prints `name value unit` figures and fails on
    /// a crash, naming the reproducer in target/fuzz/artifacts/. The corpus in
    /// target/fuzz/corpus grows from run to run. CPU time = --time × --jobs.
    Fuzz {
        /// How long each worker fuzzes, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        time: u64,
        /// Workers run side by side on one shared corpus.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Run { args } => run(args),
        Command::Lint => lint::lint(),
        Command::Test { filter } => test::test(filter.as_deref()),
        Command::Deb => deb().map(|_| ()),
        Command::Bench { which, baseline } => bench::bench(which, baseline.as_deref()),
        Command::Fuzz { time, jobs } => fuzz::fuzz(time, jobs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> anyhow::Result<()> {
    setup::setup()?;
    sh::cargo(&["build", "--release", "--package", "portguard"])?;
    let bin = sh::workspace_root().join("target/release/portguard");
    let args = if args.is_empty() {
        vec!["run".to_owned()]
    } else {
        args
    };
    sh::require_root("cargo xtask run")?;
    eprintln!("xtask: running {} {}", bin.display(), args.join(" "));
    let status = std::process::Command::new(&bin).args(&args).status()?;
    anyhow::ensure!(status.success(), "portguard exited with {status}");
    Ok(())
}

/// Builds the .deb (release binary, unit, default policy, README) and returns its path.
pub fn deb() -> anyhow::Result<std::path::PathBuf> {
    setup::setup()?;
    let out = sh::workspace_root().join("target/debian");
    sh::cargo(&[
        "deb",
        "--package",
        "portguard",
        "--output",
        out.to_str().expect("UTF-8 path"),
    ])?;
    let newest = std::fs::read_dir(&out)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path());
    let deb =
        newest.ok_or_else(|| anyhow::anyhow!("cargo deb wrote no .deb to {}", out.display()))?;
    eprintln!("xtask: built {}", deb.display());
    Ok(deb)
}
