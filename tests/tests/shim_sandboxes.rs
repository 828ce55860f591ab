//! containerd tier: the pod sandbox lifecycle through the CRI, as the kubelet drives it — the
//! same suite against tug shim and against containerd's own CRI, both attaching pods with tug-cni.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::{
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandboxConfig, PodSandboxFilter,
    PodSandboxMetadata, PodSandboxState, PodSandboxStateValue, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use tug_tests::cluster::unique_name;
use tug_tests::cni::ipam_allocations;
use tug_tests::cri::{Cri, install_tug_cni};
use tug_tests::eventually::eventually;
use tug_tests::shim::TugShim;
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test shim_sandboxes -- --ignored"]
async fn sandbox_lifecycle_on_tug_shim() {
    require(Tier::Containerd);
    let shim = TugShim::start("sandboxes", "10.254.1.0/24").await;
    exercise_sandboxes(shim.cri().await, "10.254.1.0/24", &shim.ipam_dir()).await;
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test shim_sandboxes -- --ignored"]
async fn the_same_sandbox_suite_passes_against_containerds_own_cri() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let pod_cidr = "10.254.2.0/24";
    let installed = install_tug_cni(&substrate, pod_cidr);
    exercise_sandboxes(
        Cri::connect(&substrate.containerd_sock).await,
        pod_cidr,
        &installed.ipam_dir(),
    )
    .await;
}

/// The sandbox behaviour the kubelet relies on, for any CRI runtime whose network is tug-cni
/// on `pod_cidr` with IPAM state in `ipam_dir`.
async fn exercise_sandboxes(mut cri: Cri, pod_cidr: &str, ipam_dir: &Path) {
    eventually(
        "the runtime to report RuntimeReady and NetworkReady",
        Duration::from_secs(30),
        || {
            let mut cri = cri.clone();
            async move {
                (cri.condition("RuntimeReady").await && cri.condition("NetworkReady").await)
                    .then_some(())
            }
        },
    )
    .await;
    let name = unique_name("suite");
    let logs = tempfile::tempdir().unwrap();
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: format!("uid-{name}"),
            namespace: "tug-test".into(),
            attempt: 0,
        }),
        hostname: name.clone(),
        log_directory: logs.path().display().to_string(),
        linux: Some(LinuxPodSandboxConfig::default()),
        labels: HashMap::from([
            ("app".to_owned(), "suite".to_owned()),
            ("io.kubernetes.pod.name".to_owned(), name.clone()),
        ]),
        ..Default::default()
    };
    let id = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;

    let status = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .expect("a status");
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(status.metadata.map(|m| m.name), Some(name.clone()));
    assert_eq!(status.labels.get("app").map(String::as_str), Some("suite"));
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    let cidr: ipnet::Ipv4Net = pod_cidr.parse().unwrap();
    assert!(
        ip.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| cidr.contains(&ip)),
        "the sandbox IP {ip:?} comes from tug-cni's {pod_cidr}"
    );
    assert_eq!(ipam_allocations(ipam_dir).len(), 1);

    let by_id = cri
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                id: id.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(by_id.len(), 1);
    let by_label = PodSandboxFilter {
        label_selector: HashMap::from([("io.kubernetes.pod.name".to_owned(), name.clone())]),
        ..Default::default()
    };
    let labelled = cri
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(by_label),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(
        labelled.len() == 1 && labelled[0].id == id,
        "the label selector finds exactly this sandbox"
    );
    let not_ready = PodSandboxFilter {
        state: Some(PodSandboxStateValue {
            state: PodSandboxState::SandboxNotready as i32,
        }),
        ..Default::default()
    };
    let stopped = cri
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(not_ready),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(
        !stopped.iter().any(|s| s.id == id),
        "a ready sandbox is not listed as not ready"
    );

    for _ in 0..2 {
        cri.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .expect("StopPodSandbox, twice");
    }
    let status = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.state, PodSandboxState::SandboxNotready as i32);
    assert_eq!(
        ipam_allocations(ipam_dir).len(),
        0,
        "StopPodSandbox released the network (CNI DEL)"
    );

    for _ in 0..2 {
        cri.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .expect("RemovePodSandbox, twice");
    }
    let gone = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect_err("a removed sandbox has no status");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone}");
}
