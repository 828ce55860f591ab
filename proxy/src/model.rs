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

/// Computes the service ports to program.
pub fn build(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> (Vec<ServicePort>, Vec<Skipped>) {
    let mut ports = Vec::new();
    let mut skipped = Vec::new();
    let mut node_ports: BTreeMap<(u16, Protocol), String> = BTreeMap::new();
    // Services in a stable order, so that a NodePort conflict always skips the same one.
    let mut services: Vec<&Service> = services.iter().collect();
    services.sort_by_key(|s| {
        (
            s.metadata.creation_timestamp.as_ref().map(|t| t.0),
            s.metadata.namespace.clone(),
            s.metadata.name.clone(),
        )
    });
    for service in services {
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let name = service.metadata.name.clone().unwrap_or_default();
        let id = format!("{namespace}/{name}");
        let Some(spec) = &service.spec else { continue };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        if kind == "ExternalName" || spec.cluster_ip.as_deref() == Some("None") {
            continue; // no virtual IP: nothing to program
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
                continue;
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
            &mut skipped,
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
            parse_ips(&lb_texts, "load balancer IP", &mut skipped)
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
        let my_slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
            .filter(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    == Some(&name)
            })
            .collect();
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
                    if let Some(owner) = node_ports.get(&(n, protocol)) {
                        skipped.push(Skipped {
                            service: port_id,
                            reason: format!(
                                "nodePort {n}/{} is already used by {owner}",
                                protocol.as_str()
                            ),
                        });
                        continue;
                    }
                    node_ports.insert((n, protocol), port_id.clone());
                    Some(n)
                }
            };
            let candidates = endpoints_for(
                &my_slices,
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
    }
    (ports, skipped)
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
}
