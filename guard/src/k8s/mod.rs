//! Kubernetes and k3s: neutralize Traefik and ServiceLB at the source.
//!
//! - [`harden`]: k3s prevention files (config drop-in + skip marker); no API needed.
//! - [`k3s_invocation`]: which config file and command line k3s starts with.
//! - [`cluster`]: which kubeconfig, the client, and failure states with clear messages.
//! - [`claims`]: pure functions: Services/Pods + this node + protected ports → [`PortClaim`]s.
//! - [`pod_index`]: pod IP → pod, controller and Services, to name a DNAT target.
//! - [`watch`]: Service and Pod watches feeding a `watch` channel of [`ClusterView`].
//! - [`remove`]: removal plans (k3s's packaged Traefik, or objects the policy names),
//!   each object recorded whole before deletion; restore from a record.
//! - [`crd_impact`]: what deleting HelmChart `traefik-crd` would take with it, counted.
//! - [`reconfigure`]: the least destructive remedy, a HelmChartConfig that takes
//!   the packaged Traefik off the host ports; undone by deleting it.

pub mod claims;
pub mod cluster;
pub mod crd_impact;
pub mod harden;
pub mod k3s_invocation;
pub mod pod_index;
pub mod reconfigure;
pub mod remove;
pub mod watch;

pub use claims::{ClaimVia, NodeIdentity, PortClaim};
pub use cluster::{ClusterError, Connection, KubeconfigChoice};
pub use harden::{HardeningStatus, hardening_status};
pub use pod_index::{K8sSource, PodIndex};
pub use remove::{RecordedObject, RemovalPlan, RemovalStep};
pub use watch::{
    ClusterState, ClusterView, ClusterWatch, Follow, spawn_watches, start, watch_connection,
    watches,
};
