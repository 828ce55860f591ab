//! End to end, netns tier with the containerd and cluster tiers: three tug nodes, each a network
//! namespace on one segment running tug shim + kubelet + netd + proxy (two in nftables mode, one
//! in iptables mode), joined to the cluster API through a relay, running the scenario of
//! `tug_tests::e2e`: pod to pod across nodes with the source address kept, a Service's ClusterIP
//! from a pod on every node, its NodePort from outside through every node; then an endpoint turns
//! unready and a node goes away, and the Service follows. The VM tier runs the same scenario with
//! qemu guests as nodes (`tests/tests/vm.rs`).

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tug_tests::cluster::cluster;
use tug_tests::e2e::Scenario;
use tug_tests::node::Segment;
use tug_tests::tier::{Tier, require};

const HOST: &str = "192.168.61.254";
const NODE_IPS: [&str; 3] = ["192.168.61.1", "192.168.61.2", "192.168.61.3"];
const MODES: [&str; 3] = ["nftables", "iptables", "nftables"];

#[tokio::test(flavor = "multi_thread")]
#[ignore = "netns + containerd + cluster tiers (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug -p tug-cni && cargo test -p tug-tests --test e2e -- --ignored"]
async fn three_nodes_serve_pods_and_services_to_each_other_and_to_the_outside() {
    require(Tier::Netns);
    require(Tier::Containerd);
    let segment = Segment::new("e2e", HOST).await;
    let mut nodes = Vec::new();
    for (ip, mode) in NODE_IPS.iter().zip(MODES) {
        nodes.push(segment.node(ip, mode).await);
    }
    let mut scenario = Scenario::start(
        nodes.iter().map(|n| n.member()).collect(),
        Duration::from_secs(120),
    )
    .await;
    scenario.pod_to_pod().await;
    scenario.cluster_ip_from_every_node().await;
    scenario.node_port_through_every_node().await;
    scenario.unready_endpoint_leaves(2).await;

    // Node 1's services stop and its Node is deleted (as dropping a test kubelet does).
    let gone = nodes.remove(1);
    let gone_name = gone.name().to_owned();
    drop(gone);
    let node_api: Api<Node> = Api::all(cluster().admin().await);
    assert!(
        node_api.get_opt(&gone_name).await.ok().flatten().is_none(),
        "the Node is deleted"
    );
    scenario.node_gone(1).await;
}
