//! Makes the kernel match the desired state, touching only what tug owns: routes with tug's
//! route protocol, the `tug-vxlan` device and its neighbour/FDB entries, the `tug-netd` nftables
//! table, and the CNI conflist file. Re-running it converges; a restart changes nothing that
//! is already right, so running pods are never disturbed.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourFlags;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::desired::{Desired, PeerRoute};

/// The route protocol that marks tug's routes (`ip route show proto 199`).
pub const ROUTE_PROTOCOL: u8 = 199;
/// The VXLAN device.
pub const VXLAN_DEVICE: &str = "tug-vxlan";

/// Why applying failed; every variant is retried on the next sync.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A netlink request failed; the message names it.
    #[error("{what}: {source}")]
    Netlink {
        /// The operation and its object.
        what: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A file or program failed; the message names it.
    #[error("{what}: {source}")]
    Io {
        /// The operation and its object.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> ApplyError {
    let what = what.into();
    move |source| ApplyError::Netlink { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApplyError {
    let what = what.into();
    move |source| ApplyError::Io { what, source }
}

/// Settings of the node's dataplane.
#[derive(Debug, Clone)]
pub struct Dataplane {
    /// Directory of CNI configuration files.
    pub cni_conf_dir: PathBuf,
    /// Name of tug's conflist in it.
    pub cni_conf_name: String,
    /// The cluster's pod CIDR: traffic from it to anywhere else is masqueraded.
    pub cluster_cidr: Ipv4Net,
    /// VXLAN UDP port.
    pub vxlan_port: u16,
    /// VXLAN network identifier.
    pub vxlan_vni: u32,
    /// The `nft` program.
    pub nft: PathBuf,
}

/// The subnets directly connected to this node, both families (host routes, loopback and
/// link-local addresses left out).
pub async fn local_subnets(handle: &Handle) -> Result<Vec<ipnet::IpNet>, ApplyError> {
    let addresses: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list addresses"))?;
    Ok(addresses
        .iter()
        .filter_map(|a| {
            let ip = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Local(ip) => Some(*ip),
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            let host_route = match ip {
                IpAddr::V4(_) => a.header.prefix_len >= 32,
                IpAddr::V6(v6) => {
                    a.header.prefix_len >= 128 || (v6.segments()[0] & 0xffc0) == 0xfe80
                }
            };
            (!host_route && !ip.is_loopback())
                .then(|| {
                    ipnet::IpNet::new(ip, a.header.prefix_len)
                        .ok()
                        .map(|n| n.trunc())
                })
                .flatten()
        })
        .collect())
}

/// Applies everything; returns what it changed, for the log.
pub async fn apply(
    handle: &Handle,
    plane: &Dataplane,
    desired: &Desired,
) -> Result<Vec<String>, ApplyError> {
    let mut changes = Vec::new();
    if let Some(conflist) = &desired.conflist
        && write_if_changed(&plane.cni_conf_dir.join(&plane.cni_conf_name), conflist)?
    {
        changes.push(format!(
            "wrote {}",
            plane.cni_conf_dir.join(&plane.cni_conf_name).display()
        ));
    }
    enable_sysctl("/proc/sys/net/ipv4/ip_forward")?;
    masquerade(plane)?;
    let vxlan_index = match &desired.vtep {
        Some(vtep) => Some(ensure_vxlan(handle, plane, vtep, &mut changes).await?),
        None => None,
    };
    if let Some(index) = vxlan_index {
        for route in &desired.routes {
            if let PeerRoute::Vxlan {
                vtep,
                mac,
                underlay,
                ..
            } = route
            {
                handle
                    .neighbours()
                    .add(index, IpAddr::V4(*vtep))
                    .link_layer_address(mac)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(format!(
                        "neighbour {vtep} lladdr {mac:02x?} dev {VXLAN_DEVICE}"
                    )))?;
                handle
                    .neighbours()
                    .add_bridge(index, mac)
                    .destination(IpAddr::V4(*underlay))
                    .flags(NeighbourFlags::Own)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(format!(
                        "fdb {mac:02x?} dst {underlay} dev {VXLAN_DEVICE}"
                    )))?;
            }
        }
    }
    sync_routes(handle, &desired.routes, vxlan_index, &mut changes).await?;
    if !desired.routes6.is_empty() {
        enable_sysctl("/proc/sys/net/ipv6/conf/all/forwarding")?;
    }
    sync_routes6(handle, &desired.routes6, &mut changes).await?;
    Ok(changes)
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, ApplyError> {
    crate::netlink::link_by_name(handle, name)
        .await
        .map_err(nl(format!("get link {name}")))
}

async fn ensure_vxlan(
    handle: &Handle,
    plane: &Dataplane,
    vtep: &super::desired::LocalVtep,
    changes: &mut Vec<String>,
) -> Result<u32, ApplyError> {
    let existing = link_by_name(handle, VXLAN_DEVICE).await?;
    let current_mac = existing.as_ref().and_then(|l| {
        l.attributes.iter().find_map(|a| {
            if let LinkAttribute::Address(m) = a {
                Some(m.clone())
            } else {
                None
            }
        })
    });
    let index = match existing {
        Some(link) if current_mac.as_deref() == Some(&vtep.mac[..]) => link.header.index,
        stale => {
            if let Some(link) = stale {
                handle
                    .link()
                    .del(link.header.index)
                    .execute()
                    .await
                    .map_err(nl(format!("delete stale {VXLAN_DEVICE}")))?;
            }
            let message = LinkVxlan::new(VXLAN_DEVICE, plane.vxlan_vni)
                .port(plane.vxlan_port)
                .local(vtep.underlay)
                .learning(false)
                .address(vtep.mac.to_vec())
                .up()
                .build();
            handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(nl(format!(
                    "create {VXLAN_DEVICE} vni {} local {}",
                    plane.vxlan_vni, vtep.underlay
                )))?;
            changes.push(format!("created {VXLAN_DEVICE}"));
            link_by_name(handle, VXLAN_DEVICE)
                .await?
                .map(|l| l.header.index)
                .ok_or_else(|| {
                    io(format!("find {VXLAN_DEVICE}"))(std::io::ErrorKind::NotFound.into())
                })?
        }
    };
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {VXLAN_DEVICE} up")))?;
    let addresses: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list vxlan addresses"))?;
    let has = addresses.iter().any(|a| {
        a.attributes.iter().any(
            |attr| matches!(attr, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == vtep.address),
        )
    });
    if !has {
        handle
            .address()
            .add(index, IpAddr::V4(vtep.address), 32)
            .execute()
            .await
            .map_err(nl(format!("add {}/32 to {VXLAN_DEVICE}", vtep.address)))?;
    }
    Ok(index)
}

fn route_destination(route: &RouteMessage) -> Option<Ipv4Net> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
            Ipv4Net::new(*ip, route.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}

fn route_message(route: &PeerRoute, vxlan_index: Option<u32>) -> RouteMessage {
    let builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.cidr().network(), route.cidr().prefix_len())
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    match route {
        PeerRoute::Direct { via, .. } => builder.gateway(*via).build(),
        PeerRoute::Vxlan { vtep, .. } => builder
            .gateway(*vtep)
            .output_interface(vxlan_index.unwrap_or_default())
            .onlink()
            .build(),
    }
}

/// The routes of one family that carry tug's route protocol (netd's routes to other nodes'
/// pod CIDRs).
pub async fn tug_routes(handle: &Handle, ipv6: bool) -> Result<Vec<RouteMessage>, ApplyError> {
    let (query, what) = if ipv6 {
        (
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            "list IPv6 routes",
        )
    } else {
        (
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            "list routes",
        )
    };
    let all: Vec<RouteMessage> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(nl(what))?;
    Ok(all
        .into_iter()
        .filter(|r| r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL))
        .collect())
}

async fn sync_routes(
    handle: &Handle,
    routes: &[PeerRoute],
    vxlan_index: Option<u32>,
    changes: &mut Vec<String>,
) -> Result<(), ApplyError> {
    let ours = tug_routes(handle, false).await?;
    let wanted: BTreeSet<Ipv4Net> = routes.iter().map(PeerRoute::cidr).collect();
    for stale in ours
        .iter()
        .filter(|r| route_destination(r).is_none_or(|d| !wanted.contains(&d)))
    {
        handle
            .route()
            .del(stale.clone())
            .execute()
            .await
            .map_err(nl(format!("delete route {:?}", route_destination(stale))))?;
        changes.push(format!(
            "deleted route {}",
            route_destination(stale)
                .map(|d| d.to_string())
                .unwrap_or_default()
        ));
    }
    for route in routes {
        let message = route_message(route, vxlan_index);
        let same = ours.iter().any(|r| {
            route_destination(r) == Some(route.cidr())
                && r.attributes
                    .iter()
                    .filter(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Oif(_)))
                    .all(|a| message.attributes.contains(a))
        });
        if !same {
            handle
                .route()
                .add(message)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("add route {route:?}")))?;
            changes.push(format!("route {route:?}"));
        }
    }
    Ok(())
}

/// Writes `content` to `path` atomically (temporary file, fsync, rename); false when unchanged.
pub fn write_if_changed(path: &Path, content: &str) -> Result<bool, ApplyError> {
    if std::fs::read_to_string(path).is_ok_and(|current| current == content) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let temp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("conf")
    ));
    let mut file =
        std::fs::File::create(&temp).map_err(io(format!("create {}", temp.display())))?;
    file.write_all(content.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(format!("write {}", temp.display())))?;
    std::fs::rename(&temp, path).map_err(io(format!(
        "rename {} to {}",
        temp.display(),
        path.display()
    )))?;
    Ok(true)
}

/// IPv6 routes to dual-stack peers, reconciled like the IPv4 ones.
async fn sync_routes6(
    handle: &Handle,
    routes: &[(ipnet::Ipv6Net, std::net::Ipv6Addr)],
    changes: &mut Vec<String>,
) -> Result<(), ApplyError> {
    let ours = tug_routes(handle, true).await?;
    let destination = |r: &RouteMessage| {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                ipnet::Ipv6Net::new(*ip, r.header.destination_prefix_length).ok()
            }
            _ => None,
        })
    };
    let gateway = |r: &RouteMessage| {
        r.attributes.iter().find_map(|a| {
            if let RouteAttribute::Gateway(RouteAddress::Inet6(g)) = a {
                Some(*g)
            } else {
                None
            }
        })
    };
    for stale in ours
        .iter()
        .filter(|r| destination(r).is_none_or(|d| !routes.iter().any(|(cidr, _)| *cidr == d)))
    {
        handle
            .route()
            .del(stale.clone())
            .execute()
            .await
            .map_err(nl(format!("delete route {:?}", destination(stale))))?;
        changes.push(format!("deleted route {:?}", destination(stale)));
    }
    for (cidr, via) in routes {
        if ours
            .iter()
            .any(|r| destination(r) == Some(*cidr) && gateway(r) == Some(*via))
        {
            continue;
        }
        let message = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(cidr.network(), cidr.prefix_len())
            .gateway(*via)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build();
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("add route {cidr} via {via}")))?;
        changes.push(format!("route {cidr} via {via}"));
    }
    Ok(())
}

/// Sets a boolean sysctl to 1 unless it already is.
/// Removes everything netd programs: its routes (IPv4 and IPv6, by route protocol), the VXLAN
/// device, and the `tug-netd` table. What is already gone is fine. Returns what it removed.
pub async fn cleanup(handle: &Handle, nft: &Path) -> Result<Vec<String>, ApplyError> {
    let mut removed = Vec::new();
    let mut ours = tug_routes(handle, false).await?;
    ours.extend(tug_routes(handle, true).await?);
    for route in ours {
        let what = format!(
            "route {:?}",
            route
                .attributes
                .iter()
                .find(|a| matches!(a, RouteAttribute::Destination(_)))
        );
        handle
            .route()
            .del(route)
            .execute()
            .await
            .map_err(nl(format!("delete {what}")))?;
        removed.push(what);
    }
    if let Some(link) = link_by_name(handle, VXLAN_DEVICE).await? {
        handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .map_err(nl(format!("delete {VXLAN_DEVICE}")))?;
        removed.push(format!("device {VXLAN_DEVICE}"));
    }
    let deleted = std::process::Command::new(nft)
        .args(["delete", "table", "ip", "tug-netd"])
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(io(format!("run {}", nft.display())))?;
    if deleted.success() {
        removed.push("nftables table ip tug-netd".into());
    }
    Ok(removed)
}

fn enable_sysctl(path: &str) -> Result<(), ApplyError> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(io(format!("write 1 to {path}")))
}

/// The `tug-netd` table: masquerade what leaves the cluster CIDR from inside it, nothing else.
pub fn masquerade_ruleset(cluster_cidr: Ipv4Net) -> String {
    format!(
        "table ip tug-netd\ndelete table ip tug-netd\ntable ip tug-netd {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {cluster_cidr} ip daddr != {cluster_cidr} masquerade\n  }}\n}}\n"
    )
}

fn masquerade(plane: &Dataplane) -> Result<(), ApplyError> {
    let ruleset = masquerade_ruleset(plane.cluster_cidr);
    let listed = std::process::Command::new(&plane.nft)
        .args(["list", "table", "ip", "tug-netd"])
        .output();
    if listed.as_ref().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains(&format!(
                "ip saddr {} ip daddr != {} masquerade",
                plane.cluster_cidr, plane.cluster_cidr
            ))
    }) {
        return Ok(());
    }
    let mut child = std::process::Command::new(&plane.nft)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io(format!("run {}", plane.nft.display())))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(ruleset.as_bytes())
        .map_err(io("feed nft"))?;
    let output = child.wait_with_output().map_err(io("wait for nft"))?;
    if !output.status.success() {
        return Err(io(format!(
            "nft -f (tug-netd masquerade): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))(std::io::ErrorKind::Other.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masquerade_table_replaces_itself_atomically() {
        let ruleset = masquerade_ruleset("10.244.0.0/16".parse().unwrap());
        assert!(
            ruleset.starts_with("table ip tug-netd\ndelete table ip tug-netd\n"),
            "create-then-delete makes the replace idempotent"
        );
        assert!(ruleset.contains("ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade"));
    }

    #[test]
    fn files_are_rewritten_only_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.d/10-tug.conflist");
        assert!(write_if_changed(&path, "a").unwrap());
        assert!(!write_if_changed(&path, "a").unwrap());
        assert!(write_if_changed(&path, "b").unwrap());
        assert_eq!(std::fs::read_to_string(path).unwrap(), "b");
    }
}
