//! Faults, netns tier with the containerd and cluster tiers: containerd itself is killed
//! (SIGKILL, as a crash) under a tug node and started again. A test binary of its own: the
//! test-owned containerd is the one every containerd-tier test uses, and test binaries run one
//! after another.
//!
//! While containerd is down the pods keep running and serving (their runc shims do not need
//! it), and a container that exits meanwhile is reported with its exit code once it is back.
//! Back, no container was restarted or replaced, the rules and routes are what they were, and
//! the shim starts new pods through the new containerd.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tug_tests::cluster::{cluster, pod_ready};
use tug_tests::eventually::eventually;
use tug_tests::faults::{
    Client, differences, exit_code, running_pod, snapshot, web_behind_node_port, web_part,
};
use tug_tests::node::Segment;
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

const HOST: &str = "192.168.64.254";
const NODE_IP: &str = "192.168.64.1";
const PODS: usize = 3;

/// The test-owned containerd's pid, from the pid file `scripts/substrate` writes.
fn containerd_pid() -> i32 {
    let run = std::env::var("TUG_TEST_RUN").unwrap_or_else(|_| "/run/tug-test".into());
    let path = format!("{run}/containerd.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path} (is the substrate up?): {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "netns + containerd + cluster tiers (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug -p tug-cni && cargo test -p tug-tests --test faults_containerd -- --ignored"]
async fn containerd_restarted_loses_no_pod_and_what_happened_meanwhile_is_reported() {
    require(Tier::Netns);
    require(Tier::Containerd);
    let segment = Segment::new("ctd", HOST).await;
    let node = segment.node(NODE_IP, "nftables").await;
    let ns = cluster().namespace("faults-ctd").await;
    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, ns.name());
    let node_port = web_behind_node_port(&node, ns.name(), PODS).await;
    let image = Substrate::from_env().registry_image("http");
    let pod = |name: &str, command: &str, restart: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node.name(), "automountServiceAccountToken": false,
                     "restartPolicy": restart,
                     "containers": [{"name": "main", "image": image, "command": ["sh", "-c", command]}]}
        }))
        .expect("pod JSON")
    };
    // Exits with 3 while containerd is down.
    running_pod(&node, ns.name(), "short", "sleep 8; exit 3").await;
    let started = Instant::now();

    let client = Client::start(&format!("{NODE_IP}:{node_port}"), Duration::from_millis(10));
    let before = web_part(snapshot(&node, &pods).await, &pods).await;
    assert_eq!(before.containers.len(), PODS, "{before:?}");
    let pid = containerd_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL containerd");
    let killed = Instant::now();
    // Down long enough for the short-lived container to exit, and for the kubelet to notice
    // the runtime's trouble several times over.
    tokio::time::sleep(
        Duration::from_secs(15)
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(10)),
    )
    .await;
    let down = web_part(snapshot(&node, &pods).await, &pods).await;
    assert!(
        down == before,
        "with containerd down:\n{}",
        differences(&before, &down)
    );
    let short = pods.get("short").await.expect("get the short-lived pod");
    assert_eq!(
        exit_code(&short),
        None,
        "an exit reported while containerd, which alone knows it, is down: {:?}",
        short.status
    );

    let substrate = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/substrate");
    let up = std::process::Command::new(substrate)
        .arg("up")
        .output()
        .expect("run scripts/substrate up");
    assert!(
        up.status.success(),
        "scripts/substrate up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let restarted = Instant::now();
    let down_for = restarted - killed;

    let exited = eventually(
        "the exit of the container that stopped while containerd was down",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("short").await.ok()?;
                exit_code(&pod).map(|code| (code, pod))
            }
        },
    )
    .await;
    let reported = restarted.elapsed();
    assert_eq!(exited.0, 3, "{:?}", exited.1.status);
    assert_eq!(
        exited.1.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed"),
        "a Never pod whose container exited 3"
    );

    pods.create(
        &PostParams::default(),
        &pod("after", "sleep 3600", "Always"),
    )
    .await
    .expect("create a pod after the restart");
    eventually(
        "a pod created after the restart to be Ready",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move { pod_ready(&pods.get("after").await.ok()?).then_some(()) }
        },
    )
    .await;
    let new_pod = restarted.elapsed();

    let after = web_part(snapshot(&node, &pods).await, &pods).await;
    assert!(
        after == before,
        "after containerd came back:\n{}\n{}",
        differences(&before, &after),
        node.logs()
    );
    let (ok, failed, failures) = client.finish();
    let figures: BTreeMap<&str, Duration> = [
        ("containerd down for", down_for),
        ("exit reported after restart", reported),
        ("new pod Ready after restart", new_pod),
    ]
    .into();
    for (what, took) in &figures {
        eprintln!("{what:<30} {took:>10.1?}");
    }
    eprintln!("client: {ok} connections answered, {failed} failed");
    assert!(ok > 100, "too few connections to mean anything: {ok}");
    assert_eq!(
        failed, 0,
        "connections failed around the restart: {failures:?}"
    );
}
