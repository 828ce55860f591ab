//! The end-to-end scenario, run over any set of nodes joined to the cluster the tests use
//! (network namespaces on this kernel, qemu guests with kernels of their own, or both): a web pod
//! and a client pod on every node, placed by `nodeName` as a scheduler would bind them, and a
//! NodePort Service over the web pods. Each step checks what an application relies on, reaching
//! the pods the way `kubectl exec` does (through each node's kubelet API) and the NodePort from
//! outside (the host on the nodes' segment).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::cluster::{TestNamespace, cluster, pod_ready};
use crate::eventually::eventually;
use crate::substrate::Substrate;

/// A node as the scenario sees it.
pub struct Member {
    /// The Node's name.
    pub name: String,
    /// Its address on the segment (its InternalIP).
    pub ip: String,
    /// Its proxy mode, for messages.
    pub mode: String,
    /// Its kubelet API, `ip:port`.
    pub kubelet: String,
    /// What the node logged, for a failure message.
    pub logs: Box<dyn Fn() -> String + Send + Sync>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The pods and the Service, running.
#[derive(Debug)]
pub struct Scenario {
    members: Vec<Member>,
    ns: TestNamespace,
    slices: Api<EndpointSlice>,
    running: BTreeMap<String, Pod>,
    web_ips: Vec<String>,
    /// The Service's ClusterIP and port, `ip:80`.
    vip: String,
    node_port: i32,
    /// Web pods no longer expected to answer (unready, or their node gone).
    out: BTreeSet<usize>,
    /// Nodes gone.
    gone: BTreeSet<usize>,
    /// The admin's client certificate and key (PEM), which the kubelets' API trusts.
    admin: (Vec<u8>, Vec<u8>),
}

/// The NodePort Service `web`: port 80 of the pods labelled `app: web`, whose port 8080 serves.
pub fn web_service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}
    }))
    .expect("Service JSON")
}

fn pod(name: &str, node: &str, spec: serde_json::Value) -> Pod {
    let mut spec = spec;
    spec["nodeName"] = json!(node);
    spec["automountServiceAccountToken"] = json!(false);
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": name.split('-').next().unwrap_or(name)}}, "spec": spec}))
        .expect("pod JSON")
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

/// The admin kubeconfig's client certificate and key, PEM.
fn admin_certificate() -> (Vec<u8>, Vec<u8>) {
    let path = cluster().admin_kubeconfig_path();
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let config: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    let user = &config["users"][0]["user"];
    let field = |data: &str, file: &str| match (user[data].as_str(), user[file].as_str()) {
        (Some(data), _) => base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_else(|e| panic!("{data} in the admin kubeconfig: {e}")),
        (None, Some(file)) => std::fs::read(file).unwrap_or_else(|e| panic!("read {file}: {e}")),
        (None, None) => panic!(
            "the end-to-end suite reaches kubelets as the API server does, with a client certificate; the admin kubeconfig {} has no {data} or {file}",
            path.display()
        ),
    };
    (
        field("client-certificate-data", "client-certificate"),
        field("client-key-data", "client-key"),
    )
}

impl Scenario {
    /// Creates a web pod (`web-<i>`, the test HTTP image with a readiness probe) and a client
    /// pod (`client-<i>`, busybox) on every member, and a NodePort Service `web` over the web
    /// pods; waits up to `start` for every pod to be Ready and every web pod to be an endpoint.
    pub async fn start(members: Vec<Member>, start: Duration) -> Scenario {
        let ns = cluster().namespace("e2e").await;
        let admin = cluster().admin().await;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
        let services: Api<Service> = Api::namespaced(admin.clone(), ns.name());
        let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), ns.name());
        let image = |name: &str| Substrate::from_env().registry_image(name);
        for (i, member) in members.iter().enumerate() {
            let web = pod(
                &format!("web-{i}"),
                &member.name,
                json!({"containers": [{"name": "web", "image": image("http"),
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1, "failureThreshold": 1}}]}),
            );
            let client = pod(
                &format!("client-{i}"),
                &member.name,
                json!({"containers": [{"name": "client", "image": image("busybox"), "command": ["sleep", "3600"]}]}),
            );
            for pod in [web, client] {
                pods.create(&PostParams::default(), &pod)
                    .await
                    .expect("create a pod");
            }
        }
        let service = services
            .create(&PostParams::default(), &web_service())
            .await
            .expect("create the Service");
        let spec = service.spec.clone().unwrap_or_default();
        let cluster_ip = spec.cluster_ip.clone().expect("a ClusterIP");
        let node_port = spec
            .ports
            .as_ref()
            .and_then(|p| p[0].node_port)
            .expect("a NodePort");

        let deadline = Instant::now() + start;
        let mut running = BTreeMap::new();
        for (i, member) in members.iter().enumerate() {
            for name in [format!("web-{i}"), format!("client-{i}")] {
                let pod = loop {
                    let pod = pods.get(&name).await.expect("read a pod");
                    if pod_ready(&pod) {
                        break pod;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "pod {name} on {} is not Ready after {start:?}: {}\n{}",
                        member.name,
                        serde_json::to_string_pretty(&pod.status).unwrap_or_default(),
                        (member.logs)()
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                };
                running.insert(name, pod);
            }
        }
        let web_ips: Vec<String> = (0..members.len())
            .map(|i| pod_ip(&running[&format!("web-{i}")]))
            .collect();
        eventually(
            "every web pod in the Service's endpoints",
            Duration::from_secs(60),
            || {
                let slices = slices.clone();
                let want: BTreeSet<String> = web_ips.iter().cloned().collect();
                async move { (ready_endpoints(&slices, "web").await == want).then_some(()) }
            },
        )
        .await;
        Scenario {
            members,
            ns,
            slices,
            running,
            web_ips,
            vip: format!("{cluster_ip}:80"),
            node_port,
            out: BTreeSet::new(),
            gone: BTreeSet::new(),
            admin: admin_certificate(),
        }
    }

    /// The nodes.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Runs `cmd` in container `container` of pod `pod` on member `i` through its kubelet API,
    /// as kube-apiserver does for `kubectl exec`; returns the exit code and stdout then stderr.
    pub async fn exec(&self, i: usize, pod: &str, container: &str, cmd: &[&str]) -> (i32, String) {
        let member = &self.members[i];
        let command: String = cmd
            .iter()
            .map(|c| format!("command={}", encode(c)))
            .collect::<Vec<_>>()
            .join("&");
        let path = format!(
            "/exec/{}/{pod}/{container}?{command}&stdout=1&stderr=1",
            self.ns.name()
        );
        let conn = crate::streaming::tls_to_kubelet(&member.kubelet, &self.admin.0, &self.admin.1)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "TLS to {}'s kubelet at {}: {e}",
                    member.name, member.kubelet
                )
            });
        let out = crate::streaming::exec_websocket(conn, &member.kubelet, &path, None)
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?} in {pod} on {}: {e}", member.name));
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.exit.unwrap_or(-1), text)
    }

    /// `count` HTTP GETs of `path` at `target` (`ip:port`) from `client-<i>` (busybox's `nc`
    /// speaks the request; its static `wget` crashes): the last line of each answer, `failed`
    /// for none.
    async fn answers(
        &self,
        i: usize,
        target: &str,
        path: &str,
        count: usize,
    ) -> BTreeMap<String, usize> {
        let (host, port) = target.rsplit_once(':').expect("ip:port");
        let script = format!(
            "for i in $(seq {count}); do out=$(printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port} | tail -n 1); echo \"${{out:-failed}}\"; done"
        );
        let (_, out) = self
            .exec(i, &format!("client-{i}"), "client", &["sh", "-c", &script])
            .await;
        let mut seen = BTreeMap::new();
        for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
            *seen.entry(line.to_owned()).or_default() += 1;
        }
        seen
    }

    /// Asks as [`Scenario::answers`] does until what is seen passes `ok` (proxies sync a moment
    /// after the API changes), for at most a minute; fails with `what`, the last answers and the
    /// node's logs.
    async fn until_answers(
        &self,
        i: usize,
        (target, path, count): (&str, &str, usize),
        what: &str,
        ok: impl Fn(&BTreeMap<String, usize>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.answers(i, target, path, count).await;
            if ok(&seen) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the last {count} answers were {seen:?}\n{}",
                (self.members[i].logs)()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn present(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.members.len()).filter(|i| !self.gone.contains(i))
    }

    /// The web pods still expected to answer.
    fn answering(&self) -> BTreeSet<String> {
        (0..self.members.len())
            .filter(|i| !self.out.contains(i))
            .map(|i| format!("web-{i}"))
            .collect()
    }

    /// Pod to pod across nodes: every client reaches every web pod on another node directly, and
    /// the web pod sees the client's own address (no NAT between pods).
    pub async fn pod_to_pod(&self) {
        for i in self.present() {
            let client = pod_ip(&self.running[&format!("client-{i}")]);
            for j in self.present().filter(|j| *j != i) {
                let target = format!("{}:8080", self.web_ips[j]);
                let seen = self.answers(i, &target, "/cgi-bin/peer", 1).await;
                // httpd listens on IPv6 too and names IPv4 peers `[::ffff:a.b.c.d]`.
                let peers: Vec<&str> = seen
                    .keys()
                    .map(|p| p.trim_matches(['[', ']']).trim_start_matches("::ffff:"))
                    .collect();
                assert_eq!(
                    peers,
                    [&client],
                    "client-{i} on {} to web-{j} on {}: the source address is kept\n{}",
                    self.members[i].name,
                    self.members[j].name,
                    (self.members[i].logs)()
                );
            }
        }
    }

    /// The ClusterIP from a pod on every node, balanced over endpoints on several nodes.
    pub async fn cluster_ip_from_every_node(&self) {
        for i in self.present() {
            let member = &self.members[i];
            self.until_answers(
                i,
                (&self.vip, "/cgi-bin/hostname", 30),
                &format!(
                    "client-{i} on {} ({} mode) to the ClusterIP reaches web pods on several nodes",
                    member.name, member.mode
                ),
                |seen| seen.len() >= 2 && seen.keys().all(|k| k.starts_with("web-")),
            )
            .await;
        }
    }

    /// The NodePort from outside (the caller, on the nodes' segment), through every node,
    /// balanced over web pods.
    pub async fn node_port_through_every_node(&self) {
        for i in self.present() {
            let member = &self.members[i];
            let addr = format!("{}:{}", member.ip, self.node_port);
            let mut seen = BTreeSet::new();
            for _ in 0..20 {
                let addr = addr.clone();
                let response = tokio::task::spawn_blocking(move || {
                    crate::http::get(&addr, "/cgi-bin/hostname")
                })
                .await
                .expect("the request's thread")
                .unwrap_or_else(|e| {
                    panic!(
                        "NodePort {} on {} ({}): {e}\n{}",
                        self.node_port,
                        member.name,
                        member.ip,
                        (member.logs)()
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
                "the NodePort on {} ({} mode) balances over web pods: {seen:?}\n{}",
                member.name,
                member.mode,
                (member.logs)()
            );
        }
    }

    /// Readiness: `web-<i>`'s probe starts failing, its endpoint turns unready and no client on
    /// any node is sent there any more.
    pub async fn unready_endpoint_leaves(&mut self, i: usize) {
        let (code, out) = self
            .exec(i, &format!("web-{i}"), "web", &["rm", "/www/healthz"])
            .await;
        assert_eq!(code, 0, "{out}");
        self.out.insert(i);
        self.endpoint_leaves(i).await;
    }

    /// Node `i` has gone away (its services stopped and its Node deleted, by the caller): its
    /// pods are collected and every Service keeps only what is left.
    pub async fn node_gone(&mut self, i: usize) {
        self.gone.insert(i);
        self.out.insert(i);
        self.endpoint_leaves(i).await;
    }

    async fn endpoint_leaves(&self, i: usize) {
        eventually(
            &format!("web-{i} to leave the Service's ready endpoints"),
            Duration::from_secs(120),
            || {
                let slices = self.slices.clone();
                let left = self.web_ips[i].clone();
                async move {
                    (!ready_endpoints(&slices, "web").await.contains(&left)).then_some(())
                }
            },
        )
        .await;
        let left = self.answering();
        for client in self.present() {
            self.until_answers(
                client,
                (&self.vip, "/cgi-bin/hostname", 20),
                &format!("client-{client}: web-{i} gets no traffic once it left"),
                |seen| seen.keys().cloned().collect::<BTreeSet<_>>() == left,
            )
            .await;
        }
    }
}

/// `text` percent-encoded for a URL query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
