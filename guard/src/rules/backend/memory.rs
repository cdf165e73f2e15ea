//! [`MemoryBackend`]: a deterministic in-memory nf_tables for unit tests.
//!
//! It holds a [`RulesetModel`], the local addresses and a generation counter.
//! A committed batch is checked whole first (atomic, as the kernel does: one
//! failing operation applies nothing and fails with the errno the kernel would
//! give), then applied to the model, and announced with the [`Change`]s the
//! kernel would send (`NEWRULE` with the handle of the rule it follows,
//! `DELRULE`, table and chain messages, then `NEWGEN`), so the guard's
//! incremental path runs as it does against the kernel.
//!
//! Like the kernel, it refuses a batch decided on another generation
//! ([`Transaction::generation`]) with `ERESTART`; every change another program
//! makes moves the generation on.
//!
//! A test drives it through a [`MemoryControl`]: it adds rules as another
//! program would (announced, or unannounced behind an overrun), re-creates a
//! table with new handles (or with handles started again, as the kernel does
//! for a table deleted and created again), makes a rule vanish or anything
//! else happen just before the next commit, changes the addresses, and
//! inspects every committed batch.

use std::{
    io,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use tokio::sync::Notify;

use super::{BackendError, BackendEvent, RulesetBackend, RulesetSnapshot};
use crate::nft::{
    LocalAddr, RulesetModel,
    model::{BaseHook, Chain, Family, RawExprs, Rule, Table},
    monitor::{Change, NewGen},
    netlink::RuleMessage,
    transaction::{Op, OpFailure, Placement, Transaction, TransactionError},
};
use crate::sys::uapi::ERESTART;

/// `NFT_MSG_*` numbers of the structural messages the model announces
/// (`linux/netfilter/nf_tables.h`, `enum nf_tables_msg_types`).
const NFT_MSG_NEWTABLE: u16 = libc::NFT_MSG_NEWTABLE as u16;
const NFT_MSG_DELTABLE: u16 = libc::NFT_MSG_DELTABLE as u16;
const NFT_MSG_NEWCHAIN: u16 = libc::NFT_MSG_NEWCHAIN as u16;
/// The chain type the pin's chains are (`type nat`).
const NAT_CHAIN_TYPE: &str = "nat";
/// The netlink port id of the in-memory writer: the owner of the tables it
/// creates with `owner`.
pub const MEMORY_PORT_ID: u32 = 4242;

/// One batch the guard committed, and what came of it.
#[derive(Clone, Debug)]
pub struct Committed {
    pub tx: Transaction,
    /// The generation after the commit (unchanged when it failed).
    pub generation: u32,
    /// `Err(errno)` of the first failing operation: nothing was applied.
    pub result: Result<(), i32>,
}

/// Called with each batch before it is applied (a test looks at the world as
/// it is at that moment, e.g. the audit log).
type CommitWitness = Box<dyn FnMut(&Transaction) + Send>;
/// Another program acting once, at a moment a test picks: just before the
/// next batch is applied (between the guard's read and its commit), or when
/// the next read is taken.
type OtherProgram = Box<dyn FnOnce(&MemoryControl) + Send>;

struct State {
    model: RulesetModel,
    addrs: Vec<LocalAddr>,
    generation: u32,
    next_handle: u64,
    /// Announced and not yet taken by `next_event`.
    pending: Vec<Change>,
    addresses_changed: bool,
    legacy_nat_in_use: bool,
    committed: Vec<Committed>,
    /// Rules deleted (announced) just before the next commit is applied.
    vanish: Vec<RulePlace>,
    witness: Option<CommitWitness>,
    before_commit: Option<OtherProgram>,
    /// Runs once, when the next read is taken (before its snapshot).
    during_read: Option<OtherProgram>,
    /// The process another program's batches are announced as committed by
    /// (`NFTA_GEN_PROC_PID`, `NFTA_GEN_PROC_NAME`); none: the generation names
    /// no one.
    committer: Option<(u32, String)>,
    /// Whether a batch's generation is checked (a kernel before
    /// `NFNL_BATCH_GENID` ignores it).
    generation_checked: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A rule's place: family, table, chain, handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulePlace {
    pub family: Family,
    pub table: String,
    pub chain: String,
    pub handle: u64,
}

/// The in-memory ruleset the guard runs against (see the module doc).
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

/// The test's side of a [`MemoryBackend`].
#[derive(Clone)]
pub struct MemoryControl {
    shared: Arc<Shared>,
}

impl MemoryBackend {
    /// A backend holding `model` and `addrs`, at generation 1.
    pub fn new(model: RulesetModel, addrs: Vec<LocalAddr>) -> (Self, MemoryControl) {
        let next_handle = model
            .tables
            .iter()
            .flat_map(|t| {
                std::iter::once(t.handle)
                    .chain(t.chains.iter().map(|c| c.handle))
                    .chain(
                        t.chains
                            .iter()
                            .flat_map(|c| c.rules.iter().map(|r| r.handle)),
                    )
            })
            .max()
            .unwrap_or(0)
            + 1;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                model,
                addrs,
                generation: 1,
                next_handle,
                pending: Vec::new(),
                addresses_changed: false,
                legacy_nat_in_use: false,
                committed: Vec::new(),
                vanish: Vec::new(),
                witness: None,
                before_commit: None,
                during_read: None,
                committer: None,
                generation_checked: true,
            }),
            wake: Notify::new(),
        });
        (
            Self {
                shared: shared.clone(),
            },
            MemoryControl { shared },
        )
    }
}

impl RulesetBackend for MemoryBackend {
    async fn read(&mut self) -> Result<RulesetSnapshot, BackendError> {
        let during = self.shared.lock().during_read.take();
        if let Some(act) = during {
            act(&MemoryControl {
                shared: self.shared.clone(),
            });
        }
        let st = self.shared.lock();
        let mut model = st.model.clone();
        model.generation = Some(st.generation);
        Ok(RulesetSnapshot {
            model,
            addrs: st.addrs.clone(),
        })
    }

    async fn next_event(
        &mut self,
        changes: &mut Vec<Change>,
    ) -> Result<BackendEvent, BackendError> {
        loop {
            // Registered before the state is looked at: a wake-up in between is kept.
            let woken = self.shared.wake.notified();
            {
                let mut st = self.shared.lock();
                if !st.pending.is_empty() {
                    changes.append(&mut st.pending);
                    return Ok(BackendEvent::Ruleset {
                        seen: Instant::now(),
                    });
                }
                if std::mem::take(&mut st.addresses_changed) {
                    return Ok(BackendEvent::AddressesChanged);
                }
            }
            woken.await;
        }
    }

    fn local_addresses(&mut self) -> Result<Vec<LocalAddr>, BackendError> {
        Ok(self.shared.lock().addrs.clone())
    }

    fn queued_changes(&mut self, changes: &mut Vec<Change>) -> Result<(), BackendError> {
        changes.append(&mut self.shared.lock().pending);
        Ok(())
    }

    fn legacy_nat_in_use(&mut self) -> Result<bool, BackendError> {
        Ok(self.shared.lock().legacy_nat_in_use)
    }

    fn port_id(&self) -> u32 {
        MEMORY_PORT_ID
    }

    fn commit(&mut self, tx: &Transaction) -> Result<(), TransactionError> {
        let mut st = self.shared.lock();
        if let Some(witness) = &mut st.witness {
            witness(tx);
        }
        if let Some(before) = st.before_commit.take() {
            drop(st);
            before(&MemoryControl {
                shared: self.shared.clone(),
            });
            st = self.shared.lock();
        }
        for place in std::mem::take(&mut st.vanish) {
            st.delete_rule(&place, true);
        }
        if tx.is_empty() {
            return Ok(());
        }
        // Decided on another generation: the kernel refuses it whole.
        if let Some(decided_on) = tx.generation
            && st.generation_checked
            && decided_on != st.generation
        {
            let generation = st.generation;
            st.committed.push(Committed {
                tx: tx.clone(),
                generation,
                result: Err(ERESTART),
            });
            return Err(TransactionError::GenerationMoved { decided_on });
        }
        // Atomic: checked on a copy, applied only when every operation succeeds.
        let mut trial = st.model.clone();
        let mut next_handle = st.next_handle;
        let mut announced = Vec::new();
        for (index, op) in tx.ops.iter().enumerate() {
            if let Err(errno) = apply_op(
                &mut trial,
                &mut next_handle,
                MEMORY_PORT_ID,
                op,
                &mut announced,
            ) {
                let generation = st.generation;
                st.committed.push(Committed {
                    tx: tx.clone(),
                    generation,
                    result: Err(errno),
                });
                return Err(TransactionError::Rejected {
                    failures: vec![OpFailure {
                        index,
                        op: op.to_string(),
                        error: io::Error::from_raw_os_error(errno),
                    }],
                });
            }
        }
        st.model = trial;
        st.next_handle = next_handle;
        st.generation += 1;
        announced.push(Change::Generation(NewGen::id(st.generation)));
        st.pending.append(&mut announced);
        let generation = st.generation;
        st.committed.push(Committed {
            tx: tx.clone(),
            generation,
            result: Ok(()),
        });
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }
}

/// A rule as a notification carries it (the handle of the rule it follows).
fn rule_message(family: Family, table: &str, chain: &Chain, index: usize) -> RuleMessage {
    RuleMessage {
        family,
        table: table.to_owned(),
        chain: chain.name.clone(),
        position: index.checked_sub(1).map(|i| chain.rules[i].handle),
        rule: chain.rules[index].clone(),
    }
}

/// The announcement of the rule at `index` (first in its chain: inserted at the start).
fn rule_added(family: Family, table: &str, chain: &Chain, index: usize) -> Change {
    Change::RuleAdded {
        msg: rule_message(family, table, chain, index),
        appended: index > 0,
    }
}

fn find_table<'m>(
    model: &'m mut RulesetModel,
    family: Family,
    name: &str,
) -> Option<&'m mut Table> {
    model
        .tables
        .iter_mut()
        .find(|t| t.family == family && t.name == name)
}

fn find_chain<'m>(
    model: &'m mut RulesetModel,
    family: Family,
    table: &str,
    chain: &str,
) -> Option<&'m mut Chain> {
    find_table(model, family, table)?
        .chains
        .iter_mut()
        .find(|c| c.name == chain)
}

/// A rule holding these raw `NFTA_RULE_EXPRESSIONS` (decoded when first asked).
fn raw_rule(handle: u64, exprs: &[u8], userdata: Option<&[u8]>) -> Rule {
    let raw = |b: &[u8]| RawExprs::new(Arc::new(b.to_vec()), 0..b.len());
    Rule::from_raw(handle, raw(exprs), None).with_userdata(userdata.map(raw))
}

/// `EPERM` when `table` belongs to another socket than `port_id` (the kernel's
/// `nft_table_lookup`: an owned table is reachable by its owner only).
fn check_owner(table: &Table, port_id: u32) -> Result<(), i32> {
    match table.owner {
        Some(owner) if owner != port_id => Err(libc::EPERM),
        _ => Ok(()),
    }
}

/// Applies one operation as the kernel would, for a writer of netlink port
/// `port_id`; `Err(errno)` when it would refuse it.
fn apply_op(
    model: &mut RulesetModel,
    next_handle: &mut u64,
    port_id: u32,
    op: &Op,
    announced: &mut Vec<Change>,
) -> Result<(), i32> {
    let owner_ok = |model: &mut RulesetModel, family: Family, table: &str| {
        find_table(model, family, table).map_or(Ok(()), |t| check_owner(t, port_id))
    };
    let mut handle = || {
        let h = *next_handle;
        *next_handle += 1;
        h
    };
    match op {
        Op::DeleteRule {
            family,
            table,
            chain,
            handle: gone,
        } => {
            owner_ok(model, *family, table)?;
            let c = find_chain(model, *family, table, chain).ok_or(libc::ENOENT)?;
            let i = c
                .rules
                .iter()
                .position(|r| r.handle == *gone)
                .ok_or(libc::ENOENT)?;
            let msg = rule_message(*family, table, c, i);
            c.rules.remove(i);
            announced.push(Change::RuleDeleted(msg));
        }
        Op::AddRule {
            family,
            table,
            chain,
            exprs,
            userdata,
            placement,
            ..
        } => {
            owner_ok(model, *family, table)?;
            let c = find_chain(model, *family, table, chain).ok_or(libc::ENOENT)?;
            let at = |h: &u64| c.rules.iter().position(|r| r.handle == *h);
            let index = match placement {
                Placement::After(h) => at(h).ok_or(libc::ENOENT)? + 1,
                Placement::Before(h) => at(h).ok_or(libc::ENOENT)?,
                Placement::Append => c.rules.len(),
                Placement::Prepend => 0,
            };
            c.rules
                .insert(index, raw_rule(handle(), exprs, userdata.as_deref()));
            announced.push(rule_added(*family, table, c, index));
        }
        Op::AddTable {
            family,
            name,
            owner,
        } => {
            if let Some(t) = find_table(model, *family, name) {
                check_owner(t, port_id)?;
                // An owned table is created with NLM_F_EXCL.
                if *owner {
                    return Err(libc::EEXIST);
                }
            } else {
                model.tables.push(Table {
                    family: *family,
                    name: name.clone(),
                    handle: handle(),
                    owner: owner.then_some(port_id),
                    ..Table::default()
                });
                announced.push(Change::Structural {
                    msg: NFT_MSG_NEWTABLE,
                    family: *family,
                });
            }
        }
        Op::AddNatChain {
            family,
            table,
            name,
            hook,
            priority,
        } => {
            let h = handle();
            let t = find_table(model, *family, table).ok_or(libc::ENOENT)?;
            check_owner(t, port_id)?;
            if t.chain(name).is_none() {
                t.chains.push(Chain {
                    name: name.clone(),
                    handle: h,
                    base: Some(BaseHook {
                        hook: *hook,
                        priority: *priority,
                        kind: NAT_CHAIN_TYPE.into(),
                        policy: None,
                    }),
                    rules: Default::default(),
                });
                announced.push(Change::Structural {
                    msg: NFT_MSG_NEWCHAIN,
                    family: *family,
                });
            }
        }
        Op::DeleteTable { family, handle, .. } => {
            let i = model
                .tables
                .iter()
                .position(|t| t.family == *family && t.handle == *handle)
                .ok_or(libc::ENOENT)?;
            check_owner(&model.tables[i], port_id)?;
            model.tables.remove(i);
            announced.push(Change::Structural {
                msg: NFT_MSG_DELTABLE,
                family: *family,
            });
        }
    }
    Ok(())
}

impl State {
    /// One change batch from another program: the model moves a generation on.
    fn announce(&mut self, mut changes: Vec<Change>) {
        self.generation += 1;
        if !changes.is_empty() {
            let mut generation = NewGen::id(self.generation);
            generation.by = self.committer.clone();
            changes.push(Change::Generation(generation));
            self.pending.append(&mut changes);
        }
    }

    fn add_rule(&mut self, at: &RuleTarget<'_>, announce: bool) -> u64 {
        let handle = self.next_handle;
        self.next_handle += 1;
        let chain = find_chain(&mut self.model, at.family, at.table, at.chain)
            .expect("MemoryControl::add_rule: the chain exists");
        let index = chain.rules.len();
        chain.rules.push(raw_rule(handle, at.exprs, None));
        let change = rule_added(at.family, at.table, chain, index);
        self.announce(if announce { vec![change] } else { Vec::new() });
        handle
    }

    fn delete_rule(&mut self, place: &RulePlace, announce: bool) -> bool {
        let mut changes = Vec::new();
        let Some(chain) = find_chain(&mut self.model, place.family, &place.table, &place.chain)
        else {
            return false;
        };
        let Some(i) = chain.rules.iter().position(|r| r.handle == place.handle) else {
            return false;
        };
        let msg = rule_message(place.family, &place.table, chain, i);
        chain.rules.remove(i);
        if announce {
            changes.push(Change::RuleDeleted(msg));
        }
        self.announce(changes);
        true
    }
}

/// Where [`MemoryControl::add_rule`] puts a rule (appended to the chain).
pub struct RuleTarget<'a> {
    pub family: Family,
    pub table: &'a str,
    pub chain: &'a str,
    /// Raw `NFTA_RULE_EXPRESSIONS`.
    pub exprs: &'a [u8],
}

impl MemoryControl {
    fn edit<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.shared.lock());
        self.shared.wake.notify_one();
        out
    }

    /// Another program appends a rule (announced); its handle.
    pub fn add_rule(&self, at: &RuleTarget<'_>) -> u64 {
        self.edit(|st| st.add_rule(at, true))
    }

    /// A rule appended whose announcement is lost (see [`Self::overrun`]).
    pub fn add_rule_unannounced(&self, at: &RuleTarget<'_>) -> u64 {
        self.edit(|st| st.add_rule(at, false))
    }

    /// Another program deletes a rule (announced); false when it was not there.
    pub fn delete_rule(&self, place: &RulePlace) -> bool {
        self.edit(|st| st.delete_rule(place, true))
    }

    /// The notification socket overflowed (`ENOBUFS`): changes were lost.
    pub fn overrun(&self) {
        self.edit(|st| st.pending.push(Change::Overrun));
    }

    /// The rule is deleted by someone else just before the next commit is
    /// applied: between the guard's read and its batch.
    pub fn vanish_before_next_commit(&self, place: RulePlace) {
        self.edit(|st| st.vanish.push(place));
    }

    /// The table is deleted and created again whole (`nft -f` of a saved
    /// ruleset): every chain and rule gets a new handle; announced as the
    /// kernel does. The (old, new) rule handles.
    pub fn recreate_table(&self, family: Family, name: &str) -> Vec<(u64, u64)> {
        self.edit(|st| {
            let mut next = st.next_handle;
            let mut renamed = Vec::new();
            let mut changes = vec![Change::Structural {
                msg: NFT_MSG_DELTABLE,
                family,
            }];
            let table = find_table(&mut st.model, family, name)
                .expect("MemoryControl::recreate_table: the table exists");
            table.handle = next;
            next += 1;
            changes.push(Change::Structural {
                msg: NFT_MSG_NEWTABLE,
                family,
            });
            for chain in &mut table.chains {
                chain.handle = next;
                next += 1;
                changes.push(Change::Structural {
                    msg: NFT_MSG_NEWCHAIN,
                    family,
                });
                for i in 0..chain.rules.len() {
                    renamed.push((chain.rules[i].handle, next));
                    if let Some(r) = chain.rules.get_mut(i) {
                        r.handle = next;
                    }
                    next += 1;
                    changes.push(rule_added(family, name, chain, i));
                }
            }
            st.next_handle = next;
            st.announce(changes);
            renamed
        })
    }

    /// The table is deleted and created again by a program that starts its
    /// handles again (`iptables-nft-restore` without `--noflush`: the kernel
    /// numbers a new table's objects from 1): its chains keep their hooks,
    /// and hold exactly `rules` (chain, handle, raw expressions), in order.
    /// Announced as the kernel does, in one generation.
    pub fn recreate_table_as(&self, family: Family, name: &str, rules: &[(&str, u64, Vec<u8>)]) {
        self.edit(|st| {
            let mut changes = vec![
                Change::Structural {
                    msg: NFT_MSG_DELTABLE,
                    family,
                },
                Change::Structural {
                    msg: NFT_MSG_NEWTABLE,
                    family,
                },
            ];
            let table = find_table(&mut st.model, family, name)
                .expect("MemoryControl::recreate_table_as: the table exists");
            for chain in &mut table.chains {
                chain.rules.clear();
                changes.push(Change::Structural {
                    msg: NFT_MSG_NEWCHAIN,
                    family,
                });
            }
            for (chain, handle, exprs) in rules {
                let c = table
                    .chains
                    .iter_mut()
                    .find(|c| c.name == *chain)
                    .expect("MemoryControl::recreate_table_as: the chain exists");
                c.rules.push(raw_rule(*handle, exprs, None));
                changes.push(rule_added(family, name, c, c.rules.len() - 1));
            }
            st.announce(changes);
        })
    }

    /// Another program creates a table with one nat base chain (`nft add
    /// table …; add chain … { type nat hook … }`), owned by netlink port
    /// `owner` (`flags owner`) or by no one; announced. The table's handle.
    pub fn add_table(
        &self,
        family: Family,
        name: &str,
        owner: Option<u32>,
        chain: (&str, crate::nft::Hook, i32),
    ) -> u64 {
        self.edit(|st| {
            let (table, chain_handle) = (st.next_handle, st.next_handle + 1);
            st.next_handle += 2;
            let (chain, hook, priority) = chain;
            st.model.tables.push(Table {
                family,
                name: name.to_owned(),
                handle: table,
                owner,
                chains: vec![Chain {
                    name: chain.to_owned(),
                    handle: chain_handle,
                    base: Some(BaseHook {
                        hook,
                        priority,
                        kind: NAT_CHAIN_TYPE.into(),
                        policy: None,
                    }),
                    rules: Default::default(),
                }],
                ..Table::default()
            });
            st.announce(vec![
                Change::Structural {
                    msg: NFT_MSG_NEWTABLE,
                    family,
                },
                Change::Structural {
                    msg: NFT_MSG_NEWCHAIN,
                    family,
                },
            ]);
            table
        })
    }

    /// Another program deletes a table (announced); false when there was none.
    pub fn delete_table(&self, family: Family, name: &str) -> bool {
        self.edit(|st| {
            let before = st.model.tables.len();
            st.model
                .tables
                .retain(|t| !(t.family == family && t.name == name));
            let gone = st.model.tables.len() < before;
            if gone {
                st.announce(vec![Change::Structural {
                    msg: NFT_MSG_DELTABLE,
                    family,
                }]);
            }
            gone
        })
    }

    /// `act` runs once, when the guard next reads the whole ruleset, before
    /// the read is taken: what another program commits while a dump is under
    /// way (the read holds it, its announcement is still queued).
    pub fn during_next_read(&self, act: impl FnOnce(&MemoryControl) + Send + 'static) {
        self.shared.lock().during_read = Some(Box::new(act));
    }

    /// Another program's batches are announced from now on as committed by
    /// process `pid` named `name` (as the kernel names it in `NEWGEN`).
    pub fn set_committer(&self, pid: u32, name: &str) {
        self.shared.lock().committer = Some((pid, name.to_owned()));
    }

    /// `act` runs once, just before the next batch is applied (after the
    /// witness): what another program does between the guard's read and its
    /// commit. It may use this control.
    pub fn before_next_commit(&self, act: impl FnOnce(&MemoryControl) + Send + 'static) {
        self.shared.lock().before_commit = Some(Box::new(act));
    }

    /// Whether batches are checked against their generation (true, as the
    /// kernel does since `NFNL_BATCH_GENID`; false: an older kernel).
    pub fn set_generation_checked(&self, checked: bool) {
        self.edit(|st| st.generation_checked = checked);
    }

    /// The local addresses change (announced).
    pub fn set_addresses(&self, addrs: Vec<LocalAddr>) {
        self.edit(|st| {
            st.addrs = addrs;
            st.addresses_changed = true;
        });
    }

    /// Whether an iptables-legacy nat table is in use.
    pub fn set_legacy_nat_in_use(&self, in_use: bool) {
        self.edit(|st| st.legacy_nat_in_use = in_use);
    }

    /// `witness` sees every batch before it is applied (it must not call back
    /// into this control: the backend is locked meanwhile).
    pub fn on_commit(&self, witness: impl FnMut(&Transaction) + Send + 'static) {
        self.shared.lock().witness = Some(Box::new(witness));
    }

    /// Every batch committed so far, in order.
    pub fn committed(&self) -> Vec<Committed> {
        self.shared.lock().committed.clone()
    }

    /// The model now.
    pub fn model(&self) -> RulesetModel {
        let st = self.shared.lock();
        let mut model = st.model.clone();
        model.generation = Some(st.generation);
        model
    }

    /// The handles of a chain's rules, in order (empty when there is no such chain).
    pub fn handles(&self, family: Family, table: &str, chain: &str) -> Vec<u64> {
        find_chain(&mut self.shared.lock().model, family, table, chain)
            .map(|c| c.rules.iter().map(|r| r.handle).collect())
            .unwrap_or_default()
    }
}
