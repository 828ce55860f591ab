//! containerd tier with the cluster tier: the kubelet's node agent against the API (the test
//! API server, or a real cluster with `TUG_TEST_KUBECONFIG`) with tug shim as its runtime. It
//! registers its Node with its own identity (obtained through the real TLS bootstrap), keeps the
//! node Lease fresh, and reports Ready — and NotReady, with the reason, when the network is not.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::DeleteParams;
use tug_kubelet::node::NodeIdentity;
use tug_kubelet::register::{NodeAgentConfig, run};
use tug_kubelet::runtime::Cri;
use tug_tests::cluster::{client_from_kubeconfig, cluster, unique_name};
use tug_tests::eventually::eventually;
use tug_tests::shim::TugShim;
use tug_tests::tier::{Tier, require};

fn ready(node: &Node) -> Option<(String, String, String)> {
    let condition = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?
        .clone();
    Some((
        condition.status,
        condition.reason.unwrap_or_default(),
        condition.message.unwrap_or_default(),
    ))
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet -- --ignored"]
async fn the_node_registers_keeps_its_lease_and_reports_readiness() {
    require(Tier::Containerd);
    let shim = TugShim::start("kubelet-node", "10.254.9.0/24").await;
    let name = unique_name("tug-node");
    let kubeconfig = cluster().node_kubeconfig(&name).await;
    let client = client_from_kubeconfig(&kubeconfig).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run(
        NodeAgentConfig {
            identity: NodeIdentity {
                name: name.clone(),
                hostname: name.clone(),
                node_ips: vec!["192.0.2.10".parse().unwrap()],
                labels: BTreeMap::from([("tug.io/test".to_owned(), "node-agent".to_owned())]),
                taints: Vec::new(),
                max_pods: 110,
                kubelet_port: 10250,
            },
            root_dir: std::env::temp_dir(),
            heartbeat: Duration::from_secs(1),
            pressures: Default::default(),
            close_connections: None,
        },
        client,
        Cri::new(&shim.socket.display().to_string()),
        async move {
            let _ = stopped.await;
        },
    ));
    let admin = cluster().admin().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let _cleanup = scopeguard(name.clone(), kubeconfig_for_cleanup());

    let node = eventually(
        "the Node to be registered and Ready",
        Duration::from_secs(30),
        || {
            let nodes = nodes.clone();
            let name = name.clone();
            async move {
                let node = nodes.get_opt(&name).await.ok()??;
                (ready(&node)?.0 == "True").then_some(node)
            }
        },
    )
    .await;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("kubernetes.io/hostname"), Some(&name));
    assert_eq!(
        labels.get("kubernetes.io/os").map(String::as_str),
        Some("linux")
    );
    assert_eq!(
        labels.get("tug.io/test").map(String::as_str),
        Some("node-agent")
    );
    let status = node.status.clone().unwrap();
    assert_eq!(status.capacity.as_ref().unwrap()["pods"].0, "110");
    assert!(
        status.capacity.as_ref().unwrap()["memory"]
            .0
            .ends_with("Ki")
    );
    assert_eq!(
        status
            .daemon_endpoints
            .unwrap()
            .kubelet_endpoint
            .unwrap()
            .port,
        10250
    );
    let info = status.node_info.unwrap();
    assert!(
        info.container_runtime_version.starts_with("tug://"),
        "{}",
        info.container_runtime_version
    );
    assert!(
        status
            .addresses
            .unwrap()
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "192.0.2.10")
    );
    assert_eq!(ready(&node).unwrap().1, "KubeletReady");

    // The Lease: held by the node, renewed.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-node-lease");
    let first = eventually("the node Lease", Duration::from_secs(15), || {
        let leases = leases.clone();
        let name = name.clone();
        async move { leases.get_opt(&name).await.ok()? }
    })
    .await;
    let spec = first.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some(name.as_str()));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    let renewed = spec.renew_time.unwrap().0;
    eventually("the Lease to be renewed", Duration::from_secs(15), || {
        let leases = leases.clone();
        let name = name.clone();
        async move {
            let lease = leases.get_opt(&name).await.ok()??;
            (lease.spec?.renew_time?.0 > renewed).then_some(())
        }
    })
    .await;

    // The network goes away: the node says NotReady, and why.
    for entry in std::fs::read_dir(shim.cni_conf_dir()).unwrap().flatten() {
        std::fs::remove_file(entry.path()).unwrap();
    }
    let (_, reason, message) = eventually(
        "the Node to report NotReady",
        Duration::from_secs(30),
        || {
            let nodes = nodes.clone();
            let name = name.clone();
            async move {
                let node = nodes.get_opt(&name).await.ok()??;
                let ready = ready(&node)?;
                (ready.0 == "False").then_some(ready)
            }
        },
    )
    .await;
    assert_eq!(reason, "KubeletNotReady");
    assert!(message.contains("network not ready"), "{message}");
    let _ = stop.send(());
    let _ = agent.await;
}

fn kubeconfig_for_cleanup() -> std::path::PathBuf {
    cluster().admin_kubeconfig_path().to_owned()
}

/// Deletes the Node when the test ends, however it ends.
fn scopeguard(name: String, admin_kubeconfig: std::path::PathBuf) -> impl Drop {
    struct Guard(String, std::path::PathBuf);
    impl Drop for Guard {
        fn drop(&mut self) {
            let (name, path) = (self.0.clone(), self.1.clone());
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let yaml = std::fs::read_to_string(&path).unwrap_or_default();
                    let nodes: Api<Node> = Api::all(client_from_kubeconfig(&yaml).await);
                    let _ = nodes.delete(&name, &DeleteParams::default()).await;
                });
            })
            .join();
        }
    }
    Guard(name, admin_kubeconfig)
}
