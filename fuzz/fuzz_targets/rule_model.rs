//! kube-proxy's rule model and its three renderings. Services and EndpointSlices as the API
//! could deliver them (including values validation would refuse: a proxy must not trust that
//! every object it watches is valid) are set and deleted in any order. Asserts:
//! - the model kept up to date one change at a time equals a build from scratch;
//! - every iptables rule is one line (nothing in an object can add a rule of its own) with a
//!   comment the kernel takes, and
//!   the iptables-restore input for an unchanged sync rewrites no Service chain;
//! - the nftables batches build, and an unchanged ruleset needs an empty update;
//! - IPVS: syncing the same wanted table twice changes nothing the second time.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use tug_proxy::iptables::{self, IptablesConfig};
use tug_proxy::ipvs;
use tug_proxy::model::{Model, NodeContext, ServicePort, build};
use tug_proxy::nftables::{self, NftConfig};

/// A string from a small pool (so objects collide and refer to each other), or any.
#[derive(Debug, Arbitrary)]
enum Text {
    Pool(u8),
    Any(String),
}

impl Text {
    fn pick(&self, pool: &[&str]) -> String {
        match self {
            Text::Pool(i) => pool[*i as usize % pool.len()].to_owned(),
            Text::Any(s) => s.clone(),
        }
    }
}

const NAMES: &[&str] = &["web", "db", "dns", "api", ""];
const PORT_NAMES: &[&str] = &["http", "", "dns-udp", "metrics"];
const IPS: &[&str] = &[
    "10.96.0.10",
    "10.96.0.11",
    "fd00::10",
    "10.244.1.5",
    "10.244.2.7",
    "fd00:244::5",
    "192.0.2.10",
    "None",
    "",
    "10.96.0.300",
    "::ffff:10.96.0.10",
];
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP", "ICMP", ""];
const TYPES: &[&str] = &[
    "ClusterIP",
    "NodePort",
    "LoadBalancer",
    "ExternalName",
    "Weird",
];
const POLICIES: &[&str] = &["Cluster", "Local", ""];

#[derive(Debug, Arbitrary)]
struct Port {
    name: Text,
    protocol: Text,
    port: i32,
    node_port: Option<i32>,
    target: Option<i32>,
}

#[derive(Debug, Arbitrary)]
struct ServiceInput {
    name: Text,
    kind: Text,
    cluster_ips: Vec<Text>,
    ports: Vec<Port>,
    external_ips: Vec<Text>,
    load_balancer_ips: Vec<Text>,
    external_policy: Text,
    internal_policy: Text,
    affinity: Option<i32>,
    health_check_node_port: Option<i32>,
    created: u8,
}

#[derive(Debug, Arbitrary)]
struct EndpointInput {
    addresses: Vec<Text>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    local: bool,
}

#[derive(Debug, Arbitrary)]
struct SliceInput {
    slot: u8,
    service: Text,
    ipv6: bool,
    ports: Vec<Port>,
    endpoints: Vec<EndpointInput>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    SetService(ServiceInput),
    DeleteService(Text),
    SetSlice(SliceInput),
    DeleteSlice(u8),
    Sync,
}

fn texts(list: &[Text], pool: &[&str]) -> Vec<String> {
    list.iter().map(|t| t.pick(pool)).collect()
}

fn port_json(port: &Port, with_node_port: bool) -> Value {
    let mut value = json!({
        "name": port.name.pick(PORT_NAMES),
        "protocol": port.protocol.pick(PROTOCOLS),
        "port": port.port,
    });
    if let Some(target) = port.target {
        value["targetPort"] = json!(target);
    }
    if let (true, Some(node_port)) = (with_node_port, port.node_port) {
        value["nodePort"] = json!(node_port);
    }
    value
}

fn service(input: &ServiceInput) -> Option<Service> {
    let cluster_ips = texts(&input.cluster_ips, IPS);
    let mut spec = json!({
        "type": input.kind.pick(TYPES),
        "ports": input.ports.iter().map(|p| port_json(p, true)).collect::<Vec<_>>(),
        "externalIPs": texts(&input.external_ips, IPS),
        "externalTrafficPolicy": input.external_policy.pick(POLICIES),
        "internalTrafficPolicy": input.internal_policy.pick(POLICIES),
    });
    if let Some(first) = cluster_ips.first() {
        spec["clusterIP"] = json!(first);
        spec["clusterIPs"] = json!(cluster_ips);
    }
    if let Some(timeout) = input.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": timeout}});
    }
    if let Some(port) = input.health_check_node_port {
        spec["healthCheckNodePort"] = json!(port);
    }
    let ingress: Vec<Value> = texts(&input.load_balancer_ips, IPS)
        .into_iter()
        .map(|ip| json!({"ip": ip}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": input.name.pick(NAMES), "namespace": "ns",
            "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", input.created % 60),
        },
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress}},
    }))
    .ok()
}

fn slice(input: &SliceInput) -> Option<EndpointSlice> {
    let endpoints: Vec<Value> = input
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": texts(&e.addresses, IPS),
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": if e.local { "node-a" } else { "node-b" },
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("slice-{}", input.slot % 8), "namespace": "ns",
            "labels": {"kubernetes.io/service-name": input.service.pick(NAMES)},
        },
        "addressType": if input.ipv6 { "IPv6" } else { "IPv4" },
        "ports": input.ports.iter().map(|p| port_json(p, false)).collect::<Vec<_>>(),
        "endpoints": endpoints,
    }))
    .ok()
}

fn sorted(mut ports: Vec<ServicePort>) -> Vec<ServicePort> {
    ports.sort_by(|a, b| a.name.cmp(&b.name));
    ports
}

/// What the backends hold between syncs.
#[derive(Default)]
struct Kernel {
    iptables: BTreeMap<String, u64>,
    nft: Option<nftables::Ruleset>,
    ipvs: ipvs::Table,
}

fn sync(model: &Model, kernel: &mut Kernel) {
    let ports: Vec<ServicePort> = model.ports().cloned().collect();
    for ipv6 in [false, true] {
        let config = IptablesConfig {
            cluster_cidr: Some(
                if ipv6 {
                    "fd00:244::/56"
                } else {
                    "10.244.0.0/16"
                }
                .into(),
            ),
            ipv6,
            ..Default::default()
        };
        let rendered = iptables::render(&ports, &config);
        for rule in rendered
            .nat
            .iter()
            .chain(&rendered.filter)
            .chain(rendered.service_chains.values().flatten())
        {
            assert!(
                !rule.contains(['\n', '\r', '\0']),
                "a rule spans lines: {rule:?}"
            );
            if let Some((_, rest)) = rule.split_once("--comment \"") {
                let comment = rest.split('"').next().unwrap_or_default();
                assert!(
                    comment.len() <= 255,
                    "a comment the kernel refuses: {rule:?}"
                );
            }
        }
        if !ipv6 {
            let applied = iptables::restore_input(&rendered, &kernel.iptables, &BTreeSet::new());
            kernel.iptables = applied.chains.clone();
            let again = iptables::restore_input(&rendered, &kernel.iptables, &BTreeSet::new());
            assert_eq!(
                (again.written, again.deleted),
                (0, 0),
                "an unchanged sync rewrites Service chains"
            );
        }
    }
    let nft_config = NftConfig {
        cluster_cidr: Some("10.244.0.0/16".into()),
        ..Default::default()
    };
    let ruleset = nftables::render(&ports, &nft_config);
    let _ = ruleset.replace(2).finish();
    if let Some(old) = &kernel.nft {
        let _ = nftables::update(old, &ruleset, 2).finish();
    }
    assert!(
        nftables::update(&ruleset, &ruleset, 2).is_empty(),
        "an unchanged ruleset needs changes"
    );
    kernel.nft = Some(ruleset);
    let node_ips = ["192.0.2.1".parse().expect("an address")];
    let wanted = ipvs::desired(&ports, &node_ips, "rr").table;
    let _ops = ipvs::diff(&kernel.ipvs, &wanted);
    assert!(
        ipvs::diff(&wanted, &wanted).is_empty(),
        "IPVS changes a table already wanted"
    );
    kernel.ipvs = wanted;
}

fuzz_target!(|ops: Vec<Op>| {
    let node = NodeContext {
        node_name: "node-a".into(),
        ..Default::default()
    };
    let mut model = Model::new(node.clone());
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut kernel = Kernel::default();
    for op in &ops {
        match op {
            Op::SetService(input) => {
                if let Some(service) = service(input) {
                    let key = format!("ns/{}", input.name.pick(NAMES));
                    services.insert(key.clone(), service.clone());
                    model.set_service(&key, Some(service));
                }
            }
            Op::DeleteService(name) => {
                let key = format!("ns/{}", name.pick(NAMES));
                services.remove(&key);
                model.set_service(&key, None);
            }
            Op::SetSlice(input) => {
                if let Some(slice) = slice(input) {
                    let key = format!("ns/slice-{}", input.slot % 8);
                    slices.insert(key.clone(), slice.clone());
                    model.set_slice(&key, Some(slice));
                }
            }
            Op::DeleteSlice(slot) => {
                let key = format!("ns/slice-{}", slot % 8);
                slices.remove(&key);
                model.set_slice(&key, None);
            }
            Op::Sync => {
                model.update();
                let service_list: Vec<Service> = services.values().cloned().collect();
                let slice_list: Vec<EndpointSlice> = slices.values().cloned().collect();
                let (scratch, _) = build(&service_list, &slice_list, &node);
                assert_eq!(
                    sorted(model.ports().cloned().collect()),
                    sorted(scratch),
                    "the kept-up model differs from a build from scratch"
                );
                sync(&model, &mut kernel);
            }
        }
    }
});
