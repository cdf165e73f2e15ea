//! Bind records without a flood: the first bind of its kind in a window is
//! written at once, the rest of the window is counted and written as one
//! record carrying the count (`repeats`).
//!
//! The cgroup bind hook runs before the kernel's privilege check, so any
//! unprivileged user looping `bind(80)` produces a denial per call. Written
//! one by one (each with an fdatasync), they would cost a disk write per call
//! and rotate away the `rule_removed` and manifest records `restore` needs.
//! Aggregated, a loop costs at most two records per window per kind of
//! attempt, and the number of kinds tracked is bounded too (beyond it,
//! attempts on a port are counted under one catch-all kind per port).
//!
//! A kind is what a reader tells attempts apart by: the verdict, port and
//! protocol, and who, as the kernel reported it (command name and cgroup).
//! The process id is not part of it (a loop forks), nor the executable: it is
//! read from `/proc` after the fact and missing for a process already gone,
//! which would split one loop into two kinds. A summary names the latest
//! attempt, with the last executable that could be read.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::record::{AuditEvent, BindAttempt};
use crate::policy::Proto;

/// How long attempts of one kind are counted before their summary is written.
pub const BIND_WINDOW: Duration = Duration::from_secs(10);
/// Kinds of attempts tracked at once; beyond, a catch-all kind per port.
pub const MAX_BIND_KINDS: usize = 1024;
/// The command name of the catch-all kind (no process has it: `comm` is at
/// most 15 bytes and `*` alone is never one).
pub const CATCH_ALL_COMM: &str = "*";

/// What a reader tells bind attempts apart by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Kind {
    denied: bool,
    port: u16,
    proto: Proto,
    comm: String,
    cgroup: Option<String>,
}

/// One kind's current window.
#[derive(Debug)]
struct Window {
    started: Instant,
    /// Attempts since the record written at the window's start.
    repeats: u64,
    /// The latest attempt (its pid and address go into the summary).
    last: BindAttempt,
}

/// Bind records in, at most two records per kind and window out.
#[derive(Debug)]
pub struct BindAggregator {
    window: Duration,
    max_kinds: usize,
    kinds: HashMap<Kind, Window>,
}

impl Default for BindAggregator {
    fn default() -> Self {
        Self::new(BIND_WINDOW, MAX_BIND_KINDS)
    }
}

impl BindAggregator {
    pub fn new(window: Duration, max_kinds: usize) -> Self {
        Self {
            window,
            max_kinds: max_kinds.max(1),
            kinds: HashMap::new(),
        }
    }

    /// One attempt (`bind_denied` or `bind_observed`; any other event passes
    /// through). `Some`: write it now (the first of its kind in a window);
    /// `None`: counted into the window's summary.
    pub fn admit(&mut self, event: AuditEvent, now: Instant) -> Option<AuditEvent> {
        let (denied, attempt) = match event {
            AuditEvent::BindDenied(a) => (true, a),
            AuditEvent::BindObserved(a) => (false, a),
            other => return Some(other),
        };
        let mut kind = Kind {
            denied,
            port: attempt.port,
            proto: attempt.proto,
            comm: attempt.comm.clone(),
            cgroup: attempt.cgroup.clone(),
        };
        if !self.kinds.contains_key(&kind) && self.kinds.len() >= self.max_kinds {
            kind = Kind {
                comm: CATCH_ALL_COMM.into(),
                cgroup: None,
                ..kind
            };
        }
        match self.kinds.get_mut(&kind) {
            Some(w) => {
                w.repeats += 1;
                let exe = attempt.exe.clone().or_else(|| w.last.exe.take());
                w.last = BindAttempt { exe, ..attempt };
                None
            }
            None => {
                self.kinds.insert(
                    kind,
                    Window {
                        started: now,
                        repeats: 0,
                        last: attempt.clone(),
                    },
                );
                Some(event_of(denied, attempt))
            }
        }
    }

    /// The summaries of windows that ended by `now` (kinds with attempts
    /// after their first record); kinds with none are forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<AuditEvent> {
        let window = self.window;
        self.drain(|w| now.duration_since(w.started) >= window)
    }

    /// Every pending summary (the agent stops).
    pub fn drain_all(&mut self) -> Vec<AuditEvent> {
        self.drain(|_| true)
    }

    /// Kinds whose window is open.
    pub fn tracked(&self) -> usize {
        self.kinds.len()
    }

    fn drain(&mut self, ended: impl Fn(&Window) -> bool) -> Vec<AuditEvent> {
        let mut out = Vec::new();
        self.kinds.retain(|kind, w| {
            if !ended(w) {
                return true;
            }
            if w.repeats > 0 {
                let mut summary = w.last.clone();
                summary.repeats = w.repeats;
                if kind.comm == CATCH_ALL_COMM {
                    summary.comm = CATCH_ALL_COMM.into();
                    summary.exe = None;
                    summary.cgroup = None;
                }
                out.push(event_of(kind.denied, summary));
            }
            false
        });
        out
    }
}

fn event_of(denied: bool, attempt: BindAttempt) -> AuditEvent {
    if denied {
        AuditEvent::BindDenied(attempt)
    } else {
        AuditEvent::BindObserved(attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(comm: &str, pid: u32) -> AuditEvent {
        AuditEvent::BindDenied(BindAttempt {
            port: 80,
            proto: Proto::Tcp,
            address: None,
            pid,
            comm: comm.into(),
            exe: Some(format!("/usr/bin/{comm}")),
            cgroup: Some("/user.slice".into()),
            owner: None,
            repeats: 0,
        })
    }

    fn repeats(e: &AuditEvent) -> (String, u64) {
        match e {
            AuditEvent::BindDenied(a) | AuditEvent::BindObserved(a) => (a.comm.clone(), a.repeats),
            other => panic!("not a bind: {other:?}"),
        }
    }

    #[test]
    fn a_loop_is_one_record_then_one_summary_per_window() {
        let mut agg = BindAggregator::new(Duration::from_secs(10), 16);
        let t0 = Instant::now();
        let mut written = Vec::new();
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 250); // 25 s
            written.extend(agg.due(now));
            written.extend(agg.admit(denied("loop", 1000 + i), now));
        }
        written.extend(agg.drain_all());
        let counts: Vec<_> = written.iter().map(repeats).collect();
        // Windows start at 0 s, 10 s, 20 s: a first record and a summary each.
        assert_eq!(counts.len(), 6, "{counts:?}");
        let total: u64 = counts.iter().map(|(_, r)| r + u64::from(*r == 0)).sum();
        assert_eq!(total, 100_000, "every attempt counted once: {counts:?}");
        assert_eq!(
            counts[0],
            ("loop".into(), 0),
            "the first is written at once"
        );
        // The summary names the latest attempt's pid.
        let AuditEvent::BindDenied(last) = written.last().unwrap() else {
            panic!()
        };
        assert_eq!(last.pid, 1000 + 99_999);
    }

    #[test]
    fn kinds_are_bounded_and_the_rest_counted_per_port() {
        let mut agg = BindAggregator::new(Duration::from_secs(10), 2);
        let now = Instant::now();
        let mut written = Vec::new();
        for i in 0..50 {
            written.extend(agg.admit(denied(&format!("c{i}"), i), now));
        }
        assert!(agg.tracked() <= 3, "two kinds and the catch-all");
        let first: Vec<_> = written.iter().map(repeats).collect();
        assert_eq!(
            first,
            [("c0".into(), 0), ("c1".into(), 0), ("c2".into(), 0)],
            "the third kind opens the catch-all with its own record"
        );
        let summary: Vec<_> = agg.drain_all().iter().map(repeats).collect();
        assert_eq!(summary, [(CATCH_ALL_COMM.into(), 47)]);
    }

    #[test]
    fn an_executable_read_too_late_does_not_split_a_kind() {
        let mut agg = BindAggregator::default();
        let now = Instant::now();
        let mut gone = denied("probe", 1);
        if let AuditEvent::BindDenied(a) = &mut gone {
            a.exe = None;
        }
        assert!(agg.admit(denied("probe", 1), now).is_some());
        assert!(agg.admit(gone, now).is_none(), "same kind");
        let summary = agg.drain_all();
        let AuditEvent::BindDenied(s) = &summary[0] else {
            panic!()
        };
        assert_eq!((s.repeats, s.exe.as_deref()), (1, Some("/usr/bin/probe")));
    }

    #[test]
    fn other_events_pass_through() {
        let mut agg = BindAggregator::default();
        let e = AuditEvent::AgentStopped { reason: "x".into() };
        assert_eq!(agg.admit(e.clone(), Instant::now()), Some(e));
        assert_eq!(agg.tracked(), 0);
    }
}
