//! The nftables inspector: every rule that rewrites the destination of a new
//! connection to a protected port on a local address, owned or foreign, active or
//! latent.
//!
//! - [`netlink`] reads the whole ruleset (every family, iptables-nft tables
//!   included) over `NETLINK_NETFILTER` into the tolerant [`RulesetModel`];
//!   [`legacy`] adds iptables-legacy's nat tables when they are in use.
//! - [`local`] lists this host's addresses (rtnetlink).
//! - [`inspect`] is pure: model + [`InspectInput`] → [`Finding`]s.
//!
//! ```no_run
//! # use portguard::nft::*;
//! # fn f(policy: &portguard::policy::Policy) -> Result<(), Box<dyn std::error::Error>> {
//! let model = read_host_ruleset(None)?;
//! let input = InspectInput::from_policy(policy, OwnedTargets::docker_fallback(), local::local_addresses()?);
//! for finding in inspect(&model, &input) {
//!     // `nft delete rule {family} {table} {chain} handle {handle}` removes it.
//!     println!("{finding:?}");
//! }
//! # Ok(()) }
//! ```

pub mod analysis;
pub mod attr;
pub mod classify;
pub mod dispatch;
pub mod expr;
pub mod fuzz;
pub mod legacy;
pub mod local;
pub mod model;
pub mod monitor;
pub mod netlink;
pub mod packet;
pub mod pin;
pub mod shadow;
pub mod transaction;
pub mod xt;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

pub use analysis::{Reach, Rewrite, RulesetIndex};
pub use local::LocalAddr;
pub use model::{Family, Hook, RulesetModel, TableOrigin};
pub use packet::{ProbePacket, Tri};

use crate::policy::{Policy, PortRange, Proto};

/// Interfaces a probe never arrives on from outside: container and pod bridges,
/// veths, overlay devices. Traffic to the host's own ports arrives elsewhere.
pub const INTERNAL_IFACE_PREFIXES: [&str; 9] = [
    "lo", "docker", "br-", "veth", "cni", "flannel", "cali", "kube-", "vxlan",
];
/// A protected range wider than this is probed on its first ports only.
pub const MAX_PROBED_PORTS_PER_ENTRY: usize = 1024;

/// The legitimate NAT targets of each protected port: the owner's own DNAT sends
/// new connections there.
///
/// Two sources, both always used:
/// - the live owners model (`ResolvedOwners::owned_targets`, in `owners`):
///   each published port's container address and port, and the host address
///   it is published on;
/// - the place the owner manages: a DNAT in one of Docker's own chains
///   ([`classify::docker_managed`]) to an address behind one of Docker's
///   bridges is Docker's, whether or not the model knows the container yet.
///   Docker writes its rules before it reports the container started (and
///   while dockerd restarts it cannot be asked at all), so the model is always
///   a little behind the ruleset; the owner's place is never.
#[derive(Clone, Debug, Default)]
pub struct OwnedTargets {
    pub targets: BTreeMap<(Proto, u16), Vec<SocketAddr>>,
    /// Every published mapping of the model, with its host address (pins).
    pub published: Vec<PublishedMapping>,
    /// Docker's bridge interfaces as the owners model names them (custom
    /// names included); `docker*` and `br-*` always count.
    pub docker_bridges: BTreeSet<String>,
    /// Docker answered: `targets` and `published` are its live word. When not
    /// (or for another namespace's ruleset), pins come from the owner's own
    /// rules in the ruleset instead.
    pub docker_known: bool,
}

impl OwnedTargets {
    /// No owners model: Docker's own chains are recognised by their place alone.
    pub fn docker_fallback() -> Self {
        Self::default()
    }

    /// Records one of the owner's published mappings (a target and a pin).
    pub fn publish(&mut self, mapping: PublishedMapping) {
        self.insert(
            mapping.proto,
            mapping.host_port,
            SocketAddr::new(mapping.container_ip, mapping.container_port),
        );
        self.published.push(mapping);
    }

    pub fn insert(&mut self, proto: Proto, port: u16, target: SocketAddr) {
        self.targets.entry((proto, port)).or_default().push(target);
    }
}

/// An owner's published mapping as nft needs it: connections to
/// `host_ip:host_port` go to `container_ip:container_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PublishedMapping {
    pub proto: Proto,
    /// `None`: every host address.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
}

/// One protected port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub proto: Proto,
    pub ports: PortRange,
}

/// Everything [`inspect`] needs besides the ruleset.
#[derive(Clone, Debug, Default)]
pub struct InspectInput {
    pub ports: Vec<PortSpec>,
    pub owned: OwnedTargets,
    /// The addresses of the namespace the ruleset belongs to.
    pub local_addrs: Vec<LocalAddr>,
    /// Name prefixes of interfaces connections from outside do not arrive on.
    pub internal_ifaces: Vec<String>,
    /// The netlink port id owning the calling agent's pin tables: those are
    /// skipped (the rule guard keeps them itself). None (`check`, `fix`):
    /// no table is skipped; a pin that sends a connection where the owner's
    /// own rule does is the owner's mapping, as any such copy is.
    pub own_pins: Option<u32>,
}

impl InspectInput {
    pub fn from_policy(policy: &Policy, owned: OwnedTargets, local_addrs: Vec<LocalAddr>) -> Self {
        Self {
            ports: policy
                .ports
                .iter()
                .map(|p| PortSpec {
                    proto: p.proto,
                    ports: p.port,
                })
                .collect(),
            owned,
            local_addrs,
            internal_ifaces: INTERNAL_IFACE_PREFIXES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            own_pins: None,
        }
    }

    fn is_internal(&self, ifname: &str) -> bool {
        self.internal_ifaces
            .iter()
            .any(|p| ifname.starts_with(p.as_str()))
    }

    /// Every probe: each protected port × each local address, from outside
    /// (prerouting, on the interface holding the address) and from this host (output).
    pub fn probes(&self) -> Vec<(Proto, ProbePacket)> {
        let mut out = Vec::new();
        for spec in &self.ports {
            for port in spec.ports.iter().take(MAX_PROBED_PORTS_PER_ENTRY) {
                let mut seen_output = BTreeSet::new();
                for la in &self.local_addrs {
                    if let IpAddr::V6(v6) = la.addr
                        && v6.segments()[0] & 0xffc0 == 0xfe80
                    {
                        continue;
                    }
                    let base = ProbePacket {
                        hook: Hook::Prerouting,
                        v6: la.addr.is_ipv6(),
                        l4proto: spec.proto.ip_proto(),
                        dport: port,
                        daddr: la.addr,
                        iifname: Some(la.ifname.clone()),
                        iifindex: la.ifindex,
                    };
                    if !la.addr.is_loopback() && !self.is_internal(&la.ifname) {
                        out.push((spec.proto, base.clone()));
                    }
                    if seen_output.insert(la.addr) {
                        out.push((
                            spec.proto,
                            ProbePacket {
                                hook: Hook::Output,
                                iifname: None,
                                iifindex: 0,
                                ..base
                            },
                        ));
                    }
                }
            }
        }
        out
    }
}

/// What a foreign rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingKind {
    Dnat,
    Redirect,
    Tproxy,
    /// An iptables target that cannot be decoded, on a rule matching a
    /// protected port: "unclassified, may hijack".
    Unclassified,
    /// Rewrites nothing, but takes new connections to the port away before
    /// the owner's mapping (an accept, return, drop or goto ahead of Docker's
    /// DNAT): the owner's port is dead for them ([`shadow`]).
    Shadow,
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dnat => "dnat",
            Self::Redirect => "redirect",
            Self::Tproxy => "tproxy",
            Self::Unclassified => "unclassified, may hijack",
            Self::Shadow => "shadows the owner",
        })
    }
}

/// A new connection that reaches a foreign rule: from outside (prerouting) or
/// from this host (output), to this local address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ActivePath {
    pub hook: Hook,
    pub daddr: IpAddr,
}

/// One foreign rewrite of one protected port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub family: Family,
    pub table: String,
    pub chain: String,
    /// The rule's handle (`nft delete rule FAMILY TABLE CHAIN handle N`); none for
    /// iptables-legacy rules, which `position` names instead.
    pub handle: Option<u64>,
    /// 1-based position in its chain (`iptables -t nat -D CHAIN N` for legacy).
    pub position: usize,
    pub origin: TableOrigin,
    pub proto: Proto,
    pub port: u16,
    /// Where the rewrite sends connections, as far as the rule says.
    pub target: Option<String>,
    /// Some new connection to the port reaches it before the owner's rule.
    pub active: bool,
    /// Hooks on which it is active: prerouting (from outside), output (from this host).
    pub active_on: Vec<Hook>,
    /// Each hook and local address for which it is active.
    pub active_paths: Vec<ActivePath>,
    /// Why this rule is a hijack, in words: what it does, where it sends
    /// connections, in which kind of chain at which hook ("DNAT to
    /// 10.42.0.2:80 in a nat chain at prerouting (iptables target DNAT)").
    pub reason: String,
    /// Who wrote it, as far as it says.
    pub source: String,
    pub evidence: Vec<String>,
    pub comment: Option<String>,
    /// The chains from the nat base chain down to the rule.
    pub chain_path: Vec<String>,
    pub base_priority: i32,
    /// Base chains at the same hook and priority in other tables that may run
    /// before this rule's and take the connection ("ip nat PREROUTING"): the
    /// kernel's order between them cannot be read, so the finding counts the
    /// order that reaches it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub order_unknown_with: Vec<String>,
    /// [`FindingKind::Shadow`]: where the owner's own mapping, which this rule
    /// keeps new connections from, would send them ("203.0.113.2:80").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadows: Vec<String>,
}

impl Finding {
    /// A rule that shadows the owner's mapping rather than rewriting.
    pub fn is_shadow(&self) -> bool {
        self.kind == FindingKind::Shadow
    }
}

/// The owner's own mapping of a protected port, as a rule in the ruleset says
/// (what a pin re-applies ahead of everyone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct OwnedMapping {
    pub proto: Proto,
    pub port: u16,
    pub target: SocketAddr,
    /// The local address a new connection was headed for when it met the
    /// owner's rule (a publish on one host address is met on that one only).
    pub daddr: IpAddr,
}

/// The pure inspection: every foreign rewrite of a protected port.
pub fn inspect(model: &RulesetModel, input: &InspectInput) -> Vec<Finding> {
    inspect_with_owned(model, input).0
}

/// [`inspect`], also returning the owner's own DNAT mappings it met on the way
/// (shadowed or not). portguard's own pin table is neither.
pub fn inspect_with_owned(
    model: &RulesetModel,
    input: &InspectInput,
) -> (Vec<Finding>, Vec<OwnedMapping>) {
    inspect_probes(model, input, |_| true)
}

/// [`inspect_with_owned`] on the probes `wanted` keeps only: what an
/// incremental re-inspection needs when a change can only affect some ports,
/// hooks or families.
pub fn inspect_probes(
    model: &RulesetModel,
    input: &InspectInput,
    wanted: impl Fn(&ProbePacket) -> bool,
) -> (Vec<Finding>, Vec<OwnedMapping>) {
    inspect_indexed(&RulesetIndex::new(model), input, wanted)
}

/// [`inspect_probes`], also saying which chains its probes entered (see
/// [`ReachedChains`]).
pub fn inspect_reaching(
    model: &RulesetModel,
    input: &InspectInput,
    wanted: impl Fn(&ProbePacket) -> bool,
) -> (Vec<Finding>, Vec<OwnedMapping>, ReachedChains) {
    let idx = RulesetIndex::new(model);
    let (findings, owned) = inspect_indexed(&idx, input, wanted);
    let mut reached = ReachedChains::default();
    for (ti, ci) in idx.reached() {
        let table = &model.tables[ti];
        reached.insert(table.family, &table.name, &table.chains[ci].name);
    }
    (findings, owned, reached)
}

/// The chains an inspection's probes entered, by family, table and chain
/// name. A rule added to or deleted from any other chain cannot change what
/// those probes meet: no walk goes there, and only a rule in an entered chain
/// (or a new base chain, which is a structural change) can lead one there.
///
/// Kept as 64-bit hashes of the names: a collision can only make an
/// unentered chain look entered (inspected for nothing), never the reverse.
#[derive(Clone, Debug, Default)]
pub struct ReachedChains(std::collections::HashSet<u64>);

impl ReachedChains {
    fn key(family: Family, table: &str, chain: &str) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        // SipHash with fixed keys: the same name gives the same key every time.
        let mut h = std::hash::DefaultHasher::new();
        (family.0, table, chain).hash(&mut h);
        h.finish()
    }

    pub fn insert(&mut self, family: Family, table: &str, chain: &str) {
        self.0.insert(Self::key(family, table, chain));
    }

    /// Whether a probe entered this chain.
    pub fn contains(&self, family: Family, table: &str, chain: &str) -> bool {
        self.0.contains(&Self::key(family, table, chain))
    }

    /// Adds what another inspection (of other probes) entered.
    pub fn extend(&mut self, other: Self) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// [`inspect_with_owned`] walking every rule of every chain (no port
/// dispatch): the reference the dispatch is checked against (fuzz target,
/// tests). Same answer, slower on long chains.
pub fn inspect_whole_chains(
    model: &RulesetModel,
    input: &InspectInput,
) -> (Vec<Finding>, Vec<OwnedMapping>) {
    inspect_indexed(&RulesetIndex::new(model).whole_chains(), input, |_| true)
}

fn inspect_indexed(
    idx: &RulesetIndex<'_>,
    input: &InspectInput,
    wanted: impl Fn(&ProbePacket) -> bool,
) -> (Vec<Finding>, Vec<OwnedMapping>) {
    let model = idx.model();
    let mut found: BTreeMap<(analysis::RuleRef, Proto, u16), Finding> = BTreeMap::new();
    let mut owned = BTreeSet::new();
    for (proto, probe) in input.probes().into_iter().filter(|(_, p)| wanted(p)) {
        let walk = analysis::Walker::new(idx, &probe).run_full();
        let dnat_target = |rw: &Rewrite| match rw {
            Rewrite::Dnat {
                addr: Some(addr),
                port,
            } => Some(SocketAddr::new(*addr, port.unwrap_or(probe.dport))),
            _ => None,
        };
        let ours = |at: &analysis::RuleRef| {
            input
                .own_pins
                .is_some_and(|port_id| pin::is_pin_table(&model.tables[at.table], port_id))
        };
        // Where the owner's own rules send this connection (met shadowed or
        // not), and every rule that sends it there (pins and copies included).
        let mut owner_targets = Vec::new();
        let mut serving = BTreeSet::new();
        let mut foreign = Vec::new();
        for hit in &walk.hits {
            let table = &model.tables[hit.at.table];
            if ours(&hit.at) {
                serving.insert(hit.at);
                continue;
            }
            let chain = &table.chains[hit.at.chain];
            if classify::is_owned(
                &hit.rewrite,
                proto,
                probe.dport,
                table,
                &chain.name,
                &input.owned,
                &input.local_addrs,
            ) {
                serving.insert(hit.at);
                if let Some(target) = dnat_target(&hit.rewrite) {
                    owner_targets.push(target);
                    owned.insert(OwnedMapping {
                        proto,
                        port: probe.dport,
                        target,
                        daddr: probe.daddr,
                    });
                }
            } else {
                foreign.push(hit);
            }
        }
        foreign.retain(|hit: &&analysis::Hit| {
            // A copy of the owner's mapping for this very connection (a pin,
            // or anyone's rule to the same place) takes nothing from it.
            let copy = dnat_target(&hit.rewrite).is_some_and(|t| owner_targets.contains(&t));
            if copy {
                serving.insert(hit.at);
            }
            !copy
        });
        if !owner_targets.is_empty() {
            for taker in shadow::shadowing(idx, &probe, &walk, &serving, ours) {
                let f = found
                    .entry((taker.at, proto, probe.dport))
                    .or_insert_with(|| {
                        let place = RulePlace {
                            at: taker.at,
                            path: &taker.path,
                            base: taker.base,
                        };
                        let how = reason(
                            FindingKind::Shadow,
                            None,
                            &taker.how,
                            place.base_hook(model),
                        );
                        new_finding(
                            model,
                            &place,
                            FindingKind::Shadow,
                            None,
                            None,
                            how,
                            proto,
                            probe.dport,
                        )
                    });
                f.note_active(probe.hook, probe.daddr);
                f.note_order_unknown(model, &taker.order_unknown_with);
                for t in &owner_targets {
                    let t = t.to_string();
                    if !f.shadows.contains(&t) {
                        f.shadows.push(t);
                    }
                }
            }
        }
        for hit in foreign {
            let f = found
                .entry((hit.at, proto, probe.dport))
                .or_insert_with(|| {
                    let place = RulePlace {
                        at: hit.at,
                        path: &hit.path,
                        base: hit.base,
                    };
                    let (kind, target, target_ip) = describe(&hit.rewrite, probe.dport);
                    let how = reason(kind, target.as_deref(), &hit.how, place.base_hook(model));
                    new_finding(
                        model,
                        &place,
                        kind,
                        target,
                        target_ip,
                        how,
                        proto,
                        probe.dport,
                    )
                });
            if hit.reach > Reach::Shadowed {
                f.note_order_unknown(model, &hit.order_unknown_with);
                f.note_active(probe.hook, probe.daddr);
            }
        }
    }
    let mut findings: Vec<Finding> = found.into_values().collect();
    for f in findings.iter_mut().filter(|f| f.is_shadow()) {
        f.shadows.sort();
        f.reason = format!(
            "{}, ahead of the owner's mapping to {}: new connections to port {} skip it \
             (refused, dropped, or served by whatever listens on the host)",
            f.reason,
            f.shadows.join(", "),
            f.port
        );
    }
    for f in findings
        .iter_mut()
        .filter(|f| !f.order_unknown_with.is_empty())
    {
        f.order_unknown_with.sort();
        f.reason = format!(
            "{}; at priority {} like {} in another table, which may run first: the kernel's \
             order between them cannot be read, so counted as possibly active",
            f.reason,
            f.base_priority,
            f.order_unknown_with.join(", ")
        );
    }
    (findings, owned.into_iter().collect())
}

impl Finding {
    /// Names the equal-priority base chains (table, chain) that may run first.
    fn note_order_unknown(&mut self, model: &RulesetModel, chains: &[(usize, usize)]) {
        for &(ti, ci) in chains {
            let t = &model.tables[ti];
            let name = format!("{} {} {}", t.family, t.name, t.chains[ci].name);
            if !self.order_unknown_with.contains(&name) {
                self.order_unknown_with.push(name);
            }
        }
    }

    /// Counts a probe that reaches the rule: active on its hook and address.
    fn note_active(&mut self, hook: Hook, daddr: IpAddr) {
        self.active = true;
        if !self.active_on.contains(&hook) {
            self.active_on.push(hook);
            self.active_on.sort();
        }
        let path = ActivePath { hook, daddr };
        if !self.active_paths.contains(&path) {
            self.active_paths.push(path);
        }
    }
}

/// Where a rule met on a walk sits: the rule, the chains down to it, and the
/// base chain the walk entered by.
struct RulePlace<'a> {
    at: analysis::RuleRef,
    path: &'a [usize],
    base: (usize, usize),
}

impl RulePlace<'_> {
    fn base_hook<'m>(&self, model: &'m RulesetModel) -> Option<&'m model::BaseHook> {
        model.tables[self.base.0].chains[self.base.1].base.as_ref()
    }
}

/// A finding for the rule at `place` (hijack or shadow), not yet active on
/// any path.
#[allow(
    clippy::too_many_arguments,
    reason = "one finding's fields, named at both call sites"
)]
fn new_finding(
    model: &RulesetModel,
    place: &RulePlace<'_>,
    kind: FindingKind,
    target: Option<String>,
    target_ip: Option<IpAddr>,
    reason: String,
    proto: Proto,
    port: u16,
) -> Finding {
    let table = &model.tables[place.at.table];
    let chain = &table.chains[place.at.chain];
    let rule = &chain.rules[place.at.rule];
    let path: Vec<&str> = place
        .path
        .iter()
        .map(|&c| table.chains[c].name.as_str())
        .collect();
    let comment = rule.comment.clone().or_else(|| xt_comment(rule.exprs()));
    let attribution = classify::attribute(table, &path, comment.as_deref(), target_ip);
    Finding {
        kind,
        family: table.family,
        table: table.name.clone(),
        chain: chain.name.clone(),
        handle: (table.origin != TableOrigin::IptablesLegacy).then_some(rule.handle),
        position: place.at.rule + 1,
        origin: table.origin,
        proto,
        port,
        target,
        active: false,
        active_on: Vec::new(),
        active_paths: Vec::new(),
        reason,
        source: attribution.source,
        evidence: attribution.evidence,
        comment,
        chain_path: path.iter().map(|s| (*s).to_owned()).collect(),
        base_priority: place.base_hook(model).map_or(0, |b| b.priority),
        order_unknown_with: Vec::new(),
        shadows: Vec::new(),
    }
}

fn xt_comment(exprs: &[model::Expr]) -> Option<String> {
    exprs.iter().find_map(|e| match e {
        model::Expr::XtMatch { name, info, .. } => xt::comment(name, info),
        _ => None,
    })
}

fn describe(rw: &Rewrite, port: u16) -> (FindingKind, Option<String>, Option<IpAddr>) {
    let sock = |addr: Option<IpAddr>, p: Option<u16>| match (addr, p) {
        (Some(a), p) => Some(SocketAddr::new(a, p.unwrap_or(port)).to_string()),
        (None, Some(p)) => Some(format!(":{p}")),
        (None, None) => None,
    };
    match rw {
        Rewrite::Dnat { addr, port: p } => (FindingKind::Dnat, sock(*addr, *p), *addr),
        Rewrite::Redirect { port: p } => (
            FindingKind::Redirect,
            Some(format!(":{}", p.unwrap_or(port))),
            None,
        ),
        Rewrite::Tproxy { addr, port: p } => (FindingKind::Tproxy, sock(*addr, *p), *addr),
        Rewrite::Opaque(what) => (FindingKind::Unclassified, Some(what.clone()), None),
    }
}

/// Why a rule is a hijack, in words (see [`Finding::reason`]).
fn reason(
    kind: FindingKind,
    target: Option<&str>,
    how: &str,
    base: Option<&model::BaseHook>,
) -> String {
    let place = base.map_or_else(
        || "in a chain".to_owned(),
        |b| format!("in a {} chain at {}", b.kind, b.hook),
    );
    let to = target.unwrap_or("a destination the rule does not state");
    match kind {
        FindingKind::Dnat => format!("DNAT to {to} {place} ({how})"),
        FindingKind::Redirect => format!("REDIRECT to {to} on this host {place} ({how})"),
        FindingKind::Tproxy => format!(
            "TPROXY to {} {place} ({how})",
            target.unwrap_or("a local socket on the same address and port")
        ),
        FindingKind::Unclassified => {
            format!("{how} {place}: cannot be decoded, may rewrite the destination")
        }
        FindingKind::Shadow => format!("{how} {place}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Read(#[from] netlink::ReadError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads the ruleset (nf_tables, plus iptables-legacy when in use) of this
/// network namespace, or of the named one (`/run/netns/NAME`).
pub fn read_host_ruleset(netns: Option<&str>) -> Result<RulesetModel, InspectError> {
    read_with_addrs(netns).map(|(m, _)| m)
}

/// The ruleset and the local addresses, both of the same namespace.
pub fn read_with_addrs(
    netns: Option<&str>,
) -> Result<(RulesetModel, Vec<LocalAddr>), InspectError> {
    read_timed(netns).map(|(model, addrs, _)| (model, addrs))
}

/// [`read_with_addrs`], and how long the read's parts took. The legacy
/// tables and the addresses are read beside the dump, on the decoder thread.
pub fn read_timed(
    netns: Option<&str>,
) -> Result<(RulesetModel, Vec<LocalAddr>, netlink::ReadTimings), InspectError> {
    crate::sys::netns::run_in(netns, || {
        let (mut model, (legacy, addrs), timings) = netlink::NftSocket::open()?
            .read_ruleset_while(|| (legacy::LegacyTables::read(), local::local_addresses()))?;
        legacy.add_to(&mut model);
        Ok((model, addrs?, timings))
    })?
}

#[cfg(test)]
mod tests {
    //! The classification end to end on hand-built models: which statements in
    //! which chains are findings, and the reason each finding gives.

    use super::{
        model::{BaseHook, Chain, Data, Expr, NatKind, Rule, Table, Verdict},
        *,
    };
    use crate::policy::PortRange;

    const PORT: u16 = 80;
    const HOST: &str = "198.51.100.1";

    /// `-p tcp -m tcp --dport 80` as iptables-nft writes it (`struct xt_tcp`).
    fn tcp_dport(port: u16) -> Expr {
        let mut info = Vec::new();
        for p in [0, u16::MAX, port, port] {
            info.extend_from_slice(&p.to_ne_bytes());
        }
        info.extend_from_slice(&[0; 4]);
        Expr::XtMatch {
            name: "tcp".into(),
            rev: 0,
            info,
        }
    }

    fn target(name: &str, info: Vec<u8>) -> Expr {
        Expr::XtTarget {
            name: name.into(),
            rev: 0,
            info,
        }
    }

    /// One table holding one base chain with `rules`.
    fn model(kind: &str, priority: i32, rules: Vec<Vec<Expr>>) -> RulesetModel {
        RulesetModel {
            generation: None,
            tables: vec![Table {
                family: Family::IP,
                name: if kind == "nat" { "nat" } else { "mangle" }.into(),
                handle: 1,
                origin: TableOrigin::IptablesNft,
                chains: vec![Chain {
                    name: "PREROUTING".into(),
                    handle: 1,
                    base: Some(BaseHook {
                        hook: Hook::Prerouting,
                        priority,
                        kind: kind.into(),
                        policy: Some(Verdict::Accept),
                    }),
                    rules: rules
                        .into_iter()
                        .enumerate()
                        .map(|(i, e)| Rule::new(i as u64 + 1, e, None))
                        .collect(),
                }],
                ..Table::default()
            }],
            warnings: Vec::new(),
        }
    }

    fn findings(model: &RulesetModel) -> Vec<Finding> {
        let input = InspectInput {
            ports: vec![PortSpec {
                proto: Proto::Tcp,
                ports: PortRange::single(PORT),
            }],
            owned: OwnedTargets::docker_fallback(),
            local_addrs: vec![LocalAddr {
                addr: HOST.parse().unwrap(),
                prefix_len: 24,
                ifindex: 2,
                ifname: "eth0".into(),
            }],
            internal_ifaces: INTERNAL_IFACE_PREFIXES.map(str::to_owned).to_vec(),
            own_pins: None,
        };
        inspect(model, &input)
    }

    /// `nft add rule … tcp dport PORT dnat to ip:port` as expressions.
    fn nft_dnat(ip: [u8; 4], port: u16) -> Vec<Expr> {
        vec![
            tcp_dport(PORT),
            Expr::Immediate {
                dreg: 1,
                data: Data::Value(ip.to_vec()),
            },
            Expr::Immediate {
                dreg: 2,
                data: Data::Value(port.to_be_bytes().to_vec()),
            },
            Expr::Nat {
                kind: NatKind::Dnat,
                family: 2,
                reg_addr_min: Some(1),
                reg_addr_max: None,
                reg_proto_min: Some(2),
                reg_proto_max: None,
                flags: 0,
            },
        ]
    }

    /// Docker's DNAT of PORT to 172.17.0.2:80 (iptables-nft `nat DOCKER`,
    /// behind docker0) plus a `table ip portguard` at -199 holding `pin`,
    /// owned by netlink port `owner`.
    fn pinned(pin: Vec<Expr>, owner: Option<u32>) -> (RulesetModel, InspectInput) {
        let mut m = model("nat", -100, Vec::new());
        let nat = &mut m.tables[0];
        nat.chains[0].name = "DOCKER".into();
        nat.chains[0].rules = vec![Rule::new(1, nft_dnat([172, 17, 0, 2], 80), None)].into();
        m.tables.push(Table {
            family: Family::IP,
            name: pin::PIN_TABLE.into(),
            handle: 2,
            owner,
            origin: TableOrigin::Nft,
            chains: vec![Chain {
                name: pin::PIN_PREROUTING_CHAIN.into(),
                handle: 1,
                base: Some(BaseHook {
                    hook: Hook::Prerouting,
                    priority: pin::PIN_PRIORITY,
                    kind: "nat".into(),
                    policy: Some(Verdict::Accept),
                }),
                rules: vec![Rule::new(1, pin, None)].into(),
            }],
            ..Table::default()
        });
        let input = InspectInput {
            ports: vec![PortSpec {
                proto: Proto::Tcp,
                ports: PortRange::single(PORT),
            }],
            owned: OwnedTargets::docker_fallback(),
            local_addrs: vec![
                LocalAddr {
                    addr: HOST.parse().unwrap(),
                    prefix_len: 24,
                    ifindex: 2,
                    ifname: "eth0".into(),
                },
                LocalAddr {
                    addr: "172.17.0.1".parse().unwrap(),
                    prefix_len: 16,
                    ifindex: 3,
                    ifname: "docker0".into(),
                },
            ],
            internal_ifaces: INTERNAL_IFACE_PREFIXES.map(str::to_owned).to_vec(),
            own_pins: None,
        };
        (m, input)
    }

    #[test]
    fn a_pin_table_is_judged_by_what_it_does_not_by_its_name() {
        // The owner's mapping copied (what a pin does): no finding, whoever's table.
        let (m, input) = pinned(nft_dnat([172, 17, 0, 2], 80), Some(4242));
        assert_eq!(inspect(&m, &input), []);
        // A table called `portguard` that sends the port elsewhere is a hijack
        // like any other: the name protects nothing.
        let (m, input) = pinned(nft_dnat([10, 42, 0, 2], 80), None);
        let f = inspect(&m, &input);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (f[0].table.as_str(), f[0].target.as_deref(), f[0].active),
            (pin::PIN_TABLE, Some("10.42.0.2:80"), true)
        );
        // The agent skips only the table its own socket owns.
        let (m, mut input) = pinned(nft_dnat([10, 42, 0, 2], 80), Some(4242));
        input.own_pins = Some(4242);
        assert_eq!(
            inspect(&m, &input),
            [],
            "our own (stale) pin: the pin sync's business"
        );
        input.own_pins = Some(77);
        assert_eq!(
            inspect(&m, &input).len(),
            1,
            "another socket's table is judged"
        );
    }

    /// A nat prerouting chain at -100 holding `tcp dport PORT dnat to ip:80`.
    fn dnat_chain(name: &str, handle: u64, ip: [u8; 4]) -> Chain {
        Chain {
            name: name.into(),
            handle,
            base: Some(BaseHook {
                hook: Hook::Prerouting,
                priority: -100,
                kind: "nat".into(),
                policy: Some(Verdict::Accept),
            }),
            rules: vec![Rule::new(1, nft_dnat(ip, 80), None)].into(),
        }
    }

    #[test]
    fn equal_priorities_in_two_tables_are_possibly_active_in_either_order() {
        let table = |name: &str, handle, chains| Table {
            family: Family::IP,
            name: name.into(),
            handle,
            origin: TableOrigin::Nft,
            chains,
            ..Table::default()
        };
        let (_, input) = pinned(Vec::new(), None);
        let m = RulesetModel {
            tables: vec![
                table("a", 1, vec![dnat_chain("pre", 1, [10, 0, 0, 1])]),
                table("b", 2, vec![dnat_chain("pre", 1, [10, 0, 0, 2])]),
            ],
            ..RulesetModel::default()
        };
        let f = inspect(&m, &input);
        assert_eq!(f.len(), 2, "{f:?}");
        for (finding, other) in f.iter().zip(["ip b pre", "ip a pre"]) {
            assert!(finding.active, "either may run first: {finding:?}");
            assert_eq!(finding.order_unknown_with, [other]);
            assert!(
                finding.reason.contains("cannot be read"),
                "{}",
                finding.reason
            );
        }
        // In one table the handles say: the newer chain runs first, the
        // other one is latent, and nothing is unknown.
        let m = RulesetModel {
            tables: vec![table(
                "a",
                1,
                vec![
                    dnat_chain("old", 1, [10, 0, 0, 1]),
                    dnat_chain("new", 2, [10, 0, 0, 2]),
                ],
            )],
            ..RulesetModel::default()
        };
        let f = inspect(&m, &input);
        let by_chain = |c: &str| f.iter().find(|x| x.chain == c).unwrap();
        assert!(by_chain("new").active);
        assert!(!by_chain("old").active, "{f:?}");
        assert!(f.iter().all(|x| x.order_unknown_with.is_empty()));
        // A dormant table runs nothing.
        let mut dormant = table("a", 1, vec![dnat_chain("pre", 1, [10, 0, 0, 1])]);
        dormant.flags = crate::sys::uapi::NFT_TABLE_F_DORMANT;
        let m = RulesetModel {
            tables: vec![dormant],
            ..RulesetModel::default()
        };
        assert_eq!(inspect(&m, &input), []);
    }

    #[test]
    fn non_rewriting_targets_in_raw_and_mangle_are_no_finding() {
        for name in [
            "NFQUEUE", "TEE", "TTL", "MARK", "CONNMARK", "SET", "HMARK", "SYNPROXY", "FROB",
        ] {
            for priority in [-300, -150] {
                let m = model(
                    "filter",
                    priority,
                    vec![vec![tcp_dport(PORT), target(name, vec![0; 16])]],
                );
                assert_eq!(findings(&m), [], "{name} at priority {priority}");
            }
        }
    }

    #[test]
    fn an_unknown_target_in_a_nat_chain_may_hijack_and_says_why() {
        let m = model(
            "nat",
            -100,
            vec![vec![tcp_dport(PORT), target("FROB", Vec::new())]],
        );
        let f = findings(&m);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].kind, FindingKind::Unclassified);
        assert!(f[0].active);
        assert_eq!(
            f[0].reason,
            "iptables target FROB in a nat chain at prerouting: cannot be decoded, may rewrite the destination"
        );
        // A known non-rewriting target in a nat chain is no finding either.
        let m = model(
            "nat",
            -100,
            vec![vec![tcp_dport(PORT), target("NFQUEUE", vec![0; 8])]],
        );
        assert_eq!(findings(&m), []);
    }

    #[test]
    fn nfqueue_may_end_evaluation_so_a_later_rewrite_stays_active() {
        // A queue ahead of a TPROXY: the TPROXY is reached by what the IPS passes on.
        let m = model(
            "filter",
            -150,
            vec![
                vec![tcp_dport(PORT), target("NFQUEUE", vec![0; 8])],
                vec![tcp_dport(PORT), target("TPROXY", vec![0; 16])],
            ],
        );
        let f = findings(&m);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].kind, FindingKind::Tproxy);
        assert!(f[0].active, "{f:?}");
        assert_eq!(f[0].position, 2);
        // REJECT surely ends evaluation: a TPROXY after it is latent.
        let m = model(
            "filter",
            -150,
            vec![
                vec![tcp_dport(PORT), target("REJECT", vec![0; 4])],
                vec![tcp_dport(PORT), target("TPROXY", vec![0; 16])],
            ],
        );
        let f = findings(&m);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(!f[0].active, "{f:?}");
    }

    #[test]
    fn tproxy_and_dnat_give_their_reason() {
        let mut tproxy = vec![0u8; 16];
        tproxy[12..14].copy_from_slice(&3128u16.to_be_bytes());
        let m = model(
            "filter",
            -150,
            vec![vec![tcp_dport(PORT), target("TPROXY", tproxy)]],
        );
        let f = findings(&m);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].target.as_deref(), Some(":3128"));
        assert_eq!(
            f[0].reason,
            "TPROXY to :3128 in a filter chain at prerouting (iptables target TPROXY)"
        );
        let m = model(
            "nat",
            -100,
            vec![vec![
                tcp_dport(PORT),
                Expr::Immediate {
                    dreg: 1,
                    data: Data::Value(vec![10, 42, 0, 2]),
                },
                Expr::Nat {
                    kind: NatKind::Dnat,
                    family: 2,
                    reg_addr_min: Some(1),
                    reg_addr_max: Some(1),
                    reg_proto_min: None,
                    reg_proto_max: None,
                    flags: 0,
                },
            ]],
        );
        let f = findings(&m);
        assert_eq!(
            f[0].reason,
            "DNAT to 10.42.0.2:80 in a nat chain at prerouting (nft dnat statement)"
        );
    }

    #[test]
    fn native_queue_synproxy_dup_in_a_filter_chain_are_no_finding() {
        for name in ["queue", "synproxy", "dup", "fwd", "frobnicate"] {
            let m = model(
                "filter",
                -300,
                vec![vec![tcp_dport(PORT), Expr::Unknown { name: name.into() }]],
            );
            assert_eq!(findings(&m), [], "{name}");
        }
        // `queue` may end evaluation: it does not hide a later tproxy, nor decide it.
        let m = model(
            "filter",
            -150,
            vec![
                vec![
                    tcp_dport(PORT),
                    Expr::Unknown {
                        name: "queue".into(),
                    },
                ],
                vec![tcp_dport(PORT), target("TPROXY", vec![0; 16])],
            ],
        );
        let f = findings(&m);
        assert_eq!(f.len(), 1);
        assert!(f[0].active);
    }

    /// The port dispatch changes no answer: on long chains of rules keyed by
    /// port, rules for any port, negated port matches, xt matches, jumps,
    /// returns and accepts, inspecting with it finds what walking every rule finds.
    mod dispatch_is_exact {
        use proptest::prelude::*;

        use super::*;

        /// One rule: (port match kind, port, statement).
        fn rule(kind: u8, port: u16, statement: u8, i: u64) -> Vec<Expr> {
            let dport = |op| {
                vec![
                    Expr::Payload {
                        base: model::PayloadBase::Transport,
                        offset: 2,
                        len: 2,
                        dreg: 1,
                    },
                    Expr::Cmp {
                        sreg: 1,
                        op,
                        data: port.to_be_bytes().to_vec(),
                    },
                ]
            };
            let mut e = match kind % 4 {
                0 => dport(model::CmpOp::Eq),
                1 => dport(model::CmpOp::Neq),
                2 => vec![tcp_dport(port)],
                _ => Vec::new(),
            };
            let verdict = |v| Expr::Immediate {
                dreg: 0,
                data: Data::Verdict(v),
            };
            match statement % 5 {
                0 | 1 => e.extend(nft_dnat([203, 0, 113, (i % 250) as u8 + 1], 80).split_off(1)),
                2 => e.push(verdict(Verdict::Jump("SUB".into()))),
                3 => e.push(verdict(Verdict::Return)),
                _ => e.push(verdict(Verdict::Accept)),
            }
            e
        }

        fn chain(name: &str, handle: u64, base: bool, rules: &[(u8, u16, u8)]) -> Chain {
            Chain {
                name: name.into(),
                handle,
                base: base.then(|| BaseHook {
                    hook: Hook::Prerouting,
                    priority: -100,
                    kind: "nat".into(),
                    policy: Some(Verdict::Accept),
                }),
                rules: rules
                    .iter()
                    .enumerate()
                    .map(|(i, &(k, p, st))| {
                        // No jump out of the jumped-to chain (no loop).
                        let st = if base { st } else { st % 2 };
                        Rule::new(handle * 1000 + i as u64, rule(k, p, st, i as u64), None)
                    })
                    .collect(),
            }
        }

        fn rules() -> impl Strategy<Value = Vec<(u8, u16, u8)>> {
            prop::collection::vec(
                (
                    any::<u8>(),
                    prop::sample::select(vec![80u16, 443, 8080, 22]),
                    any::<u8>(),
                ),
                dispatch::DISPATCH_MIN_RULES..dispatch::DISPATCH_MIN_RULES * 3,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn same_findings_and_mappings_as_a_walk_of_every_rule(base in rules(), sub in rules()) {
                let model = RulesetModel {
                    generation: None,
                    tables: vec![Table {
                        family: Family::IP,
                        name: "nat".into(),
                        handle: 1,
                        origin: TableOrigin::Nft,
                        chains: vec![chain("PREROUTING", 1, true, &base), chain("SUB", 2, false, &sub)],
                        ..Table::default()
                    }],
                    warnings: Vec::new(),
                };
                let mut input = InspectInput {
                    ports: vec![PortSpec {
                        proto: Proto::Tcp,
                        ports: PortRange::single(80),
                    }, PortSpec {
                        proto: Proto::Tcp,
                        ports: PortRange::single(443),
                    }],
                    owned: OwnedTargets::docker_fallback(),
                    local_addrs: vec![LocalAddr {
                        addr: HOST.parse().unwrap(),
                        prefix_len: 24,
                        ifindex: 2,
                        ifname: "eth0".into(),
                    }],
                    internal_ifaces: INTERNAL_IFACE_PREFIXES.map(str::to_owned).to_vec(),
                    own_pins: None,
                };
                input.ports.truncate(2);
                let fast = inspect_with_owned(&model, &input);
                let whole = inspect_whole_chains(&model, &input);
                prop_assert_eq!(&fast.0, &whole.0);
                prop_assert_eq!(&fast.1, &whole.1);
            }
        }
    }
}
