//! The HTML report: one self-contained file (inline CSS and SVG, no scripts,
//! no fetches) that opens anywhere, including on an air-gapped host.

use std::fmt::Write as _;

use time::{Duration, OffsetDateTime};

use super::{HijackRow, Report, Timeline};

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A rule's lifetime for people: `850 ms`, `4.2 s`, `3 min 5 s`, `2 h 10 min`.
pub(super) fn lifetime(ms: i64) -> String {
    match ms {
        ..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

pub(super) fn when(ts: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        ts.year(),
        u8::from(ts.month()),
        ts.day(),
        ts.hour(),
        ts.minute(),
        ts.second()
    )
}

const STYLE: &str = r#"
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;margin:2rem;color:#1b1f24;background:#fff}
h1{font-size:1.6rem;margin:0 0 .2rem}
h2{font-size:1.15rem;margin:2rem 0 .6rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.meta{color:#57606a;font-size:.9rem}
.warn{background:#fff4e5;border:1px solid #f0a020;padding:.5rem .8rem;border-radius:4px}
.cards{display:flex;gap:1rem;margin:1.2rem 0}
.card{border:1px solid #d0d7de;border-radius:6px;padding:.7rem 1.1rem;min-width:9rem}
.card b{display:block;font-size:1.7rem}
.card span{color:#57606a;font-size:.85rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.none{color:#57606a;font-style:italic}
.down{color:#b42318;font-weight:600}
.up{color:#1a7f37;font-weight:600}
svg text{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif}
"#;

const HIJACK: &str = "#d9480f";
const DENIED: &str = "#1c64b0";

pub fn render_html(r: &Report) -> String {
    let mut h = String::new();
    let window = r.since.map_or_else(
        || "all records".to_owned(),
        |s| format!("since {}", when(s)),
    );
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>portguard report</title><style>{STYLE}</style></head><body>\n\
         <h1>portguard report</h1>\n<p class=\"meta\">{} &middot; {window} &middot; generated {}</p>\n",
        esc(&r.logs.join(", ")),
        when(r.generated)
    );
    if r.unreadable_lines > 0 || r.sequence_gaps > 0 {
        let _ = writeln!(
            h,
            "<p class=\"warn\">The log has {} unreadable line(s) and {} missing sequence number(s).</p>",
            r.unreadable_lines, r.sequence_gaps
        );
    }
    let f = &r.fleet;
    let _ = writeln!(
        h,
        "<div class=\"cards\">\
         <div class=\"card\"><b>{}</b><span>hosts ({} with hijacks)</span></div>\
         <div class=\"card\"><b>{}</b><span>hijacks detected</span></div>\
         <div class=\"card\"><b>{}</b><span>foreign rules removed</span></div>\
         <div class=\"card\"><b>{}</b><span>binds denied</span></div>\
         <div class=\"card\"><b>{}</b><span>records</span></div></div>",
        f.hosts,
        f.hosts_with_hijacks,
        f.hijacks_detected,
        f.hijacks_removed,
        f.binds_denied,
        r.records
    );

    h.push_str("<h2>Hosts</h2>\n");
    let rows: Vec<String> = r
        .hosts
        .iter()
        .map(|x| {
            let health = if x.unreadable_lines + x.sequence_gaps > 0 {
                format!(
                    "<span class=\"down\">{} unreadable, {} missing</span>",
                    x.unreadable_lines, x.sequence_gaps
                )
            } else {
                "<span class=\"up\">ok</span>".to_owned()
            };
            format!(
                "<tr><td>{}</td><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{health}</td></tr>",
                esc(&x.host),
                esc(&x.machine_id),
                x.records,
                x.hijacks_detected,
                x.hijacks_removed,
                x.binds_denied,
                x.last_record.map_or_else(|| "-".into(), when)
            )
        })
        .collect();
    table(
        &mut h,
        &[
            "Host",
            "Machine id",
            "Records",
            "Hijacks",
            "Removed",
            "Denied",
            "Last record",
            "Log",
        ],
        &rows,
    );

    h.push_str("<h2>Attempts over time</h2>\n");
    h.push_str(&timeline_svg(&r.timeline));

    h.push_str("<h2>Blocked hijacks by host, port, source and day (UTC)</h2>\n");
    let rows: Vec<String> = r.hijacks.iter().map(rule_row).collect();
    table(
        &mut h,
        &["Host", "Day", "Port", "Source", "Detected", "Removed"],
        &rows,
    );
    if !r.shadows.is_empty() {
        h.push_str(
            "<h2>Owner mappings shadowed by port, source and day (UTC)</h2>\n\
             <p>Foreign rules that took new connections away before the owner's DNAT \
             (accept, return, drop or goto ahead of it): nothing rewritten, the port dead.</p>\n",
        );
        let rows: Vec<String> = r.shadows.iter().map(rule_row).collect();
        table(
            &mut h,
            &["Host", "Day", "Port", "Source", "Detected", "Removed"],
            &rows,
        );
    }

    h.push_str(
        "<h2>Foreign rules removed</h2>\n<p>Who committed each rule, as the kernel \
         named the committing process, and how long the rule lived.</p>\n",
    );
    let rows: Vec<String> = r
        .removals
        .iter()
        .map(|x| {
            format!(
                "<tr><td>{}</td><td class=\"n\">#{}</td><td>{}</td><td>{}/{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td>{}</td></tr>",
                esc(&x.host),
                x.seq,
                when(x.ts),
                x.proto,
                x.port,
                x.committer.as_ref().map_or_else(
                    || "<span class=\"none\">unknown</span>".to_owned(),
                    |c| esc(&c.to_string())
                ),
                x.lifetime_ms.map_or_else(|| "-".into(), lifetime),
                esc(&x.source)
            )
        })
        .collect();
    table(
        &mut h,
        &[
            "Host",
            "Seq",
            "Removed",
            "Port",
            "Committed by",
            "Lived",
            "Source (guess)",
        ],
        &rows,
    );

    h.push_str("<h2>Bind denials by process</h2>\n");
    let rows: Vec<String> = r
        .denials
        .iter()
        .map(|d| {
            let ports: Vec<String> = d.ports.iter().map(ToString::to_string).collect();
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                esc(&d.host),
                esc(&d.comm),
                esc(d.exe.as_deref().unwrap_or("-")),
                ports.join(", "),
                d.count,
                when(d.last)
            )
        })
        .collect();
    table(
        &mut h,
        &["Host", "Process", "Executable", "Ports", "Denied", "Last"],
        &rows,
    );

    h.push_str("<h2>Protected ports now</h2>\n");
    let rows: Vec<String> = r
        .ports
        .iter()
        .map(|p| {
            let attempt = p.last_attempt.as_ref().map_or_else(
                || "<span class=\"none\">none</span>".to_owned(),
                |a| {
                    format!(
                        "#{} {} by {}<br><span class=\"meta\">{}</span>",
                        a.seq,
                        esc(&a.what),
                        esc(&a.by),
                        when(a.ts)
                    )
                },
            );
            let probe = match p.probe.as_deref() {
                None => "<span class=\"none\">no probe</span>".to_owned(),
                Some("up") => "<span class=\"up\">up</span>".to_owned(),
                Some(s) => format!("<span class=\"down\">{}</span>", esc(s)),
            };
            format!(
                "<tr><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td>{attempt}</td><td>{probe}</td></tr>",
                esc(&p.host),
                p.proto,
                esc(&p.port),
                esc(&p.owner),
                esc(&p.pin)
            )
        })
        .collect();
    table(
        &mut h,
        &["Host", "Port", "Owner", "Pin", "Last attempt", "Probe"],
        &rows,
    );
    h.push_str("</body></html>\n");
    h
}

fn table(h: &mut String, headers: &[&str], rows: &[String]) {
    if rows.is_empty() {
        h.push_str("<p class=\"none\">None.</p>\n");
        return;
    }
    h.push_str("<table><thead><tr>");
    for head in headers {
        let _ = write!(h, "<th>{head}</th>");
    }
    h.push_str("</tr></thead><tbody>\n");
    for row in rows {
        h.push_str(row);
        h.push('\n');
    }
    h.push_str("</tbody></table>\n");
}

/// A stacked bar chart: hijacks over binds denied, per bucket.
fn timeline_svg(t: &Timeline) -> String {
    const W: f64 = 1100.0;
    const H: f64 = 300.0;
    const LEFT: f64 = 50.0;
    const RIGHT: f64 = 15.0;
    const TOP: f64 = 30.0;
    const BOTTOM: f64 = 45.0;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let max = t
        .buckets
        .iter()
        .map(|b| b.binds_denied + b.hijacks)
        .max()
        .unwrap_or(0)
        .max(1);
    // Whole-number ticks at a round step (1, 2, 5 × 10^k), at most five of them.
    let step = {
        let mut magnitude = 1u64;
        loop {
            if let Some(s) = [1, 2, 5]
                .iter()
                .map(|m| m * magnitude)
                .find(|s| max.div_ceil(*s) <= 5)
            {
                break s;
            }
            magnitude *= 10;
        }
    };
    let ticks = max.div_ceil(step);
    let top = ticks * step;
    let y = |v: f64| TOP + plot_h - v / top as f64 * plot_h;
    let n = t.buckets.len().max(1);
    let slot = plot_w / n as f64;
    let bar = (slot * 0.8).max(1.0);

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"100%\" role=\"img\" \
         aria-label=\"Attempts over time\">"
    );
    // Legend.
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"6\" width=\"12\" height=\"12\" fill=\"{HIJACK}\"/>\
         <text x=\"{}\" y=\"16\" font-size=\"12\">hijacks (foreign NAT rules)</text>\
         <rect x=\"{}\" y=\"6\" width=\"12\" height=\"12\" fill=\"{DENIED}\"/>\
         <text x=\"{}\" y=\"16\" font-size=\"12\">binds denied</text>",
        LEFT + 18.0,
        LEFT + 210.0,
        LEFT + 228.0
    );
    // Grid and y labels.
    for i in 0..=ticks {
        let v = (i * step) as f64;
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eaeef2\"/>\
             <text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#57606a\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            i * step
        );
    }
    let label = |i: usize| {
        let ts = t.start + Duration::seconds(t.bucket_seconds * i as i64);
        if t.bucket_seconds >= 86400 {
            format!("{:02}-{:02}", u8::from(ts.month()), ts.day())
        } else {
            format!(
                "{:02}-{:02} {:02}:{:02}",
                u8::from(ts.month()),
                ts.day(),
                ts.hour(),
                ts.minute()
            )
        }
    };
    for (i, b) in t.buckets.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        let title = format!(
            "{}: {} hijack(s), {} bind(s) denied",
            label(i),
            b.hijacks,
            b.binds_denied
        );
        let d_top = y(b.binds_denied as f64);
        let h_top = y((b.binds_denied + b.hijacks) as f64);
        let _ = write!(s, "<g><title>{}</title>", esc(&title));
        if b.binds_denied > 0 {
            let _ = write!(
                s,
                "<rect x=\"{x:.1}\" y=\"{d_top:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"{DENIED}\"/>",
                TOP + plot_h - d_top
            );
        }
        if b.hijacks > 0 {
            let _ = write!(
                s,
                "<rect x=\"{x:.1}\" y=\"{h_top:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"{HIJACK}\"/>",
                d_top - h_top
            );
        }
        s.push_str("</g>\n");
    }
    // X axis with at most 8 labels.
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#8c959f\"/>",
        W - RIGHT,
        TOP + plot_h,
        TOP + plot_h
    );
    let every = n.div_ceil(8).max(1);
    for i in (0..n).step_by(every) {
        let x = LEFT + slot * i as f64 + slot / 2.0;
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#57606a\">{}</text>",
            TOP + plot_h + 16.0,
            label(i)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\" fill=\"#57606a\">one bar = {} (UTC)</text>",
        W - RIGHT,
        H - 6.0,
        bucket_name(t.bucket_seconds)
    );
    s.push_str("</svg>\n");
    s
}

fn bucket_name(seconds: i64) -> String {
    match seconds {
        s if s % 86400 == 0 => format!("{} day(s)", s / 86400),
        s if s % 3600 == 0 => format!("{} hour(s)", s / 3600),
        s if s % 60 == 0 => format!("{} minute(s)", s / 60),
        s => format!("{s} s"),
    }
}

fn rule_row(x: &HijackRow) -> String {
    format!(
        "<tr><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
        esc(&x.host),
        esc(&x.day),
        x.proto,
        x.port,
        esc(&x.source),
        x.detected,
        x.removed
    )
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::policy::{DEFAULT_POLICY_TOML, Policy, PolicySource};

    #[test]
    fn html_is_self_contained_and_escaped() {
        let mut trail = crate::report::tests::sample_trail();
        if let crate::audit::AuditEvent::BindDenied(b) = &mut trail.records[5].event {
            b.comm = "<script>x</script>".into();
        }
        let policy = Policy::parse(DEFAULT_POLICY_TOML, PolicySource::Embedded).unwrap();
        let r = Report::build(
            &[crate::report::Source {
                log: "audit.jsonl",
                trail: &trail,
            }],
            &policy,
            None,
            datetime!(2026-03-02 12:00 UTC),
        );
        let html = render_html(&r);
        assert!(html.contains("<svg"));
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(
            !html.contains("<script"),
            "no scripts, and names are escaped"
        );
        for fetch in ["src=", "href=", "url(", "@import"] {
            assert!(!html.contains(fetch), "{fetch} would fetch something");
        }
        assert!(html.contains("installed → 172.17.0.2:80"));
    }
}
