//! Writing to nf_tables: one atomic netlink batch per operation
//! (`NFNL_MSG_BATCH_BEGIN` … `NFNL_MSG_BATCH_END`). Either every message of a
//! [`Transaction`] takes effect or none does; each message asks for an ACK and
//! every error the kernel reports is collected with the operation it belongs to.
//!
//! A batch may carry the ruleset generation it was decided on
//! ([`Transaction::generation`], `NFNL_BATCH_GENID`): if the ruleset moved
//! since, the kernel refuses it whole with `ERESTART`
//! ([`TransactionError::GenerationMoved`]) instead of applying a handle that
//! may now name another rule (a table re-created by `iptables-nft-restore`
//! starts its handles again).
//!
//! Rules are deleted by handle, so no other rule is touched; rules are
//! re-created from their raw `NFTA_RULE_EXPRESSIONS` (byte for byte what the
//! kernel dumped), at a position named by a neighbour's handle.

use std::{
    fmt, io,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use super::{
    attr::{self, NLA_F_NESTED},
    model::{Family, Hook},
};
use crate::sys::{
    netlink::{self as nl, Body, Messages, Socket},
    uapi::{
        ERESTART, NF_ACCEPT, NF_INET_FORWARD, NF_INET_INGRESS, NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT,
        NF_INET_POST_ROUTING, NF_INET_PRE_ROUTING, NFGENMSG_LEN, NFNL_BATCH_GENID,
        NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NFT_MSG_DELRULE,
        NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWTABLE, NFT_TABLE_F_OWNER,
        NFTA_CHAIN_HOOK, NFTA_CHAIN_NAME, NFTA_CHAIN_POLICY, NFTA_CHAIN_TABLE, NFTA_CHAIN_TYPE,
        NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY, NFTA_RULE_CHAIN, NFTA_RULE_COMPAT,
        NFTA_RULE_COMPAT_FLAGS, NFTA_RULE_COMPAT_PROTO, NFTA_RULE_EXPRESSIONS, NFTA_RULE_HANDLE,
        NFTA_RULE_POSITION, NFTA_RULE_TABLE, NFTA_RULE_USERDATA, NFTA_TABLE_FLAGS,
        NFTA_TABLE_HANDLE, NFTA_TABLE_NAME, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL,
        NLM_F_REQUEST, NLMSG_HDRLEN,
    },
};

/// How long to wait for the kernel's answers to a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a re-created rule goes in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Right after the rule with this handle.
    After(u64),
    /// Right before the rule with this handle.
    Before(u64),
    /// At the end of the chain.
    Append,
    /// At the start of the chain.
    Prepend,
}

/// One operation of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    DeleteRule {
        family: Family,
        table: String,
        chain: String,
        handle: u64,
    },
    AddRule {
        family: Family,
        table: String,
        chain: String,
        /// The `NFTA_RULE_EXPRESSIONS` payload (a list of nested `NFTA_LIST_ELEM`).
        exprs: Vec<u8>,
        userdata: Option<Vec<u8>>,
        /// `NFTA_RULE_COMPAT` protocol for rules with iptables (`xt`) matches.
        compat_proto: Option<u32>,
        placement: Placement,
        /// For people (dry runs, logs): what the rule does.
        summary: String,
    },
    AddTable {
        family: Family,
        name: String,
        /// `NFT_TABLE_F_OWNER`: the table belongs to the committing socket and
        /// the kernel deletes it when that socket closes (never with
        /// `NFT_TABLE_F_PERSIST`). An owned table is created exclusively
        /// (`NLM_F_EXCL`): a table of that name already there (anyone's) fails
        /// the batch instead of being adopted or updated.
        owner: bool,
    },
    AddNatChain {
        family: Family,
        table: String,
        name: String,
        hook: Hook,
        priority: i32,
    },
    /// A table deleted by its handle only, never by its name: a table of
    /// the same name created since (someone else's) is left alone and the
    /// batch fails with `ENOENT`. `name` says which table was meant (logs).
    DeleteTable {
        family: Family,
        name: String,
        /// `NFTA_TABLE_HANDLE`.
        handle: u64,
    },
}

impl fmt::Display for Op {
    /// The operation in `nft` syntax, as far as it goes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DeleteRule {
                family,
                table,
                chain,
                handle,
            } => write!(f, "delete rule {family} {table} {chain} handle {handle}"),
            Self::AddRule {
                family,
                table,
                chain,
                placement,
                summary,
                exprs,
                ..
            } => {
                let (verb, at) = match placement {
                    Placement::After(h) => ("add", format!(" position {h}")),
                    Placement::Before(h) => ("insert", format!(" position {h}")),
                    Placement::Append => ("add", String::new()),
                    Placement::Prepend => ("insert", String::new()),
                };
                write!(
                    f,
                    "{verb} rule {family} {table} {chain}{at} {summary} # {} bytes of expressions",
                    exprs.len()
                )
            }
            Self::AddTable {
                family,
                name,
                owner: false,
            } => write!(f, "add table {family} {name}"),
            Self::AddTable {
                family,
                name,
                owner: true,
            } => write!(f, "add table {family} {name} {{ flags owner; }}"),
            Self::AddNatChain {
                family,
                table,
                name,
                hook,
                priority,
            } => write!(
                f,
                "add chain {family} {table} {name} {{ type nat hook {hook} priority {priority}; policy accept; }}"
            ),
            Self::DeleteTable { family, handle, .. } => {
                write!(f, "delete table {family} handle {handle}")
            }
        }
    }
}

impl Op {
    fn encode(&self, seq: u32, out: &mut Vec<u8>) {
        let mut a = Vec::new();
        let (msg, family, flags) = match self {
            Self::DeleteRule {
                family,
                table,
                chain,
                handle,
            } => {
                attr::put_str(&mut a, NFTA_RULE_TABLE, table);
                attr::put_str(&mut a, NFTA_RULE_CHAIN, chain);
                attr::put(&mut a, NFTA_RULE_HANDLE, &handle.to_be_bytes());
                (NFT_MSG_DELRULE, *family, 0)
            }
            Self::AddRule {
                family,
                table,
                chain,
                exprs,
                userdata,
                compat_proto,
                placement,
                ..
            } => {
                attr::put_str(&mut a, NFTA_RULE_TABLE, table);
                attr::put_str(&mut a, NFTA_RULE_CHAIN, chain);
                let mut flags = NLM_F_CREATE;
                match placement {
                    Placement::After(h) => {
                        attr::put(&mut a, NFTA_RULE_POSITION, &h.to_be_bytes());
                        flags |= NLM_F_APPEND;
                    }
                    Placement::Before(h) => {
                        attr::put(&mut a, NFTA_RULE_POSITION, &h.to_be_bytes());
                    }
                    Placement::Append => flags |= NLM_F_APPEND,
                    Placement::Prepend => {}
                }
                attr::put(&mut a, NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, exprs);
                if let Some(proto) = compat_proto {
                    let mut c = Vec::new();
                    attr::put(&mut c, NFTA_RULE_COMPAT_PROTO, &proto.to_be_bytes());
                    attr::put(&mut c, NFTA_RULE_COMPAT_FLAGS, &0u32.to_be_bytes());
                    attr::put(&mut a, NFTA_RULE_COMPAT | NLA_F_NESTED, &c);
                }
                if let Some(u) = userdata {
                    attr::put(&mut a, NFTA_RULE_USERDATA, u);
                }
                (NFT_MSG_NEWRULE, *family, flags)
            }
            Self::AddTable {
                family,
                name,
                owner,
            } => {
                attr::put_str(&mut a, NFTA_TABLE_NAME, name);
                let flags = if *owner { NFT_TABLE_F_OWNER } else { 0 };
                attr::put(&mut a, NFTA_TABLE_FLAGS, &flags.to_be_bytes());
                let create = if *owner {
                    NLM_F_CREATE | NLM_F_EXCL
                } else {
                    NLM_F_CREATE
                };
                (NFT_MSG_NEWTABLE, *family, create)
            }
            Self::AddNatChain {
                family,
                table,
                name,
                hook,
                priority,
            } => {
                attr::put_str(&mut a, NFTA_CHAIN_TABLE, table);
                attr::put_str(&mut a, NFTA_CHAIN_NAME, name);
                let mut h = Vec::new();
                attr::put(&mut h, NFTA_HOOK_HOOKNUM, &hook_number(*hook).to_be_bytes());
                attr::put(&mut h, NFTA_HOOK_PRIORITY, &priority.to_be_bytes());
                attr::put(&mut a, NFTA_CHAIN_HOOK | NLA_F_NESTED, &h);
                attr::put(&mut a, NFTA_CHAIN_POLICY, &NF_ACCEPT.to_be_bytes());
                attr::put_str(&mut a, NFTA_CHAIN_TYPE, "nat");
                (NFT_MSG_NEWCHAIN, *family, NLM_F_CREATE)
            }
            Self::DeleteTable { family, handle, .. } => {
                attr::put(&mut a, NFTA_TABLE_HANDLE, &handle.to_be_bytes());
                (NFT_MSG_DELTABLE, *family, 0)
            }
        };
        put_message(
            out,
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            family.0,
            0,
            &a,
        );
    }
}

fn hook_number(hook: Hook) -> u32 {
    match hook {
        Hook::Prerouting => NF_INET_PRE_ROUTING,
        Hook::Input => NF_INET_LOCAL_IN,
        Hook::Forward => NF_INET_FORWARD,
        Hook::Output => NF_INET_LOCAL_OUT,
        Hook::Postrouting => NF_INET_POST_ROUTING,
        Hook::Ingress => NF_INET_INGRESS,
        Hook::Other(n) => n,
    }
}

/// Appends one nfnetlink message (`nlmsghdr`, `nfgenmsg`, attributes), padded.
fn put_message(
    out: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    nl::put_header(out, len, ty, flags, seq);
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
    out.resize(attr::align4(out.len()), 0);
}

/// Operations applied together or not at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transaction {
    pub ops: Vec<Op>,
    /// The nf_tables generation the batch was decided on: the kernel refuses
    /// it (`ERESTART`) when the ruleset moved since. `None`: unchecked.
    pub generation: Option<u32>,
}

impl Transaction {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Checked against `generation` (see [`Self::generation`]).
    pub fn at_generation(mut self, generation: Option<u32>) -> Self {
        self.generation = generation;
        self
    }

    /// The whole batch as bytes: begin, one message per operation (sequence
    /// numbers `first_seq + 1…`), end.
    pub fn encode(&self, first_seq: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.ops.len() * 128);
        let mut begin = Vec::new();
        if let Some(generation) = self.generation {
            attr::put(&mut begin, NFNL_BATCH_GENID, &generation.to_be_bytes());
        }
        put_message(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            first_seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &begin,
        );
        for (i, op) in self.ops.iter().enumerate() {
            op.encode(first_seq + 1 + i as u32, &mut out);
        }
        put_message(
            &mut out,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            first_seq + 1 + self.ops.len() as u32,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        out
    }
}

impl fmt::Display for Transaction {
    /// The batch as `nft -f` would read it (one operation a line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for op in &self.ops {
            writeln!(f, "{op}")?;
        }
        Ok(())
    }
}

/// One operation the kernel refused.
#[derive(Debug)]
pub struct OpFailure {
    pub index: usize,
    pub op: String,
    pub error: io::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    #[error("cannot open a NETLINK_NETFILTER socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel rejected the transaction (nothing applied): {}", failures.iter().map(|f| format!("`{}`: {}", f.op, f.error)).collect::<Vec<_>>().join("; "))]
    Rejected { failures: Vec<OpFailure> },
    #[error("no answer from the kernel for {0} operation(s) of the transaction")]
    NoAnswer(usize),
    /// The ruleset is no longer at the generation the batch was decided on
    /// (`ERESTART`): nothing applied; read again and decide again.
    #[error("the ruleset moved since generation {decided_on} (nothing applied)")]
    GenerationMoved { decided_on: u32 },
    /// The kernel refused the batch itself (its `NFNL_MSG_BATCH_BEGIN`).
    #[error("the kernel refused the batch: {0}")]
    Batch(#[source] io::Error),
}

impl TransactionError {
    /// Whether every failure says the object is gone already (`ENOENT`).
    pub fn all_missing(&self) -> bool {
        matches!(self, Self::Rejected { failures } if !failures.is_empty()
            && failures.iter().all(|f| f.error.raw_os_error() == Some(libc::ENOENT)))
    }

    /// Whether some failure says an object is gone (`ENOENT`): with a batch of
    /// deletions, one missing rule aborts them all.
    pub fn any_missing(&self) -> bool {
        matches!(self, Self::Rejected { failures }
            if failures.iter().any(|f| f.error.raw_os_error() == Some(libc::ENOENT)))
    }

    /// Whether the ruleset moved since the batch was decided (`ERESTART`).
    pub fn generation_moved(&self) -> bool {
        matches!(self, Self::GenerationMoved { .. })
    }
}

/// A `NETLINK_NETFILTER` socket that commits transactions, in the network
/// namespace of the thread that opened it.
pub struct NftWriter {
    sock: Socket,
    /// The socket's netlink port id: a table created with `owner` belongs to it.
    port_id: u32,
    seq: u32,
    buf: Vec<u8>,
    /// When the last batch went to the kernel (the hot path's breakdown).
    last_sent: Option<Instant>,
}

impl NftWriter {
    pub fn open() -> Result<Self, TransactionError> {
        let mut sock = nl::open(libc::NETLINK_NETFILTER).map_err(TransactionError::Socket)?;
        // Bound now (the kernel picks the port id) rather than on the first
        // send, so the id that owned tables carry is known before any commit.
        let port_id = sock
            .bind_auto()
            .map_err(TransactionError::Socket)?
            .port_number();
        Ok(Self {
            sock,
            port_id,
            seq: std::process::id().wrapping_mul(7919),
            buf: Vec::with_capacity(nl::RECV_BUF),
            last_sent: None,
        })
    }

    /// The netlink port id of this socket: the owner (`NFTA_TABLE_OWNER`) of
    /// every table it creates with `owner`.
    pub fn port_id(&self) -> u32 {
        self.port_id
    }

    /// When the last batch was sent (its acknowledgement is when `commit` returned).
    pub fn last_sent(&self) -> Option<Instant> {
        self.last_sent
    }

    /// Commits `tx` atomically: `Ok` once the kernel acknowledged every operation.
    pub fn commit(&mut self, tx: &Transaction) -> Result<(), TransactionError> {
        if tx.is_empty() {
            return Ok(());
        }
        let first = self.seq;
        self.seq = self.seq.wrapping_add(tx.ops.len() as u32 + 2);
        let bytes = tx.encode(first);
        nl::send(&self.sock, &bytes).map_err(|source| TransactionError::Io {
            what: "send",
            source,
        })?;
        self.last_sent = Some(Instant::now());
        let mut answered = vec![false; tx.ops.len()];
        let mut failures = Vec::new();
        while answered.iter().any(|a| !a) {
            if !self.readable(ACK_TIMEOUT)? {
                // After a failure the kernel answers only what it processed.
                if !failures.is_empty() {
                    break;
                }
                return Err(TransactionError::NoAnswer(
                    answered.iter().filter(|a| !**a).count(),
                ));
            }
            nl::recv(&self.sock, &mut self.buf).map_err(|source| TransactionError::Io {
                what: "recv",
                source,
            })?;
            // A malformed tail ends the datagram; what was answered counts.
            for m in Messages::new(&self.buf).map_while(Result::ok) {
                // The batch itself refused (its begin message): nothing applied.
                if m.seq == first
                    && let Body::Error(error) = m.body
                {
                    return Err(match (error.raw_os_error(), tx.generation) {
                        (Some(ERESTART), Some(decided_on)) => {
                            TransactionError::GenerationMoved { decided_on }
                        }
                        _ => TransactionError::Batch(error),
                    });
                }
                let index = m.seq.wrapping_sub(first).wrapping_sub(1) as usize;
                if index >= tx.ops.len() {
                    continue;
                }
                match m.body {
                    Body::Ack => answered[index] = true,
                    Body::Error(error) => {
                        answered[index] = true;
                        failures.push(OpFailure {
                            index,
                            op: tx.ops[index].to_string(),
                            error,
                        });
                    }
                    Body::Done | Body::Data(_) => {}
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TransactionError::Rejected { failures })
        }
    }

    fn readable(&self, timeout: Duration) -> Result<bool, TransactionError> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd we own.
            let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(TransactionError::Io {
                    what: "poll",
                    source: err,
                });
            }
            return Ok(rc > 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::attr::Attrs;

    #[test]
    fn a_batch_is_begin_messages_end_with_consecutive_sequence_numbers() {
        let mut tx = Transaction::new();
        tx.push(Op::DeleteRule {
            family: Family::IP,
            table: "nat".into(),
            chain: "CNI-HOSTPORT-DNAT".into(),
            handle: 42,
        })
        .push(Op::AddTable {
            family: Family::IP6,
            name: "portguard".into(),
            owner: true,
        });
        let b = tx.encode(100);
        let mut pos = 0;
        let mut seen = Vec::new();
        while pos < b.len() {
            let len = u32::from_ne_bytes(b[pos..pos + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes([b[pos + 4], b[pos + 5]]);
            let seq = u32::from_ne_bytes(b[pos + 8..pos + 12].try_into().unwrap());
            seen.push((ty, seq, b[pos + 16]));
            if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE {
                let attrs: Vec<_> = Attrs::new(&b[pos + 20..pos + len]).flatten().collect();
                assert_eq!(attrs[2], (NFTA_RULE_HANDLE, &42u64.to_be_bytes()[..]));
            }
            if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
                // An owned table, never a persistent one.
                let attrs: Vec<_> = Attrs::new(&b[pos + 20..pos + len]).flatten().collect();
                let flags = attrs
                    .iter()
                    .find(|(t, _)| *t == NFTA_TABLE_FLAGS)
                    .unwrap()
                    .1;
                let flags = u32::from_be_bytes(flags.try_into().unwrap());
                assert_eq!(flags, NFT_TABLE_F_OWNER);
                assert_eq!(flags & crate::sys::uapi::NFT_TABLE_F_PERSIST, 0);
            }
            pos += attr::align4(len);
        }
        assert_eq!(
            seen,
            vec![
                (NFNL_MSG_BATCH_BEGIN, 100, 0),
                ((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE, 101, 2),
                ((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE, 102, 10),
                (NFNL_MSG_BATCH_END, 103, 0),
            ]
        );
        assert_eq!(
            tx.to_string(),
            "delete rule ip nat CNI-HOSTPORT-DNAT handle 42\nadd table ip6 portguard { flags owner; }\n"
        );
    }

    /// One encoded message: its flags and (type, value) attributes.
    type Message = (u16, Vec<(u16, Vec<u8>)>);

    /// The messages of an encoded batch, begin and end included.
    fn messages(b: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + NLMSG_HDRLEN <= b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            let flags = u16::from_ne_bytes(b[at + 6..at + 8].try_into().unwrap());
            let attrs = Attrs::new(&b[at + NLMSG_HDRLEN + NFGENMSG_LEN..at + len])
                .flatten()
                .map(|(t, v)| (t, v.to_vec()))
                .collect();
            out.push((flags, attrs));
            at += (len + 3) & !3;
        }
        out
    }

    #[test]
    fn a_table_is_deleted_by_its_handle_and_an_owned_one_created_exclusively() {
        let mut tx = Transaction::new();
        tx.push(Op::DeleteTable {
            family: Family::IP,
            name: "portguard".into(),
            handle: 9,
        });
        tx.push(Op::AddTable {
            family: Family::IP,
            name: "portguard".into(),
            owner: true,
        });
        assert_eq!(
            tx.to_string(),
            "delete table ip handle 9\nadd table ip portguard { flags owner; }\n"
        );
        let msgs = messages(&tx.encode(1));
        assert_eq!(msgs.len(), 4, "begin, two operations, end");
        let (_, delete) = &msgs[1];
        assert_eq!(
            delete,
            &[(NFTA_TABLE_HANDLE, 9u64.to_be_bytes().to_vec())],
            "the instance by handle, not whatever table has the name"
        );
        let (flags, add) = &msgs[2];
        assert_eq!(
            flags & NLM_F_EXCL,
            NLM_F_EXCL,
            "never adopt an existing table"
        );
        assert!(add.contains(&(NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER.to_be_bytes().to_vec())));
    }

    #[test]
    fn a_batch_decided_on_a_generation_carries_it_in_its_begin_message() {
        let mut tx = Transaction::new();
        tx.push(Op::DeleteTable {
            family: Family::IP,
            name: "portguard".into(),
            handle: 3,
        });
        let unchecked = tx.encode(1);
        let len = u32::from_ne_bytes(unchecked[0..4].try_into().unwrap()) as usize;
        assert_eq!(
            len,
            NLMSG_HDRLEN + NFGENMSG_LEN,
            "no generation: no attribute"
        );
        let b = tx.at_generation(Some(77)).encode(1);
        let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        let attrs: Vec<_> = Attrs::new(&b[NLMSG_HDRLEN + NFGENMSG_LEN..len])
            .flatten()
            .collect();
        assert_eq!(attrs, [(NFNL_BATCH_GENID, &77u32.to_be_bytes()[..])]);
    }
}
