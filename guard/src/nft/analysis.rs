//! Reachability: which rules rewrite the destination of a new connection to a
//! protected port, and whether the connection reaches them today.
//!
//! The analysis follows one concrete *probe* at a time: a new connection (first
//! packet) to `local address : protected port`, arriving from outside
//! (prerouting) or opened on this host (output). Everything the probe fixes
//! (daddr, dport, l4proto, iif, ct state new) is evaluated exactly; what it does
//! not fix (saddr, marks, randomness, opaque matches) is "maybe". The probe walks
//! every nat base chain of its hook in priority order, following jump, goto and
//! verdict maps, like the kernel: the first NAT binding wins, and whatever comes
//! after a rewrite every such packet has taken is *shadowed* (latent).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{
    model::{
        BaseHook, CmpOp, Data, Expr, Family, Hook, NatKind, PayloadBase, RulesetModel, Set, Verdict,
    },
    packet::{ProbePacket, Tri},
    xt::{self, XtAction},
};
use crate::sys::uapi::{
    ETH_P_IP, ETH_P_IPV6, IFNAMSIZ, NF_CT_STATE_NEW_BIT, NFT_CT_DIRECTION, NFT_CT_STATE,
    NFT_FIB_RESULT_ADDRTYPE, NFT_META_IIF, NFT_META_IIFNAME, NFT_META_L4PROTO, NFT_META_NFPROTO,
    NFT_META_OIF, NFT_META_OIFNAME, NFT_META_PROTOCOL, NFT_REG_VERDICT, NFTA_FIB_F_DADDR,
    NFTA_FIB_F_IIF, NFTA_FIB_F_OIF, NFTA_FIB_F_PRESENT, RTN_LOCAL,
};

/// How surely the probe reaches a point of the ruleset. Ordered: weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reach {
    /// The rule matches the probe, but every such connection was rewritten,
    /// dropped or sent elsewhere before (latent).
    Shadowed,
    /// Some such connections may reach it (it depends on what the probe does not fix).
    Possible,
    /// Every such connection reaches it.
    Definite,
}

impl Reach {
    fn weaken(self) -> Self {
        self.min(Self::Possible)
    }
}

/// What a rewriting rule does to the probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rewrite {
    Dnat {
        addr: Option<IpAddr>,
        port: Option<u16>,
    },
    Redirect {
        port: Option<u16>,
    },
    Tproxy {
        addr: Option<IpAddr>,
        port: Option<u16>,
    },
    /// An iptables target that cannot be decoded, on a rule that matches the probe.
    Opaque(String),
}

/// A rule of the model: table, chain and rule indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub table: usize,
    pub chain: usize,
    pub rule: usize,
}

/// One rewrite the probe meets.
#[derive(Clone, Debug)]
pub struct Hit {
    pub at: RuleRef,
    pub rewrite: Rewrite,
    pub reach: Reach,
    /// The chains from the base chain down to the rule's chain.
    pub path: Vec<usize>,
    /// The base chain the walk started from (table, chain), for its priority.
    pub base: (usize, usize),
    /// The statement that rewrites, in words ("iptables target DNAT", "nft dnat").
    pub how: String,
    /// Other base chains at the same hook and priority, in other tables, that
    /// may run before this one and take the probe: the kernel runs equal
    /// priorities newest-registered first, and a dump does not show when a
    /// chain was registered. The hit's reach then counts the order that
    /// reaches it (at most "possible"). Empty: the order is known or harmless.
    pub order_unknown_with: Vec<(usize, usize)>,
}

/// A rule that takes the probe away from what follows it without rewriting
/// it: accept, drop, return, goto, or another terminal statement. What
/// follows (the owner's mapping, say) no longer sees those connections.
#[derive(Clone, Debug)]
pub struct Taker {
    pub at: RuleRef,
    /// How surely the probe reaches the rule.
    pub reach: Reach,
    /// The chains from the base chain down to the rule's chain.
    pub path: Vec<usize>,
    /// The base chain the walk started from (table, chain).
    pub base: (usize, usize),
    /// What it does, in words ("accept", "return", "goto FOREIGN", "may drop").
    pub how: String,
    /// As [`Hit::order_unknown_with`]: equal-priority base chains in other
    /// tables that may take the probe first (a NAT binding made there ends
    /// the nat hook before this rule runs).
    pub order_unknown_with: Vec<(usize, usize)>,
}

/// Everything one probe's walk met.
#[derive(Debug, Default)]
pub struct Walk {
    /// Every rewrite, in rule order.
    pub hits: Vec<Hit>,
    /// Every rule that took the probe (or may have) in a nat chain while it
    /// was still reachable, in rule order.
    pub takers: Vec<Taker>,
}

/// Indexes over the model, built once per inspection.
pub struct RulesetIndex<'m> {
    model: &'m RulesetModel,
    sets: Vec<HashMap<&'m str, SetIndex<'m>>>,
    /// Base chain lists, per (hook, v6, tproxy), found once per index (every
    /// probe of an inspection asks; a scan of ~20,000 chains each time adds up).
    bases: std::cell::RefCell<HashMap<BaseKey, BaseChains>>,
    /// Every chain a walk entered, as (table, chain) indices.
    reached: std::cell::RefCell<std::collections::HashSet<(usize, usize)>>,
    /// Whether walks take a long chain's port dispatch (see
    /// [`PortDispatch`](super::dispatch::PortDispatch)) or every rule.
    dispatch: bool,
}

/// Which base chains: (hook, v6, filter chains for tproxy).
type BaseKey = (Hook, bool, bool);
/// Base chains as (table, chain) indices, in the kernel's order.
pub type BaseChains = std::rc::Rc<[(usize, usize)]>;

impl RulesetIndex<'_> {
    /// The index of chain `name` in table `ti`.
    pub fn chain(&self, ti: usize, name: &str) -> Option<usize> {
        self.model.tables.get(ti)?.chain_position(name)
    }
}

struct SetIndex<'m> {
    set: &'m Set,
    /// Exact keys → element, for plain (non-interval) sets.
    exact: Option<HashMap<&'m [u8], usize>>,
    /// Interval boundaries sorted by key: (key, is_end), for rbtree-style sets.
    bounds: Vec<(&'m [u8], bool)>,
}

impl<'m> RulesetIndex<'m> {
    pub fn new(model: &'m RulesetModel) -> Self {
        let sets = model
            .tables
            .iter()
            .map(|t| {
                t.sets
                    .iter()
                    .map(|s| {
                        let exact = (!s.is_interval()).then(|| {
                            s.elements
                                .iter()
                                .enumerate()
                                .filter(|(_, e)| !e.is_catchall())
                                .map(|(i, e)| (e.key.as_slice(), i))
                                .collect()
                        });
                        let mut bounds: Vec<(&[u8], bool)> = if s.is_interval() {
                            s.elements
                                .iter()
                                .filter(|e| e.key_end.is_none() && !e.is_catchall())
                                .map(|e| (e.key.as_slice(), e.is_interval_end()))
                                .collect()
                        } else {
                            Vec::new()
                        };
                        // Ends sort before starts at the same key: a start there wins.
                        bounds.sort_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
                        (
                            s.name.as_str(),
                            SetIndex {
                                set: s,
                                exact,
                                bounds,
                            },
                        )
                    })
                    .collect()
            })
            .collect();
        Self {
            model,
            sets,
            bases: std::cell::RefCell::default(),
            reached: std::cell::RefCell::default(),
            dispatch: true,
        }
    }

    /// Every chain the walks over this index entered so far, as (table,
    /// chain) indices: no rule anywhere else met any of their probes.
    pub fn reached(&self) -> Vec<(usize, usize)> {
        self.reached.borrow().iter().copied().collect()
    }

    /// The same index whose walks evaluate every rule of every chain: the
    /// reference the port dispatch is checked against.
    pub fn whole_chains(mut self) -> Self {
        self.dispatch = false;
        self
    }

    pub fn model(&self) -> &'m RulesetModel {
        self.model
    }

    /// The nat base chains a probe of this hook and family traverses, in the
    /// kernel's order: priority, and at equal priority the most recently
    /// registered first (`nf_hook_entries_grow` inserts a new hook before the
    /// existing ones of the same priority). Registration order is read from the
    /// handles: tables are numbered in creation order, chains within a table too.
    /// iptables-legacy tables (no handle) count as the oldest.
    pub fn nat_base_chains(&self, hook: Hook, v6: bool) -> BaseChains {
        self.cached_bases((hook, v6, false), || {
            self.base_chains(v6, |b| b.hook == hook && b.kind == NAT_CHAIN_TYPE)
        })
    }

    /// Filter-type prerouting chains (iptables' raw and mangle, nft's `type
    /// filter`), where `tproxy` lives.
    pub fn tproxy_base_chains(&self, v6: bool) -> BaseChains {
        self.cached_bases((Hook::Prerouting, v6, true), || {
            self.base_chains(v6, |b| {
                b.hook == Hook::Prerouting && b.kind == FILTER_CHAIN_TYPE
            })
        })
    }

    fn cached_bases(&self, key: BaseKey, find: impl FnOnce() -> Vec<(usize, usize)>) -> BaseChains {
        if let Some(b) = self.bases.borrow().get(&key) {
            return b.clone();
        }
        let found: BaseChains = find().into();
        self.bases.borrow_mut().insert(key, found.clone());
        found
    }

    fn base_chains(&self, v6: bool, want: impl Fn(&BaseHook) -> bool) -> Vec<(usize, usize)> {
        use std::cmp::Reverse;
        let mut out = Vec::new();
        for (ti, t) in self.model.tables.iter().enumerate() {
            // A dormant table's hooks are unregistered: nothing in it runs.
            if !t.family.sees(v6) || t.is_dormant() {
                continue;
            }
            for &ci in t.base_chain_positions().iter() {
                let c = &t.chains[ci];
                if let Some(b) = &c.base
                    && want(b)
                {
                    out.push((b.priority, Reverse(t.handle), Reverse(c.handle), ti, ci));
                }
            }
        }
        out.sort();
        out.into_iter().map(|(.., t, c)| (t, c)).collect()
    }
}

/// Base chain types (`NFTA_CHAIN_TYPE`).
pub const NAT_CHAIN_TYPE: &str = "nat";
pub const FILTER_CHAIN_TYPE: &str = "filter";

/// What a native statement that this code does not decode does to a new
/// connection (none of them rewrites its destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeStatement {
    /// A side effect only: the packet goes on (`dup`, `last`).
    Continues,
    /// May end evaluation: `queue` (to userspace: an inline IPS decides),
    /// `synproxy` (answers the SYN itself), `fwd` (netdev: sent out elsewhere).
    MayEnd,
}

/// Native expressions decoded as `Expr::Unknown` whose effect is known by name.
/// `mark set`, `ct mark set`, `meta nftrace set`, `notrack`, `counter`, `log`
/// are decoded already and never rewrite anything.
pub fn native_statement(name: &str) -> Option<NativeStatement> {
    match name {
        "dup" | "last" => Some(NativeStatement::Continues),
        "queue" | "synproxy" | "fwd" => Some(NativeStatement::MayEnd),
        _ => None,
    }
}

/// `min`..`max` as a prefix (`203.0.113.0/26`), or as a range when it is not one.
fn prefix(min: IpAddr, max: IpAddr) -> String {
    let bits = match (min, max) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (!(u32::from(a) ^ u32::from(b))).leading_ones(),
        (IpAddr::V6(a), IpAddr::V6(b)) => (!(u128::from(a) ^ u128::from(b))).leading_ones(),
        _ => return format!("{min}-{max}"),
    };
    format!("{min}/{bits}")
}

/// The kernel stops at this many nested jumps.
const MAX_JUMP_DEPTH: usize = 16;
/// Room in the register file: 16 × 32-bit registers (regs 1–4 alias 8–23).
const REG_BYTES: usize = 64;
// NFT_META_*
// NFT_FIB_*
// NFT_CT_*
const LOOPBACK_IFINDEX: u32 = 1;

/// The byte offset of a kernel register number in the 32-bit register file.
fn reg_offset(reg: u32) -> Option<usize> {
    match reg {
        1..=4 => Some((reg as usize - 1) * 16),
        8..=23 => Some((reg as usize - 8) * 4),
        _ => None,
    }
}

/// The register file of one rule evaluation; `None` bytes are unknown.
struct Regs([Option<u8>; REG_BYTES]);

impl Regs {
    fn new() -> Self {
        Self([None; REG_BYTES])
    }

    /// Stores `bytes` at `reg`, zero-padding the last 32-bit word like the kernel.
    fn store(&mut self, reg: u32, bytes: &[Option<u8>]) {
        let Some(at) = reg_offset(reg) else { return };
        let padded = bytes.len().div_ceil(4) * 4;
        for i in 0..padded {
            if let Some(slot) = self.0.get_mut(at + i) {
                *slot = if i < bytes.len() { bytes[i] } else { Some(0) };
            }
        }
    }

    fn store_known(&mut self, reg: u32, bytes: &[u8]) {
        let v: Vec<Option<u8>> = bytes.iter().map(|b| Some(*b)).collect();
        self.store(reg, &v);
    }

    fn load(&self, reg: u32, len: usize) -> RegBytes {
        let Some(at) = reg_offset(reg) else {
            return RegBytes::unknown(len);
        };
        RegBytes::from_fn(len, |i| self.0.get(at + i).copied().flatten())
    }

    fn known(&self, reg: u32, len: usize) -> Option<Vec<u8>> {
        self.load(reg, len).iter().copied().collect()
    }
}

/// A few register bytes on the stack (`None` = unknown): evaluation allocates nothing.
#[derive(Clone, Copy)]
struct RegBytes {
    buf: [Option<u8>; REG_BYTES],
    len: usize,
}

impl RegBytes {
    fn unknown(len: usize) -> Self {
        Self {
            buf: [None; REG_BYTES],
            len: len.min(REG_BYTES),
        }
    }

    fn from_fn(len: usize, f: impl Fn(usize) -> Option<u8>) -> Self {
        let mut b = Self::unknown(len);
        for i in 0..b.len {
            b.buf[i] = f(i);
        }
        b
    }
}

impl std::ops::Deref for RegBytes {
    type Target = [Option<u8>];
    fn deref(&self) -> &[Option<u8>] {
        &self.buf[..self.len]
    }
}

/// memcmp over known bytes; `None` when an unknown byte decides.
fn cmp_bytes(a: &[Option<u8>], b: &[u8]) -> Option<std::cmp::Ordering> {
    if a.len() < b.len() {
        return None;
    }
    for (x, y) in a.iter().zip(b) {
        match x {
            Some(x) if x == y => continue,
            Some(x) => return Some(x.cmp(y)),
            None => return None,
        }
    }
    Some(std::cmp::Ordering::Equal)
}

/// How a rule evaluates against the probe.
struct RuleEval {
    matched: Tri,
    verdicts: Vec<(Tri, Verdict)>,
    rewrite: Option<Rewrite>,
    /// The statement behind `rewrite`, in words.
    how: String,
    /// The rewrite (or drop, reject, source NAT) ends evaluation when it applies.
    terminal: bool,
}

/// Walks one probe through the ruleset.
pub struct Walker<'i, 'm> {
    idx: &'i RulesetIndex<'m>,
    probe: &'i ProbePacket,
    hits: HashMap<RuleRef, Hit>,
    memo: HashMap<(usize, usize, Reach), (Reach, bool)>,
    stack: Vec<usize>,
    accepted: Reach,
    base: (usize, usize),
    /// Whether `base` is a nat chain (else a filter chain walked for tproxy).
    nat_base: bool,
    takers: HashMap<RuleRef, Taker>,
    /// How surely the probe was dropped or rewritten in the current base
    /// chain (accept and return only end the chain: the next one still runs).
    lost: Reach,
    /// Rules the walk passes over as if they were not there (what-if walks).
    skip: &'i [RuleRef],
}

/// What a chain walk hands back to its caller: how surely the probe returns, and
/// whether no terminal statement could have taken it on the way (clean).
#[derive(Clone, Copy)]
struct Flow {
    ret: Reach,
    clean: bool,
}

impl<'i, 'm> Walker<'i, 'm> {
    pub fn new(idx: &'i RulesetIndex<'m>, probe: &'i ProbePacket) -> Self {
        Self {
            idx,
            probe,
            hits: HashMap::new(),
            memo: HashMap::new(),
            stack: Vec::new(),
            accepted: Reach::Shadowed,
            base: (0, 0),
            nat_base: false,
            takers: HashMap::new(),
            lost: Reach::Shadowed,
            skip: &[],
        }
    }

    /// The same walk with `rules` taken out of the ruleset: what would happen
    /// without them.
    pub fn skipping(mut self, rules: &'i [RuleRef]) -> Self {
        self.skip = rules;
        self
    }

    /// Every rewrite met, in rule order (see [`Self::run_full`]).
    pub fn run(self) -> Vec<Hit> {
        self.run_full().hits
    }

    /// Walks every nat base chain of the probe's hook (and, in prerouting, the
    /// filter chains for tproxy); returns every rewrite met, in rule order.
    ///
    /// Base chains of equal priority in different tables run in an order the
    /// ruleset does not show (registration order, newest first): such a
    /// group is walked member by member from the same entry, and a rewrite
    /// in one member counts as reached in the order that reaches it, unless a
    /// sibling could take the probe first, in which case it is at most
    /// "possible" ([`Hit::order_unknown_with`]). What leaves the group is the
    /// weakest of what leaves each member: the same in every order.
    pub fn run_full(mut self) -> Walk {
        let mut reach = Reach::Definite;
        let bases = self.idx.nat_base_chains(self.probe.hook, self.probe.v6);
        let mut i = 0;
        while i < bases.len() {
            let priority = self.priority(bases[i]);
            let mut j = i + 1;
            while j < bases.len() && self.priority(bases[j]) == priority {
                j += 1;
            }
            let group = &bases[i..j];
            let tables: std::collections::BTreeSet<usize> = group.iter().map(|b| b.0).collect();
            reach = if tables.len() > 1 {
                self.run_unordered(group, reach)
            } else {
                group
                    .iter()
                    .fold(reach, |r, &(ti, ci)| self.run_base(ti, ci, r))
            };
            i = j;
        }
        if self.probe.hook == Hook::Prerouting {
            for &(ti, ci) in self.idx.tproxy_base_chains(self.probe.v6).iter() {
                self.set_base(ti, ci);
                self.memo.clear();
                self.walk(ti, ci, Reach::Definite, 0);
            }
        }
        let mut hits: Vec<Hit> = self.hits.into_values().collect();
        hits.sort_by_key(|h| h.at);
        let mut takers: Vec<Taker> = self.takers.into_values().collect();
        takers.sort_by_key(|t| t.at);
        Walk { hits, takers }
    }

    fn priority(&self, (ti, ci): (usize, usize)) -> Option<i32> {
        self.idx.model.tables[ti].chains[ci]
            .base
            .as_ref()
            .map(|b| b.priority)
    }

    /// One base chain entered with `reach`: how surely the probe leaves it.
    fn run_base(&mut self, ti: usize, ci: usize, reach: Reach) -> Reach {
        self.set_base(ti, ci);
        self.accepted = Reach::Shadowed;
        self.lost = Reach::Shadowed;
        self.memo.clear();
        let flow = self.walk(ti, ci, reach, 0);
        let policy_drop = matches!(
            self.idx.model.tables[ti].chains[ci]
                .base
                .as_ref()
                .and_then(|b| b.policy.as_ref()),
            Some(Verdict::Drop)
        );
        if policy_drop {
            self.accepted
        } else if self.lost == Reach::Shadowed {
            // Nothing here could drop or rewrite it: whether accepted,
            // returned or run to the end, every such probe goes on.
            reach
        } else {
            flow.ret.max(self.accepted)
        }
    }

    /// Equal-priority base chains whose order is unknown (see [`Self::run`]).
    fn run_unordered(&mut self, group: &[(usize, usize)], reach: Reach) -> Reach {
        let mut outs = Vec::with_capacity(group.len());
        let mut member_hits = Vec::with_capacity(group.len());
        let mut member_takers = Vec::with_capacity(group.len());
        for &(ti, ci) in group {
            let before = std::mem::take(&mut self.hits);
            let takers_before = std::mem::take(&mut self.takers);
            outs.push(self.run_base(ti, ci, reach));
            member_hits.push(std::mem::replace(&mut self.hits, before));
            member_takers.push(std::mem::replace(&mut self.takers, takers_before));
        }
        for (m, (hits, takers)) in member_hits.into_iter().zip(member_takers).enumerate() {
            // Siblings that may take the probe before this member.
            let takers_first: Vec<(usize, usize)> = group
                .iter()
                .zip(&outs)
                .enumerate()
                .filter(|(k, (_, out))| *k != m && **out < reach)
                .map(|(_, (b, _))| *b)
                .collect();
            for (at, mut hit) in hits {
                if !takers_first.is_empty() && hit.reach > Reach::Shadowed {
                    hit.reach = hit.reach.weaken();
                    hit.order_unknown_with.clone_from(&takers_first);
                }
                match self.hits.get_mut(&at) {
                    Some(old) if old.reach >= hit.reach => {}
                    Some(old) => *old = hit,
                    None => {
                        self.hits.insert(at, hit);
                    }
                }
            }
            for (at, mut taker) in takers {
                if !takers_first.is_empty() {
                    taker.reach = taker.reach.weaken();
                    taker.order_unknown_with.clone_from(&takers_first);
                }
                match self.takers.get_mut(&at) {
                    Some(old) if old.reach >= taker.reach => {}
                    Some(old) => *old = taker,
                    None => {
                        self.takers.insert(at, taker);
                    }
                }
            }
        }
        outs.into_iter().min().unwrap_or(reach)
    }

    fn walk(&mut self, ti: usize, ci: usize, reach: Reach, depth: usize) -> Flow {
        self.idx.reached.borrow_mut().insert((ti, ci));
        if let Some(&(ret, clean)) = self.memo.get(&(ti, ci, reach)) {
            return Flow { ret, clean };
        }
        if depth > MAX_JUMP_DEPTH || self.stack.contains(&ci) {
            // The kernel refuses loops and deeper nesting at load time; be safe anyway.
            return Flow {
                ret: reach,
                clean: true,
            };
        }
        self.stack.push(ci);
        let flow = self.walk_rules(ti, ci, reach, depth);
        self.stack.pop();
        self.memo.insert((ti, ci, reach), (flow.ret, flow.clean));
        flow
    }

    fn walk_rules(&mut self, ti: usize, ci: usize, reach: Reach, depth: usize) -> Flow {
        let model = self.idx.model;
        let chain = &model.tables[ti].chains[ci];
        let mut cur = reach;
        let mut ret = Reach::Shadowed;
        let mut clean = true;
        // Only the rules this probe's port can match (see `PortDispatch`),
        // in chain order; a short chain whole.
        let mut keyed = chain
            .rules
            .dispatch()
            .filter(|_| self.idx.dispatch)
            .map(|d| d.positions(self.probe.dport));
        let mut all = 0..chain.rules.len();
        loop {
            let next = match &mut keyed {
                Some(k) => k.next(),
                None => all.next(),
            };
            let Some(ri) = next else { break };
            let rule = &chain.rules[ri];
            let at = RuleRef {
                table: ti,
                chain: ci,
                rule: ri,
            };
            if !self.skip.is_empty() && self.skip.contains(&at) {
                continue;
            }
            let eval = self.eval_rule(ti, rule.exprs());
            if eval.matched == Tri::No {
                continue;
            }
            let sure = eval.matched == Tri::Yes;
            let rewrites = eval.rewrite.is_some();
            if let Some(rw) = eval.rewrite {
                self.lost = self.lost.max(cur);
                self.record(at, rw, eval.how, cur);
            }
            if eval.terminal {
                if !rewrites {
                    self.take(at, cur, || "a terminal statement (reject, drop)".into());
                }
                self.lost = self.lost.max(cur);
                if cur > Reach::Shadowed {
                    clean = false;
                }
                cur = if sure { Reach::Shadowed } else { cur.weaken() };
                continue;
            }
            for (m, verdict) in eval.verdicts {
                let m = if sure { m } else { m.and(Tri::Maybe) };
                if m == Tri::No {
                    continue;
                }
                let sure = m == Tri::Yes;
                match &verdict {
                    Verdict::Accept | Verdict::Drop | Verdict::Return | Verdict::Goto(_) => {
                        self.take(at, cur, || {
                            let what = match &verdict {
                                Verdict::Accept => "accept".to_owned(),
                                Verdict::Drop => "drop".to_owned(),
                                Verdict::Return => "return".to_owned(),
                                Verdict::Goto(c) => format!("goto {c}"),
                                _ => unreachable!("matched above"),
                            };
                            if sure { what } else { format!("may {what}") }
                        });
                    }
                    _ => {}
                }
                match &verdict {
                    Verdict::Continue | Verdict::Break | Verdict::Other(_) => {}
                    Verdict::Accept => {
                        self.accepted = self.accepted.max(cur);
                        if cur > Reach::Shadowed {
                            clean = false;
                        }
                        cur = if sure { Reach::Shadowed } else { cur.weaken() };
                    }
                    Verdict::Drop => {
                        self.lost = self.lost.max(cur);
                        if cur > Reach::Shadowed {
                            clean = false;
                        }
                        cur = if sure { Reach::Shadowed } else { cur.weaken() };
                    }
                    Verdict::Return => {
                        ret = ret.max(cur);
                        cur = if sure { Reach::Shadowed } else { cur.weaken() };
                    }
                    Verdict::Jump(target) | Verdict::Goto(target) => {
                        let is_goto = matches!(verdict, Verdict::Goto(_));
                        let Some(tci) = self.idx.chain(ti, target) else {
                            continue;
                        };
                        let inner = if sure { cur } else { cur.weaken() };
                        let out = self.walk(ti, tci, inner, depth + 1);
                        clean &= out.clean;
                        if is_goto {
                            // The callee returns straight to our caller.
                            ret = ret.max(out.ret);
                            cur = if sure { Reach::Shadowed } else { cur.weaken() };
                        } else if sure {
                            cur = out.ret;
                        } else if !out.clean {
                            cur = cur.weaken();
                        }
                    }
                }
            }
        }
        ret = ret.max(cur);
        Flow { ret, clean }
    }
}

impl Walker<'_, '_> {
    /// Whether the walk is in a nat chain (else a filter-type chain, walked for tproxy).
    fn in_nat_chain(&self) -> bool {
        self.nat_base
    }

    /// The base chain a walk starts from, and whether it is a nat chain.
    fn set_base(&mut self, ti: usize, ci: usize) {
        self.base = (ti, ci);
        self.nat_base = self
            .idx
            .model
            .tables
            .get(ti)
            .and_then(|t| t.chains.get(ci))
            .and_then(|c| c.base.as_ref())
            .is_some_and(|b| b.kind == NAT_CHAIN_TYPE);
    }

    /// A rule that takes the probe (see [`Taker`]), noted where it can
    /// matter: in a nat chain, while the probe still reaches it.
    fn take(&mut self, at: RuleRef, reach: Reach, how: impl FnOnce() -> String) {
        if reach == Reach::Shadowed || !self.in_nat_chain() {
            return;
        }
        let path = &self.stack;
        let base = self.base;
        match self.takers.get_mut(&at) {
            Some(t) if t.reach >= reach => {}
            Some(t) => {
                t.reach = reach;
                t.path.clone_from(path);
                t.base = base;
            }
            None => {
                let taker = Taker {
                    at,
                    reach,
                    path: path.clone(),
                    base,
                    how: how(),
                    order_unknown_with: Vec::new(),
                };
                self.takers.insert(at, taker);
            }
        }
    }

    fn record(&mut self, at: RuleRef, rewrite: Rewrite, how: String, reach: Reach) {
        let path = self.stack.clone();
        let base = self.base;
        let hit = self.hits.entry(at).or_insert_with(|| Hit {
            at,
            rewrite: rewrite.clone(),
            reach,
            path: path.clone(),
            base,
            how,
            order_unknown_with: Vec::new(),
        });
        if reach > hit.reach {
            hit.reach = reach;
            hit.path = path;
            hit.base = base;
        }
    }

    fn meta(&self, key: u32) -> RegBytes {
        let p = self.probe;
        let name = |n: Option<&str>| -> RegBytes {
            match n {
                Some(n) => {
                    let b = n.as_bytes();
                    RegBytes::from_fn(IFNAMSIZ, |i| {
                        Some(if i < IFNAMSIZ - 1 {
                            b.get(i).copied().unwrap_or(0)
                        } else {
                            0
                        })
                    })
                }
                None => RegBytes::unknown(IFNAMSIZ),
            }
        };
        let known = |b: &[u8]| RegBytes::from_fn(b.len(), |i| Some(b[i]));
        let input = p.hook == Hook::Prerouting;
        match key {
            NFT_META_L4PROTO => known(&[p.l4proto]),
            NFT_META_NFPROTO => known(&[if p.v6 { 10 } else { 2 }]),
            NFT_META_PROTOCOL => known(&(if p.v6 { ETH_P_IPV6 } else { ETH_P_IP }).to_be_bytes()),
            NFT_META_IIFNAME if input => name(p.iifname.as_deref()),
            NFT_META_IIFNAME => name(Some("")),
            NFT_META_OIFNAME if input => name(Some("")),
            NFT_META_OIFNAME => name(Some("lo")),
            NFT_META_IIF if input && p.iifindex != 0 => known(&p.iifindex.to_ne_bytes()),
            NFT_META_IIF if !input => known(&0u32.to_ne_bytes()),
            NFT_META_OIF if input => known(&0u32.to_ne_bytes()),
            NFT_META_OIF => known(&LOOPBACK_IFINDEX.to_ne_bytes()),
            _ => RegBytes::unknown(4),
        }
    }

    fn eval_rule(&self, ti: usize, exprs: &[Expr]) -> RuleEval {
        let p = self.probe;
        let mut regs = Regs::new();
        let mut ev = RuleEval {
            matched: Tri::Yes,
            verdicts: Vec::new(),
            rewrite: None,
            how: String::new(),
            terminal: false,
        };
        for e in exprs {
            match e {
                Expr::Payload {
                    base,
                    offset,
                    len,
                    dreg,
                } => {
                    let bytes = RegBytes::from_fn(*len as usize, |i| {
                        let at = *offset as usize + i;
                        match base {
                            PayloadBase::Network => p.network_byte(at),
                            PayloadBase::Transport => p.transport_byte(at),
                            _ => None,
                        }
                    });
                    regs.store(*dreg, &bytes);
                }
                Expr::Meta { key, dreg } => regs.store(*dreg, &self.meta(*key)),
                Expr::Cmp { sreg, op, data } => {
                    let r = match cmp_bytes(&regs.load(*sreg, data.len()), data) {
                        None => Tri::Maybe,
                        Some(o) => Tri::from(match op {
                            CmpOp::Eq => o.is_eq(),
                            CmpOp::Neq => o.is_ne(),
                            CmpOp::Lt => o.is_lt(),
                            CmpOp::Lte => o.is_le(),
                            CmpOp::Gt => o.is_gt(),
                            CmpOp::Gte => o.is_ge(),
                        }),
                    };
                    ev.matched = ev.matched.and(r);
                }
                Expr::Range {
                    sreg,
                    negate,
                    from,
                    to,
                } => {
                    let v = regs.load(*sreg, from.len());
                    let r = match (cmp_bytes(&v, from), cmp_bytes(&v, to)) {
                        (Some(a), Some(b)) => Tri::from(a.is_ge() && b.is_le()),
                        _ => Tri::Maybe,
                    };
                    ev.matched = ev.matched.and(r.negate_if(*negate));
                }
                Expr::Bitwise {
                    sreg,
                    dreg,
                    len,
                    mask,
                    xor,
                } => {
                    let v = regs.load(*sreg, (*len as usize).min(REG_BYTES));
                    let out = RegBytes::from_fn(v.len, |i| {
                        let mk = mask.get(i).copied().unwrap_or(0);
                        let x = xor.get(i).copied().unwrap_or(0);
                        if mk == 0 {
                            Some(x)
                        } else {
                            v.buf[i].map(|b| (b & mk) ^ x)
                        }
                    });
                    regs.store(*dreg, &out);
                }
                Expr::Immediate { dreg, data } => match data {
                    Data::Verdict(v) => ev.verdicts = vec![(Tri::Yes, v.clone())],
                    Data::Value(v) => regs.store_known(*dreg, v),
                },
                Expr::Lookup {
                    set,
                    sreg,
                    dreg,
                    invert,
                } => {
                    let Some(si) = self.idx.sets[ti].get(set.as_str()) else {
                        ev.matched = ev.matched.and(Tri::Maybe);
                        if let Some(d) = dreg {
                            regs.store(*d, &[None; 16]);
                        }
                        continue;
                    };
                    let key = regs.load(*sreg, (si.set.key_len as usize).min(REG_BYTES));
                    let cands = si.candidates(&key);
                    let member =
                        cands
                            .iter()
                            .map(|(t, _)| *t)
                            .fold(Tri::No, |acc, t| match (acc, t) {
                                (Tri::Yes, _) | (_, Tri::Yes) => Tri::Yes,
                                (Tri::Maybe, _) | (_, Tri::Maybe) => Tri::Maybe,
                                _ => Tri::No,
                            });
                    match dreg {
                        None => ev.matched = ev.matched.and(member.negate_if(*invert)),
                        Some(NFT_REG_VERDICT) => {
                            ev.matched = ev.matched.and(member);
                            ev.verdicts = cands
                                .iter()
                                .filter_map(|(t, i)| match &si.set.elements[*i].data {
                                    Some(Data::Verdict(v)) => Some((*t, v.clone())),
                                    _ => None,
                                })
                                .collect();
                        }
                        Some(d) => {
                            ev.matched = ev.matched.and(member);
                            let len = si.set.data_len.unwrap_or(16) as usize;
                            let value = match cands.as_slice() {
                                [(Tri::Yes, i)] => match &si.set.elements[*i].data {
                                    Some(Data::Value(v)) => {
                                        RegBytes::from_fn(v.len(), |i| Some(v[i]))
                                    }
                                    _ => RegBytes::unknown(len),
                                },
                                _ => RegBytes::unknown(len),
                            };
                            regs.store(*d, &value);
                        }
                    }
                }
                Expr::Nat {
                    kind: NatKind::Dnat,
                    family,
                    reg_addr_min,
                    reg_proto_min,
                    ..
                } => {
                    let applies = match *family {
                        2 => !p.v6,
                        10 => p.v6,
                        _ => true,
                    };
                    if !applies {
                        continue;
                    }
                    let addr = reg_addr_min.and_then(|r| read_addr(&regs, r, p.v6));
                    let port = reg_proto_min.and_then(|r| read_port(&regs, r));
                    ev.rewrite = Some(Rewrite::Dnat { addr, port });
                    ev.how = "nft dnat statement".into();
                    ev.terminal = true;
                    break;
                }
                Expr::Redir { reg_proto_min, .. } => {
                    let port = reg_proto_min.and_then(|r| read_port(&regs, r));
                    ev.rewrite = Some(Rewrite::Redirect { port });
                    ev.how = "nft redirect statement".into();
                    ev.terminal = true;
                    break;
                }
                Expr::Tproxy {
                    family,
                    reg_addr,
                    reg_port,
                } => {
                    let v6 = match *family {
                        10 => true,
                        2 => false,
                        _ => p.v6,
                    };
                    ev.rewrite = Some(Rewrite::Tproxy {
                        addr: reg_addr.and_then(|r| read_addr(&regs, r, v6)),
                        port: reg_port.and_then(|r| read_port(&regs, r)),
                    });
                    ev.how = "nft tproxy statement".into();
                }
                Expr::Fib {
                    dreg,
                    result,
                    flags,
                } => {
                    let exact = *result == NFT_FIB_RESULT_ADDRTYPE
                        && flags & NFTA_FIB_F_DADDR != 0
                        && flags & (NFTA_FIB_F_IIF | NFTA_FIB_F_OIF | NFTA_FIB_F_PRESENT) == 0;
                    if exact {
                        regs.store_known(*dreg, &RTN_LOCAL.to_ne_bytes());
                    } else {
                        regs.store(*dreg, &[None; 4]);
                    }
                }
                Expr::Ct {
                    key,
                    dreg: Some(dreg),
                    ..
                } => match *key {
                    NFT_CT_STATE => regs.store_known(*dreg, &NF_CT_STATE_NEW_BIT.to_ne_bytes()),
                    NFT_CT_DIRECTION => regs.store_known(*dreg, &[0]),
                    _ => regs.store(*dreg, &[None; 16]),
                },
                Expr::XtMatch { name, rev, info } => {
                    ev.matched = ev.matched.and(xt::eval_match(name, *rev, info, p));
                }
                Expr::XtTarget { name, rev, info } => {
                    let v6 = self.idx.model.tables[ti].family == Family::IP6 || p.v6;
                    let how = format!("iptables target {name}");
                    match xt::decode_target(name, *rev, info, v6) {
                        XtAction::Continue => {}
                        XtAction::Dnat { addr, port } => {
                            ev.rewrite = Some(Rewrite::Dnat { addr, port });
                            ev.how = how;
                            ev.terminal = true;
                        }
                        XtAction::Netmap { min, max } => {
                            ev.rewrite = Some(Rewrite::Dnat {
                                addr: xt::netmap(p.daddr, min, max),
                                port: None,
                            });
                            ev.how = format!("{how} to {}", prefix(min, max));
                            ev.terminal = true;
                        }
                        XtAction::Redirect { port } => {
                            ev.rewrite = Some(Rewrite::Redirect { port });
                            ev.how = how;
                            ev.terminal = true;
                        }
                        XtAction::Tproxy { addr, port } => {
                            ev.rewrite = Some(Rewrite::Tproxy { addr, port });
                            ev.how = how;
                            ev.terminal = true;
                        }
                        XtAction::Rewrites(_) => {
                            // Known to rewrite the destination, not decoded: where to is unknown.
                            ev.rewrite = Some(Rewrite::Dnat {
                                addr: None,
                                port: None,
                            });
                            ev.how = how;
                        }
                        XtAction::Terminal => ev.terminal = true,
                        XtAction::MayEnd => {
                            // Queued to userspace, proxied or dropped: no rewrite.
                            ev.verdicts = vec![(Tri::Maybe, Verdict::Drop)];
                        }
                        XtAction::Opaque(what) => {
                            if self.in_nat_chain() {
                                // Only a nat chain can bind a new destination.
                                ev.rewrite = Some(Rewrite::Opaque(what));
                                ev.how = how;
                            }
                            // It may end evaluation; nobody can say.
                            ev.verdicts = vec![(Tri::Maybe, Verdict::Drop)];
                        }
                    }
                }
                Expr::Limit => ev.matched = ev.matched.and(Tri::Maybe),
                Expr::Unknown { name } => match native_statement(name) {
                    Some(NativeStatement::Continues) => {}
                    Some(NativeStatement::MayEnd) => {
                        ev.verdicts = vec![(Tri::Maybe, Verdict::Drop)];
                    }
                    None => {
                        // It may be a match, and it may write any register.
                        ev.matched = ev.matched.and(Tri::Maybe);
                        regs = Regs::new();
                    }
                },
                Expr::Reject => {
                    ev.terminal = true;
                    break;
                }
                Expr::Ct { dreg: None, .. }
                | Expr::Nat {
                    kind: NatKind::Snat,
                    ..
                }
                | Expr::Masq
                | Expr::PayloadSet
                | Expr::MetaSet { .. }
                | Expr::Counter
                | Expr::Log
                | Expr::Notrack
                | Expr::Dynset { .. } => {}
            }
            if ev.matched == Tri::No {
                break;
            }
        }
        ev
    }
}

fn read_addr(regs: &Regs, reg: u32, v6: bool) -> Option<IpAddr> {
    if v6 {
        let b: [u8; 16] = regs.known(reg, 16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        let b: [u8; 4] = regs.known(reg, 4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(b)))
    }
}

fn read_port(regs: &Regs, reg: u32) -> Option<u16> {
    let b = regs.known(reg, 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

impl SetIndex<'_> {
    /// Elements the key may select: `(Yes, i)` surely, `(Maybe, i)` perhaps.
    fn candidates(&self, key: &[Option<u8>]) -> Vec<(Tri, usize)> {
        let els = &self.set.elements;
        let catchall = els.iter().position(|e| e.is_catchall());
        let full: Option<Vec<u8>> = key.iter().copied().collect();
        let mut out = Vec::new();
        if let (Some(exact), Some(k)) = (&self.exact, &full) {
            if let Some(&i) = exact.get(k.as_slice()) {
                out.push((Tri::Yes, i));
            }
        } else if self.exact.is_some() {
            for (i, e) in els.iter().enumerate() {
                if !e.is_catchall() && could_equal(key, &e.key) {
                    out.push((Tri::Maybe, i));
                }
            }
        } else {
            // Range elements (concatenations with intervals): field by field.
            let fields = self.fields();
            for (i, e) in els.iter().enumerate() {
                let Some(end) = &e.key_end else { continue };
                let mut t = Tri::Yes;
                let mut off = 0;
                for &len in &fields {
                    let k = &key[off.min(key.len())..(off + len).min(key.len())];
                    let lo = &e.key[off.min(e.key.len())..(off + len).min(e.key.len())];
                    let hi = &end[off.min(end.len())..(off + len).min(end.len())];
                    t = t.and(match (cmp_bytes(k, lo), cmp_bytes(k, hi)) {
                        (Some(a), Some(b)) => Tri::from(a.is_ge() && b.is_le()),
                        _ => Tri::Maybe,
                    });
                    off += len.div_ceil(4) * 4;
                }
                if t != Tri::No {
                    out.push((t, i));
                }
            }
            // Plain intervals: the greatest boundary at or below the key.
            if !self.bounds.is_empty() {
                match &full {
                    Some(k) => {
                        let pos = self.bounds.partition_point(|(b, _)| *b <= k.as_slice());
                        if pos > 0 && !self.bounds[pos - 1].1 {
                            let start = self.bounds[pos - 1].0;
                            if let Some(i) = els
                                .iter()
                                .position(|e| e.key == start && !e.is_interval_end())
                            {
                                out.push((Tri::Yes, i));
                            }
                        }
                    }
                    None => out.extend(
                        els.iter()
                            .enumerate()
                            .filter(|(_, e)| !e.is_interval_end() && e.key_end.is_none())
                            .map(|(i, _)| (Tri::Maybe, i)),
                    ),
                }
            }
        }
        if let Some(c) = catchall
            && !out.iter().any(|(t, _)| *t == Tri::Yes)
        {
            out.push((if out.is_empty() { Tri::Yes } else { Tri::Maybe }, c));
        }
        out
    }

    /// Field lengths of the key (one field when the set does not say).
    fn fields(&self) -> Vec<usize> {
        if self.set.field_lens.is_empty() {
            vec![self.set.key_len as usize]
        } else {
            self.set.field_lens.iter().map(|l| *l as usize).collect()
        }
    }
}

fn could_equal(key: &[Option<u8>], elem: &[u8]) -> bool {
    key.iter().zip(elem).all(|(k, e)| k.is_none_or(|k| k == *e))
}
