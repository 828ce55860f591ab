//! The netlink plumbing the proxy's kernel interfaces share (nf_tables in
//! [`crate::nftables::netlink`], ctnetlink in [`crate::conntrack`], IPVS over generic netlink and
//! the VIP device over rtnetlink in [`crate::ipvs`]): opening a socket, writing attributes, and
//! splitting what the kernel sends back into messages and attributes.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket as open, sockopt,
};

/// `NLMSG_ERROR`: an error, or an acknowledgement when its code is 0.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLA_F_NESTED`.
pub const NLA_F_NESTED: u16 = 0x8000;

/// `NLM_F_DUMP`.
pub const NLM_F_DUMP: u16 = 0x300;

/// A `NETLINK_NETFILTER` socket in the calling thread's network namespace.
pub fn socket() -> nix::Result<OwnedFd> {
    socket_for(SockProtocol::NetlinkNetFilter)
}

/// A netlink socket of `protocol` in the calling thread's network namespace.
pub fn socket_for(protocol: SockProtocol) -> nix::Result<OwnedFd> {
    let fd = open(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(fd)
}

/// Appends attribute `kind` with `payload`, padded to 4 bytes.
pub fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Why a request on a [`Connection`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A socket operation failed.
    #[error("{what}: {errno}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The error.
        errno: nix::Error,
    },
    /// The kernel answered with an error.
    #[error("{0}")]
    Refused(nix::Error),
}

fn socket_error(what: &'static str) -> impl FnOnce(nix::Error) -> RequestError {
    move |errno| RequestError::Socket { what, errno }
}

/// Requests per datagram in [`Connection::batch`]: their acknowledgements must fit the receive
/// buffer.
const BATCH_CHUNK: usize = 2000;

/// A netlink socket that sends requests and waits for their answers.
#[derive(Debug)]
pub struct Connection {
    fd: OwnedFd,
    seq: u32,
}

impl Connection {
    /// Opens a socket of `protocol` with buffers large enough for big batches and dumps.
    pub fn open(protocol: SockProtocol) -> Result<Connection, RequestError> {
        let fd = socket_for(protocol).map_err(socket_error("open socket"))?;
        setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20))
            .map_err(socket_error("size the receive buffer"))?;
        setsockopt(&fd, sockopt::SndBufForce, &(4 << 20))
            .map_err(socket_error("size the send buffer"))?;
        Ok(Connection { fd, seq: 0 })
    }

    /// Asks the kernel to check dump requests strictly and to honour their filters (such as
    /// one interface's addresses), instead of dumping everything.
    pub fn strict_dumps(&mut self) -> Result<(), RequestError> {
        const SOL_NETLINK: nix::libc::c_int = 270;
        const NETLINK_GET_STRICT_CHK: nix::libc::c_int = 12;
        let on: nix::libc::c_int = 1;
        // SAFETY: the descriptor is this connection's open socket, and the option value is a
        // c_int that lives across the call, with its size given.
        let outcome = unsafe {
            nix::libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_GET_STRICT_CHK,
                (&raw const on).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        if outcome == 0 {
            Ok(())
        } else {
            Err(RequestError::Socket {
                what: "ask for strict dumps",
                errno: nix::Error::last(),
            })
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request (acknowledged) and returns the bodies of its answers: a dump's
    /// messages, or none, up to the acknowledgement or the end of the dump.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        body: &[u8],
    ) -> Result<Vec<Vec<u8>>, RequestError> {
        let seq = self.next_seq();
        let mut out = Vec::new();
        message(&mut out, kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, body);
        send(self.fd.as_raw_fd(), &out, MsgFlags::empty()).map_err(socket_error("send"))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut answers = Vec::new();
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(socket_error("receive"))?;
            for message in messages(&buf[..n]) {
                if message.seq != seq {
                    continue;
                }
                match message.kind {
                    NLMSG_ERROR => {
                        let code = message.error_code();
                        return if code == 0 {
                            Ok(answers)
                        } else {
                            Err(RequestError::Refused(nix::Error::from_raw(-code)))
                        };
                    }
                    NLMSG_DONE => return Ok(answers),
                    _ => answers.push(message.payload.to_vec()),
                }
            }
        }
    }

    /// Sends `requests` (kind, flags, body), many to a datagram, each acknowledged; returns each
    /// one's outcome (0 or a negative errno) in order. Every request is attempted.
    pub fn batch(&mut self, requests: &[(u16, u16, Vec<u8>)]) -> Result<Vec<i32>, RequestError> {
        let mut codes = Vec::with_capacity(requests.len());
        let mut buf = vec![0u8; 1 << 16];
        for chunk in requests.chunks(BATCH_CHUNK) {
            let first_seq = self.seq.wrapping_add(1);
            let mut out = Vec::new();
            for (kind, flags, body) in chunk {
                let seq = self.next_seq();
                message(
                    &mut out,
                    *kind,
                    flags | NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    body,
                );
            }
            send(self.fd.as_raw_fd(), &out, MsgFlags::empty()).map_err(socket_error("send"))?;
            let mut outcome: Vec<Option<i32>> = vec![None; chunk.len()];
            let mut acknowledged = 0;
            while acknowledged < chunk.len() {
                let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                    .map_err(socket_error("receive"))?;
                for message in messages(&buf[..n]) {
                    if message.kind != NLMSG_ERROR {
                        continue;
                    }
                    let index = message.seq.wrapping_sub(first_seq) as usize;
                    if let Some(slot) = outcome.get_mut(index).filter(|s| s.is_none()) {
                        *slot = Some(message.error_code());
                        acknowledged += 1;
                    }
                }
            }
            codes.extend(outcome.into_iter().map(|c| c.unwrap_or(0)));
        }
        Ok(codes)
    }
}

/// Appends a netlink message: header (`kind`, `flags`, `seq`) and `body`.
pub fn message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) {
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The attributes in `buf`: (type without the nested/byte-order flags, payload).
pub fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        let padded = len.div_ceil(4) * 4;
        buf = &buf[padded.min(buf.len())..];
    }
    out
}

/// One netlink message as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// What follows the header.
    pub payload: &'a [u8],
}

impl Message<'_> {
    /// The error code of an `NLMSG_ERROR` message (0 is an acknowledgement).
    pub fn error_code(&self) -> i32 {
        self.payload
            .get(..4)
            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The messages in `buf`; stops at a truncated one.
pub fn messages(mut buf: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        out.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            payload: &buf[16..len],
        });
        buf = &buf[len.div_ceil(4).saturating_mul(4).min(buf.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_and_stop_at_truncation() {
        let mut buf = Vec::new();
        for (kind, seq) in [(NLMSG_ERROR, 7u32), (NLMSG_DONE, 8)] {
            buf.extend_from_slice(&20u32.to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&(-2i32).to_ne_bytes());
        }
        buf.extend_from_slice(&[99, 0, 0, 0]);
        let parsed = messages(&buf);
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            (parsed[0].kind, parsed[0].seq, parsed[0].error_code()),
            (NLMSG_ERROR, 7, -2)
        );
        assert_eq!(parsed[1].kind, NLMSG_DONE);
    }
}
