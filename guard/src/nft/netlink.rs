//! Reading the whole nf_tables ruleset over a `NETLINK_NETFILTER` socket:
//! `NFT_MSG_GETTABLE/GETCHAIN/GETRULE/GETSET/GETSETELEM` dumps for every family,
//! decoded into the tolerant [`RulesetModel`]. Consistent: the generation is read
//! before and after, and the read is repeated when a change raced it.

use std::{
    collections::HashMap,
    io,
    ops::Range,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    attr::{self, Attrs, be_i32, be_u32, be_u64, string, until_nul},
    dispatch::{DISPATCH_MIN_RULES, PortDispatch},
    expr,
    model::{
        BaseHook, CHAIN_NAMES_MIN, Chain, Data, Expr, Family, Hook, RawExprs, Rule, Rules,
        RulesetModel, Set, SetElem, Table, TableOrigin, Verdict,
    },
};
pub use crate::sys::netns::in_netns;
use crate::sys::{
    netlink::{self as nl, Body, Messages, Socket},
    uapi::{
        NFGENMSG_LEN, NFNL_SUBSYS_NFTABLES, NFPROTO_UNSPEC, NFT_MSG_GETCHAIN, NFT_MSG_GETGEN,
        NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN,
        NFT_MSG_NEWGEN, NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_NEWTABLE,
        NFTA_CHAIN_HANDLE, NFTA_CHAIN_HOOK, NFTA_CHAIN_NAME, NFTA_CHAIN_POLICY, NFTA_CHAIN_TABLE,
        NFTA_CHAIN_TYPE, NFTA_GEN_ID, NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY, NFTA_RULE_CHAIN,
        NFTA_RULE_EXPRESSIONS, NFTA_RULE_HANDLE, NFTA_RULE_POSITION, NFTA_RULE_TABLE,
        NFTA_RULE_USERDATA, NFTA_SET_DATA_LEN, NFTA_SET_DATA_TYPE, NFTA_SET_DESC,
        NFTA_SET_DESC_CONCAT, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_KEY,
        NFTA_SET_ELEM_KEY_END, NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET,
        NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_FIELD_LEN, NFTA_SET_FLAGS, NFTA_SET_HANDLE,
        NFTA_SET_KEY_LEN, NFTA_SET_KEY_TYPE, NFTA_SET_NAME, NFTA_SET_TABLE, NFTA_TABLE_FLAGS,
        NFTA_TABLE_HANDLE, NFTA_TABLE_NAME, NFTA_TABLE_OWNER, NLM_F_DUMP, NLM_F_DUMP_INTR,
        NLM_F_REQUEST, NLMSG_HDRLEN,
    },
};

/// `NFTNL_UDATA_RULE_COMMENT` in the rule's userdata TLVs (libnftnl's
/// convention, not a kernel number).
const UDATA_RULE_COMMENT: u8 = 0;

/// The socket's receive buffer: a burst of dump datagrams fits while the decoder works.
const SOCKET_RCVBUF: usize = 4 * 1024 * 1024;
/// The most of a receive buffer a dump datagram fills: the kernel makes dump
/// datagrams of at most 32 KiB less its overhead (`netlink_recvmsg` caps
/// `max_recvmsg_len`), and a buffer may start anywhere in its first page.
const DATAGRAM_PAGES_BYTES: usize = 36 * 1024;
/// Receive buffers the decoder thread keeps ready (see [`ready_buffer`]).
const READY_BUFFERS: usize = 4;
/// How many times a read raced by a ruleset change is repeated.
const CONSISTENT_READ_ATTEMPTS: usize = 5;
/// Names of the tables iptables-nft creates.
const IPTABLES_TABLES: [&str; 5] = ["nat", "filter", "mangle", "raw", "security"];

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open a NETLINK_NETFILTER socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused {what}: {source}")]
    Kernel {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the ruleset kept changing during {0} read attempts")]
    Inconsistent(usize),
}

/// How long each part of a read took.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadTimings {
    /// Sending requests and receiving every datagram.
    pub dump: Duration,
    /// The caller's own work, run on the decoder thread while the dump goes
    /// on (see [`NftSocket::read_ruleset_while`]).
    pub meanwhile: Duration,
    /// Waiting for the decoder once the last datagram arrived (decoding
    /// overlaps the dump on a second thread).
    pub decode: Duration,
    pub bytes: usize,
}

/// One message of a received datagram: its type, family and payload range.
struct RawMsg {
    msg: u16,
    family: u8,
    range: Range<usize>,
}

/// One received datagram and the messages in it that answer our request.
struct Chunk {
    buf: Vec<u8>,
    msgs: Vec<RawMsg>,
}

/// A `NETLINK_NETFILTER` socket, in the network namespace of the thread that opened it.
pub struct NftSocket {
    sock: Socket,
    seq: u32,
    /// Buffers the decoder has finished with, for the next datagrams.
    spare: Option<std::sync::mpsc::Receiver<Vec<u8>>>,
}

impl NftSocket {
    pub fn open() -> Result<Self, ReadError> {
        let sock = nl::open(libc::NETLINK_NETFILTER).map_err(ReadError::Socket)?;
        // A bigger receive buffer; best effort.
        nl::set_receive_buffer(&sock, SOCKET_RCVBUF);
        Ok(Self {
            sock,
            seq: 1,
            spare: None,
        })
    }

    fn request(
        &mut self,
        msg: u16,
        flags: u16,
        family: u8,
        attrs: &[u8],
    ) -> Result<u32, ReadError> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
        let mut b = Vec::with_capacity(len);
        nl::put_header(
            &mut b,
            len,
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | flags,
            self.seq,
        );
        b.extend_from_slice(&[family, 0, 0, 0]);
        b.extend_from_slice(attrs);
        nl::send(&self.sock, &b).map_err(|source| ReadError::Io {
            what: "send",
            source,
        })?;
        Ok(self.seq)
    }

    /// Receives every message answering `seq` until `NLMSG_DONE` (dumps) or the
    /// first message (plain requests), handing each datagram to `sink`.
    fn receive(
        &mut self,
        seq: u32,
        dump: bool,
        what: &'static str,
        sink: &mut dyn FnMut(Chunk),
    ) -> Result<bool, ReadError> {
        let mut interrupted = false;
        loop {
            let mut buf = self
                .spare
                .as_ref()
                .and_then(|r| r.try_recv().ok())
                .unwrap_or_else(|| Vec::with_capacity(nl::RECV_BUF));
            nl::recv(&self.sock, &mut buf).map_err(|source| ReadError::Io { what, source })?;
            let mut msgs = Vec::new();
            let mut done = false;
            for m in Messages::new(&buf) {
                let m = m.map_err(|e| ReadError::Io {
                    what,
                    source: e.into(),
                })?;
                if m.seq != seq {
                    continue;
                }
                interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                match m.body {
                    Body::Done | Body::Ack => done = true,
                    Body::Error(source) => return Err(ReadError::Kernel { what, source }),
                    Body::Data(p) if p.len() >= NFGENMSG_LEN => {
                        msgs.push(RawMsg {
                            msg: m.ty & 0xff,
                            family: p[0],
                            range: m.payload.start + NFGENMSG_LEN..m.payload.end,
                        });
                        done = !dump;
                    }
                    Body::Data(_) => {}
                }
                if done {
                    break;
                }
            }
            if !msgs.is_empty() {
                sink(Chunk { buf, msgs });
            }
            if done {
                return Ok(interrupted);
            }
        }
    }

    fn dump(
        &mut self,
        msg: u16,
        family: u8,
        attrs: &[u8],
        what: &'static str,
        sink: &mut dyn FnMut(Chunk),
    ) -> Result<bool, ReadError> {
        let seq = self.request(msg, NLM_F_DUMP, family, attrs)?;
        self.receive(seq, true, what, sink)
    }

    /// The current nf_tables generation.
    pub fn generation(&mut self) -> Result<u32, ReadError> {
        let seq = self.request(NFT_MSG_GETGEN, 0, NFPROTO_UNSPEC, &[])?;
        let mut gen_id = 0;
        self.receive(seq, false, "GETGEN", &mut |c: Chunk| {
            for m in c.msgs.iter().filter(|m| m.msg == NFT_MSG_NEWGEN) {
                if let Some(id) = Attrs::new(&c.buf[m.range.clone()])
                    .flatten()
                    .find(|(t, _)| *t == NFTA_GEN_ID)
                    .and_then(|(_, p)| be_u32(p))
                {
                    gen_id = id;
                }
            }
        })?;
        Ok(gen_id)
    }

    /// Every dump request of a full read, each datagram handed to `sink`;
    /// returns whether the kernel flagged a dump as interrupted.
    fn dump_all(&mut self, sink: &mut dyn FnMut(Chunk)) -> Result<bool, ReadError> {
        let mut intr = false;
        intr |= self.dump(NFT_MSG_GETTABLE, NFPROTO_UNSPEC, &[], "GETTABLE", sink)?;
        intr |= self.dump(NFT_MSG_GETCHAIN, NFPROTO_UNSPEC, &[], "GETCHAIN", sink)?;
        let mut sets: Vec<(u8, Vec<u8>, Vec<u8>)> = Vec::new();
        intr |= self.dump(
            NFT_MSG_GETSET,
            NFPROTO_UNSPEC,
            &[],
            "GETSET",
            &mut |c: Chunk| {
                for m in &c.msgs {
                    let a: Vec<_> = Attrs::new(&c.buf[m.range.clone()]).flatten().collect();
                    let table = a.iter().find(|(t, _)| *t == NFTA_SET_TABLE);
                    let name = a.iter().find(|(t, _)| *t == NFTA_SET_NAME);
                    if let (Some(t), Some(n)) = (table, name) {
                        sets.push((m.family, t.1.to_vec(), n.1.to_vec()));
                    }
                }
                sink(c);
            },
        )?;
        intr |= self.dump(NFT_MSG_GETRULE, NFPROTO_UNSPEC, &[], "GETRULE", sink)?;
        for (family, table, set) in &sets {
            let mut req = Vec::new();
            attr::put_str(&mut req, NFTA_SET_ELEM_LIST_TABLE, &string(table));
            attr::put_str(&mut req, NFTA_SET_ELEM_LIST_SET, &string(set));
            intr |= self.dump(NFT_MSG_GETSETELEM, *family, &req, "GETSETELEM", sink)?;
        }
        Ok(intr)
    }

    /// The raw dump alone (requests sent, every datagram received, nothing
    /// decoded): the floor a full read is measured against.
    pub fn dump_only(&mut self) -> Result<ReadTimings, ReadError> {
        let t0 = Instant::now();
        let mut bytes = 0;
        let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        self.spare = Some(spare_rx);
        let result = self.dump_all(&mut |c: Chunk| {
            bytes += c.buf.len();
            let _ = spare_tx.send(c.buf);
        });
        self.spare = None;
        result?;
        Ok(ReadTimings {
            dump: t0.elapsed(),
            bytes,
            ..ReadTimings::default()
        })
    }

    /// Reads the whole ruleset, consistent with one generation. Datagrams are
    /// decoded on a second thread while the next ones are received.
    pub fn read_ruleset(&mut self) -> Result<(RulesetModel, ReadTimings), ReadError> {
        self.read_ruleset_while(|| ())
            .map(|(model, (), timings)| (model, timings))
    }

    /// [`Self::read_ruleset`], running `meanwhile` on the decoder thread
    /// before the first datagram is decoded, so that it overlaps the dump
    /// (work of the same read that needs no ruleset: the legacy tables, the
    /// local addresses; it runs in this thread's network namespace, which
    /// the decoder thread shares). It runs once: its result is kept if the
    /// read is repeated.
    pub fn read_ruleset_while<T: Send>(
        &mut self,
        meanwhile: impl FnOnce() -> T + Send,
    ) -> Result<(RulesetModel, T, ReadTimings), ReadError> {
        let mut meanwhile = Some(meanwhile);
        let mut done = None;
        for _ in 0..CONSISTENT_READ_ATTEMPTS {
            let before = self.generation()?;
            let t0 = Instant::now();
            let work = meanwhile.take();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            self.spare = Some(ready_rx);
            let read = std::thread::scope(|s| {
                let (tx, rx) = std::sync::mpsc::channel::<Chunk>();
                let decoder = s.spawn(move || {
                    // Buffers for the receiving thread, their pages touched
                    // here: the model keeps every datagram, and the first
                    // touch of fresh memory (zeroing a page) is work this
                    // thread can take off the receiving one.
                    for _ in 0..READY_BUFFERS {
                        let _ = ready_tx.send(ready_buffer());
                    }
                    let ran = work.map(|work| {
                        let t = Instant::now();
                        (work(), t.elapsed())
                    });
                    let mut d = Decoder::default();
                    for chunk in rx {
                        d.feed_chunk(chunk);
                        let _ = ready_tx.send(ready_buffer());
                    }
                    (d.finish(), ran)
                });
                let mut bytes = 0;
                let intr = self.dump_all(&mut |c: Chunk| {
                    bytes += c.buf.len();
                    let _ = tx.send(c);
                });
                drop(tx);
                let dumped = t0.elapsed();
                // Right after the dump, so that a change racing it is seen.
                let after = self.generation();
                let (model, ran) = decoder.join().expect("the decoder thread does not panic");
                intr.and_then(|intr| Ok((model, ran, intr, after?, dumped, bytes)))
            });
            // Buffers left ready go with it.
            self.spare = None;
            let (model, ran, intr, after, dumped, bytes) = read?;
            let total = t0.elapsed();
            if let Some(ran) = ran {
                done = Some(ran);
            }
            if intr || before != after {
                continue;
            }
            let mut model = model;
            model.generation = Some(after);
            let (done, took) = done.expect("the first attempt ran the caller's work");
            let timings = ReadTimings {
                dump: dumped,
                meanwhile: took,
                decode: total.saturating_sub(dumped),
                bytes,
            };
            return Ok((model, done, timings));
        }
        Err(ReadError::Inconsistent(CONSISTENT_READ_ATTEMPTS))
    }
}

/// A receive buffer whose pages a dump datagram can fill are touched already.
fn ready_buffer() -> Vec<u8> {
    let mut buf = Vec::with_capacity(nl::RECV_BUF);
    buf.resize(DATAGRAM_PAGES_BYTES, 0);
    buf.clear();
    buf
}

/// Decodes a buffer of nf_tables netlink messages (`nlmsghdr` + `nfgenmsg` +
/// attributes, as a dump delivers them) into the model, without a socket: for
/// tests, fuzzing and recorded dumps. Never fails: what does not parse ends the
/// buffer or becomes a warning.
pub fn decode_messages(bytes: &[u8]) -> RulesetModel {
    let msgs = Messages::new(bytes)
        .map_while(Result::ok)
        .filter_map(|m| match m.body {
            Body::Data(p) if p.len() >= NFGENMSG_LEN => Some(RawMsg {
                msg: m.ty & 0xff,
                family: p[0],
                range: m.payload.start + NFGENMSG_LEN..m.payload.end,
            }),
            _ => None,
        })
        .collect();
    let mut d = Decoder::default();
    d.feed_chunk(Chunk {
        buf: bytes.to_vec(),
        msgs,
    });
    d.finish()
}

/// Builds one nf_tables message as the kernel sends it, for tests and fuzz seeds.
pub fn encode_message(msg: u16, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut b = Vec::with_capacity(len);
    nl::put_header(&mut b, len, (NFNL_SUBSYS_NFTABLES << 8) | msg, 0, 0);
    b.extend_from_slice(&[family, 0, 0, 0]);
    b.extend_from_slice(attrs);
    b.resize(attr::align4(b.len()), 0);
    b
}

type TableKey = (u8, String);
/// The chain the previous rule named: family, table, chain, and its indexes.
type LastChain = (u8, Vec<u8>, Vec<u8>, Option<(usize, usize)>);
/// How many chains past the previous rule's a rule's chain is looked for by
/// name before the name map is asked (chains without rules are skipped over).
const CHAINS_LOOKED_AHEAD: usize = 4;

/// Table, chain, rule, set and element-list attribute types are all below this.
const MAX_OBJECT_ATTR: usize = 32;

/// Builds the model message by message, as they arrive; never fails, collects warnings.
#[derive(Default)]
struct Decoder {
    model: RulesetModel,
    tables: HashMap<TableKey, usize>,
    /// Per table (by position), its chains' positions by name, built at the
    /// table's first rule when it is long enough to keep one, or the first
    /// time a rule's chain is not where [`Self::find_chain`] looks first (the
    /// table's chains all read by then: built at its exact size, no
    /// rehashing as it grows), else at the end; handed to the table as its
    /// name map (see [`ChainNames`]).
    chains: Vec<Option<HashMap<String, usize>>>,
    sets: HashMap<(usize, String), usize>,
    last_chain: Option<LastChain>,
    /// The port dispatch of the chain read last, built as its rules arrive
    /// once it is long enough to want one.
    dispatch: Option<PortDispatch>,
}

impl Decoder {
    fn feed_chunk(&mut self, chunk: Chunk) {
        // The model keeps the datagram: not the receive buffer's unused end
        // (half of it; for a dump's last, short datagram nearly all).
        let mut buf = chunk.buf;
        buf.shrink_to_fit();
        let buf = Arc::new(buf);
        for m in &chunk.msgs {
            self.feed(m.msg, m.family, &buf, m.range.clone());
        }
    }

    fn feed(&mut self, msg: u16, family: u8, buf: &Arc<Vec<u8>>, range: Range<usize>) {
        let p = &buf[range.clone()];
        let mut a: [Option<&[u8]>; MAX_OBJECT_ATTR] = [None; MAX_OBJECT_ATTR];
        let mut malformed = None;
        for attr in Attrs::new(p) {
            match attr {
                Ok((ty, payload)) => {
                    if let Some(slot) = a.get_mut(ty as usize) {
                        *slot = Some(payload);
                    }
                }
                Err(e) => malformed = Some(e),
            }
        }
        if let Some(e) = malformed {
            self.model
                .warnings
                .push(format!("message type {}: {e}", msg));
            return;
        }
        let get = |ty: u16| a.get(ty as usize).copied().flatten();
        match msg {
            NFT_MSG_NEWTABLE => {
                let Some(name) = get(NFTA_TABLE_NAME).map(string) else {
                    self.model.warnings.push("table without a name".into());
                    return;
                };
                self.tables
                    .insert((family, name.clone()), self.model.tables.len());
                self.chains.push(None);
                self.model.tables.push(Table {
                    family: Family(family),
                    name,
                    handle: get(NFTA_TABLE_HANDLE).and_then(be_u64).unwrap_or(0),
                    flags: get(NFTA_TABLE_FLAGS).and_then(be_u32).unwrap_or(0),
                    owner: get(NFTA_TABLE_OWNER).and_then(be_u32),
                    ..Table::default()
                });
            }
            NFT_MSG_NEWCHAIN => {
                let (Some(table), Some(name)) = (
                    get(NFTA_CHAIN_TABLE).map(string),
                    get(NFTA_CHAIN_NAME).map(string),
                ) else {
                    self.model
                        .warnings
                        .push("chain without a table or name".into());
                    return;
                };
                let Some(&ti) = self.tables.get(&(family, table.clone())) else {
                    self.model
                        .warnings
                        .push(format!("chain {name} of unknown table {table}"));
                    return;
                };
                let base = get(NFTA_CHAIN_HOOK).map(|hook| {
                    let h: Vec<_> = Attrs::new(hook).flatten().collect();
                    let hg = |ty: u16| h.iter().find(|(t, _)| *t == ty).map(|(_, p)| *p);
                    BaseHook {
                        hook: Hook::from_raw(
                            hg(NFTA_HOOK_HOOKNUM).and_then(be_u32).unwrap_or(u32::MAX),
                        ),
                        priority: hg(NFTA_HOOK_PRIORITY).and_then(be_i32).unwrap_or(0),
                        kind: get(NFTA_CHAIN_TYPE).map(string).unwrap_or_default(),
                        policy: get(NFTA_CHAIN_POLICY)
                            .and_then(be_i32)
                            .map(|c| Verdict::from_code(c, None)),
                    }
                });
                let t = &mut self.model.tables[ti];
                if let Some(names) = &mut self.chains[ti] {
                    names.insert(name.clone(), t.chains.len());
                }
                t.chains.push(Chain {
                    name,
                    handle: get(NFTA_CHAIN_HANDLE).and_then(be_u64).unwrap_or(0),
                    base,
                    rules: Rules::default(),
                });
            }
            NFT_MSG_NEWRULE => {
                let (Some(table), Some(chain)) = (get(NFTA_RULE_TABLE), get(NFTA_RULE_CHAIN))
                else {
                    self.model
                        .warnings
                        .push("rule without a table or chain".into());
                    return;
                };
                // Rules arrive chain by chain: look names up only when they change.
                let hit = matches!(&self.last_chain, Some((f, t, c, _)) if *f == family && t.as_slice() == table && c.as_slice() == chain);
                if !hit {
                    self.chain_complete();
                    let found = self.find_chain(family, table, chain);
                    // A table's first rule: its chains are all in (the chain
                    // dump came first). A long table's name map is built now,
                    // while the dump goes on, not after its last datagram.
                    if let Some((ti, _)) = found
                        && self.chains[ti].is_none()
                        && self.model.tables[ti].chains.len() >= CHAIN_NAMES_MIN
                    {
                        self.chain_names(ti);
                    }
                    // The previous chain's name buffers are reused: a switch
                    // every rule or two (kube-proxy's chains) allocates nothing.
                    let (mut t, mut c) = match self.last_chain.take() {
                        Some((_, t, c, _)) => (t, c),
                        None => (Vec::new(), Vec::new()),
                    };
                    t.clear();
                    t.extend_from_slice(table);
                    c.clear();
                    c.extend_from_slice(chain);
                    self.last_chain = Some((family, t, c, found));
                }
                let Some((_, _, _, Some((ti, ci)))) = self.last_chain else {
                    return;
                };
                // Kept raw: decoded when the analysis reaches the rule.
                let raw = get(NFTA_RULE_EXPRESSIONS).map(|list| {
                    let start = list.as_ptr() as usize - buf.as_ptr() as usize;
                    RawExprs::new(buf.clone(), start..start + list.len())
                });
                let udata = get(NFTA_RULE_USERDATA);
                let comment = udata.and_then(udata_comment);
                let udata = udata.map(|u| {
                    let start = u.as_ptr() as usize - buf.as_ptr() as usize;
                    RawExprs::new(buf.clone(), start..start + u.len())
                });
                let handle = get(NFTA_RULE_HANDLE).and_then(be_u64).unwrap_or(0);
                let rule = match raw {
                    Some(raw) => Rule::from_raw(handle, raw, comment).with_userdata(udata),
                    None => Rule::new(handle, Vec::new(), comment),
                };
                let rules = &mut self.model.tables[ti].chains[ci].rules;
                match &mut self.dispatch {
                    Some(d) => d.push(rule.matched_dport()),
                    None if rules.len() + 1 == DISPATCH_MIN_RULES => {
                        let earlier = rules.iter().map(Rule::matched_dport);
                        self.dispatch = Some(PortDispatch::new(
                            earlier.chain(std::iter::once(rule.matched_dport())),
                        ));
                    }
                    None => {}
                }
                rules.push(rule);
            }
            NFT_MSG_NEWSET => {
                let (Some(table), Some(name)) = (
                    get(NFTA_SET_TABLE).map(string),
                    get(NFTA_SET_NAME).map(string),
                ) else {
                    return;
                };
                let Some(&ti) = self.tables.get(&(family, table)) else {
                    return;
                };
                let field_lens = get(NFTA_SET_DESC)
                    .and_then(|d| {
                        Attrs::new(d)
                            .flatten()
                            .find(|(t, _)| *t == NFTA_SET_DESC_CONCAT)
                    })
                    .map(|(_, concat)| {
                        Attrs::new(concat)
                            .flatten()
                            .filter_map(|(_, f)| {
                                Attrs::new(f)
                                    .flatten()
                                    .find(|(t, _)| *t == NFTA_SET_FIELD_LEN)
                                    .and_then(|(_, p)| be_u32(p))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let t = &mut self.model.tables[ti];
                self.sets.insert((ti, name.clone()), t.sets.len());
                t.sets.push(Set {
                    name,
                    handle: get(NFTA_SET_HANDLE).and_then(be_u64).unwrap_or(0),
                    flags: get(NFTA_SET_FLAGS).and_then(be_u32).unwrap_or(0),
                    key_type: get(NFTA_SET_KEY_TYPE).and_then(be_u32).unwrap_or(0),
                    key_len: get(NFTA_SET_KEY_LEN).and_then(be_u32).unwrap_or(0),
                    data_type: get(NFTA_SET_DATA_TYPE).and_then(be_u32),
                    data_len: get(NFTA_SET_DATA_LEN).and_then(be_u32),
                    field_lens,
                    elements: Vec::new(),
                });
            }
            NFT_MSG_NEWSETELEM => {
                let (Some(table), Some(set)) = (
                    get(NFTA_SET_ELEM_LIST_TABLE).map(string),
                    get(NFTA_SET_ELEM_LIST_SET).map(string),
                ) else {
                    return;
                };
                let Some(&ti) = self.tables.get(&(family, table)) else {
                    return;
                };
                let Some(&si) = self.sets.get(&(ti, set)) else {
                    return;
                };
                let Some(list) = get(NFTA_SET_ELEM_LIST_ELEMENTS) else {
                    return;
                };
                let elems = &mut self.model.tables[ti].sets[si].elements;
                for e in Attrs::new(list).flatten() {
                    let mut elem = SetElem::default();
                    for (ty, p) in Attrs::new(e.1).flatten() {
                        match ty {
                            NFTA_SET_ELEM_KEY => {
                                if let Some(Data::Value(v)) = expr::data_of(p) {
                                    elem.key = v;
                                }
                            }
                            NFTA_SET_ELEM_KEY_END => {
                                if let Some(Data::Value(v)) = expr::data_of(p) {
                                    elem.key_end = Some(v);
                                }
                            }
                            NFTA_SET_ELEM_DATA => elem.data = expr::data_of(p),
                            NFTA_SET_ELEM_FLAGS => elem.flags = be_u32(p).unwrap_or(0),
                            _ => {}
                        }
                    }
                    elems.push(elem);
                }
            }
            _ => {}
        }
    }

    /// Where the chain a rule names is in the model: the table and chain
    /// positions. The kernel dumps a table's rules chain by chain in the
    /// order it dumped the chains (both walk the table's chain list), so
    /// the chain after the previous rule's is tried first (a name compared,
    /// nothing hashed or allocated); the name maps answer anything else.
    fn find_chain(&mut self, family: u8, table: &[u8], chain: &[u8]) -> Option<(usize, usize)> {
        let (table, chain) = (until_nul(table), until_nul(chain));
        let same_table = match &self.last_chain {
            Some((f, t, _, Some((ti, ci)))) if *f == family && until_nul(t) == table => {
                Some((*ti, *ci))
            }
            _ => None,
        };
        let ti = match same_table {
            Some((ti, _)) => ti,
            None => *self.tables.get(&(family, string(table)))?,
        };
        let chains = &self.model.tables[ti].chains;
        let from = same_table.map_or(0, |(_, ci)| ci + 1);
        if let Some(ahead) = chains
            .iter()
            .skip(from)
            .take(CHAINS_LOOKED_AHEAD)
            .position(|c| c.name.as_bytes() == chain)
        {
            return Some((ti, from + ahead));
        }
        let names = self.chain_names(ti);
        let ci = match std::str::from_utf8(chain) {
            Ok(name) => names.get(name),
            Err(_) => names.get(&string(chain)),
        };
        ci.map(|&ci| (ti, ci))
    }

    /// Table `ti`'s chain name map, built from its chains if not yet.
    fn chain_names(&mut self, ti: usize) -> &HashMap<String, usize> {
        let chains = &self.model.tables[ti].chains;
        self.chains[ti].get_or_insert_with(|| chain_name_map(chains))
    }

    /// The rules of the chain read last are all in (a dump sends a chain's
    /// rules together): the port dispatch built as they came is the chain's,
    /// rather than one the first inspection would build.
    fn chain_complete(&mut self) {
        if let (Some((_, _, _, Some((ti, ci)))), Some(d)) = (&self.last_chain, self.dispatch.take())
        {
            self.model.tables[*ti].chains[*ci].rules.set_dispatch(d);
        }
    }

    fn finish(mut self) -> RulesetModel {
        self.chain_complete();
        for (t, names) in self.model.tables.iter_mut().zip(self.chains) {
            t.origin = table_origin(t);
            // Indexed now, on the read, rather than by the first notification:
            // the map the decoder built, or one built here at its exact size.
            t.set_chain_names(|chains| names.unwrap_or_else(|| chain_name_map(chains)));
            t.base_chain_positions();
        }
        self.model
    }
}

/// Each chain's position by name.
fn chain_name_map(chains: &[Chain]) -> HashMap<String, usize> {
    let mut names = HashMap::with_capacity(chains.len());
    for (ci, c) in chains.iter().enumerate() {
        names.insert(c.name.clone(), ci);
    }
    names
}

/// iptables-nft writes `xt` expressions, and tables named like iptables' own with
/// base chains named like its built-in ones.
fn table_origin(t: &Table) -> TableOrigin {
    // Base chains' rules are enough (and keeps the rest undecoded).
    let has_xt = t
        .chains
        .iter()
        .filter(|c| c.base.is_some())
        .flat_map(|c| &c.rules)
        .any(|r| {
            r.exprs()
                .iter()
                .any(|e| matches!(e, Expr::XtMatch { .. } | Expr::XtTarget { .. }))
        });
    let builtin_names = IPTABLES_TABLES.contains(&t.name.as_str())
        && t.chains
            .iter()
            .filter(|c| c.base.is_some())
            .all(|c| c.name.chars().all(|ch| ch.is_ascii_uppercase()));
    if has_xt || (builtin_names && t.chains.iter().any(|c| c.base.is_some())) {
        TableOrigin::IptablesNft
    } else {
        TableOrigin::Nft
    }
}

/// One rule as a `NFT_MSG_NEWRULE`/`NFT_MSG_DELRULE` message carries it (a dump
/// or a change notification).
#[derive(Debug)]
pub struct RuleMessage {
    pub family: Family,
    pub table: String,
    pub chain: String,
    /// In a notification: the handle of the rule it now follows (none when it
    /// is first or last in its chain).
    pub position: Option<u64>,
    pub rule: Rule,
}

/// Decodes one rule message (the payload after `nfgenmsg`, in `buf[range]`);
/// the rule keeps its raw expressions and userdata in `buf`.
pub fn decode_rule(buf: &Arc<Vec<u8>>, family: u8, range: Range<usize>) -> Option<RuleMessage> {
    let p = buf.get(range)?;
    let mut a: [Option<&[u8]>; MAX_OBJECT_ATTR] = [None; MAX_OBJECT_ATTR];
    for attr in Attrs::new(p) {
        let (ty, payload) = attr.ok()?;
        if let Some(slot) = a.get_mut(ty as usize) {
            *slot = Some(payload);
        }
    }
    let get = |ty: u16| a.get(ty as usize).copied().flatten();
    let raw_of = |b: &[u8]| {
        let start = b.as_ptr() as usize - buf.as_ptr() as usize;
        RawExprs::new(buf.clone(), start..start + b.len())
    };
    let handle = get(NFTA_RULE_HANDLE).and_then(be_u64)?;
    let udata = get(NFTA_RULE_USERDATA);
    let comment = udata.and_then(udata_comment);
    let rule = match get(NFTA_RULE_EXPRESSIONS) {
        Some(list) => {
            Rule::from_raw(handle, raw_of(list), comment).with_userdata(udata.map(raw_of))
        }
        None => Rule::new(handle, Vec::new(), comment),
    };
    Some(RuleMessage {
        family: Family(family),
        table: string(get(NFTA_RULE_TABLE)?),
        chain: string(get(NFTA_RULE_CHAIN)?),
        position: get(NFTA_RULE_POSITION).and_then(be_u64),
        rule,
    })
}

/// The comment TLV of a rule's userdata.
fn udata_comment(mut b: &[u8]) -> Option<String> {
    while b.len() >= 2 {
        let (ty, len) = (b[0], b[1] as usize);
        let value = b.get(2..2 + len)?;
        if ty == UDATA_RULE_COMMENT {
            return Some(string(value));
        }
        b = &b[2 + len..];
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nft::{InspectInput, OwnedTargets, PortSpec, inspect, local::LocalAddr};
    use crate::policy::{PortRange, Proto};

    fn nest(items: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (t, p) in items {
            attr::put(&mut b, *t, p);
        }
        b
    }

    fn s(v: &str) -> Vec<u8> {
        let mut b = v.as_bytes().to_vec();
        b.push(0);
        b
    }

    fn expr(name: &str, data: Vec<u8>) -> Vec<u8> {
        nest(&[(1, s(name)), (2, data)])
    }

    /// table ip t { chain pre { type nat hook prerouting priority -100;
    ///   tcp dport 80 dnat to 203.0.113.9 } }, built byte by byte.
    pub(crate) fn sample_dump() -> Vec<u8> {
        let family = Family::IP.0;
        let mut out = encode_message(
            NFT_MSG_NEWTABLE,
            family,
            &nest(&[(NFTA_TABLE_NAME, s("t"))]),
        );
        let hook = nest(&[
            (NFTA_HOOK_HOOKNUM, 0u32.to_be_bytes().to_vec()),
            (NFTA_HOOK_PRIORITY, (-100i32).to_be_bytes().to_vec()),
        ]);
        out.extend(encode_message(
            NFT_MSG_NEWCHAIN,
            family,
            &nest(&[
                (NFTA_CHAIN_TABLE, s("t")),
                (NFTA_CHAIN_NAME, s("pre")),
                (NFTA_CHAIN_HOOK, hook),
                (NFTA_CHAIN_TYPE, s("nat")),
            ]),
        ));
        let value = |v: Vec<u8>| nest(&[(1, v)]);
        let [load, cmp] = dport_match(80);
        let exprs = [
            expr(
                "meta",
                nest(&[
                    (2, 16u32.to_be_bytes().to_vec()),
                    (1, 1u32.to_be_bytes().to_vec()),
                ]),
            ),
            expr(
                "cmp",
                nest(&[
                    (1, 1u32.to_be_bytes().to_vec()),
                    (2, 0u32.to_be_bytes().to_vec()),
                    (3, value(vec![6])),
                ]),
            ),
            load,
            cmp,
            expr("frobnicate", nest(&[(1, vec![1, 2, 3, 4])])),
            expr(
                "immediate",
                nest(&[
                    (1, 1u32.to_be_bytes().to_vec()),
                    (2, value(vec![203, 0, 113, 9])),
                ]),
            ),
            expr(
                "nat",
                nest(&[
                    (1, 1u32.to_be_bytes().to_vec()),
                    (2, 2u32.to_be_bytes().to_vec()),
                    (3, 1u32.to_be_bytes().to_vec()),
                ]),
            ),
        ];
        let mut list = Vec::new();
        for e in exprs {
            attr::put(&mut list, 1, &e);
        }
        out.extend(encode_message(
            NFT_MSG_NEWRULE,
            family,
            &nest(&[
                (NFTA_RULE_TABLE, s("t")),
                (NFTA_RULE_CHAIN, s("pre")),
                (NFTA_RULE_HANDLE, 7u64.to_be_bytes().to_vec()),
                (NFTA_RULE_EXPRESSIONS, list),
            ]),
        ));
        out
    }

    pub(crate) fn sample_input() -> InspectInput {
        InspectInput {
            ports: vec![PortSpec {
                proto: Proto::Tcp,
                ports: PortRange::single(80),
            }],
            owned: OwnedTargets::docker_fallback(),
            local_addrs: vec![LocalAddr {
                addr: "198.51.100.1".parse().unwrap(),
                prefix_len: 24,
                ifindex: 2,
                ifname: "eth0".into(),
            }],
            internal_ifaces: vec!["docker".into()],
            own_pins: None,
        }
    }

    /// `th dport PORT` as nft and iptables-nft write it: a payload load of
    /// the transport header's bytes 2..4 into register 1, and a `cmp eq`.
    fn dport_match(port: u16) -> [Vec<u8>; 2] {
        let value = |v: Vec<u8>| nest(&[(1, v)]);
        [
            expr(
                "payload",
                nest(&[
                    (1, 1u32.to_be_bytes().to_vec()),
                    (2, 2u32.to_be_bytes().to_vec()),
                    (3, 2u32.to_be_bytes().to_vec()),
                    (4, 2u32.to_be_bytes().to_vec()),
                ]),
            ),
            expr(
                "cmp",
                nest(&[
                    (1, 1u32.to_be_bytes().to_vec()),
                    (2, 0u32.to_be_bytes().to_vec()),
                    (3, value(port.to_be_bytes().to_vec())),
                ]),
            ),
        ]
    }

    /// A dump of table `t` with `chains` regular chains `c0`.. and, in `c0`,
    /// `rules` rules `tcp dport 1000+i` ([`dport_rule`]).
    fn long_dump(chains: usize, rules: u16) -> Vec<u8> {
        let family = Family::IP.0;
        let mut out = encode_message(
            NFT_MSG_NEWTABLE,
            family,
            &nest(&[(NFTA_TABLE_NAME, s("t"))]),
        );
        for c in 0..chains {
            out.extend(encode_message(
                NFT_MSG_NEWCHAIN,
                family,
                &nest(&[
                    (NFTA_CHAIN_TABLE, s("t")),
                    (NFTA_CHAIN_NAME, s(&format!("c{c}"))),
                ]),
            ));
        }
        for i in 0..rules {
            out.extend(dport_rule("c0", 1000 + i));
        }
        out
    }

    /// A rule of chain `chain` in table `t`: `tcp dport PORT` (payload and
    /// cmp, as nft and iptables-nft write a port match), handle PORT.
    fn dport_rule(chain: &str, port: u16) -> Vec<u8> {
        let mut list = Vec::new();
        for e in dport_match(port) {
            attr::put(&mut list, 1, &e);
        }
        encode_message(
            NFT_MSG_NEWRULE,
            Family::IP.0,
            &nest(&[
                (NFTA_RULE_TABLE, s("t")),
                (NFTA_RULE_CHAIN, s(chain)),
                (NFTA_RULE_HANDLE, u64::from(port).to_be_bytes().to_vec()),
                (NFTA_RULE_EXPRESSIONS, list),
            ]),
        )
    }

    #[test]
    fn a_read_leaves_the_first_inspection_only_the_walk() {
        // What an inspection builds on first use, a read builds while the
        // dump is still coming: a long chain's dispatch (each rule's port), a
        // big table's name map. Expressions stay raw.
        let model = decode_messages(&long_dump(70, 40));
        let t = &model.tables[0];
        assert!(t.chain_names_built(), "70 chains: the name map is built");
        assert_eq!(t.chain_position("c42"), Some(42));
        assert_eq!(t.chain_position("c69"), Some(69));
        assert_eq!(t.chain_position("nope"), None);
        let rules = &t.chains[0].rules;
        assert_eq!(rules.len(), 40);
        assert!(rules.dispatch_built(), "40 rules: the dispatch is built");
        for (i, r) in rules.iter().enumerate() {
            assert_eq!(r.found(), (true, false), "rule {i}: port found, still raw");
            assert_eq!(r.matched_dport(), Some(1000 + i as u16));
        }
        let d = rules.dispatch().expect("a long chain has a dispatch");
        assert_eq!(d.positions(1007).collect::<Vec<_>>(), [7]);
        assert_eq!(d.positions(80).count(), 0);

        // Short: walked whole, no map and no dispatch.
        let model = decode_messages(&long_dump(3, 5));
        let t = &model.tables[0];
        assert!(!t.chain_names_built());
        assert_eq!(t.chain_position("c2"), Some(2));
        assert!(!t.chains[0].rules.dispatch_built());
        assert!(t.chains[0].rules.dispatch().is_none());
        assert_eq!(t.chains[0].rules[0].found(), (false, false), "not needed");

        // A chain's rules in two runs (no dump sends them so, but a dispatch
        // must never be one of the parts): the dispatch indexes all of them.
        for (first, second) in [(40, 5), (20, 20), (5, 40)] {
            let mut dump = long_dump(2, first);
            dump.extend(dport_rule("c1", 9));
            for i in 0..second {
                dump.extend(dport_rule("c0", 2000 + i));
            }
            let model = decode_messages(&dump);
            let rules = &model.tables[0].chains[0].rules;
            assert_eq!(rules.len(), usize::from(first + second));
            let d = rules.dispatch().expect("long: a dispatch");
            assert_eq!(d.len(), rules.len(), "{first} + {second}");
            assert_eq!(d.positions(1003).collect::<Vec<_>>(), [3]);
            let last = usize::from(first + second - 1);
            assert_eq!(d.positions(2000 + second - 1).collect::<Vec<_>>(), [last]);
        }
    }

    #[test]
    fn rules_find_their_chain_in_any_order() {
        // A dump sends rules chain by chain in the order of the chains; the
        // decoder looks there first. Any other order (decoded recordings,
        // fuzz input) must place each rule in the chain it names all the same.
        let rule = |table: &str, chain: &str, handle: u64| {
            encode_message(
                NFT_MSG_NEWRULE,
                Family::IP.0,
                &nest(&[
                    (NFTA_RULE_TABLE, s(table)),
                    (NFTA_RULE_CHAIN, s(chain)),
                    (NFTA_RULE_HANDLE, handle.to_be_bytes().to_vec()),
                ]),
            )
        };
        for chains in [8, 80] {
            let mut dump = long_dump(chains, 0);
            dump.extend(encode_message(
                NFT_MSG_NEWTABLE,
                Family::IP.0,
                &nest(&[(NFTA_TABLE_NAME, s("u"))]),
            ));
            dump.extend(encode_message(
                NFT_MSG_NEWCHAIN,
                Family::IP.0,
                &nest(&[(NFTA_CHAIN_TABLE, s("u")), (NFTA_CHAIN_NAME, s("c0"))]),
            ));
            // Ahead by one, behind, the same chain twice apart, far ahead
            // (past the look-ahead), another table's chain of the same name,
            // and chains that do not exist.
            for (table, chain, handle) in [
                ("t", "c5", 1),
                ("t", "c0", 2),
                ("t", "c1", 3),
                ("t", "c1", 4),
                ("t", "c7", 5),
                ("u", "c0", 6),
                ("t", "c0", 7),
                ("t", "nochain", 8),
                ("v", "c0", 9),
                ("t", "c6", 10),
            ] {
                dump.extend(rule(table, chain, handle));
            }
            let model = decode_messages(&dump);
            let handles = |table: &str, chain: &str| -> Vec<u64> {
                let t = model.tables.iter().find(|t| t.name == table).unwrap();
                t.chain(chain)
                    .unwrap()
                    .rules
                    .iter()
                    .map(|r| r.handle)
                    .collect()
            };
            assert_eq!(handles("t", "c0"), [2, 7], "{chains} chains");
            assert_eq!(handles("t", "c1"), [3, 4]);
            assert_eq!(handles("t", "c5"), [1]);
            assert_eq!(handles("t", "c6"), [10]);
            assert_eq!(handles("t", "c7"), [5]);
            assert_eq!(handles("u", "c0"), [6]);
            assert_eq!(model.rule_count(), 8, "rules of unknown chains are dropped");
            let t = &model.tables[0];
            assert_eq!(t.chain_position("c7"), Some(7));
            assert_eq!(t.chain_names_built(), chains == 80, "kept only when long");
        }
    }

    #[test]
    fn decodes_a_dump_with_an_unknown_expression() {
        let model = decode_messages(&sample_dump());
        assert!(model.warnings.is_empty(), "{:?}", model.warnings);
        let rule = &model.tables[0].chains[0].rules[0];
        assert_eq!(rule.handle, 7);
        assert!(
            rule.exprs()
                .iter()
                .any(|e| matches!(e, Expr::Unknown { name } if name == "frobnicate"))
        );
        let findings = inspect(&model, &sample_input());
        assert_eq!(findings.len(), 1, "{findings:?}");
        // An unknown expression before the DNAT: it may or may not match, so the
        // rewrite is possible, hence active.
        assert!(findings[0].active);
        assert_eq!(findings[0].target.as_deref(), Some("203.0.113.9:80"));
        assert_eq!(findings[0].handle, Some(7));
    }

    #[test]
    fn an_owned_table_carries_its_owner_port_id() {
        let family = Family::IP.0;
        let mut dump = encode_message(
            NFT_MSG_NEWTABLE,
            family,
            &nest(&[
                (NFTA_TABLE_NAME, s("portguard")),
                (
                    NFTA_TABLE_FLAGS,
                    crate::sys::uapi::NFT_TABLE_F_OWNER.to_be_bytes().to_vec(),
                ),
                (NFTA_TABLE_OWNER, 4242u32.to_be_bytes().to_vec()),
            ]),
        );
        dump.extend(encode_message(
            NFT_MSG_NEWTABLE,
            family,
            &nest(&[(NFTA_TABLE_NAME, s("nat"))]),
        ));
        let model = decode_messages(&dump);
        assert_eq!(model.tables[0].owner, Some(4242));
        assert_eq!(model.tables[0].flags, crate::sys::uapi::NFT_TABLE_F_OWNER);
        assert_eq!(model.tables[1].owner, None);
    }

    #[test]
    fn every_truncation_and_corruption_is_survived() {
        let dump = sample_dump();
        let input = sample_input();
        for cut in 0..dump.len() {
            let model = decode_messages(&dump[..cut]);
            for r in model
                .tables
                .iter()
                .flat_map(|t| &t.chains)
                .flat_map(|c| &c.rules)
            {
                let _ = r.exprs();
            }
            let _ = inspect(&model, &input);
        }
        // Deterministic corruption: flip bytes one at a time, and some at random.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..dump.len() * 4 {
            let mut d = dump.clone();
            let at = if i < dump.len() {
                i
            } else {
                (seed % dump.len() as u64) as usize
            };
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            d[at] ^= (seed as u8) | 1;
            let model = decode_messages(&d);
            for r in model
                .tables
                .iter()
                .flat_map(|t| &t.chains)
                .flat_map(|c| &c.rules)
            {
                let _ = r.exprs();
            }
            let _ = inspect(&model, &input);
        }
    }
}
