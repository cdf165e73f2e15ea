//! What one line of the audit log says.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::host::Host;
use crate::types::Proto;

/// One line of the audit log: a sequence number, a time, and what happened.
///
/// Serialised flat: `{"seq":7,"ts":"2026-…Z","kind":"rule_removed",…}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Gapless from 1 across restarts and rotations; `portguard restore SEQ`
    /// names a removal by it.
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// The host that wrote it (records of older agents have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Host>,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Who tried to bind a protected port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindAttempt {
    pub port: u16,
    pub proto: Proto,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    pub pid: u32,
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Owner the policy names for the port, for the reader's convenience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A summary: this many further attempts of the same kind (verdict, port,
    /// who) came after the kind's first record within its window (see
    /// `audit::aggregate`); this record names the latest. 0: one attempt.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeats: u64,
}

impl BindAttempt {
    /// The attempts this record stands for.
    pub fn attempts(&self) -> u64 {
        self.repeats.saturating_add(1)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A NAT rule that sends a protected port somewhere its owner is not.
///
/// `rule` is the whole rule as the nft inspector models it (JSON), so that
/// a removal can be restored from the log alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForeignRuleRecord {
    /// The reconciler's finding id; a probe failure links to it.
    pub finding: String,
    pub port: u16,
    pub proto: Proto,
    /// Who made the rule, as far as the classifier knows (`kube-proxy`, `cni-portmap`, ...).
    pub source: String,
    /// `table family/name chain name handle N`, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub rule: Value,
    /// Who committed the rule, when the agent saw the commit (a rule that was
    /// there before the agent started, or came with a full re-read, has none).
    /// Boxed: most records have none, and every event is as large as its largest kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committer: Option<Box<Committer>>,
}

/// Who committed the nf_tables transaction that added a rule: the process
/// the kernel names in its `NFT_MSG_NEWGEN`, resolved through `/proc` at once
/// (while it lives), with the processes it was started by.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committer {
    pub pid: u32,
    /// The kernel's name for it (`comm`, at most 15 bytes).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// The committer's cgroup v2 path; when it had exited, its nearest
    /// living parent's (`cgroup_of` says whose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_of: Option<u32>,
    /// What that cgroup says: a systemd unit, a container, a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Its parent, grandparent, … up to (not including) pid 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<ProcessRef>,
    /// The committer had exited before it could be read (a short-lived
    /// `iptables-restore`, say): only the kernel's pid and name are its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
    /// The generation its transaction created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    /// When the agent read the commit's `NEWGEN`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub committed_at: Option<OffsetDateTime>,
}

/// One process of a committer's parent chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

impl std::fmt::Display for Committer {
    /// `nft (pid 4242, /usr/sbin/nft, unit ssh.service)`, or for one that had
    /// exited: `iptables-nft-re (pid 812, exited) via k3s-server (pid 77, /usr/local/bin/k3s), unit k3s.service`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {}", self.name, self.pid)?;
        if self.gone {
            f.write_str(", exited")?;
        } else if let Some(exe) = &self.exe {
            write!(f, ", {exe}")?;
        }
        f.write_str(")")?;
        if let Some(p) = self.parents.first() {
            write!(f, " via {} (pid {}", p.name, p.pid)?;
            if let Some(exe) = &p.exe {
                write!(f, ", {exe}")?;
            }
            f.write_str(")")?;
        }
        if let Some(unit) = &self.unit {
            write!(f, ", unit {unit}")?;
        }
        if let Some(id) = &self.container_id {
            write!(f, ", container {}", &id[..id.len().min(12)])?;
        }
        if let Some(uid) = &self.pod_uid {
            write!(f, ", pod {uid}")?;
        }
        Ok(())
    }
}

/// A Kubernetes object, whole, as the API server returned it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct K8sObjectRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finding: Option<String>,
    pub api_version: String,
    /// `Service`, `HelmChart`, ... (`kind` is the record's own tag).
    pub object_kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    pub manifest: Value,
}

/// Everything the agent records. Tagged `kind` in snake case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditEvent {
    AgentStarted {
        version: String,
        pid: u32,
        mode: String,
        policy: String,
    },
    AgentStopped {
        reason: String,
    },
    PolicyReloaded {
        policy: String,
        ports: usize,
    },
    /// A reload that failed validation: the old policy stays in force.
    PolicyRejected {
        policy: String,
        error: String,
    },
    BindObserved(BindAttempt),
    BindDenied(BindAttempt),
    /// A foreign rewrite reported, not removed (observe mode, iptables-legacy,
    /// Docker's chain, audit down): written when first seen, then at most
    /// once an hour while it stays. `rule` is the finding.
    RuleFound(ForeignRuleRecord),
    /// A foreign rule that takes new connections away before the owner's
    /// mapping (an accept, return, drop or goto ahead of Docker's DNAT): the
    /// port is dead for them though nothing was rewritten. Written like
    /// `rule_found`; `rule` is the finding, naming the mapping it shadows.
    OwnerShadowed(ForeignRuleRecord),
    /// Written (durably) before the rule is deleted: the intent, whole. Not a
    /// removal: the batch may still be refused (the ruleset moved, the rule
    /// was gone). A `rule_removed` with the same rule follows once the kernel
    /// confirmed the deletion.
    RuleRemoving(ForeignRuleRecord),
    /// Written once the kernel confirmed the deletion; `portguard restore`
    /// takes its `seq`.
    RuleRemoved(ForeignRuleRecord),
    RuleRestored {
        /// The `rule_removed` record this undoes.
        removal_seq: u64,
        port: u16,
        proto: Proto,
        rule: Value,
    },
    PinInstalled {
        port: u16,
        proto: Proto,
        target: String,
        rule: Value,
    },
    PinUpdated {
        port: u16,
        proto: Proto,
        target: String,
        previous: Value,
        rule: Value,
    },
    PinRemoved {
        port: u16,
        proto: Proto,
        rule: Value,
    },
    K8sObjectRemoved(K8sObjectRecord),
    /// Written before portguard creates an object (the reconfigure remedy's
    /// HelmChartConfig): `portguard restore SEQ` undoes it by deleting it.
    K8sObjectCreated(K8sObjectRecord),
    K8sObjectRestored {
        removal_seq: u64,
        #[serde(flatten)]
        object: K8sObjectRecord,
    },
    ProbeFailed {
        port: u16,
        proto: Proto,
        url: String,
        error: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        /// The foreign rule on this port at the time, when there is one: the
        /// likely cause of the failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finding: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finding_seq: Option<u64>,
    },
    ProbeRecovered {
        port: u16,
        proto: Proto,
        url: String,
        down_ms: u64,
    },
    /// The log found a partial last line on open and moved it aside.
    AuditTornTail {
        offset: u64,
        bytes: u64,
        saved_to: String,
    },
    /// The log could not be written for a while (`error`: the first failure);
    /// this is the first record since. Meanwhile no rule was removed and no
    /// pin changed (bind records may be missing; their count is a metric).
    AuditResumed {
        error: String,
    },
}

impl AuditEvent {
    /// The `kind` tag, for tables and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AgentStarted { .. } => "agent_started",
            Self::AgentStopped { .. } => "agent_stopped",
            Self::PolicyReloaded { .. } => "policy_reloaded",
            Self::PolicyRejected { .. } => "policy_rejected",
            Self::BindObserved(_) => "bind_observed",
            Self::BindDenied(_) => "bind_denied",
            Self::RuleFound(_) => "rule_found",
            Self::OwnerShadowed(_) => "owner_shadowed",
            Self::RuleRemoving(_) => "rule_removing",
            Self::RuleRemoved(_) => "rule_removed",
            Self::RuleRestored { .. } => "rule_restored",
            Self::PinInstalled { .. } => "pin_installed",
            Self::PinUpdated { .. } => "pin_updated",
            Self::PinRemoved { .. } => "pin_removed",
            Self::K8sObjectRemoved(_) => "k8s_object_removed",
            Self::K8sObjectCreated(_) => "k8s_object_created",
            Self::K8sObjectRestored { .. } => "k8s_object_restored",
            Self::ProbeFailed { .. } => "probe_failed",
            Self::ProbeRecovered { .. } => "probe_recovered",
            Self::AuditTornTail { .. } => "audit_torn_tail",
            Self::AuditResumed { .. } => "audit_resumed",
        }
    }

    /// The protected port this event is about, if any.
    pub fn port(&self) -> Option<(u16, Proto)> {
        match self {
            Self::BindObserved(b) | Self::BindDenied(b) => Some((b.port, b.proto)),
            Self::RuleFound(r)
            | Self::OwnerShadowed(r)
            | Self::RuleRemoving(r)
            | Self::RuleRemoved(r) => Some((r.port, r.proto)),
            Self::RuleRestored { port, proto, .. }
            | Self::PinInstalled { port, proto, .. }
            | Self::PinUpdated { port, proto, .. }
            | Self::PinRemoved { port, proto, .. }
            | Self::ProbeFailed { port, proto, .. }
            | Self::ProbeRecovered { port, proto, .. } => Some((*port, *proto)),
            _ => None,
        }
    }

    /// Whether `portguard restore` can undo this record.
    pub fn is_removal(&self) -> bool {
        matches!(
            self,
            Self::RuleRemoved(_) | Self::K8sObjectRemoved(_) | Self::K8sObjectCreated(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(event: AuditEvent) -> AuditRecord {
        AuditRecord {
            seq: 7,
            ts: time::macros::datetime!(2026-03-01 12:00:00 UTC),
            host: None,
            event,
        }
    }

    #[test]
    fn records_serialise_flat_with_a_kind_tag() {
        let rule = json!({"table": "nat", "chain": "KUBE-SERVICES", "handle": 12, "expr": [{"dnat": "10.42.0.9:80"}]});
        let r = record(AuditEvent::RuleRemoved(ForeignRuleRecord {
            finding: "f-80-1".into(),
            port: 80,
            proto: Proto::Tcp,
            source: "kube-proxy".into(),
            location: Some("ip nat KUBE-SERVICES handle 12".into()),
            rule: rule.clone(),
            committer: None,
        }));
        let v: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["ts"], "2026-03-01T12:00:00Z");
        assert_eq!(v["kind"], "rule_removed");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["rule"], rule, "the removed rule is carried whole");
    }

    #[test]
    fn every_kind_round_trips() {
        let bind = BindAttempt {
            port: 443,
            proto: Proto::Tcp,
            address: Some("192.0.2.1".parse().unwrap()),
            pid: 4242,
            comm: "traefik".into(),
            exe: Some("/usr/bin/traefik".into()),
            cgroup: None,
            owner: Some("docker".into()),
            repeats: 0,
        };
        let object = K8sObjectRecord {
            finding: Some("f-443-2".into()),
            api_version: "v1".into(),
            object_kind: "Service".into(),
            namespace: Some("kube-system".into()),
            name: "traefik".into(),
            manifest: json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "traefik"}}),
        };
        let events = vec![
            AuditEvent::AgentStarted {
                version: "0.1.0".into(),
                pid: 1,
                mode: "enforce".into(),
                policy: "/etc/portguard/config.toml".into(),
            },
            AuditEvent::AgentStopped {
                reason: "SIGTERM".into(),
            },
            AuditEvent::PolicyReloaded {
                policy: "p".into(),
                ports: 2,
            },
            AuditEvent::PolicyRejected {
                policy: "p".into(),
                error: "bad".into(),
            },
            AuditEvent::BindObserved(bind.clone()),
            AuditEvent::BindDenied(bind),
            AuditEvent::RuleRestored {
                removal_seq: 3,
                port: 80,
                proto: Proto::Tcp,
                rule: json!({}),
            },
            AuditEvent::PinInstalled {
                port: 80,
                proto: Proto::Tcp,
                target: "172.17.0.2:80".into(),
                rule: json!({"a": 1}),
            },
            AuditEvent::PinUpdated {
                port: 80,
                proto: Proto::Tcp,
                target: "172.17.0.3:80".into(),
                previous: json!({"a": 1}),
                rule: json!({"a": 2}),
            },
            AuditEvent::PinRemoved {
                port: 80,
                proto: Proto::Tcp,
                rule: json!({"a": 2}),
            },
            AuditEvent::K8sObjectRemoved(object.clone()),
            AuditEvent::K8sObjectRestored {
                removal_seq: 11,
                object,
            },
            AuditEvent::ProbeFailed {
                port: 443,
                proto: Proto::Tcp,
                url: "https://127.0.0.1/".into(),
                error: "404".into(),
                status: Some(404),
                finding: Some("f-443-2".into()),
                finding_seq: Some(9),
            },
            AuditEvent::ProbeRecovered {
                port: 443,
                proto: Proto::Tcp,
                url: "u".into(),
                down_ms: 1500,
            },
            AuditEvent::AuditTornTail {
                offset: 10,
                bytes: 5,
                saved_to: "x.torn".into(),
            },
        ];
        for event in events {
            let r = record(event);
            let line = serde_json::to_string(&r).unwrap();
            let back: AuditRecord =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(back, r, "{line}");
            let kind: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(kind["kind"], r.event.kind());
        }
    }
}
