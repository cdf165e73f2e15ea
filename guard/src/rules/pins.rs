//! Pins: which the policy and the owners want, and keeping portguard's pin
//! tables holding exactly those (audited, one atomic batch per change). The
//! pin table's netlink codec is `nft::pin`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use tracing::info;

use super::{backend::RulesetBackend, error::GuardError};
use crate::{
    audit::{AuditEvent, AuditHandle},
    nft::{
        self, LocalAddr, OwnedMapping, OwnedTargets, RulesetModel,
        model::Family,
        pin::{self, ChainAhead, ForeignPinTable, Pin, PinTables},
    },
    policy::{Mode, Policy, Proto},
};

/// The first 10 bits of an IPv6 link-local address (`fe80::/10`).
const IPV6_LINK_LOCAL_MASK: u16 = 0xffc0;
const IPV6_LINK_LOCAL_PREFIX: u16 = 0xfe80;

/// The pins the guard keeps, and the owner mappings it learned from the
/// ruleset while Docker cannot be asked (or for another namespace).
#[derive(Debug, Default)]
pub struct PinSet {
    /// What the pin tables hold (as last written).
    pins: Vec<Pin>,
    /// Pins learned from the owner's own DNAT rules: kept while the rule is shadowed.
    learned: BTreeSet<OwnedMapping>,
    /// Other tables named like the pin table, as last reported.
    foreign: Vec<ForeignPinTable>,
}

/// Tables named like the pin table that are not this agent's, and the pins
/// they keep out, when that changed since the last sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignPinTables {
    pub tables: Vec<ForeignPinTable>,
    /// Wanted pins of the families those tables block: not installed.
    pub withheld: Vec<Pin>,
}

/// What [`PinSet::sync`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum PinSync {
    /// The tables already hold the wanted pins; `ahead`: other nat chains at
    /// or ahead of the pin's priority (only when some pin is wanted).
    InSync { ahead: Vec<ChainAhead> },
    /// Nothing wanted and nothing installed.
    Cleared,
    /// The tables were rewritten to hold `pins` (none: removed).
    Written { pins: Vec<Pin> },
}

impl PinSet {
    /// The pins written last.
    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }

    /// The pins the policy asks for, from the owners model (Docker reachable,
    /// this host) or else from the owner's own DNAT rules in the ruleset
    /// (`mappings`). `full`: `mappings` come from a full inspection (else from
    /// a scoped one, which adds mappings but cannot tell that one is gone).
    ///
    /// Each pin matches what the owner publishes: its host address (or every
    /// local address for a publish on all), and spares the bridge the owner's
    /// container sits behind (hairpin traffic stays the owner's own).
    pub fn wanted(
        &mut self,
        policy: &Policy,
        owned: &OwnedTargets,
        addrs: &[LocalAddr],
        mappings: Vec<OwnedMapping>,
        full: bool,
    ) -> Vec<Pin> {
        let pinned = |proto: Proto, port: u16| {
            policy
                .find(port, proto)
                .is_some_and(|p| p.pin && policy.mode_of(p) == Mode::Enforce)
        };
        let bridge =
            |target: SocketAddr| nft::classify::bridge_of(target.ip(), addrs).map(str::to_owned);
        let mut pins = BTreeSet::new();
        if owned.docker_known {
            for nat in &owned.published {
                let target = SocketAddr::new(nat.container_ip, nat.container_port);
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
            let fresh: BTreeSet<OwnedMapping> = mappings
                .into_iter()
                .filter(|m| pinned(m.proto, m.port))
                .collect();
            // The owner's rule changed (a new container address) or went away:
            // follow it.
            if full {
                self.learned = fresh;
            } else {
                self.learned.extend(fresh);
            }
            for ((proto, port, target), host) in learned_hosts(&self.learned, addrs) {
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

    /// Another program's tables named like the pin table (of `tables`), and
    /// the `wanted` pins they keep out; `Some` only when that changed since
    /// the last call (to report it once).
    pub fn foreign_tables(
        &mut self,
        tables: &PinTables,
        wanted: &[Pin],
    ) -> Option<ForeignPinTables> {
        if tables.foreign == self.foreign {
            return None;
        }
        let tables = tables.foreign.clone();
        self.foreign.clone_from(&tables);
        let withheld = wanted
            .iter()
            .filter(|p| tables.iter().any(|t| t.family == p.family()))
            .cloned()
            .collect();
        Some(ForeignPinTables { tables, withheld })
    }

    /// Makes this agent's pin tables hold exactly `wanted`: each installed,
    /// updated or removed pin is audited, then the tables are rewritten in one
    /// batch, decided on the model's generation. A family in which another
    /// table holds the pin table's name gets no pin (see `nft::pin`).
    /// `tables`: the pin-named tables of `model` for the backend's port id.
    pub async fn sync<B: RulesetBackend>(
        &mut self,
        model: &RulesetModel,
        tables: &PinTables,
        wanted: Vec<Pin>,
        audit: &AuditHandle,
        backend: &mut B,
    ) -> Result<PinSync, GuardError> {
        let ours = backend.port_id();
        let wanted: Vec<Pin> = wanted
            .into_iter()
            .filter(|p| !tables.blocked(p.family()))
            .collect();
        let installed = &tables.ours;
        let intact = pins_intact(model, &wanted, ours);
        if wanted == self.pins && intact {
            let ahead = if wanted.is_empty() {
                Vec::new()
            } else {
                pin::chains_not_behind(model, ours)
            };
            return Ok(PinSync::InSync { ahead });
        }
        if wanted.is_empty() && installed.is_empty() {
            self.pins.clear();
            return Ok(PinSync::Cleared);
        }
        for p in &wanted {
            let event = match self
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
            audit.record(event).await?;
        }
        for old in self.pins.iter().filter(|o| {
            !wanted
                .iter()
                .any(|p| p.proto == o.proto && p.port == o.port && p.host == o.host)
        }) {
            audit
                .record(AuditEvent::PinRemoved {
                    port: old.port,
                    proto: old.proto,
                    rule: serde_json::to_value(old).expect("a pin serialises"),
                })
                .await?;
        }
        backend
            .commit(&pin::sync_transaction(installed, &wanted).at_generation(model.generation))?;
        info!(
            event = "pins_synced",
            pins = wanted.len(),
            priority = pin::PIN_PRIORITY,
            lowest_other_nat_priority = pin::lowest_other_nat_priority(model, ours),
            "pins in sync: ahead of every other nat chain present"
        );
        self.pins.clone_from(&wanted);
        // The pin tables changed structurally: the next notification batch
        // (NEWTABLE/NEWCHAIN) triggers a full read, which brings them into the model.
        Ok(PinSync::Written { pins: wanted })
    }

    /// Removes every pin (the agent stops: no pin outlives it), collecting
    /// every failure; each family's table on its own, so one failing does
    /// not keep the other.
    pub async fn teardown<B: RulesetBackend>(
        &mut self,
        model: &RulesetModel,
        audit: &AuditHandle,
        backend: &mut B,
    ) -> Result<(), GuardError> {
        let installed = PinTables::of(model, backend.port_id()).ours;
        if installed.is_empty() && self.pins.is_empty() {
            return Ok(());
        }
        let mut errors = Vec::new();
        for p in std::mem::take(&mut self.pins) {
            if let Err(e) = audit
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
        // By handle, each on its own. A handle the model has not caught up with
        // fails with ENOENT and is left to the kernel, which deletes the table
        // with the socket that owns it.
        for table in installed {
            if let Err(e) = backend.commit(&pin::teardown_transaction(&[table]))
                && !e.all_missing()
            {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            info!(event = "pins_removed", "pins removed");
            Ok(())
        } else {
            Err(GuardError::PinTeardown(errors))
        }
    }
}

/// The learned owner mappings with the host address each is met on: every
/// local address (`None`) when the owner's rule is met on each non-loopback
/// address of the target's family, else one entry per address it is met on.
fn learned_hosts(
    learned: &BTreeSet<OwnedMapping>,
    addrs: &[LocalAddr],
) -> Vec<((Proto, u16, SocketAddr), Option<IpAddr>)> {
    let mut by_target: BTreeMap<(Proto, u16, SocketAddr), BTreeSet<IpAddr>> = BTreeMap::new();
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
            .filter(|a| {
                !matches!(a, IpAddr::V6(v)
                    if v.segments()[0] & IPV6_LINK_LOCAL_MASK == IPV6_LINK_LOCAL_PREFIX)
            })
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

/// Whether the model holds this agent's pin table for each family with the
/// right number of rules.
fn pins_intact(model: &RulesetModel, wanted: &[Pin], ours: u32) -> bool {
    [Family::IP, Family::IP6].iter().all(|fam| {
        let of_family: Vec<&Pin> = wanted
            .iter()
            .filter(|p| (p.target.is_ipv6()) == (*fam == Family::IP6))
            .collect();
        let table = model
            .tables
            .iter()
            .find(|t| pin::is_pin_table(t, ours) && t.family == *fam);
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
