//! A small nf_tables netlink encoder: one batch (BATCH_BEGIN … BATCH_END) of table, chain,
//! set, element and rule messages, sent in one `sendmsg` so the kernel applies it atomically,
//! then a GETGEN round trip to collect any error, which is reported with the message that
//! caused it. No permissively licensed Rust crate speaks nf_tables (DESIGN.md §7), so tug
//! writes the bytes itself; the expressions are those the proxy needs.

use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, recv, send, setsockopt, sockopt};

use crate::nfnetlink::{self, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, attr};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_GETGEN: u16 = 16;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

/// `NFPROTO_IPV4`.
pub const FAMILY_IPV4: u8 = 2;
/// `NFPROTO_IPV6`.
pub const FAMILY_IPV6: u8 = 10;

/// The verdict register.
pub const REG_VERDICT: u32 = 0;
/// 32-bit register 0 (`NFT_REG32_00`); registers 8…23 are 4 bytes each.
pub const REG32: u32 = 8;

/// A verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accept.
    Accept,
    /// Drop.
    Drop,
    /// Return to the calling chain.
    Return,
    /// Jump to a chain.
    Jump(String),
    /// Go to a chain (no return).
    Goto(String),
}

impl Verdict {
    fn encode(&self, out: &mut Vec<u8>) {
        let (code, chain): (i32, Option<&str>) = match self {
            Verdict::Accept => (1, None),
            Verdict::Drop => (0, None),
            Verdict::Return => (-5, None),
            Verdict::Jump(c) => (-3, Some(c)),
            Verdict::Goto(c) => (-4, Some(c)),
        };
        nested(out, 2 /* NFTA_DATA_VERDICT */, |v| {
            attr(v, 1 /* NFTA_VERDICT_CODE */, &code.to_be_bytes());
            if let Some(chain) = chain {
                attr_str(v, 2 /* NFTA_VERDICT_CHAIN */, chain);
            }
        });
    }
}

/// One rule expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// Load `len` bytes at `offset` of header `base` (1 network, 2 transport) into `dreg`.
    Payload {
        /// Header base.
        base: u32,
        /// Offset.
        offset: u32,
        /// Length.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Load meta `key` (3 mark, 16 l4proto) into `dreg`.
    Meta {
        /// Meta key.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Load conntrack `key` (0 state) into `dreg`.
    Ct {
        /// Conntrack key.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Set meta `key` from `sreg`.
    MetaSet {
        /// Meta key.
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// Compare `sreg` with `data` (`eq` or not).
    Cmp {
        /// Source register.
        sreg: u32,
        /// Equal (else not equal).
        eq: bool,
        /// The value.
        data: Vec<u8>,
    },
    /// `dreg = (sreg & mask) ^ xor`.
    Bitwise {
        /// Source register.
        sreg: u32,
        /// Destination register.
        dreg: u32,
        /// Mask.
        mask: Vec<u8>,
        /// Xor.
        xor: Vec<u8>,
    },
    /// Look `sreg` up in a set; with a verdict map, jump to what it maps to.
    Lookup {
        /// Set name.
        set: String,
        /// Source register.
        sreg: u32,
        /// Destination register for maps (`REG_VERDICT` for verdict maps).
        dreg: Option<u32>,
    },
    /// Put a value or a verdict into a register.
    Immediate {
        /// Destination register.
        dreg: u32,
        /// The value (ignored for verdicts).
        value: Vec<u8>,
        /// A verdict (then `dreg` is the verdict register).
        verdict: Option<Verdict>,
    },
    /// A random number modulo `modulus` into `dreg`.
    Numgen {
        /// Destination register.
        dreg: u32,
        /// Modulus.
        modulus: u32,
    },
    /// Address type of the destination (`fib daddr type`), or of the source (`fib saddr
    /// type`), into `dreg`.
    FibAddrType {
        /// Destination register.
        dreg: u32,
        /// The source address (else the destination).
        source: bool,
    },
    /// Destination NAT to the address in `addr_reg` and port in `proto_reg`.
    Dnat {
        /// Family.
        family: u8,
        /// Address register.
        addr_reg: u32,
        /// Port register.
        proto_reg: u32,
    },
    /// Masquerade with fully random ports.
    Masquerade,
    /// Reject with ICMP(v6) port unreachable.
    Reject {
        /// IPv6 (ICMPv6 code 4) instead of ICMP code 3.
        ipv6: bool,
    },
    /// A packet and byte counter.
    Counter,
    /// Add `sreg` to a dynamic set, or refresh its timeout (`update @set { ... }`).
    DynsetUpdate {
        /// Set name.
        set: String,
        /// Key register.
        sreg: u32,
    },
}

fn attr_str(out: &mut Vec<u8>, kind: u16, text: &str) {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    attr(out, kind, &bytes);
}

fn attr_u32(out: &mut Vec<u8>, kind: u16, value: u32) {
    attr(out, kind, &value.to_be_bytes());
}

fn nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    fill(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

fn data_value(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    nested(out, kind, |d| attr(d, 1 /* NFTA_DATA_VALUE */, value));
}

/// Writes an expression's attributes.
type Filler<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;

impl Expr {
    fn encode(&self, out: &mut Vec<u8>) {
        nested(out, 1 /* NFTA_LIST_ELEM */, |e| {
            let (name, fill): (&str, Filler<'_>) = match self {
                Expr::Payload {
                    base,
                    offset,
                    len,
                    dreg,
                } => (
                    "payload",
                    Box::new(move |d| {
                        attr_u32(d, 1, *dreg);
                        attr_u32(d, 2, *base);
                        attr_u32(d, 3, *offset);
                        attr_u32(d, 4, *len);
                    }),
                ),
                Expr::Meta { key, dreg } => (
                    "meta",
                    Box::new(move |d| {
                        attr_u32(d, 2, *key);
                        attr_u32(d, 1, *dreg);
                    }),
                ),
                Expr::Ct { key, dreg } => (
                    "ct",
                    Box::new(move |d| {
                        attr_u32(d, 2, *key);
                        attr_u32(d, 1, *dreg);
                    }),
                ),
                Expr::MetaSet { key, sreg } => (
                    "meta",
                    Box::new(move |d| {
                        attr_u32(d, 2, *key);
                        attr_u32(d, 3, *sreg);
                    }),
                ),
                Expr::Cmp { sreg, eq, data } => (
                    "cmp",
                    Box::new(move |d| {
                        attr_u32(d, 1, *sreg);
                        attr_u32(d, 2, if *eq { 0 } else { 1 });
                        data_value(d, 3, data);
                    }),
                ),
                Expr::Bitwise {
                    sreg,
                    dreg,
                    mask,
                    xor,
                } => (
                    "bitwise",
                    Box::new(move |d| {
                        attr_u32(d, 1, *sreg);
                        attr_u32(d, 2, *dreg);
                        attr_u32(d, 3, mask.len() as u32);
                        data_value(d, 4, mask);
                        data_value(d, 5, xor);
                    }),
                ),
                Expr::Lookup { set, sreg, dreg } => (
                    "lookup",
                    Box::new(move |d| {
                        attr_str(d, 1, set);
                        attr_u32(d, 2, *sreg);
                        if let Some(dreg) = dreg {
                            attr_u32(d, 3, *dreg);
                        }
                    }),
                ),
                Expr::Immediate {
                    dreg,
                    value,
                    verdict,
                } => (
                    "immediate",
                    Box::new(move |d| {
                        attr_u32(d, 1, *dreg);
                        nested(d, 2, |v| match verdict {
                            Some(verdict) => verdict.encode(v),
                            None => attr(v, 1, value),
                        });
                    }),
                ),
                Expr::Numgen { dreg, modulus } => (
                    "numgen",
                    Box::new(move |d| {
                        attr_u32(d, 1, *dreg);
                        attr_u32(d, 2, *modulus);
                        attr_u32(d, 3, 1 /* NFT_NG_RANDOM */);
                    }),
                ),
                Expr::FibAddrType { dreg, source } => (
                    "fib",
                    Box::new(move |d| {
                        attr_u32(d, 1, *dreg);
                        attr_u32(d, 2, 3 /* NFT_FIB_RESULT_ADDRTYPE */);
                        // NFTA_FIB_F_SADDR, NFTA_FIB_F_DADDR
                        attr_u32(d, 3, if *source { 1 } else { 1 << 1 });
                    }),
                ),
                Expr::Dnat {
                    family,
                    addr_reg,
                    proto_reg,
                } => (
                    "nat",
                    Box::new(move |d| {
                        attr_u32(d, 1, 1 /* NFT_NAT_DNAT */);
                        attr_u32(d, 2, u32::from(*family));
                        attr_u32(d, 3, *addr_reg);
                        attr_u32(d, 5, *proto_reg);
                    }),
                ),
                Expr::Masquerade => (
                    "masq",
                    Box::new(|d| {
                        attr_u32(d, 1, 0x10 /* NF_NAT_RANGE_PROTO_RANDOM_FULLY */);
                    }),
                ),
                Expr::Reject { ipv6 } => (
                    "reject",
                    Box::new(move |d| {
                        attr_u32(d, 1, 0 /* NFT_REJECT_ICMP_UNREACH */);
                        attr(d, 2, &[if *ipv6 { 4 } else { 3 }]);
                    }),
                ),
                Expr::Counter => ("counter", Box::new(|_| {})),
                Expr::DynsetUpdate { set, sreg } => (
                    "dynset",
                    Box::new(move |d| {
                        attr_str(d, 1, set);
                        attr_u32(d, 3, 1 /* NFT_DYNSET_OP_UPDATE */);
                        attr_u32(d, 4, *sreg);
                    }),
                ),
            };
            attr_str(e, 1 /* NFTA_EXPR_NAME */, name);
            nested(e, 2 /* NFTA_EXPR_DATA */, |d| fill(d));
        });
    }
}

/// A set or map definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    /// Name.
    pub name: String,
    /// The nft key type id (for `nft list` to print it; concatenations shift by 6 bits).
    pub key_type: u32,
    /// Key length in bytes (concatenated fields padded to 4).
    pub key_len: u32,
    /// A verdict map (else a plain set, or a data map when `data` is given).
    pub verdict_map: bool,
    /// A data map: its value's nft type id and length in bytes.
    pub data: Option<(u32, u32)>,
    /// For dynamic sets whose elements expire: the timeout in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// An element: key bytes and, for maps, what the key maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Key.
    pub key: Vec<u8>,
    /// Verdict (verdict maps only).
    pub verdict: Option<Verdict>,
    /// Value (data maps only).
    pub data: Option<Vec<u8>>,
}

impl Element {
    /// A set's element.
    pub fn key(key: Vec<u8>) -> Element {
        Element {
            key,
            verdict: None,
            data: None,
        }
    }

    /// A verdict map's element.
    pub fn verdict(key: Vec<u8>, verdict: Verdict) -> Element {
        Element {
            key,
            verdict: Some(verdict),
            data: None,
        }
    }

    /// A data map's element.
    pub fn data(key: Vec<u8>, data: Vec<u8>) -> Element {
        Element {
            key,
            verdict: None,
            data: Some(data),
        }
    }
}

/// One atomic nf_tables transaction being built.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    labels: Vec<(u32, String)>,
    family: u8,
}

impl Batch {
    /// A batch for tables of `family`.
    pub fn new(family: u8) -> Batch {
        let mut batch = Batch {
            buf: Vec::new(),
            seq: 0,
            labels: Vec::new(),
            family,
        };
        batch.raw(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            &[],
            "batch begin".into(),
        );
        batch
    }

    fn raw(&mut self, kind: u16, flags: u16, family: u8, attrs: &[u8], label: String) {
        self.seq += 1;
        let len = 16 + 4 + attrs.len();
        self.buf.extend_from_slice(&(len as u32).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        let res_id = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
            NFNL_SUBSYS_NFTABLES
        } else {
            0
        };
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.buf.extend_from_slice(attrs);
        self.labels.push((self.seq, label));
    }

    fn message(&mut self, msg: u16, flags: u16, label: String, fill: impl FnOnce(&mut Vec<u8>)) {
        let mut attrs = Vec::new();
        fill(&mut attrs);
        let family = self.family;
        self.raw(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | flags,
            family,
            &attrs,
            label,
        );
    }

    /// Adds `table` (no error if it exists).
    pub fn add_table(&mut self, table: &str) {
        self.message(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            format!("add table {table}"),
            |a| {
                attr_str(a, 1, table);
            },
        );
    }

    /// Deletes `table` and everything in it.
    pub fn del_table(&mut self, table: &str) {
        self.message(NFT_MSG_DELTABLE, 0, format!("delete table {table}"), |a| {
            attr_str(a, 1, table);
        });
    }

    /// Adds a chain; base chains give (hook number, priority, type).
    pub fn add_chain(&mut self, table: &str, chain: &str, hook: Option<(u32, i32, &str)>) {
        self.message(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("add chain {table} {chain}"),
            |a| {
                attr_str(a, 1, table);
                attr_str(a, 3, chain);
                if let Some((number, priority, kind)) = hook {
                    nested(a, 4, |h| {
                        attr_u32(h, 1, number);
                        attr(h, 2, &priority.to_be_bytes());
                    });
                    attr_str(a, 7, kind);
                }
            },
        );
    }

    /// Deletes an (empty, unreferenced) chain.
    pub fn del_chain(&mut self, table: &str, chain: &str) {
        self.message(
            NFT_MSG_DELCHAIN,
            0,
            format!("delete chain {table} {chain}"),
            |a| {
                attr_str(a, 1, table);
                attr_str(a, 3, chain);
            },
        );
    }

    /// Removes every rule of a chain.
    pub fn flush_chain(&mut self, table: &str, chain: &str) {
        self.message(
            NFT_MSG_DELRULE,
            0,
            format!("flush chain {table} {chain}"),
            |a| {
                attr_str(a, 1, table);
                attr_str(a, 2, chain);
            },
        );
    }

    /// Appends a rule.
    pub fn add_rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) {
        self.message(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            format!("add rule {table} {chain}"),
            |a| {
                attr_str(a, 1, table);
                attr_str(a, 2, chain);
                nested(a, 4, |list| {
                    for expr in exprs {
                        expr.encode(list);
                    }
                });
            },
        );
    }

    /// Adds a named set or map.
    pub fn add_set(&mut self, table: &str, spec: &SetSpec) {
        let id = self.seq + 1;
        let mut flags = if spec.verdict_map || spec.data.is_some() {
            0x8 /* NFT_SET_MAP */
        } else {
            0
        };
        if spec.timeout_ms.is_some() {
            flags |= 0x10 /* NFT_SET_TIMEOUT */ | 0x20 /* NFT_SET_EVAL */;
        }
        self.message(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            format!("add set {table} {}", spec.name),
            |a| {
                attr_str(a, 1, table);
                attr_str(a, 2, &spec.name);
                attr_u32(a, 3, flags);
                attr_u32(a, 4, spec.key_type);
                attr_u32(a, 5, spec.key_len);
                if spec.verdict_map {
                    attr_u32(a, 6, 0xffff_ff00 /* NFT_DATA_VERDICT */);
                } else if let Some((kind, len)) = spec.data {
                    attr_u32(a, 6 /* NFTA_SET_DATA_TYPE */, kind);
                    attr_u32(a, 7 /* NFTA_SET_DATA_LEN */, len);
                }
                attr_u32(a, 10, id);
                if let Some(timeout) = spec.timeout_ms {
                    attr(a, 11 /* NFTA_SET_TIMEOUT */, &timeout.to_be_bytes());
                }
            },
        );
    }

    /// Deletes an unreferenced set.
    pub fn del_set(&mut self, table: &str, name: &str) {
        self.message(
            NFT_MSG_DELSET,
            0,
            format!("delete set {table} {name}"),
            |a| {
                attr_str(a, 1, table);
                attr_str(a, 2, name);
            },
        );
    }

    fn elements(&mut self, msg: u16, table: &str, set: &str, elements: &[Element], what: &str) {
        // Bounded messages: a netlink attribute length is 16 bits.
        for chunk in elements.chunks(512) {
            self.message(
                msg,
                NLM_F_CREATE,
                format!("{what} {} elements in {table} {set}", chunk.len()),
                |a| {
                    attr_str(a, 1, table);
                    attr_str(a, 2, set);
                    nested(a, 3, |list| {
                        for element in chunk {
                            nested(list, 1, |e| {
                                data_value(e, 1 /* NFTA_SET_ELEM_KEY */, &element.key);
                                if let Some(verdict) = &element.verdict {
                                    nested(
                                        e,
                                        2, /* NFTA_SET_ELEM_DATA */
                                        |d| verdict.encode(d),
                                    );
                                } else if let Some(data) = &element.data {
                                    data_value(e, 2 /* NFTA_SET_ELEM_DATA */, data);
                                }
                            });
                        }
                    });
                },
            );
        }
    }

    /// Adds elements to a set or map.
    pub fn add_elements(&mut self, table: &str, set: &str, elements: &[Element]) {
        self.elements(NFT_MSG_NEWSETELEM, table, set, elements, "add");
    }

    /// Deletes elements from a set or map.
    pub fn del_elements(&mut self, table: &str, set: &str, elements: &[Element]) {
        self.elements(NFT_MSG_DELSETELEM, table, set, elements, "delete");
    }

    /// Number of messages (without begin and end).
    pub fn len(&self) -> usize {
        self.labels.len() - 1
    }

    /// Whether the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch's bytes, closed with BATCH_END.
    pub fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>) {
        self.raw(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            &[],
            "batch end".into(),
        );
        (self.buf, self.labels)
    }
}

/// Why a batch was refused. Not retryable as it is: the batch was rolled back entirely.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The socket failed.
    #[error("nf_tables netlink: {what}: {errno}")]
    Socket {
        /// The operation.
        what: &'static str,
        /// The error.
        errno: nix::Error,
    },
    /// The kernel refused a message; nothing of the batch was applied.
    #[error("nf_tables refused \"{message}\": {errno}")]
    Refused {
        /// The message, as built.
        message: String,
        /// The kernel's error.
        errno: nix::Error,
    },
}

fn fail(what: &'static str) -> impl FnOnce(nix::Error) -> NftError {
    move |errno| NftError::Socket { what, errno }
}

/// An nf_tables netlink socket, kept open between batches: closing one costs the kernel an RCU
/// grace period (milliseconds), more than a small batch itself. It belongs to the network
/// namespace of the thread that opened it.
#[derive(Debug)]
pub struct Socket {
    fd: std::os::fd::OwnedFd,
    send_buffer: usize,
}

impl Socket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Socket, NftError> {
        let fd = nfnetlink::socket().map_err(fail("open socket"))?;
        setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20))
            .map_err(fail("size the receive buffer"))?;
        Ok(Socket { fd, send_buffer: 0 })
    }

    /// Sends `batch` and waits for its outcome. After an error of the socket itself (not a
    /// refused batch) the socket should be dropped.
    pub fn apply(&mut self, batch: Batch) -> Result<(), NftError> {
        let (bytes, labels) = batch.finish();
        let fd = &self.fd;
        // The whole batch goes in one datagram.
        let size = bytes.len().max(1 << 20);
        if size > self.send_buffer {
            setsockopt(fd, sockopt::SndBufForce, &size).map_err(fail("size the send buffer"))?;
            self.send_buffer = size;
        }
        send(fd.as_raw_fd(), &bytes, MsgFlags::empty()).map_err(fail("send batch"))?;
        // A GETGEN after the batch: its answer comes after any error of the batch.
        let getgen_seq = u32::MAX;
        let mut getgen = Vec::new();
        getgen.extend_from_slice(&20u32.to_ne_bytes());
        getgen.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
        getgen.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        getgen.extend_from_slice(&getgen_seq.to_ne_bytes());
        getgen.extend_from_slice(&0u32.to_ne_bytes());
        getgen.extend_from_slice(&[0, 0, 0, 0]);
        send(fd.as_raw_fd(), &getgen, MsgFlags::empty()).map_err(fail("send GETGEN"))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut first_error: Option<NftError> = None;
        loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(fail("receive"))?;
            for message in nfnetlink::messages(&buf[..n]) {
                if message.kind != NLMSG_ERROR {
                    continue;
                }
                let code = message.error_code();
                if code != 0 && first_error.is_none() {
                    let label = labels
                        .iter()
                        .find(|(s, _)| *s == message.seq)
                        .map(|(_, l)| l.clone())
                        .unwrap_or_else(|| format!("message {}", message.seq));
                    first_error = Some(NftError::Refused {
                        message: label,
                        errno: nix::Error::from_raw(-code),
                    });
                }
                if message.seq == getgen_seq {
                    return match first_error {
                        Some(error) => Err(error),
                        None => Ok(()),
                    };
                }
            }
        }
    }
}

/// Sends `batch` to the kernel of the calling thread's network namespace, over a socket of its
/// own, and waits for its outcome.
pub fn apply(batch: Batch) -> Result<(), NftError> {
    Socket::open()?.apply(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(buf: &[u8]) -> Vec<(u16, u16, u32)> {
        nfnetlink::messages(buf)
            .iter()
            .map(|m| (m.kind, m.flags, m.seq))
            .collect()
    }

    #[test]
    fn a_batch_is_framed_by_begin_and_end_with_sequence_numbers() {
        let mut batch = Batch::new(FAMILY_IPV4);
        batch.add_table("tug");
        batch.add_chain("tug", "services", None);
        batch.add_rule("tug", "services", &[Expr::Counter]);
        assert_eq!(batch.len(), 3);
        let (bytes, labels) = batch.finish();
        let kinds: Vec<(u16, u16, u32)> = messages(&bytes);
        assert_eq!(kinds.len(), 5);
        assert_eq!(kinds[0].0, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(kinds[1].0, (10 << 8) | NFT_MSG_NEWTABLE);
        assert_eq!(kinds[3].1, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND);
        assert_eq!(kinds[4].0, NFNL_MSG_BATCH_END);
        assert_eq!(
            kinds.iter().map(|k| k.2).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(labels[1], (2, "add table tug".to_owned()));
        assert!(bytes.len().is_multiple_of(4));
    }

    #[test]
    fn attributes_are_padded_and_nested_lengths_cover_their_children() {
        let mut out = Vec::new();
        nested(&mut out, 4, |n| attr_str(n, 1, "ab"));
        // nested header (4) + attr header (4) + "ab\0" padded to 4
        assert_eq!(out.len(), 12);
        assert_eq!(u16::from_ne_bytes([out[0], out[1]]), 12);
        assert_eq!(u16::from_ne_bytes([out[2], out[3]]), 4 | NLA_F_NESTED);
        assert_eq!(u16::from_ne_bytes([out[4], out[5]]), 7);
    }
}
