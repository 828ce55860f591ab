//! netns tier: kube-proxy rules with real traffic. A client namespace reaches endpoint pods
//! through a ClusterIP and a NodePort on a node namespace programmed by tug's backends, with
//! both of iptables' backends (nf_tables and legacy).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use tug_proxy::iptables::{Iptables, IptablesConfig};
use tug_proxy::model::{NodeContext, ServicePort, build};
use tug_tests::cluster::cluster;
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

/// The proxy's model of `services` and `slices`, as its loop keeps it.
fn model(services: &[Service], slices: &[EndpointSlice]) -> tug_proxy::model::Model {
    let mut model = tug_proxy::model::Model::new(NodeContext {
        node_name: "node-a".into(),
        ..Default::default()
    });
    for service in services {
        model.set_service(
            &tug_proxy::model::object_key(&service.metadata),
            Some(service.clone()),
        );
    }
    for slice in slices {
        model.set_slice(
            &tug_proxy::model::object_key(&slice.metadata),
            Some(slice.clone()),
        );
    }
    model.update();
    assert_eq!(model.skipped().count(), 0);
    model
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

    // A long-lived UDP client (one source port) that conntrack pins to pod-1.
    let dns: SocketAddr = format!("{CLUSTER_IP}:53").parse().unwrap();
    let ask = |socket: &std::net::UdpSocket| {
        socket.send_to(b"hi", dns).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf).expect("a UDP answer");
        String::from_utf8_lossy(&buf[..n])
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    let long_lived = loop {
        let socket = lab
            .client
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap());
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        if ask(&socket) == "pod-1" {
            break socket;
        }
    };

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
    assert_eq!(
        ask(&long_lived),
        "pod-1",
        "conntrack still pins the UDP flow"
    );
    let stale = tug_proxy::conntrack::stale_udp(&both, &one);
    let cleared = node
        .run(|| tug_proxy::conntrack::clear(&stale))
        .expect("clear conntrack");
    assert!(cleared >= 1, "the pinned flow's entry is deleted");
    assert_eq!(
        ask(&long_lived),
        "pod-2",
        "after clearing, the same UDP flow moves to the live endpoint"
    );

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
fn iptables_mode_serves_a_dual_stack_service_over_ipv6() {
    let v4 = Iptables::new(
        "iptables-nft",
        IptablesConfig {
            cluster_cidr: Some(CLUSTER_CIDR.into()),
            ..Default::default()
        },
    );
    let v6 = Iptables::new(
        tug_proxy::iptables::ipv6_program("iptables-nft"),
        IptablesConfig {
            cluster_cidr: Some("fd00:180::/64".into()),
            ipv6: true,
            ..Default::default()
        },
    );
    serve_a_dual_stack_service(Box::new(v4), Box::new(v6));
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test proxy -- --ignored"]
fn nftables_mode_serves_a_dual_stack_service_over_ipv6() {
    use tug_proxy::nftables::{NftConfig, Nftables};
    let v4 = Nftables::new(NftConfig {
        cluster_cidr: Some(CLUSTER_CIDR.into()),
        ..Default::default()
    });
    let v6 = Nftables::new(NftConfig {
        cluster_cidr: Some("fd00:180::/64".into()),
        ipv6: true,
        ..Default::default()
    });
    serve_a_dual_stack_service(Box::new(v4), Box::new(v6));
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test proxy -- --ignored"]
fn iptables_mode_keeps_external_traffic_local() {
    keep_external_traffic_local(Box::new(Iptables::new(
        "iptables-nft",
        IptablesConfig {
            cluster_cidr: Some(CLUSTER_CIDR.into()),
            ..Default::default()
        },
    )));
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test proxy -- --ignored"]
fn nftables_mode_keeps_external_traffic_local() {
    use tug_proxy::nftables::{NftConfig, Nftables};
    keep_external_traffic_local(Box::new(Nftables::new(NftConfig {
        cluster_cidr: Some(CLUSTER_CIDR.into()),
        ..Default::default()
    })));
}

/// `externalTrafficPolicy: Local`: a NodePort reached from outside goes only to this node's
/// endpoint and keeps the client's address; the node's own traffic to it goes to any endpoint,
/// masqueraded; pods reach the ClusterIP as usual.
fn keep_external_traffic_local(mut backend: Box<dyn tug_proxy::backend::RuleBackend>) {
    require(Tier::Netns);
    let lab = ServiceLab::new(2, 8080, 8053);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {
            "type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080}]
        }
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-abc", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.180.0.1"], "conditions": {"ready": true}, "nodeName": "node-a"},
            {"addresses": ["10.180.0.2"], "conditions": {"ready": true}, "nodeName": "node-b"}
        ],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
    }))
    .unwrap();
    let model = model(&[service], &[slice]);
    let everything = BTreeSet::new();
    lab.node
        .run(|| backend.sync(&model, &everything, true))
        .expect("sync");
    let node_port: SocketAddr = format!("{NODE_IP}:30080").parse().unwrap();
    let hits = ServiceLab::tcp_hits(&lab.client, node_port, 20);
    assert_eq!(
        hits.keys().collect::<Vec<_>>(),
        ["pod-1"],
        "only the local endpoint: {hits:?}"
    );
    let (_, seen) = ServiceLab::tcp_once(&lab.client, node_port).unwrap();
    assert!(
        seen.contains("192.168.50.2"),
        "the client's address is kept: {seen}"
    );
    let from_node = ServiceLab::tcp_hits(&lab.node, node_port, 30);
    assert_eq!(
        from_node.len(),
        2,
        "the node's own traffic goes anywhere: {from_node:?}"
    );
    let (_, seen) = ServiceLab::tcp_once(&lab.node, node_port).unwrap();
    assert!(seen.contains("169.254.1.1"), "and is masqueraded: {seen}");
    let vip: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
    assert_eq!(
        ServiceLab::tcp_hits(&lab.pods[0], vip, 30).len(),
        2,
        "the ClusterIP is cluster-wide"
    );
}

fn serve_a_dual_stack_service(
    mut v4: Box<dyn tug_proxy::backend::RuleBackend>,
    mut v6: Box<dyn tug_proxy::backend::RuleBackend>,
) {
    require(Tier::Netns);
    let lab = ServiceLab::new(2, 8080, 8053);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {
            "type": "NodePort",
            "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP, "fd00:30::41"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080}]
        }
    }))
    .unwrap();
    let v6_slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-v6", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv6",
        "endpoints": [{"addresses": ["fd00:180::1"]}, {"addresses": ["fd00:180::2"]}],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
    }))
    .unwrap();
    let model = model(&[service], &[slice(&[1, 2]), v6_slice]);
    let everything = BTreeSet::new();
    lab.node
        .run(|| v4.sync(&model, &everything, true))
        .expect("IPv4 sync");
    lab.node
        .run(|| v6.sync(&model, &everything, true))
        .expect("IPv6 sync");
    let vip6: SocketAddr = "[fd00:30::41]:80".parse().unwrap();
    assert_eq!(
        ServiceLab::tcp_hits(&lab.client, vip6, 30).len(),
        2,
        "both IPv6 endpoints serve the IPv6 ClusterIP"
    );
    let node_port6: SocketAddr = format!("[{}]:30080", tug_tests::services::NODE_IP6)
        .parse()
        .unwrap();
    assert_eq!(
        ServiceLab::tcp_hits(&lab.client, node_port6, 30).len(),
        2,
        "the NodePort answers on IPv6"
    );
    let vip4: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
    assert_eq!(
        ServiceLab::tcp_hits(&lab.client, vip4, 20).len(),
        2,
        "IPv4 keeps working beside it"
    );
    // Hairpin over IPv6: pod-1 reaches the Service, and through it itself, masqueraded.
    let pod1 = (0..20)
        .filter_map(|_| ServiceLab::tcp_once(&lab.pods[0], vip6).ok())
        .find(|(pod, _)| pod == "pod-1")
        .expect("pod-1 reaches itself through the IPv6 ClusterIP");
    assert!(
        pod1.1.contains("fd00:ffff::1"),
        "masqueraded to the node: {}",
        pod1.1
    );
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

fn http_get(ns: &Netns, addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    ns.run(|| {
        let mut conn = std::net::TcpStream::connect(addr).ok()?;
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
    })
}

#[test]
#[ignore = "netns tier (root) with the cluster tier: run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test proxy -- --ignored"]
fn tug_proxy_follows_services_and_endpoint_slices_from_the_api() {
    follow_the_api("iptables");
}

#[test]
#[ignore = "netns tier (root) with the cluster tier: run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test proxy -- --ignored"]
fn tug_proxy_in_nftables_mode_follows_the_api() {
    follow_the_api("nftables");
}

fn follow_the_api(mode: &str) {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use std::time::Duration;
    use tug_tests::cluster::unique_name;
    use tug_tests::cni::tug_binary;
    use tug_tests::lan::{Lan, Relay, redirect_kubeconfig};
    require(Tier::Netns);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let lab = ServiceLab::new(2, 8080, 8053);
    // The node reaches the API through a relay on a link of its own to the host.
    let lan = Lan::new("px");
    lan.attach_host("192.168.59.254/24");
    lan.attach(&lab.node, "eth1", "192.168.59.1/24");
    let server = cluster()
        .server_url()
        .trim_start_matches("https://")
        .to_owned();
    let relay = Relay::start("192.168.59.254:0".parse().unwrap(), &server);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let yaml = runtime.block_on(cluster().proxy_kubeconfig());
    std::fs::write(
        &kubeconfig,
        redirect_kubeconfig(&yaml, &format!("https://{}", relay.addr()), "kubernetes"),
    )
    .unwrap();

    let admin = runtime.block_on(cluster().admin());
    let ns = runtime.block_on(cluster().namespace("proxy"));
    let services: Api<Service> = Api::namespaced(admin.clone(), ns.name());
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), ns.name());
    let name = unique_name("web");
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let created = runtime
        .block_on(services.create(&PostParams::default(), &service))
        .expect("create the Service");
    let cluster_ip = created.spec.unwrap().cluster_ip.expect("a ClusterIP");
    let slice_for = |pods: &[u8]| -> EndpointSlice {
        let addresses: Vec<String> = pods.iter().map(|i| format!("10.180.0.{i}")).collect();
        tug_tests::services::http_endpoint_slice(&name, &addresses)
    };
    runtime
        .block_on(slices.create(&PostParams::default(), &slice_for(&[1, 2])))
        .expect("create the EndpointSlice");

    let log = dir.path().join("proxy.log");
    let mut proxy = std::process::Command::new("nsenter")
        .arg(format!("--net={}", lab.node.path().display()))
        .arg(tug_binary())
        .args(["proxy", "--kubeconfig"])
        .arg(&kubeconfig)
        .args([
            "--hostname-override",
            "tug-proxy-test",
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--iptables-program",
            "iptables-nft",
            "--proxy-mode",
            mode,
        ])
        .args([
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start tug proxy");
    let _kill = KillOnDrop(&mut proxy);
    let proxy_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let vip: SocketAddr = format!("{cluster_ip}:80").parse().unwrap();
    let wait = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} within 30 s; proxy log:\n{}",
                proxy_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("the ClusterIP to reach both endpoints", &|| {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            match ServiceLab::tcp_once(&lab.client, vip) {
                Ok((pod, _)) => {
                    seen.insert(pod);
                }
                Err(_) => return false,
            }
        }
        seen.len() == 2
    });
    let (status, body) =
        http_get(&lab.node, "127.0.0.1:10256", "/healthz").expect("healthz answers");
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = http_get(&lab.node, "127.0.0.1:10249", "/metrics").expect("metrics answer");
    assert!(metrics.contains("tug_proxy_syncs_total"), "{metrics}");
    let (_, proxy_mode) =
        http_get(&lab.node, "127.0.0.1:10249", "/proxyMode").expect("/proxyMode answers");
    assert_eq!(
        proxy_mode, mode,
        "/proxyMode names the mode, as upstream's does"
    );

    // The EndpointSlice loses pod 1: traffic follows.
    let patch =
        json!({"endpoints": [{"addresses": ["10.180.0.2"], "conditions": {"ready": true}}]});
    runtime
        .block_on(slices.patch(
            &format!("{name}-tug"),
            &PatchParams::default(),
            &Patch::Merge(patch),
        ))
        .expect("patch the EndpointSlice");
    wait("traffic to move to pod 2", &|| {
        (0..10).all(|_| ServiceLab::tcp_once(&lab.client, vip).is_ok_and(|(pod, _)| pod == "pod-2"))
    });

    // The Service goes: its rules go.
    runtime
        .block_on(services.delete(&name, &DeleteParams::default()))
        .expect("delete the Service");
    wait("the Service's rules to go", &|| {
        let rules = if mode == "nftables" {
            run(&lab.node, "nft", &["list", "ruleset"])
        } else {
            run(&lab.node, "iptables-nft-save", &["-t", "nat"])
        };
        !rules.contains(&cluster_ip)
    });
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test proxy -- --ignored"]
fn nftables_mode_programs_services_over_netlink() {
    use tug_proxy::nftables::{NftConfig, Nftables};
    require(Tier::Netns);
    let lab = ServiceLab::new(2, 8080, 8053);
    let node = &lab.node;
    // Another tool's table, which tug's transactions must leave alone.
    run(
        node,
        "nft",
        &[
            "add table inet other-tool; add chain inet other-tool c { type filter hook input priority 0; }; add rule inet other-tool c tcp dport 9999 accept",
        ],
    );
    let mut proxy = Nftables::new(NftConfig {
        cluster_cidr: Some(CLUSTER_CIDR.into()),
        ..Default::default()
    });
    let both = ports(&[service(false)], &[slice(&[1, 2])]);
    node.run(|| proxy.sync(&both, false))
        .expect("nftables sync");

    // Read back what the kernel holds, with nft's own parser.
    let listed: serde_json::Value = serde_json::from_str(&run(
        node,
        "nft",
        &["-j", "list", "table", "ip", "tug-proxy"],
    ))
    .expect("nft -j output");
    let objects = listed["nftables"].as_array().unwrap();
    let named = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o[kind]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {listed}"))
            .clone()
    };
    let set = named("set", "cluster-ips");
    assert_eq!(
        set["set"]["type"],
        json!(["ipv4_addr", "inet_proto", "inet_service"]),
        "{set}"
    );
    assert!(set["set"]["elem"].to_string().contains(CLUSTER_IP), "{set}");
    // Plain Services are map entries: address . protocol . port . slot → endpoint.
    let map = named("map", "endpoints-2");
    assert_eq!(
        map["map"]["type"],
        json!(["ipv4_addr", "inet_proto", "inet_service", "mark"]),
        "{map}"
    );
    assert_eq!(map["map"]["map"], "ipv4_addr . inet_service", "{map}");
    let elements = map["map"]["elem"].to_string();
    assert!(
        elements.contains(CLUSTER_IP) && elements.contains("10.180.0.2"),
        "{elements}"
    );
    // nft's own listing reads the table back, rule by rule.
    let text = run(
        node,
        "nft",
        &["list", "chain", "ip", "tug-proxy", "services"],
    );
    assert!(
        text.contains("numgen random mod 2 map @endpoints-2"),
        "{text}"
    );
    assert!(objects.iter().any(|o| o["chain"]["name"] == "services"));

    let vip: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
    assert_eq!(
        ServiceLab::tcp_hits(&lab.client, vip, 40).len(),
        2,
        "both endpoints serve the ClusterIP over TCP"
    );
    let (_, seen) = ServiceLab::tcp_once(&lab.client, vip).unwrap();
    assert!(
        !seen.contains("192.168.50.2"),
        "an off-cluster client is masqueraded (pod saw {seen})"
    );
    let udp = ServiceLab::udp_hits(&lab.client, format!("{CLUSTER_IP}:53").parse().unwrap(), 40);
    assert_eq!(udp.len(), 2, "UDP too: {udp:?}");
    let node_port: SocketAddr = format!("{NODE_IP}:30080").parse().unwrap();
    assert_eq!(
        ServiceLab::tcp_hits(&lab.client, node_port, 40).len(),
        2,
        "the NodePort"
    );
    assert_eq!(
        ServiceLab::tcp_hits(node, vip, 20).len(),
        2,
        "the node itself"
    );

    // Session affinity: a dynamic set per endpoint pins each client.
    let pinned = ports(&[service(true)], &[slice(&[1, 2])]);
    node.run(|| proxy.sync(&pinned, false))
        .expect("affinity sync");
    let hits = ServiceLab::tcp_hits(&lab.client, vip, 20);
    assert_eq!(hits.len(), 1, "ClientIP affinity pins the client: {hits:?}");
    let sets = run(node, "nft", &["list", "sets", "table", "ip", "tug-proxy"]);
    assert!(
        sets.contains("192.168.50.2") || sets.contains("169.254.1.1"),
        "the client is remembered: {sets}"
    );
    node.run(|| proxy.sync(&both, false)).expect("affinity off");
    assert!(
        !run(node, "nft", &["list", "table", "ip", "tug-proxy"]).contains("affinity-"),
        "affinity sets go with affinity"
    );

    let one = ports(&[service(false)], &[slice(&[2])]);
    node.run(|| proxy.sync(&one, false))
        .expect("endpoint removed");
    let hits = ServiceLab::tcp_hits(&lab.client, vip, 20);
    assert_eq!(hits.keys().collect::<Vec<_>>(), ["pod-2"], "{hits:?}");
    // Hairpin: the only endpoint reaches itself through its Service, masqueraded so that the
    // reply comes back through the NAT.
    let (pod, seen) = ServiceLab::tcp_once(&lab.pods[1], vip).expect("pod-2 reaches itself");
    assert_eq!(pod, "pod-2");
    assert!(
        seen.contains("169.254.1.1"),
        "masqueraded to the node: {seen}"
    );
    let (_, seen) = ServiceLab::tcp_once(&lab.pods[0], vip).expect("pod-1 reaches pod-2");
    assert!(
        seen.contains("10.180.0.1"),
        "another pod keeps its address: {seen}"
    );

    let none = ports(&[service(false)], &[slice(&[])]);
    node.run(|| proxy.sync(&none, false)).expect("no endpoints");
    let refused = ServiceLab::tcp_once(&lab.client, vip).expect_err("no endpoint to reach");
    assert!(refused.contains("refused"), "{refused}");
    let refused =
        ServiceLab::tcp_once(&lab.client, node_port).expect_err("no endpoint behind the NodePort");
    assert!(refused.contains("refused"), "{refused}");

    node.run(|| proxy.sync(&[], false))
        .expect("service deleted");
    assert!(!run(node, "nft", &["list", "table", "ip", "tug-proxy"]).contains(CLUSTER_IP));
    node.run(|| proxy.cleanup()).expect("cleanup");
    let all = run(node, "nft", &["list", "ruleset"]);
    assert!(!all.contains("tug-proxy"), "{all}");
    assert!(
        all.contains("table inet other-tool") && all.contains("tcp dport 9999 accept"),
        "{all}"
    );
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test proxy -- --ignored"]
fn node_port_addresses_limit_where_node_ports_answer() {
    use tug_proxy::backend::RuleBackend;
    use tug_proxy::nftables::{NftConfig, Nftables};
    require(Tier::Netns);
    let cidrs = tug_proxy::addresses::parse(&["192.168.50.1/32".into()]).unwrap();
    let both = model(&[service(false)], &[slice(&[1, 2])]);
    let everything = BTreeSet::new();
    let backends: Vec<(&str, Box<dyn RuleBackend>)> = vec![
        (
            "iptables",
            Box::new(Iptables::new(
                "iptables-nft",
                IptablesConfig {
                    cluster_cidr: Some(CLUSTER_CIDR.into()),
                    node_port_cidrs: cidrs.clone(),
                    ..Default::default()
                },
            )),
        ),
        (
            "nftables",
            Box::new(Nftables::new(NftConfig {
                cluster_cidr: Some(CLUSTER_CIDR.into()),
                node_port_cidrs: cidrs.clone(),
                ..Default::default()
            })),
        ),
    ];
    for (mode, mut backend) in backends {
        let lab = ServiceLab::new(2, 8080, 8053);
        // A second node address, outside nodePortAddresses.
        lab.node
            .ip(&["addr", "add", "192.168.50.3/24", "dev", "c0"]);
        lab.node
            .run(|| backend.sync(&both, &everything, true))
            .expect("sync");
        let allowed: SocketAddr = format!("{NODE_IP}:30080").parse().unwrap();
        assert_eq!(
            ServiceLab::tcp_hits(&lab.client, allowed, 10).len(),
            2,
            "{mode}: the NodePort answers on {NODE_IP}"
        );
        let other: SocketAddr = "192.168.50.3:30080".parse().unwrap();
        assert!(
            ServiceLab::tcp_once(&lab.client, other).is_err(),
            "{mode}: not on an address outside nodePortAddresses"
        );
        let vip: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
        assert!(
            ServiceLab::tcp_once(&lab.client, vip).is_ok(),
            "{mode}: ClusterIPs are unaffected"
        );
    }
}

/// nft's JSON listing of tug's table, in a form two tables holding the same rules share: set
/// and map entries sorted, rules kept in order per chain, kernel handles dropped.
fn table_contents(ns: &Netns) -> BTreeSet<String> {
    let listed: serde_json::Value =
        serde_json::from_str(&run(ns, "nft", &["-j", "list", "table", "ip", "tug-proxy"]))
            .expect("nft -j output");
    let mut out = BTreeSet::new();
    let mut rules: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for object in listed["nftables"].as_array().into_iter().flatten() {
        let Some((kind, body)) = object.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let mut body = body.clone();
        if let Some(fields) = body.as_object_mut() {
            fields.remove("handle");
            if let Some(serde_json::Value::Array(elements)) = fields.get_mut("elem") {
                elements.sort_by_key(|e| e.to_string());
            }
        }
        match kind.as_str() {
            "rule" => rules
                .entry(body["chain"].to_string())
                .or_default()
                .push(body.to_string()),
            "metainfo" => {}
            _ => {
                out.insert(format!("{kind} {body}"));
            }
        }
    }
    out.extend(
        rules
            .into_iter()
            .map(|(chain, list)| format!("rules of {chain}: {list:?}")),
    );
    out
}

/// The proxy's loop tells the nftables backend which Services changed and the backend looks at
/// those only: after every such change, over random Services, endpoints, affinity and
/// NodePorts, the kernel's table equals what a fresh full sync of the whole model writes.
#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test proxy -- --ignored"]
fn nftables_partial_syncs_leave_the_table_a_full_sync_writes() {
    use tug_proxy::model::{Model, object_key};
    use tug_proxy::nftables::{NftConfig, Nftables};
    require(Tier::Netns);
    let config = NftConfig {
        cluster_cidr: Some(CLUSTER_CIDR.into()),
        ..Default::default()
    };
    let (partial_ns, full_ns) = (Netns::new("nfp"), Netns::new("nff"));
    let mut partial = Nftables::new(config.clone());
    let mut model = Model::new(NodeContext {
        node_name: "node-a".into(),
        ..Default::default()
    });
    let mut seed = 0x1234_5678_9abc_def1_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    partial_ns
        .run(|| partial.sync(std::iter::empty(), true))
        .expect("empty table");
    for step in 0..60 {
        let name = format!("s{}", next(8));
        let namespace = "demo";
        let key = format!("{namespace}/{name}");
        match next(4) {
            0 => model.set_service(&key, None),
            1 | 2 => {
                let kind = if next(2) == 0 {
                    "ClusterIP"
                } else {
                    "NodePort"
                };
                let mut spec = json!({
                    "type": kind, "clusterIP": format!("172.30.0.{}", next(8) + 1),
                    "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                              {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 8053}]
                });
                if kind == "NodePort" {
                    spec["ports"][0]["nodePort"] = json!(30080 + next(3));
                }
                if next(3) == 0 {
                    spec["sessionAffinity"] = json!("ClientIP");
                }
                let service: Service = serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": spec
                }))
                .unwrap();
                model.set_service(&key, Some(service));
            }
            _ => {
                let pods: Vec<u8> = (0..next(4)).map(|_| next(6) as u8 + 1).collect();
                let mut slice = slice(&pods);
                slice.metadata.name = Some(format!("{name}-abc"));
                slice
                    .metadata
                    .labels
                    .get_or_insert_default()
                    .insert("kubernetes.io/service-name".into(), name.clone());
                model.set_slice(&object_key(&slice.metadata), Some(slice));
            }
        }
        let changed = model.update();
        let outcome = partial_ns
            .run(|| partial.sync_services(changed.keys().map(|s| (s.as_str(), model.ports_of(s)))));
        outcome
            .expect("a previous sync")
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        let mut fresh = Nftables::new(config.clone());
        full_ns
            .run(|| fresh.sync(model.ports(), true))
            .expect("full sync");
        let (have, want) = (table_contents(&partial_ns), table_contents(&full_ns));
        assert_eq!(
            have.symmetric_difference(&want).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "step {step}: after changing {:?}",
            changed.keys().collect::<Vec<_>>()
        );
    }
}
