//! The validated policy, as the rest of the agent reads it.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// What the agent does about a stranger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny strangers' binds and remove foreign rules.
    #[default]
    Enforce,
    /// Report only; change nothing.
    Observe,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Observe => "observe",
        })
    }
}

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

/// Who may own a port, as the policy names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OwnerSpec {
    /// Any container publishing the port, and Docker's docker-proxy for it.
    Docker,
    /// The container with this name.
    DockerName(String),
    /// Containers carrying this label.
    DockerLabel { key: String, value: String },
    /// Processes of this systemd unit.
    Unit(String),
    /// Processes running this executable (matched by device and inode).
    Exe(PathBuf),
    /// Processes in this cgroup v2 subtree (path relative to the hierarchy root).
    Cgroup(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerSpecError {
    #[error(
        "unknown owner kind {0:?}: expected docker, docker:NAME, docker-label:KEY=VALUE, unit:NAME.service, exe:/PATH or cgroup:/PATH"
    )]
    UnknownKind(String),
    #[error("owner {0:?} names nothing after the colon")]
    Empty(String),
    #[error("owner {0:?}: a label selector is docker-label:KEY=VALUE")]
    BadLabel(String),
    #[error("owner {0:?}: the path must be absolute")]
    RelativePath(String),
    #[error("owner {0:?}: a unit name ends in .service, .scope, .socket or .slice")]
    BadUnit(String),
}

impl FromStr for OwnerSpec {
    type Err = OwnerSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "docker" {
            return Ok(Self::Docker);
        }
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| OwnerSpecError::UnknownKind(s.to_owned()))?;
        if rest.is_empty() {
            return Err(OwnerSpecError::Empty(s.to_owned()));
        }
        match kind {
            "docker" => Ok(Self::DockerName(rest.to_owned())),
            "docker-label" => match rest.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok(Self::DockerLabel {
                    key: k.to_owned(),
                    value: v.to_owned(),
                }),
                _ => Err(OwnerSpecError::BadLabel(s.to_owned())),
            },
            "unit" => {
                const SUFFIXES: [&str; 4] = [".service", ".scope", ".socket", ".slice"];
                if SUFFIXES
                    .iter()
                    .any(|x| rest.ends_with(x) && rest.len() > x.len())
                {
                    Ok(Self::Unit(rest.to_owned()))
                } else {
                    Err(OwnerSpecError::BadUnit(s.to_owned()))
                }
            }
            "exe" | "cgroup" => {
                if !rest.starts_with('/') {
                    return Err(OwnerSpecError::RelativePath(s.to_owned()));
                }
                let path = PathBuf::from(rest);
                Ok(if kind == "exe" {
                    Self::Exe(path)
                } else {
                    Self::Cgroup(path)
                })
            }
            _ => Err(OwnerSpecError::UnknownKind(s.to_owned())),
        }
    }
}

impl fmt::Display for OwnerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Docker => f.write_str("docker"),
            Self::DockerName(n) => write!(f, "docker:{n}"),
            Self::DockerLabel { key, value } => write!(f, "docker-label:{key}={value}"),
            Self::Unit(u) => write!(f, "unit:{u}"),
            Self::Exe(p) => write!(f, "exe:{}", p.display()),
            Self::Cgroup(p) => write!(f, "cgroup:{}", p.display()),
        }
    }
}

impl Serialize for OwnerSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One `[[ports]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProtectedPort {
    pub port: PortRange,
    pub proto: Proto,
    pub owner: Vec<OwnerSpec>,
    /// Install the owner's NAT mapping ahead of every other nat chain.
    pub pin: bool,
    /// Overrides the global mode for this port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// An HTTP(S) health check of the service that owns the port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeSpec>,
}

/// `[ports.probe]`: what a healthy owner answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeSpec {
    pub url: String,
    pub expect_status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_body: Option<String>,
    /// Accept any certificate (self-signed, wrong name) for this probe only.
    pub insecure_tls: bool,
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
}

impl ProbeSpec {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
}

/// `[metrics]`: where Prometheus scrapes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MetricsSpec {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// A non-loopback `listen` needs this said out loud.
    pub allow_remote: bool,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: crate::metrics::DEFAULT_METRICS_ADDR
                .parse()
                .expect("the default metrics address parses"),
            allow_remote: false,
        }
    }
}

/// Durations print the way the policy writes them: `10s`, `250ms`.
fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    if d.subsec_millis() == 0 {
        s.collect_str(&format_args!("{}s", d.as_secs()))
    } else {
        s.collect_str(&format_args!("{}ms", d.as_millis()))
    }
}

/// The whole validated policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub mode: Mode,
    pub metrics: MetricsSpec,
    pub ports: Vec<ProtectedPort>,
}

impl Policy {
    /// The mode in force for one entry.
    pub fn mode_of(&self, port: &ProtectedPort) -> Mode {
        port.mode.unwrap_or(self.mode)
    }

    /// The entry that protects `port`/`proto`, if any.
    pub fn find(&self, port: u16, proto: Proto) -> Option<&ProtectedPort> {
        self.ports
            .iter()
            .find(|p| p.proto == proto && p.port.contains(port))
    }

    /// Prints the policy in the file's own format: `config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a policy always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_specs_parse_and_print_back() {
        for s in [
            "docker",
            "docker:frontend",
            "docker-label:com.example.role=web",
            "unit:nginx.service",
            "exe:/usr/sbin/nginx",
            "cgroup:/system.slice/k3s.service",
        ] {
            let spec: OwnerSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
    }

    #[test]
    fn owner_spec_errors_are_specific() {
        assert_eq!(
            "podman:x".parse::<OwnerSpec>(),
            Err(OwnerSpecError::UnknownKind("podman:x".into()))
        );
        assert_eq!(
            "exe:nginx".parse::<OwnerSpec>(),
            Err(OwnerSpecError::RelativePath("exe:nginx".into()))
        );
        assert_eq!(
            "docker-label:novalue".parse::<OwnerSpec>(),
            Err(OwnerSpecError::BadLabel("docker-label:novalue".into()))
        );
        assert_eq!(
            "unit:nginx".parse::<OwnerSpec>(),
            Err(OwnerSpecError::BadUnit("unit:nginx".into()))
        );
        assert_eq!(
            "docker:".parse::<OwnerSpec>(),
            Err(OwnerSpecError::Empty("docker:".into()))
        );
    }

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
}
