//! Remediation: foreign NAT rules on protected ports are removed before traffic
//! is lost, and owners are pinned.
//!
//! - [`decide`] is pure: ruleset + findings + policy → [`Action`]s.
//! - [`ForeignRule`] is a rule captured whole (raw expressions, userdata, chain,
//!   position and neighbours) so that it can be recorded and put back.
//! - [`Remediation`] acts: every removal is audited (`rule_removed`, the whole
//!   rule, durable) before one atomic transaction deletes the rules by handle.
//! - [`RuleGuard`] is the agent's event-driven loop: nf_tables notifications,
//!   owners and address changes re-inspect; the model is updated in place from
//!   the notification; full reads only at start, on structural changes and on
//!   notification overruns; legacy iptables tables are polled only when in use.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};
use tracing::{debug, info, warn};

use crate::{
    audit::{AuditEvent, AuditHandle, ForeignRuleRecord},
    k8s::ClusterView,
    nft::{
        self, Finding, InspectInput, LocalAddr, OwnedMapping, OwnedTargets, RulesetModel,
        TableOrigin,
        model::{Expr, Family},
        monitor::{self, AddressMonitor, Applied, Change, RulesetMonitor},
        pin::{self, Pin},
        transaction::{NftWriter, Op, Placement, Transaction, TransactionError},
    },
    owners::ResolvedOwners,
    policy::{Mode, Policy, Proto},
};

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

    /// The audit record written before the rule is removed.
    pub fn audit_record(&self) -> ForeignRuleRecord {
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
        [Expr::Meta { key: 16, dreg }, Expr::Cmp { sreg, data, .. }]
            if dreg == sreg && data.len() == 1 =>
        {
            Some(u32::from(data[0]))
        }
        [
            Expr::Payload {
                base: nft::model::PayloadBase::Network,
                offset: 9,
                len: 1,
                dreg,
            },
            Expr::Cmp { sreg, data, .. },
        ] if dreg == sreg && data.len() == 1 => Some(u32::from(data[0])),
        _ => None,
    })
}

/// What a batch of added rules can affect. A rule that matches one destination
/// port acts only on connections to that port; a rule in a base chain only on
/// that hook, and only on the families its table sees. Only probes inside the
/// scope can meet a new foreign rule; the others' findings were handled when
/// they appeared.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    ports: BTreeSet<u16>,
    /// Hooks (and v4/v6) of the base chains the rules were added to.
    hooks: BTreeSet<(nft::Hook, bool)>,
    /// A rule went into a regular chain: reachable from any hook.
    any_hook: bool,
}

impl Scope {
    /// Widens the scope by one added rule (family, table, chain, matched port);
    /// none when the rule can affect every port.
    fn add(
        mut self,
        model: &RulesetModel,
        (family, table, chain, port): (Family, String, String, Option<u16>),
    ) -> Option<Self> {
        self.ports.insert(port?);
        let base = model
            .tables
            .iter()
            .find(|t| t.family == family && t.name == table)
            .and_then(|t| t.chain(&chain))
            .and_then(|c| c.base.as_ref());
        match base {
            Some(b) => {
                for v6 in [false, true] {
                    if family.sees(v6) {
                        self.hooks.insert((b.hook, v6));
                    }
                }
            }
            None => self.any_hook = true,
        }
        Some(self)
    }

    fn wants(&self, probe: &nft::Probe) -> bool {
        self.ports.contains(&probe.dport)
            && (self.any_hook || self.hooks.contains(&(probe.hook, probe.v6)))
    }
}

/// The one destination port a rule matches (`th dport == N` as payload + cmp),
/// if it says so; a rule matching one port affects only that port's connections.
fn matched_dport(exprs: &[Expr]) -> Option<u16> {
    exprs.windows(2).find_map(|w| match w {
        [
            Expr::Payload {
                base: nft::model::PayloadBase::Transport,
                offset: 2,
                len: 2,
                dreg,
            },
            Expr::Cmp {
                sreg,
                op: nft::model::CmpOp::Eq,
                data,
            },
        ] if dreg == sreg && data.len() == 2 => Some(u16::from_be_bytes([data[0], data[1]])),
        _ => None,
    })
}

/// A removed rule as the audit log holds it (`rule_removed.rule`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedRule {
    pub family: String,
    pub family_code: u8,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub position: usize,
    pub prev_handle: Option<u64>,
    pub next_handle: Option<u64>,
    /// base64 of the raw `NFTA_RULE_EXPRESSIONS`.
    pub expressions: String,
    /// base64 of the raw `NFTA_RULE_USERDATA`.
    #[serde(default)]
    pub userdata: Option<String>,
    #[serde(default)]
    pub compat_proto: Option<u32>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_source: Option<String>,
    #[serde(default)]
    pub findings: Vec<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the recorded rule is not readable: {0}")]
    Record(String),
    #[error(
        "the chain {family} {table} {chain} no longer exists: nothing to put the rule back into"
    )]
    ChainGone {
        family: String,
        table: String,
        chain: String,
    },
}

impl RecordedRule {
    /// The transaction that puts the rule back: after the rule that preceded it
    /// when that one is still there, else before the one that followed it, else
    /// at its old end of the chain (start when it was first, end otherwise).
    pub fn restore_transaction(
        &self,
        model: &RulesetModel,
    ) -> Result<(Transaction, Placement), RestoreError> {
        let family = Family(self.family_code);
        let chain = model
            .tables
            .iter()
            .find(|t| t.family == family && t.name == self.table)
            .and_then(|t| t.chain(&self.chain))
            .ok_or_else(|| RestoreError::ChainGone {
                family: self.family.clone(),
                table: self.table.clone(),
                chain: self.chain.clone(),
            })?;
        let has = |h: Option<u64>| h.filter(|h| chain.rules.iter().any(|r| r.handle == *h));
        let placement = if let Some(h) = has(self.prev_handle) {
            Placement::After(h)
        } else if let Some(h) = has(self.next_handle) {
            Placement::Before(h)
        } else if self.position <= 1 {
            Placement::Prepend
        } else {
            Placement::Append
        };
        let decode = |s: &str| {
            B64.decode(s)
                .map_err(|e| RestoreError::Record(e.to_string()))
        };
        let mut tx = Transaction::new();
        tx.push(Op::AddRule {
            family,
            table: self.table.clone(),
            chain: self.chain.clone(),
            exprs: decode(&self.expressions)?,
            userdata: self.userdata.as_deref().map(decode).transpose()?,
            compat_proto: self.compat_proto,
            placement,
            summary: format!("(the rule removed from handle {})", self.handle),
        });
        Ok((tx, placement))
    }
}

/// What to do about a foreign rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enforce mode: audit, then delete by handle.
    Remove(ForeignRule),
    /// Observe mode, or a rule that cannot be deleted over netlink
    /// (iptables-legacy): report only.
    Report { finding: Finding, why: &'static str },
}

/// A rule's place: family, table, chain, handle, position.
type RuleKey = (Family, String, String, Option<u64>, usize);

/// The pure decision: one action per foreign rule (a rule that rewrites
/// several protected ports is one action). A rule is removed when any port it
/// rewrites is in enforce mode, latent or active (a latent hijack becomes active
/// as soon as the rule ahead of it goes).
pub fn decide(model: &RulesetModel, findings: &[Finding], policy: &Policy) -> Vec<Action> {
    let mut by_rule: BTreeMap<RuleKey, Vec<Finding>> = BTreeMap::new();
    for f in findings {
        by_rule
            .entry((
                f.family,
                f.table.clone(),
                f.chain.clone(),
                f.handle,
                f.position,
            ))
            .or_default()
            .push(f.clone());
    }
    let mut out = Vec::new();
    for (_, fs) in by_rule {
        let enforce = fs.iter().any(|f| {
            policy
                .find(f.port, f.proto)
                .is_some_and(|p| policy.mode_of(p) == Mode::Enforce)
        });
        let first = fs[0].clone();
        if !enforce {
            out.push(Action::Report {
                finding: first,
                why: "observe mode",
            });
        } else if first.origin == TableOrigin::IptablesLegacy {
            out.push(Action::Report {
                finding: first,
                why: "iptables-legacy rule: not removable over netlink",
            });
        } else if in_docker_managed_chain(model, &first) {
            // The owner's place: Docker may be mid-way through starting a
            // container the owners model does not know yet. Never delete there.
            out.push(Action::Report {
                finding: first,
                why: "in a chain Docker manages: reported, never removed",
            });
        } else {
            match ForeignRule::capture(model, fs) {
                Some(rule) => out.push(Action::Remove(rule)),
                None => out.push(Action::Report {
                    finding: first,
                    why: "the rule's raw expressions are not in the model",
                }),
            }
        }
    }
    out
}

/// Whether the finding's rule sits in one of Docker's own chains.
fn in_docker_managed_chain(model: &RulesetModel, f: &Finding) -> bool {
    model
        .tables
        .iter()
        .find(|t| t.family == f.family && t.name == f.table && t.origin == f.origin)
        .is_some_and(|t| nft::classify::docker_managed(t, &f.chain))
}

/// The one transaction that deletes `rules` by handle.
pub fn removal_transaction(rules: &[ForeignRule]) -> Transaction {
    let mut tx = Transaction::new();
    let mut seen = BTreeSet::new();
    for r in rules {
        if seen.insert(r.id()) {
            tx.push(r.delete_op());
        }
    }
    tx
}

#[derive(Debug, thiserror::Error)]
pub enum RemediationError {
    #[error("audit: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Transaction(#[from] TransactionError),
    #[error("reading the ruleset: {0}")]
    Read(#[from] nft::InspectError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The acting side: audit first, then one atomic transaction.
pub struct Remediation {
    pub writer: NftWriter,
}

impl Remediation {
    /// Opens the netlink writer in `netns` (or here).
    pub fn open(netns: Option<&str>) -> Result<Self, RemediationError> {
        let writer = match netns {
            None => NftWriter::open()?,
            Some(ns) => nft::netlink::in_netns(ns, NftWriter::open)??,
        };
        Ok(Self { writer })
    }

    /// Records every rule whole (durably), then deletes them all in one
    /// transaction. Returns the audit seq of each removal. Rules already gone
    /// (ENOENT: someone else deleted them) are not an error.
    pub async fn remove(
        &mut self,
        audit: &AuditHandle,
        rules: &[ForeignRule],
    ) -> Result<Vec<u64>, RemediationError> {
        let mut seqs = Vec::with_capacity(rules.len());
        for r in rules {
            let rec = audit
                .record(AuditEvent::RuleRemoved(r.audit_record()))
                .await?;
            seqs.push(rec.seq);
        }
        match self.writer.commit(&removal_transaction(rules)) {
            Ok(()) => Ok(seqs),
            Err(e) if e.all_missing() => Ok(seqs),
            Err(e) => Err(e.into()),
        }
    }
}

/// Reads the ruleset and addresses of `netns` (or this namespace) off the async threads.
pub async fn read_ruleset(
    netns: Option<String>,
) -> Result<(RulesetModel, Vec<LocalAddr>), RemediationError> {
    tokio::task::spawn_blocking(move || nft::read_with_addrs(netns.as_deref()))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .map_err(Into::into)
}

/// What the rule guard tells the agent loop (metrics, logs).
#[derive(Clone, Debug)]
pub enum GuardReport {
    Removed {
        port: u16,
        proto: Proto,
        source: String,
        id: String,
        seq: u64,
        /// This rule (same place, same target) came back after a removal:
        /// a blocked attempt of a fight (kube-proxy re-creating its rules).
        returns: u64,
        /// From the notification that announced it to its removal.
        latency: Option<Duration>,
    },
    Observed {
        finding: Box<Finding>,
        why: &'static str,
    },
    Inspected {
        took: Duration,
        rules: usize,
        full_read: bool,
    },
    PinSynced {
        pins: Vec<Pin>,
    },
    PinOvertaken {
        chains: Vec<pin::ChainAhead>,
    },
}

/// Everything the rule guard needs.
pub struct RuleGuard {
    pub netns: Option<String>,
    pub policy: Policy,
    pub audit: AuditHandle,
    pub owners: watch::Receiver<Arc<ResolvedOwners>>,
    pub reports: mpsc::Sender<GuardReport>,
    /// How often iptables-legacy tables are re-read, while any is in use.
    pub legacy_poll: Duration,
    /// The Kubernetes layer's view, to name the object behind a rule's target.
    pub cluster: Option<watch::Receiver<ClusterView>>,
}

/// Log lines about one returning rule are rate limited to one per this period.
const RETURN_LOG_PERIOD: Duration = Duration::from_secs(10);

/// The guard's state, owned by its loop alone.
struct GuardState {
    model: RulesetModel,
    addrs: Vec<LocalAddr>,
    owned: OwnedTargets,
    /// Pins learned from the owner's own DNAT rules (when Docker cannot be asked
    /// or the ruleset is another namespace's): kept while the rule is shadowed.
    learned: BTreeSet<OwnedMapping>,
    pins: Vec<Pin>,
    /// Rules removed before, by what they are (place and target), with counts.
    returns: HashMap<String, u64>,
    last_log: HashMap<String, Instant>,
}

impl RuleGuard {
    fn owned_targets(&self, owners: &ResolvedOwners) -> OwnedTargets {
        if self.netns.is_some() {
            // Another namespace is not this host's Docker: its chain by shape.
            OwnedTargets::docker_fallback()
        } else {
            OwnedTargets::from_owners(owners)
        }
    }

    /// Runs until `stop` fires; then removes the pins (collecting every error).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), RemediationError> {
        let ns = self.netns.clone();
        let (mon, addr_mon, writer) = match ns.as_deref() {
            None => (
                RulesetMonitor::open()?,
                AddressMonitor::open()?,
                NftWriter::open()?,
            ),
            Some(ns) => nft::netlink::in_netns(ns, || {
                Ok::<_, RemediationError>((
                    RulesetMonitor::open()?,
                    AddressMonitor::open()?,
                    NftWriter::open()?,
                ))
            })??,
        };
        // SAFETY: the monitors own their descriptors, which live as long as the AsyncFds.
        let mut mon = unsafe { AsyncFd::register(mon) }.map_err(|e| e.into_parts().1)?;
        // SAFETY: as above.
        let mut addr_mon = unsafe { AsyncFd::register(addr_mon) }.map_err(|e| e.into_parts().1)?;
        let mut act = Remediation { writer };
        let t0 = Instant::now();
        let (model, addrs) = read_ruleset(ns.clone()).await?;
        let owners = self.owners.borrow_and_update().clone();
        let owned = self.owned_targets(&owners);
        let mut st = GuardState {
            model,
            addrs,
            owned,
            learned: BTreeSet::new(),
            pins: Vec::new(),
            returns: HashMap::new(),
            last_log: HashMap::new(),
        };
        self.report(GuardReport::Inspected {
            took: t0.elapsed(),
            rules: st.model.rule_count(),
            full_read: true,
        });
        self.settle(&mut st, &mut act, None, None).await?;
        info!(
            event = "rule_guard_ready",
            rules = st.model.rule_count(),
            netns = ns.as_deref().unwrap_or("host"),
            "rule guard ready: watching nftables changes"
        );
        let mut legacy = tokio::time::interval(self.legacy_poll);
        legacy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = Vec::new();
        let mut owners_open = true;
        let result = loop {
            tokio::select! {
                _ = stop.changed() => break Ok(()),
                ready = mon.readable_mut() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => break Err(e.into()),
                    };
                    let seen = Instant::now();
                    changes.clear();
                    let drained = guard.get_inner_mut().drain(&mut changes);
                    guard.clear_ready();
                    if let Err(e) = drained {
                        break Err(e.into());
                    }
                    let mut resync = false;
                    let mut updated = false;
                    // What this batch can affect: when it only adds rules, the
                    // ports, hooks and families of those rules (see `Scope`).
                    let mut scope = Some(Scope::default());
                    for c in changes.drain(..) {
                        let added = match &c {
                            Change::RuleAdded { msg, .. } => Some(Some((
                                msg.family,
                                msg.table.clone(),
                                msg.chain.clone(),
                                matched_dport(msg.rule.exprs()),
                            ))),
                            // The end of a transaction changes nothing.
                            Change::Generation => None,
                            _ => Some(None),
                        };
                        match monitor::apply(&mut st.model, c) {
                            Applied::Updated => updated = true,
                            Applied::Unchanged => {}
                            Applied::Resync => resync = true,
                        }
                        // A deletion creates no foreign rule, but observe-mode reports
                        // and pins follow it: anything but an addition is inspected in full.
                        scope = match (scope, added) {
                            (scope, None) => scope,
                            (Some(s), Some(Some(rule))) => s.add(&st.model, rule),
                            _ => None,
                        };
                    }
                    if resync && let Err(e) = self.full_read(&mut st).await {
                        break Err(e);
                    }
                    let scope = scope.filter(|_| !resync);
                    if (resync || updated)
                        && let Err(e) = self.settle(&mut st, &mut act, Some(seen), scope.as_ref()).await
                    {
                        break Err(e);
                    }
                }
                ready = addr_mon.readable_mut() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => break Err(e.into()),
                    };
                    let changed = guard.get_inner_mut().changed();
                    guard.clear_ready();
                    let changed = match changed {
                        Ok(c) => c,
                        Err(e) => break Err(e.into()),
                    };
                    if changed {
                        debug!("addresses changed: re-inspecting");
                        let addrs = match ns.as_deref() {
                            None => nft::local::local_addresses(),
                            Some(ns) => nft::netlink::in_netns(ns, nft::local::local_addresses)
                                .and_then(|r| r),
                        };
                        match addrs {
                            Ok(addrs) => st.addrs = addrs,
                            Err(e) => break Err(e.into()),
                        }
                        if let Err(e) = self.settle(&mut st, &mut act, None, None).await {
                            break Err(e);
                        }
                    }
                }
                changed = self.owners.changed(), if owners_open => {
                    if changed.is_err() {
                        // The owners task stopped (a reload replaces it): keep the last model.
                        owners_open = false;
                        continue;
                    }
                    let owners = self.owners.borrow_and_update().clone();
                    st.owned = self.owned_targets(&owners);
                    if let Err(e) = self.settle(&mut st, &mut act, None, None).await {
                        break Err(e);
                    }
                }
                _ = legacy.tick() => {
                    // iptables-legacy announces nothing: re-read while it is in use
                    // (or was: its tables went away). Otherwise one /proc read.
                    let had = st.model.tables.iter().any(|t| t.origin == TableOrigin::IptablesLegacy);
                    let in_use = match ns.as_deref() {
                        None => nft::legacy::nat_in_use(),
                        Some(ns) => match nft::netlink::in_netns(ns, nft::legacy::nat_in_use) {
                            Ok(u) => u,
                            Err(e) => break Err(e.into()),
                        },
                    };
                    if !had && !in_use {
                        continue;
                    }
                    if let Err(e) = self.full_read(&mut st).await {
                        break Err(e);
                    }
                    if let Err(e) = self.settle(&mut st, &mut act, None, None).await {
                        break Err(e);
                    }
                }
            }
        };
        // No pin outlives the agent.
        let teardown = self.remove_pins(&mut st, &mut act).await;
        result.and(teardown)
    }

    async fn remove_pins(
        &self,
        st: &mut GuardState,
        act: &mut Remediation,
    ) -> Result<(), RemediationError> {
        let installed = pin::installed_families(&st.model);
        if installed.is_empty() && st.pins.is_empty() {
            return Ok(());
        }
        let mut errors = Vec::new();
        for p in std::mem::take(&mut st.pins) {
            if let Err(e) = self
                .audit
                .record(AuditEvent::PinRemoved {
                    port: p.port,
                    proto: p.proto,
                    rule: serde_json::to_value(p).expect("a pin serialises"),
                })
                .await
            {
                errors.push(e.to_string());
            }
        }
        // Each family's table on its own: one failing does not keep the other.
        for family in installed {
            if let Err(e) = act.writer.commit(&pin::teardown_transaction(&[family]))
                && !e.all_missing()
            {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            info!("pins removed");
            Ok(())
        } else {
            Err(std::io::Error::other(format!("removing the pins: {}", errors.join("; "))).into())
        }
    }

    async fn full_read(&self, st: &mut GuardState) -> Result<(), RemediationError> {
        let t0 = Instant::now();
        let (model, addrs) = read_ruleset(self.netns.clone()).await?;
        st.model = model;
        st.addrs = addrs;
        self.report(GuardReport::Inspected {
            took: t0.elapsed(),
            rules: st.model.rule_count(),
            full_read: true,
        });
        Ok(())
    }

    fn report(&self, r: GuardReport) {
        // The agent loop may be slow to read: never block the hot path on it.
        let _ = self.reports.try_send(r);
    }

    /// [`Self::reconcile`]; a transaction the kernel refused (the ruleset moved
    /// under it: a chain deleted, a rule replaced) is retried once on a fresh
    /// full read before it counts as an error.
    async fn settle(
        &self,
        st: &mut GuardState,
        act: &mut Remediation,
        seen: Option<Instant>,
        scope: Option<&Scope>,
    ) -> Result<(), RemediationError> {
        match self.reconcile(st, act, seen, scope).await {
            Err(RemediationError::Transaction(e)) => {
                warn!("transaction refused, re-reading the ruleset and retrying: {e}");
                self.full_read(st).await?;
                self.reconcile(st, act, seen, None).await
            }
            other => other,
        }
    }

    /// Inspect, decide, act; then keep the pins in sync.
    async fn reconcile(
        &self,
        st: &mut GuardState,
        act: &mut Remediation,
        seen: Option<Instant>,
        scope: Option<&Scope>,
    ) -> Result<(), RemediationError> {
        let t0 = Instant::now();
        let mut input = InspectInput::from_policy(&self.policy, st.owned.clone(), st.addrs.clone());
        if let Some(scope) = scope {
            // Only these ports' probes: rules that match another port cannot
            // change what happens to them.
            input.ports = scope
                .ports
                .iter()
                .filter(|p| input.ports.iter().any(|s| s.ports.contains(**p)))
                .flat_map(|p| {
                    input
                        .ports
                        .iter()
                        .filter(|s| s.ports.contains(*p))
                        .map(|s| nft::PortSpec {
                            proto: s.proto,
                            ports: crate::policy::PortRange::single(*p),
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            if input.ports.is_empty() {
                return Ok(());
            }
        }
        let (findings, owned) = match scope {
            None => nft::inspect_with_owned(&st.model, &input),
            Some(scope) => nft::inspect_probes(&st.model, &input, |p| scope.wants(p)),
        };
        self.report(GuardReport::Inspected {
            took: t0.elapsed(),
            rules: st.model.rule_count(),
            full_read: false,
        });
        let mut remove = Vec::new();
        for action in decide(&st.model, &findings, &self.policy) {
            match action {
                Action::Remove(mut rule) => {
                    if let Some(view) = &self.cluster {
                        rule.name_source(&view.borrow());
                    }
                    remove.push(rule);
                }
                Action::Report { finding, why } => {
                    let key = format!(
                        "{}/{}/{}/{:?}",
                        finding.table, finding.chain, finding.port, finding.handle
                    );
                    // Reported once per period, not on every re-inspection.
                    if self.rate_ok(st, &key) {
                        warn!(event = "foreign_rule_reported", port = finding.port, source = %finding.source, chain = %finding.chain, active = finding.active, why, "foreign NAT rule on a protected port ({why})");
                        self.report(GuardReport::Observed {
                            finding: Box::new(finding),
                            why,
                        });
                    }
                }
            }
        }
        if !remove.is_empty() {
            let seqs = act.remove(&self.audit, &remove).await?;
            let latency = seen.map(|s| s.elapsed());
            for (rule, seq) in remove.iter().zip(seqs) {
                // The same rule coming back: same place and same target.
                let what = format!(
                    "{}/{}/{}/{:?}",
                    rule.table, rule.chain, rule.findings[0].port, rule.findings[0].target
                );
                let count = st.returns.entry(what.clone()).or_insert(0);
                let returns = *count;
                *count += 1;
                // Apply our own deletion now; its notification is then a no-op.
                monitor::apply(
                    &mut st.model,
                    Change::RuleDeleted(nft::netlink::RuleMessage {
                        family: rule.family,
                        table: rule.table.clone(),
                        chain: rule.chain.clone(),
                        position: None,
                        rule: nft::model::Rule::new(rule.handle, Vec::new(), None),
                    }),
                );
                if self.rate_ok(st, &what) {
                    info!(
                        event = "rule_removed",
                        port = rule.findings[0].port,
                        source = rule.source(),
                        k8s_source = rule.k8s_source.as_deref(),
                        rule = %rule.id(),
                        seq,
                        returns,
                        latency_us = latency.map(|l| l.as_micros() as u64),
                        "foreign NAT rule removed"
                    );
                }
                self.report(GuardReport::Removed {
                    port: rule.findings[0].port,
                    proto: rule.findings[0].proto,
                    source: rule.source().to_owned(),
                    id: rule.id(),
                    seq,
                    returns,
                    latency,
                });
            }
        }
        self.sync_pins(st, act, owned, scope.is_none()).await
    }

    fn rate_ok(&self, st: &mut GuardState, key: &str) -> bool {
        let now = Instant::now();
        match st.last_log.get(key) {
            Some(t) if now.duration_since(*t) < RETURN_LOG_PERIOD => false,
            _ => {
                st.last_log.insert(key.to_owned(), now);
                true
            }
        }
    }

    /// The pins the policy asks for, from the owners model (Docker reachable,
    /// this host) or else from the owner's own DNAT rules in the ruleset.
    /// `full`: `owned` comes from a full inspection (else from a scoped one,
    /// which adds mappings but cannot tell that one is gone).
    ///
    /// Each pin matches what the owner publishes: its host address (or every
    /// local address for a publish on all), and spares the bridge the owner's
    /// container sits behind (hairpin traffic stays the owner's own).
    fn wanted_pins(&self, st: &mut GuardState, owned: Vec<OwnedMapping>, full: bool) -> Vec<Pin> {
        let pinned = |proto: Proto, port: u16| {
            self.policy
                .find(port, proto)
                .is_some_and(|p| p.pin && self.policy.mode_of(p) == Mode::Enforce)
        };
        let bridge = |target: std::net::SocketAddr| {
            nft::classify::bridge_of(target.ip(), &st.addrs).map(str::to_owned)
        };
        let mut pins = BTreeSet::new();
        if st.owned.docker_known {
            for nat in &st.owned.published {
                let target = std::net::SocketAddr::new(nat.container_ip, nat.container_port);
                // A publish on one family's address pins that family only.
                let family_ok = nat.host_ip.is_none_or(|h| h.is_ipv6() == target.is_ipv6());
                if pinned(nat.proto, nat.host_port) && family_ok {
                    pins.insert(Pin {
                        proto: nat.proto,
                        port: nat.host_port,
                        host: nat.host_ip,
                        target,
                        exclude_iif: bridge(target),
                    });
                }
            }
        } else {
            let fresh: BTreeSet<OwnedMapping> = owned
                .into_iter()
                .filter(|m| pinned(m.proto, m.port))
                .collect();
            // The owner's rule changed (a new container address) or went away:
            // follow it.
            if full {
                st.learned = fresh;
            } else {
                st.learned.extend(fresh);
            }
            for ((proto, port, target), host) in learned_hosts(&st.learned, &st.addrs) {
                pins.insert(Pin {
                    proto,
                    port,
                    host,
                    target,
                    exclude_iif: bridge(target),
                });
            }
        }
        pins.into_iter().collect()
    }

    async fn sync_pins(
        &self,
        st: &mut GuardState,
        act: &mut Remediation,
        owned: Vec<OwnedMapping>,
        full: bool,
    ) -> Result<(), RemediationError> {
        let wanted = self.wanted_pins(st, owned, full);
        let installed = pin::installed_families(&st.model);
        let intact = pins_intact(&st.model, &wanted);
        if wanted == st.pins && intact {
            let ahead = pin::chains_not_behind(&st.model);
            if !wanted.is_empty() && !ahead.is_empty() {
                let key = "pin-overtaken".to_owned();
                if self.rate_ok(st, &key) {
                    warn!(
                        event = "pin_overtaken",
                        ?ahead,
                        "a nat chain runs at or ahead of the pin's priority"
                    );
                }
                self.report(GuardReport::PinOvertaken { chains: ahead });
            }
            return Ok(());
        }
        if wanted.is_empty() && installed.is_empty() {
            st.pins.clear();
            return Ok(());
        }
        for p in &wanted {
            let event = match st
                .pins
                .iter()
                .find(|o| o.proto == p.proto && o.port == p.port && o.host == p.host)
            {
                Some(old) if old == p && intact => continue,
                Some(old) => AuditEvent::PinUpdated {
                    port: p.port,
                    proto: p.proto,
                    target: p.target.to_string(),
                    previous: serde_json::to_value(old).expect("a pin serialises"),
                    rule: serde_json::to_value(p).expect("a pin serialises"),
                },
                None => AuditEvent::PinInstalled {
                    port: p.port,
                    proto: p.proto,
                    target: p.target.to_string(),
                    rule: serde_json::to_value(p).expect("a pin serialises"),
                },
            };
            self.audit.record(event).await?;
        }
        for old in st.pins.iter().filter(|o| {
            !wanted
                .iter()
                .any(|p| p.proto == o.proto && p.port == o.port && p.host == o.host)
        }) {
            self.audit
                .record(AuditEvent::PinRemoved {
                    port: old.port,
                    proto: old.proto,
                    rule: serde_json::to_value(old).expect("a pin serialises"),
                })
                .await?;
        }
        act.writer
            .commit(&pin::sync_transaction(&installed, &wanted))?;
        info!(
            event = "pins_synced",
            pins = wanted.len(),
            priority = pin::PIN_PRIORITY,
            lowest_other_nat_priority = pin::lowest_other_nat_priority(&st.model),
            "pins in sync: ahead of every other nat chain present"
        );
        st.pins = wanted.clone();
        // The pin tables changed structurally: the next notification batch
        // (NEWTABLE/NEWCHAIN) triggers a full read, which brings them into the model.
        self.report(GuardReport::PinSynced { pins: wanted });
        Ok(())
    }
}

/// The learned owner mappings with the host address each is met on: every
/// local address (`None`) when the owner's rule is met on each non-loopback
/// address of the target's family, else one entry per address it is met on.
fn learned_hosts(
    learned: &BTreeSet<OwnedMapping>,
    addrs: &[LocalAddr],
) -> Vec<((Proto, u16, std::net::SocketAddr), Option<IpAddr>)> {
    let mut by_target: BTreeMap<(Proto, u16, std::net::SocketAddr), BTreeSet<IpAddr>> =
        BTreeMap::new();
    for m in learned {
        by_target
            .entry((m.proto, m.port, m.target))
            .or_default()
            .insert(m.daddr);
    }
    let mut out = Vec::new();
    for (key, met) in by_target {
        let v6 = key.2.is_ipv6();
        let all: BTreeSet<IpAddr> = addrs
            .iter()
            .map(|a| a.addr)
            .filter(|a| a.is_ipv6() == v6 && !a.is_loopback())
            .filter(|a| !matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80))
            .collect();
        let met_remote: BTreeSet<IpAddr> =
            met.iter().copied().filter(|a| !a.is_loopback()).collect();
        if !all.is_empty() && all.is_subset(&met_remote) {
            out.push((key, None));
        } else {
            out.extend(met.into_iter().map(|h| (key, Some(h))));
        }
    }
    out
}

/// Whether the model holds a pin table for each family with the right number of rules.
fn pins_intact(model: &RulesetModel, wanted: &[Pin]) -> bool {
    [Family::IP, Family::IP6].iter().all(|fam| {
        let of_family: Vec<&Pin> = wanted
            .iter()
            .filter(|p| (p.target.is_ipv6()) == (*fam == Family::IP6))
            .collect();
        let table = model
            .tables
            .iter()
            .find(|t| pin::is_pin_table(t) && t.family == *fam);
        match table {
            None => of_family.is_empty(),
            Some(t) => {
                !of_family.is_empty()
                    && [
                        (pin::PIN_PREROUTING_CHAIN, nft::Hook::Prerouting),
                        (pin::PIN_OUTPUT_CHAIN, nft::Hook::Output),
                    ]
                    .iter()
                    .all(|(c, hook)| {
                        let n = of_family.iter().filter(|p| p.applies_to(*hook)).count();
                        t.chain(c).is_some_and(|c| c.rules.len() == n)
                    })
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::netlink::{
        decode_messages,
        tests::{sample_dump, sample_input},
    };
    use crate::policy::PolicySource;

    #[test]
    fn enforce_removes_observe_reports() {
        let model = decode_messages(&sample_dump());
        let input = sample_input();
        let findings = nft::inspect(&model, &input);
        assert_eq!(findings.len(), 1);
        let mut policy = Policy::parse(
            "[[ports]]\nport = 80\nowner = \"docker\"\n",
            PolicySource::Embedded,
        )
        .expect("policy");
        policy.mode = Mode::Enforce;
        let actions = decide(&model, &findings, &policy);
        let [Action::Remove(rule)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(rule.handle, 7);
        assert_eq!(rule.position, 1);
        assert!(!rule.exprs.is_empty());
        let tx = removal_transaction(std::slice::from_ref(rule));
        assert_eq!(tx.to_string(), "delete rule ip t pre handle 7\n");
        // Recorded whole, restorable at the start of its chain.
        let rec: RecordedRule =
            serde_json::from_value(rule.audit_record().rule).expect("record round-trips");
        let mut emptied = model.clone();
        emptied.tables[0].chains[0].rules.clear();
        let (tx, placement) = rec.restore_transaction(&emptied).unwrap();
        assert_eq!(placement, Placement::Prepend);
        let Op::AddRule { exprs, .. } = &tx.ops[0] else {
            panic!()
        };
        assert_eq!(exprs, &rule.exprs);
        policy.mode = Mode::Observe;
        assert!(matches!(
            decide(&model, &findings, &policy).as_slice(),
            [Action::Report { .. }]
        ));
    }
}

#[cfg(test)]
mod scope_tests {
    use super::*;
    use crate::nft::{
        Probe,
        model::{CmpOp, Hook, PayloadBase},
        netlink::{decode_messages, tests::sample_dump},
    };

    fn probe(hook: Hook, v6: bool, dport: u16) -> Probe {
        Probe {
            hook,
            v6,
            l4proto: 6,
            dport,
            daddr: "198.51.100.1".parse().unwrap(),
            iifname: None,
            iifindex: 0,
        }
    }

    #[test]
    fn a_rule_in_a_base_chain_matching_one_port_scopes_to_that_port_and_hook() {
        let model = decode_messages(&sample_dump());
        let rule = decode_messages(&sample_dump()).tables[0].chains[0].rules[0]
            .exprs()
            .to_vec();
        assert_eq!(matched_dport(&rule), Some(80));
        let scope = Scope::default()
            .add(&model, (Family::IP, "t".into(), "pre".into(), Some(80)))
            .unwrap();
        assert!(scope.wants(&probe(Hook::Prerouting, false, 80)));
        assert!(!scope.wants(&probe(Hook::Output, false, 80)));
        assert!(
            !scope.wants(&probe(Hook::Prerouting, true, 80)),
            "ip table: v4 only"
        );
        assert!(!scope.wants(&probe(Hook::Prerouting, false, 443)));
        // A regular chain: any hook; no port: no scope at all.
        let scope = scope
            .add(
                &model,
                (Family::IP, "t".into(), "regular".into(), Some(443)),
            )
            .unwrap();
        assert!(scope.wants(&probe(Hook::Output, false, 443)));
        assert!(
            Scope::default()
                .add(&model, (Family::IP, "t".into(), "pre".into(), None))
                .is_none()
        );
    }

    #[test]
    fn compat_proto_only_for_rules_with_xt_matches() {
        let l4 = [
            Expr::Meta { key: 16, dreg: 1 },
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
}

#[cfg(test)]
mod k8s_tests {
    use super::*;
    use crate::{
        k8s::{ClusterView, PodIndex},
        nft::netlink::{
            decode_messages,
            tests::{sample_dump, sample_input},
        },
    };

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

#[cfg(test)]
mod restore_tests {
    use super::*;
    use crate::nft::{
        model::Rule,
        netlink::{
            decode_messages,
            tests::{sample_dump, sample_input},
        },
    };

    /// The sample rule (handle 7) recorded between neighbours 5 and 9.
    fn recorded() -> (RulesetModel, RecordedRule) {
        let model = decode_messages(&sample_dump());
        let findings = nft::inspect(&model, &sample_input());
        let mut rule = ForeignRule::capture(&model, findings).unwrap();
        (rule.prev_handle, rule.next_handle, rule.position) = (Some(5), Some(9), 2);
        let rec = serde_json::from_value(rule.audit_record().rule).unwrap();
        (model, rec)
    }

    fn with_rules(mut model: RulesetModel, handles: &[u64]) -> RulesetModel {
        model.tables[0].chains[0].rules = handles
            .iter()
            .map(|h| Rule::new(*h, Vec::new(), None))
            .collect();
        model
    }

    #[test]
    fn a_restore_goes_back_next_to_the_neighbours_that_are_left() {
        let (model, rec) = recorded();
        let at = |handles: &[u64]| {
            rec.restore_transaction(&with_rules(model.clone(), handles))
                .unwrap()
                .1
        };
        assert_eq!(at(&[5, 9]), Placement::After(5));
        assert_eq!(at(&[9]), Placement::Before(9));
        assert_eq!(
            at(&[1]),
            Placement::Append,
            "was not first: back at the end"
        );
        let mut gone = model.clone();
        gone.tables[0].chains.clear();
        assert!(matches!(
            rec.restore_transaction(&gone),
            Err(RestoreError::ChainGone { .. })
        ));
    }
}
