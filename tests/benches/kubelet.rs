//! Pod start through the kubelet: a pod bound to the node → `Running` observed over a watch,
//! 20 pods one after another, with `tug kubelet` on tug shim and on containerd's built-in CRI in
//! the same run (same containerd, image, CNI plugin). Then the kubelet's footprint: RSS and CPU
//! over 10 idle seconds with 0 and with 20 pods. Targets: p50 ≤ 0.5 s, p99 ≤ 1.5 s; ≤ 30 MiB
//! RSS and ≤ 0.5 % of a core idle. Needs root, the substrate and the cluster tier:
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

struct Footprint {
    rss_kib: u64,
    cpu_percent: f64,
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn footprint(pid: u32) -> Footprint {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let before = cpu_ticks(pid);
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let used = (cpu_ticks(pid) - before) as f64 / ticks;
    Footprint {
        rss_kib: rss_kib(pid),
        cpu_percent: used / window.as_secs_f64() * 100.0,
    }
}

struct Run {
    p50: Duration,
    p99: Duration,
    idle: Footprint,
    loaded: Footprint,
}

async fn run(label: &str, endpoint: &Path, node_ip: &str) -> Run {
    let substrate = Substrate::from_env();
    let image = substrate.registry_image("busybox");
    let mut kubelet = TugKubelet::start(label, endpoint, node_ip).await;
    let pid = kubelet.pid().expect("kubelet pid");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = footprint(pid).await;
    let namespace = cluster().namespace("bench-kubelet").await;
    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, namespace.name());
    // Warm-up: the image is pulled once.
    start_one(&pods, pod("warm-up", &kubelet.name, &image)).await;
    let mut samples = Vec::new();
    for i in 0..PODS {
        samples.push(start_one(&pods, pod(&format!("pod-{i}"), &kubelet.name, &image)).await);
    }
    let loaded = footprint(pid).await;
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
        idle,
        loaded,
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
    println!("kubelet footprint (tug shim run)");
    println!(
        "  0 pods:  RSS {:6.1} MiB  CPU {:.2} % of a core",
        tug.idle.rss_kib as f64 / 1024.0,
        tug.idle.cpu_percent
    );
    println!(
        "  {PODS} pods: RSS {:6.1} MiB  CPU {:.2} % of a core",
        tug.loaded.rss_kib as f64 / 1024.0,
        tug.loaded.cpu_percent
    );
    println!("kubelet footprint (containerd CRI run, relisting every second)");
    println!(
        "  0 pods:  RSS {:6.1} MiB  CPU {:.2} % of a core",
        reference.idle.rss_kib as f64 / 1024.0,
        reference.idle.cpu_percent
    );
    println!(
        "  {PODS} pods: RSS {:6.1} MiB  CPU {:.2} % of a core",
        reference.loaded.rss_kib as f64 / 1024.0,
        reference.loaded.cpu_percent
    );
}
