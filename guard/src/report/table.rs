//! The plain-text report: aligned columns, one section per question.

use std::fmt::Write as _;

use super::{
    HijackRow, Report,
    html::{lifetime, when},
};

/// Lays out rows under headers, columns as wide as their widest cell.
fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        out.push_str("  (none)\n");
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::from(" ");
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(s, " {cell:<w$}");
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(out, &mut headers.iter().copied());
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(out, &mut rule.iter().map(String::as_str));
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
}

pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    let window = r.since.map_or_else(
        || "all records".to_owned(),
        |s| format!("since {}", when(s)),
    );
    let _ = writeln!(
        out,
        "portguard report: {} ({window}, {} records)",
        r.logs.join(", "),
        r.records
    );
    if r.unreadable_lines > 0 || r.sequence_gaps > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} unreadable line(s), {} missing sequence number(s)",
            r.unreadable_lines, r.sequence_gaps
        );
    }
    let f = &r.fleet;
    let _ = writeln!(
        out,
        "Fleet: {} host(s), {} with hijacks; {} hijack(s) detected, {} foreign rule(s) removed, {} bind(s) denied",
        f.hosts, f.hosts_with_hijacks, f.hijacks_detected, f.hijacks_removed, f.binds_denied
    );

    out.push_str("\nHosts\n");
    let rows: Vec<Vec<String>> = r
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.host.clone(),
                if h.machine_id.is_empty() {
                    "-".into()
                } else {
                    h.machine_id.clone()
                },
                h.records.to_string(),
                h.hijacks_detected.to_string(),
                h.hijacks_removed.to_string(),
                h.binds_denied.to_string(),
                h.last_record.map_or_else(|| "-".into(), when),
                if h.unreadable_lines + h.sequence_gaps > 0 {
                    format!(
                        "{} unreadable, {} missing",
                        h.unreadable_lines, h.sequence_gaps
                    )
                } else {
                    "ok".into()
                },
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "HOST",
            "MACHINE ID",
            "RECORDS",
            "HIJACKS",
            "REMOVED",
            "DENIED",
            "LAST",
            "LOG",
        ],
        &rows,
    );

    out.push_str("\nBlocked hijacks by host, port, source and day (UTC)\n");
    let rows: Vec<Vec<String>> = r.hijacks.iter().map(rule_row).collect();
    table(
        &mut out,
        &["HOST", "DAY", "PORT", "SOURCE", "DETECTED", "REMOVED"],
        &rows,
    );

    if !r.shadows.is_empty() {
        out.push_str(
            "\nOwner mappings shadowed (a foreign accept/return/drop/goto ahead of the \
             owner's DNAT), by host, port, source and day (UTC)\n",
        );
        let rows: Vec<Vec<String>> = r.shadows.iter().map(rule_row).collect();
        table(
            &mut out,
            &["HOST", "DAY", "PORT", "SOURCE", "DETECTED", "REMOVED"],
            &rows,
        );
    }

    out.push_str("\nForeign rules removed: who committed them and how long they lived\n");
    let rows: Vec<Vec<String>> = r
        .removals
        .iter()
        .map(|x| {
            vec![
                x.host.clone(),
                format!("#{}", x.seq),
                when(x.ts),
                format!("{}/{}", x.proto, x.port),
                x.committer
                    .as_ref()
                    .map_or_else(|| "unknown".into(), ToString::to_string),
                x.lifetime_ms.map_or_else(|| "-".into(), lifetime),
                x.source.clone(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "HOST",
            "SEQ",
            "REMOVED",
            "PORT",
            "COMMITTED BY",
            "LIVED",
            "SOURCE (GUESS)",
        ],
        &rows,
    );

    out.push_str("\nBind denials by process\n");
    let rows: Vec<Vec<String>> = r
        .denials
        .iter()
        .map(|d| {
            vec![
                d.host.clone(),
                d.comm.clone(),
                d.exe.clone().unwrap_or_else(|| "-".into()),
                d.ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                d.count.to_string(),
                when(d.last),
            ]
        })
        .collect();
    table(
        &mut out,
        &["HOST", "PROCESS", "EXECUTABLE", "PORTS", "DENIED", "LAST"],
        &rows,
    );

    out.push_str("\nProtected ports now\n");
    let rows: Vec<Vec<String>> = r
        .ports
        .iter()
        .map(|p| {
            vec![
                p.host.clone(),
                format!("{}/{}", p.proto, p.port),
                p.owner.clone(),
                p.pin.clone(),
                p.last_attempt.as_ref().map_or_else(
                    || "-".into(),
                    |a| format!("#{} {} by {} at {}", a.seq, a.what, a.by, when(a.ts)),
                ),
                p.probe.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &mut out,
        &["HOST", "PORT", "OWNER", "PIN", "LAST ATTEMPT", "PROBE"],
        &rows,
    );
    out
}

fn rule_row(h: &HijackRow) -> Vec<String> {
    vec![
        h.host.clone(),
        h.day.clone(),
        format!("{}/{}", h.proto, h.port),
        h.source.clone(),
        h.detected.to_string(),
        h.removed.to_string(),
    ]
}
