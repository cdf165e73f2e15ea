//! The tolerant ruleset model: what the kernel holds, as far as portguard needs
//! to understand it. Anything not decoded is kept by name (`Expr::Unknown`), so an
//! expression this code has never heard of never makes a read fail.

use std::{
    fmt,
    ops::Range,
    sync::{Arc, OnceLock},
};

use serde::Serialize;

use super::dispatch::{DISPATCH_MIN_RULES, PortDispatch};

// The expressions are the codec's types: this model holds them, the codec
// (`expr`) neither knows nor imports the model.
pub use super::expr::{CmpOp, Data, Expr, NatKind, PayloadBase, Verdict};
use crate::sys::uapi::{
    NF_INET_FORWARD, NF_INET_INGRESS, NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING,
    NF_INET_PRE_ROUTING, NFPROTO_ARP, NFPROTO_BRIDGE, NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6,
    NFPROTO_NETDEV,
};

/// `NFPROTO_*`: the family of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Family(pub u8);

impl Family {
    pub const INET: Self = Self(NFPROTO_INET);
    pub const IP: Self = Self(NFPROTO_IPV4);
    pub const ARP: Self = Self(NFPROTO_ARP);
    pub const NETDEV: Self = Self(NFPROTO_NETDEV);
    pub const BRIDGE: Self = Self(NFPROTO_BRIDGE);
    pub const IP6: Self = Self(NFPROTO_IPV6);

    /// Whether chains of this family see IPv4 (`v6 == false`) or IPv6 packets.
    pub fn sees(self, v6: bool) -> bool {
        self == Self::INET || (v6 && self == Self::IP6) || (!v6 && self == Self::IP)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::INET => f.write_str("inet"),
            Self::IP => f.write_str("ip"),
            Self::ARP => f.write_str("arp"),
            Self::NETDEV => f.write_str("netdev"),
            Self::BRIDGE => f.write_str("bridge"),
            Self::IP6 => f.write_str("ip6"),
            Self(n) => write!(f, "family{n}"),
        }
    }
}

impl Serialize for Family {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Who wrote a table, as far as it says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableOrigin {
    /// Native nftables (nft, kube-proxy nftables mode, portmap's nftables backend…).
    #[default]
    Nft,
    /// iptables-nft: nf_tables tables holding `xt` matches and targets.
    IptablesNft,
    /// iptables-legacy (x_tables), read from `iptables-legacy-save`: invisible to nft.
    IptablesLegacy,
}

/// The whole ruleset of one network namespace.
#[derive(Clone, Debug, Default)]
pub struct RulesetModel {
    /// nf_tables generation the dump is consistent with, when read over netlink.
    pub generation: Option<u32>,
    pub tables: Vec<Table>,
    /// What could not be read or decoded (never fatal).
    pub warnings: Vec<String>,
}

impl RulesetModel {
    pub fn rule_count(&self) -> usize {
        self.tables
            .iter()
            .flat_map(|t| &t.chains)
            .map(|c| c.rules.len())
            .sum()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub handle: u64,
    pub flags: u32,
    /// `NFTA_TABLE_OWNER`: the port id of the netlink socket that owns the
    /// table (set only when the table has `NFT_TABLE_F_OWNER`).
    pub owner: Option<u32>,
    pub origin: TableOrigin,
    pub chains: Vec<Chain>,
    pub sets: Vec<Set>,
    /// Chain name → position in `chains`, for [`Self::chain`].
    pub chain_names: ChainNames,
    /// Where the base chains are, for [`Self::base_chain_positions`].
    pub base_chains: BaseChainPositions,
}

/// The positions of a table's base chains, found on first use and shared by
/// clones. Chains are added or removed only by building a table (a read, a
/// parse) or by pushing to it: a count that moved since means "search again".
/// Restructuring a table in place after its first inspection (a removal and
/// an addition) is not done anywhere; debug builds check every use.
#[derive(Clone, Default)]
pub struct BaseChainPositions(OnceLock<(usize, Arc<[usize]>)>);

impl fmt::Debug for BaseChainPositions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BaseChainPositions")
    }
}

/// Tables with fewer chains are searched by name, not indexed.
pub(crate) const CHAIN_NAMES_MIN: usize = 64;

/// A table's chain name → position map (kube-proxy's nat table has ~20,000
/// chains, and every notification names one). Built on first use and shared
/// by clones; it checks itself: a position is taken only where the chain of
/// that name is (names are unique in a table), and a name it does not know
/// is searched for. So a map older than `chains` is slow, never wrong.
#[derive(Clone, Default)]
pub struct ChainNames(OnceLock<Arc<std::collections::HashMap<String, usize>>>);

impl fmt::Debug for ChainNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChainNames")
    }
}

impl Default for Family {
    fn default() -> Self {
        Self::IP
    }
}

impl Table {
    /// `flags dormant`: its base chains are not hooked, none of its rules runs.
    pub fn is_dormant(&self) -> bool {
        self.flags & crate::sys::uapi::NFT_TABLE_F_DORMANT != 0
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chain_position(name).map(|i| &self.chains[i])
    }

    pub fn chain_mut(&mut self, name: &str) -> Option<&mut Chain> {
        match self.chain_position(name) {
            Some(i) => Some(&mut self.chains[i]),
            None => None,
        }
    }

    /// Where the base chains are in `chains` (a table of kube-proxy's has
    /// ~20,000 chains and five base chains; every inspection asks).
    pub fn base_chain_positions(&self) -> Arc<[usize]> {
        let scan = || -> Arc<[usize]> {
            self.chains
                .iter()
                .enumerate()
                .filter(|(_, c)| c.base.is_some())
                .map(|(i, _)| i)
                .collect()
        };
        let (len, found) = self
            .base_chains
            .0
            .get_or_init(|| (self.chains.len(), scan()));
        if *len != self.chains.len() {
            return scan();
        }
        debug_assert_eq!(
            **found,
            *scan(),
            "a table's chains were restructured in place after use: build a new table"
        );
        found.clone()
    }

    /// Takes the map `names` gives (every chain's position by name, as a
    /// read found them) as the name map, when the table is long enough to
    /// want one (`names` is not called otherwise). A map that does not match
    /// `chains` is only slow, never wrong (see [`ChainNames`]).
    pub fn set_chain_names(
        &mut self,
        names: impl FnOnce(&[Chain]) -> std::collections::HashMap<String, usize>,
    ) {
        if self.chains.len() >= CHAIN_NAMES_MIN {
            let names = names(&self.chains);
            self.chain_names = ChainNames(OnceLock::from(Arc::new(names)));
        }
    }

    /// Where chain `name` is in `chains`.
    pub fn chain_position(&self, name: &str) -> Option<usize> {
        let scan = || self.chains.iter().position(|c| c.name == name);
        if self.chains.len() < CHAIN_NAMES_MIN {
            return scan();
        }
        match self.chain_names_map().get(name) {
            Some(&i) if self.chains.get(i).is_some_and(|c| c.name == name) => Some(i),
            // Chains changed since the map was built: search.
            _ => scan(),
        }
    }

    /// Whether the chain name map is built already (a read builds it).
    #[cfg(test)]
    pub(crate) fn chain_names_built(&self) -> bool {
        self.chain_names.0.get().is_some()
    }

    fn chain_names_map(&self) -> &std::collections::HashMap<String, usize> {
        self.chain_names.0.get_or_init(|| {
            Arc::new(
                self.chains
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name.clone(), i))
                    .collect(),
            )
        })
    }

    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }
}

/// `NF_INET_*` hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
    Ingress,
    Other(u32),
}

impl Hook {
    pub fn from_raw(n: u32) -> Self {
        match n {
            NF_INET_PRE_ROUTING => Self::Prerouting,
            NF_INET_LOCAL_IN => Self::Input,
            NF_INET_FORWARD => Self::Forward,
            NF_INET_LOCAL_OUT => Self::Output,
            NF_INET_POST_ROUTING => Self::Postrouting,
            NF_INET_INGRESS => Self::Ingress,
            n => Self::Other(n),
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Prerouting => f.write_str("prerouting"),
            Self::Input => f.write_str("input"),
            Self::Forward => f.write_str("forward"),
            Self::Output => f.write_str("output"),
            Self::Postrouting => f.write_str("postrouting"),
            Self::Ingress => f.write_str("ingress"),
            Self::Other(n) => write!(f, "hook{n}"),
        }
    }
}

/// What makes a chain a base chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseHook {
    pub hook: Hook,
    pub priority: i32,
    /// "nat", "filter", "route".
    pub kind: String,
    pub policy: Option<Verdict>,
}

#[derive(Clone, Debug, Default)]
pub struct Chain {
    pub name: String,
    pub handle: u64,
    pub base: Option<BaseHook>,
    pub rules: Rules,
}

/// A chain's rules in order, read as a slice; every change goes through a
/// method here, which drops the chain's [`PortDispatch`] (built again on the
/// next walk that wants it).
#[derive(Clone, Default)]
pub struct Rules {
    list: Vec<Rule>,
    dispatch: OnceLock<Arc<PortDispatch>>,
}

impl Rules {
    pub fn push(&mut self, rule: Rule) {
        self.changed().push(rule);
    }

    pub fn insert(&mut self, at: usize, rule: Rule) {
        self.changed().insert(at, rule);
    }

    pub fn remove(&mut self, at: usize) -> Rule {
        self.changed().remove(at)
    }

    pub fn clear(&mut self) {
        self.changed().clear();
    }

    /// Each rule, to change in place (the dispatch is dropped too: a rule may
    /// be replaced whole).
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Rule> {
        self.changed().iter_mut()
    }

    /// One rule, to change in place (drops the dispatch, as [`Self::iter_mut`]).
    pub fn get_mut(&mut self, at: usize) -> Option<&mut Rule> {
        self.changed().get_mut(at)
    }

    /// The rules a probe to one destination port can match, by port (see
    /// [`PortDispatch`]); `None` for a chain short enough to walk whole.
    pub fn dispatch(&self) -> Option<&PortDispatch> {
        (self.list.len() >= DISPATCH_MIN_RULES).then(|| {
            &**self.dispatch.get_or_init(|| {
                Arc::new(PortDispatch::new(self.list.iter().map(Rule::matched_dport)))
            })
        })
    }

    /// Whether the dispatch is built already (a read builds it).
    #[cfg(test)]
    pub(crate) fn dispatch_built(&self) -> bool {
        self.dispatch.get().is_some()
    }

    /// Takes `dispatch`, built as the rules were read, as the chain's
    /// dispatch: only when it indexes exactly these rules (a read checks its
    /// own work; anything else is built on first use as always).
    pub fn set_dispatch(&self, dispatch: PortDispatch) {
        if self.list.len() >= DISPATCH_MIN_RULES && dispatch.len() == self.list.len() {
            let _ = self.dispatch.set(Arc::new(dispatch));
        }
    }

    fn changed(&mut self) -> &mut Vec<Rule> {
        self.dispatch.take();
        &mut self.list
    }
}

impl std::ops::Deref for Rules {
    type Target = [Rule];

    fn deref(&self) -> &[Rule] {
        &self.list
    }
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.list).finish()
    }
}

impl From<Vec<Rule>> for Rules {
    fn from(list: Vec<Rule>) -> Self {
        Self {
            list,
            dispatch: OnceLock::new(),
        }
    }
}

impl FromIterator<Rule> for Rules {
    fn from_iter<I: IntoIterator<Item = Rule>>(iter: I) -> Self {
        Vec::from_iter(iter).into()
    }
}

impl<'a> IntoIterator for &'a mut Rules {
    type Item = &'a mut Rule;
    type IntoIter = std::slice::IterMut<'a, Rule>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl<'a> IntoIterator for &'a Rules {
    type Item = &'a Rule;
    type IntoIter = std::slice::Iter<'a, Rule>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

/// A rule. Its expressions are decoded on first use: a read keeps the raw
/// `NFTA_RULE_EXPRESSIONS` bytes, and the analysis decodes only the rules a
/// probe reaches (on a kube-proxy host, a small part of the ruleset).
#[derive(Clone, Debug, Default)]
pub struct Rule {
    pub handle: u64,
    /// The rule's comment (nft userdata), or an iptables `-m comment`.
    pub comment: Option<String>,
    exprs: OnceLock<Vec<Expr>>,
    raw: Option<RawExprs>,
    /// The rule's raw `NFTA_RULE_USERDATA` (comments), kept for restores.
    userdata: Option<RawExprs>,
    /// The transaction that added it, when the agent saw it committed (a
    /// rule read from a dump has none: who wrote it is unknown).
    committed: Option<Arc<Commit>>,
    /// [`Self::matched_dport`], found once.
    dport: OnceLock<Option<u16>>,
}

/// One committed nf_tables transaction, as its `NFT_MSG_NEWGEN` names it: the
/// process that committed it (`NFTA_GEN_PROC_PID`, `NFTA_GEN_PROC_NAME`, what
/// `nft monitor` prints as "new generation N by process PID (NAME)") and the
/// generation it created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// In the initial pid namespace (the kernel's `task_pid_nr`).
    pub pid: u32,
    /// The committer's `comm` (at most 15 bytes).
    pub name: String,
    pub generation: Option<u32>,
    /// When the agent read the `NEWGEN` (the commit, within the agent's
    /// notification latency).
    pub seen: std::time::SystemTime,
    /// The committer's parent and start time, read from `/proc/PID/stat`
    /// once, right after the `NEWGEN` arrived (beside the removal path, see
    /// `rules::attribution::commit_of`), so that a committer gone by the time
    /// it is named is still known by its parent, and a later process reusing
    /// its pid is not taken for it. `None` inside: it could not be read.
    pub stat: OnceLock<Option<CommitterStat>>,
}

/// What `/proc/PID/stat` said of a committer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitterStat {
    pub ppid: u32,
    /// Clock ticks since boot.
    pub start_time: u64,
}

impl Rule {
    /// A rule whose expressions are known already.
    pub fn new(handle: u64, exprs: Vec<Expr>, comment: Option<String>) -> Self {
        Self {
            handle,
            comment,
            exprs: OnceLock::from(exprs),
            raw: None,
            userdata: None,
            committed: None,
            dport: OnceLock::new(),
        }
    }

    /// A rule read over netlink, decoded when first asked.
    pub fn from_raw(handle: u64, raw: RawExprs, comment: Option<String>) -> Self {
        Self {
            handle,
            comment,
            exprs: OnceLock::new(),
            raw: Some(raw),
            userdata: None,
            committed: None,
            dport: OnceLock::new(),
        }
    }

    /// The same rule, with its raw userdata (as read over netlink).
    pub fn with_userdata(mut self, userdata: Option<RawExprs>) -> Self {
        self.userdata = userdata;
        self
    }

    /// The transaction that added the rule, when the agent saw it.
    pub fn commit(&self) -> Option<&Arc<Commit>> {
        self.committed.as_ref()
    }

    /// Names the transaction that added the rule.
    pub fn set_commit(&mut self, commit: Arc<Commit>) {
        self.committed = Some(commit);
    }

    /// The raw `NFTA_RULE_EXPRESSIONS` payload, as the kernel sent it: what a
    /// restore writes back byte for byte. None for rules not read over netlink.
    pub fn raw_exprs(&self) -> Option<&[u8]> {
        self.raw.as_ref().map(RawExprs::bytes)
    }

    /// The raw `NFTA_RULE_USERDATA` payload, when the rule has one.
    pub fn raw_userdata(&self) -> Option<&[u8]> {
        self.userdata.as_ref().map(RawExprs::bytes)
    }

    /// The rule's expressions (decoded now if they were not yet).
    /// The one destination port the rule matches (see
    /// [`matched_dport`](super::dispatch::matched_dport)), read from the raw
    /// expressions while they are not decoded.
    pub fn matched_dport(&self) -> Option<u16> {
        *self
            .dport
            .get_or_init(|| match (self.exprs.get(), &self.raw) {
                (None, Some(raw)) => super::dispatch::matched_dport_raw(raw.bytes()),
                _ => super::dispatch::matched_dport(self.exprs()),
            })
    }

    /// Whether [`Self::matched_dport`] was found already (a read finds it),
    /// and whether the expressions are decoded.
    #[cfg(test)]
    pub(crate) fn found(&self) -> (bool, bool) {
        (self.dport.get().is_some(), self.exprs.get().is_some())
    }

    pub fn exprs(&self) -> &[Expr] {
        self.exprs.get_or_init(|| {
            self.raw
                .as_ref()
                .map(|r| super::expr::decode_list(r.bytes()))
                .unwrap_or_default()
        })
    }
}

/// The undecoded `NFTA_RULE_EXPRESSIONS` of a rule, in the datagram it came in.
#[derive(Clone)]
pub struct RawExprs {
    buf: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl RawExprs {
    pub fn new(buf: Arc<Vec<u8>>, range: Range<usize>) -> Self {
        Self { buf, range }
    }

    pub fn bytes(&self) -> &[u8] {
        self.buf.get(self.range.clone()).unwrap_or(&[])
    }
}

impl fmt::Debug for RawExprs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawExprs({} bytes)", self.range.len())
    }
}

/// `NFT_SET_*` flags, by their short names.
pub mod set_flags {
    pub use crate::sys::uapi::{
        NFT_SET_ANONYMOUS as ANONYMOUS, NFT_SET_CONCAT as CONCAT, NFT_SET_CONSTANT as CONSTANT,
        NFT_SET_EVAL as EVAL, NFT_SET_INTERVAL as INTERVAL, NFT_SET_MAP as MAP,
        NFT_SET_OBJECT as OBJECT, NFT_SET_TIMEOUT as TIMEOUT,
    };
}

/// `NFT_SET_ELEM_*` flags, by their short names.
pub mod elem_flags {
    pub use crate::sys::uapi::{
        NFT_SET_ELEM_CATCHALL as CATCHALL, NFT_SET_ELEM_INTERVAL_END as INTERVAL_END,
    };
}

/// `NFT_DATA_VERDICT`: the data type of a verdict map.
pub use crate::sys::uapi::NFT_DATA_VERDICT;

#[derive(Clone, Debug, Default)]
pub struct Set {
    pub name: String,
    pub handle: u64,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub data_type: Option<u32>,
    pub data_len: Option<u32>,
    /// Field lengths of a concatenated key (unpadded), when the kernel says.
    pub field_lens: Vec<u32>,
    pub elements: Vec<SetElem>,
}

impl Set {
    pub fn is_interval(&self) -> bool {
        self.flags & set_flags::INTERVAL != 0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetElem {
    pub key: Vec<u8>,
    /// Inclusive end of a range element (concatenated interval sets).
    pub key_end: Option<Vec<u8>>,
    pub data: Option<Data>,
    pub flags: u32,
}

impl SetElem {
    pub fn is_interval_end(&self) -> bool {
        self.flags & elem_flags::INTERVAL_END != 0
    }
    pub fn is_catchall(&self) -> bool {
        self.flags & elem_flags::CATCHALL != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_name_map_is_never_wrong_when_chains_change_after_it() {
        let chain = |i: usize| Chain {
            name: format!("C{i}"),
            handle: i as u64,
            ..Chain::default()
        };
        let mut t = Table {
            chains: (0..100).map(chain).collect(),
            ..Table::default()
        };
        assert_eq!(t.chain_position("C42"), Some(42));
        assert!(
            t.chain_names_built(),
            "the map exists before the chains change"
        );
        // Shifted, added, removed after the map was built.
        t.chains.remove(0);
        t.chains.push(chain(500));
        assert_eq!(t.chain("C42").map(|c| c.handle), Some(42));
        assert_eq!(t.chain_position("C42"), Some(41));
        assert_eq!(t.chain_position("C500"), Some(99));
        assert_eq!(t.chain_position("C0"), None);
        assert_eq!(t.chain_mut("C99").map(|c| c.handle), Some(99));
    }
}
