//! The kernel side of an attachment, behind a narrow trait: [`Netlink`] programs it for real over
//! rtnetlink; tests of the command logic use a recording fake.
//!
//! Layout (ptp style): a veth pair, `tug<11 hex>` on the host and `CNI_IFNAME` in the pod. The pod
//! has its IP as a /32 and a default route `via 169.254.1.1 onlink`, with a permanent neighbour
//! entry resolving 169.254.1.1 to the host veth's MAC — so the host side needs no address, and
//! traffic from the node to its pods keeps the node's own source address. The host has a /32
//! route to the pod through the host veth.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest, Sha256};

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

/// The host-side veth name of an attachment: `tug` and 11 hex digits of a hash of the container
/// ID and interface name, so every later command finds it again.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}"));
    format!("tug{}", &hex::encode(digest)[..11])
}

/// Whether a link name is one of tug-cni's host veths.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("tug")
        && name[3..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn netlink_error(what: String) -> impl FnOnce(rtnetlink::Error) -> CniError {
    move |e| CniError::new(code::IO, "netlink request failed", format!("{what}: {e}"))
}

use crate::netlink::is_not_found;

fn connect() -> Result<Handle, CniError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| {
        CniError::new(
            code::IO,
            "netlink socket failed",
            format!("open rtnetlink socket: {e}"),
        )
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    crate::netlink::link_by_name(handle, name)
        .await
        .map_err(netlink_error(format!("get link {name}")))
}

fn mac_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

fn mac_bytes(link: &LinkMessage) -> Vec<u8> {
    link.attributes
        .iter()
        .find_map(|a| {
            if let LinkAttribute::Address(mac) = a {
                Some(mac.clone())
            } else {
                None
            }
        })
        .unwrap_or_default()
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

/// The real dataplane: rtnetlink in the host namespace and, on a dedicated thread, in the pod's.
#[derive(Debug, Default)]
pub struct Netlink;

impl Netlink {
    fn on_host<T: Send>(
        &self,
        work: impl AsyncFnOnce(&Handle) -> Result<T, CniError> + Send,
    ) -> Result<T, CniError> {
        netns::run_in(Path::new("/proc/self/ns/net"), || async {
            let handle = connect()?;
            work(&handle).await
        })
        .map_err(netns_error)?
    }
}

impl Dataplane for Netlink {
    fn setup(&self, attach: &Attach<'_>) -> Result<[Interface; 2], CniError> {
        let host_name = host_veth_name(attach.container_id, attach.ifname);
        let netns_file = std::fs::File::open(attach.netns).map_err(|e| {
            CniError::new(
                code::UNKNOWN_CONTAINER,
                "container network namespace unknown",
                format!("open netns {}: {e}", attach.netns),
            )
        })?;
        // The pod end is created directly inside the pod's namespace: moving a device between
        // namespaces afterwards waits for an RCU grace period (tens of milliseconds).
        let (host_mac, host_mac_bytes) = self.on_host(async |handle| {
            if let Some(link) = link_by_name(handle, &host_name).await? {
                handle
                    .link()
                    .del(link.header.index)
                    .execute()
                    .await
                    .map_err(netlink_error(format!("delete leftover link {host_name}")))?;
            }
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(attach.ifname.to_owned())
                .mtu(attach.mtu)
                .setns_by_fd(netns_file.as_raw_fd())
                .build();
            let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(host_name.clone())
                .mtu(attach.mtu)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            handle
                .link()
                .add(veth)
                .execute()
                .await
                .map_err(|e| match &e {
                    rtnetlink::Error::NetlinkError(m) if -m.raw_code() == nix::libc::EEXIST => {
                        CniError::new(
                            code::IO,
                            "interface already exists",
                            format!("{} already exists in netns {}", attach.ifname, attach.netns),
                        )
                    }
                    _ => netlink_error(format!(
                        "create veth pair {host_name} / {} in {}",
                        attach.ifname, attach.netns
                    ))(e),
                })?;
            let host = link_by_name(handle, &host_name)
                .await?
                .ok_or_else(|| CniError::new(code::IO, "host veth vanished", host_name.clone()))?;
            if attach.ip6.is_some() {
                // The host veth's link-local address would sit in duplicate address detection
                // for a second, holding up neighbour discovery towards the pod.
                let dad = format!("/proc/sys/net/ipv6/conf/{host_name}/accept_dad");
                std::fs::write(&dad, "0").map_err(|e| {
                    CniError::new(
                        code::IO,
                        "cannot configure the host veth",
                        format!("write 0 to {dad}: {e}"),
                    )
                })?;
            }
            handle
                .link()
                .set(LinkUnspec::new_with_index(host.header.index).up().build())
                .execute()
                .await
                .map_err(netlink_error(format!("set {host_name} up")))?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(attach.ip, 32)
                .output_interface(host.header.index)
                .scope(RouteScope::Link)
                .build();
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "add route {}/32 dev {host_name}",
                    attach.ip
                )))?;
            if let Some(ip6) = attach.ip6 {
                let route = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(ip6, 128)
                    .output_interface(host.header.index)
                    .build();
                handle
                    .route()
                    .add(route)
                    .replace()
                    .execute()
                    .await
                    .map_err(netlink_error(format!(
                        "add route {ip6}/128 dev {host_name}"
                    )))?;
            }
            Ok((mac_of(&host), mac_bytes(&host)))
        })?;
        let pod_mac = netns::run_in(Path::new(attach.netns), || async {
            let handle = connect()?;
            let pod = link_by_name(&handle, attach.ifname).await?.ok_or_else(|| {
                CniError::new(
                    code::IO,
                    "pod interface missing",
                    format!("{} is not in netns {}", attach.ifname, attach.netns),
                )
            })?;
            let index = pod.header.index;
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(netlink_error(format!("set {} up", attach.ifname)))?;
            if let Some(lo) = link_by_name(&handle, "lo").await? {
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(lo.header.index).up().build())
                    .execute()
                    .await
                    .map_err(netlink_error("set lo up".into()))?;
            }
            handle
                .address()
                .add(index, IpAddr::V4(attach.ip), 32)
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "add {}/32 to {}",
                    attach.ip, attach.ifname
                )))?;
            handle
                .neighbours()
                .add(index, IpAddr::V4(GATEWAY))
                .link_layer_address(&host_mac_bytes)
                .replace()
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "add neighbour {GATEWAY} lladdr {host_mac} dev {}",
                    attach.ifname
                )))?;
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(GATEWAY)
                .output_interface(index)
                .onlink()
                .build();
            handle
                .route()
                .add(default)
                .replace()
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "add default route via {GATEWAY} dev {}",
                    attach.ifname
                )))?;
            if let Some(ip6) = attach.ip6 {
                // No duplicate address detection: the address is ours alone, and DAD would hold
                // it tentative (unusable) for a second.
                let mut add = handle.address().add(index, IpAddr::V6(ip6), 128);
                add.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
                add.execute()
                    .await
                    .map_err(netlink_error(format!("add {ip6}/128 to {}", attach.ifname)))?;
                handle
                    .neighbours()
                    .add(index, IpAddr::V6(GATEWAY6))
                    .link_layer_address(&host_mac_bytes)
                    .replace()
                    .execute()
                    .await
                    .map_err(netlink_error(format!(
                        "add neighbour {GATEWAY6} lladdr {host_mac} dev {}",
                        attach.ifname
                    )))?;
                let default6 = RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(GATEWAY6)
                    .output_interface(index)
                    .build();
                handle
                    .route()
                    .add(default6)
                    .replace()
                    .execute()
                    .await
                    .map_err(netlink_error(format!(
                        "add default route via {GATEWAY6} dev {}",
                        attach.ifname
                    )))?;
            }
            Ok(mac_of(&pod))
        })
        .map_err(netns_error)??;
        Ok([
            Interface {
                name: host_name,
                mac: host_mac,
                sandbox: None,
            },
            Interface {
                name: attach.ifname.to_owned(),
                mac: pod_mac,
                sandbox: Some(attach.netns.to_owned()),
            },
        ])
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
        let host_index = self.on_host(async |handle| {
            Ok(link_by_name(handle, &host_name)
                .await?
                .map(|l| l.header.index))
        })?;
        let host_index =
            host_index.ok_or_else(|| failed(format!("host veth {host_name} is missing")))?;
        let routed = self.on_host(async |handle| {
            let routes: Vec<_> = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute().try_collect().await.map_err(netlink_error("list routes".into()))?;
            Ok(routes.iter().any(|r| {
                r.header.destination_prefix_length == 32
                    && r.attributes.iter().any(|a| matches!(a, rtnetlink::packet_route::route::RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet(d)) if *d == attach.ip))
                    && r.attributes.iter().any(|a| matches!(a, rtnetlink::packet_route::route::RouteAttribute::Oif(i) if *i == host_index))
            }))
        })?;
        if !routed {
            return Err(failed(format!(
                "the host has no route {}/32 dev {host_name}",
                attach.ip
            )));
        }
        netns::run_in(Path::new(attach.netns), || async {
            let handle = connect()?;
            let pod = link_by_name(&handle, attach.ifname).await?.ok_or_else(|| failed(format!("{} is missing in netns {}", attach.ifname, attach.netns)))?;
            let addresses: Vec<_> = handle.address().get().set_link_index_filter(pod.header.index).execute().try_collect().await.map_err(netlink_error("list addresses".into()))?;
            let has_ip = addresses.iter().any(|a| a.attributes.iter().any(|attr| matches!(attr, rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) if *ip == attach.ip)));
            if !has_ip {
                return Err(failed(format!("{} has no address {}", attach.ifname, attach.ip)));
            }
            let routes: Vec<_> = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute().try_collect().await.map_err(netlink_error("list routes".into()))?;
            let default = routes.iter().any(|r| {
                r.header.destination_prefix_length == 0
                    && r.attributes.iter().any(|a| matches!(a, rtnetlink::packet_route::route::RouteAttribute::Gateway(rtnetlink::packet_route::route::RouteAddress::Inet(g)) if *g == GATEWAY))
            });
            if !default {
                return Err(failed(format!("netns {} has no default route via {GATEWAY}", attach.netns)));
            }
            Ok(())
        })
        .map_err(netns_error)?
    }

    fn host_veths(&self) -> Result<Vec<String>, CniError> {
        self.on_host(async |handle| {
            let links: Vec<_> = handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(netlink_error("list links".into()))?;
            Ok(links
                .iter()
                .filter_map(|l| {
                    l.attributes.iter().find_map(|a| {
                        if let LinkAttribute::IfName(n) = a {
                            Some(n.clone())
                        } else {
                            None
                        }
                    })
                })
                .filter(|n| is_host_veth_name(n))
                .collect())
        })
    }

    fn delete_host_veth(&self, name: &str) -> Result<(), CniError> {
        self.on_host(async |handle| {
            let Some(link) = link_by_name(handle, name).await? else {
                return Ok(());
            };
            match handle.link().del(link.header.index).execute().await {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(netlink_error(format!("delete {name}"))(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
