//! netns tier: kube-proxy rules with real traffic. A client namespace reaches endpoint pods
//! through a ClusterIP and a NodePort on a node namespace programmed by tug's backends, with
//! both of iptables' backends (nf_tables and legacy).

use std::net::SocketAddr;
use std::process::Command;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use tug_proxy::iptables::{Iptables, IptablesConfig};
use tug_proxy::model::{NodeContext, ServicePort, build};
use tug_tests::netns::Netns;
use tug_tests::services::{CLUSTER_CIDR, NODE_IP, ServiceLab};
use tug_tests::tier::{Tier, require};

const CLUSTER_IP: &str = "172.30.0.41";

fn service(affinity: bool) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {
            "type": "NodePort",
            "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
            "sessionAffinity": if affinity { "ClientIP" } else { "None" },
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080},
                {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 8053}
            ]
        }
    }))
    .unwrap()
}

fn slice(pods: &[u8]) -> EndpointSlice {
    let endpoints: Vec<_> = pods
        .iter()
        .map(|i| json!({"addresses": [format!("10.180.0.{i}")], "conditions": {"ready": true}, "nodeName": "node-a"}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "web-abc", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}, {"name": "dns", "protocol": "UDP", "port": 8053}]
    }))
    .unwrap()
}

fn ports(services: &[Service], slices: &[EndpointSlice]) -> Vec<ServicePort> {
    let (ports, skipped) = build(
        services,
        slices,
        &NodeContext {
            node_name: "node-a".into(),
            ..Default::default()
        },
    );
    assert!(skipped.is_empty(), "{skipped:?}");
    ports
}

fn run(node: &Netns, program: &str, args: &[&str]) -> String {
    node.run(|| {
        let output = Command::new(program).args(args).output().expect("run");
        assert!(
            output.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    })
}

fn exercise_iptables(base: &str) {
    let lab = ServiceLab::new(2, 8080, 8053);
    let node = &lab.node;
    // Another tool's rules in the same tables, which every sync must leave alone.
    run(node, base, &["-t", "nat", "-N", "OTHER-TOOL"]);
    run(
        node,
        base,
        &[
            "-t",
            "nat",
            "-A",
            "OTHER-TOOL",
            "-p",
            "tcp",
            "--dport",
            "9999",
            "-j",
            "RETURN",
        ],
    );
    run(
        node,
        base,
        &["-t", "nat", "-A", "PREROUTING", "-j", "OTHER-TOOL"],
    );
    run(
        node,
        base,
        &[
            "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9998", "-j", "ACCEPT",
        ],
    );
    let others_intact = || {
        let saved = run(node, &format!("{base}-save"), &[]);
        assert!(
            saved.contains("-A OTHER-TOOL -p tcp -m tcp --dport 9999 -j RETURN"),
            "{saved}"
        );
        assert!(saved.contains("-A PREROUTING -j OTHER-TOOL"), "{saved}");
        assert!(
            saved.contains("-A INPUT -p tcp -m tcp --dport 9998 -j ACCEPT"),
            "{saved}"
        );
    };

    let mut proxy = Iptables::new(
        base,
        IptablesConfig {
            cluster_cidr: Some(CLUSTER_CIDR.into()),
            ..Default::default()
        },
    );
    let both = ports(&[service(false)], &[slice(&[1, 2])]);
    let report = node.run(|| proxy.sync(&both, false)).expect("first sync");
    assert!(report.full, "the first sync is a full one");
    others_intact();

    let vip: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
    let hits = ServiceLab::tcp_hits(&lab.client, vip, 40);
    assert_eq!(
        hits.len(),
        2,
        "both endpoints serve the ClusterIP over TCP: {hits:?}"
    );
    let (_, seen) = ServiceLab::tcp_once(&lab.client, vip).unwrap();
    assert!(
        !seen.starts_with("192.168.50.2"),
        "an off-cluster client is masqueraded (pod saw {seen})"
    );
    let udp = ServiceLab::udp_hits(&lab.client, format!("{CLUSTER_IP}:53").parse().unwrap(), 40);
    assert_eq!(
        udp.len(),
        2,
        "both endpoints serve the ClusterIP over UDP: {udp:?}"
    );
    let node_port: SocketAddr = format!("{NODE_IP}:30080").parse().unwrap();
    assert_eq!(
        ServiceLab::tcp_hits(&lab.client, node_port, 40).len(),
        2,
        "the NodePort reaches both endpoints"
    );
    assert_eq!(
        ServiceLab::tcp_hits(node, vip, 20).len(),
        2,
        "the node itself reaches the ClusterIP"
    );

    // An unchanged resync writes no per-service chain.
    let report = node.run(|| proxy.sync(&both, false)).expect("resync");
    assert_eq!((report.full, report.written, report.deleted), (false, 0, 0));

    // Session affinity pins a client to one endpoint.
    let pinned = ports(&[service(true)], &[slice(&[1, 2])]);
    node.run(|| proxy.sync(&pinned, false))
        .expect("affinity sync");
    let hits = ServiceLab::tcp_hits(&lab.client, vip, 20);
    assert_eq!(hits.len(), 1, "ClientIP affinity pins the client: {hits:?}");
    others_intact();

    // An endpoint goes away: traffic moves to the other one.
    let one = ports(&[service(false)], &[slice(&[2])]);
    let report = node
        .run(|| proxy.sync(&one, false))
        .expect("endpoint removed");
    assert!(
        report.deleted >= 1,
        "the gone endpoint's chain is deleted: {report:?}"
    );
    let hits = ServiceLab::tcp_hits(&lab.client, vip, 20);
    assert_eq!(hits.keys().collect::<Vec<_>>(), ["pod-2"], "{hits:?}");

    // No endpoints: rejected at once, not left to time out.
    let none = ports(&[service(false)], &[slice(&[])]);
    node.run(|| proxy.sync(&none, false)).expect("no endpoints");
    let refused = ServiceLab::tcp_once(&lab.client, vip).expect_err("no endpoint to reach");
    assert!(refused.contains("refused"), "{refused}");

    // A restarted proxy (fresh state) converges and deletes what is stale.
    let mut restarted = Iptables::new(
        base,
        IptablesConfig {
            cluster_cidr: Some(CLUSTER_CIDR.into()),
            ..Default::default()
        },
    );
    node.run(|| restarted.sync(&both, false))
        .expect("sync after restart");
    assert_eq!(ServiceLab::tcp_hits(&lab.client, vip, 20).len(), 2);

    // The Service is deleted: its rules go.
    node.run(|| restarted.sync(&[], false))
        .expect("service deleted");
    let saved = run(node, &format!("{base}-save"), &["-t", "nat"]);
    assert!(
        !saved.contains("KUBE-SVC-") && !saved.contains("KUBE-SEP-"),
        "{saved}"
    );
    others_intact();

    // --cleanup removes everything tug programmed and nothing else.
    node.run(|| restarted.cleanup()).expect("cleanup");
    let saved = run(node, &format!("{base}-save"), &[]);
    assert!(!saved.contains("KUBE-"), "{saved}");
    others_intact();
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test proxy -- --ignored"]
fn iptables_mode_with_the_nf_tables_backend() {
    require(Tier::Netns);
    exercise_iptables("iptables-nft");
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test proxy -- --ignored"]
fn iptables_mode_with_the_legacy_backend() {
    require(Tier::Netns);
    exercise_iptables("iptables-legacy");
}
