//! containerd tier: tug-cni driven by a CNI runtime nobody here wrote — containerd's own CRI
//! plugin (libcni) — through the same CRI calls a kubelet makes.

use std::collections::HashMap;
use std::time::Duration;

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, PullImageRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tug_tests::cluster::unique_name;
use tug_tests::cni::ipam_allocations;
use tug_tests::cri::{Cri, install_tug_cni};
use tug_tests::eventually::eventually;
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

const POD_CIDR: &str = "10.254.0.0/24";

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test cri_cni -- --ignored"]
async fn containerd_cri_runs_a_pod_on_tug_cni() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let installed = install_tug_cni(&substrate, POD_CIDR);
    let mut cri = Cri::connect(&substrate.containerd_sock).await;
    eventually(
        "containerd's CRI to load tug's CNI configuration (NetworkReady)",
        Duration::from_secs(30),
        || {
            let mut cri = cri.clone();
            async move { cri.condition("NetworkReady").await.then_some(()) }
        },
    )
    .await;

    let image = substrate.registry_image("http");
    cri.images
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull the http image through containerd's CRI");
    let name = unique_name("cni-interop");
    let logs = tempfile::tempdir().unwrap();
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: uuid(),
            namespace: "tug-test".into(),
            attempt: 0,
        }),
        hostname: name.clone(),
        log_directory: logs.path().display().to_string(),
        linux: Some(LinuxPodSandboxConfig::default()),
        labels: HashMap::from([("io.kubernetes.pod.name".into(), name.clone())]),
        ..Default::default()
    };
    let sandbox = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox with tug-cni")
        .into_inner()
        .pod_sandbox_id;
    let cleanup = SandboxGuard {
        id: sandbox.clone(),
    };

    let status = cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    let pod_ip = status
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    let cidr: ipnet::Ipv4Net = POD_CIDR.parse().unwrap();
    assert!(
        pod_ip
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| cidr.contains(&ip)),
        "the sandbox got {pod_ip:?} from tug-cni, in {POD_CIDR}"
    );

    let container = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "web".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image,
                    ..Default::default()
                }),
                log_path: "web.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: container,
        })
        .await
        .expect("StartContainer");
    let addr = format!("{pod_ip}:8080");
    let body = eventually(
        "the pod to answer on its tug-cni address",
        Duration::from_secs(30),
        || {
            let addr = addr.clone();
            async move {
                tokio::task::spawn_blocking(move || tug_tests::http::get(&addr, "/").ok())
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    assert!(body.ends_with("tug-test http\n"), "{body}");

    cri.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        })
        .await
        .expect("StopPodSandbox (CNI DEL)");
    let left = ipam_allocations(&installed.ipam_dir());
    assert!(
        left.is_empty(),
        "StopPodSandbox released the address through tug-cni DEL"
    );
    let routes = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["route", "show", &format!("{pod_ip}/32")])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        routes.trim().is_empty(),
        "the host route to the pod is gone: {routes}"
    );
    drop(cleanup);
}

fn uuid() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Stops and removes the sandbox however the test ends (on a connection of its own: the test's
/// runtime is blocked while this runs).
struct SandboxGuard {
    id: String,
}

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        let id = self.id.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut cri = Cri::connect(&Substrate::from_env().containerd_sock).await;
                let _ = cri
                    .runtime
                    .stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await;
                let _ = cri
                    .runtime
                    .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await;
            });
        })
        .join()
        .unwrap();
    }
}
