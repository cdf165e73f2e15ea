//! The plain-text report: aligned columns, one section per question.

use std::fmt::Write as _;

use super::{HijackRow, Report, html::when};

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
        r.log, r.records
    );
    if r.unreadable_lines > 0 || r.sequence_gaps > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} unreadable line(s), {} missing sequence number(s)",
            r.unreadable_lines, r.sequence_gaps
        );
    }

    out.push_str("\nBlocked hijacks by port, source and day (UTC)\n");
    let rows: Vec<Vec<String>> = r.hijacks.iter().map(rule_row).collect();
    table(
        &mut out,
        &["DAY", "PORT", "SOURCE", "DETECTED", "REMOVED"],
        &rows,
    );

    if !r.shadows.is_empty() {
        out.push_str(
            "\nOwner mappings shadowed (a foreign accept/return/drop/goto ahead of the \
             owner's DNAT), by port, source and day (UTC)\n",
        );
        let rows: Vec<Vec<String>> = r.shadows.iter().map(rule_row).collect();
        table(
            &mut out,
            &["DAY", "PORT", "SOURCE", "DETECTED", "REMOVED"],
            &rows,
        );
    }

    out.push_str("\nBind denials by process\n");
    let rows: Vec<Vec<String>> = r
        .denials
        .iter()
        .map(|d| {
            vec![
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
        &["PROCESS", "EXECUTABLE", "PORTS", "DENIED", "LAST"],
        &rows,
    );

    out.push_str("\nProtected ports now\n");
    let rows: Vec<Vec<String>> = r
        .ports
        .iter()
        .map(|p| {
            vec![
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
        &["PORT", "OWNER", "PIN", "LAST ATTEMPT", "PROBE"],
        &rows,
    );
    out
}

fn rule_row(h: &HijackRow) -> Vec<String> {
    vec![
        h.day.clone(),
        format!("{}/{}", h.proto, h.port),
        h.source.clone(),
        h.detected.to_string(),
        h.removed.to_string(),
    ]
}
