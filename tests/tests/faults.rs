//! Faults, netns tier with the containerd and cluster tiers: a tug node (tests/src/node.rs)
//! with 20 pods behind a NodePort Service and 10,000 other Services, while a client outside the
//! node opens connection after connection to the NodePort. Each of the node's services is
//! killed with SIGKILL and started again, one at a time and then all together: no container is
//! restarted or replaced, no connection fails, and the rules and routes are what they were.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use tug_tests::cluster::{cluster, pod_ready};
use tug_tests::eventually::eventually;
use tug_tests::node::{Segment, TugNode};
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

const HOST: &str = "192.168.62.254";
const NODE_IP: &str = "192.168.62.1";
const PODS: usize = 20;
/// Services besides the web pods' one, in a namespace of their own.
const OTHER_SERVICES: usize = 10_000;

/// What must survive a crash: each pod's containers (id and restart count), the proxy's rules
/// (nft's listing, its entries sorted, since a rewrite may list a set in another order) and the
/// node's routes.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    containers: BTreeMap<String, (String, i32)>,
    rules: Vec<String>,
    routes: String,
}

async fn snapshot(node: &TugNode, pods: &Api<Pod>) -> Snapshot {
    let mut containers = BTreeMap::new();
    for pod in pods
        .list(&ListParams::default())
        .await
        .expect("list pods")
        .items
    {
        for status in pod
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
        {
            containers.insert(
                format!(
                    "{}/{}",
                    pod.metadata.name.clone().unwrap_or_default(),
                    status.name
                ),
                (
                    status.container_id.unwrap_or_default(),
                    status.restart_count,
                ),
            );
        }
    }
    let listing = node.ns.run(|| {
        std::process::Command::new("nft")
            .args(["list", "table", "ip", "tug-proxy"])
            .output()
            .expect("run nft")
    });
    let text = String::from_utf8_lossy(&listing.stdout);
    let mut rules: Vec<String> = text
        .split([',', '\n', '{', '}'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    rules.sort();
    let routes = String::from_utf8_lossy(&node.ns.ip(&["route", "show"]).stdout).into_owned();
    Snapshot {
        containers,
        rules,
        routes,
    }
}

/// What differs between two snapshots, briefly.
fn differences(before: &Snapshot, after: &Snapshot) -> String {
    let mut out = Vec::new();
    for (name, was) in &before.containers {
        let now = after.containers.get(name);
        if now != Some(was) {
            out.push(format!("container {name}: {was:?} -> {now:?}"));
        }
    }
    if before.rules != after.rules {
        let gone = before
            .rules
            .iter()
            .filter(|r| !after.rules.contains(r))
            .take(5);
        let new = after
            .rules
            .iter()
            .filter(|r| !before.rules.contains(r))
            .take(5);
        out.push(format!(
            "rules: {} -> {} entries; gone {:?}, new {:?}",
            before.rules.len(),
            after.rules.len(),
            gone.collect::<Vec<_>>(),
            new.collect::<Vec<_>>()
        ));
    }
    if before.routes != after.routes {
        out.push(format!("routes:\n{}\n->\n{}", before.routes, after.routes));
    }
    out.join("\n")
}

/// The proxy's metrics inside the node.
fn metric(node: &TugNode, name: &str) -> Option<u64> {
    let text = node
        .ns
        .run(|| tug_tests::http::get("127.0.0.1:10249", "/metrics"))
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

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
    let services: Api<Service> = Api::namespaced(admin.clone(), ns.name());
    let others: Api<Service> = Api::namespaced(admin.clone(), others_ns.name());
    let image = Substrate::from_env().registry_image("http");
    for i in 0..PODS {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("web-{i}"), "labels": {"app": "web"}},
            "spec": {"nodeName": node.name(), "automountServiceAccountToken": false,
                     "containers": [{"name": "web", "image": image,
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create a pod");
    }
    let web: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let web = services
        .create(&PostParams::default(), &web)
        .await
        .expect("create the Service");
    let node_port = web
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p[0].node_port)
        .expect("a NodePort");
    let began = Instant::now();
    futures::stream::iter(0..OTHER_SERVICES)
        .map(|i| {
            let services = others.clone();
            async move {
                let service: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("other-{i}")},
                    "spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 80}]}
                }))
                .unwrap();
                services
                    .create(&PostParams::default(), &service)
                    .await
                    .expect("create a Service");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    eprintln!("created {OTHER_SERVICES} Services in {:?}", began.elapsed());
    eventually("all 20 pods Ready", Duration::from_secs(180), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let ready = list.items.iter().filter(|p| pod_ready(p)).count();
            (ready == PODS).then_some(())
        }
    })
    .await;
    // Every Service port the cluster has (its own `kubernetes` and whatever else is there
    // included), programmed before the rules are taken as the reference.
    let all: Api<Service> = Api::all(cluster().admin().await);
    let wanted = all
        .list(&ListParams::default())
        .await
        .expect("list every Service")
        .items
        .iter()
        .filter_map(|s| s.spec.as_ref())
        .filter(|spec| spec.cluster_ip.as_deref().is_some_and(|ip| ip != "None"))
        .map(|spec| spec.ports.as_ref().map_or(0, Vec::len) as u64)
        .sum::<u64>();
    assert!(wanted > OTHER_SERVICES as u64, "the Services are all there");
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(&node, "tug_proxy_service_ports").is_none_or(|n| n < wanted) {
        assert!(
            Instant::now() < deadline,
            "the proxy did not program {wanted} Service ports in 120 s: {:?}\n{}",
            node.ns
                .run(|| tug_tests::http::get("127.0.0.1:10249", "/metrics")),
            node.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every web pod is an endpoint before the client starts.
    let target = format!("{NODE_IP}:{node_port}");
    eventually(
        "the NodePort to reach every web pod",
        Duration::from_secs(60),
        || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..200 {
                if let Ok(r) = tug_tests::http::get(&target, "/cgi-bin/hostname") {
                    seen.insert(r.lines().last().unwrap_or_default().trim().to_owned());
                }
            }
            async move { (seen.len() == PODS).then_some(()) }
        },
    )
    .await;

    // A client outside the node: connection after connection to the NodePort.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = {
        let (stop, ok, failed, failures, target) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            failures.clone(),
            target.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match tug_tests::http::get(&target, "/cgi-bin/hostname") {
                    Ok(r) if r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut list = failures.lock().unwrap();
                        if list.len() < 5 {
                            list.push(format!("{other:?}"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let before = snapshot(&node, &pods).await;
    assert_eq!(before.containers.len(), PODS, "{before:?}");
    let mut figures = Vec::new();
    for victim in ["proxy", "netd", "kubelet", "shim", "all"] {
        let syncs_before = metric(&node, "tug_proxy_syncs_total");
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
        // Back: the proxy has synced again (its counter restarts with the process).
        if matches!(victim, "proxy" | "all") {
            eventually(
                "the restarted proxy's first sync",
                Duration::from_secs(60),
                || {
                    let syncs = metric(&node, "tug_proxy_syncs_total");
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
    stop.store(true, Ordering::Relaxed);
    client.join().expect("the client thread");
    let end = snapshot(&node, &pods).await;
    assert!(end == before, "at the end:\n{}", differences(&before, &end));
    for (victim, total, reconciled, _) in &figures {
        eprintln!(
            "{victim:<8} killed and back in {total:>10.1?}; ready again {reconciled:>10.1?} after its restart"
        );
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("client: {ok} connections answered, {failed} failed");
    assert!(
        ok > 100,
        "the client made too few connections to mean anything: {ok}"
    );
    assert_eq!(
        failed,
        0,
        "connections to the NodePort failed while services crashed: {:?}",
        failures.lock().unwrap()
    );
}
