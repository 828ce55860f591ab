//! What the fault tests share: a node's state that must survive a fault (its containers, its
//! proxy's rules, its routes), a client that keeps connecting to a Service through it, and its
//! proxy's metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::cluster::cluster;
use crate::eventually::eventually;
use crate::substrate::Substrate;

use crate::node::{TugNode, cluster_cidr};

/// What must survive a crash: each pod's containers (id and restart count), the proxy's rules
/// (nft's listing, its entries sorted, since a rewrite may list a set in another order) and the
/// node's routes.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Each pod's containers: id and restart count.
    pub containers: BTreeMap<String, (String, i32)>,
    /// The proxy's nftables table, one sorted entry per element.
    pub rules: Vec<String>,
    /// The node's routes.
    pub routes: String,
}

pub async fn snapshot(node: &TugNode, pods: &Api<Pod>) -> Snapshot {
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
pub fn differences(before: &Snapshot, after: &Snapshot) -> String {
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
pub fn proxy_metric(node: &TugNode, name: &str) -> Option<u64> {
    let text = node
        .ns
        .run(|| crate::http::get("127.0.0.1:10249", "/metrics"))
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// A client outside a node that opens connection after connection to `target` (`ip:port`,
/// a NodePort) and counts what is answered and what fails, until stopped.
#[derive(Debug)]
pub struct Client {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Client {
    /// Starts connecting: one `GET /cgi-bin/hostname` every `pause`.
    pub fn start(target: &str, pause: Duration) -> Client {
        Client::paced(target, "/cgi-bin/hostname", 1, pause)
    }

    /// Starts `threads` connecting at once, each one `GET path` per `period` (so `threads` per
    /// `period` in all, as long as each answer comes within it).
    pub fn paced(target: &str, path: &str, threads: usize, period: Duration) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed, failures, target, path) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    failures.clone(),
                    target.to_owned(),
                    path.to_owned(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let began = std::time::Instant::now();
                        match crate::http::get(&target, &path) {
                            Ok(r)
                                if r.starts_with("HTTP/1.0 200")
                                    || r.starts_with("HTTP/1.1 200") =>
                            {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut list = failures.lock().expect("failures lock");
                                if list.len() < 5 {
                                    list.push(format!("{other:?}"));
                                }
                            }
                        }
                        std::thread::sleep(period.saturating_sub(began.elapsed()));
                    }
                })
            })
            .collect();
        Client {
            stop,
            ok,
            failed,
            failures,
            threads,
        }
    }

    /// Connections answered so far.
    pub fn answered(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops and returns (answered, failed, the first few failures).
    pub fn finish(mut self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            thread.join().expect("a client thread");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.failures.lock().expect("failures lock").clone(),
        )
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `count` web pods (`web-<i>`, readiness-probed every second) on `node` in namespace `ns`,
/// behind the NodePort Service `web`. Returns once every pod is Ready and the NodePort reaches
/// each of them, with the NodePort.
pub async fn web_behind_node_port(node: &TugNode, ns: &str, count: usize) -> i32 {
    let admin = cluster().admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let services: Api<Service> = Api::namespaced(admin, ns);
    let image = Substrate::from_env().registry_image("http");
    for i in 0..count {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("web-{i}"), "labels": {"app": "web"}},
            "spec": {"nodeName": node.name(), "automountServiceAccountToken": false,
                     "containers": [{"name": "web", "image": image,
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}}]}
        }))
        .expect("pod JSON");
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create a pod");
    }
    let web = services
        .create(&PostParams::default(), &crate::e2e::web_service())
        .await
        .expect("create the Service");
    let node_port = web
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p[0].node_port)
        .expect("a NodePort");
    crate::cluster::pods_ready(&pods, count, Duration::from_secs(180)).await;
    let target = format!("{}:{node_port}", node.ip);
    eventually(
        "the NodePort to reach every web pod",
        Duration::from_secs(60),
        || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..(10 * count) {
                if let Ok(r) = crate::http::get(&target, "/cgi-bin/hostname") {
                    seen.insert(r.lines().last().unwrap_or_default().trim().to_owned());
                }
            }
            async move { (seen.len() == count).then_some(()) }
        },
    )
    .await;
    node_port
}

/// The web pods' part of a snapshot: their containers, and the node's routes but those to other
/// pods (the short-lived pod's go with it, and a pod started later brings its own).
pub async fn web_part(mut snapshot: Snapshot, pods: &Api<Pod>) -> Snapshot {
    snapshot
        .containers
        .retain(|name, _| name.starts_with("web-"));
    let web_ips: Vec<String> = pods
        .list(&Default::default())
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("web-"))
        })
        .filter_map(|p| p.status?.pod_ip)
        .collect();
    let pod_cidr: ipnet::IpNet = cluster_cidr().parse().expect("the cluster CIDR");
    snapshot.routes = snapshot
        .routes
        .lines()
        .filter(|line| {
            let to = line.split_whitespace().next().unwrap_or_default();
            let other_pod = to
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| pod_cidr.contains(&ip) && !web_ips.iter().any(|w| w == to));
            !other_pod
        })
        .map(|line| format!("{line}\n"))
        .collect();
    snapshot
}

/// The exit code the API reports for `pod`'s first container, once it has terminated.
pub fn exit_code(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

/// Creates `count` Services (`other-<i>`, one TCP port each) in namespace `ns`, 16 at a time.
pub async fn other_services(ns: &str, count: usize) {
    let others: Api<Service> = Api::namespaced(cluster().admin().await, ns);
    futures::stream::iter(0..count)
        .map(|i| {
            let others = others.clone();
            async move {
                let service: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("other-{i}")},
                    "spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 80}]}
                }))
                .expect("Service JSON");
                others
                    .create(&PostParams::default(), &service)
                    .await
                    .expect("create a Service");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// Waits (up to `timeout`) until `node`'s proxy has programmed every Service port the cluster
/// has (its own `kubernetes` and whatever else is there included); returns how many that is.
pub async fn proxy_programs_every_service_port(node: &TugNode, timeout: Duration) -> u64 {
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
    let deadline = std::time::Instant::now() + timeout;
    while proxy_metric(node, "tug_proxy_service_ports").is_none_or(|n| n < wanted) {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy did not program {wanted} Service ports in {timeout:?}: {:?}\n{}",
            node.ns
                .run(|| crate::http::get("127.0.0.1:10249", "/metrics")),
            node.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wanted
}

/// Starts pod `name` on `node` in namespace `ns` (restartPolicy Never) whose one container runs
/// `sh -c command`, and returns once that container is running.
pub async fn running_pod(node: &TugNode, ns: &str, name: &str, command: &str) {
    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, ns);
    let image = Substrate::from_env().registry_image("http");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node.name(), "automountServiceAccountToken": false,
                 "restartPolicy": "Never",
                 "containers": [{"name": "main", "image": image, "command": ["sh", "-c", command]}]}
    }))
    .expect("pod JSON");
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    eventually(
        &format!("pod {name}'s container to run"),
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let pod = pods.get(name).await.ok()?;
                let state = pod.status?.container_statuses?.first()?.state.clone()?;
                state.running.map(|_| ())
            }
        },
    )
    .await;
}
