//! Where one removal's time goes: the instant each stage of the hot path
//! ended, from the notification to the kernel's acknowledgement of the
//! deletion. Carried by [`GuardReport::Removed`](super::GuardReport) for the
//! benchmark's breakdown (`cargo xtask bench remediate`) and the debug log.
//! Taking an instant costs a vDSO clock read (tens of nanoseconds).

use std::time::{Duration, Instant};

/// The end of each stage of one removal; `None` where the removal did not
/// start from a notification (a full read, an owners change) or a stage was
/// not reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stages {
    /// The notification's socket became readable (before it was parsed).
    pub notified: Option<Instant>,
    /// The batch's changes were parsed and applied to the model (with the
    /// scope of what they can affect).
    pub applied: Option<Instant>,
    /// The inspection (analysis of the probes in scope) ended.
    pub inspected: Option<Instant>,
    /// The decision ended (findings → removals, captured whole).
    pub decided: Option<Instant>,
    /// The intent records (`rule_removing`) were written and synced.
    pub intent_durable: Option<Instant>,
    /// The deletion batch was sent to the kernel.
    pub sent: Option<Instant>,
    /// The kernel acknowledged every deletion of the batch.
    pub acked: Option<Instant>,
}

/// One stage's name and its end, in order (for printing a breakdown).
pub const STAGE_NAMES: [&str; 7] = [
    "notified",
    "applied",
    "inspected",
    "decided",
    "intent_durable",
    "sent",
    "acked",
];

impl Stages {
    /// Stages that start from a notification first seen at `notified`.
    pub fn from_notification(notified: Instant) -> Self {
        Self {
            notified: Some(notified),
            ..Self::default()
        }
    }

    /// The stage ends in [`STAGE_NAMES`] order.
    pub fn ends(&self) -> [Option<Instant>; 7] {
        [
            self.notified,
            self.applied,
            self.inspected,
            self.decided,
            self.intent_durable,
            self.sent,
            self.acked,
        ]
    }

    /// How long each stage took (from the previous stage's end, the first
    /// from `start`), in [`STAGE_NAMES`] order; `None` where a stage or its
    /// predecessor is missing.
    pub fn durations(&self, start: Instant) -> [Option<Duration>; 7] {
        let mut prev = Some(start);
        self.ends().map(|end| {
            let d = match (prev, end) {
                (Some(p), Some(e)) => Some(e.saturating_duration_since(p)),
                _ => None,
            };
            prev = end;
            d
        })
    }

    /// From the notification to the acknowledgement.
    pub fn total(&self) -> Option<Duration> {
        Some(self.acked?.saturating_duration_since(self.notified?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_run_from_stage_to_stage_and_skip_missing_ones() {
        let t0 = Instant::now();
        let at = |us| Some(t0 + Duration::from_micros(us));
        let s = Stages {
            notified: at(10),
            applied: at(15),
            inspected: at(40),
            decided: at(41),
            intent_durable: None,
            sent: at(500),
            acked: at(520),
        };
        let us = |d: Option<Duration>| d.map(|d| d.as_micros());
        let d = s.durations(t0).map(us);
        assert_eq!(
            d,
            [Some(10), Some(5), Some(25), Some(1), None, None, Some(20)]
        );
        assert_eq!(s.total(), Some(Duration::from_micros(510)));
        assert_eq!(Stages::default().total(), None);
    }
}
