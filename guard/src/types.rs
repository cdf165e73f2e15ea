//! The small shared vocabulary every layer speaks: protocols, port ranges,
//! durations as people write them, and well-known defaults.
//!
//! A leaf: it imports nothing from this crate, so `policy`, `metrics`, `sys`,
//! `audit`, `owners` and the rest can all use it without importing each other.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

/// Where Prometheus scrapes when the policy says nothing (`[metrics] listen`).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// A transport protocol a port is protected for.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number the kernel uses.
    pub fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => guard_common::IPPROTO_TCP,
            Self::Udp => guard_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// An inclusive port range; a single port has `start == end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    pub fn overlaps(&self, other: &Self) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + use<> {
        self.start..=self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            s.serialize_u16(self.start)
        } else {
            s.collect_str(self)
        }
    }
}

/// The units a duration may be written in, for messages and `--help`.
pub const DURATION_UNITS: &str = "ms, s, m (or min), h, d or w";

/// A duration that is not a whole number followed by one of [`DURATION_UNITS`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "duration {0:?}: expected a whole number and ms, s, m (or min), h, d or w, like 10s, 30m or 7d"
)]
pub struct BadDuration(pub String);

/// Parses a duration as the policy and the command line write it: a whole
/// number and a unit, without spaces: `250ms`, `10s`, `30m` (or `30min`),
/// `24h`, `7d`, `2w`. The one parser for both (`[ports.probe] interval`,
/// `report --since`).
pub fn parse_duration(s: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration(s.to_owned());
    let text = s.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    const WEEK: u64 = 7 * DAY;
    let unit_seconds = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" | "min" => MINUTE,
        "h" => HOUR,
        "d" => DAY,
        "w" => WEEK,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_seconds)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// Prints a duration the way [`parse_duration`] reads it: `10s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_overlap_inclusively() {
        let a = PortRange {
            start: 8000,
            end: 8099,
        };
        assert!(a.overlaps(&PortRange::single(8099)));
        assert!(!a.overlaps(&PortRange::single(8100)));
        assert!(a.contains(8000));
    }

    #[test]
    fn one_duration_syntax_for_policy_and_command_line() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(30 * 60)));
        assert_eq!(parse_duration("30min"), parse_duration("30m"));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86400)));
        for bad in ["7", "d", "3y", "-1s", "1.5s", "1 s", ""] {
            assert_eq!(parse_duration(bad), Err(BadDuration(bad.into())), "{bad}");
        }
        assert!(parse_duration(&format!("{}w", u64::MAX)).is_err());
        for d in [Duration::from_secs(10), Duration::from_millis(1500)] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
