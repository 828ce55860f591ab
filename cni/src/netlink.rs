//! rtnetlink for the pod network, two ways: the async [`Handle`] helpers `tug netd` uses (a
//! long-lived agent on a runtime), and [`Rtnl`], the blocking socket the plugin uses (a CNI
//! command is one short-lived process: a runtime and a thread per request would cost more than the
//! kernel work itself).

use std::io;
use std::path::Path;

use futures::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::Handle;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::netns::{self, NetnsError};

/// Whether a netlink error means "no such device/route/object": gone is not a failure for
/// lookups and deletions.
pub fn is_not_found(error: &rtnetlink::Error) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(m) if is_not_found_errno(Errno::from_raw(-m.raw_code())))
}

/// The errnos the kernel answers for an object that is not there.
pub fn is_not_found_errno(errno: Errno) -> bool {
    [Errno::ENODEV, Errno::ENOENT, Errno::ESRCH].contains(&errno)
}

/// The link called `name`, or `None` when there is none.
pub async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The kernel's answer to one request: the messages it returned (a GET's object, a dump's
/// entries; none for a change), or the errno it refused the request with.
pub type Answer = Result<Vec<RouteNetlinkMessage>, Errno>;

/// A blocking rtnetlink socket bound to the network namespace it was opened in.
#[derive(Debug)]
pub struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl {
            socket,
            sequence: 0,
        })
    }

    /// A socket in the network namespace at `path`, opened on a short-lived thread that enters it
    /// (STYLE.md §8): the socket stays in that namespace, the caller's thread never moves.
    pub fn open_in(path: &Path) -> Result<io::Result<Rtnl>, NetnsError> {
        netns::enter(path, Rtnl::open)
    }

    /// Sends `requests` (message and `NLM_F_*` flags; `NLM_F_REQUEST` and `NLM_F_ACK` are added)
    /// in one datagram and returns the kernel's answer to each, in order. The kernel carries on
    /// after a refused request, so every request gets its own answer.
    pub fn request(
        &mut self,
        requests: Vec<(RouteNetlinkMessage, u16)>,
    ) -> io::Result<Vec<Answer>> {
        let requests = requests
            .into_iter()
            .map(|(message, flags)| (message, flags | NLM_F_ACK))
            .collect();
        self.exchange(requests)
    }

    /// Dumps every object of `message`'s kind (links, addresses, routes of its family).
    pub fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Answer> {
        let mut answers = self.exchange(vec![(message, NLM_F_DUMP)])?;
        Ok(answers.pop().expect("one request, one answer"))
    }

    fn exchange(&mut self, requests: Vec<(RouteNetlinkMessage, u16)>) -> io::Result<Vec<Answer>> {
        let first = self.sequence.wrapping_add(1);
        let count = requests.len();
        let mut out = Vec::new();
        for (i, (message, flags)) in requests.into_iter().enumerate() {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | flags;
            header.sequence_number = first.wrapping_add(i as u32);
            let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
            packet.finalize();
            let start = out.len();
            out.resize(start + packet.buffer_len(), 0);
            packet.serialize(&mut out[start..]);
        }
        self.sequence = first.wrapping_add(count as u32);
        self.socket.send(&out, 0)?;

        let mut collected: Vec<Vec<RouteNetlinkMessage>> = vec![Vec::new(); count];
        let mut answers: Vec<Option<Answer>> = vec![None; count];
        let mut datagram = Vec::with_capacity(64 * 1024);
        while answers.iter().any(Option::is_none) {
            datagram.clear();
            self.socket.recv(&mut datagram, 0)?;
            let mut offset = 0;
            while offset < datagram.len() {
                let packet =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = packet.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
                let slot = packet.header.sequence_number.wrapping_sub(first) as usize;
                if slot >= count {
                    continue; // an answer to an earlier exchange that gave up
                }
                match packet.payload {
                    NetlinkPayload::InnerMessage(message) => collected[slot].push(message),
                    NetlinkPayload::Error(error) => {
                        answers[slot] = Some(match error.code {
                            None => Ok(std::mem::take(&mut collected[slot])),
                            Some(code) => Err(Errno::from_raw(-code.get())),
                        });
                    }
                    NetlinkPayload::Done(_) => {
                        answers[slot] = Some(Ok(std::mem::take(&mut collected[slot])));
                    }
                    _ => {}
                }
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("loop ends when all are in"))
            .collect())
    }
}
