//! Faults, netns tier with the containerd and cluster tiers: a tug node (tests/src/node.rs)
//! with 20 pods behind a NodePort Service and 10,000 other Services, while a client outside the
//! node opens about 1,000 connections a second to the NodePort. Each of the node's services is
//! killed with SIGKILL and started again, one at a time and then all together (a restarted
//! proxy resyncs all 10,000 Services in full under that load): no container is restarted or
//! replaced, no connection fails, and the rules and routes are what they were.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tug_tests::cluster::cluster;
use tug_tests::eventually::eventually;
use tug_tests::faults::{
    Client, differences, other_services, proxy_metric, proxy_programs_every_service_port, snapshot,
    web_behind_node_port,
};
use tug_tests::node::Segment;
use tug_tests::tier::{Tier, require};

const HOST: &str = "192.168.62.254";
const NODE_IP: &str = "192.168.62.1";
const PODS: usize = 20;
/// Services besides the web pods' one, in a namespace of their own.
const OTHER_SERVICES: usize = 10_000;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "netns + containerd + cluster tiers (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug -p tug-cni && cargo test -p tug-tests --test faults -- --ignored"]
async fn killing_any_node_service_loses_no_container_connection_rule_or_route() {
    require(Tier::Netns);
    require(Tier::Containerd);
    let segment = Segment::new("flt", HOST).await;
    let mut node = segment.node(NODE_IP, "nftables").await;

    let ns = cluster().namespace("faults").await;
    // The other Services live in a namespace of their own: in the pods' namespace each would add
    // its service-link variables to every container's environment.
    let others_ns = cluster().namespace("faults-others").await;
    let admin = cluster().admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    let node_port = web_behind_node_port(&node, ns.name(), PODS).await;
    let began = Instant::now();
    other_services(others_ns.name(), OTHER_SERVICES).await;
    eprintln!("created {OTHER_SERVICES} Services in {:?}", began.elapsed());
    // Every Service port programmed before the rules are taken as the reference.
    let wanted = proxy_programs_every_service_port(&node, Duration::from_secs(120)).await;
    assert!(wanted > OTHER_SERVICES as u64, "the Services are all there");
    let target = format!("{NODE_IP}:{node_port}");
    // A client outside the node: connection after connection to the NodePort.
    // About 1,000 a second (ten at a time, each every 10 ms), through every crash and through
    // the proxy's full resyncs of all 10,000 Services when it comes back.
    let client = Client::paced(&target, "/healthz", 10, Duration::from_millis(10));
    let client_began = Instant::now();

    let before = snapshot(&node, &pods).await;
    assert_eq!(before.containers.len(), PODS, "{before:?}");
    let mut figures = Vec::new();
    for victim in ["proxy", "netd", "kubelet", "shim", "all"] {
        let syncs_before = proxy_metric(&node, "tug_proxy_syncs_total");
        let killed = Instant::now();
        match victim {
            "proxy" => node.kill9_proxy(),
            "netd" => node.kill9_netd(),
            "kubelet" => node.kubelet.kill9(),
            "shim" => node.shim.kill9(),
            _ => {
                node.kill9_proxy();
                node.kill9_netd();
                node.kubelet.kill9();
                node.shim.kill9();
            }
        }
        // Down, nothing is undone.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let down = snapshot(&node, &pods).await;
        assert!(
            down == before,
            "with {victim} down:\n{}",
            differences(&before, &down)
        );
        let restarted = Instant::now();
        match victim {
            "proxy" => node.restart_proxy(),
            "netd" => node.restart_netd(),
            "kubelet" => node.kubelet.restart().await,
            "shim" => node.shim.restart().await,
            _ => {
                node.shim.restart().await;
                node.kubelet.restart().await;
                node.restart_netd();
                node.restart_proxy();
            }
        }
        // Back: the proxy has done its first sync, a full one of all 10,000 Services, under
        // the client's load (its counter restarts with the process).
        if matches!(victim, "proxy" | "all") {
            eventually(
                "the restarted proxy's first (full) sync",
                Duration::from_secs(60),
                || {
                    let syncs = proxy_metric(&node, "tug_proxy_full_syncs_total");
                    async move { syncs.filter(|n| *n >= 1).map(|_| ()) }
                },
            )
            .await;
        }
        let reconciled = restarted.elapsed();
        let after = snapshot(&node, &pods).await;
        assert!(
            after == before,
            "after {victim} restarted:\n{}\n{}",
            differences(&before, &after),
            node.logs()
        );
        figures.push((victim, killed.elapsed(), reconciled, syncs_before));
        // Let the kubelet report on the pods again before the next crash.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (ok, failed, failures) = client.finish();
    let rate = ok as f64 / client_began.elapsed().as_secs_f64();
    let end = snapshot(&node, &pods).await;
    assert!(end == before, "at the end:\n{}", differences(&before, &end));
    for (victim, total, reconciled, _) in &figures {
        eprintln!(
            "{victim:<8} killed and back in {total:>10.1?}; ready again {reconciled:>10.1?} after its restart"
        );
    }
    eprintln!("client: {ok} connections answered ({rate:.0}/s), {failed} failed");
    assert!(
        rate >= 500.0,
        "the client made too few connections to mean anything: {ok} ({rate:.0}/s)"
    );
    assert_eq!(
        failed, 0,
        "connections to the NodePort failed while services crashed: {:?}",
        failures
    );
}
