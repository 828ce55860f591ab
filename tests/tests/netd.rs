//! netns tier with the cluster tier: `tug netd` on three "nodes" (network namespaces), two on one
//! subnet and one behind a router, joined to the cluster API; pods attached with tug-cni from the
//! configuration netd writes. Pods talk across nodes directly and over VXLAN with their own
//! addresses; a deleted node's routes go; a restarted netd disturbs nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tug_tests::cluster::{client_from_kubeconfig, cluster, unique_name};
use tug_tests::cni::{TugCni, tug_binary};
use tug_tests::lan::{Lan, Relay, redirect_kubeconfig};
use tug_tests::netns::{Netns, tcp_round_trip};
use tug_tests::tier::{Tier, require};

/// A node: its namespace, Node object, and a running netd (killed on drop).
struct TestNode {
    name: String,
    ip: Ipv4Addr,
    ns: Netns,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    netd: Option<Child>,
}

impl TestNode {
    fn start_netd(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("netd.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path().display()))
            .arg(tug_binary())
            .args(["netd", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(["--node-name", &self.name, "--resync-seconds", "1"])
            .args([
                "--cluster-cidr",
                &std::env::var("TUG_TEST_CLUSTER_CIDR").unwrap_or_else(|_| "10.244.0.0/16".into()),
            ])
            .arg("--cni-conf-dir")
            .arg(self.dir.path().join("net.d"))
            .arg("--ipam-dir")
            .arg(self.dir.path().join("ipam"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tug netd");
        self.netd = Some(child);
    }

    fn kill_netd(&mut self) {
        if let Some(mut child) = self.netd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn conflist(&self) -> PathBuf {
        self.dir.path().join("net.d/10-tug.conflist")
    }

    fn tug_routes(&self) -> String {
        String::from_utf8_lossy(&self.ns.ip(&["route", "show", "proto", "199"]).stdout).into_owned()
    }

    fn netd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("netd.log")).unwrap_or_default()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill_netd();
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "netns tier (root) with the cluster tier: run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test netd -- --ignored"]
fn netd_routes_pods_across_nodes_directly_and_over_vxlan() {
    require(Tier::Netns);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    // Underlay: lan-a (two nodes, the host, a router leg) and lan-b (one node, the other leg).
    let (lan_a, lan_b) = (Lan::new("la"), Lan::new("lb"));
    lan_a.attach_host("192.168.57.254/24");
    let router = Netns::new("rt");
    lan_a.attach(&router, "eth0", "192.168.57.253/24");
    lan_b.attach(&router, "eth1", "192.168.58.253/24");
    router
        .run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .unwrap();
    tug_tests::netns::ip(&["route", "add", "192.168.58.0/24", "via", "192.168.57.253"]);
    let _host_route = scopeguard(|| {
        let _ = Command::new("ip")
            .args(["route", "del", "192.168.58.0/24", "via", "192.168.57.253"])
            .status();
    });

    // The nodes reach the API through a relay on the host's lan-a address.
    let server = cluster()
        .server_url()
        .trim_start_matches("https://")
        .to_owned();
    let relay = Relay::start(SocketAddr::from(([192, 168, 57, 254], 0)), &server);
    let relay_url = format!("https://{}", relay.addr());

    let mut nodes: Vec<TestNode> = Vec::new();
    for (lan, ip, gateway) in [
        (&lan_a, "192.168.57.1", "192.168.57.253"),
        (&lan_a, "192.168.57.2", "192.168.57.253"),
        (&lan_b, "192.168.58.3", "192.168.58.253"),
    ] {
        let name = unique_name("netd-node");
        let ns = Netns::new("nd");
        lan.attach(&ns, "eth0", &format!("{ip}/24"));
        ns.ip(&["route", "add", "default", "via", gateway]);
        // IPv6 on the same segment: fd00:<third octet>::<last octet>/64.
        let octets: Vec<&str> = ip.split('.').collect();
        let ip6 = format!("fd00:{}::{}", octets[2], octets[3]);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        let kubeconfig_yaml = runtime.block_on(cluster().node_kubeconfig(&name));
        let node_client = runtime.block_on(client_from_kubeconfig(&kubeconfig_yaml));
        runtime.block_on(async {
            let nodes: Api<Node> = Api::all(node_client);
            let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
            nodes.create(&Default::default(), &node).await.expect("register the node as itself");
            let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "InternalIP", "address": ip6}, {"type": "Hostname", "address": name}]}});
            nodes.patch_status(&name, &PatchParams::default(), &Patch::Strategic(status)).await.expect("report the node address");
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            redirect_kubeconfig(&kubeconfig_yaml, &relay_url, "kubernetes"),
        )
        .unwrap();
        let mut node = TestNode {
            name,
            ip: ip.parse().unwrap(),
            ns,
            dir,
            kubeconfig,
            netd: None,
        };
        node.start_netd();
        nodes.push(node);
    }
    let admin = runtime.block_on(cluster().admin());
    let _cleanup = {
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let admin = admin.clone();
        let handle = runtime.handle().clone();
        scopeguard(move || {
            handle.block_on(async {
                for name in names {
                    let _ = Api::<Node>::all(admin.clone())
                        .delete(&name, &DeleteParams::default())
                        .await;
                }
            })
        })
    };

    for node in &nodes {
        wait_for(
            &format!("netd on {} to write the CNI configuration", node.name),
            Duration::from_secs(30),
            || node.conflist().exists().then_some(()),
        );
    }
    let plugins: Vec<TugCni> = nodes
        .iter()
        .map(|n| TugCni::from_conflist(&n.conflist()))
        .collect();
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("np")).collect();
    let pod_ips: Vec<Ipv4Addr> = (0..3)
        .map(|i| {
            plugins[i]
                .add(&nodes[i].ns, &format!("pod-{i}"), &pods[i])
                .0
                .parse()
                .unwrap()
        })
        .collect();

    // Routes to every peer: direct on lan-a, VXLAN to and from the node behind the router.
    for node in &nodes {
        wait_for(
            &format!("{} to route to both peers", node.name),
            Duration::from_secs(30),
            || (node.tug_routes().lines().count() == 2).then_some(()),
        );
    }
    let routes_a = nodes[0].tug_routes();
    assert!(
        routes_a.contains("via 192.168.57.2"),
        "direct route to the on-link peer: {routes_a}"
    );
    assert!(
        routes_a.contains("dev tug-vxlan"),
        "VXLAN route to the peer behind the router: {routes_a}"
    );

    let peer = tcp_round_trip(&pods[0], &pods[1], SocketAddr::from((pod_ips[1], 9001)));
    assert_eq!(
        peer.ip(),
        pod_ips[0],
        "across nodes on one subnet, the source pod IP is preserved"
    );
    let peer = tcp_round_trip(&pods[0], &pods[2], SocketAddr::from((pod_ips[2], 9002)));
    assert_eq!(
        peer.ip(),
        pod_ips[0],
        "over VXLAN, the source pod IP is preserved"
    );
    let peer = tcp_round_trip(&pods[2], &pods[1], SocketAddr::from((pod_ips[1], 9003)));
    assert_eq!(peer.ip(), pod_ips[2]);
    let peer = tcp_round_trip(&nodes[0].ns, &pods[1], SocketAddr::from((pod_ips[1], 9004)));
    assert_eq!(
        peer.ip(),
        nodes[0].ip,
        "a node reaches a remote pod with its own address"
    );

    // Dual-stack clusters: IPv6 pod traffic between the nodes that share an IPv6 subnet.
    let pod_ip6 = |i: usize| -> Option<std::net::Ipv6Addr> {
        let conf = plugins[i].conf(json!({}));
        conf["podCIDRs"]
            .as_array()?
            .iter()
            .find(|c| c.as_str().is_some_and(|c| c.contains(':')))?;
        let result = std::fs::read_dir(nodes[i].dir.path().join("ipam/tug")).ok()?;
        result
            .flatten()
            .find_map(|e| e.file_name().to_str()?.parse::<std::net::Ipv6Addr>().ok())
    };
    match (pod_ip6(0), pod_ip6(1)) {
        (Some(a6), Some(b6)) => {
            wait_for(
                "an IPv6 route between the dual-stack nodes",
                Duration::from_secs(30),
                || {
                    String::from_utf8_lossy(
                        &nodes[0]
                            .ns
                            .ip(&["-6", "route", "show", "proto", "199"])
                            .stdout,
                    )
                    .contains("via fd00:57::2")
                    .then_some(())
                },
            );
            let peer = tcp_round_trip(&pods[0], &pods[1], SocketAddr::from((b6, 9006)));
            assert_eq!(
                peer.ip(),
                std::net::IpAddr::V6(a6),
                "across nodes over IPv6, the source pod IP is preserved"
            );
        }
        _ => eprintln!(
            "the cluster gave no IPv6 pod CIDRs (IPv4-only): IPv6 across nodes not exercised"
        ),
    }

    // kill -9 and restart: nothing changes, traffic keeps flowing.
    let before = nodes[0].tug_routes();
    nodes[0].kill_netd();
    nodes[0].start_netd();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        nodes[0].tug_routes(),
        before,
        "a restarted netd leaves the routes as they were"
    );
    let peer = tcp_round_trip(&pods[0], &pods[2], SocketAddr::from((pod_ips[2], 9005)));
    assert_eq!(peer.ip(), pod_ips[0]);

    // A deleted node's routes go.
    let gone = nodes[2].name.clone();
    let gone_cidr = plugins[2].conf(json!({}))["podCIDRs"][0]
        .as_str()
        .unwrap()
        .to_owned();
    nodes[2].kill_netd();
    runtime
        .block_on(Api::<Node>::all(admin).delete(&gone, &DeleteParams::default()))
        .expect("delete a node");
    wait_for(
        "the deleted node's route to go",
        Duration::from_secs(30),
        || (!nodes[0].tug_routes().contains(&gone_cidr)).then_some(()),
    );
    assert!(
        nodes[0].tug_routes().contains("via 192.168.57.2"),
        "the other peer's route stays"
    );
    assert!(
        !nodes[0].netd_log().contains("panicked"),
        "{}",
        nodes[0].netd_log()
    );
    drop(relay);
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
