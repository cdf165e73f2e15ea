//! `portguard report`: what the audit trail says, for people (table, HTML)
//! and machines (JSON).
//!
//! [`Report::build`] is a pure function of the trail, the policy and the
//! clock; the renderers only lay it out.

mod html;
mod table;

use std::collections::{BTreeMap, BTreeSet};

pub use html::render_html;
use serde::Serialize;
pub use table::render_table;
use time::OffsetDateTime;

use crate::{
    audit::{AuditEvent, AuditRecord, AuditTrail, ForeignRuleRecord},
    policy::Policy,
    types::Proto,
};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(with = "time::serde::rfc3339")]
    pub generated: OffsetDateTime,
    /// Start of the window the tallies cover.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    pub log: String,
    /// Records in the window.
    pub records: usize,
    /// Lines that were not records, and sequence numbers missing: a healthy log has neither.
    pub unreadable_lines: usize,
    pub sequence_gaps: usize,
    pub hijacks: Vec<HijackRow>,
    /// Foreign rules that kept new connections from the owner's mapping
    /// without rewriting them (`owner_shadowed`), tallied like hijacks.
    pub shadows: Vec<HijackRow>,
    pub denials: Vec<DenialRow>,
    pub ports: Vec<PortState>,
    pub timeline: Timeline,
}

/// Hijacks blocked on one port, from one source, on one day (UTC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HijackRow {
    pub day: String,
    pub port: u16,
    pub proto: Proto,
    pub source: String,
    /// Distinct findings (a rule found and then removed counts once).
    pub detected: u64,
    pub removed: u64,
}

/// Binds denied to one process (by command and executable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DenialRow {
    pub comm: String,
    pub exe: Option<String>,
    pub ports: Vec<u16>,
    pub count: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub last: OffsetDateTime,
}

/// A protected port now, as far as the trail tells.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortState {
    pub port: String,
    pub proto: Proto,
    pub owner: String,
    /// `installed → TARGET`, `removed`, `not installed`, or `off` (the policy wants none).
    pub pin: String,
    pub last_attempt: Option<Attempt>,
    /// `up`, `down: ERROR`, or none without a probe record.
    pub probe: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attempt {
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    pub what: String,
    pub by: String,
    pub seq: u64,
}

/// Attempts per time bucket, for the chart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Timeline {
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    pub bucket_seconds: i64,
    pub buckets: Vec<Bucket>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub binds_denied: u64,
    pub hijacks: u64,
}

impl Report {
    /// Tallies records at or after `since` (all when `None`); port states use
    /// the whole trail, since a pin installed last month is still installed.
    pub fn build(
        trail: &AuditTrail,
        policy: &Policy,
        log: &str,
        since: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Self {
        let window: Vec<&AuditRecord> = trail
            .records
            .iter()
            .filter(|r| since.is_none_or(|s| r.ts >= s))
            .collect();
        Self {
            generated: now,
            since,
            log: log.to_owned(),
            records: window.len(),
            unreadable_lines: trail.unreadable.len(),
            sequence_gaps: trail.gaps().len(),
            hijacks: rule_rows(&window, false),
            shadows: rule_rows(&window, true),
            denials: denials(&window),
            ports: port_states(trail, policy),
            timeline: timeline(&window, since, now),
        }
    }
}

fn day(ts: OffsetDateTime) -> String {
    let d = ts.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Whether a removal record is of a rule that shadowed the owner (its
/// recorded findings say `"kind": "shadow"`) rather than rewrote.
fn removed_a_shadow(rule: &ForeignRuleRecord) -> bool {
    rule.rule["findings"]
        .as_array()
        .is_some_and(|fs| fs.iter().any(|f| f["kind"] == "shadow"))
}

/// Foreign rules found and removed by day, port and source: hijacks, or
/// (`shadows`) rules that shadowed the owner's mapping.
fn rule_rows(window: &[&AuditRecord], shadows: bool) -> Vec<HijackRow> {
    type Key = (String, u16, Proto, String);
    let mut found: BTreeMap<Key, BTreeSet<&str>> = BTreeMap::new();
    let mut removed: BTreeMap<Key, u64> = BTreeMap::new();
    for r in window {
        let (rule, is_removal) = match &r.event {
            AuditEvent::RuleFound(rule) if !shadows => (rule, false),
            AuditEvent::OwnerShadowed(rule) if shadows => (rule, false),
            AuditEvent::RuleRemoved(rule) if removed_a_shadow(rule) == shadows => (rule, true),
            _ => continue,
        };
        let key = (day(r.ts), rule.port, rule.proto, rule.source.clone());
        found.entry(key.clone()).or_default().insert(&rule.finding);
        if is_removal {
            *removed.entry(key).or_default() += 1;
        }
    }
    found
        .into_iter()
        .map(|(key, findings)| HijackRow {
            removed: removed.get(&key).copied().unwrap_or(0),
            day: key.0,
            port: key.1,
            proto: key.2,
            source: key.3,
            detected: findings.len() as u64,
        })
        .collect()
}

fn denials(window: &[&AuditRecord]) -> Vec<DenialRow> {
    let mut rows: BTreeMap<(String, Option<String>), DenialRow> = BTreeMap::new();
    for r in window {
        let AuditEvent::BindDenied(b) = &r.event else {
            continue;
        };
        let row = rows
            .entry((b.comm.clone(), b.exe.clone()))
            .or_insert_with(|| DenialRow {
                comm: b.comm.clone(),
                exe: b.exe.clone(),
                ports: Vec::new(),
                count: 0,
                last: r.ts,
            });
        row.count += b.attempts();
        row.last = row.last.max(r.ts);
        if !row.ports.contains(&b.port) {
            row.ports.push(b.port);
            row.ports.sort_unstable();
        }
    }
    let mut rows: Vec<_> = rows.into_values().collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.comm.cmp(&b.comm)));
    rows
}

fn port_states(trail: &AuditTrail, policy: &Policy) -> Vec<PortState> {
    policy
        .ports
        .iter()
        .map(|entry| {
            let mine = |r: &&AuditRecord| {
                r.event
                    .port()
                    .is_some_and(|(p, proto)| proto == entry.proto && entry.port.contains(p))
            };
            let mut pin = if entry.pin { "not installed" } else { "off" }.to_owned();
            let mut last_attempt = None;
            let mut probe = None;
            for r in trail.records.iter().filter(mine) {
                match &r.event {
                    AuditEvent::PinInstalled { target, .. }
                    | AuditEvent::PinUpdated { target, .. } => {
                        pin = format!("installed → {target}")
                    }
                    AuditEvent::PinRemoved { .. } => pin = "removed".into(),
                    AuditEvent::BindDenied(b) => {
                        last_attempt = Some(Attempt {
                            ts: r.ts,
                            what: format!("bind denied on {}", b.port),
                            by: format!("{} (pid {})", b.comm, b.pid),
                            seq: r.seq,
                        });
                    }
                    AuditEvent::RuleFound(rule)
                    | AuditEvent::OwnerShadowed(rule)
                    | AuditEvent::RuleRemoved(rule) => {
                        last_attempt = Some(Attempt {
                            ts: r.ts,
                            what: format!("{} on {}", r.event.kind().replace('_', " "), rule.port),
                            by: rule.source.clone(),
                            seq: r.seq,
                        });
                    }
                    AuditEvent::ProbeFailed { error, .. } => probe = Some(format!("down: {error}")),
                    AuditEvent::ProbeRecovered { .. } => probe = Some("up".into()),
                    _ => {}
                }
            }
            PortState {
                port: entry.port.to_string(),
                proto: entry.proto,
                owner: entry
                    .owner
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                pin,
                last_attempt,
                probe,
            }
        })
        .collect()
}

/// Bucket sizes the chart picks from: at most 48 bars.
const BUCKETS: [i64; 8] = [60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400];
const MAX_BARS: i64 = 48;

fn timeline(
    window: &[&AuditRecord],
    since: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Timeline {
    let first = window.first().map_or(now, |r| r.ts);
    let start = since.unwrap_or(first).min(first);
    let span = (now - start).whole_seconds().max(1);
    let bucket_seconds = BUCKETS
        .into_iter()
        .find(|b| span / b < MAX_BARS)
        .unwrap_or(span / MAX_BARS + 1);
    // Align to the bucket so bars start on round times.
    let unix = start.unix_timestamp();
    let start = OffsetDateTime::from_unix_timestamp(unix - unix.rem_euclid(bucket_seconds))
        .expect("an aligned time is a valid time");
    let n = ((now - start).whole_seconds() / bucket_seconds + 1) as usize;
    let mut buckets = vec![Bucket::default(); n];
    let mut seen_findings = BTreeSet::new();
    for r in window {
        let i = ((r.ts - start).whole_seconds() / bucket_seconds).clamp(0, n as i64 - 1) as usize;
        match &r.event {
            AuditEvent::BindDenied(b) => buckets[i].binds_denied += b.attempts(),
            AuditEvent::RuleFound(rule)
            | AuditEvent::OwnerShadowed(rule)
            | AuditEvent::RuleRemoved(rule)
                if seen_findings.insert(rule.finding.as_str()) =>
            {
                buckets[i].hijacks += 1;
            }
            _ => {}
        }
    }
    Timeline {
        start,
        bucket_seconds,
        buckets,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::{Duration, macros::datetime};

    use super::*;
    use crate::{
        audit::{BindAttempt, ForeignRuleRecord},
        policy::{DEFAULT_POLICY_TOML, PolicySource},
    };

    pub(crate) fn sample_trail() -> AuditTrail {
        let t0 = datetime!(2026-03-01 10:00 UTC);
        let mut records = Vec::new();
        let mut push = |mins: i64, event| {
            records.push(AuditRecord {
                seq: records.len() as u64 + 1,
                ts: t0 + Duration::minutes(mins),
                event,
            });
        };
        let rule = |finding: &str, port| ForeignRuleRecord {
            finding: finding.into(),
            port,
            proto: Proto::Tcp,
            source: "kube-proxy".into(),
            location: None,
            rule: json!({"chain": "KUBE-SERVICES"}),
        };
        let bind = |comm: &str, port| {
            AuditEvent::BindDenied(BindAttempt {
                port,
                proto: Proto::Tcp,
                address: None,
                pid: 77,
                comm: comm.into(),
                exe: Some(format!("/usr/bin/{comm}")),
                cgroup: None,
                owner: None,
                repeats: 0,
            })
        };
        push(
            0,
            AuditEvent::PinInstalled {
                port: 80,
                proto: Proto::Tcp,
                target: "172.17.0.2:80".into(),
                rule: json!({}),
            },
        );
        push(5, AuditEvent::RuleFound(rule("f1", 80)));
        push(5, AuditEvent::RuleRemoved(rule("f1", 80)));
        push(30, AuditEvent::RuleRemoved(rule("f2", 443)));
        push(24 * 60 + 1, AuditEvent::RuleFound(rule("f3", 80)));
        push(24 * 60 + 2, bind("traefik", 443));
        push(24 * 60 + 3, bind("traefik", 80));
        push(24 * 60 + 4, bind("nginx", 80));
        push(
            24 * 60 + 5,
            AuditEvent::ProbeFailed {
                port: 443,
                proto: Proto::Tcp,
                url: "https://127.0.0.1/".into(),
                error: "status 404".into(),
                status: Some(404),
                finding: Some("f2".into()),
                finding_seq: Some(4),
            },
        );
        AuditTrail {
            records,
            unreadable: Vec::new(),
        }
    }

    fn policy() -> Policy {
        Policy::parse(DEFAULT_POLICY_TOML, PolicySource::Embedded).unwrap()
    }

    #[test]
    fn tallies_hijacks_by_day_port_and_source() {
        let now = datetime!(2026-03-02 12:00 UTC);
        let r = Report::build(&sample_trail(), &policy(), "audit.jsonl", None, now);
        let rows: Vec<_> = r
            .hijacks
            .iter()
            .map(|h| (h.day.as_str(), h.port, h.detected, h.removed))
            .collect();
        assert_eq!(
            rows,
            [
                ("2026-03-01", 80, 1, 1),
                ("2026-03-01", 443, 1, 1),
                ("2026-03-02", 80, 1, 0)
            ]
        );
        assert_eq!(r.denials[0].comm, "traefik");
        assert_eq!(r.denials[0].count, 2);
        assert_eq!(r.denials[0].ports, [80, 443]);
        assert_eq!(r.denials[1].comm, "nginx");
        let p80 = &r.ports[0];
        assert_eq!(p80.owner, "docker");
        assert_eq!(p80.pin, "installed → 172.17.0.2:80");
        assert_eq!(p80.last_attempt.as_ref().unwrap().by, "nginx (pid 77)");
        assert_eq!(r.ports[1].probe.as_deref(), Some("down: status 404"));
        let total: u64 = r.timeline.buckets.iter().map(|b| b.hijacks).sum();
        assert_eq!(total, 3, "f1 found and removed counts once");
        assert!(r.timeline.buckets.len() <= MAX_BARS as usize + 1);
    }

    #[test]
    fn since_limits_the_tallies_not_the_state() {
        let now = datetime!(2026-03-02 12:00 UTC);
        let since = Some(now - Duration::hours(12));
        let r = Report::build(&sample_trail(), &policy(), "audit.jsonl", since, now);
        assert_eq!(r.hijacks.len(), 1);
        assert_eq!(r.records, 5);
        assert_eq!(r.ports[0].pin, "installed → 172.17.0.2:80");
    }
}
