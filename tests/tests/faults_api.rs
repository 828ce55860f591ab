//! Faults, netns tier with the containerd and cluster tiers: the API server goes away from
//! under a tug node for minutes, then comes back, twice: first its port refuses connections and
//! every open one is reset (kube-apiserver down on a control-plane host that is up), then every
//! packet to and from it is dropped and nothing is refused or reset (a partition, a host gone), so
//! open connections look alive. A test binary of its own, so nothing else runs beside the
//! outages.
//!
//! Meanwhile the pods keep running and serving through the rules that were there. Once it is
//! back, the node's Lease and the status of a pod that finished meanwhile reach the API within
//! 10 s, and the watches resume where they were instead of listing everything again.
//!
//! Against a real cluster (`TUG_TEST_KUBECONFIG`) the outage is the relay the node reaches the
//! API through; the cluster's node lifecycle controller may mark the node and its pods NotReady
//! meanwhile (after its grace period), so connections are counted during the outage only.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use tug_tests::cluster::cluster;
use tug_tests::eventually::eventually;
use tug_tests::faults::{
    Client, differences, exit_code, other_services, proxy_programs_every_service_port, running_pod,
    snapshot, web_behind_node_port, web_part,
};
use tug_tests::node::{Segment, TugNode};
use tug_tests::tier::{Tier, require};

const HOST: &str = "192.168.65.254";
const NODE_IP: &str = "192.168.65.1";
const PODS: usize = 3;
/// Services besides the web one, so that listing them all again would show.
const OTHER_SERVICES: usize = 1_000;
const OUTAGE: Duration = Duration::from_secs(120);
/// How soon after the API server is back the node must have reported.
const RESUME: Duration = Duration::from_secs(10);

/// The Lease's renewTime, as the API has it.
async fn renewed(leases: &Api<Lease>, node: &str) -> Option<MicroTime> {
    leases.get(node).await.ok()?.spec?.renew_time
}

/// The size of one GET of `path` (a list), as JSON.
async fn list_bytes(path: &str) -> u64 {
    let request = http::Request::get(path)
        .body(Vec::new())
        .expect("a list request");
    cluster()
        .admin()
        .await
        .request_text(request)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .len() as u64
}

/// How the API server goes away.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// Its port refuses connections and every open one is reset (kube-apiserver down on a host
    /// that is up).
    Refused,
    /// Every packet between it and the node is dropped and nothing is refused or reset (a
    /// partition, a host gone): open connections look alive until something times them out.
    Blackholed,
}

/// The nftables table that blackholes the API server inside the node.
const BLACKHOLE: &str = "tug-test-blackhole";

impl Outage {
    fn begin(self, segment: &Segment, node: &TugNode) {
        match self {
            Outage::Refused => segment.api_relay().cut(),
            Outage::Blackholed => {
                let api = segment.api();
                let (ip, port) = (api.ip(), api.port());
                // Both ways: a packet the node sends out is dropped as one the API would send.
                nft(
                    node,
                    &format!(
                        "add table inet {BLACKHOLE}\n\
                         add chain inet {BLACKHOLE} input {{ type filter hook input priority -400; }}\n\
                         add rule inet {BLACKHOLE} input ip saddr {ip} tcp sport {port} drop\n\
                         add chain inet {BLACKHOLE} output {{ type filter hook output priority -400; }}\n\
                         add rule inet {BLACKHOLE} output ip daddr {ip} tcp dport {port} drop\n"
                    ),
                );
            }
        }
    }

    fn end(self, segment: &Segment, node: &TugNode) {
        match self {
            Outage::Refused => segment.api_relay().restore(),
            Outage::Blackholed => nft(node, &format!("delete table inet {BLACKHOLE}\n")),
        }
    }
}

/// Runs `nft -f -` with `rules` in the node's network namespace.
fn nft(node: &TugNode, rules: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", node.ns.name(), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nft in the node");
    child
        .stdin
        .take()
        .expect("nft's stdin")
        .write_all(rules.as_bytes())
        .expect("write to nft");
    let output = child.wait_with_output().expect("wait for nft");
    assert!(
        output.status.success(),
        "nft -f in the node: {}\n{rules}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "netns + containerd + cluster tiers (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug -p tug-cni && cargo test -p tug-tests --test faults_api -- --ignored"]
async fn the_api_server_refused_or_blackholed_for_minutes_loses_nothing_and_the_node_resumes_within_10_s()
 {
    require(Tier::Netns);
    require(Tier::Containerd);
    let segment = Segment::new("api", HOST).await;
    let node = segment.node(NODE_IP, "nftables").await;
    let ns = cluster().namespace("faults-api").await;
    let others_ns = cluster().namespace("faults-api-others").await;
    let admin = cluster().admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-node-lease");
    let node_port = web_behind_node_port(&node, ns.name(), PODS).await;
    other_services(others_ns.name(), OTHER_SERVICES).await;
    proxy_programs_every_service_port(&node, Duration::from_secs(120)).await;
    // What the proxy alone would read again if it listed everything.
    let relist = list_bytes("/api/v1/services").await
        + list_bytes("/apis/discovery.k8s.io/v1/endpointslices").await;
    for (i, outage) in [Outage::Refused, Outage::Blackholed]
        .into_iter()
        .enumerate()
    {
        let short = format!("short-{i}");
        // Finishes (exit 3) while the API server is gone.
        running_pod(&node, ns.name(), &short, "sleep 20; exit 3").await;

        let before = web_part(snapshot(&node, &pods).await, &pods).await;
        let client = Client::start(&format!("{NODE_IP}:{node_port}"), Duration::from_millis(10));
        outage.begin(&segment, &node);
        eprintln!("the API server is {outage:?} for {OUTAGE:?}");
        tokio::time::sleep(OUTAGE / 2).await;
        let during = web_part(snapshot(&node, &pods).await, &pods).await;
        assert!(
            during == before,
            "{outage:?}, with the API server gone:\n{}",
            differences(&before, &during)
        );
        let lease_during = renewed(&leases, node.name()).await;
        tokio::time::sleep(OUTAGE / 2).await;
        let (ok, failed, failures) = client.finish();
        let short_during = pods.get(&short).await.expect("get the short-lived pod");
        assert_eq!(
            exit_code(&short_during),
            None,
            "{outage:?}: reported without an API server?"
        );

        let returned = segment.api_relay().returned();
        outage.end(&segment, &node);
        let back = Instant::now();
        let name = node.name().to_owned();
        eventually("the Lease renewed", Duration::from_secs(180), || {
            let (leases, lease_during, name) = (leases.clone(), lease_during.clone(), name.clone());
            async move { (renewed(&leases, &name).await != lease_during).then_some(()) }
        })
        .await;
        let lease_back = back.elapsed();
        let exited = eventually(
            "the short-lived pod's exit reported",
            Duration::from_secs(180),
            || {
                let (pods, short) = (pods.clone(), short.clone());
                async move { exit_code(&pods.get(&short).await.ok()?) }
            },
        )
        .await;
        let status_back = back.elapsed();
        assert_eq!(exited, 3);
        // Everything that reconnecting costs, well after the node has caught up.
        tokio::time::sleep(Duration::from_secs(30).saturating_sub(back.elapsed())).await;
        let reread = segment.api_relay().returned() - returned;
        let after = web_part(snapshot(&node, &pods).await, &pods).await;

        eprintln!("{outage:?}: during the outage {ok} connections answered, {failed} failed");
        eprintln!(
            "{outage:?}: back, the Lease renewed after {lease_back:.1?}, the pod's exit reported after {status_back:.1?}"
        );
        eprintln!(
            "{outage:?}: read from the API in the 30 s after: {reread} bytes (listing every Service and EndpointSlice again: {relist} bytes)"
        );
        assert!(ok > 1000, "too few connections to mean anything: {ok}");
        assert_eq!(
            failed, 0,
            "{outage:?}: connections failed with the API server gone: {failures:?}"
        );
        assert!(
            after == before,
            "{outage:?}, after the API server came back:\n{}\n{}",
            differences(&before, &after),
            node.logs()
        );
        assert!(
            lease_back <= RESUME,
            "{outage:?}: the Lease was renewed {lease_back:?} after the API server came back"
        );
        assert!(
            status_back <= RESUME,
            "{outage:?}: the pod's exit reached the API {status_back:?} after the API server came back"
        );
        assert!(
            reread < relist / 2,
            "{outage:?}: {reread} bytes read back from the API after the outage: the watches listed everything again (a full list is {relist} bytes)"
        );
    }
}
