//! The netlink plumbing the proxy's kernel interfaces share (nf_tables in
//! [`crate::nftables::netlink`], ctnetlink in [`crate::conntrack`], IPVS over generic netlink and
//! the VIP device over rtnetlink in [`crate::ipvs`]): opening a socket, writing attributes, and
//! splitting what the kernel sends back into messages and attributes.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket as open,
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
