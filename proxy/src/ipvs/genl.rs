//! IPVS over generic netlink (the `IPVS` family of `linux/ip_vs.h`), the interface `ipvsadm`
//! uses: virtual services and their destinations, added, changed, removed and listed. Requests
//! go out many to a datagram, each acknowledged on its own, so a sync of thousands of changes
//! costs a handful of system calls.

use std::net::IpAddr;

use nix::sys::socket::SockProtocol;

use crate::model::Protocol;
use crate::nfnetlink::{Connection, NLA_F_NESTED, NLM_F_DUMP, RequestError, attr, attributes};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const IPVS_GENL_VERSION: u8 = 1;

const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;

const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;

const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;

const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`: a client sticks to its destination for the service's timeout.
const SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding.
const CONN_F_MASQ: u32 = 0;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// A virtual service: what clients connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualServer {
    /// Protocol.
    pub protocol: Protocol,
    /// Address.
    pub address: IpAddr,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for VirtualServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        };
        match self.address {
            IpAddr::V4(ip) => write!(f, "{protocol} {ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "{protocol} [{ip}]:{}", self.port),
        }
    }
}

/// How a virtual service schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduling {
    /// The scheduler (`rr`, `wrr`, `lc`, `sh`, ...).
    pub scheduler: String,
    /// ClientIP persistence, in seconds.
    pub persistence: Option<u32>,
}

/// A destination (real server) of a virtual service, reached by NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Destination {
    /// Address.
    pub address: IpAddr,
    /// Port.
    pub port: u16,
    /// Weight; 0 takes no new connections.
    pub weight: u32,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Adds a virtual service.
    AddService(VirtualServer, Scheduling),
    /// Changes a virtual service's scheduling.
    EditService(VirtualServer, Scheduling),
    /// Removes a virtual service and its destinations.
    DelService(VirtualServer),
    /// Adds a destination.
    AddDest(VirtualServer, Destination),
    /// Changes a destination's weight.
    EditDest(VirtualServer, Destination),
    /// Removes a destination.
    DelDest(VirtualServer, Destination),
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dest = |d: &Destination| match d.address {
            IpAddr::V4(ip) => format!("{ip}:{}", d.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", d.port),
        };
        match self {
            Op::AddService(vs, s) => write!(f, "add virtual service {vs} ({})", s.scheduler),
            Op::EditService(vs, s) => write!(f, "change virtual service {vs} ({})", s.scheduler),
            Op::DelService(vs) => write!(f, "delete virtual service {vs}"),
            Op::AddDest(vs, d) => write!(f, "add destination {} to {vs}", dest(d)),
            Op::EditDest(vs, d) => write!(f, "change destination {} of {vs}", dest(d)),
            Op::DelDest(vs, d) => write!(f, "delete destination {} from {vs}", dest(d)),
        }
    }
}

/// Why an IPVS request failed. Retryable (the next sync is a full one), except `Unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The kernel has no IPVS.
    #[error(
        "this kernel has no IPVS (generic netlink family \"IPVS\" not found; load the ip_vs module, or use --proxy-mode nftables)"
    )]
    Unavailable,
    /// A socket operation failed.
    #[error("IPVS netlink: {what}: {error}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The error.
        error: RequestError,
    },
    /// The kernel refused a request.
    #[error("IPVS refused to {op}: {errno}")]
    Refused {
        /// The request.
        op: String,
        /// The kernel's answer.
        errno: nix::Error,
    },
}

fn socket(what: &'static str) -> impl FnOnce(RequestError) -> IpvsError {
    move |error| IpvsError::Socket { what, error }
}

fn af(ip: &IpAddr) -> u16 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

fn proto_number(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn protocol_of(number: u16) -> Option<Protocol> {
    match number {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4.
fn inet_addr(ip: &IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

fn addr_of(family: u16, payload: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::from(<[u8; 4]>::try_from(payload.get(..4)?).ok()?)),
        AF_INET6 => Some(IpAddr::from(<[u8; 16]>::try_from(payload.get(..16)?).ok()?)),
        _ => None,
    }
}

fn nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    attr(out, kind | NLA_F_NESTED, &inner);
}

/// The service attribute: its identity, and its scheduling when given (a full entry).
fn service_attr(out: &mut Vec<u8>, vs: &VirtualServer, scheduling: Option<&Scheduling>) {
    nested(out, CMD_ATTR_SERVICE, |a| {
        attr(a, SVC_ATTR_AF, &af(&vs.address).to_ne_bytes());
        attr(
            a,
            SVC_ATTR_PROTOCOL,
            &proto_number(vs.protocol).to_ne_bytes(),
        );
        attr(a, SVC_ATTR_ADDR, &inet_addr(&vs.address));
        attr(a, SVC_ATTR_PORT, &vs.port.to_be_bytes());
        if let Some(scheduling) = scheduling {
            let mut name = scheduling.scheduler.as_bytes().to_vec();
            name.push(0);
            attr(a, SVC_ATTR_SCHED_NAME, &name);
            let flags = if scheduling.persistence.is_some() {
                SVC_F_PERSISTENT
            } else {
                0
            };
            let mut flag_attr = flags.to_ne_bytes().to_vec();
            flag_attr.extend_from_slice(&u32::MAX.to_ne_bytes());
            attr(a, SVC_ATTR_FLAGS, &flag_attr);
            attr(
                a,
                SVC_ATTR_TIMEOUT,
                &scheduling.persistence.unwrap_or(0).to_ne_bytes(),
            );
            // A host netmask: persistence per client address.
            let netmask = if vs.address.is_ipv4() { u32::MAX } else { 128 };
            attr(a, SVC_ATTR_NETMASK, &netmask.to_ne_bytes());
        }
    });
}

fn dest_attr(out: &mut Vec<u8>, dest: &Destination, full: bool) {
    nested(out, CMD_ATTR_DEST, |a| {
        attr(a, DEST_ATTR_ADDR, &inet_addr(&dest.address));
        attr(a, DEST_ATTR_PORT, &dest.port.to_be_bytes());
        attr(a, DEST_ATTR_ADDR_FAMILY, &af(&dest.address).to_ne_bytes());
        if full {
            attr(a, DEST_ATTR_FWD_METHOD, &CONN_F_MASQ.to_ne_bytes());
            attr(a, DEST_ATTR_WEIGHT, &dest.weight.to_ne_bytes());
            attr(a, DEST_ATTR_U_THRESH, &0u32.to_ne_bytes());
            attr(a, DEST_ATTR_L_THRESH, &0u32.to_ne_bytes());
        }
    });
}

/// The generic netlink body (header and attributes) of `op`.
pub fn encode(op: &Op) -> Vec<u8> {
    let (cmd, mut body) = (
        match op {
            Op::AddService(..) => CMD_NEW_SERVICE,
            Op::EditService(..) => CMD_SET_SERVICE,
            Op::DelService(..) => CMD_DEL_SERVICE,
            Op::AddDest(..) => CMD_NEW_DEST,
            Op::EditDest(..) => CMD_SET_DEST,
            Op::DelDest(..) => CMD_DEL_DEST,
        },
        Vec::new(),
    );
    body.extend_from_slice(&[cmd, IPVS_GENL_VERSION, 0, 0]);
    match op {
        Op::AddService(vs, s) | Op::EditService(vs, s) => service_attr(&mut body, vs, Some(s)),
        Op::DelService(vs) => service_attr(&mut body, vs, None),
        Op::AddDest(vs, d) | Op::EditDest(vs, d) => {
            service_attr(&mut body, vs, None);
            dest_attr(&mut body, d, true);
        }
        Op::DelDest(vs, d) => {
            service_attr(&mut body, vs, None);
            dest_attr(&mut body, d, false);
        }
    }
    body
}

/// A virtual service as the kernel lists it (fwmark services are not tug's and are skipped).
pub fn parse_service(body: &[u8]) -> Option<(VirtualServer, Scheduling)> {
    let (_, service) = attributes(body.get(4..)?)
        .into_iter()
        .find(|(k, _)| *k == CMD_ATTR_SERVICE)?;
    let (mut family, mut protocol, mut addr, mut port, mut sched, mut flags, mut timeout) =
        (0u16, None, None, None, String::new(), 0u32, 0u32);
    let u32_of = |v: &[u8]| {
        v.get(..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    for (kind, value) in attributes(service) {
        match kind {
            SVC_ATTR_AF => family = u16::from_ne_bytes([*value.first()?, *value.get(1)?]),
            SVC_ATTR_PROTOCOL => {
                protocol = protocol_of(u16::from_ne_bytes([*value.first()?, *value.get(1)?]));
            }
            SVC_ATTR_ADDR => addr = Some(value),
            SVC_ATTR_PORT => port = Some(u16::from_be_bytes([*value.first()?, *value.get(1)?])),
            SVC_ATTR_FWMARK if u32_of(value).unwrap_or(0) != 0 => return None,
            SVC_ATTR_SCHED_NAME => {
                sched = String::from_utf8_lossy(value)
                    .trim_end_matches('\0')
                    .to_owned();
            }
            SVC_ATTR_FLAGS => flags = u32_of(value).unwrap_or(0),
            SVC_ATTR_TIMEOUT => timeout = u32_of(value).unwrap_or(0),
            _ => {}
        }
    }
    Some((
        VirtualServer {
            protocol: protocol?,
            address: addr_of(family, addr?)?,
            port: port?,
        },
        Scheduling {
            scheduler: sched,
            persistence: (flags & SVC_F_PERSISTENT != 0).then_some(timeout),
        },
    ))
}

/// A destination as the kernel lists it.
pub fn parse_dest(body: &[u8], family: u16) -> Option<Destination> {
    parse_dest_connections(body, family).map(|(dest, _)| dest)
}

/// A destination as the kernel lists it, with its connections (active and inactive).
pub fn parse_dest_connections(body: &[u8], family: u16) -> Option<(Destination, u32)> {
    let (_, dest) = attributes(body.get(4..)?)
        .into_iter()
        .find(|(k, _)| *k == CMD_ATTR_DEST)?;
    let (mut family, mut addr, mut port, mut weight) = (family, None, None, 0u32);
    let mut connections = 0u32;
    let number = |value: &[u8]| -> Option<u32> {
        Some(u32::from_ne_bytes(value.get(..4)?.try_into().ok()?))
    };
    for (kind, value) in attributes(dest) {
        match kind {
            DEST_ATTR_ACTIVE_CONNS | DEST_ATTR_INACT_CONNS => {
                connections = connections.saturating_add(number(value)?);
            }
            DEST_ATTR_ADDR => addr = Some(value),
            DEST_ATTR_PORT => port = Some(u16::from_be_bytes([*value.first()?, *value.get(1)?])),
            DEST_ATTR_WEIGHT => {
                weight = u32::from_ne_bytes(value.get(..4)?.try_into().ok()?);
            }
            DEST_ATTR_ADDR_FAMILY => {
                family = u16::from_ne_bytes([*value.first()?, *value.get(1)?]);
            }
            _ => {}
        }
    }
    Some((
        Destination {
            address: addr_of(family, addr?)?,
            port: port?,
            weight,
        },
        connections,
    ))
}

/// An IPVS generic netlink socket in the calling thread's network namespace.
#[derive(Debug)]
pub struct Ipvs {
    connection: Connection,
    family: u16,
}

impl Ipvs {
    /// Opens the socket and resolves the IPVS family.
    pub fn open() -> Result<Ipvs, IpvsError> {
        let mut connection =
            Connection::open(SockProtocol::NetlinkGeneric).map_err(socket("open"))?;
        let mut body = vec![CTRL_CMD_GETFAMILY, 1, 0, 0];
        attr(&mut body, CTRL_ATTR_FAMILY_NAME, b"IPVS\0");
        let answers = match connection.request(GENL_ID_CTRL, 0, &body) {
            Ok(answers) => answers,
            Err(RequestError::Refused(nix::Error::ENOENT)) => return Err(IpvsError::Unavailable),
            Err(error) => return Err(socket("resolve the IPVS family")(error)),
        };
        let family = answers
            .iter()
            .find_map(|a| {
                attributes(a.get(4..)?)
                    .into_iter()
                    .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
                    .and_then(|(_, v)| Some(u16::from_ne_bytes([*v.first()?, *v.get(1)?])))
            })
            .ok_or(IpvsError::Unavailable)?;
        Ok(Ipvs { connection, family })
    }

    /// Every virtual service (by address and port) with its scheduling.
    pub fn services(&mut self) -> Result<Vec<(VirtualServer, Scheduling)>, IpvsError> {
        let body = [CMD_GET_SERVICE, IPVS_GENL_VERSION, 0, 0];
        let answers = self
            .connection
            .request(self.family, NLM_F_DUMP, &body)
            .map_err(socket("list virtual services"))?;
        Ok(answers.iter().filter_map(|a| parse_service(a)).collect())
    }

    /// The destinations of `vs`.
    pub fn destinations(&mut self, vs: &VirtualServer) -> Result<Vec<Destination>, IpvsError> {
        Ok(self
            .connections(vs)?
            .into_iter()
            .map(|(dest, _)| dest)
            .collect())
    }

    /// The destinations of `vs`, each with its number of connections (active and inactive).
    pub fn connections(
        &mut self,
        vs: &VirtualServer,
    ) -> Result<Vec<(Destination, u32)>, IpvsError> {
        let mut body = vec![CMD_GET_DEST, IPVS_GENL_VERSION, 0, 0];
        service_attr(&mut body, vs, None);
        let answers = self
            .connection
            .request(self.family, NLM_F_DUMP, &body)
            .map_err(socket("list destinations"))?;
        Ok(answers
            .iter()
            .filter_map(|a| parse_dest_connections(a, af(&vs.address)))
            .collect())
    }

    /// Applies `ops` in order, many to a datagram. Every op is attempted; the first refusal is
    /// returned (naming its op) after the rest were applied.
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), IpvsError> {
        let requests: Vec<(u16, u16, Vec<u8>)> =
            ops.iter().map(|op| (self.family, 0, encode(op))).collect();
        let codes = self
            .connection
            .batch(&requests)
            .map_err(socket("apply changes"))?;
        match ops.iter().zip(codes).find(|(_, code)| *code != 0) {
            Some((op, code)) => Err(IpvsError::Refused {
                op: op.to_string(),
                errno: nix::Error::from_raw(-code),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs() -> VirtualServer {
        VirtualServer {
            protocol: Protocol::Tcp,
            address: "10.96.0.10".parse().unwrap(),
            port: 53,
        }
    }

    /// The kernel's dump answer for a service carries the same attributes an add sends.
    #[test]
    fn a_service_round_trips_through_the_parser() {
        let scheduling = Scheduling {
            scheduler: "rr".into(),
            persistence: Some(10800),
        };
        let body = encode(&Op::AddService(vs(), scheduling.clone()));
        assert_eq!(body[..4], [CMD_NEW_SERVICE, 1, 0, 0]);
        assert_eq!(parse_service(&body), Some((vs(), scheduling)));
        let plain = Scheduling {
            scheduler: "lc".into(),
            persistence: None,
        };
        let v6 = VirtualServer {
            protocol: Protocol::Udp,
            address: "fd00:96::a".parse().unwrap(),
            port: 5353,
        };
        let body = encode(&Op::EditService(v6, plain.clone()));
        assert_eq!(body[0], CMD_SET_SERVICE);
        assert_eq!(parse_service(&body), Some((v6, plain)));
    }

    #[test]
    fn ports_are_big_endian_and_addresses_fill_nf_inet_addr() {
        let body = encode(&Op::DelService(vs()));
        let (_, service) = attributes(&body[4..])[0];
        let attrs = attributes(service);
        let get = |k| attrs.iter().find(|(kind, _)| *kind == k).unwrap().1;
        assert_eq!(get(SVC_ATTR_PORT), [0, 53]);
        assert_eq!(
            get(SVC_ATTR_ADDR),
            [10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert!(
            attrs.iter().all(|(k, _)| *k != SVC_ATTR_SCHED_NAME),
            "a delete names the service only"
        );
    }

    #[test]
    fn a_destination_round_trips_and_uses_nat() {
        let dest = Destination {
            address: "10.244.1.5".parse().unwrap(),
            port: 8053,
            weight: 1,
        };
        let body = encode(&Op::AddDest(vs(), dest));
        assert_eq!(body[0], CMD_NEW_DEST);
        assert_eq!(parse_dest(&body, AF_INET), Some(dest));
        let (_, inner) = attributes(&body[4..])
            .into_iter()
            .find(|(k, _)| *k == CMD_ATTR_DEST)
            .unwrap();
        let fwd = attributes(inner)
            .into_iter()
            .find(|(k, _)| *k == DEST_ATTR_FWD_METHOD)
            .unwrap()
            .1;
        assert_eq!(fwd, CONN_F_MASQ.to_ne_bytes());
    }
}
