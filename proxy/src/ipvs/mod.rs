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
use std::hash::Hash;
use std::net::IpAddr;

use foldhash::HashMap;

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
pub fn desired<'a>(
    ports: impl IntoIterator<Item = &'a ServicePort>,
    node_ips: &[IpAddr],
    scheduler: &str,
) -> Desired {
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

/// The node addresses NodePorts answer on, out of `local` (the addresses of every interface
/// but the VIP device): all but loopback and IPv6 link-local, inside `nodePortAddresses` when
/// given.
fn node_addresses(local: Vec<IpAddr>, cidrs: &[ipnet::IpNet]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = local
        .into_iter()
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

/// A multiset: how many Services want each item.
#[derive(Debug)]
struct Counted<T>(HashMap<T, u32>);

impl<T> Default for Counted<T> {
    fn default() -> Self {
        Counted(HashMap::default())
    }
}

impl<T: Hash + Eq + Clone> Counted<T> {
    /// Counts `old` out and `new` in, and appends to `removed` what nobody wants any more and
    /// to `added` what is wanted for the first time.
    fn change(&mut self, old: &[T], new: &[T], removed: &mut Vec<T>, added: &mut Vec<T>) {
        let mut before: HashMap<&T, bool> = HashMap::default();
        for item in old.iter().chain(new) {
            before
                .entry(item)
                .or_insert_with(|| self.0.contains_key(item));
        }
        for item in old {
            if let Some(count) = self.0.get_mut(item) {
                *count -= 1;
                if *count == 0 {
                    self.0.remove(item);
                }
            }
        }
        for item in new {
            *self.0.entry(item.clone()).or_default() += 1;
        }
        for (item, was) in before {
            match (was, self.0.contains_key(item)) {
                (true, false) => removed.push(item.clone()),
                (false, true) => added.push(item.clone()),
                _ => {}
            }
        }
    }

    fn items(&self) -> Vec<T> {
        self.0.keys().cloned().collect()
    }
}

/// The rule inputs of all Services, counted.
#[derive(Debug, Default)]
struct CountedInputs {
    cluster: Counted<(IpAddr, Protocol, u16)>,
    external: Counted<(IpAddr, Protocol, u16)>,
    services: Counted<(IpAddr, Protocol, u16)>,
    node_ports: Counted<(Protocol, u16)>,
    endpoints: Counted<(IpAddr, Protocol, u16)>,
    vips: Counted<IpAddr>,
}

impl CountedInputs {
    /// Counts one Service's inputs `old` out and `new` in, noting what that removes and adds.
    fn change(&mut self, old: &Inputs, new: &Inputs, removed: &mut Inputs, added: &mut Inputs) {
        let (r, a) = (removed, added);
        self.cluster
            .change(&old.cluster, &new.cluster, &mut r.cluster, &mut a.cluster);
        self.external.change(
            &old.external,
            &new.external,
            &mut r.external,
            &mut a.external,
        );
        self.services.change(
            &old.services,
            &new.services,
            &mut r.services,
            &mut a.services,
        );
        self.node_ports.change(
            &old.node_ports,
            &new.node_ports,
            &mut r.node_ports,
            &mut a.node_ports,
        );
        self.endpoints.change(
            &old.endpoints,
            &new.endpoints,
            &mut r.endpoints,
            &mut a.endpoints,
        );
        self.vips
            .change(&old.vips, &new.vips, &mut r.vips, &mut a.vips);
    }

    fn totals(&self) -> Inputs {
        Inputs {
            cluster: self.cluster.items(),
            external: self.external.items(),
            services: self.services.items(),
            node_ports: self.node_ports.items(),
            endpoints: self.endpoints.items(),
            vips: self.vips.items(),
        }
    }
}

/// What tug has programmed, kept per Service so that a change is applied by looking at the
/// Services it touches only.
#[derive(Debug, Default)]
struct State {
    /// Each Service's share: its virtual services and rule inputs.
    services: HashMap<String, Desired>,
    /// Every virtual service programmed.
    table: Table,
    /// The Services wanting each virtual service (more than one only when their addresses
    /// collide; the last by name has it).
    claims: HashMap<VirtualServer, BTreeSet<String>>,
    inputs: CountedInputs,
    /// The node addresses NodePorts were programmed on.
    node_ips: Vec<IpAddr>,
}

/// What one sync changes.
#[derive(Debug, Default)]
struct Staged {
    /// The virtual services it touches as they were, and as they are to be.
    before: Table,
    after: Table,
    /// Rule inputs nobody wants any more, and newly wanted ones.
    removed: Inputs,
    added: Inputs,
}

impl State {
    /// Takes in each Service's new share.
    fn stage(&mut self, changed: Vec<(String, Desired)>) -> Staged {
        let mut staged = Staged::default();
        let mut touched = BTreeSet::new();
        for (service, new) in changed {
            let old = self.services.remove(&service).unwrap_or_default();
            for vs in old.table.keys() {
                if let Some(claims) = self.claims.get_mut(vs) {
                    claims.remove(&service);
                    if claims.is_empty() {
                        self.claims.remove(vs);
                    }
                }
                touched.insert(*vs);
            }
            for vs in new.table.keys() {
                self.claims.entry(*vs).or_default().insert(service.clone());
                touched.insert(*vs);
            }
            self.inputs.change(
                &old.inputs,
                &new.inputs,
                &mut staged.removed,
                &mut staged.added,
            );
            if !new.table.is_empty() || new.inputs != Inputs::default() {
                self.services.insert(service, new);
            }
        }
        for vs in touched {
            if let Some(before) = self.table.remove(&vs) {
                staged.before.insert(vs, before);
            }
            let wanted = self
                .claims
                .get(&vs)
                .and_then(|claims| claims.last())
                .and_then(|service| self.services.get(service))
                .and_then(|share| share.table.get(&vs));
            if let Some(wanted) = wanted {
                self.table.insert(vs, wanted.clone());
                staged.after.insert(vs, wanted.clone());
            }
        }
        staged
    }
}

/// The IPVS backend.
#[derive(Debug)]
pub struct IpvsBackend {
    config: IpvsConfig,
    /// What the last successful sync programmed; `None` forces a full sync that reads the
    /// kernel's state.
    state: Option<State>,
    /// The nftables families whose table tug has written (`false` while a write is under way
    /// or failed: the next sync replaces it).
    tables: BTreeMap<u8, bool>,
    /// Removed destinations waiting for their connections to end.
    draining: Draining,
}

impl IpvsBackend {
    /// A backend for `config`.
    pub fn new(config: IpvsConfig) -> IpvsBackend {
        IpvsBackend {
            config,
            state: None,
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

    /// Programs `ports` (everything): a full sync (or the first) reads the kernel's state first
    /// and removes what tug owns but no longer wants; otherwise every Service is compared with
    /// what was programmed.
    pub fn sync<'a>(
        &mut self,
        ports: impl IntoIterator<Item = &'a ServicePort>,
        full: bool,
    ) -> Result<SyncReport, IpvsBackendError> {
        let known = self.state.iter().flat_map(|state| state.services.keys());
        let services = crate::model::by_service(ports, known);
        self.program(services, full)
    }

    /// Programs the changes of some Services: each named Service's ports are now exactly those
    /// given (none: it is gone), every other Service stays as it is, and only these are looked
    /// at. Without a previous successful sync this cannot know the rest, and returns `None`:
    /// call [`IpvsBackend::sync`] with everything.
    pub fn sync_services<'a>(
        &mut self,
        changed: impl IntoIterator<Item = (&'a str, &'a [ServicePort])>,
    ) -> Option<Result<SyncReport, IpvsBackendError>> {
        self.state.as_ref()?;
        let changed = crate::model::changed_services(changed);
        Some(self.program(changed, false))
    }

    fn program(
        &mut self,
        services: Vec<(std::borrow::Cow<'_, str>, Vec<&ServicePort>)>,
        full: bool,
    ) -> Result<SyncReport, IpvsBackendError> {
        let mut ipvs = Ipvs::open()?;
        let mut device = VipDevice::ensure()?;
        let node_ips = node_addresses(device.other_addresses()?, &self.config.node_port_cidrs);
        // New node addresses change every NodePort's virtual services: start again.
        let previous = self
            .state
            .take()
            .filter(|state| !full && state.node_ips == node_ips);
        let full = previous.is_none();
        let mut state = previous.unwrap_or_default();
        state.node_ips = node_ips.clone();
        let changed = services
            .into_iter()
            .map(|(service, ports)| {
                (
                    service.into_owned(),
                    desired(ports, &node_ips, &self.config.scheduler),
                )
            })
            .collect();
        let staged = state.stage(changed);
        let (current, wanted, add, remove) = if full {
            set_sysctls()?;
            let on_device: BTreeSet<IpAddr> = device.addresses()?.into_iter().collect();
            let current = self.owned_in_kernel(&mut ipvs, &on_device, &node_ips)?;
            let wanted: BTreeSet<IpAddr> = state.inputs.vips.0.keys().copied().collect();
            let add = wanted.difference(&on_device).copied().collect();
            let remove = on_device.difference(&wanted).copied().collect();
            (current, state.table.clone(), add, remove)
        } else {
            // An address one Service dropped and another took is neither added nor removed.
            let add: Vec<IpAddr> = staged
                .added
                .vips
                .iter()
                .filter(|ip| !staged.removed.vips.contains(ip))
                .copied()
                .collect();
            let remove: Vec<IpAddr> = staged
                .removed
                .vips
                .iter()
                .filter(|ip| !staged.added.vips.contains(ip))
                .copied()
                .collect();
            (staged.before, staged.after, add, remove)
        };
        device.change(&add, &[])?;
        let mut ops = drain(diff(&current, &wanted), &mut self.draining);
        ipvs.apply(&ops)?;
        // Destinations whose connections have ended go now.
        let mut counted = BTreeMap::new();
        let draining: BTreeSet<VirtualServer> =
            self.draining.iter().map(|(vs, _, _)| *vs).collect();
        for vs in draining {
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
        for (ipv6, family) in [(false, FAMILY_IPV4), (true, FAMILY_IPV6)] {
            // A family gets its table once it has a Service address or a cluster CIDR
            // (a node without IPv6 netfilter modules needs no IPv6 table).
            let needed = state.inputs.vips.0.keys().any(|ip| ip.is_ipv6() == ipv6)
                || self
                    .config
                    .cluster_cidrs
                    .iter()
                    .any(|c| c.contains(':') == ipv6);
            let in_place = self.tables.get(&family).copied();
            if !needed && in_place.is_none() {
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
            let batch = if !full && in_place == Some(true) {
                // The fixed part renders the same on both sides: only entries differ.
                crate::nftables::update(
                    &rules::render(&config, &staged.removed),
                    &rules::render(&config, &staged.added),
                    family,
                )
            } else {
                rules::render(&config, &state.inputs.totals()).replace(family)
            };
            if batch.is_empty() {
                continue;
            }
            rules_changed += batch.len();
            // Until it is known to be in place, the next sync replaces the table.
            self.tables.insert(family, false);
            nft::apply(batch)?;
            self.tables.insert(family, true);
        }
        let services = state.table.len();
        self.state = Some(state);
        Ok(SyncReport {
            full,
            written: ops.len() + add.len() + remove.len() + rules_changed,
            deleted: 0,
            chains: services,
        })
    }

    /// Removes tug's virtual services, the VIP device and the rules.
    pub fn cleanup(&mut self) -> Result<(), IpvsBackendError> {
        self.state = None;
        match Ipvs::open() {
            Ok(mut ipvs) => {
                let vips: BTreeSet<IpAddr> = match nix::net::if_::if_nametoindex(DEVICE) {
                    Ok(_) => VipDevice::ensure()?.addresses()?.into_iter().collect(),
                    Err(_) => BTreeSet::new(),
                };
                let local: Vec<IpAddr> = crate::addresses::local_addresses()
                    .into_iter()
                    .filter(|ip| !vips.contains(ip))
                    .collect();
                let node_ips = node_addresses(local, &self.config.node_port_cidrs);
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

    /// What the kernel holds after `ops` (destinations keyed by address and port).
    fn apply_ops(kernel: &mut Table, ops: &[Op]) {
        for op in ops {
            match op {
                Op::AddService(vs, scheduling) => {
                    assert!(
                        kernel
                            .insert(*vs, (scheduling.clone(), BTreeSet::new()))
                            .is_none(),
                        "{op}: exists"
                    );
                }
                Op::EditService(vs, scheduling) => {
                    kernel.get_mut(vs).expect("edited service exists").0 = scheduling.clone()
                }
                Op::DelService(vs) => assert!(kernel.remove(vs).is_some(), "{op}: absent"),
                Op::AddDest(vs, dest) | Op::EditDest(vs, dest) => {
                    let dests = &mut kernel.get_mut(vs).expect("service of a destination").1;
                    dests.retain(|d| (d.address, d.port) != (dest.address, dest.port));
                    dests.insert(*dest);
                }
                Op::DelDest(vs, dest) => {
                    let dests = &mut kernel.get_mut(vs).expect("service of a destination").1;
                    dests.retain(|d| (d.address, d.port) != (dest.address, dest.port));
                }
            }
        }
    }

    fn sorted<T: Ord + Clone>(list: &[T]) -> Vec<T> {
        let mut list = list.to_vec();
        list.sort();
        list.dedup();
        list
    }

    /// Random changes to a few Services (some sharing addresses): what staging them one Service
    /// at a time sends to the kernel leaves it exactly as the whole model wants it.
    #[test]
    fn staged_changes_leave_the_kernel_as_the_whole_model_wants_it() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let node: IpAddr = "192.168.1.10".parse().unwrap();
        let mut ports: BTreeMap<String, ServicePort> = BTreeMap::new();
        let mut state = State::default();
        let mut kernel = Table::new();
        let mut rules = Inputs::default();
        let mut vips: BTreeSet<IpAddr> = BTreeSet::new();
        for step in 0..300 {
            let service = format!("ns/s{}", next(6));
            let changed: Vec<(String, Desired)> = if next(4) == 0 {
                ports.remove(&service);
                vec![(service, Desired::default())]
            } else {
                let mut port = web();
                port.name = format!("{service}:http");
                port.cluster_ips = vec![format!("10.96.0.{}", next(4) + 1).parse().unwrap()];
                port.external_ips = if next(2) == 0 {
                    vec!["192.0.2.50".parse().unwrap()]
                } else {
                    vec![]
                };
                port.node_port = (next(2) == 0).then(|| 30080 + next(2) as u16);
                port.cluster_endpoints = (0..next(3))
                    .map(|i| endpoint(&format!("10.244.{}.{}", i, next(3)), false))
                    .collect();
                port.external_endpoints = port.cluster_endpoints.clone();
                port.affinity_timeout = (next(3) == 0).then_some(60);
                let wanted = desired([&port], &[node], "rr");
                ports.insert(service.clone(), port);
                vec![(service, wanted)]
            };
            let staged = state.stage(changed);
            apply_ops(&mut kernel, &diff(&staged.before, &staged.after));
            let whole = desired(ports.values(), &[node], "rr");
            assert_eq!(kernel, whole.table, "step {step}: virtual services");
            assert_eq!(state.table, whole.table, "step {step}");
            for ip in &staged.removed.vips {
                if !staged.added.vips.contains(ip) {
                    assert!(vips.remove(ip), "step {step}: {ip} removed twice");
                }
            }
            for ip in &staged.added.vips {
                if !staged.removed.vips.contains(ip) {
                    assert!(vips.insert(*ip), "step {step}: {ip} added twice");
                }
            }
            assert_eq!(vips, whole.vips, "step {step}: addresses on the device");
            // nftables entries: as `update` applies a removed and an added render.
            macro_rules! follow {
                ($field:ident) => {{
                    let (removed, added) =
                        (sorted(&staged.removed.$field), sorted(&staged.added.$field));
                    rules
                        .$field
                        .retain(|e| !removed.contains(e) || added.contains(e));
                    rules
                        .$field
                        .extend(added.iter().filter(|e| !removed.contains(e)).cloned());
                    assert_eq!(
                        sorted(&rules.$field),
                        sorted(&whole.inputs.$field),
                        "step {step}: {}",
                        stringify!($field)
                    );
                }};
            }
            follow!(cluster);
            follow!(external);
            follow!(services);
            follow!(node_ports);
            follow!(endpoints);
            follow!(vips);
            let totals = state.inputs.totals();
            assert_eq!(
                sorted(&totals.endpoints),
                sorted(&whole.inputs.endpoints),
                "step {step}"
            );
        }
    }
}
