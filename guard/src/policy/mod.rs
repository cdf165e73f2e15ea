//! The policy: which ports are protected and who owns them.
//!
//! Parsed from TOML (default `/etc/portguard/config.toml`); with no file, the
//! embedded default protects tcp/80 and tcp/443 for Docker. Every error names
//! the file, line and column.

mod model;
mod parse;

pub use model::{
    KubeKind, KubeObjectName, KubeObjectNameError, KubernetesPolicy, MetricsSpec, Mode, OnClaim,
    OnShadow, OwnerSpec, Policy, ProbeSpec, ProtectedPort,
};
// The policy's fields speak the leaf vocabulary; re-exported for its readers.
pub use crate::types::{PortRange, Proto};
pub use parse::{DEFAULT_POLICY_PATH, DEFAULT_POLICY_TOML, PolicyError, PolicySource};
