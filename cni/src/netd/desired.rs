//! What the node's pod network should look like, computed from the Node objects alone (pure):
//! the CNI configuration for this node's pod CIDRs and a route to every other node's pod CIDRs —
//! direct when the peer is on a local subnet, through VXLAN otherwise.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;
use serde_json::json;
use sha2::{Digest, Sha256};

/// How traffic reaches one peer node's pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerRoute {
    /// The peer is on-link: `<cidr> via <node ip>`.
    Direct {
        /// The peer's pod CIDR.
        cidr: Ipv4Net,
        /// The peer's InternalIP.
        via: Ipv4Addr,
    },
    /// The peer is not on-link: `<cidr> via <vtep> dev tug-vxlan onlink`, with the peer's VTEP
    /// MAC known statically (neighbour and FDB entries), pod addresses preserved inside.
    Vxlan {
        /// The peer's pod CIDR.
        cidr: Ipv4Net,
        /// The peer's VTEP address: its pod CIDR's network address.
        vtep: Ipv4Addr,
        /// The peer's VTEP MAC, derived from its name.
        mac: [u8; 6],
        /// The peer's InternalIP (the underlay destination).
        underlay: Ipv4Addr,
    },
}

impl PeerRoute {
    /// The destination CIDR.
    pub fn cidr(&self) -> Ipv4Net {
        match self {
            PeerRoute::Direct { cidr, .. } | PeerRoute::Vxlan { cidr, .. } => *cidr,
        }
    }
}

/// This node's VXLAN endpoint, present when some peer needs VXLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVtep {
    /// Address of `tug-vxlan` (this node's pod CIDR network address).
    pub address: Ipv4Addr,
    /// MAC of `tug-vxlan`.
    pub mac: [u8; 6],
    /// This node's InternalIP, the VXLAN source.
    pub underlay: Ipv4Addr,
}

/// The whole desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The CNI conflist to write, once this node has a pod CIDR.
    pub conflist: Option<String>,
    /// Routes to other nodes' pod CIDRs.
    pub routes: Vec<PeerRoute>,
    /// The local VTEP, when any route uses VXLAN.
    pub vtep: Option<LocalVtep>,
    /// IPv6 routes to dual-stack peers' IPv6 pod CIDRs, via their on-link IPv6 InternalIPs.
    pub routes6: Vec<(Ipv6Net, Ipv6Addr)>,
    /// Peers left out, with why (logged).
    pub skipped: Vec<(String, String)>,
}

/// Inputs beyond the Node objects.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name.
    pub node_name: String,
    /// MTU for pod interfaces.
    pub mtu: u32,
    /// Where tug-cni keeps IPAM state.
    pub ipam_dir: String,
}

/// The VTEP MAC of node `name`: locally administered, from a hash of the name, so every node
/// computes every peer's MAC without publishing it.
pub fn vtep_mac(name: &str) -> [u8; 6] {
    let digest = Sha256::digest(name.as_bytes());
    [0x0e, digest[0], digest[1], digest[2], digest[3], digest[4]]
}

/// A node's InternalIP (IPv4).
pub fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
}

/// A node's IPv6 InternalIP.
pub fn internal_ip6(node: &Node) -> Option<Ipv6Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// A node's IPv6 pod CIDR.
pub fn pod_cidr6(node: &Node) -> Option<Ipv6Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .find_map(|c| c.parse::<Ipv6Net>().ok())
}

/// A node's IPv4 pod CIDR.
pub fn pod_cidr(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .find_map(|c| c.parse::<Ipv4Net>().ok())
}

/// Computes the desired state from all Node objects and this node's local subnets.
pub fn desired(
    settings: &Settings,
    nodes: &BTreeMap<String, Node>,
    local: &[ipnet::IpNet],
) -> Desired {
    let local_subnets: Vec<Ipv4Net> = local
        .iter()
        .filter_map(|n| {
            if let ipnet::IpNet::V4(v4) = n {
                Some(*v4)
            } else {
                None
            }
        })
        .collect();
    let local_subnets6: Vec<Ipv6Net> = local
        .iter()
        .filter_map(|n| {
            if let ipnet::IpNet::V6(v6) = n {
                Some(*v6)
            } else {
                None
            }
        })
        .collect();
    let mut routes6 = Vec::new();
    for (name, node) in nodes
        .iter()
        .filter(|(name, _)| **name != settings.node_name)
    {
        match (pod_cidr6(node), internal_ip6(node)) {
            (Some(cidr), Some(ip)) if local_subnets6.iter().any(|s| s.contains(&ip)) => {
                routes6.push((cidr, ip))
            }
            (Some(_), _) => {
                tracing::debug!(node = %name, "IPv6 pod CIDR without an on-link IPv6 InternalIP: not routed (VXLAN carries IPv4 pods only)")
            }
            _ => {}
        }
    }
    routes6.sort();
    let own = nodes.get(&settings.node_name);
    let own_cidrs: Vec<String> = own
        .and_then(|n| n.spec.as_ref())
        .map(|s| {
            s.pod_cidrs
                .clone()
                .unwrap_or_else(|| s.pod_cidr.iter().cloned().collect())
        })
        .unwrap_or_default();
    let conflist = (!own_cidrs.is_empty()).then(|| {
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "tug",
            "plugins": [{"type": "tug-cni", "podCIDRs": own_cidrs, "mtu": settings.mtu, "dataDir": settings.ipam_dir}],
        });
        serde_json::to_string_pretty(&conf).expect("JSON serialises")
    });
    let mut routes = Vec::new();
    let mut skipped = Vec::new();
    for (name, node) in nodes {
        if *name == settings.node_name {
            continue;
        }
        let (Some(cidr), Some(ip)) = (pod_cidr(node), internal_ip(node)) else {
            skipped.push((name.clone(), "no IPv4 pod CIDR or InternalIP yet".into()));
            continue;
        };
        if local_subnets.iter().any(|s| s.contains(&ip)) {
            routes.push(PeerRoute::Direct { cidr, via: ip });
        } else {
            routes.push(PeerRoute::Vxlan {
                cidr,
                vtep: cidr.network(),
                mac: vtep_mac(name),
                underlay: ip,
            });
        }
    }
    routes.sort();
    let needs_vxlan = routes.iter().any(|r| matches!(r, PeerRoute::Vxlan { .. }));
    let vtep = match (
        needs_vxlan,
        own.and_then(pod_cidr),
        own.and_then(internal_ip),
    ) {
        (true, Some(cidr), Some(underlay)) => Some(LocalVtep {
            address: cidr.network(),
            mac: vtep_mac(&settings.node_name),
            underlay,
        }),
        (true, _, _) => {
            skipped.push((
                settings.node_name.clone(),
                "this node has no pod CIDR or InternalIP yet: VXLAN peers wait".into(),
            ));
            routes.retain(|r| matches!(r, PeerRoute::Direct { .. }));
            None
        }
        _ => None,
    };
    Desired {
        conflist,
        routes,
        vtep,
        routes6,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>) -> (String, Node) {
        let mut value = serde_json::json!({"metadata": {"name": name}, "spec": {}, "status": {}});
        if let Some(cidr) = cidr {
            value["spec"] = serde_json::json!({"podCIDR": cidr, "podCIDRs": [cidr]});
        }
        if let Some(ip) = ip {
            value["status"] = serde_json::json!({"addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]});
        }
        (name.to_owned(), serde_json::from_value(value).unwrap())
    }

    fn settings() -> Settings {
        Settings {
            node_name: "a".into(),
            mtu: 1450,
            ipam_dir: "/var/lib/tug/ipam".into(),
        }
    }

    #[test]
    fn on_link_peers_get_direct_routes_and_others_vxlan() {
        let nodes: BTreeMap<_, _> = [
            node("a", Some("10.244.0.0/24"), Some("192.168.1.10")),
            node("b", Some("10.244.1.0/24"), Some("192.168.1.11")),
            node("c", Some("10.244.2.0/24"), Some("172.16.0.5")),
            node("d", None, Some("192.168.1.12")),
        ]
        .into();
        let d = desired(&settings(), &nodes, &["192.168.1.0/24".parse().unwrap()]);
        assert_eq!(
            d.routes,
            vec![
                PeerRoute::Direct {
                    cidr: "10.244.1.0/24".parse().unwrap(),
                    via: "192.168.1.11".parse().unwrap()
                },
                PeerRoute::Vxlan {
                    cidr: "10.244.2.0/24".parse().unwrap(),
                    vtep: "10.244.2.0".parse().unwrap(),
                    mac: vtep_mac("c"),
                    underlay: "172.16.0.5".parse().unwrap()
                },
            ]
        );
        assert_eq!(
            d.vtep,
            Some(LocalVtep {
                address: "10.244.0.0".parse().unwrap(),
                mac: vtep_mac("a"),
                underlay: "192.168.1.10".parse().unwrap()
            })
        );
        assert_eq!(
            d.skipped,
            [(
                "d".to_owned(),
                "no IPv4 pod CIDR or InternalIP yet".to_owned()
            )]
        );
        let conf: serde_json::Value = serde_json::from_str(d.conflist.as_deref().unwrap()).unwrap();
        assert_eq!(
            conf["plugins"][0]["podCIDRs"],
            serde_json::json!(["10.244.0.0/24"])
        );
        assert_eq!(conf["plugins"][0]["type"], "tug-cni");
    }

    #[test]
    fn no_pod_cidr_means_no_configuration_and_no_vxlan() {
        let nodes: BTreeMap<_, _> = [
            node("a", None, Some("192.168.1.10")),
            node("c", Some("10.244.2.0/24"), Some("172.16.0.5")),
        ]
        .into();
        let d = desired(&settings(), &nodes, &["192.168.1.0/24".parse().unwrap()]);
        assert_eq!(d.conflist, None);
        assert!(d.routes.is_empty() && d.vtep.is_none());
    }

    #[test]
    fn dual_stack_peers_on_link_get_ipv6_routes() {
        let mut a = node("a", Some("10.244.0.0/24"), Some("192.168.1.10")).1;
        a.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["10.244.0.0/24".into(), "fd00:10:244::/64".into()]);
        let mut b = node("b", Some("10.244.1.0/24"), Some("192.168.1.11")).1;
        b.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["10.244.1.0/24".into(), "fd00:10:244:1::/64".into()]);
        b.status.as_mut().unwrap().addresses.as_mut().unwrap().push(
            serde_json::from_value(
                serde_json::json!({"type": "InternalIP", "address": "fd00:1::11"}),
            )
            .unwrap(),
        );
        let nodes: BTreeMap<_, _> = [("a".to_owned(), a), ("b".to_owned(), b)].into();
        let d = desired(
            &settings(),
            &nodes,
            &[
                "192.168.1.0/24".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
            ],
        );
        assert_eq!(
            d.routes6,
            vec![(
                "fd00:10:244:1::/64".parse().unwrap(),
                "fd00:1::11".parse().unwrap()
            )]
        );
        let conf: serde_json::Value = serde_json::from_str(d.conflist.as_deref().unwrap()).unwrap();
        assert_eq!(
            conf["plugins"][0]["podCIDRs"],
            serde_json::json!(["10.244.0.0/24", "fd00:10:244::/64"]),
            "the CNI configuration is dual-stack"
        );
        let off_link = desired(&settings(), &nodes, &["192.168.1.0/24".parse().unwrap()]);
        assert!(
            off_link.routes6.is_empty(),
            "no on-link IPv6 InternalIP, no IPv6 route"
        );
    }

    #[test]
    fn vtep_macs_are_stable_unicast_and_local() {
        let mac = vtep_mac("node-1");
        assert_eq!(mac, vtep_mac("node-1"));
        assert_ne!(mac, vtep_mac("node-2"));
        assert_eq!(mac[0] & 0b11, 0b10, "locally administered, unicast");
    }
}
