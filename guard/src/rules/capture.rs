//! Capturing a foreign rule whole: everything needed to record it in the audit
//! log and to put it back byte for byte (raw expressions and userdata, chain,
//! position and the handles of its neighbours, every finding it is).

use std::{net::IpAddr, sync::Arc};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};

use super::{attribution, restore::RecordedRule};
use crate::{
    audit::{Committer, ForeignRuleRecord},
    k8s::ClusterView,
    nft::{
        Finding, RulesetModel,
        model::{Commit, Expr, Family, PayloadBase},
        transaction::Op,
    },
};

/// `NFT_META_L4PROTO` (`linux/netfilter/nf_tables.h`, `enum nft_meta_keys`):
/// the meta key of the layer 4 protocol (`meta l4proto`).
const META_L4PROTO: u32 = libc::NFT_META_L4PROTO as u32;
/// The IPv4 header's protocol field (`ip protocol`): offset and length.
const IPV4_PROTOCOL_OFFSET: u32 = 9;
const IPV4_PROTOCOL_LEN: u32 = 1;

/// A foreign rule captured whole from the ruleset model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignRule {
    pub family: Family,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    /// 1-based position in its chain.
    pub position: usize,
    pub prev_handle: Option<u64>,
    pub next_handle: Option<u64>,
    pub exprs: Vec<u8>,
    pub userdata: Option<Vec<u8>>,
    pub compat_proto: Option<u32>,
    pub comment: Option<String>,
    /// Every finding this rule is (one per protected port it rewrites).
    pub findings: Vec<Finding>,
    /// The Kubernetes object behind the rule's target, when the Kubernetes
    /// layer can name it (`pod ns/name (DaemonSet ns/name) …`).
    pub k8s_source: Option<String>,
    /// The transaction that added it, when the agent saw the commit. Named
    /// through `/proc` only in the `rule_removed` record, after the deletion:
    /// nothing between the commit and the deletion waits for `/proc`.
    pub commit: Option<Arc<Commit>>,
}

impl ForeignRule {
    /// Captures the rule a finding names, with its neighbours, from the model.
    pub fn capture(model: &RulesetModel, findings: Vec<Finding>) -> Option<Self> {
        let f = findings.first()?;
        let handle = f.handle?;
        let table = model
            .tables
            .iter()
            .find(|t| t.family == f.family && t.name == f.table)?;
        let chain = table.chain(&f.chain)?;
        let i = chain.rules.iter().position(|r| r.handle == handle)?;
        let rule = &chain.rules[i];
        Some(Self {
            family: f.family,
            table: f.table.clone(),
            chain: f.chain.clone(),
            handle,
            position: i + 1,
            prev_handle: i.checked_sub(1).map(|p| chain.rules[p].handle),
            next_handle: chain.rules.get(i + 1).map(|r| r.handle),
            exprs: rule.raw_exprs()?.to_vec(),
            userdata: rule.raw_userdata().map(<[u8]>::to_vec),
            compat_proto: compat_proto(rule.exprs()),
            comment: rule.comment.clone(),
            findings,
            k8s_source: None,
            commit: rule.commit().cloned(),
        })
    }

    /// The target address the rule sends connections to, when it says.
    pub fn target_ip(&self) -> Option<IpAddr> {
        let t = self.findings.first()?.target.as_deref()?;
        t.parse::<std::net::SocketAddr>()
            .map(|s| s.ip())
            .or_else(|_| t.parse::<IpAddr>())
            .ok()
    }

    /// Names the Kubernetes object behind the target, when the view knows it.
    pub fn name_source(&mut self, view: &ClusterView) {
        if let Some(ip) = self.target_ip() {
            self.k8s_source = view.lookup_target(ip).map(ToString::to_string);
        }
    }

    /// `family/table/chain/handle`: the finding id in the audit log.
    pub fn id(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.family, self.table, self.chain, self.handle
        )
    }

    pub fn source(&self) -> &str {
        self.findings
            .first()
            .map_or("unknown", |f| f.source.as_str())
    }

    pub fn delete_op(&self) -> Op {
        Op::DeleteRule {
            family: self.family,
            table: self.table.clone(),
            chain: self.chain.clone(),
            handle: self.handle,
        }
    }

    /// What the audit log keeps: enough to put the rule back byte for byte.
    pub fn recorded(&self) -> RecordedRule {
        RecordedRule {
            family: self.family.to_string(),
            family_code: self.family.0,
            table: self.table.clone(),
            chain: self.chain.clone(),
            handle: self.handle,
            position: self.position,
            prev_handle: self.prev_handle,
            next_handle: self.next_handle,
            expressions: B64.encode(&self.exprs),
            userdata: self.userdata.as_ref().map(|u| B64.encode(u)),
            compat_proto: self.compat_proto,
            comment: self.comment.clone(),
            k8s_source: self.k8s_source.clone(),
            findings: self
                .findings
                .iter()
                .map(|f| serde_json::to_value(f).expect("a finding serialises"))
                .collect(),
        }
    }

    /// The audit record written before the rule is removed: the committer
    /// as the kernel named it (pid, name, generation), nothing read yet.
    pub fn audit_record(&self) -> ForeignRuleRecord {
        self.record_with(self.commit.as_deref().map(attribution::as_named))
    }

    /// The audit record of the confirmed removal: the committer named
    /// through `/proc` now (see [`attribution::resolve`]).
    pub fn removed_record(&self) -> ForeignRuleRecord {
        self.record_with(self.commit.as_deref().map(attribution::resolve))
    }

    fn record_with(&self, committer: Option<Committer>) -> ForeignRuleRecord {
        let f = self.findings.first().expect("a foreign rule has a finding");
        ForeignRuleRecord {
            finding: self.id(),
            port: f.port,
            proto: f.proto,
            source: match &self.k8s_source {
                Some(k8s) => format!("{} ({k8s})", f.source),
                None => f.source.clone(),
            },
            location: Some(format!(
                "table {} {} chain {} handle {} (position {})",
                self.family, self.table, self.chain, self.handle, self.position
            )),
            rule: serde_json::to_value(self.recorded()).expect("a rule serialises"),
            committer: committer.map(Box::new),
        }
    }
}

/// The `NFTA_RULE_COMPAT` protocol an iptables-nft rule with `xt` matches needs
/// to be accepted again: the `-p` it matches on.
fn compat_proto(exprs: &[Expr]) -> Option<u32> {
    if !exprs.iter().any(|e| matches!(e, Expr::XtMatch { .. })) {
        return None;
    }
    exprs.windows(2).find_map(|w| match w {
        [
            Expr::Meta {
                key: META_L4PROTO,
                dreg,
            },
            Expr::Cmp { sreg, data, .. },
        ] if dreg == sreg && data.len() == 1 => Some(u32::from(data[0])),
        [
            Expr::Payload {
                base: PayloadBase::Network,
                offset: IPV4_PROTOCOL_OFFSET,
                len: IPV4_PROTOCOL_LEN,
                dreg,
            },
            Expr::Cmp { sreg, data, .. },
        ] if dreg == sreg && data.len() == 1 => Some(u32::from(data[0])),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        k8s::{ClusterView, PodIndex},
        nft::{
            self,
            model::CmpOp,
            netlink::{
                decode_messages,
                tests::{sample_dump, sample_input},
            },
        },
    };

    #[test]
    fn compat_proto_only_for_rules_with_xt_matches() {
        let l4 = [
            Expr::Meta {
                key: META_L4PROTO,
                dreg: 1,
            },
            Expr::Cmp {
                sreg: 1,
                op: CmpOp::Eq,
                data: vec![6],
            },
        ];
        assert_eq!(compat_proto(&l4), None);
        let mut with_xt = l4.to_vec();
        with_xt.push(Expr::XtMatch {
            name: "addrtype".into(),
            rev: 1,
            info: Vec::new(),
        });
        assert_eq!(compat_proto(&with_xt), Some(6));
        let ip_proto = [
            Expr::Payload {
                base: PayloadBase::Network,
                offset: 9,
                len: 1,
                dreg: 1,
            },
            Expr::Cmp {
                sreg: 1,
                op: CmpOp::Eq,
                data: vec![17],
            },
            Expr::XtMatch {
                name: "udp".into(),
                rev: 0,
                info: Vec::new(),
            },
        ];
        assert_eq!(compat_proto(&ip_proto), Some(17));
    }

    #[test]
    fn a_removal_names_the_pod_behind_its_target() {
        let model = decode_messages(&sample_dump());
        let findings = nft::inspect(&model, &sample_input());
        let mut rule = ForeignRule::capture(&model, findings).expect("captured");
        assert_eq!(rule.target_ip(), Some("203.0.113.9".parse().unwrap()));
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "svclb-traefik-abcde", "namespace": "kube-system"},
            "spec": {"containers": [{"name": "lb-tcp-80"}]},
            "status": {"phase": "Running", "podIP": "203.0.113.9"}
        }))
        .unwrap();
        let mut view = ClusterView::off("test");
        view.pods = PodIndex::build(&[], &[pod]);
        rule.name_source(&view);
        let named = rule.k8s_source.clone().expect("named");
        assert!(named.contains("kube-system/svclb-traefik-abcde"), "{named}");
        let rec = rule.audit_record();
        assert!(rec.source.contains("svclb-traefik-abcde"), "{}", rec.source);
    }
}
