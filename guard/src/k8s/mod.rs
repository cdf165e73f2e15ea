//! Kubernetes and k3s: neutralize Traefik and ServiceLB at the source.
//!
//! - [`harden`]: k3s prevention files (config drop-in + skip marker); no API needed.

pub mod harden;

pub use harden::{HardeningStatus, hardening_status};
