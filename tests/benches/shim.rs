//! Pod start latency through the CRI: RunPodSandbox + CreateContainer + StartContainer, for
//! tug shim and for containerd's built-in CRI plugin in the same run, on the same containerd,
//! image and CNI plugin (tug-cni). Prints p50/p99 and the ratio (target: tug ≤ 1.0×).
//! Needs root and the substrate: `scripts/substrate up && eval "$(scripts/substrate env)" &&
//! env $(scripts/build-release) cargo bench -p tug-tests --bench shim`.

#![allow(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use tug_tests::cri::{Cri, install_tug_cni};
use tug_tests::measure::percentile;
use tug_tests::report::Report;
use tug_tests::shim::TugShim;
use tug_tests::substrate::Substrate;

const PODS: usize = 30;

fn sandbox(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/tug-bench/{name}"),
            ..Default::default()
        }),
        labels: HashMap::from([("bench".to_owned(), "shim".to_owned())]),
        ..Default::default()
    }
}

fn container(image: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "3600".into()],
        linux: Some(LinuxContainerConfig {
            resources: None,
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// Starts `PODS` pods one after another; returns each pod's start latency. Pods are removed
/// afterwards, outside the measurement.
async fn measure(mut cri: Cri, image: &str, label: &str) -> Vec<Duration> {
    cri.images
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await
        .expect("pull the benchmark image");
    let mut samples = Vec::new();
    let mut started = Vec::new();
    for i in 0..PODS + 3 {
        let config = sandbox(&format!("{label}-{}-{i}", std::process::id()));
        let began = Instant::now();
        let id = cri
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let container_id = cri
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: id.clone(),
                config: Some(container(image)),
                sandbox_config: Some(config),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        cri.runtime
            .start_container(StartContainerRequest {
                container_id: container_id.clone(),
            })
            .await
            .expect("StartContainer");
        // The first pods warm caches on both sides; they are not counted.
        if i >= 3 {
            samples.push(began.elapsed());
        }
        started.push((id, container_id));
    }
    for (sandbox, container) in started {
        let _ = cri
            .runtime
            .remove_container(RemoveContainerRequest {
                container_id: container,
            })
            .await;
        let _ = cri
            .runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await;
        let _ = cri
            .runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox,
            })
            .await;
    }
    samples
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let substrate = Substrate::from_env();
        let image = substrate.registry_image("busybox");
        let shim = TugShim::start("bench", "10.254.7.0/24").await;
        let mut tug = Box::pin(measure(shim.cri().await, &image, "tug")).await;
        drop(shim);
        let _cni = install_tug_cni(&substrate, "10.254.8.0/24");
        let mut containerd =
            Box::pin(measure(Cri::connect(&substrate.containerd_sock).await, &image, "cd")).await;
        let (tug50, tug99) = (percentile(&mut tug, 0.5), percentile(&mut tug, 0.99));
        let (cd50, cd99) = (percentile(&mut containerd, 0.5), percentile(&mut containerd, 0.99));
        println!("pod start (RunPodSandbox + CreateContainer + StartContainer), {PODS} pods each, tug-cni network");
        println!("{:<22} {:>10} {:>10}", "runtime", "p50", "p99");
        println!("{:<22} {:>10.1?} {:>10.1?}", "tug shim", tug50, tug99);
        println!("{:<22} {:>10.1?} {:>10.1?}", "containerd CRI", cd50, cd99);
        println!(
            "ratio tug/containerd: p50 {:.2}x, p99 {:.2}x (target <= 1.0x)",
            tug50.as_secs_f64() / cd50.as_secs_f64(),
            tug99.as_secs_f64() / cd99.as_secs_f64()
        );
        let report = Report::new(
            "shim",
            "CRI runtime: pod start, tug shim against containerd's CRI",
            &format!(
                "RunPodSandbox + CreateContainer + StartContainer, {PODS} pods one after another \
                 (3 warm-up pods first, not counted), the busybox image from the local registry, \
                 on the same containerd, image and CNI plugin (tug-cni) for both."
            ),
        );
        report.millis("pod start p50", tug50, &[("containerd CRI", cd50)]);
        report.millis("pod start p99", tug99, &[("containerd CRI", cd99)]);
    });
}
