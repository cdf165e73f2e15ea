//! Reading the whole nf_tables ruleset over a `NETLINK_NETFILTER` socket:
//! `NFT_MSG_GETTABLE/GETCHAIN/GETRULE/GETSET/GETSETELEM` dumps for every family,
//! decoded into the tolerant [`RulesetModel`]. Consistent: the generation is read
//! before and after, and the read is repeated when a change raced it.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use super::{
    attr::{self, Attrs, be_i32, be_u32, be_u64, string},
    expr,
    model::{
        BaseHook, Chain, Data, Expr, Family, Hook, Rule, RulesetModel, Set, SetElem, Table,
        TableOrigin, Verdict,
    },
};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_UNSPEC: u8 = 0;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_HANDLE: u16 = 4;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_HANDLE: u16 = 2;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
/// `NFTNL_UDATA_RULE_COMMENT` in the rule's userdata TLVs (libnftnl's convention).
const UDATA_RULE_COMMENT: u8 = 0;

const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_HANDLE: u16 = 16;
const NFTA_SET_DESC_CONCAT: u16 = 2;
const NFTA_SET_FIELD_LEN: u16 = 1;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_KEY_END: u16 = 10;

const NFTA_GEN_ID: u16 = 1;

/// Room for one dump datagram; the kernel sends at most 32 KiB per read.
const RECV_BUF: usize = 128 * 1024;
const SOCKET_RCVBUF: libc::c_int = 4 * 1024 * 1024;
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
    /// Decoding the messages into the model.
    pub decode: Duration,
    pub bytes: usize,
}

/// One raw dump: the messages' payloads (after `nlmsghdr`), type and family.
struct RawMsg {
    msg: u16,
    family: u8,
    range: std::ops::Range<usize>,
}

struct Dump {
    bytes: Vec<u8>,
    msgs: Vec<RawMsg>,
}

impl Dump {
    fn payload(&self, m: &RawMsg) -> &[u8] {
        &self.bytes[m.range.clone()]
    }
}

/// A `NETLINK_NETFILTER` socket, in the network namespace of the thread that opened it.
pub struct NftSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl NftSocket {
    pub fn open() -> Result<Self, ReadError> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(ReadError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A bigger receive buffer; best effort.
        let rcvbuf = SOCKET_RCVBUF;
        // SAFETY: a valid fd and an int-sized option value.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const rcvbuf).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Ok(Self {
            fd,
            seq: 1,
            buf: vec![0; RECV_BUF],
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
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        b.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        b.extend_from_slice(&self.seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&[family, 0, 0, 0]);
        b.extend_from_slice(attrs);
        // SAFETY: sending our own buffer on our socket (the kernel is the default peer).
        let rc = unsafe { libc::send(self.fd.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) };
        if rc < 0 {
            return Err(ReadError::Io {
                what: "send",
                source: io::Error::last_os_error(),
            });
        }
        Ok(self.seq)
    }

    /// Receives every message answering `seq` until `NLMSG_DONE` (dumps) or the
    /// first message (plain requests); appends payloads to `out`.
    fn receive(
        &mut self,
        seq: u32,
        dump: bool,
        what: &'static str,
        out: &mut Dump,
    ) -> Result<bool, ReadError> {
        let mut interrupted = false;
        loop {
            // SAFETY: receiving into our own buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ReadError::Io { what, source: err });
            }
            let n = n as usize;
            let mut pos = 0;
            while pos + NLMSG_HDRLEN <= n {
                let h = &self.buf[pos..];
                let len = u32::from_ne_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
                let ty = u16::from_ne_bytes([h[4], h[5]]);
                let flags = u16::from_ne_bytes([h[6], h[7]]);
                let mseq = u32::from_ne_bytes(h[8..12].try_into().expect("4 bytes"));
                if len < NLMSG_HDRLEN || pos + len > n {
                    return Err(ReadError::Io {
                        what,
                        source: io::Error::new(io::ErrorKind::InvalidData, "truncated message"),
                    });
                }
                let next = pos + attr::align4(len);
                if mseq != seq {
                    pos = next;
                    continue;
                }
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                match ty {
                    NLMSG_DONE => return Ok(interrupted),
                    NLMSG_ERROR => {
                        let code = h
                            .get(16..20)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .unwrap_or(0);
                        if code != 0 {
                            return Err(ReadError::Kernel {
                                what,
                                source: io::Error::from_raw_os_error(-code),
                            });
                        }
                        return Ok(interrupted);
                    }
                    _ if len >= NLMSG_HDRLEN + NFGENMSG_LEN => {
                        let start = out.bytes.len();
                        out.bytes.extend_from_slice(
                            &self.buf[pos + NLMSG_HDRLEN + NFGENMSG_LEN..pos + len],
                        );
                        out.msgs.push(RawMsg {
                            msg: ty & 0xff,
                            family: self.buf[pos + NLMSG_HDRLEN],
                            range: start..out.bytes.len(),
                        });
                        if !dump {
                            return Ok(interrupted);
                        }
                    }
                    _ => {}
                }
                pos = next;
            }
        }
    }

    fn dump(
        &mut self,
        msg: u16,
        family: u8,
        attrs: &[u8],
        what: &'static str,
        out: &mut Dump,
    ) -> Result<bool, ReadError> {
        let seq = self.request(msg, NLM_F_DUMP, family, attrs)?;
        self.receive(seq, true, what, out)
    }

    /// The current nf_tables generation.
    pub fn generation(&mut self) -> Result<u32, ReadError> {
        let seq = self.request(NFT_MSG_GETGEN, 0, NFPROTO_UNSPEC, &[])?;
        let mut out = Dump {
            bytes: Vec::new(),
            msgs: Vec::new(),
        };
        self.receive(seq, false, "GETGEN", &mut out)?;
        let gen_id = out
            .msgs
            .iter()
            .filter(|m| m.msg == NFT_MSG_NEWGEN)
            .flat_map(|m| Attrs::new(out.payload(m)).flatten())
            .find(|(t, _)| *t == NFTA_GEN_ID)
            .and_then(|(_, p)| be_u32(p))
            .unwrap_or(0);
        Ok(gen_id)
    }

    /// Reads the whole ruleset, consistent with one generation.
    pub fn read_ruleset(&mut self) -> Result<(RulesetModel, ReadTimings), ReadError> {
        for _ in 0..CONSISTENT_READ_ATTEMPTS {
            let t0 = Instant::now();
            let before = self.generation()?;
            let mut dump = Dump {
                bytes: Vec::with_capacity(1 << 20),
                msgs: Vec::new(),
            };
            let mut intr = false;
            intr |= self.dump(NFT_MSG_GETTABLE, NFPROTO_UNSPEC, &[], "GETTABLE", &mut dump)?;
            intr |= self.dump(NFT_MSG_GETCHAIN, NFPROTO_UNSPEC, &[], "GETCHAIN", &mut dump)?;
            intr |= self.dump(NFT_MSG_GETSET, NFPROTO_UNSPEC, &[], "GETSET", &mut dump)?;
            intr |= self.dump(NFT_MSG_GETRULE, NFPROTO_UNSPEC, &[], "GETRULE", &mut dump)?;
            // Elements, set by set.
            let sets: Vec<(u8, String, String)> = dump
                .msgs
                .iter()
                .filter(|m| m.msg == NFT_MSG_NEWSET)
                .filter_map(|m| {
                    let a: Vec<_> = Attrs::new(dump.payload(m)).flatten().collect();
                    let table = a.iter().find(|(t, _)| *t == NFTA_SET_TABLE)?;
                    let name = a.iter().find(|(t, _)| *t == NFTA_SET_NAME)?;
                    Some((m.family, string(table.1), string(name.1)))
                })
                .collect();
            for (family, table, set) in &sets {
                let mut req = Vec::new();
                attr::put_str(&mut req, NFTA_SET_ELEM_LIST_TABLE, table);
                attr::put_str(&mut req, NFTA_SET_ELEM_LIST_SET, set);
                intr |= self.dump(NFT_MSG_GETSETELEM, *family, &req, "GETSETELEM", &mut dump)?;
            }
            let after = self.generation()?;
            let dumped = t0.elapsed();
            if intr || before != after {
                continue;
            }
            let t1 = Instant::now();
            let mut model = decode_dump(&dump);
            model.generation = Some(after);
            let timings = ReadTimings {
                dump: dumped,
                decode: t1.elapsed(),
                bytes: dump.bytes.len(),
            };
            return Ok((model, timings));
        }
        Err(ReadError::Inconsistent(CONSISTENT_READ_ATTEMPTS))
    }
}

/// Reads the ruleset of the calling thread's network namespace.
pub fn read_ruleset() -> Result<RulesetModel, ReadError> {
    NftSocket::open()?.read_ruleset().map(|(m, _)| m)
}

type TableKey = (u8, String);
/// The chain the previous rule named: family, table, chain, and its indexes.
type LastChain<'a> = (u8, &'a [u8], &'a [u8], Option<(usize, usize)>);
/// Table, chain, rule, set and element-list attribute types are all below this.
const MAX_OBJECT_ATTR: usize = 32;

/// Builds the model from the raw messages; never fails, collects warnings.
fn decode_dump(dump: &Dump) -> RulesetModel {
    let mut model = RulesetModel::default();
    let mut tables: HashMap<TableKey, usize> = HashMap::new();
    let mut chains: HashMap<(usize, String), usize> = HashMap::new();
    let mut sets: HashMap<(usize, String), usize> = HashMap::new();
    let mut last_chain: Option<LastChain<'_>> = None;
    for m in &dump.msgs {
        let p = dump.payload(m);
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
            model.warnings.push(format!("message type {}: {e}", m.msg));
            continue;
        }
        let get = |ty: u16| a.get(ty as usize).copied().flatten();
        match m.msg {
            NFT_MSG_NEWTABLE => {
                let Some(name) = get(NFTA_TABLE_NAME).map(string) else {
                    model.warnings.push("table without a name".into());
                    continue;
                };
                tables.insert((m.family, name.clone()), model.tables.len());
                model.tables.push(Table {
                    family: Family(m.family),
                    name,
                    handle: get(NFTA_TABLE_HANDLE).and_then(be_u64).unwrap_or(0),
                    flags: get(NFTA_TABLE_FLAGS).and_then(be_u32).unwrap_or(0),
                    ..Table::default()
                });
            }
            NFT_MSG_NEWCHAIN => {
                let (Some(table), Some(name)) = (
                    get(NFTA_CHAIN_TABLE).map(string),
                    get(NFTA_CHAIN_NAME).map(string),
                ) else {
                    model.warnings.push("chain without a table or name".into());
                    continue;
                };
                let Some(&ti) = tables.get(&(m.family, table.clone())) else {
                    model
                        .warnings
                        .push(format!("chain {name} of unknown table {table}"));
                    continue;
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
                let t = &mut model.tables[ti];
                chains.insert((ti, name.clone()), t.chains.len());
                t.chains.push(Chain {
                    name,
                    handle: get(NFTA_CHAIN_HANDLE).and_then(be_u64).unwrap_or(0),
                    base,
                    rules: Vec::new(),
                });
            }
            NFT_MSG_NEWRULE => {
                let (Some(table), Some(chain)) = (get(NFTA_RULE_TABLE), get(NFTA_RULE_CHAIN))
                else {
                    model.warnings.push("rule without a table or chain".into());
                    continue;
                };
                // Rules arrive chain by chain: look names up only when they change.
                let hit = matches!(&last_chain, Some((f, t, c, _)) if *f == m.family && *t == table && *c == chain);
                if !hit {
                    let found = tables
                        .get(&(m.family, string(table)))
                        .and_then(|&ti| chains.get(&(ti, string(chain))).map(|&ci| (ti, ci)));
                    last_chain = Some((m.family, table, chain, found));
                }
                let Some((_, _, _, Some((ti, ci)))) = last_chain else {
                    continue;
                };
                let exprs: Vec<Expr> = get(NFTA_RULE_EXPRESSIONS)
                    .map(|list| {
                        Attrs::new(list)
                            .map(|e| match e {
                                Ok((expr::NFTA_LIST_ELEM, e)) => expr::decode_list_elem(e),
                                _ => Expr::Unknown {
                                    name: "<malformed>".into(),
                                },
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let comment = get(NFTA_RULE_USERDATA).and_then(udata_comment);
                let rule = Rule {
                    handle: get(NFTA_RULE_HANDLE).and_then(be_u64).unwrap_or(0),
                    exprs,
                    comment,
                };
                model.tables[ti].chains[ci].rules.push(rule);
            }
            NFT_MSG_NEWSET => {
                let (Some(table), Some(name)) = (
                    get(NFTA_SET_TABLE).map(string),
                    get(NFTA_SET_NAME).map(string),
                ) else {
                    continue;
                };
                let Some(&ti) = tables.get(&(m.family, table)) else {
                    continue;
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
                let t = &mut model.tables[ti];
                sets.insert((ti, name.clone()), t.sets.len());
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
                    continue;
                };
                let Some(&ti) = tables.get(&(m.family, table)) else {
                    continue;
                };
                let Some(&si) = sets.get(&(ti, set)) else {
                    continue;
                };
                let Some(list) = get(NFTA_SET_ELEM_LIST_ELEMENTS) else {
                    continue;
                };
                let elems = &mut model.tables[ti].sets[si].elements;
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
    for t in &mut model.tables {
        t.origin = table_origin(t);
    }
    model
}

/// iptables-nft writes `xt` expressions, and tables named like iptables' own with
/// base chains named like its built-in ones.
fn table_origin(t: &Table) -> TableOrigin {
    let has_xt = t.chains.iter().flat_map(|c| &c.rules).any(|r| {
        r.exprs
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

/// Runs `f` on a thread inside the network namespace `/run/netns/NAME` (or a
/// path): sockets opened there stay in that namespace.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let path = if name.starts_with('/') {
        name.into()
    } else {
        format!("/run/netns/{name}")
    };
    let file = std::fs::File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {path}: {e}")))?;
    let handle = std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace fd we hold.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}
