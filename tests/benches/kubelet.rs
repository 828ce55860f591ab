//! Pod start through the kubelet: a pod bound to the node → `Running` observed over a watch,
//! 20 pods one after another, with `tug kubelet` on tug shim and on containerd's built-in CRI in
//! the same run (same containerd, image, CNI plugin). Targets: p50 ≤ 0.5 s, p99 ≤ 1.5 s (the
//! kubelet's footprint is the `footprint` bench's). Needs root, the substrate and the cluster tier:
//! `scripts/substrate up && eval "$(scripts/substrate env)" && env $(scripts/build-release) cargo
//! bench -p tug-tests --bench kubelet`.

#![allow(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams, WatchEvent, WatchParams};
use tug_tests::cluster::cluster;
use tug_tests::cri::install_tug_cni;
use tug_tests::kubelet::TugKubelet;
use tug_tests::measure::percentile;
use tug_tests::report::Report;
use tug_tests::shim::TugShim;
use tug_tests::substrate::Substrate;

const PODS: usize = 20;

fn pod(name: &str, node: &str, image: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": image, "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"]}]}
    }))
    .expect("pod")
}

/// Creates `name` and returns how long until a watch shows it Running.
async fn start_one(pods: &Api<Pod>, pod: Pod) -> Duration {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let params = WatchParams::default().fields(&format!("metadata.name={name}"));
    let mut stream = pods.watch(&params, "0").await.expect("watch").boxed();
    let started = Instant::now();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    while let Some(event) = stream.next().await {
        if let Ok(WatchEvent::Added(p) | WatchEvent::Modified(p)) = event
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        {
            return started.elapsed();
        }
    }
    panic!("the watch ended before {name} ran");
}

struct Run {
    p50: Duration,
    p99: Duration,
}

async fn run(label: &str, endpoint: &Path, node_ip: &str) -> Run {
    let substrate = Substrate::from_env();
    let image = substrate.registry_image("busybox");
    let mut kubelet = TugKubelet::start(label, endpoint, node_ip).await;
    let namespace = cluster().namespace("bench-kubelet").await;
    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, namespace.name());
    // Warm-up: the image is pulled once.
    start_one(&pods, pod("warm-up", &kubelet.name, &image)).await;
    let mut samples = Vec::new();
    for i in 0..PODS {
        samples.push(start_one(&pods, pod(&format!("pod-{i}"), &kubelet.name, &image)).await);
    }
    pods.delete_collection(
        &DeleteParams {
            grace_period_seconds: Some(1),
            ..Default::default()
        },
        &Default::default(),
    )
    .await
    .expect("delete pods");
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && !pods
            .list(&Default::default())
            .await
            .map(|l| l.items.is_empty())
            .unwrap_or(false)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kubelet.kill9();
    Run {
        p50: percentile(&mut samples, 0.5),
        p99: percentile(&mut samples, 0.99),
    }
}

#[tokio::main]
async fn main() {
    let substrate = Substrate::from_env();
    let shim = TugShim::start("bench-kubelet", "10.254.20.0/24").await;
    let tug = run("bench-tug", &shim.socket, "192.0.2.31").await;
    drop(shim);
    let _cni = install_tug_cni(&substrate, "10.254.21.0/24");
    let reference = run(
        "bench-cri",
        Path::new(&substrate.containerd_sock),
        "192.0.2.32",
    )
    .await;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("kubelet pod start ({PODS} pods, bound → Running via watch)");
    println!(
        "  tug kubelet + tug shim        p50 {:7.1} ms  p99 {:7.1} ms",
        ms(tug.p50),
        ms(tug.p99)
    );
    println!(
        "  tug kubelet + containerd CRI  p50 {:7.1} ms  p99 {:7.1} ms",
        ms(reference.p50),
        ms(reference.p99)
    );
    println!(
        "  ratio tug shim / containerd CRI: p50 {:.2}x  p99 {:.2}x",
        ms(tug.p50) / ms(reference.p50),
        ms(tug.p99) / ms(reference.p99)
    );
    let report = Report::new(
        "kubelet",
        "kubelet: pod start, tug shim against containerd's CRI under tug kubelet",
        &format!(
            "A pod bound to the node (nodeName) until a watch shows it Running, {PODS} pods one \
             after another after one warm-up pod, through the test API server. tug kubelet on \
             tug shim, then tug kubelet on containerd's built-in CRI, same containerd, image \
             and CNI plugin. Upstream's kubelet cannot be installed on this machine."
        ),
    );
    report.millis(
        "pod start p50",
        tug.p50,
        &[("containerd CRI", reference.p50)],
    );
    report.millis(
        "pod start p99",
        tug.p99,
        &[("containerd CRI", reference.p99)],
    );
}
