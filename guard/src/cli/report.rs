//! `portguard report [--audit-log FILE|DIR]… [--since D] [--format table|json|html] [--output F]`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use time::OffsetDateTime;

use super::PolicyArgs;
use crate::{
    audit::{AuditTrail, DEFAULT_AUDIT_PATH},
    policy::Policy,
    report::{Report, Source, render_html, render_table},
    types::parse_duration,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Html,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Only records from the last DURATION: a whole number and a unit
    /// (ms, s, m or min, h, d, w), like 30m, 24h, 7d or 2w; the policy's
    /// probe intervals use the same units.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<std::time::Duration>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write here instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// An audit log (its rotated files `FILE.N` are read too), or a directory
    /// of them (every `*.jsonl` in it). Repeat it for the logs of many hosts,
    /// collected in one place: the report names each record's host and adds
    /// the fleet's totals.
    #[arg(
        long = "audit-log",
        visible_alias = "log",
        value_name = "FILE|DIR",
        default_value = DEFAULT_AUDIT_PATH,
        env = "PORTGUARD_AUDIT_LOG"
    )]
    pub logs: Vec<PathBuf>,
}

pub fn main(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let (policy, _) = Policy::load(args.policy.config.as_deref())?;
    let mut logs = Vec::new();
    for path in &args.logs {
        logs.extend(log_files(path)?);
    }
    let mut trails = Vec::with_capacity(logs.len());
    for log in &logs {
        trails.push((log.display().to_string(), AuditTrail::read(log)?));
    }
    let sources: Vec<Source<'_>> = trails
        .iter()
        .map(|(log, trail)| Source { log, trail })
        .collect();
    let now = OffsetDateTime::now_utc();
    let report = Report::build(&sources, &policy, args.since.map(|d| now - d), now);
    let text = match args.format {
        Format::Table => render_table(&report),
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Html => render_html(&report),
    };
    match &args.output {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The logs a `--audit-log` names: the file itself, or every `*.jsonl` in a
/// directory (sorted; their rotated files come with them). A directory with
/// none is an error: a report of nothing would look like a clean fleet.
fn log_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading the directory {}", path.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "{}: no audit log (*.jsonl) in this directory",
        path.display()
    );
    Ok(files)
}
