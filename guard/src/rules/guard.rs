//! The rule guard's loop: one owner of the ruleset model, fed by the backend's
//! events (ruleset changes, address changes), the owners model and the legacy
//! tick; one method per event kind. Each event ends in [`GuardLoop::settle`]:
//! inspect (only what the event can affect, when that is known), decide,
//! audit and remove, then keep the pins in sync.
//!
//! The model carries the nf_tables generation it is at: the dump's, moved on
//! by each batch of notifications applied (a batch ends with the `NEWGEN` that
//! names its generation; its changes are held until then). A batch not newer
//! than the model is already in it (the subscription opens before the dump)
//! and is dropped. Removals are committed against the model's generation: if
//! the ruleset moved since, the kernel refuses them (`ERESTART`) and the guard
//! reads and decides again.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{
    attribution,
    backend::{BackendEvent, NetlinkBackend, RulesetBackend},
    capture::ForeignRule,
    decide::{Action, decide},
    error::GuardError,
    pins::{PinSet, PinSync},
    remove::{generation_moved, remove_audited},
    scope::{Scope, matched_dport},
    timing::Stages,
};
use crate::{
    audit::{AuditEvent, AuditHandle},
    k8s::ClusterView,
    nft::{
        self, Finding, InspectInput, LocalAddr, OwnedMapping, OwnedTargets, ReachedChains,
        RulesetModel, TableOrigin,
        model::Commit,
        monitor::{self, Applied, Change},
        netlink,
        pin::{self, Pin},
    },
    owners::ResolvedOwners,
    policy::{Policy, Proto},
};

/// Log lines about one returning rule are rate limited to one per this period.
const RETURN_LOG_PERIOD: Duration = Duration::from_secs(10);
/// How many times in a row the guard reads and decides again because the
/// ruleset moved before its batch (`ERESTART`); then it waits for the next
/// change (whose notification brings it back here).
const MAX_GENERATION_RETRIES: usize = 8;
/// How many whole reads one batch of notifications may cause before the
/// guard judges: after each read, the notifications queued meanwhile are
/// taken first (they name the committers of rules the read holds), and they
/// may ask for another read.
const MAX_READS_PER_EVENT: usize = 3;
/// While the audit log cannot be written, how often the guard tries again
/// (by deciding again: a removal starts with its intent record).
const AUDIT_RETRY: Duration = Duration::from_secs(5);
/// Why a finding is reported rather than removed while the audit log is down.
const AUDIT_DOWN_WHY: &str =
    "the audit log cannot be written: reported, not removed (nothing is removed unrecorded)";
/// A reported (not removed) foreign rule is recorded in the audit log when
/// first seen, then again at most this often while it stays.
const FOUND_RECORD_PERIOD: Duration = Duration::from_secs(3600);
/// Past this many remembered reported rules, those not seen for a period are forgotten.
const FOUND_RECORD_MEMORY: usize = 4096;
/// The rate-limit key of the "a nat chain runs ahead of the pin" warning.
const PIN_OVERTAKEN_KEY: &str = "pin-overtaken";

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
        /// Where that time went (the batch's stages).
        stages: Stages,
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
    /// Rule changes in chains no protected port's connection enters were
    /// applied and dismissed without an inspection; `took`: from their
    /// notification.
    Dismissed {
        took: Duration,
    },
    PinSynced {
        pins: Vec<Pin>,
    },
    PinOvertaken {
        chains: Vec<pin::ChainAhead>,
    },
    /// The audit log cannot be written (a full disk…): no rule is removed
    /// and no pin changed until it can (foreign rules are reported); `None`:
    /// it can again.
    AuditUnavailable {
        error: Option<String>,
    },
    /// Other tables hold the pin table's name (none: they went away): left
    /// alone, and their families get no pin meanwhile.
    ForeignPinTables {
        tables: Vec<pin::ForeignPinTable>,
        withheld: Vec<Pin>,
    },
}

/// Everything the rule guard needs.
pub struct RuleGuard {
    /// The network namespace of the guarded ruleset (none: this one). Another
    /// namespace is not this host's Docker: its chains are recognised by shape.
    pub netns: Option<String>,
    pub policy: Policy,
    pub audit: AuditHandle,
    pub owners: watch::Receiver<Arc<ResolvedOwners>>,
    pub reports: mpsc::Sender<GuardReport>,
    /// How often iptables-legacy tables are re-read, while any is in use.
    pub legacy_poll: Duration,
    /// How often the guard looks whether iptables-legacy is in use, while not
    /// (an idle agent wakes for nothing else).
    pub legacy_check: Duration,
    /// The Kubernetes layer's view, to name the object behind a rule's target.
    pub cluster: Option<watch::Receiver<ClusterView>>,
}

impl RuleGuard {
    /// Runs against the kernel, in `self.netns`, until `stop` fires.
    pub async fn run_netlink(self, stop: watch::Receiver<bool>) -> Result<(), GuardError> {
        let backend = NetlinkBackend::open_watching(self.netns.as_deref())?;
        self.run(backend, stop).await
    }

    /// Runs until `stop` fires; then removes the pins (collecting every error).
    pub async fn run<B: RulesetBackend>(
        self,
        backend: B,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), GuardError> {
        let mut guard = GuardLoop::start(self, backend).await?;
        // While iptables-legacy is in use it is re-read every `legacy_poll`;
        // while not, looked at every `legacy_check`.
        let mut legacy_in_use = guard.legacy_in_use();
        let legacy = tokio::time::sleep(guard.legacy_period(legacy_in_use));
        tokio::pin!(legacy);
        let mut audit_retry = tokio::time::interval(AUDIT_RETRY);
        audit_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let event = tokio::select! {
                _ = stop.changed() => break Ok(()),
                event = guard.backend.next_event(&mut guard.changes) => match event {
                    Ok(BackendEvent::Ruleset { seen }) => Event::Ruleset { seen },
                    Ok(BackendEvent::AddressesChanged) => Event::Addresses,
                    Err(e) => break Err(e.into()),
                },
                changed = guard.cfg.owners.changed(), if guard.owners_open => match changed {
                    Ok(()) => Event::Owners,
                    Err(_) => Event::OwnersClosed,
                },
                () = &mut legacy => Event::LegacyTick,
                _ = audit_retry.tick(), if guard.audit_down.is_some() => Event::AuditRetry,
            };
            let handled = match event {
                Event::Ruleset { seen } => guard.on_ruleset_changes(seen).await,
                Event::Addresses => guard.on_addresses_changed().await,
                Event::Owners => guard.on_owners_changed().await,
                Event::OwnersClosed => {
                    // The owners task stopped (a reload replaces it): keep the last model.
                    guard.owners_open = false;
                    Ok(())
                }
                Event::LegacyTick => match guard.on_legacy_tick().await {
                    Ok(in_use) => {
                        legacy_in_use = in_use;
                        let next = tokio::time::Instant::now() + guard.legacy_period(legacy_in_use);
                        legacy.as_mut().reset(next);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Event::AuditRetry => guard.on_audit_retry().await,
            };
            if let Err(e) = handled {
                break Err(e);
            }
        };
        let teardown = guard.on_stop().await;
        result.and(teardown)
    }

    fn owned_targets(&self, owners: &ResolvedOwners) -> OwnedTargets {
        if self.netns.is_some() {
            // Another namespace is not this host's Docker: its chain by shape.
            OwnedTargets::docker_fallback()
        } else {
            owners.owned_targets()
        }
    }

    fn report(&self, r: GuardReport) {
        // The agent loop may be slow to read: never block the hot path on it.
        let _ = self.reports.try_send(r);
    }
}

/// One event the loop handles.
enum Event {
    Ruleset {
        seen: Instant,
    },
    Addresses,
    Owners,
    OwnersClosed,
    LegacyTick,
    /// The audit log was down: decide again (and so try to write).
    AuditRetry,
}

/// The guard's state, owned by its loop alone.
struct GuardLoop<B> {
    cfg: RuleGuard,
    backend: B,
    model: RulesetModel,
    addrs: Vec<LocalAddr>,
    owned: OwnedTargets,
    pins: PinSet,
    /// Rules removed before, by what they are (place and target), with counts.
    returns: HashMap<String, u64>,
    last_log: HashMap<String, Instant>,
    /// Reported rules: when each was last recorded in the audit log.
    last_recorded: HashMap<String, Instant>,
    /// Reported rules due for a record (written after each decision).
    to_record: Vec<Finding>,
    /// Reused for every batch of changes.
    changes: Vec<Change>,
    /// Changes of a batch whose `NEWGEN` has not arrived yet.
    held: Vec<Change>,
    owners_open: bool,
    /// Why the audit log cannot be written, while it cannot: removals and
    /// pin changes wait (see [`GuardReport::AuditUnavailable`]).
    audit_down: Option<String>,
    /// The chains the protected ports' probes entered, since the last full
    /// inspection (none before it): a rule added to or deleted from any other
    /// chain is applied to the model and dismissed, without an inspection.
    reached: Option<ReachedChains>,
    /// How many rules the model holds (counted on each read, then kept up to
    /// date change by change: counting ~40,000 rules per event costs).
    rules: usize,
}

impl<B: RulesetBackend> GuardLoop<B> {
    /// Reads the ruleset and settles it once.
    async fn start(mut cfg: RuleGuard, mut backend: B) -> Result<Self, GuardError> {
        let t0 = Instant::now();
        let snapshot = backend.read().await?;
        let owners = cfg.owners.borrow_and_update().clone();
        let owned = cfg.owned_targets(&owners);
        let mut guard = Self {
            cfg,
            backend,
            model: snapshot.model,
            addrs: snapshot.addrs,
            owned,
            pins: PinSet::default(),
            returns: HashMap::new(),
            last_log: HashMap::new(),
            last_recorded: HashMap::new(),
            to_record: Vec::new(),
            changes: Vec::new(),
            held: Vec::new(),
            owners_open: true,
            audit_down: None,
            reached: None,
            rules: 0,
        };
        guard.rules = guard.model.rule_count();
        guard.cfg.report(GuardReport::Inspected {
            took: t0.elapsed(),
            rules: guard.rules,
            full_read: true,
        });
        guard.settle(None, None).await?;
        info!(
            event = "rule_guard_ready",
            rules = guard.rules,
            netns = guard.cfg.netns.as_deref().unwrap_or("host"),
            "rule guard ready: watching nftables changes"
        );
        Ok(guard)
    }

    /// nf_tables changes: applied to the model in place, one batch at a time
    /// once its `NEWGEN` arrives, and only when newer than the model; a full
    /// re-read on anything the model cannot follow (tables, chains, sets, an
    /// overrun).
    async fn on_ruleset_changes(&mut self, seen: Instant) -> Result<(), GuardError> {
        let mut resync = false;
        let mut updated = false;
        // What this batch can affect: when it only adds rules, the ports,
        // hooks and families of those rules (see `Scope`).
        let mut scope = Some(Scope::default());
        // Rules added after a change that needs a full read: the read will
        // hold them, and these say who committed them.
        let mut restamp: Vec<netlink::RuleMessage> = Vec::new();
        // Whether the whole ruleset was read again (the changes' own scope
        // then says nothing: everything is inspected).
        let mut read = false;
        for pass in 1..=MAX_READS_PER_EVENT {
            let mut changes = std::mem::take(&mut self.changes);
            for c in changes.drain(..) {
                match c {
                    Change::Generation(generation) => {
                        if monitor::is_newer(generation.id, self.model.generation) {
                            let commit = self.held_commit(&generation);
                            for mut held in std::mem::take(&mut self.held) {
                                if let (Some(commit), Change::RuleAdded { msg, .. }) =
                                    (&commit, &mut held)
                                {
                                    msg.rule.set_commit(commit.clone());
                                }
                                // A full read follows: applying is pointless.
                                if resync {
                                    if let Change::RuleAdded { msg, .. } = held
                                        && msg.rule.commit().is_some()
                                    {
                                        restamp.push(msg);
                                    }
                                    continue;
                                }
                                self.apply_change(held, &mut scope, &mut updated, &mut resync);
                            }
                            monitor::apply(&mut self.model, Change::Generation(generation));
                        } else if !self.held.is_empty() {
                            // Read already (a full read came first), but who
                            // committed those rules is only said here.
                            if let Some(commit) = self.held_commit(&generation) {
                                for held in &self.held {
                                    if let Change::RuleAdded { msg, .. } = held {
                                        attribution::stamp(&mut self.model, msg, &commit);
                                    }
                                }
                            }
                            debug!(
                                event = "changes_already_read",
                                changes = self.held.len(),
                                generation = generation.id,
                                model_generation = self.model.generation,
                                "notified changes already in the model: dropped"
                            );
                            self.held.clear();
                        }
                    }
                    // Changes were lost: the re-read covers what is held.
                    Change::Overrun => {
                        self.held.clear();
                        resync = true;
                    }
                    c => self.held.push(c),
                }
            }
            self.changes = changes;
            if !resync {
                break;
            }
            self.full_read().await?;
            read = true;
            resync = false;
            for msg in restamp.drain(..) {
                if let Some(commit) = msg.rule.commit() {
                    attribution::stamp(&mut self.model, &msg, commit);
                }
            }
            // Batches announced while the read was under way: the read holds
            // their rules already, but only their announcement names who
            // committed them (a hijack committed right after a new chain is
            // in the read the chain caused). Taken now, before anything is
            // judged: those already read stamp their rules, newer ones apply.
            if pass < MAX_READS_PER_EVENT {
                self.backend.queued_changes(&mut self.changes)?;
            }
            if self.changes.is_empty() {
                break;
            }
        }
        let scope = scope.filter(|_| !read);
        if updated && !read && scope.as_ref().is_some_and(Scope::is_empty) {
            // Every change was in a chain no probe enters.
            debug!(
                event = "changes_dismissed",
                "rule changes where no protected port's connection goes: nothing to inspect"
            );
            self.cfg.report(GuardReport::Dismissed {
                took: seen.elapsed(),
            });
            return Ok(());
        }
        if read || updated {
            let stages = Stages {
                applied: Some(Instant::now()),
                ..Stages::from_notification(seen)
            };
            self.settle(Some(stages), scope.as_ref()).await?;
        }
        Ok(())
    }

    /// Who committed the held batch, when it adds rules (only those need
    /// naming; read now, while the committer may still live).
    fn held_commit(&self, generation: &monitor::NewGen) -> Option<Arc<Commit>> {
        self.held
            .iter()
            .any(|c| matches!(c, Change::RuleAdded { .. }))
            .then(|| attribution::commit_of(generation))
            .flatten()
    }

    /// One change of a batch newer than the model.
    fn apply_change(
        &mut self,
        c: Change,
        scope: &mut Option<Scope>,
        updated: &mut bool,
        resync: &mut bool,
    ) {
        let dismissed = self.unreached(&c);
        let added = match &c {
            Change::RuleAdded { msg, .. } => Some((
                msg.family,
                msg.table.clone(),
                msg.chain.clone(),
                matched_dport(msg.rule.exprs()),
            )),
            _ => None,
        };
        let adds = matches!(c, Change::RuleAdded { .. });
        match monitor::apply(&mut self.model, c) {
            Applied::Updated => {
                *updated = true;
                if adds {
                    self.rules += 1;
                } else {
                    self.rules = self.rules.saturating_sub(1);
                }
            }
            Applied::Unchanged => {}
            Applied::Resync => *resync = true,
        }
        if dismissed {
            return;
        }
        // A deletion creates no foreign rule, but observe-mode reports and
        // pins follow it: anything but an addition is inspected in full.
        *scope = match (scope.take(), added) {
            (Some(s), Some(rule)) => s.add(&self.model, rule),
            _ => None,
        };
    }

    /// Whether `c` adds or deletes a rule in a chain no probe of a protected
    /// port entered at the last inspections (see [`ReachedChains`]): it cannot
    /// change what such a connection meets. Never for the pin table's name
    /// (pins follow their rules whether or not a probe went there).
    fn unreached(&self, c: &Change) -> bool {
        let (Change::RuleAdded { msg, .. } | Change::RuleDeleted(msg)) = c else {
            return false;
        };
        msg.table != pin::PIN_TABLE
            && self
                .reached
                .as_ref()
                .is_some_and(|r| !r.contains(msg.family, &msg.table, &msg.chain))
    }

    /// An address came or went: what is local changed, re-inspect.
    async fn on_addresses_changed(&mut self) -> Result<(), GuardError> {
        debug!(
            event = "addresses_changed",
            "addresses changed: re-inspecting"
        );
        self.addrs = self.backend.local_addresses()?;
        self.settle(None, None).await
    }

    /// The owners model moved (a container started, stopped, moved address).
    async fn on_owners_changed(&mut self) -> Result<(), GuardError> {
        let owners = self.cfg.owners.borrow_and_update().clone();
        self.owned = self.cfg.owned_targets(&owners);
        self.settle(None, None).await
    }

    /// iptables-legacy announces nothing: re-read while it is in use (or was:
    /// its tables went away). Otherwise one /proc read. Whether it is in use.
    async fn on_legacy_tick(&mut self) -> Result<bool, GuardError> {
        if !self.legacy_in_use() && !self.backend.legacy_nat_in_use()? {
            return Ok(false);
        }
        self.full_read().await?;
        self.settle(None, None).await?;
        Ok(true)
    }

    /// Whether the model holds iptables-legacy tables.
    fn legacy_in_use(&self) -> bool {
        self.model
            .tables
            .iter()
            .any(|t| t.origin == TableOrigin::IptablesLegacy)
    }

    fn legacy_period(&self, in_use: bool) -> Duration {
        if in_use {
            self.cfg.legacy_poll
        } else {
            self.cfg.legacy_check
        }
    }

    /// No pin outlives the agent.
    async fn on_stop(&mut self) -> Result<(), GuardError> {
        self.pins
            .teardown(&self.model, &self.cfg.audit, &mut self.backend)
            .await
    }

    /// A model read whole replaces the old one; the rules both hold keep who
    /// committed them (a dump does not say).
    fn replace_model(&mut self, model: RulesetModel) {
        let old = std::mem::replace(&mut self.model, model);
        attribution::carry(&old, &mut self.model);
        self.rules = self.model.rule_count();
    }

    async fn full_read(&mut self) -> Result<(), GuardError> {
        let t0 = Instant::now();
        let snapshot = self.backend.read().await?;
        self.replace_model(snapshot.model);
        self.addrs = snapshot.addrs;
        self.cfg.report(GuardReport::Inspected {
            took: t0.elapsed(),
            rules: self.rules,
            full_read: true,
        });
        Ok(())
    }

    /// [`Self::reconcile`]. When the ruleset moved between the model and the
    /// batch (`ERESTART`: nothing applied), the guard reads and decides again
    /// (no error: nothing was removed, nothing recorded as removed). Any other
    /// refusal is retried once on a fresh full read before it counts as an
    /// error.
    async fn settle(
        &mut self,
        stages: Option<Stages>,
        scope: Option<&Scope>,
    ) -> Result<(), GuardError> {
        let mut scope = scope;
        let mut restarts = 0;
        loop {
            match self.reconcile(stages, scope).await {
                Err(e) if generation_moved(&e) => {
                    restarts += 1;
                    if restarts > MAX_GENERATION_RETRIES {
                        // The notification of what moved it brings us back.
                        warn!(
                            event = "generation_busy",
                            restarts, "the ruleset keeps moving: deciding again on its next change"
                        );
                        return Ok(());
                    }
                    debug!(
                        event = "generation_moved",
                        error = %e,
                        "the ruleset moved before the batch: reading and deciding again"
                    );
                    self.full_read().await?;
                    scope = None;
                }
                Err(GuardError::Transaction(e)) => {
                    warn!(
                        event = "transaction_refused",
                        error = %e,
                        "transaction refused, re-reading the ruleset and retrying"
                    );
                    self.full_read().await?;
                    return self.reconcile(stages, None).await;
                }
                other => return other,
            }
        }
    }

    /// Inspect, decide, act; then keep the pins in sync.
    async fn reconcile(
        &mut self,
        stages: Option<Stages>,
        scope: Option<&Scope>,
    ) -> Result<(), GuardError> {
        let t0 = Instant::now();
        let mut input =
            InspectInput::from_policy(&self.cfg.policy, self.owned.clone(), self.addrs.clone());
        // The guard keeps its own pins; everything else, pin-named or not, is judged.
        input.own_pins = Some(self.backend.port_id());
        if let Some(scope) = scope {
            // Only these ports' probes: rules that match another port cannot
            // change what happens to them.
            input.ports = scope
                .ports()
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
        let (findings, owned, reached) = match scope {
            None => nft::inspect_reaching(&self.model, &input, |_| true),
            Some(scope) => nft::inspect_reaching(&self.model, &input, |p| scope.wants(p)),
        };
        // A full inspection says where every probe goes; a scoped one adds
        // where its probes go now (only they can meet the rules it is about).
        match (&mut self.reached, scope) {
            (Some(known), Some(_)) => known.extend(reached),
            (known, None) => *known = Some(reached),
            (None, Some(_)) => {}
        }
        let mut stages = stages.unwrap_or_default();
        stages.inspected = Some(Instant::now());
        debug_assert_eq!(self.rules, self.model.rule_count(), "the rule count kept");
        let inspected = GuardReport::Inspected {
            took: t0.elapsed(),
            rules: self.rules,
            full_read: false,
        };
        let acted = self.act(&findings, owned, scope, stages).await;
        // Reported once acted upon: a report can wake the agent's loop on
        // another thread, and a removal must not wait for that.
        self.cfg.report(inspected);
        acted
    }

    /// Decides on the findings of an inspection, removes what is to be
    /// removed (recorded first), reports the rest; then keeps the pins in sync.
    async fn act(
        &mut self,
        findings: &[Finding],
        owned: Vec<OwnedMapping>,
        scope: Option<&Scope>,
        mut stages: Stages,
    ) -> Result<(), GuardError> {
        let (mut remove, mut reported) = (Vec::new(), Vec::new());
        for action in decide(&self.model, findings, &self.cfg.policy) {
            match action {
                Action::Remove(mut rule) => {
                    if let Some(view) = &self.cfg.cluster {
                        rule.name_source(&view.borrow());
                    }
                    remove.push(rule);
                }
                Action::Report { finding, why } => reported.push((finding, why)),
            }
        }
        stages.decided = Some(Instant::now());
        let removed = self.remove_found(remove, stages).await;
        // The rules only reported come after the removal: their log lines,
        // reports and `rule_found` records (a durable write each) must not
        // delay it.
        for (finding, why) in reported {
            self.observed(finding, why);
        }
        self.record_found().await;
        if !removed? {
            return Ok(());
        }
        self.sync_pins(owned, scope.is_none()).await
    }

    /// Removes `remove` (each recorded whole first) and reports each removal;
    /// `false` when the audit log failed before anything was deleted (the
    /// rules are withheld: the pins are left as they are too).
    async fn remove_found(
        &mut self,
        remove: Vec<ForeignRule>,
        mut stages: Stages,
    ) -> Result<bool, GuardError> {
        if !remove.is_empty() && !self.try_resume().await {
            self.withhold(remove);
        } else if !remove.is_empty() {
            let removal = match remove_audited(
                &self.cfg.audit,
                &mut self.backend,
                &remove,
                self.model.generation,
            )
            .await
            {
                Ok(removal) => removal,
                Err(GuardError::Audit(e)) => {
                    // No intent on disk: nothing was deleted.
                    self.audit_failed(&e.to_string());
                    self.withhold(remove);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            if let Some(snapshot) = removal.reread {
                // Read again after a rule went missing: the model was stale.
                self.replace_model(snapshot.model);
                self.addrs = snapshot.addrs;
            }
            // Our batch moved the generation on by one: its own notification
            // (the deletions applied below) is then not newer than the model.
            if removal.generation.is_some() {
                self.model.generation = removal.generation;
            }
            for (rule, intent, error) in &removal.unrecorded {
                error!(
                    event = "rule_removed_unrecorded",
                    rule = %rule.id(),
                    intent_seq = intent,
                    error = %error,
                    "foreign NAT rule removed, but its rule_removed record could not be \
                     written: the rule_removing record (intent_seq) holds it whole"
                );
                self.forget_own_deletion(rule);
            }
            match removal.unrecorded.first() {
                Some((_, _, error)) => self.audit_failed(error),
                None => self.audit_ok(),
            }
            stages.intent_durable = removal.intent_durable;
            stages.sent = removal.sent;
            stages.acked = removal.acked;
            let latency = stages.notified.map(|s| s.elapsed());
            for (rule, seq) in removal.removed {
                // The same rule coming back: same place and same target.
                let what = format!(
                    "{}/{}/{}/{:?}",
                    rule.table, rule.chain, rule.findings[0].port, rule.findings[0].target
                );
                let count = self.returns.entry(what.clone()).or_insert(0);
                let returns = *count;
                *count += 1;
                self.forget_own_deletion(&rule);
                if self.rate_ok(&what) {
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
                self.cfg.report(GuardReport::Removed {
                    port: rule.findings[0].port,
                    proto: rule.findings[0].proto,
                    source: rule.source().to_owned(),
                    id: rule.id(),
                    seq,
                    returns,
                    latency,
                    stages,
                });
            }
        }
        Ok(true)
    }

    /// A foreign rule reported, not removed: logged once per period, not on
    /// every re-inspection; recorded in the audit log when first seen.
    fn observed(&mut self, finding: Finding, why: &'static str) {
        let key = finding_id(&finding);
        if self.rate_ok(&key) {
            if finding.is_shadow() {
                warn!(
                    event = "owner_shadowed",
                    port = finding.port,
                    source = %finding.source,
                    rule = %key,
                    shadows = ?finding.shadows,
                    why,
                    "a foreign rule takes new connections away before the owner's mapping: \
                     the port is dead for them ({why})"
                );
            } else {
                warn!(
                    event = "foreign_rule_reported",
                    port = finding.port,
                    source = %finding.source,
                    chain = %finding.chain,
                    active = finding.active,
                    why,
                    "foreign NAT rule on a protected port ({why})"
                );
            }
            let due = self
                .last_recorded
                .get(&key)
                .is_none_or(|t| t.elapsed() >= FOUND_RECORD_PERIOD);
            if due && self.audit_down.is_none() {
                self.to_record.push(finding.clone());
            }
            self.cfg.report(GuardReport::Observed {
                finding: Box::new(finding),
                why,
            });
        }
    }

    /// Writes the records of the rules just reported (`rule_found`,
    /// `owner_shadowed`). A failure is an audit outage like any other.
    async fn record_found(&mut self) {
        for finding in std::mem::take(&mut self.to_record) {
            let key = finding_id(&finding);
            let record = crate::audit::ForeignRuleRecord {
                finding: key.clone(),
                port: finding.port,
                proto: finding.proto,
                source: finding.source.clone(),
                location: Some(format!(
                    "table {} {} chain {} {}",
                    finding.family,
                    finding.table,
                    finding.chain,
                    finding.handle.map_or_else(
                        || format!("position {}", finding.position),
                        |h| format!("handle {h}")
                    )
                )),
                rule: serde_json::to_value(&finding).expect("a finding serialises"),
                committer: attribution::committer_of(&self.model, &finding).map(Box::new),
            };
            let event = if finding.is_shadow() {
                AuditEvent::OwnerShadowed(record)
            } else {
                AuditEvent::RuleFound(record)
            };
            match self.cfg.audit.record(event).await {
                Ok(_) => {
                    if self.last_recorded.len() >= FOUND_RECORD_MEMORY {
                        self.last_recorded
                            .retain(|_, t| t.elapsed() < FOUND_RECORD_PERIOD);
                    }
                    self.last_recorded.insert(key, Instant::now());
                }
                Err(e) => {
                    self.audit_failed(&e.to_string());
                    self.to_record.clear();
                    return;
                }
            }
        }
    }

    async fn sync_pins(&mut self, owned: Vec<OwnedMapping>, full: bool) -> Result<(), GuardError> {
        // Pins change only recorded: while the log is down they stay as they are.
        if !self.try_resume().await {
            return Ok(());
        }
        let wanted = self
            .pins
            .wanted(&self.cfg.policy, &self.owned, &self.addrs, owned, full);
        let tables = pin::PinTables::of(&self.model, self.backend.port_id());
        if let Some(foreign) = self.pins.foreign_tables(&tables, &wanted) {
            if foreign.tables.is_empty() {
                info!(
                    event = "foreign_pin_table_gone",
                    "no other table holds the pin table's name any more: pins can be installed"
                );
            } else {
                warn!(
                    event = "foreign_pin_table",
                    tables = ?foreign.tables,
                    pins_withheld = foreign.withheld.len(),
                    "a table named `portguard` that is not this agent's: left alone (never deleted); \
                     no pin in its family while it is there. If it is a leftover, delete it \
                     yourself (`nft delete table <family> portguard`)"
                );
            }
            self.cfg.report(GuardReport::ForeignPinTables {
                tables: foreign.tables,
                withheld: foreign.withheld,
            });
        }
        let synced = match self
            .pins
            .sync(
                &self.model,
                &tables,
                wanted,
                &self.cfg.audit,
                &mut self.backend,
            )
            .await
        {
            Ok(synced) => synced,
            Err(GuardError::Audit(e)) => {
                // Pins change only recorded: they stay as they are meanwhile.
                self.audit_failed(&e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match synced {
            PinSync::InSync { ahead } if !ahead.is_empty() => {
                if self.rate_ok(PIN_OVERTAKEN_KEY) {
                    warn!(
                        event = "pin_overtaken",
                        ?ahead,
                        "a nat chain runs at or ahead of the pin's priority"
                    );
                }
                self.cfg.report(GuardReport::PinOvertaken { chains: ahead });
            }
            PinSync::InSync { .. } | PinSync::Cleared => {}
            PinSync::Written { pins } => {
                // Its records were written.
                self.audit_ok();
                self.cfg.report(GuardReport::PinSynced { pins });
            }
        }
        Ok(())
    }

    /// Rules decided for removal while the audit log is down: reported instead.
    fn withhold(&mut self, rules: Vec<ForeignRule>) {
        for rule in rules {
            for finding in rule.findings {
                self.observed(finding, AUDIT_DOWN_WHY);
            }
        }
    }

    /// Applies our own confirmed deletion to the model now (after any re-read
    /// and the generation update): its notification is then a no-op.
    fn forget_own_deletion(&mut self, rule: &ForeignRule) {
        let applied = monitor::apply(
            &mut self.model,
            Change::RuleDeleted(netlink::RuleMessage {
                family: rule.family,
                table: rule.table.clone(),
                chain: rule.chain.clone(),
                position: None,
                rule: nft::model::Rule::new(rule.handle, Vec::new(), None),
            }),
        );
        if applied == Applied::Updated {
            self.rules = self.rules.saturating_sub(1);
        }
    }

    /// The audit log was down: a record saying it is back is the test; once
    /// written, everything withheld is decided again.
    async fn on_audit_retry(&mut self) -> Result<(), GuardError> {
        if self.try_resume().await {
            self.settle(None, None).await
        } else {
            Ok(())
        }
    }

    /// While the audit log is down: writes `audit_resumed` (the first record
    /// after the outage, naming it); true when the log is up (again).
    async fn try_resume(&mut self) -> bool {
        let Some(error) = self.audit_down.clone() else {
            return true;
        };
        match self
            .cfg
            .audit
            .record(AuditEvent::AuditResumed { error })
            .await
        {
            Ok(_) => {
                self.audit_ok();
                true
            }
            Err(e) => {
                debug!(event = "audit_still_unavailable", error = %e);
                false
            }
        }
    }

    /// The audit log failed: removals and pin changes wait; said once per outage.
    fn audit_failed(&mut self, error: &str) {
        if self.audit_down.is_none() {
            error!(
                event = "audit_unavailable",
                error,
                retry_s = AUDIT_RETRY.as_secs(),
                "the audit log cannot be written: foreign rules are reported, not removed, \
                 and pins stay as they are until it can (binds are still guarded)"
            );
            self.cfg.report(GuardReport::AuditUnavailable {
                error: Some(error.to_owned()),
            });
        }
        self.audit_down = Some(error.to_owned());
    }

    /// A record was written: if the log was down, it is back.
    fn audit_ok(&mut self) {
        if self.audit_down.take().is_some() {
            info!(
                event = "audit_available",
                "the audit log can be written again: removals resume"
            );
            self.cfg
                .report(GuardReport::AuditUnavailable { error: None });
        }
    }

    fn rate_ok(&mut self, key: &str) -> bool {
        let now = Instant::now();
        match self.last_log.get(key) {
            Some(t) if now.duration_since(*t) < RETURN_LOG_PERIOD => false,
            _ => {
                self.last_log.insert(key.to_owned(), now);
                true
            }
        }
    }
}

/// A reported rule's id: `family/table/chain/handle` (`#position` for
/// iptables-legacy), and the port.
fn finding_id(f: &Finding) -> String {
    format!(
        "{}/{}/{}/{}:{}",
        f.family,
        f.table,
        f.chain,
        f.handle
            .map_or_else(|| format!("#{}", f.position), |h| h.to_string()),
        f.port
    )
}
