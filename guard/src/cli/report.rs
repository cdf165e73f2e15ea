//! `portguard report [--since D] [--format table|json|html] [--output F]`.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use time::OffsetDateTime;

use super::PolicyArgs;
use crate::{
    audit::{AuditTrail, DEFAULT_AUDIT_PATH},
    policy::Policy,
    report::{Report, render_html, render_table},
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
    /// The audit log (rotated files next to it are read too).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_AUDIT_PATH, env = "PORTGUARD_AUDIT_LOG")]
    pub log: PathBuf,
}

pub fn main(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let (policy, _) = Policy::load(args.policy.config.as_deref())?;
    let trail = AuditTrail::read(&args.log)?;
    let now = OffsetDateTime::now_utc();
    let report = Report::build(
        &trail,
        &policy,
        &args.log.display().to_string(),
        args.since.map(|d| now - d),
        now,
    );
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
