//! The kernel side of an attachment, behind a narrow trait: [`Netlink`] programs it for real over
//! rtnetlink; tests of the command logic use a recording fake.
//!
//! Layout (ptp style): a veth pair, `tug<11 hex>` on the host and `CNI_IFNAME` in the pod. The pod
//! has its IP as a /32 and a default route `via 169.254.1.1 onlink`, with a permanent neighbour
//! entry resolving 169.254.1.1 to the host veth's MAC — so the host side needs no address, and
//! traffic from the node to its pods keeps the node's own source address. The host has a /32
//! route to the pod through the host veth.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteScope};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    AddressMessageBuilder, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use sha2::{Digest, Sha256};

use crate::netlink::{Answer, Rtnl, is_not_found_errno};
use crate::netns;
use crate::spec::{CniError, GATEWAY, GATEWAY6, Interface, code};

/// What to set up for one attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach<'a> {
    /// Container ID.
    pub container_id: &'a str,
    /// Interface name inside the pod.
    pub ifname: &'a str,
    /// Path of the pod's network namespace.
    pub netns: &'a str,
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, when the node is dual-stack.
    pub ip6: Option<Ipv6Addr>,
    /// MTU of both ends.
    pub mtu: u32,
}

/// The kernel operations an attachment needs.
pub trait Dataplane {
    /// Creates the veth pair, addresses, routes and neighbour entry; returns (host, pod)
    /// interfaces. Replaces a leftover host veth of the same attachment.
    fn setup(&self, attach: &Attach<'_>) -> Result<[Interface; 2], CniError>;
    /// Removes the host veth (and with it the pod end). Gone already is fine.
    fn teardown(&self, container_id: &str, ifname: &str) -> Result<(), CniError>;
    /// Verifies what `setup` made; the error says what differs.
    fn check(&self, attach: &Attach<'_>) -> Result<(), CniError>;
    /// Host veth names tug-cni created.
    fn host_veths(&self) -> Result<Vec<String>, CniError>;
    /// Deletes a host veth by name. Gone already is fine.
    fn delete_host_veth(&self, name: &str) -> Result<(), CniError>;
}

/// A dataplane in memory, for tests and fuzzing: it keeps host veths by name, as the kernel
/// would; `fail_setup` makes setup fail after recording its veth, as a half-done setup would.
#[derive(Debug, Default)]
pub struct Memory {
    /// The host veths, by name.
    pub veths: std::cell::RefCell<Vec<String>>,
    /// Fail every setup.
    pub fail_setup: bool,
}

impl Dataplane for Memory {
    fn setup(&self, attach: &Attach<'_>) -> Result<[Interface; 2], CniError> {
        let host = host_veth_name(attach.container_id, attach.ifname);
        let mut veths = self.veths.borrow_mut();
        veths.retain(|v| *v != host);
        veths.push(host);
        if self.fail_setup {
            return Err(CniError::new(
                code::IO,
                "netlink request failed",
                "injected",
            ));
        }
        Ok([
            Interface {
                name: host_veth_name(attach.container_id, attach.ifname),
                mac: "02:00:00:00:00:01".into(),
                sandbox: None,
            },
            Interface {
                name: attach.ifname.into(),
                mac: "02:00:00:00:00:02".into(),
                sandbox: Some(attach.netns.into()),
            },
        ])
    }
    fn teardown(&self, container_id: &str, ifname: &str) -> Result<(), CniError> {
        self.delete_host_veth(&host_veth_name(container_id, ifname))
    }
    fn check(&self, attach: &Attach<'_>) -> Result<(), CniError> {
        if self
            .veths
            .borrow()
            .contains(&host_veth_name(attach.container_id, attach.ifname))
        {
            Ok(())
        } else {
            Err(CniError::new(code::CHECK_FAILED, "missing", "veth"))
        }
    }
    fn host_veths(&self) -> Result<Vec<String>, CniError> {
        Ok(self.veths.borrow().clone())
    }
    fn delete_host_veth(&self, name: &str) -> Result<(), CniError> {
        self.veths.borrow_mut().retain(|v| v != name);
        Ok(())
    }
}

/// The host-side veth name of an attachment: `tug` and 11 hex digits of a hash of the container
/// ID and interface name, so every later command finds it again.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}"));
    format!("tug{}", &hex::encode(digest)[..11])
}

/// The host veth's MAC: locally administered, unicast, derived from the attachment. Given at
/// creation, the kernel marks it set (`addr_assign_type` 3) rather than random, so udev's
/// `MACAddressPolicy=persistent` (systemd's default `99-default.link`) leaves it alone: a MAC
/// udev rewrote after the pod's permanent neighbour entry for its gateway was written would
/// black-hole every packet the pod sends off its own address.
pub fn host_veth_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let digest = Sha256::digest(format!("mac/{container_id}/{ifname}"));
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Whether a link name is one of tug-cni's host veths.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("tug")
        && name[3..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn socket_error(e: std::io::Error) -> CniError {
    CniError::new(code::IO, "netlink socket failed", format!("rtnetlink: {e}"))
}

fn refused(what: impl std::fmt::Display) -> impl FnOnce(Errno) -> CniError {
    move |errno| {
        CniError::new(
            code::IO,
            "netlink request failed",
            format!("{what}: {errno}"),
        )
    }
}

fn netns_error(e: netns::NetnsError) -> CniError {
    match e {
        netns::NetnsError::Open { .. } => CniError::new(
            code::UNKNOWN_CONTAINER,
            "container network namespace unknown",
            e.to_string(),
        ),
        netns::NetnsError::Enter { .. } => CniError::new(
            code::IO,
            "cannot enter the container network namespace",
            e.to_string(),
        ),
    }
}

fn host_socket() -> Result<Rtnl, CniError> {
    Rtnl::open().map_err(socket_error)
}

fn pod_socket(netns: &str) -> Result<Rtnl, CniError> {
    Rtnl::open_in(Path::new(netns))
        .map_err(netns_error)?
        .map_err(socket_error)
}

/// A link message that names `name` (and no index): GET, SET and DEL accept it.
fn named(name: &str) -> LinkMessage {
    LinkUnspec::new_with_name(name).build()
}

fn up(name: &str) -> RouteNetlinkMessage {
    RouteNetlinkMessage::SetLink(LinkUnspec::new_with_name(name).up().build())
}

/// The link a GET answered with.
fn link_of(messages: Vec<RouteNetlinkMessage>) -> Option<LinkMessage> {
    messages.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(link) => Some(link),
        _ => None,
    })
}

/// The link called `name`, or `None` when there is none.
fn link_by_name(rtnl: &mut Rtnl, name: &str) -> Result<Option<LinkMessage>, CniError> {
    let [answer] = answers(rtnl, vec![(RouteNetlinkMessage::GetLink(named(name)), 0)])?;
    match answer {
        Ok(messages) => Ok(link_of(messages)),
        Err(errno) if is_not_found_errno(errno) => Ok(None),
        Err(errno) => Err(refused(format!("get link {name}"))(errno)),
    }
}

/// Sends `requests` together and returns their answers as an array of the expected size.
fn answers<const N: usize>(
    rtnl: &mut Rtnl,
    requests: Vec<(RouteNetlinkMessage, u16)>,
) -> Result<[Answer; N], CniError> {
    let answers = rtnl.request(requests).map_err(socket_error)?;
    let count = answers.len();
    answers.try_into().map_err(|_| {
        CniError::new(
            code::IO,
            "netlink request failed",
            format!("expected {N} answers, got {count}"),
        )
    })
}

/// One change to send: the message, its `NLM_F_*` flags, and what it does (for errors).
type Change = (RouteNetlinkMessage, u16, String);

/// Sends `changes` together; fails with the first one the kernel refused, named.
fn apply(rtnl: &mut Rtnl, changes: Vec<Change>) -> Result<(), CniError> {
    let (requests, what): (Vec<_>, Vec<_>) = changes
        .into_iter()
        .map(|(message, flags, what)| ((message, flags), what))
        .unzip();
    let answers = rtnl.request(requests).map_err(socket_error)?;
    for (answer, what) in answers.into_iter().zip(what) {
        answer.map_err(refused(what))?;
    }
    Ok(())
}

/// An answer where the object being gone already is fine (a deletion, `lo` in a namespace
/// without one).
fn gone_is_fine(answer: Answer, what: impl std::fmt::Display) -> Result<(), CniError> {
    match answer {
        Err(errno) if !is_not_found_errno(errno) => Err(refused(what)(errno)),
        _ => Ok(()),
    }
}

fn dump(
    rtnl: &mut Rtnl,
    message: RouteNetlinkMessage,
    what: &str,
) -> Result<Vec<RouteNetlinkMessage>, CniError> {
    rtnl.dump(message)
        .map_err(socket_error)?
        .map_err(refused(format!("list {what}")))
}

fn mac(link: &LinkMessage) -> Vec<u8> {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The real dataplane: blocking rtnetlink sockets in the host namespace and in the pod's, each
/// step's requests sent together in one datagram.
#[derive(Debug, Default)]
pub struct Netlink;

impl Dataplane for Netlink {
    fn setup(&self, attach: &Attach<'_>) -> Result<[Interface; 2], CniError> {
        let netns_file = std::fs::File::open(attach.netns).map_err(|e| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                "container network namespace unknown",
                format!("open netns {}: {e}", attach.netns),
            )
        })?;
        std::thread::scope(|scope| {
            // The pod's socket opens on its own thread while the host side is set up.
            let pod = netns::spawn_in(scope, Path::new(attach.netns), Rtnl::open);
            let (host_name, host_mac) = setup_host(attach, &netns_file)?;
            let mut pod = netns::join(pod)
                .map_err(netns_error)?
                .map_err(socket_error)?;
            let pod_mac = setup_pod(&mut pod, attach, &host_mac)?;
            Ok([
                Interface {
                    name: host_name,
                    mac: mac_text(&host_mac),
                    sandbox: None,
                },
                Interface {
                    name: attach.ifname.to_owned(),
                    mac: mac_text(&pod_mac),
                    sandbox: Some(attach.netns.to_owned()),
                },
            ])
        })
    }
    fn teardown(&self, container_id: &str, ifname: &str) -> Result<(), CniError> {
        self.delete_host_veth(&host_veth_name(container_id, ifname))
    }

    fn check(&self, attach: &Attach<'_>) -> Result<(), CniError> {
        let failed = |what: String| {
            CniError::new(
                code::CHECK_FAILED,
                "the attachment is not as ADD left it",
                what,
            )
        };
        let host_name = host_veth_name(attach.container_id, attach.ifname);
        let mut host = host_socket()?;
        let host_index = link_by_name(&mut host, &host_name)?
            .map(|l| l.header.index)
            .ok_or_else(|| failed(format!("host veth {host_name} is missing")))?;
        let routes = dump(
            &mut host,
            RouteNetlinkMessage::GetRoute(RouteMessageBuilder::<Ipv4Addr>::new().build()),
            "routes",
        )?;
        let routed = routes.iter().any(|m| {
            matches!(m, RouteNetlinkMessage::NewRoute(r)
                if r.header.destination_prefix_length == 32
                    && r.attributes.contains(&RouteAttribute::Destination(RouteAddress::Inet(attach.ip)))
                    && r.attributes.contains(&RouteAttribute::Oif(host_index)))
        });
        if !routed {
            return Err(failed(format!(
                "the host has no route {}/32 dev {host_name}",
                attach.ip
            )));
        }
        let mut pod = pod_socket(attach.netns)?;
        let index = link_by_name(&mut pod, attach.ifname)?
            .map(|l| l.header.index)
            .ok_or_else(|| {
                failed(format!(
                    "{} is missing in netns {}",
                    attach.ifname, attach.netns
                ))
            })?;
        let addresses = dump(
            &mut pod,
            RouteNetlinkMessage::GetAddress(AddressMessageBuilder::<Ipv4Addr>::new().build()),
            "addresses",
        )?;
        let has_ip = addresses.iter().any(|m| {
            matches!(m, RouteNetlinkMessage::NewAddress(a)
                if a.header.index == index
                    && a.attributes.contains(&AddressAttribute::Address(IpAddr::V4(attach.ip))))
        });
        if !has_ip {
            return Err(failed(format!(
                "{} has no address {}",
                attach.ifname, attach.ip
            )));
        }
        let routes = dump(
            &mut pod,
            RouteNetlinkMessage::GetRoute(RouteMessageBuilder::<Ipv4Addr>::new().build()),
            "routes",
        )?;
        let default = routes.iter().any(|m| {
            matches!(m, RouteNetlinkMessage::NewRoute(r)
                if r.header.destination_prefix_length == 0
                    && r.attributes.contains(&RouteAttribute::Gateway(RouteAddress::Inet(GATEWAY))))
        });
        if !default {
            return Err(failed(format!(
                "netns {} has no default route via {GATEWAY}",
                attach.netns
            )));
        }
        Ok(())
    }

    fn host_veths(&self) -> Result<Vec<String>, CniError> {
        let links = dump(
            &mut host_socket()?,
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "links",
        )?;
        Ok(links
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .filter(|n| is_host_veth_name(n))
            .collect())
    }

    fn delete_host_veth(&self, name: &str) -> Result<(), CniError> {
        let [answer] = answers(
            &mut host_socket()?,
            vec![(RouteNetlinkMessage::DelLink(named(name)), 0)],
        )?;
        gone_is_fine(answer, format!("delete {name}"))
    }
}

/// The host end: the veth pair (the pod end created inside the pod's namespace), the host end up, and the host routes to the pod. Returns the host veth's name and MAC.
fn setup_host(attach: &Attach<'_>, netns_file: &File) -> Result<(String, Vec<u8>), CniError> {
    let host_name = host_veth_name(attach.container_id, attach.ifname);
    let mut host = host_socket()?;
    // The pod end is created directly inside the pod's namespace: moving a device between
    // namespaces afterwards waits for an RCU grace period (tens of milliseconds).
    // One queue each way per end: veth hands packets straight to its peer, so more queues only
    // add sysfs entries for the kernel to create (one set per CPU by default).
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(attach.ifname.to_owned())
        .mtu(attach.mtu)
        .setns_by_fd(netns_file.as_raw_fd())
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
        .build();
    let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.clone())
        .address(host_veth_mac(attach.container_id, attach.ifname).to_vec())
        .mtu(attach.mtu)
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    let [leftover, created, host_link] = answers(
        &mut host,
        vec![
            (RouteNetlinkMessage::DelLink(named(&host_name)), 0),
            (
                RouteNetlinkMessage::NewLink(veth),
                NLM_F_CREATE | NLM_F_EXCL,
            ),
            (RouteNetlinkMessage::GetLink(named(&host_name)), 0),
        ],
    )?;
    gone_is_fine(leftover, format!("delete leftover link {host_name}"))?;
    created.map_err(|errno| match errno {
        Errno::EEXIST => CniError::new(
            code::IO,
            "interface already exists",
            format!("{} already exists in netns {}", attach.ifname, attach.netns),
        ),
        _ => refused(format!(
            "create veth pair {host_name} / {} in {}",
            attach.ifname, attach.netns
        ))(errno),
    })?;
    let host_link = host_link
        .map_err(refused(format!("get link {host_name}")))
        .map(link_of)?
        .ok_or_else(|| CniError::new(code::IO, "host veth vanished", host_name.clone()))?;
    if attach.ip6.is_some() {
        // The host veth's link-local address would sit in duplicate address detection for a
        // second, holding up neighbour discovery towards the pod. DAD starts when the host end
        // comes up, just below.
        let dad = format!("/proc/sys/net/ipv6/conf/{host_name}/accept_dad");
        std::fs::write(&dad, "0").map_err(|e| {
            CniError::new(
                code::IO,
                "cannot configure the host veth",
                format!("write 0 to {dad}: {e}"),
            )
        })?;
    }
    let host_index = host_link.header.index;
    let mut changes = vec![
        (up(&host_name), 0, format!("set {host_name} up")),
        (
            RouteNetlinkMessage::NewRoute(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(attach.ip, 32)
                    .output_interface(host_index)
                    .scope(RouteScope::Link)
                    .build(),
            ),
            NLM_F_CREATE | NLM_F_REPLACE,
            format!("add route {}/32 dev {host_name}", attach.ip),
        ),
    ];
    if let Some(ip6) = attach.ip6 {
        changes.push((
            RouteNetlinkMessage::NewRoute(
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(ip6, 128)
                    .output_interface(host_index)
                    .build(),
            ),
            NLM_F_CREATE | NLM_F_REPLACE,
            format!("add route {ip6}/128 dev {host_name}"),
        ));
    }
    apply(&mut host, changes)?;
    Ok((host_name, mac(&host_link)))
}

/// The pod end, over a socket in the pod's namespace: it and `lo` up, the pod's addresses, the
/// permanent neighbour entry for the gateway (the host veth's MAC) and the default routes.
/// Returns the pod interface's MAC.
fn setup_pod(pod: &mut Rtnl, attach: &Attach<'_>, host_mac: &[u8]) -> Result<Vec<u8>, CniError> {
    // (A veth end cannot be created up: it has no peer yet at that moment.)
    let [lo_up, pod_up, pod_link] = answers(
        pod,
        vec![
            (up("lo"), 0),
            (up(attach.ifname), 0),
            (RouteNetlinkMessage::GetLink(named(attach.ifname)), 0),
        ],
    )?;
    gone_is_fine(lo_up, "set lo up")?;
    pod_up.map_err(refused(format!("set {} up", attach.ifname)))?;
    let pod_link = pod_link
        .map_err(refused(format!("get link {}", attach.ifname)))
        .map(link_of)?
        .ok_or_else(|| {
            CniError::new(
                code::IO,
                "pod interface missing",
                format!("{} is not in netns {}", attach.ifname, attach.netns),
            )
        })?;
    let index = pod_link.header.index;
    let host_mac_text = mac_text(host_mac);
    let mut changes = vec![
        (
            RouteNetlinkMessage::NewAddress(
                AddressMessageBuilder::<Ipv4Addr>::new()
                    .index(index)
                    .address(attach.ip, 32)
                    .build(),
            ),
            NLM_F_CREATE | NLM_F_EXCL,
            format!("add {}/32 to {}", attach.ip, attach.ifname),
        ),
        (
            RouteNetlinkMessage::NewNeighbour(permanent_neighbour(
                index,
                IpAddr::V4(GATEWAY),
                host_mac,
            )),
            NLM_F_CREATE | NLM_F_REPLACE,
            format!(
                "add neighbour {GATEWAY} lladdr {host_mac_text} dev {}",
                attach.ifname
            ),
        ),
        (
            RouteNetlinkMessage::NewRoute(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(GATEWAY)
                    .output_interface(index)
                    .onlink()
                    .build(),
            ),
            NLM_F_CREATE | NLM_F_REPLACE,
            format!("add default route via {GATEWAY} dev {}", attach.ifname),
        ),
    ];
    if let Some(ip6) = attach.ip6 {
        // No duplicate address detection: the address is ours alone, and DAD would hold it
        // tentative (unusable) for a second.
        let mut address = AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(ip6, 128)
            .build();
        address
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        changes.extend([
            (
                RouteNetlinkMessage::NewAddress(address),
                NLM_F_CREATE | NLM_F_EXCL,
                format!("add {ip6}/128 to {}", attach.ifname),
            ),
            (
                RouteNetlinkMessage::NewNeighbour(permanent_neighbour(
                    index,
                    IpAddr::V6(GATEWAY6),
                    host_mac,
                )),
                NLM_F_CREATE | NLM_F_REPLACE,
                format!(
                    "add neighbour {GATEWAY6} lladdr {host_mac_text} dev {}",
                    attach.ifname
                ),
            ),
            (
                RouteNetlinkMessage::NewRoute(
                    RouteMessageBuilder::<Ipv6Addr>::new()
                        .gateway(GATEWAY6)
                        .output_interface(index)
                        .build(),
                ),
                NLM_F_CREATE | NLM_F_REPLACE,
                format!("add default route via {GATEWAY6} dev {}", attach.ifname),
            ),
        ]);
    }
    apply(pod, changes)?;
    Ok(mac(&pod_link))
}

/// A permanent neighbour entry: `ip` is at `mac` on link `index`.
fn permanent_neighbour(index: u32, ip: IpAddr, mac: &[u8]) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.ifindex = index;
    message.header.state = NeighbourState::Permanent;
    message.attributes.extend([
        NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }),
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
    ]);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_macs_are_unicast_locally_administered_and_per_attachment() {
        let mac = host_veth_mac("abc123", "eth0");
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
        assert_eq!(mac, host_veth_mac("abc123", "eth0"));
        assert_ne!(mac, host_veth_mac("abc124", "eth0"));
        assert_ne!(mac, host_veth_mac("abc123", "eth1"));
    }

    #[test]
    fn host_veth_names_are_stable_short_and_recognisable() {
        let name = host_veth_name("abc123", "eth0");
        assert_eq!(name, host_veth_name("abc123", "eth0"));
        assert_ne!(name, host_veth_name("abc123", "eth1"));
        assert_eq!(name.len(), 14, "within IFNAMSIZ");
        assert!(is_host_veth_name(&name));
        assert!(!is_host_veth_name("tug-vxlan"));
        assert!(!is_host_veth_name("eth0"));
    }
}
