//! The ruleset seam: a [`RulesetBackend`] reads the ruleset (with the local
//! addresses, consistent with one nf_tables generation), waits for what changes
//! it, and commits atomic batches. The rule guard is generic over it, so its
//! loop runs the same against the kernel ([`NetlinkBackend`], in this network
//! namespace or a named one) and against a deterministic in-memory twin
//! ([`MemoryBackend`]) in unit tests, where races and faults are injected.

pub mod memory;

use std::{future::Future, io, time::Instant};

use tokio::io::unix::AsyncFd;

pub use self::memory::{Committed, MemoryBackend, MemoryControl, RulePlace, RuleTarget};
use crate::nft::{
    self, InspectError, LocalAddr, RulesetModel,
    monitor::{AddressMonitor, Change, RulesetMonitor},
    transaction::{NftWriter, Transaction, TransactionError},
};

/// The whole ruleset and the local addresses, read together.
#[derive(Clone, Debug, Default)]
pub struct RulesetSnapshot {
    pub model: RulesetModel,
    pub addrs: Vec<LocalAddr>,
}

impl RulesetSnapshot {
    /// The nf_tables generation the dump is consistent with.
    pub fn generation(&self) -> Option<u32> {
        self.model.generation
    }
}

/// What [`RulesetBackend::next_event`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendEvent {
    /// Ruleset changes were appended (possibly [`Change::Overrun`]: some were
    /// lost, re-read everything). `seen`: when they were first noticed.
    Ruleset { seen: Instant },
    /// A local address was added or removed.
    AddressesChanged,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("reading the ruleset: {0}")]
    Read(#[from] InspectError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Transaction(#[from] TransactionError),
    #[error("the ruleset read stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("this backend was opened without change notifications")]
    NotWatching,
}

/// Where the rule guard reads, watches and changes the ruleset.
///
/// Implementations are monomorphised into the guard's loop: no dynamic
/// dispatch on the hot path.
pub trait RulesetBackend: Send {
    /// Reads the whole ruleset and the local addresses.
    fn read(&mut self) -> impl Future<Output = Result<RulesetSnapshot, BackendError>> + Send;

    /// Waits for the next event; ruleset changes are appended to `changes` in
    /// the order they happened. Cancel safe: nothing is lost when the future
    /// is dropped before it completes.
    fn next_event(
        &mut self,
        changes: &mut Vec<Change>,
    ) -> impl Future<Output = Result<BackendEvent, BackendError>> + Send;

    /// Appends the ruleset changes already announced and not yet taken by
    /// [`Self::next_event`], without waiting (none when not watching): those
    /// queued while a read was under way.
    fn queued_changes(&mut self, changes: &mut Vec<Change>) -> Result<(), BackendError>;

    /// The local addresses now (after [`BackendEvent::AddressesChanged`]).
    fn local_addresses(&mut self) -> Result<Vec<LocalAddr>, BackendError>;

    /// Whether an iptables-legacy nat table is in use (it announces nothing).
    fn legacy_nat_in_use(&mut self) -> Result<bool, BackendError>;

    /// Commits `tx` atomically: every operation or none.
    fn commit(&mut self, tx: &Transaction) -> Result<(), TransactionError>;

    /// When the last committed batch was sent (its acknowledgement is when
    /// `commit` returned); `None` where the backend does not tell.
    fn last_sent(&self) -> Option<Instant> {
        None
    }

    /// The netlink port id `commit` writes from: the owner of the tables it
    /// creates with `owner` (the pin tables), and how the guard tells its
    /// own pin table from anyone else's table of that name.
    fn port_id(&self) -> u32;
}

/// The kernel: nf_tables over netlink, in this network namespace or in
/// `/run/netns/NAME`. Sockets opened in a namespace stay in it.
pub struct NetlinkBackend {
    netns: Option<String>,
    writer: NftWriter,
    watch: Option<Watch>,
}

/// The change subscriptions of a watching [`NetlinkBackend`].
struct Watch {
    ruleset: AsyncFd<RulesetMonitor>,
    addresses: AsyncFd<AddressMonitor>,
}

use crate::sys::netns::run_in as in_netns;

impl NetlinkBackend {
    /// Reads and commits only (`portguard fix`, `restore`): no subscription.
    pub fn open(netns: Option<&str>) -> Result<Self, BackendError> {
        let writer = in_netns(netns, NftWriter::open)??;
        Ok(Self {
            netns: netns.map(str::to_owned),
            writer,
            watch: None,
        })
    }

    /// Subscribes to nf_tables and address changes as well (the agent). Call
    /// it inside a Tokio runtime, before the first read, so that no change
    /// between the read and the subscription is missed.
    pub fn open_watching(netns: Option<&str>) -> Result<Self, BackendError> {
        let (ruleset, addresses, writer) = in_netns(netns, || {
            Ok::<_, BackendError>((
                RulesetMonitor::open()?,
                AddressMonitor::open()?,
                NftWriter::open()?,
            ))
        })??;
        // SAFETY: the monitors own their descriptors, which live as long as the AsyncFds.
        let ruleset = unsafe { AsyncFd::register(ruleset) }.map_err(|e| e.into_parts().1)?;
        // SAFETY: as above.
        let addresses = unsafe { AsyncFd::register(addresses) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            netns: netns.map(str::to_owned),
            writer,
            watch: Some(Watch { ruleset, addresses }),
        })
    }

    /// The ruleset and the addresses, on this thread (synchronous callers).
    pub fn read_blocking(&self) -> Result<RulesetSnapshot, BackendError> {
        let (model, addrs) = nft::read_with_addrs(self.netns.as_deref())?;
        Ok(RulesetSnapshot { model, addrs })
    }
}

impl RulesetBackend for NetlinkBackend {
    async fn read(&mut self) -> Result<RulesetSnapshot, BackendError> {
        // A 40k-rule dump takes a while: off the async threads.
        let netns = self.netns.clone();
        let (model, addrs) =
            tokio::task::spawn_blocking(move || nft::read_with_addrs(netns.as_deref())).await??;
        Ok(RulesetSnapshot { model, addrs })
    }

    async fn next_event(
        &mut self,
        changes: &mut Vec<Change>,
    ) -> Result<BackendEvent, BackendError> {
        let Some(watch) = &mut self.watch else {
            return Err(BackendError::NotWatching);
        };
        loop {
            // Both branches finish without awaiting once ready: cancel safe.
            tokio::select! {
                ready = watch.ruleset.readable_mut() => {
                    let mut guard = ready?;
                    let seen = Instant::now();
                    let before = changes.len();
                    let drained = guard.get_inner_mut().drain(changes);
                    guard.clear_ready();
                    drained?;
                    if changes.len() > before {
                        return Ok(BackendEvent::Ruleset { seen });
                    }
                }
                ready = watch.addresses.readable_mut() => {
                    let mut guard = ready?;
                    let changed = guard.get_inner_mut().changed();
                    guard.clear_ready();
                    if changed? {
                        return Ok(BackendEvent::AddressesChanged);
                    }
                }
            }
        }
    }

    fn queued_changes(&mut self, changes: &mut Vec<Change>) -> Result<(), BackendError> {
        if let Some(watch) = &mut self.watch {
            // The socket is non-blocking: this takes what is there and stops.
            watch.ruleset.get_mut().drain(changes)?;
        }
        Ok(())
    }

    fn local_addresses(&mut self) -> Result<Vec<LocalAddr>, BackendError> {
        Ok(in_netns(
            self.netns.as_deref(),
            nft::local::local_addresses,
        )??)
    }

    fn legacy_nat_in_use(&mut self) -> Result<bool, BackendError> {
        Ok(in_netns(self.netns.as_deref(), nft::legacy::nat_in_use)?)
    }

    fn port_id(&self) -> u32 {
        self.writer.port_id()
    }

    fn last_sent(&self) -> Option<Instant> {
        self.writer.last_sent()
    }

    fn commit(&mut self, tx: &Transaction) -> Result<(), TransactionError> {
        self.writer.commit(tx)
    }
}
