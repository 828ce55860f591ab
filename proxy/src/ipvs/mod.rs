//! The IPVS backend (`--proxy-mode ipvs`): each service port becomes IPVS virtual services (one
//! per ClusterIP, external IP, LoadBalancer IP and, for NodePorts, per node address) whose
//! destinations are its endpoints, reached by NAT. Service addresses sit on the dummy device
//! `kube-ipvs0` ([`device`]); IPVS is spoken over generic netlink ([`genl`]), with no `ipvsadm`;
//! masquerading and the VIP filter are nftables rules ([`rules`]).
//!
//! A sync compares the wanted virtual services with those programmed before (read back from the
//! kernel at a full sync) and sends only the differences. Virtual services tug owns are those on
//! the VIP device's addresses and NodePorts on node addresses; others are never touched.

pub mod device;
pub mod genl;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use device::{DEVICE, DeviceError, VipDevice};
use genl::{Destination, Ipvs, IpvsError, Op, Scheduling, VirtualServer};
use rules::{Inputs, RuleConfig};

use crate::iptables::SyncReport;
use crate::model::{Endpoint, Protocol, ServicePort};
use crate::nftables::netlink::{self as nft, FAMILY_IPV4, FAMILY_IPV6, NftError};

/// How IPVS mode programs.
#[derive(Debug, Clone)]
pub struct IpvsConfig {
    /// The scheduler (`ipvs.scheduler`; upstream's default `rr`).
    pub scheduler: String,
    /// The cluster CIDRs (one per family); ClusterIP traffic from outside is masqueraded.
    pub cluster_cidrs: Vec<String>,
    /// Masquerade all ClusterIP traffic.
    pub masquerade_all: bool,
    /// `nodePortAddresses`; empty: every node address.
    pub node_port_cidrs: Vec<ipnet::IpNet>,
    /// The NodePort range, for telling tug's NodePort virtual services from others'.
    pub node_port_range: (u16, u16),
}

impl Default for IpvsConfig {
    fn default() -> Self {
        IpvsConfig {
            scheduler: "rr".into(),
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            node_port_cidrs: Vec::new(),
            node_port_range: (30000, 32767),
        }
    }
}

/// Why an IPVS sync failed. Retryable: the next sync is a full one.
#[derive(Debug, thiserror::Error)]
pub enum IpvsBackendError {
    /// IPVS refused or is missing.
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    /// The VIP device.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The nftables half.
    #[error(transparent)]
    Nftables(#[from] NftError),
    /// A sysctl IPVS mode needs.
    #[error("set {path}: {source}")]
    Sysctl {
        /// The sysctl's path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Virtual services with their scheduling and destinations.
pub type Table = BTreeMap<VirtualServer, (Scheduling, BTreeSet<Destination>)>;

/// The wanted state: virtual services, VIPs and the rules' inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Virtual services.
    pub table: Table,
    /// Addresses on the VIP device.
    pub vips: BTreeSet<IpAddr>,
    /// The nftables half's inputs.
    pub inputs: Inputs,
}

fn destinations(endpoints: &[Endpoint], family_of: &IpAddr) -> BTreeSet<Destination> {
    endpoints
        .iter()
        .filter(|e| e.ip.is_ipv6() == family_of.is_ipv6())
        .map(|e| Destination {
            address: e.ip,
            port: e.port,
            weight: 1,
        })
        .collect()
}

/// What `ports` ask for, with NodePorts on `node_ips`.
pub fn desired(ports: &[ServicePort], node_ips: &[IpAddr], scheduler: &str) -> Desired {
    let mut out = Desired::default();
    for port in ports {
        let scheduling = Scheduling {
            scheduler: scheduler.to_owned(),
            persistence: port.affinity_timeout,
        };
        let mut add = |address: IpAddr, number: u16, endpoints: &[Endpoint]| {
            out.table.insert(
                VirtualServer {
                    protocol: port.protocol,
                    address,
                    port: number,
                },
                (scheduling.clone(), destinations(endpoints, &address)),
            );
        };
        for ip in &port.cluster_ips {
            add(*ip, port.port, &port.cluster_endpoints);
        }
        let external: Vec<IpAddr> = port
            .external_ips
            .iter()
            .chain(&port.load_balancer_ips)
            .copied()
            .collect();
        for ip in &external {
            add(*ip, port.port, &port.external_endpoints);
        }
        if let Some(node_port) = port.node_port {
            for ip in node_ips {
                add(*ip, node_port, &port.external_endpoints);
            }
            if !port.external_policy_local {
                out.inputs.node_ports.push((port.protocol, node_port));
            }
        }
        let keyed = |ip: &IpAddr| (*ip, port.protocol, port.port);
        out.inputs
            .cluster
            .extend(port.cluster_ips.iter().map(keyed));
        if !port.external_policy_local {
            out.inputs.external.extend(external.iter().map(keyed));
        }
        out.inputs
            .services
            .extend(port.cluster_ips.iter().chain(&external).map(keyed));
        out.inputs.endpoints.extend(
            port.cluster_endpoints
                .iter()
                .chain(&port.external_endpoints)
                .map(|e| (e.ip, port.protocol, e.port)),
        );
        out.vips.extend(port.cluster_ips.iter().chain(&external));
    }
    out.inputs.vips = out.vips.iter().copied().collect();
    out
}

/// The operations that take IPVS from `current` to `wanted`: services added, then changed, then
/// their destinations; removed services last.
pub fn diff(current: &Table, wanted: &Table) -> Vec<Op> {
    let mut ops = Vec::new();
    for (vs, (scheduling, dests)) in wanted {
        match current.get(vs) {
            None => {
                ops.push(Op::AddService(*vs, scheduling.clone()));
                ops.extend(dests.iter().map(|d| Op::AddDest(*vs, *d)));
            }
            Some((old_scheduling, old_dests)) => {
                if old_scheduling != scheduling {
                    ops.push(Op::EditService(*vs, scheduling.clone()));
                }
                let by_addr = |set: &BTreeSet<Destination>| -> BTreeMap<(IpAddr, u16), u32> {
                    set.iter()
                        .map(|d| ((d.address, d.port), d.weight))
                        .collect()
                };
                let (old, new) = (by_addr(old_dests), by_addr(dests));
                for d in dests {
                    match old.get(&(d.address, d.port)) {
                        None => ops.push(Op::AddDest(*vs, *d)),
                        Some(weight) if *weight != d.weight => ops.push(Op::EditDest(*vs, *d)),
                        Some(_) => {}
                    }
                }
                ops.extend(
                    old_dests
                        .iter()
                        .filter(|d| !new.contains_key(&(d.address, d.port)))
                        .map(|d| Op::DelDest(*vs, *d)),
                );
            }
        }
    }
    ops.extend(
        current
            .keys()
            .filter(|vs| !wanted.contains_key(vs))
            .map(|vs| Op::DelService(*vs)),
    );
    ops
}

/// Destinations being drained: (virtual service, address, port).
pub type Draining = BTreeSet<(VirtualServer, IpAddr, u16)>;

/// Rewrites `ops` for graceful termination, as upstream does: a removed TCP or SCTP destination
/// gets weight 0 and is remembered in `draining` instead of deleted, so it takes no new
/// connections while its current ones finish; a destination that comes back while draining gets
/// its weight back instead of being added again (or, in a full sync that reads the kernel, a
/// weight-0 destination raised again stops draining). UDP has no connections to wait for: its
/// destinations go at once. A removed virtual service takes its drains with it.
pub fn drain(ops: Vec<Op>, draining: &mut Draining) -> Vec<Op> {
    ops.into_iter()
        .map(|op| match op {
            Op::DelDest(vs, dest) if vs.protocol != Protocol::Udp => {
                draining.insert((vs, dest.address, dest.port));
                Op::EditDest(vs, Destination { weight: 0, ..dest })
            }
            Op::AddDest(vs, dest) if draining.remove(&(vs, dest.address, dest.port)) => {
                Op::EditDest(vs, dest)
            }
            // A full sync finds a draining destination at weight 0 and gives its weight back.
            Op::EditDest(vs, dest) if dest.weight > 0 => {
                draining.remove(&(vs, dest.address, dest.port));
                op
            }
            Op::DelService(vs) => {
                draining.retain(|(v, _, _)| *v != vs);
                op
            }
            op => op,
        })
        .collect()
}

/// The draining destinations that are done: those without connections, given each one's
/// connections as the kernel counts them (`None`: no longer in the kernel, only forgotten).
pub fn drained(
    draining: &mut Draining,
    connections: &BTreeMap<(VirtualServer, IpAddr, u16), (Destination, u32)>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    draining.retain(|key| match connections.get(key) {
        None => false,
        Some((dest, 0)) => {
            ops.push(Op::DelDest(key.0, *dest));
            false
        }
        Some(_) => true,
    });
    ops
}

/// The node addresses NodePorts answer on: every address but loopback, IPv6 link-local and the
/// VIP device's, inside `nodePortAddresses` when given.
fn node_addresses(cidrs: &[ipnet::IpNet]) -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addresses
        .filter(|a| a.interface_name != DEVICE)
        .filter_map(|a| {
            let address = a.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| !ip.is_loopback())
        .filter(|ip| match ip {
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => true,
        })
        .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(ip)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The sysctls IPVS mode relies on, as upstream sets them: conntrack for IPVS connections (so
/// masquerading works), connections to removed destinations expired, and forwarding.
const SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/ip_forward", "1"),
];

fn set_sysctls() -> Result<(), IpvsBackendError> {
    for (path, value) in SYSCTLS {
        let full = format!("/proc/sys/{path}");
        let current = std::fs::read_to_string(&full).unwrap_or_default();
        if current.trim() != *value {
            std::fs::write(&full, value).map_err(|source| IpvsBackendError::Sysctl {
                path: full.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// The IPVS backend.
#[derive(Debug)]
pub struct IpvsBackend {
    config: IpvsConfig,
    /// What the last successful sync programmed; `None` forces a full sync that reads the
    /// kernel's state.
    programmed: Option<Desired>,
    /// The nftables families whose table tug has written, with what was written (the next
    /// incremental sync changes only the difference).
    tables: BTreeMap<u8, Option<crate::nftables::Ruleset>>,
    /// Removed destinations waiting for their connections to end.
    draining: Draining,
}

impl IpvsBackend {
    /// A backend for `config`.
    pub fn new(config: IpvsConfig) -> IpvsBackend {
        IpvsBackend {
            config,
            programmed: None,
            tables: BTreeMap::new(),
            draining: Draining::new(),
        }
    }

    /// The virtual services in the kernel that are tug's (on `vips`, or NodePorts).
    fn owned_in_kernel(
        &self,
        ipvs: &mut Ipvs,
        vips: &BTreeSet<IpAddr>,
        node_ips: &[IpAddr],
    ) -> Result<Table, IpvsBackendError> {
        let (low, high) = self.config.node_port_range;
        let mut table = Table::new();
        for (vs, scheduling) in ipvs.services()? {
            let node_port = node_ips.contains(&vs.address) && (low..=high).contains(&vs.port);
            if vips.contains(&vs.address) || node_port {
                let dests = ipvs.destinations(&vs)?.into_iter().collect();
                table.insert(vs, (scheduling, dests));
            }
        }
        Ok(table)
    }

    /// Programs `ports`; a full sync (or the first) reads the kernel's state first and removes
    /// what tug owns but no longer wants.
    pub fn sync(
        &mut self,
        ports: &[ServicePort],
        full: bool,
    ) -> Result<SyncReport, IpvsBackendError> {
        let previous = self.programmed.take();
        let node_ips = node_addresses(&self.config.node_port_cidrs);
        let wanted = desired(ports, &node_ips, &self.config.scheduler);
        let mut ipvs = Ipvs::open()?;
        let mut device = VipDevice::ensure()?;
        let full = full || previous.is_none();
        let (current_table, current_vips, current_inputs) = match previous {
            Some(p) if !full => (p.table, p.vips, Some(p.inputs)),
            _ => {
                set_sysctls()?;
                let vips: BTreeSet<IpAddr> = device.addresses()?.into_iter().collect();
                let table = self.owned_in_kernel(&mut ipvs, &vips, &node_ips)?;
                (table, vips, None)
            }
        };
        let add: Vec<IpAddr> = wanted.vips.difference(&current_vips).copied().collect();
        let remove: Vec<IpAddr> = current_vips.difference(&wanted.vips).copied().collect();
        device.change(&add, &[])?;
        let mut ops = drain(diff(&current_table, &wanted.table), &mut self.draining);
        ipvs.apply(&ops)?;
        // Destinations whose connections have ended go now.
        let mut counted = BTreeMap::new();
        let services: BTreeSet<VirtualServer> =
            self.draining.iter().map(|(vs, _, _)| *vs).collect();
        for vs in services {
            for (dest, connections) in ipvs.connections(&vs)? {
                counted.insert((vs, dest.address, dest.port), (dest, connections));
            }
        }
        let done = drained(&mut self.draining, &counted);
        if !done.is_empty() {
            ipvs.apply(&done)?;
        }
        ops.extend(done);
        device.change(&[], &remove)?;
        let mut rules_changed = 0;
        if current_inputs.as_ref() != Some(&wanted.inputs) {
            for (ipv6, family) in [(false, FAMILY_IPV4), (true, FAMILY_IPV6)] {
                // A family gets its table once it has a Service address or a cluster CIDR
                // (a node without IPv6 netfilter modules needs no IPv6 table).
                let needed = wanted.vips.iter().any(|ip| ip.is_ipv6() == ipv6)
                    || self
                        .config
                        .cluster_cidrs
                        .iter()
                        .any(|c| c.contains(':') == ipv6);
                if !needed && !self.tables.contains_key(&family) {
                    continue;
                }
                let config = RuleConfig {
                    ipv6,
                    cluster_cidr: self
                        .config
                        .cluster_cidrs
                        .iter()
                        .find(|c| c.contains(':') == ipv6)
                        .cloned(),
                    masquerade_all: self.config.masquerade_all,
                };
                let ruleset = rules::render(&config, &wanted.inputs);
                let batch = match self.tables.remove(&family).flatten() {
                    Some(before) if !full => crate::nftables::update(&before, &ruleset, family),
                    _ => ruleset.replace(family),
                };
                rules_changed += batch.len();
                // Until it is known to be in place, the next sync replaces the table.
                self.tables.insert(family, None);
                nft::apply(batch)?;
                self.tables.insert(family, Some(ruleset));
            }
        }
        let services = wanted.table.len();
        self.programmed = Some(wanted);
        Ok(SyncReport {
            full,
            written: ops.len() + add.len() + remove.len() + rules_changed,
            deleted: 0,
            chains: services,
        })
    }

    /// Removes tug's virtual services, the VIP device and the rules.
    pub fn cleanup(&mut self) -> Result<(), IpvsBackendError> {
        self.programmed = None;
        match Ipvs::open() {
            Ok(mut ipvs) => {
                let vips: BTreeSet<IpAddr> = match nix::net::if_::if_nametoindex(DEVICE) {
                    Ok(_) => VipDevice::ensure()?.addresses()?.into_iter().collect(),
                    Err(_) => BTreeSet::new(),
                };
                let node_ips = node_addresses(&self.config.node_port_cidrs);
                let owned = self.owned_in_kernel(&mut ipvs, &vips, &node_ips)?;
                let ops: Vec<Op> = owned.keys().map(|vs| Op::DelService(*vs)).collect();
                ipvs.apply(&ops)?;
            }
            Err(IpvsError::Unavailable) => {}
            Err(error) => return Err(error.into()),
        }
        VipDevice::remove()?;
        self.tables.clear();
        for ipv6 in [false, true] {
            let mut table = crate::nftables::Nftables::new(crate::nftables::NftConfig {
                ipv6,
                ..Default::default()
            });
            // A kernel without that family's nf_tables has no table to remove.
            if let Err(error) = table.cleanup() {
                tracing::debug!(%error, ipv6, "no nftables table to remove");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn endpoint(ip: &str, local: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            local,
        }
    }

    fn web() -> ServicePort {
        ServicePort {
            name: "default/web:http".into(),
            protocol: Protocol::Tcp,
            cluster_ips: vec!["10.96.0.20".parse().unwrap()],
            port: 80,
            node_port: Some(30080),
            external_ips: vec!["192.0.2.50".parse().unwrap()],
            load_balancer_ips: Vec::new(),
            affinity_timeout: None,
            cluster_endpoints: vec![endpoint("10.244.1.5", true), endpoint("10.244.2.7", false)],
            external_endpoints: vec![endpoint("10.244.1.5", true), endpoint("10.244.2.7", false)],
            health_check_node_port: None,
            external_policy_local: false,
        }
    }

    #[test]
    fn a_port_becomes_virtual_services_on_every_address_with_its_endpoints() {
        let node: IpAddr = "192.168.1.10".parse().unwrap();
        let wanted = desired(&[web()], &[node], "rr");
        let addresses: Vec<(IpAddr, u16)> = wanted
            .table
            .keys()
            .map(|vs| (vs.address, vs.port))
            .collect();
        assert_eq!(
            addresses,
            [
                ("10.96.0.20".parse().unwrap(), 80),
                ("192.0.2.50".parse().unwrap(), 80),
                (node, 30080),
            ]
        );
        for (scheduling, dests) in wanted.table.values() {
            assert_eq!(scheduling.scheduler, "rr");
            assert_eq!(dests.len(), 2);
        }
        assert_eq!(
            wanted
                .vips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.96.0.20", "192.0.2.50"],
            "NodePorts use node addresses, not VIPs"
        );
        assert_eq!(wanted.inputs.node_ports, [(Protocol::Tcp, 30080)]);
    }

    #[test]
    fn local_policy_keeps_external_sources_and_affinity_persists() {
        let mut port = web();
        port.external_policy_local = true;
        port.affinity_timeout = Some(600);
        let wanted = desired(&[port], &[], "rr");
        assert!(wanted.inputs.node_ports.is_empty());
        assert!(wanted.inputs.external.is_empty());
        assert!(
            wanted
                .table
                .values()
                .all(|(s, _)| s.persistence == Some(600))
        );
    }

    #[test]
    fn a_diff_adds_removes_and_changes_only_what_differs() {
        let before = desired(&[web()], &[], "rr").table;
        let mut changed = web();
        changed.cluster_endpoints =
            vec![endpoint("10.244.1.5", true), endpoint("10.244.3.9", false)];
        changed.external_ips.clear();
        let after = desired(&[changed], &[], "rr").table;
        let ops = diff(&before, &after);
        let vip: IpAddr = "10.96.0.20".parse().unwrap();
        let dest = |ip: &str| Destination {
            address: ip.parse().unwrap(),
            port: 8080,
            weight: 1,
        };
        let vs = |address: IpAddr| VirtualServer {
            protocol: Protocol::Tcp,
            address,
            port: 80,
        };
        assert_eq!(
            ops,
            [
                Op::AddDest(vs(vip), dest("10.244.3.9")),
                Op::DelDest(vs(vip), dest("10.244.2.7")),
                Op::DelService(vs("192.0.2.50".parse().unwrap())),
            ]
        );
        assert!(diff(&after, &after).is_empty(), "nothing to do twice");
    }

    #[test]
    fn removed_destinations_drain_before_they_go() {
        let vs = VirtualServer {
            protocol: Protocol::Tcp,
            address: "10.96.0.10".parse().unwrap(),
            port: 80,
        };
        let udp = VirtualServer {
            protocol: Protocol::Udp,
            ..vs
        };
        let dest = Destination {
            address: "10.244.1.2".parse().unwrap(),
            port: 8080,
            weight: 1,
        };
        let mut draining = Draining::new();
        let ops = drain(
            vec![Op::DelDest(vs, dest), Op::DelDest(udp, dest)],
            &mut draining,
        );
        assert_eq!(
            ops,
            [
                Op::EditDest(vs, Destination { weight: 0, ..dest }),
                Op::DelDest(udp, dest)
            ],
            "TCP drains at weight 0, UDP goes at once"
        );
        assert_eq!(draining.len(), 1);
        // Still connected: it stays; once the kernel counts none, it goes.
        let key = (vs, dest.address, dest.port);
        let mut counted = BTreeMap::from([(key, (Destination { weight: 0, ..dest }, 3))]);
        assert!(drained(&mut draining, &counted).is_empty());
        counted.insert(key, (Destination { weight: 0, ..dest }, 0));
        assert_eq!(
            drained(&mut draining, &counted),
            [Op::DelDest(vs, Destination { weight: 0, ..dest })]
        );
        assert!(draining.is_empty());
        // Back while draining: its weight returns instead of a second add.
        drain(vec![Op::DelDest(vs, dest)], &mut draining);
        assert_eq!(
            drain(vec![Op::AddDest(vs, dest)], &mut draining),
            [Op::EditDest(vs, dest)]
        );
        assert!(draining.is_empty());
        drain(vec![Op::DelDest(vs, dest)], &mut draining);
        assert_eq!(
            drain(vec![Op::EditDest(vs, dest)], &mut draining),
            [Op::EditDest(vs, dest)],
            "a full sync raises the weight: no longer draining"
        );
        assert!(draining.is_empty());
        // A removed service forgets its drains.
        drain(vec![Op::DelDest(vs, dest)], &mut draining);
        drain(vec![Op::DelService(vs)], &mut draining);
        assert!(draining.is_empty());
    }
}
