//! `portguard check`: a one-shot audit of the NAT rules on protected ports.
//! Exit 0 clean, 1 findings, 2 error.

use std::{fmt::Write as _, process::ExitCode};

use anyhow::Context as _;

use super::PolicyArgs;
use crate::{
    nft::{self, Finding, InspectInput, OwnedTargets},
    owners::Owners,
    policy::Policy,
};

const EXIT_FINDINGS: u8 = 1;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Print `{"findings":[…]}` instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Inspect the network namespace /run/netns/NAME instead of this one.
    #[arg(long, hide = true, value_name = "NAME")]
    pub netns: Option<String>,
}

pub fn main(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let (policy, _source) = Policy::load(args.policy.config.as_deref())?;
    let (model, addrs) =
        nft::read_with_addrs(args.netns.as_deref()).context("reading the ruleset")?;
    let owned = if args.netns.is_some() {
        // Another namespace is not this host's Docker: recognise Docker's chain by shape.
        OwnedTargets::docker_fallback()
    } else {
        let model = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(Owners::new(policy.clone()).resolve_once());
        OwnedTargets::from_owners(&model)
    };
    let input = InspectInput::from_policy(&policy, owned, addrs);
    let findings = nft::inspect(&model, &input);
    for w in &model.warnings {
        eprintln!("portguard: warning: {w}");
    }
    if args.json {
        let doc = serde_json::json!({ "findings": findings, "warnings": model.warnings });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", table(&findings, model.rule_count()));
    }
    Ok(if findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FINDINGS)
    })
}

/// The table a person reads.
fn table(findings: &[Finding], rules: usize) -> String {
    let mut out = String::new();
    if findings.is_empty() {
        let _ = writeln!(
            out,
            "clean: no foreign NAT rule on a protected port ({rules} rules read)"
        );
        return out;
    }
    let rows: Vec<[String; 6]> = findings
        .iter()
        .map(|f| {
            [
                if f.active {
                    format!("ACTIVE ({})", join(&f.active_on))
                } else {
                    "latent".into()
                },
                f.kind.to_string(),
                format!("{}/{}", f.proto, f.port),
                format!(
                    "{} {} {} {}",
                    f.family,
                    f.table,
                    f.chain,
                    f.handle
                        .map_or_else(|| format!("#{}", f.position), |h| format!("handle {h}"))
                ),
                f.target.clone().unwrap_or_else(|| "?".into()),
                if f.evidence.is_empty() {
                    f.source.clone()
                } else {
                    format!("{} ({})", f.source, f.evidence.join("; "))
                },
            ]
        })
        .collect();
    let header = ["STATE", "KIND", "PORT", "RULE", "TARGET", "SOURCE"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        l
    };
    let _ = writeln!(out, "{}", line(&header));
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    let active = findings.iter().filter(|f| f.active).count();
    let _ = writeln!(
        out,
        "{} foreign rule(s) on protected ports: {active} active, {} latent",
        findings.len(),
        findings.len() - active
    );
    out
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
