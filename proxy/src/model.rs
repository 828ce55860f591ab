//! The pure model: (Services, EndpointSlices, this node) → the service ports to program, with
//! their endpoints already chosen the way upstream kube-proxy chooses them. Backends (iptables,
//! nftables, IPVS) consume this and only apply differences; every rule decision is made here.
//!
//! Semantics follow upstream: ready endpoints serve; when none is ready, serving-and-terminating
//! ones do (graceful termination); `internalTrafficPolicy: Local` limits cluster traffic and
//! `externalTrafficPolicy: Local` limits external traffic to this node's endpoints; a port with
//! no endpoints rejects; headless and ExternalName Services get no rules. A Service that cannot
//! be programmed (bad IP, port, protocol, or a NodePort already taken) is skipped with a reason —
//! every other Service is still programmed.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};

/// L4 protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    fn parse(text: Option<&str>) -> Option<Protocol> {
        match text.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Lower-case name, as iptables and upstream's chain hashes write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// What the model needs to know about this node.
#[derive(Debug, Clone)]
pub struct NodeContext {
    /// This node's name (for Local traffic policies).
    pub node_name: String,
    /// The NodePort range, inclusive.
    pub node_port_range: (u16, u16),
}

impl Default for NodeContext {
    fn default() -> Self {
        NodeContext {
            node_name: String::new(),
            node_port_range: (30000, 32767),
        }
    }
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Address.
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// Whether it runs on this node.
    pub local: bool,
}

impl Endpoint {
    /// `ip:port` (`[ip]:port` for IPv6), as upstream hashes it.
    pub fn address(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }
}

/// One service port, ready to program.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// `namespace/name:port` (`namespace/name` when the port has no name), as upstream names it.
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// ClusterIPs (one per family).
    pub cluster_ips: Vec<IpAddr>,
    /// The service port.
    pub port: u16,
    /// NodePort, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
    /// External IPs.
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs.
    pub load_balancer_ips: Vec<IpAddr>,
    /// ClientIP session affinity timeout, when affinity is on.
    pub affinity_timeout: Option<u32>,
    /// Endpoints for traffic from inside the cluster (ClusterIP).
    pub cluster_endpoints: Vec<Endpoint>,
    /// Endpoints for traffic from outside (NodePort, external and LoadBalancer IPs).
    pub external_endpoints: Vec<Endpoint>,
    /// The health-check NodePort of an `externalTrafficPolicy: Local` Service.
    pub health_check_node_port: Option<u16>,
    /// `externalTrafficPolicy: Local`: external traffic keeps its source address and goes only
    /// to this node's endpoints.
    pub external_policy_local: bool,
}

impl ServicePort {
    /// Upstream's per-service chain: `KUBE-SVC-<hash>`.
    pub fn service_chain(&self) -> String {
        format!("KUBE-SVC-{}", port_proto_hash(&self.name, self.protocol))
    }

    /// Upstream's external-traffic chain: `KUBE-EXT-<hash>`.
    pub fn external_chain(&self) -> String {
        format!("KUBE-EXT-{}", port_proto_hash(&self.name, self.protocol))
    }

    /// Upstream's chain for this node's endpoints (`externalTrafficPolicy: Local`): `KUBE-SVL-<hash>`.
    pub fn local_chain(&self) -> String {
        format!("KUBE-SVL-{}", port_proto_hash(&self.name, self.protocol))
    }

    /// Upstream's per-endpoint chain: `KUBE-SEP-<hash>`.
    pub fn endpoint_chain(&self, endpoint: &Endpoint) -> String {
        let digest = Sha256::digest(format!(
            "{}{}{}",
            self.name,
            self.protocol.as_str(),
            endpoint.address()
        ));
        format!("KUBE-SEP-{}", &base32(&digest)[..16])
    }

    /// Whether traffic from inside the cluster is rejected (no endpoint to send it to).
    pub fn rejects_cluster_traffic(&self) -> bool {
        self.cluster_endpoints.is_empty()
    }
}

fn port_proto_hash(name: &str, protocol: Protocol) -> String {
    base32(&Sha256::digest(format!("{name}{}", protocol.as_str())))[..16].to_owned()
}

/// RFC 4648 base32 with padding (Go's `base32.StdEncoding`).
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in bytes.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                out.push(ALPHABET[((bits >> (35 - 5 * i)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A Service (or one of its ports) left out, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `namespace/name` (and `:port` when only a port is left out).
    pub service: String,
    /// Why.
    pub reason: String,
}

/// Computes the service ports to program from scratch (what [`Model`] keeps up to date one
/// change at a time), in Service order.
pub fn build(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> (Vec<ServicePort>, Vec<Skipped>) {
    let mut model = Model::new(node.clone());
    for service in services {
        model.set_service(&object_key(&service.metadata), Some(service.clone()));
    }
    for slice in slices {
        model.set_slice(&object_key(&slice.metadata), Some(slice.clone()));
    }
    model.update();
    (
        model.ports().cloned().collect(),
        model.skipped().cloned().collect(),
    )
}

/// `namespace/name` of an object, as the model keys Services and EndpointSlices.
pub fn object_key(metadata: &kube::api::ObjectMeta) -> String {
    format!(
        "{}/{}",
        metadata.namespace.as_deref().unwrap_or_default(),
        metadata.name.as_deref().unwrap_or_default()
    )
}

/// The Service an EndpointSlice belongs to (`namespace/name`, from its
/// `kubernetes.io/service-name` label).
fn owner(slice: &EndpointSlice) -> Option<String> {
    let name = slice
        .metadata
        .labels
        .as_ref()?
        .get("kubernetes.io/service-name")?;
    Some(format!(
        "{}/{name}",
        slice.metadata.namespace.as_deref().unwrap_or_default()
    ))
}

/// Which of two Services claiming one NodePort keeps it: the older, then by name.
type Order = (Option<jiff::Timestamp>, String);

/// One Service's ports before NodePorts are shared out.
#[derive(Debug, Default)]
struct Built {
    order: Order,
    ports: Vec<ServicePort>,
    skipped: Vec<Skipped>,
}

impl Built {
    /// What its ports claim, each with the claiming port's name.
    fn claims(&self) -> impl Iterator<Item = (Claim, &str)> {
        self.ports
            .iter()
            .flat_map(|p| port_claims(p).into_iter().map(|c| (c, p.name.as_str())))
    }
}

/// What a service port holds alone on this node: each of its Service addresses with its
/// protocol and port, and its NodePort. Two Services wanting one (a NodePort or an externalIP
/// both were given) cannot both be programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Claim {
    NodePort(u16, Protocol),
    Address(IpAddr, Protocol, u16),
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::NodePort(port, protocol) => write!(f, "nodePort {port}/{}", protocol.as_str()),
            Claim::Address(ip, protocol, port) => {
                write!(
                    f,
                    "address {}/{}",
                    Endpoint {
                        ip: *ip,
                        port: *port,
                        local: false
                    }
                    .address(),
                    protocol.as_str()
                )
            }
        }
    }
}

fn port_claims(port: &ServicePort) -> BTreeSet<Claim> {
    let mut claims: BTreeSet<Claim> = port
        .cluster_ips
        .iter()
        .chain(&port.external_ips)
        .chain(&port.load_balancer_ips)
        .map(|ip| Claim::Address(*ip, port.protocol, port.port))
        .collect();
    if let Some(node_port) = port.node_port {
        claims.insert(Claim::NodePort(node_port, port.protocol));
    }
    claims
}

/// The model kept up to date: Services and EndpointSlices go in one change at a time, and
/// [`Model::update`] rebuilds only the Services they touch (and those contending with them for a
/// NodePort), so a change costs the same whatever the number of Services. A NodePort two
/// Services claim stays with the older one.
#[derive(Debug)]
pub struct Model {
    node: NodeContext,
    services: BTreeMap<String, Service>,
    slices: BTreeMap<String, EndpointSlice>,
    /// Service → its slices' keys.
    slices_of: BTreeMap<String, BTreeSet<String>>,
    built: BTreeMap<String, Built>,
    /// Each claim → the ports making it, the winner (the oldest) first.
    claims: BTreeMap<Claim, BTreeSet<(Order, String)>>,
    /// The outcome: each Service's ports to program (Services with none are absent).
    ports: BTreeMap<String, Vec<ServicePort>>,
    /// Each Service's ports left out, with why (Services with none are absent).
    skipped: BTreeMap<String, Vec<Skipped>>,
    dirty: BTreeSet<String>,
}

impl Model {
    /// An empty model for `node`.
    pub fn new(node: NodeContext) -> Model {
        Model {
            node,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            built: BTreeMap::new(),
            claims: BTreeMap::new(),
            ports: BTreeMap::new(),
            skipped: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Sets (or with `None` removes) the Service `namespace/name`.
    pub fn set_service(&mut self, key: &str, service: Option<Service>) {
        match service {
            Some(service) => self.services.insert(key.to_owned(), service),
            None => self.services.remove(key),
        };
        self.dirty.insert(key.to_owned());
    }

    /// Sets (or with `None` removes) the EndpointSlice `namespace/name`.
    pub fn set_slice(&mut self, key: &str, slice: Option<EndpointSlice>) {
        let old = match slice {
            Some(slice) => {
                let new_owner = owner(&slice);
                if let Some(service) = &new_owner {
                    self.slices_of
                        .entry(service.clone())
                        .or_default()
                        .insert(key.to_owned());
                    self.dirty.insert(service.clone());
                }
                let old = self.slices.insert(key.to_owned(), slice);
                // Still its owner's: nothing to unlink.
                old.filter(|old| owner(old) != new_owner)
            }
            None => self.slices.remove(key),
        };
        if let Some(service) = old.as_ref().and_then(owner) {
            if let Some(keys) = self.slices_of.get_mut(&service) {
                keys.remove(key);
                if keys.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            self.dirty.insert(service);
        }
    }

    /// The Services in the model.
    pub fn services(&self) -> &BTreeMap<String, Service> {
        &self.services
    }

    /// The EndpointSlices in the model.
    pub fn slices(&self) -> &BTreeMap<String, EndpointSlice> {
        &self.slices
    }

    /// Rebuilds what changed since the last update; returns the Services (`namespace/name`)
    /// whose ports to program differ from before, each with the ports it had.
    pub fn update(&mut self) -> BTreeMap<String, Vec<ServicePort>> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut contested = BTreeSet::new();
        for key in &dirty {
            if let Some(old) = self.built.remove(key) {
                for (claim, port) in old.claims() {
                    contested.insert(claim);
                    if let Some(set) = self.claims.get_mut(&claim) {
                        set.remove(&(old.order.clone(), port.to_owned()));
                        if set.is_empty() {
                            self.claims.remove(&claim);
                        }
                    }
                }
            }
            let Some(service) = self.services.get(key) else {
                continue;
            };
            let slices: Vec<&EndpointSlice> = self
                .slices_of
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|k| self.slices.get(k))
                .collect();
            let built = build_service(key, service, &slices, &self.node);
            for (claim, port) in built.claims() {
                contested.insert(claim);
                self.claims
                    .entry(claim)
                    .or_default()
                    .insert((built.order.clone(), port.to_owned()));
            }
            self.built.insert(key.clone(), built);
        }
        // Every Service contending for what a rebuilt one held or holds may have won or lost it.
        let mut redo = dirty;
        for claim in &contested {
            for (_, port) in self.claims.get(claim).into_iter().flatten() {
                redo.insert(service_of(port).to_owned());
            }
        }
        let mut changed = BTreeMap::new();
        for key in redo {
            let (ports, skipped) = match self.built.get(&key) {
                Some(built) => self.share_out(built),
                None => (Vec::new(), Vec::new()),
            };
            let before = if ports.is_empty() {
                self.ports.remove(&key)
            } else {
                self.ports.insert(key.clone(), ports)
            };
            if before.as_ref() != self.ports.get(&key) {
                changed.insert(key.clone(), before.unwrap_or_default());
            }
            if skipped.is_empty() {
                self.skipped.remove(&key);
            } else {
                self.skipped.insert(key, skipped);
            }
        }
        changed
    }

    /// A Service's ports that win all their claims, and its ports left out.
    fn share_out(&self, built: &Built) -> (Vec<ServicePort>, Vec<Skipped>) {
        let mut skipped = built.skipped.clone();
        let mut ports = Vec::new();
        for port in &built.ports {
            let lost = port_claims(port).into_iter().find_map(|claim| {
                let (_, winner) = self.claims.get(&claim)?.first()?;
                (*winner != port.name).then_some((claim, winner))
            });
            match lost {
                Some((claim, winner)) => skipped.push(Skipped {
                    service: port.name.clone(),
                    reason: format!("{claim} is already used by {winner}"),
                }),
                None => ports.push(port.clone()),
            }
        }
        (ports, skipped)
    }

    /// Every service port to program, by Service.
    pub fn ports(&self) -> impl Iterator<Item = &ServicePort> {
        self.ports.values().flatten()
    }

    /// The ports to program of one Service (`namespace/name`).
    pub fn ports_of(&self, service: &str) -> &[ServicePort] {
        self.ports.get(service).map_or(&[], Vec::as_slice)
    }

    /// How many service ports there are to program.
    pub fn port_count(&self) -> usize {
        self.ports.values().map(Vec::len).sum()
    }

    /// Every Service or port left out, with why.
    pub fn skipped(&self) -> impl Iterator<Item = &Skipped> {
        self.skipped.values().flatten()
    }
}

/// `namespace/name` of a service port's name (`namespace/name:port`).
pub fn service_of(port: &str) -> &str {
    port.split_once(':').map_or(port, |(service, _)| service)
}

/// `ports` grouped by Service, for a backend comparing everything with what it programmed:
/// each Service named in `known` (those programmed before) and not among `ports` has none now.
pub fn by_service<'a, 'k>(
    ports: impl IntoIterator<Item = &'a ServicePort>,
    known: impl IntoIterator<Item = &'k String>,
) -> Vec<(Cow<'a, str>, Vec<&'a ServicePort>)> {
    let mut services: foldhash::HashMap<&'a str, Vec<&'a ServicePort>> = Default::default();
    for port in ports {
        services
            .entry(service_of(&port.name))
            .or_default()
            .push(port);
    }
    let mut out: Vec<(Cow<'a, str>, Vec<&'a ServicePort>)> = known
        .into_iter()
        .filter(|service| !services.contains_key(service.as_str()))
        .map(|service| (Cow::Owned(service.clone()), Vec::new()))
        .collect();
    out.extend(
        services
            .into_iter()
            .map(|(service, ports)| (Cow::Borrowed(service), ports)),
    );
    out
}

/// The changed Services with their ports, as a backend's partial sync walks them.
pub fn changed_services<'a>(
    changed: impl IntoIterator<Item = (&'a str, &'a [ServicePort])>,
) -> Vec<(Cow<'a, str>, Vec<&'a ServicePort>)> {
    changed
        .into_iter()
        .map(|(name, ports)| (Cow::Borrowed(name), ports.iter().collect()))
        .collect()
}

/// One Service's ports (NodePorts not yet shared out) and what is left out of it.
fn build_service(
    id: &str,
    service: &Service,
    my_slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Built {
    let mut built = Built {
        order: (
            service.metadata.creation_timestamp.as_ref().map(|t| t.0),
            id.to_owned(),
        ),
        ..Default::default()
    };
    let (ports, skipped) = (&mut built.ports, &mut built.skipped);
    let id = id.to_owned();
    let Some(spec) = &service.spec else {
        return built;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" || spec.cluster_ip.as_deref() == Some("None") {
        return built; // no virtual IP: nothing to program
    }
    let ip_texts: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let cluster_ips: Result<Vec<IpAddr>, _> =
        ip_texts.iter().map(|t| t.parse::<IpAddr>()).collect();
    let cluster_ips = match cluster_ips {
        Ok(ips) if !ips.is_empty() => ips,
        _ => {
            skipped.push(Skipped {
                service: id,
                reason: format!("unparsable clusterIPs {ip_texts:?}"),
            });
            return built;
        }
    };
    let parse_ips = |texts: &[String], what: &str, skipped: &mut Vec<Skipped>| -> Vec<IpAddr> {
        texts
            .iter()
            .filter_map(|t| match t.parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    skipped.push(Skipped {
                        service: id.clone(),
                        reason: format!("ignored unparsable {what} {t:?}"),
                    });
                    None
                }
            })
            .collect()
    };
    let external_ips = parse_ips(
        spec.external_ips.as_deref().unwrap_or_default(),
        "externalIP",
        skipped,
    );
    let lb_texts: Vec<String> = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    let load_balancer_ips = if kind == "LoadBalancer" {
        parse_ips(&lb_texts, "load balancer IP", skipped)
    } else {
        Vec::new()
    };
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(10800, |t| t.clamp(1, 86400) as u32)
    });
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = matches!(kind, "NodePort" | "LoadBalancer")
        && spec.external_traffic_policy.as_deref() == Some("Local");
    for port in spec.ports.iter().flatten() {
        let port_id = match port.name.as_deref() {
            Some(p) if !p.is_empty() => format!("{id}:{p}"),
            _ => id.clone(),
        };
        let Some(protocol) = Protocol::parse(port.protocol.as_deref()) else {
            skipped.push(Skipped {
                service: port_id,
                reason: format!("unsupported protocol {:?}", port.protocol),
            });
            continue;
        };
        let Ok(number) = u16::try_from(port.port)
            .map_err(|_| ())
            .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
        else {
            skipped.push(Skipped {
                service: port_id,
                reason: format!("port {} is outside 1-65535", port.port),
            });
            continue;
        };
        let node_port = match port
            .node_port
            .filter(|_| matches!(kind, "NodePort" | "LoadBalancer"))
        {
            None => None,
            Some(n) => {
                let Some(n) = u16::try_from(n)
                    .ok()
                    .filter(|n| (node.node_port_range.0..=node.node_port_range.1).contains(n))
                else {
                    skipped.push(Skipped {
                        service: port_id,
                        reason: format!(
                            "nodePort {n} is outside {}-{}",
                            node.node_port_range.0, node.node_port_range.1
                        ),
                    });
                    continue;
                };
                Some(n)
            }
        };
        let candidates = endpoints_for(
            my_slices,
            port.name.as_deref().unwrap_or(""),
            protocol,
            &cluster_ips,
            &node.node_name,
        );
        let cluster_endpoints = choose(&candidates, internal_local);
        let external_endpoints = choose(&candidates, external_local);
        let health_check_node_port = if external_local {
            spec.health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
        } else {
            None
        };
        ports.push(ServicePort {
            name: port_id,
            protocol,
            cluster_ips: cluster_ips.clone(),
            port: number,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            affinity_timeout,
            cluster_endpoints,
            external_endpoints,
            health_check_node_port,
            external_policy_local: external_local,
        });
    }
    built
}

#[derive(Debug, Clone)]
struct Candidate {
    endpoint: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// The endpoints of one service port across its slices, in the ClusterIP's families.
fn endpoints_for(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    cluster_ips: &[IpAddr],
    node_name: &str,
) -> Vec<Candidate> {
    let families: BTreeSet<bool> = cluster_ips.iter().map(IpAddr::is_ipv4).collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices {
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && Protocol::parse(p.protocol.as_deref()) == Some(protocol)
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            // Unset ready/serving mean true; unset terminating means false (EndpointSlice API).
            let ready = conditions.ready.unwrap_or(true);
            let serving = conditions.serving.unwrap_or(ready);
            let terminating = conditions.terminating.unwrap_or(false);
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                if !families.contains(&ip.is_ipv4()) || !seen.insert((ip, target)) {
                    continue;
                }
                let local =
                    endpoint.node_name.as_deref() == Some(node_name) && !node_name.is_empty();
                out.push(Candidate {
                    endpoint: Endpoint {
                        ip,
                        port: target,
                        local,
                    },
                    ready,
                    serving,
                    terminating,
                });
            }
        }
    }
    out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    out
}

/// Ready endpoints (only local ones when `local_only`); when none is ready, those serving while
/// terminating.
fn choose(candidates: &[Candidate], local_only: bool) -> Vec<Endpoint> {
    let eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !local_only || c.endpoint.local)
        .collect();
    let ready: Vec<Endpoint> = eligible
        .iter()
        .filter(|c| c.ready)
        .map(|c| c.endpoint.clone())
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    eligible
        .iter()
        .filter(|c| c.serving && c.terminating)
        .map(|c| c.endpoint.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).expect("service JSON")
    }

    fn slice(
        namespace: &str,
        service: &str,
        port: (&str, i32),
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{service}-abc"), "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}], "endpoints": endpoints,
        }))
        .expect("slice JSON")
    }

    fn node() -> NodeContext {
        NodeContext {
            node_name: "node-a".into(),
            ..Default::default()
        }
    }

    fn web(extra: serde_json::Value) -> Service {
        let mut value = json!({"metadata": {"name": "svc1", "namespace": "ns1"}, "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 8080}]}});
        if let (Some(spec), Some(extra)) = (value["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        service(value)
    }

    #[test]
    fn chain_names_match_upstream_kube_proxy() {
        // Literals from upstream's proxier tests: KUBE-SVC-XPGD46QRK7WJZT7O for ns1/svc1:p80,
        // KUBE-SEP-SXIVWICOYRO3J4NJ for its endpoint 10.180.0.1:80.
        let port = ServicePort {
            name: "ns1/svc1:p80".into(),
            protocol: Protocol::Tcp,
            cluster_ips: vec![],
            port: 80,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            affinity_timeout: None,
            cluster_endpoints: vec![],
            external_endpoints: vec![],
            health_check_node_port: None,
            external_policy_local: false,
        };
        assert_eq!(port.service_chain(), "KUBE-SVC-XPGD46QRK7WJZT7O");
        let endpoint = Endpoint {
            ip: "10.180.0.1".parse().unwrap(),
            port: 80,
            local: false,
        };
        assert_eq!(port.endpoint_chain(&endpoint), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        assert!(
            port.external_chain()
                .starts_with("KUBE-EXT-XPGD46QRK7WJZT7O")
        );
        assert_eq!(base32(b"f"), "MY======");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
    }

    #[test]
    fn ready_endpoints_serve_and_terminating_ones_only_when_none_is_ready() {
        let slices = [slice(
            "ns1",
            "svc1",
            ("p80", 8080),
            json!([
                {"addresses": ["10.180.0.1"], "conditions": {"ready": true}, "nodeName": "node-a"},
                {"addresses": ["10.180.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "node-b"},
                {"addresses": ["10.180.0.3"], "conditions": {"ready": false, "serving": false}}
            ]),
        )];
        let (ports, skipped) = build(&[web(json!({}))], &slices, &node());
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name, "ns1/svc1:p80");
        let ips: Vec<String> = ports[0]
            .cluster_endpoints
            .iter()
            .map(Endpoint::address)
            .collect();
        assert_eq!(
            ips,
            ["10.180.0.1:8080"],
            "only the ready endpoint while one is ready"
        );

        let terminating_only = [slice(
            "ns1",
            "svc1",
            ("p80", 8080),
            json!([
                {"addresses": ["10.180.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.180.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}}
            ]),
        )];
        let (ports, _) = build(&[web(json!({}))], &terminating_only, &node());
        let ips: Vec<String> = ports[0]
            .cluster_endpoints
            .iter()
            .map(Endpoint::address)
            .collect();
        assert_eq!(
            ips,
            ["10.180.0.2:8080"],
            "serving terminating endpoints keep connections alive"
        );
        let (ports, _) = build(&[web(json!({}))], &[], &node());
        assert!(ports[0].rejects_cluster_traffic(), "no endpoints: reject");
    }

    #[test]
    fn local_traffic_policies_keep_to_this_nodes_endpoints() {
        let slices = [slice(
            "ns1",
            "svc1",
            ("p80", 8080),
            json!([
                {"addresses": ["10.180.0.1"], "nodeName": "node-a"},
                {"addresses": ["10.180.1.1"], "nodeName": "node-b"}
            ]),
        )];
        let service = web(
            json!({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 31999,
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
        );
        let (ports, _) = build(&[service], &slices, &node());
        assert_eq!(
            ports[0].cluster_endpoints.len(),
            2,
            "cluster traffic uses every endpoint"
        );
        assert_eq!(
            ports[0]
                .external_endpoints
                .iter()
                .map(|e| e.ip.to_string())
                .collect::<Vec<_>>(),
            ["10.180.0.1"]
        );
        assert_eq!(ports[0].node_port, Some(30080));
        assert_eq!(ports[0].health_check_node_port, Some(31999));
        let internal = web(json!({"internalTrafficPolicy": "Local"}));
        let (ports, _) = build(&[internal], &slices, &node());
        assert_eq!(ports[0].cluster_endpoints.len(), 1);
        assert!(ports[0].cluster_endpoints[0].local);
    }

    #[test]
    fn affinity_headless_external_name_and_load_balancers() {
        let affinity = web(
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}),
        );
        assert_eq!(
            build(&[affinity], &[], &node()).0[0].affinity_timeout,
            Some(600)
        );
        assert_eq!(
            build(&[web(json!({"sessionAffinity": "ClientIP"}))], &[], &node()).0[0]
                .affinity_timeout,
            Some(10800)
        );
        let headless = web(json!({"clusterIP": "None", "clusterIPs": ["None"]}));
        let external_name = web(json!({"type": "ExternalName", "externalName": "example.com"}));
        let (ports, skipped) = build(&[headless, external_name], &[], &node());
        assert!(
            ports.is_empty() && skipped.is_empty(),
            "no virtual IP, nothing to program, nothing wrong"
        );
        let mut lb = web(
            json!({"type": "LoadBalancer", "externalIPs": ["192.0.2.7"], "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 30081}]}),
        );
        lb.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}))
                .unwrap(),
        );
        let (ports, _) = build(&[lb], &[], &node());
        assert_eq!(
            ports[0].external_ips,
            ["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            ports[0].load_balancer_ips,
            ["198.51.100.9".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn a_bad_service_is_skipped_with_a_reason_and_the_others_still_programmed() {
        let good = web(json!({}));
        let bad_ip = service(
            json!({"metadata": {"name": "badip", "namespace": "ns1"}, "spec": {"clusterIP": "10.96.0.999", "ports": [{"port": 80}]}}),
        );
        let bad_port = service(
            json!({"metadata": {"name": "badport", "namespace": "ns1"}, "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "a", "port": 70000}, {"name": "b", "port": 81}]}}),
        );
        let first = service(
            json!({"metadata": {"name": "first", "namespace": "ns1", "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.12", "ports": [{"port": 80, "nodePort": 30100}]}}),
        );
        let second = service(
            json!({"metadata": {"name": "second", "namespace": "ns1", "creationTimestamp": "2026-01-02T00:00:00Z"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.13", "ports": [{"port": 80, "nodePort": 30100}]}}),
        );
        let out_of_range = service(
            json!({"metadata": {"name": "range", "namespace": "ns1"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.14", "ports": [{"port": 80, "nodePort": 80}]}}),
        );
        let (ports, skipped) = build(
            &[second, bad_ip, good, bad_port, first, out_of_range],
            &[],
            &node(),
        );
        let names: BTreeSet<&str> = ports.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            BTreeSet::from(["ns1/svc1:p80", "ns1/badport:b", "ns1/first"])
        );
        let reasons: BTreeMap<&str, &str> = skipped
            .iter()
            .map(|s| (s.service.as_str(), s.reason.as_str()))
            .collect();
        assert!(
            reasons["ns1/badip"].contains("unparsable clusterIPs"),
            "{reasons:?}"
        );
        assert!(reasons["ns1/badport:a"].contains("70000"), "{reasons:?}");
        assert!(
            reasons["ns1/second"].contains("already used by ns1/first"),
            "the older Service keeps its NodePort: {reasons:?}"
        );
        assert!(
            reasons["ns1/range"].contains("outside 30000-32767"),
            "{reasons:?}"
        );
    }

    /// Random Services (some contending for NodePorts) and slices, changed one at a time: after
    /// every update the model equals a build from scratch, and it names exactly the Services
    /// whose ports changed, with the ports they had.
    #[test]
    fn the_model_kept_up_to_date_equals_a_build_from_scratch() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut model = Model::new(node());
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let mut before: Vec<ServicePort> = Vec::new();
        for step in 0..400 {
            let name = format!("s{}", next(12));
            let key = format!("ns1/{name}");
            match next(5) {
                0 => {
                    services.remove(&key);
                    model.set_service(&key, None);
                }
                1 | 2 => {
                    let service = service(json!({
                        "metadata": {"name": name, "namespace": "ns1", "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", next(60))},
                        "spec": {"type": "NodePort", "clusterIP": format!("10.96.0.{}", next(200) + 1),
                                 "ports": [{"name": "p80", "port": 80, "nodePort": 30000 + next(4)}]}
                    }));
                    services.insert(key.clone(), service.clone());
                    model.set_service(&key, Some(service));
                }
                3 => {
                    // A slice may also move to another Service.
                    let slice_name = format!("slice{}", next(8));
                    let slice_key = format!("ns1/{slice_name}");
                    let mut slice = slice(
                        "ns1",
                        &name,
                        ("p80", 8080),
                        json!([{"addresses": [format!("10.180.0.{}", next(200) + 1)]}]),
                    );
                    slice.metadata.name = Some(slice_name);
                    slices.insert(slice_key.clone(), slice.clone());
                    model.set_slice(&slice_key, Some(slice));
                }
                _ => {
                    let slice_key = format!("ns1/slice{}", next(8));
                    slices.remove(&slice_key);
                    model.set_slice(&slice_key, None);
                }
            }
            if next(3) == 0 {
                continue; // several changes may go into one update
            }
            let changed = model.update();
            let service_list: Vec<Service> = services.values().cloned().collect();
            let slice_list: Vec<EndpointSlice> = slices.values().cloned().collect();
            let (mut scratch, mut skipped) = build(&service_list, &slice_list, &node());
            let mut now: Vec<ServicePort> = model.ports().cloned().collect();
            let by_name = |a: &ServicePort, b: &ServicePort| a.name.cmp(&b.name);
            now.sort_by(by_name);
            scratch.sort_by(by_name);
            assert_eq!(now, scratch, "step {step}");
            let mut kept: Vec<Skipped> = model.skipped().cloned().collect();
            let by_service = |a: &Skipped, b: &Skipped| a.service.cmp(&b.service);
            kept.sort_by(by_service);
            skipped.sort_by(by_service);
            assert_eq!(kept, skipped, "step {step}");
            let differs: BTreeSet<&str> = before
                .iter()
                .chain(&now)
                .map(|p| service_of(&p.name))
                .filter(|s| {
                    let of = |list: &[ServicePort]| -> Vec<ServicePort> {
                        list.iter()
                            .filter(|p| service_of(&p.name) == *s)
                            .cloned()
                            .collect()
                    };
                    of(&before) != of(&now)
                })
                .collect();
            assert_eq!(
                changed.keys().map(String::as_str).collect::<BTreeSet<_>>(),
                differs,
                "step {step}: the changed Services"
            );
            for (service, had) in &changed {
                let of_before: Vec<&ServicePort> = before
                    .iter()
                    .filter(|p| service_of(&p.name) == service)
                    .collect();
                assert_eq!(had.iter().collect::<Vec<_>>(), of_before, "step {step}");
            }
            before = now;
        }
    }

    #[test]
    fn a_service_address_two_services_claim_stays_with_the_older_until_it_goes() {
        let claimant = |name: &str, created: &str, ip: &str| {
            service(
                json!({"metadata": {"name": name, "namespace": "ns1", "creationTimestamp": created},
                "spec": {"clusterIP": ip, "externalIPs": ["192.0.2.50"], "ports": [{"name": "http", "port": 80}]}}),
            )
        };
        let mut model = Model::new(node());
        model.set_service(
            "ns1/new",
            Some(claimant("new", "2026-01-02T00:00:00Z", "10.96.0.2")),
        );
        model.set_service(
            "ns1/old",
            Some(claimant("old", "2026-01-01T00:00:00Z", "10.96.0.1")),
        );
        model.update();
        assert_eq!(
            model.ports().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["ns1/old:http"]
        );
        let skipped: Vec<&Skipped> = model.skipped().collect();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].service, "ns1/new:http");
        assert_eq!(
            skipped[0].reason,
            "address 192.0.2.50:80/tcp is already used by ns1/old:http"
        );
        model.set_service("ns1/old", None);
        let changed = model.update();
        assert_eq!(
            changed.keys().collect::<Vec<_>>(),
            ["ns1/new", "ns1/old"],
            "the newer Service takes the address over"
        );
        assert_eq!(
            model.ports().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["ns1/new:http"]
        );
        assert_eq!(model.skipped().count(), 0);
    }
}
