//! `portguard report`: what the audit trails of one host or a fleet say, for
//! people (table, HTML) and machines (JSON).
//!
//! [`Report::build`] is a pure function of the trails, the policy and the
//! clock; the renderers only lay it out. Every row names its host: the host
//! each record carries (hostname and machine id), or for records of older
//! agents, the log they came from.

mod html;
mod table;

use std::collections::{BTreeMap, BTreeSet};

pub use html::render_html;
use serde::Serialize;
pub use table::render_table;
use time::OffsetDateTime;

use crate::{
    audit::{AuditEvent, AuditRecord, AuditTrail, Committer, ForeignRuleRecord},
    policy::Policy,
    types::Proto,
};

/// One audit log and what was read from it.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// The log's path, for people; also the host name of records that carry none.
    pub log: &'a str,
    pub trail: &'a AuditTrail,
}

impl Source<'_> {
    /// The host a record of this log names.
    fn host_of(&self, r: &AuditRecord) -> String {
        r.host
            .as_ref()
            .map_or_else(|| self.log_name(), |h| h.label())
    }

    /// The log's file name: the host its records of older agents (or an
    /// empty log) stand for.
    fn log_name(&self) -> String {
        std::path::Path::new(self.log)
            .file_name()
            .map_or_else(|| self.log.to_owned(), |n| n.to_string_lossy().into_owned())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(with = "time::serde::rfc3339")]
    pub generated: OffsetDateTime,
    /// Start of the window the tallies cover.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// The logs read.
    pub logs: Vec<String>,
    /// Records in the window.
    pub records: usize,
    /// Lines that were not records, and sequence numbers missing: a healthy log has neither.
    pub unreadable_lines: usize,
    pub sequence_gaps: usize,
    /// Totals across every host.
    pub fleet: Fleet,
    /// One row per host.
    pub hosts: Vec<HostSummary>,
    pub hijacks: Vec<HijackRow>,
    /// Foreign rules that kept new connections from the owner's mapping
    /// without rewriting them (`owner_shadowed`), tallied like hijacks.
    pub shadows: Vec<HijackRow>,
    /// Every foreign rule removed: who committed it and how long it lived.
    pub removals: Vec<RemovalRow>,
    pub denials: Vec<DenialRow>,
    pub ports: Vec<PortState>,
    pub timeline: Timeline,
}

/// The whole fleet, in the window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Fleet {
    pub hosts: usize,
    /// Hosts where at least one hijack was detected.
    pub hosts_with_hijacks: usize,
    pub hijacks_detected: u64,
    pub hijacks_removed: u64,
    pub binds_denied: u64,
}

/// One host, in the window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostSummary {
    pub host: String,
    /// `/etc/machine-id`, when its records carry it.
    pub machine_id: String,
    pub logs: Vec<String>,
    pub records: usize,
    pub hijacks_detected: u64,
    pub hijacks_removed: u64,
    pub binds_denied: u64,
    pub unreadable_lines: usize,
    pub sequence_gaps: usize,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_record: Option<OffsetDateTime>,
}

/// One foreign rule removed (`rule_removed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemovalRow {
    pub host: String,
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    pub port: u16,
    pub proto: Proto,
    /// The classifier's guess from chain names (a hint).
    pub source: String,
    /// Who committed the rule, from the kernel (none when the agent did not
    /// see the commit).
    pub committer: Option<Committer>,
    /// From the commit to the removal, when the commit was seen.
    pub lifetime_ms: Option<i64>,
}

/// Hijacks blocked on one host and port, from one source, on one day (UTC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HijackRow {
    pub host: String,
    pub day: String,
    pub port: u16,
    pub proto: Proto,
    pub source: String,
    /// Distinct findings (a rule found and then removed counts once).
    pub detected: u64,
    pub removed: u64,
}

/// Binds denied to one process (by host, command and executable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DenialRow {
    pub host: String,
    pub comm: String,
    pub exe: Option<String>,
    pub ports: Vec<u16>,
    pub count: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub last: OffsetDateTime,
}

/// A protected port of one host now, as far as its trail tells.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortState {
    pub host: String,
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

/// A record and the host it names.
type Seen<'a> = (String, &'a AuditRecord);

impl Report {
    /// Tallies records at or after `since` (all when `None`); port states use
    /// each host's whole trail, since a pin installed last month is still
    /// installed.
    pub fn build(
        sources: &[Source<'_>],
        policy: &Policy,
        since: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Self {
        let all: Vec<Seen<'_>> = sources
            .iter()
            .flat_map(|s| s.trail.records.iter().map(move |r| (s.host_of(r), r)))
            .collect();
        let mut window: Vec<Seen<'_>> = all
            .iter()
            .filter(|(_, r)| since.is_none_or(|s| r.ts >= s))
            .cloned()
            .collect();
        window.sort_by_key(|(_, r)| r.ts);
        let hijacks = rule_rows(&window, false);
        let shadows = rule_rows(&window, true);
        let denials = denials(&window);
        let hosts = host_summaries(sources, &window, &hijacks, &denials);
        let fleet = Fleet {
            hosts: hosts.len(),
            hosts_with_hijacks: hosts.iter().filter(|h| h.hijacks_detected > 0).count(),
            hijacks_detected: hosts.iter().map(|h| h.hijacks_detected).sum(),
            hijacks_removed: hosts.iter().map(|h| h.hijacks_removed).sum(),
            binds_denied: hosts.iter().map(|h| h.binds_denied).sum(),
        };
        Self {
            generated: now,
            since,
            logs: sources.iter().map(|s| s.log.to_owned()).collect(),
            records: window.len(),
            unreadable_lines: sources.iter().map(|s| s.trail.unreadable.len()).sum(),
            sequence_gaps: sources.iter().map(|s| s.trail.gaps().len()).sum(),
            fleet,
            hijacks,
            shadows,
            removals: removals(&window),
            denials,
            ports: hosts
                .iter()
                .flat_map(|h| port_states(&h.host, &all, policy))
                .collect(),
            hosts,
            timeline: timeline(&window, since, now),
        }
    }
}

/// One row per host: its logs, machine id and tallies.
fn host_summaries(
    sources: &[Source<'_>],
    window: &[Seen<'_>],
    hijacks: &[HijackRow],
    denials: &[DenialRow],
) -> Vec<HostSummary> {
    let mut hosts: BTreeMap<String, HostSummary> = BTreeMap::new();
    for s in sources {
        // The hosts a log holds; a log of an older agent is the host it names.
        let mut named: BTreeSet<String> = s.trail.records.iter().map(|r| s.host_of(r)).collect();
        if named.is_empty() {
            named.insert(s.log_name());
        }
        for (i, host) in named.iter().enumerate() {
            let h = hosts.entry(host.clone()).or_insert_with(|| HostSummary {
                host: host.clone(),
                ..HostSummary::default()
            });
            h.logs.push(s.log.to_owned());
            // A log's damage is its first host's to report.
            if i == 0 {
                h.unreadable_lines += s.trail.unreadable.len();
                h.sequence_gaps += s.trail.gaps().len();
            }
            if let Some(id) = s
                .trail
                .records
                .iter()
                .filter(|r| s.host_of(r) == *host)
                .find_map(|r| r.host.as_ref().map(|h| h.machine_id.clone()))
            {
                h.machine_id = id;
            }
        }
    }
    for (host, r) in window {
        if let Some(h) = hosts.get_mut(host) {
            h.records += 1;
            h.last_record = h.last_record.max(Some(r.ts));
        }
    }
    for row in hijacks {
        if let Some(h) = hosts.get_mut(&row.host) {
            h.hijacks_detected += row.detected;
            h.hijacks_removed += row.removed;
        }
    }
    for d in denials {
        if let Some(h) = hosts.get_mut(&d.host) {
            h.binds_denied += d.count;
        }
    }
    hosts.into_values().collect()
}

/// Each `rule_removed`, with its committer and how long the rule lived.
fn removals(window: &[Seen<'_>]) -> Vec<RemovalRow> {
    window
        .iter()
        .filter_map(|(host, r)| {
            let AuditEvent::RuleRemoved(rule) = &r.event else {
                return None;
            };
            let committer = rule.committer.as_deref().cloned();
            let lifetime_ms = committer
                .as_ref()
                .and_then(|c| c.committed_at)
                .map(|at| (r.ts - at).whole_milliseconds().max(0) as i64);
            Some(RemovalRow {
                host: host.clone(),
                seq: r.seq,
                ts: r.ts,
                port: rule.port,
                proto: rule.proto,
                source: rule.source.clone(),
                committer,
                lifetime_ms,
            })
        })
        .collect()
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
fn rule_rows(window: &[Seen<'_>], shadows: bool) -> Vec<HijackRow> {
    type Key = (String, String, u16, Proto, String);
    let mut found: BTreeMap<Key, BTreeSet<&str>> = BTreeMap::new();
    let mut removed: BTreeMap<Key, u64> = BTreeMap::new();
    for (host, r) in window {
        let (rule, is_removal) = match &r.event {
            AuditEvent::RuleFound(rule) if !shadows => (rule, false),
            AuditEvent::OwnerShadowed(rule) if shadows => (rule, false),
            AuditEvent::RuleRemoved(rule) if removed_a_shadow(rule) == shadows => (rule, true),
            _ => continue,
        };
        let key = (
            host.clone(),
            day(r.ts),
            rule.port,
            rule.proto,
            rule.source.clone(),
        );
        found.entry(key.clone()).or_default().insert(&rule.finding);
        if is_removal {
            *removed.entry(key).or_default() += 1;
        }
    }
    found
        .into_iter()
        .map(|(key, findings)| HijackRow {
            removed: removed.get(&key).copied().unwrap_or(0),
            host: key.0,
            day: key.1,
            port: key.2,
            proto: key.3,
            source: key.4,
            detected: findings.len() as u64,
        })
        .collect()
}

fn denials(window: &[Seen<'_>]) -> Vec<DenialRow> {
    let mut rows: BTreeMap<(String, String, Option<String>), DenialRow> = BTreeMap::new();
    for (host, r) in window {
        let AuditEvent::BindDenied(b) = &r.event else {
            continue;
        };
        let row = rows
            .entry((host.clone(), b.comm.clone(), b.exe.clone()))
            .or_insert_with(|| DenialRow {
                host: host.clone(),
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
    rows.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.host.cmp(&b.host))
            .then_with(|| a.comm.cmp(&b.comm))
    });
    rows
}

fn port_states(host: &str, all: &[Seen<'_>], policy: &Policy) -> Vec<PortState> {
    let mut trail: Vec<&AuditRecord> = all
        .iter()
        .filter(|(h, _)| h == host)
        .map(|(_, r)| *r)
        .collect();
    trail.sort_by_key(|r| r.ts);
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
            for r in trail.iter().copied().filter(mine) {
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
                host: host.to_owned(),
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

fn timeline(window: &[Seen<'_>], since: Option<OffsetDateTime>, now: OffsetDateTime) -> Timeline {
    let first = window.first().map_or(now, |(_, r)| r.ts);
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
    for (_, r) in window {
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
        audit::{BindAttempt, ForeignRuleRecord, Host},
        policy::{DEFAULT_POLICY_TOML, PolicySource},
    };

    pub(crate) fn sample_trail() -> AuditTrail {
        let t0 = datetime!(2026-03-01 10:00 UTC);
        let mut records = Vec::new();
        let mut push = |mins: i64, event| {
            records.push(AuditRecord {
                seq: records.len() as u64 + 1,
                ts: t0 + Duration::minutes(mins),
                host: None,
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
            committer: None,
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

    fn one(trail: &AuditTrail) -> [Source<'_>; 1] {
        [Source {
            log: "/var/lib/portguard/audit.jsonl",
            trail,
        }]
    }

    /// The sample trail as host `name` wrote it.
    fn trail_of(name: &str, machine_id: &str) -> AuditTrail {
        let mut t = sample_trail();
        for r in &mut t.records {
            r.host = Some(Host {
                name: name.into(),
                machine_id: machine_id.into(),
            });
        }
        t
    }

    #[test]
    fn many_hosts_each_named_in_every_row_with_fleet_totals() {
        let now = datetime!(2026-03-02 12:00 UTC);
        let a = trail_of("edge-a", "aaaa");
        let mut b = trail_of("edge-b", "bbbb");
        // Host b has one hijack less, and lost a line.
        b.records.retain(|r| r.seq != 5);
        b.unreadable.push(crate::audit::UnreadableLine {
            file: "b.jsonl".into(),
            line: 9,
            error: "EOF".into(),
        });
        let sources = [
            Source {
                log: "logs/a.jsonl",
                trail: &a,
            },
            Source {
                log: "logs/b.jsonl",
                trail: &b,
            },
        ];
        let r = Report::build(&sources, &policy(), None, now);
        let hosts: Vec<(&str, &str, u64, u64, u64)> = r
            .hosts
            .iter()
            .map(|h| {
                (
                    h.host.as_str(),
                    h.machine_id.as_str(),
                    h.hijacks_detected,
                    h.hijacks_removed,
                    h.binds_denied,
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [("edge-a", "aaaa", 3, 2, 3), ("edge-b", "bbbb", 2, 2, 3)]
        );
        assert_eq!(r.hosts[1].unreadable_lines, 1);
        assert_eq!(r.hosts[1].sequence_gaps, 1, "seq 5 is missing on b");
        assert_eq!(
            r.fleet,
            Fleet {
                hosts: 2,
                hosts_with_hijacks: 2,
                hijacks_detected: 5,
                hijacks_removed: 4,
                binds_denied: 6,
            }
        );
        assert!(r.hijacks.iter().any(|h| h.host == "edge-a"));
        assert!(r.hijacks.iter().any(|h| h.host == "edge-b"));
        assert_eq!(r.ports.len(), 2 * policy().ports.len(), "each host's ports");
        assert!(r.denials.iter().all(|d| d.host.starts_with("edge-")));
        let table = render_table(&r);
        assert!(
            table.contains("Fleet: 2 host(s), 2 with hijacks; 5 hijack(s) detected"),
            "{table}"
        );
        assert!(
            table.contains("edge-b") && table.contains("bbbb"),
            "{table}"
        );
    }

    #[test]
    fn records_of_older_agents_are_named_by_their_log() {
        let now = datetime!(2026-03-02 12:00 UTC);
        let trail = sample_trail();
        let r = Report::build(&one(&trail), &policy(), None, now);
        assert_eq!(r.hosts.len(), 1);
        assert_eq!(r.hosts[0].host, "audit.jsonl");
        assert!(r.hijacks.iter().all(|h| h.host == "audit.jsonl"));
    }

    #[test]
    fn a_removal_names_its_committer_and_how_long_the_rule_lived() {
        let now = datetime!(2026-03-02 12:00 UTC);
        let mut trail = sample_trail();
        let removed_at = trail.records[2].ts;
        let AuditEvent::RuleRemoved(rule) = &mut trail.records[2].event else {
            panic!("the sample's third record is a removal")
        };
        rule.committer = Some(Box::new(Committer {
            pid: 812,
            name: "iptables-nft-re".into(),
            gone: true,
            parents: vec![crate::audit::ProcessRef {
                pid: 77,
                name: "k3s-server".into(),
                exe: Some("/usr/local/bin/k3s".into()),
            }],
            unit: Some("k3s.service".into()),
            committed_at: Some(removed_at - Duration::milliseconds(3)),
            ..Committer::default()
        }));
        let r = Report::build(&one(&trail), &policy(), None, now);
        assert_eq!(r.removals.len(), 2);
        let x = &r.removals[0];
        assert_eq!(x.lifetime_ms, Some(3));
        assert_eq!(
            x.committer.as_ref().unwrap().to_string(),
            "iptables-nft-re (pid 812, exited) via k3s-server (pid 77, /usr/local/bin/k3s), unit k3s.service"
        );
        assert_eq!(r.removals[1].committer, None, "not seen committed: unknown");
        let table = render_table(&r);
        assert!(
            table.contains("3 ms") && table.contains("unknown"),
            "{table}"
        );
    }

    #[test]
    fn tallies_hijacks_by_day_port_and_source() {
        let now = datetime!(2026-03-02 12:00 UTC);
        let trail = sample_trail();
        let r = Report::build(&one(&trail), &policy(), None, now);
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
        let trail = sample_trail();
        let r = Report::build(&one(&trail), &policy(), since, now);
        assert_eq!(r.hijacks.len(), 1);
        assert_eq!(r.records, 5);
        assert_eq!(r.ports[0].pin, "installed → 172.17.0.2:80");
    }
}
