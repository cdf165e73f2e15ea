//! `portguard audit-selftest` (hidden): appends a burst of records and prints
//! each sequence number once it is durable. The crash test kills it mid-burst
//! and checks that every number printed is in the log, with no gap and no
//! torn line left after the next open.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use crate::{
    audit::{AuditEvent, AuditLog, BindAttempt, Rotation},
    policy::Proto,
};

#[derive(Debug, clap::Args)]
pub struct AuditSelftestArgs {
    /// The log to write.
    #[arg(long, value_name = "FILE")]
    pub log: PathBuf,
    /// How many records to append.
    #[arg(long, default_value_t = 1000)]
    pub burst: u64,
    /// Rotate past this many bytes.
    #[arg(long, default_value_t = Rotation::default().max_bytes)]
    pub rotate_bytes: u64,
    /// Rotated files to keep.
    #[arg(long, default_value_t = Rotation::default().keep)]
    pub keep: usize,
}

pub fn main(args: AuditSelftestArgs) -> anyhow::Result<ExitCode> {
    let rotation = Rotation {
        max_bytes: args.rotate_bytes,
        keep: args.keep,
    };
    let mut log = AuditLog::open(&args.log, rotation).context("opening the audit log")?;
    let mut out = std::io::stdout().lock();
    if let Some(t) = log.torn_tail() {
        writeln!(out, "torn {} {}", t.offset, t.bytes)?;
    }
    for i in 0..args.burst {
        let record = log.append(AuditEvent::BindDenied(BindAttempt {
            port: 80,
            proto: Proto::Tcp,
            address: None,
            pid: 1000 + (i % 1000) as u32,
            comm: "selftest".into(),
            exe: Some("/usr/bin/selftest".into()),
            cgroup: None,
            // Varying lengths make a torn write more likely to land mid-line.
            owner: Some("x".repeat((i % 97) as usize)),
            repeats: 0,
        }))?;
        // Reported done only after append returned: the record is durable.
        writeln!(out, "{}", record.seq)?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}
