//! End to end, netns tier with the containerd and cluster tiers: three tug nodes, each a network
//! namespace on one segment running tug shim + kubelet + netd + proxy (two in nftables mode, one
//! in iptables mode), joined to the cluster API through a relay. Pods are placed on nodes by
//! `nodeName`, as a scheduler would bind them, and are reached the way an application reaches
//! them: pod to pod across nodes with the source address kept, a Service's ClusterIP from a pod
//! on every node, its NodePort from outside through every node. Then an endpoint turns unready
//! and a node goes away, and the Service follows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use tug_tests::cluster::cluster;
use tug_tests::eventually::eventually;
use tug_tests::node::{Segment, TugNode};
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

const HOST: &str = "192.168.61.254";
const NODE_IPS: [&str; 3] = ["192.168.61.1", "192.168.61.2", "192.168.61.3"];
const MODES: [&str; 3] = ["nftables", "iptables", "nftables"];

fn pod(name: &str, node: &str, spec: serde_json::Value) -> Pod {
    let mut spec = spec;
    spec["nodeName"] = json!(node);
    spec["automountServiceAccountToken"] = json!(false);
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": name.split('-').next().unwrap_or(name)}}, "spec": spec}))
        .expect("pod JSON")
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_else(|| panic!("{:?} has no IP", pod.metadata.name))
}

/// The ready endpoint addresses of Service `name`'s slices.
async fn ready_endpoints(slices: &Api<EndpointSlice>, name: &str) -> BTreeSet<String> {
    let listed = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    listed
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.clone())
        .collect()
}

/// `count` HTTP GETs of `path` at `target` (`ip:port`) from `client` (a busybox container on
/// `node`, whose `nc` speaks the request; busybox's `wget` crashes when statically linked):
/// the last line of each answer, `failed` for none.
async fn answers(
    node: &TugNode,
    client: &Pod,
    target: &str,
    path: &str,
    count: usize,
) -> BTreeMap<String, usize> {
    let (host, port) = target.rsplit_once(':').expect("ip:port");
    let script = format!(
        "for i in $(seq {count}); do out=$(printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port} | tail -n 1); echo \"${{out:-failed}}\"; done"
    );
    let (_, out) = node.exec(client, "client", &["sh", "-c", &script]).await;
    let mut seen = BTreeMap::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        *seen.entry(line.to_owned()).or_default() += 1;
    }
    seen
}

/// Asks as [`answers`] does until what is seen passes `ok` (the proxies sync a moment after the
/// API changes), for at most 30 s; fails with `what`, the last answers and the node's logs.
async fn until_answers(
    node: &TugNode,
    client: &Pod,
    (target, path, count): (&str, &str, usize),
    what: &str,
    ok: impl Fn(&BTreeMap<String, usize>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = answers(node, client, target, path, count).await;
        if ok(&seen) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the last {count} answers were {seen:?}\n{}",
            node.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "netns + containerd + cluster tiers (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug -p tug-cni && cargo test -p tug-tests --test e2e -- --ignored"]
async fn three_nodes_serve_pods_and_services_to_each_other_and_to_the_outside() {
    require(Tier::Netns);
    require(Tier::Containerd);
    let segment = Segment::new("e2e", HOST).await;
    let mut nodes = Vec::new();
    for (ip, mode) in NODE_IPS.iter().zip(MODES) {
        nodes.push(segment.node(ip, mode).await);
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name().to_owned()).collect();

    let ns = cluster().namespace("e2e").await;
    let admin = cluster().admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    let services: Api<Service> = Api::namespaced(admin.clone(), ns.name());
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), ns.name());
    let image = |name: &str| Substrate::from_env().registry_image(name);
    for (i, node) in names.iter().enumerate() {
        let web = pod(
            &format!("web-{i}"),
            node,
            json!({"containers": [{"name": "web", "image": image("http"),
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1, "failureThreshold": 1}}]}),
        );
        let client = pod(
            &format!("client-{i}"),
            node,
            json!({"containers": [{"name": "client", "image": image("busybox"), "command": ["sleep", "3600"]}]}),
        );
        for pod in [web, client] {
            pods.create(&PostParams::default(), &pod)
                .await
                .expect("create a pod");
        }
    }
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let service = services
        .create(&PostParams::default(), &service)
        .await
        .expect("create the Service");
    let spec = service.spec.clone().unwrap_or_default();
    let cluster_ip = spec.cluster_ip.clone().expect("a ClusterIP");
    let node_port = spec
        .ports
        .as_ref()
        .and_then(|p| p[0].node_port)
        .expect("a NodePort");

    let mut running: BTreeMap<String, Pod> = BTreeMap::new();
    for i in 0..3 {
        for name in [format!("web-{i}"), format!("client-{i}")] {
            let deadline = Instant::now() + Duration::from_secs(120);
            let pod = loop {
                let pod = pods.get(&name).await.expect("read a pod");
                if ready(&pod) {
                    break pod;
                }
                assert!(
                    Instant::now() < deadline,
                    "pod {name} is not Ready after 120 s: {}",
                    serde_json::to_string_pretty(&pod.status).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            running.insert(name, pod);
        }
    }
    let web_ips: Vec<String> = (0..3)
        .map(|i| pod_ip(&running[&format!("web-{i}")]))
        .collect();
    eventually(
        "all three web pods in the Service's endpoints",
        Duration::from_secs(60),
        || {
            let slices = slices.clone();
            let want: BTreeSet<String> = web_ips.iter().cloned().collect();
            async move { (ready_endpoints(&slices, "web").await == want).then_some(()) }
        },
    )
    .await;

    // Pod to pod across nodes: each client reaches every web pod on another node directly, and
    // the web pod sees the client's own address.
    for i in 0..3 {
        let client = &running[&format!("client-{i}")];
        for j in (0..3).filter(|j| *j != i) {
            let target = format!("{}:8080", web_ips[j]);
            let seen = answers(&nodes[i], client, &target, "/cgi-bin/peer", 1).await;
            // httpd listens on IPv6 too and names IPv4 peers `[::ffff:a.b.c.d]`.
            let peers: Vec<&str> = seen
                .keys()
                .map(|p| p.trim_matches(['[', ']']).trim_start_matches("::ffff:"))
                .collect();
            assert_eq!(
                peers,
                [&pod_ip(client)],
                "client-{i} on node {i} to web-{j} on node {j}: the source address is kept\n{}",
                nodes[i].logs()
            );
        }
    }

    // The ClusterIP from a pod on every node, balanced over endpoints on several nodes.
    let vip = format!("{cluster_ip}:80");
    let hostname = "/cgi-bin/hostname";
    for i in 0..3 {
        until_answers(
            &nodes[i],
            &running[&format!("client-{i}")],
            (&vip, hostname, 30),
            &format!(
                "client-{i} on {} ({} mode) to the ClusterIP reaches web pods on several nodes",
                names[i], MODES[i]
            ),
            |seen| seen.len() >= 2 && seen.keys().all(|k| k.starts_with("web-")),
        )
        .await;
    }

    // The NodePort from outside (the host on the segment), through every node.
    for (i, ip) in NODE_IPS.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            let response = tug_tests::http::get(&format!("{ip}:{node_port}"), "/cgi-bin/hostname")
                .unwrap_or_else(|e| {
                    panic!(
                        "NodePort {node_port} on node {i} ({ip}): {e}\n{}",
                        nodes[i].logs()
                    )
                });
            seen.insert(
                response
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            );
        }
        assert!(
            seen.len() >= 2 && seen.iter().all(|k| k.starts_with("web-")),
            "the NodePort on node {i} ({} mode) balances over web pods: {seen:?}",
            MODES[i]
        );
    }

    // Readiness: web-2's probe starts failing, its endpoint turns unready and no client is
    // sent there any more.
    let (code, out) = nodes[2]
        .exec(&running["web-2"], "web", &["rm", "/www/healthz"])
        .await;
    assert_eq!(code, 0, "{out}");
    eventually(
        "web-2 to leave the ready endpoints",
        Duration::from_secs(30),
        || {
            let slices = slices.clone();
            let gone = web_ips[2].clone();
            async move { (!ready_endpoints(&slices, "web").await.contains(&gone)).then_some(()) }
        },
    )
    .await;
    let left: BTreeSet<String> = ["web-0".to_owned(), "web-1".to_owned()].into();
    for i in 0..3 {
        until_answers(
            &nodes[i],
            &running[&format!("client-{i}")],
            (&vip, hostname, 20),
            &format!("client-{i}: an unready endpoint gets no traffic"),
            |seen| seen.keys().cloned().collect::<BTreeSet<_>>() == left,
        )
        .await;
    }

    // A node goes away: node 1's services stop and its Node is deleted, its pods are collected,
    // and the Service keeps only what is left.
    let gone = nodes.remove(1);
    let gone_name = gone.name().to_owned();
    drop(gone);
    let node_api: Api<Node> = Api::all(admin.clone());
    assert!(
        node_api.get_opt(&gone_name).await.ok().flatten().is_none(),
        "the Node is deleted"
    );
    eventually(
        "web-1 to leave the Service",
        Duration::from_secs(120),
        || {
            let slices = slices.clone();
            let gone = web_ips[1].clone();
            async move { (!ready_endpoints(&slices, "web").await.contains(&gone)).then_some(()) }
        },
    )
    .await;
    for (node, i) in nodes.iter().zip([0, 2]) {
        until_answers(
            node,
            &running[&format!("client-{i}")],
            (&vip, hostname, 10),
            &format!("client-{i}: the gone node's endpoint is dropped"),
            |seen| seen.keys().collect::<Vec<_>>() == ["web-0"],
        )
        .await;
    }
}
