//! End to end in the VM tier: the scenario of `tug_tests::e2e` over nodes with kernels of their
//! own. Two qemu guests (Debian with systemd, joined with `tug join`: one with its proxy in IPVS
//! mode, one in nftables mode) and one node in a network namespace on this machine (iptables
//! mode) share one L2 segment with the host: pods on different nodes and kernels talk directly,
//! the ClusterIP answers from a pod on every node, the NodePort from outside through every node,
//! an unready endpoint leaves, and a guest that leaves the cluster (`tug reset --delete-node`,
//! power-off) takes its endpoint with it.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tug_tests::cluster::cluster;
use tug_tests::e2e::Scenario;
use tug_tests::lan::Relay;
use tug_tests::node::Segment;
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};
use tug_tests::vm_node::GuestNode;

const HOST: &str = "192.168.63.254";

#[tokio::test(flavor = "multi_thread")]
#[ignore = "vm tier with the netns, containerd and cluster tiers (root, qemu): run as root via ./scripts/test vm, or scripts/vm-assets && scripts/substrate up && cargo build -p tug -p tug-cni && cargo test -p tug-tests --test vm_e2e -- --ignored"]
async fn guests_with_their_own_kernels_and_a_namespaced_node_serve_pods_and_services() {
    require(Tier::Vm);
    require(Tier::Netns);
    require(Tier::Containerd);
    let began = Instant::now();
    let segment = Segment::new("e2evm", HOST).await;
    let registry = Relay::start(
        format!("{HOST}:0").parse().expect("an address"),
        &Substrate::from_env().registry,
    );
    // Kept until the end: the token goes from the cluster when this is dropped.
    let bootstrap = cluster().bootstrap_token().await;
    let token = bootstrap.token();
    // The guests boot (slowly, under software emulation) while the namespaced node starts.
    let ipvs = GuestNode::start(&segment, "192.168.63.11", "ipvs", registry.addr(), &token);
    let nft = GuestNode::start(
        &segment,
        "192.168.63.12",
        "nftables",
        registry.addr(),
        &token,
    );
    let local = segment.node("192.168.63.1", "iptables").await;
    ipvs.joined(Duration::from_secs(600)).await;
    nft.joined(Duration::from_secs(600)).await;
    eprintln!("both guests joined after {:?}", began.elapsed());

    let mut scenario = Scenario::start(
        vec![ipvs.member(), nft.member(), local.member()],
        Duration::from_secs(600),
    )
    .await;
    eprintln!("every pod Ready after {:?}", began.elapsed());
    scenario.pod_to_pod().await;
    scenario.cluster_ip_from_every_node().await;
    scenario.node_port_through_every_node().await;
    scenario.unready_endpoint_leaves(2).await;

    // The nftables guest leaves the cluster as an operator decommissions a machine.
    let name = nft.name.clone();
    let run = tokio::task::spawn_blocking(move || nft.leave())
        .await
        .expect("the guest's thread");
    assert!(
        run.console.contains("tug-step=leaving") && run.value("guest-script-status") == Some("0"),
        "the guest left with `tug reset --delete-node`:\n{}",
        run.console
    );
    let nodes: Api<Node> = Api::all(cluster().admin().await);
    assert!(
        nodes.get_opt(&name).await.ok().flatten().is_none(),
        "tug reset --delete-node deleted the Node"
    );
    scenario.node_gone(1).await;
    eprintln!("done after {:?}", began.elapsed());
    drop(ipvs);
}
