//! The VIP device of IPVS mode: a dummy interface (`kube-ipvs0`, as upstream names it) that
//! holds every Service address, so the kernel takes packets to them as local and IPVS can pick
//! them up. It stays down, so its addresses are never chosen as a source or announced by ARP.
//! Spoken over rtnetlink.

use std::net::IpAddr;

use nix::sys::socket::SockProtocol;

use crate::nfnetlink::{Connection, NLA_F_NESTED, NLM_F_DUMP, RequestError, attr, attributes};

/// The device's name.
pub const DEVICE: &str = "kube-ipvs0";

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Why a device operation failed. Retryable.
#[derive(Debug, thiserror::Error)]
#[error("{DEVICE}: {what}: {error}")]
pub struct DeviceError {
    what: String,
    error: RequestError,
}

fn failed(what: impl Into<String>) -> impl FnOnce(RequestError) -> DeviceError {
    let what = what.into();
    move |error| DeviceError { what, error }
}

fn ifinfomsg(index: i32) -> Vec<u8> {
    let mut out = vec![0u8; 16];
    out[4..8].copy_from_slice(&index.to_ne_bytes());
    out
}

fn ifaddrmsg(ip: &IpAddr, index: u32) -> Vec<u8> {
    let (family, prefix, flags) = match ip {
        IpAddr::V4(_) => (AF_INET, 32, 0),
        IpAddr::V6(_) => (AF_INET6, 128, IFA_F_NODAD),
    };
    let mut out = vec![family, prefix, flags, 0];
    out.extend_from_slice(&index.to_ne_bytes());
    out
}

fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The VIP device in the calling thread's network namespace.
#[derive(Debug)]
pub struct VipDevice {
    connection: Connection,
    index: u32,
}

impl VipDevice {
    /// Finds the device, creating it when it is missing.
    pub fn ensure() -> Result<VipDevice, DeviceError> {
        let mut connection =
            Connection::open(SockProtocol::NetlinkRoute).map_err(failed("open rtnetlink"))?;
        if let Ok(index) = nix::net::if_::if_nametoindex(DEVICE) {
            return Ok(VipDevice { connection, index });
        }
        let mut body = ifinfomsg(0);
        attr(&mut body, IFLA_IFNAME, format!("{DEVICE}\0").as_bytes());
        let mut info = Vec::new();
        attr(&mut info, IFLA_INFO_KIND, b"dummy\0");
        attr(&mut body, IFLA_LINKINFO | NLA_F_NESTED, &info);
        match connection.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &body) {
            Ok(_) | Err(RequestError::Refused(nix::Error::EEXIST)) => {}
            Err(error) => return Err(failed("create the dummy device")(error)),
        }
        let index = nix::net::if_::if_nametoindex(DEVICE).map_err(|errno| DeviceError {
            what: "find the device just created".into(),
            error: RequestError::Refused(errno),
        })?;
        Ok(VipDevice { connection, index })
    }

    /// The addresses on the device.
    pub fn addresses(&mut self) -> Result<Vec<IpAddr>, DeviceError> {
        let index = self.index;
        self.addresses_of(index)
    }

    /// The addresses on every other interface (the node's own), asked for one interface at a
    /// time so that the kernel never lists the device's thousands of Service addresses.
    pub fn other_addresses(&mut self) -> Result<Vec<IpAddr>, DeviceError> {
        self.connection
            .strict_dumps()
            .map_err(failed("ask for strict dumps"))?;
        let links = nix::net::if_::if_nameindex().map_err(|errno| DeviceError {
            what: "list interfaces".into(),
            error: RequestError::Refused(errno),
        })?;
        let own = self.index;
        let others: Vec<u32> = links
            .iter()
            .map(|l| l.index())
            .filter(|i| *i != own)
            .collect();
        let mut out = Vec::new();
        for index in others {
            out.extend(self.addresses_of(index)?);
        }
        Ok(out)
    }

    /// The addresses on interface `wanted` (filtered by the kernel once dumps are strict).
    fn addresses_of(&mut self, wanted: u32) -> Result<Vec<IpAddr>, DeviceError> {
        let mut request = vec![0u8; 4];
        request.extend_from_slice(&wanted.to_ne_bytes());
        let answers = self
            .connection
            .request(RTM_GETADDR, NLM_F_DUMP, &request)
            .map_err(failed("list addresses"))?;
        Ok(answers
            .iter()
            .filter_map(|body| {
                let header = body.get(..8)?;
                let index = u32::from_ne_bytes(header[4..8].try_into().ok()?);
                if index != wanted {
                    return None;
                }
                let attrs = attributes(body.get(8..)?);
                let (_, value) = attrs
                    .iter()
                    .find(|(k, _)| *k == IFA_LOCAL)
                    .or_else(|| attrs.iter().find(|(k, _)| *k == IFA_ADDRESS))?;
                match value.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(*value).ok()?)),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(*value).ok()?)),
                    _ => None,
                }
            })
            .collect())
    }

    /// Adds `add` and removes `remove`; the first failure names its address.
    pub fn change(&mut self, add: &[IpAddr], remove: &[IpAddr]) -> Result<(), DeviceError> {
        let request = |kind: u16, flags: u16, ip: &IpAddr| {
            let mut body = ifaddrmsg(ip, self.index);
            attr(&mut body, IFA_LOCAL, &octets(ip));
            attr(&mut body, IFA_ADDRESS, &octets(ip));
            (kind, flags, body)
        };
        let requests: Vec<(u16, u16, Vec<u8>)> = add
            .iter()
            .map(|ip| request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, ip))
            .chain(remove.iter().map(|ip| request(RTM_DELADDR, 0, ip)))
            .collect();
        let codes = self
            .connection
            .batch(&requests)
            .map_err(failed("change addresses"))?;
        let everything = add
            .iter()
            .map(|ip| ("add", ip))
            .chain(remove.iter().map(|ip| ("remove", ip)));
        for ((verb, ip), code) in everything.zip(codes) {
            let errno = nix::Error::from_raw(-code);
            // Removing what is already gone is fine.
            if code != 0 && !(verb == "remove" && errno == nix::Error::EADDRNOTAVAIL) {
                return Err(DeviceError {
                    what: format!("{verb} address {ip}"),
                    error: RequestError::Refused(errno),
                });
            }
        }
        Ok(())
    }

    /// Deletes the device (and with it every address on it). Already gone is fine.
    pub fn remove() -> Result<(), DeviceError> {
        let Ok(index) = nix::net::if_::if_nametoindex(DEVICE) else {
            return Ok(());
        };
        let mut connection =
            Connection::open(SockProtocol::NetlinkRoute).map_err(failed("open rtnetlink"))?;
        match connection.request(RTM_DELLINK, 0, &ifinfomsg(index as i32)) {
            Ok(_) | Err(RequestError::Refused(nix::Error::ENODEV)) => Ok(()),
            Err(error) => Err(failed("delete the device")(error)),
        }
    }
}
