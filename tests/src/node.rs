//! A whole tug node in a network namespace of its own: `tug shim`, `tug kubelet`, `tug netd`
//! and `tug proxy`, each the real binary, joined to the cluster the tests use through a
//! [`Relay`](crate::lan::Relay) on the segment it is plugged into. The kubelet bootstraps its
//! own identity with a bootstrap token; netd and the proxy use the node kubeconfig it writes,
//! as on a joined machine. Everything is killed on drop and the Node deleted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::cluster::cluster;
use crate::cni::tug_binary;
use crate::kubelet::{Options, TugKubelet};
use crate::lan::{Lan, Relay};
use crate::netns::Netns;
use crate::shim::{ShimOptions, TugShim};
use crate::substrate::Substrate;

/// The cluster's pod CIDR, which the test API server hands node pod CIDRs out of.
pub fn cluster_cidr() -> String {
    std::env::var("TUG_TEST_CLUSTER_CIDR").unwrap_or_else(|_| "10.244.0.0/16".into())
}

/// A running node.
#[derive(Debug)]
pub struct TugNode {
    /// The node's address on its segment (its InternalIP).
    pub ip: String,
    /// Its network namespace.
    pub ns: Netns,
    /// Its kubelet (the Node's name is `kubelet.name`).
    pub kubelet: TugKubelet,
    /// Its CRI runtime.
    pub shim: TugShim,
    netd: Option<Child>,
    proxy: Option<Child>,
    proxy_mode: String,
    /// netd's `--resync-seconds`, when not its default.
    netd_resync: Option<u64>,
    /// The test registry at the address it has on the host, inside the node.
    _registry: Relay,
    dir: tempfile::TempDir,
}

fn in_netns(ns: &Netns) -> Command {
    crate::netns::command_in(Some(&ns.path()), &tug_binary())
}

fn kill9(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .expect("open a log file")
}

impl TugNode {
    /// Plugs a new node into `lan` at `ip` (a /24 on it), with the API server reached at
    /// `api_server` and the proxy in `proxy_mode`, and waits for the Node to be Ready. Its
    /// timers are the tests' quicker ones unless `installed_timers`.
    pub async fn start(
        lan: &Lan,
        ip: &str,
        api_server: &str,
        proxy_mode: &str,
        installed_timers: bool,
    ) -> TugNode {
        let ns = Netns::new("node");
        lan.attach(&ns, "eth0", &format!("{ip}/24"));
        ns.ip(&["link", "set", "lo", "up"]);
        ns.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
            .expect("enable forwarding in the node");
        // Images are pulled from the node, where the host's loopback registry is relayed in.
        let registry = Substrate::from_env().registry;
        let registry_relay = Relay::start_in(
            &ns,
            registry.parse().expect("the registry is an ip:port"),
            &registry,
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let conf_dir = dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir).expect("create the CNI configuration directory");
        let shim = TugShim::start_with(
            "node",
            "",
            ShimOptions {
                netns: Some(ns.path()),
                cni_conf_dir: Some(conf_dir.clone()),
            },
        )
        .await;
        let kubelet = TugKubelet::start_with(
            "node",
            &shim.socket,
            ip,
            Options {
                netns: Some(ns.path()),
                api_server: Some(api_server.to_owned()),
                ready_later: true,
                installed_timers,
                ..Default::default()
            },
        )
        .await;
        let mut node = TugNode {
            ip: ip.to_owned(),
            ns,
            kubelet,
            shim,
            netd: None,
            proxy: None,
            proxy_mode: proxy_mode.to_owned(),
            netd_resync: (!installed_timers).then_some(1),
            _registry: registry_relay,
            dir,
        };
        node.start_netd();
        node.start_proxy();
        node.kubelet.wait_ready().await;
        node
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.kubelet.name
    }

    fn start_netd(&mut self) {
        let child = in_netns(&self.ns)
            .args(["netd", "--kubeconfig"])
            .arg(&self.kubelet.kubeconfig)
            .args(["--node-name", &self.kubelet.name])
            .args(
                self.netd_resync
                    .map(|s| ["--resync-seconds".to_owned(), s.to_string()])
                    .iter()
                    .flatten(),
            )
            .args(["--cluster-cidr", &cluster_cidr()])
            .arg("--cni-conf-dir")
            .arg(self.dir.path().join("net.d"))
            .arg("--ipam-dir")
            .arg(self.dir.path().join("ipam"))
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), "netd.log"))
            .spawn()
            .expect("start tug netd");
        self.netd = Some(child);
    }

    fn start_proxy(&mut self) {
        let child = in_netns(&self.ns)
            .args(["proxy", "--kubeconfig"])
            .arg(&self.kubelet.kubeconfig)
            .args(["--hostname-override", &self.kubelet.name])
            .args(["--proxy-mode", &self.proxy_mode])
            .args(["--cluster-cidr", &cluster_cidr()])
            .stdout(Stdio::null())
            .stderr(log_file(self.dir.path(), "proxy.log"))
            .spawn()
            .expect("start tug proxy");
        self.proxy = Some(child);
    }

    /// Each of its services' process ids, by name: kubelet, shim, proxy, netd.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        [
            ("kubelet", self.kubelet.pid()),
            ("shim", self.shim.pid()),
            ("proxy", self.proxy.as_ref().map(Child::id)),
            ("netd", self.netd.as_ref().map(Child::id)),
        ]
        .into_iter()
        .filter_map(|(name, pid)| pid.map(|pid| (name, pid)))
        .collect()
    }

    /// SIGKILLs netd, as a crash.
    pub fn kill9_netd(&mut self) {
        kill9(&mut self.netd);
    }

    /// Starts netd again on the same state.
    pub fn restart_netd(&mut self) {
        self.kill9_netd();
        self.start_netd();
    }

    /// SIGKILLs the proxy, as a crash.
    pub fn kill9_proxy(&mut self) {
        kill9(&mut self.proxy);
    }

    /// Starts the proxy again.
    pub fn restart_proxy(&mut self) {
        self.kill9_proxy();
        self.start_proxy();
    }

    /// What netd and the proxy logged, and the node's NAT rules, for failure messages.
    pub fn logs(&self) -> String {
        self.log_reader()()
    }

    /// [`TugNode::logs`] as a closure that outlives the borrow (and reads nothing once the
    /// node is gone).
    pub fn log_reader(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let (name, dir, ns) = (
            self.kubelet.name.clone(),
            self.dir.path().to_owned(),
            self.ns.path(),
        );
        move || {
            let rules = |program: &str, args: &[&str]| {
                crate::netns::command_in(Some(&ns), Path::new(program))
                    .args(args)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            let nat = format!(
                "--- {name} iptables-save -t nat:\n{}\n--- nft list tables:\n{}",
                rules("iptables-save", &["-t", "nat"]),
                rules("nft", &["list", "tables"])
            );
            let logs = ["netd.log", "proxy.log"]
                .iter()
                .map(|file| {
                    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
                    format!("--- {name} {file}:\n{}", last_lines(&text, 15))
                })
                .collect::<Vec<_>>()
                .join("\n");
            format!("{logs}\n{nat}")
        }
    }

    /// The node as the end-to-end scenario sees it.
    pub fn member(&self) -> crate::e2e::Member {
        crate::e2e::Member {
            name: self.kubelet.name.clone(),
            ip: self.ip.clone(),
            mode: self.proxy_mode.clone(),
            kubelet: format!("{}:{}", self.ip, self.kubelet.api_port),
            logs: Box::new(self.log_reader()),
        }
    }

    /// Stops the node's services as a machine going away would (its pods' containers stay
    /// behind in the runtime until the node is dropped).
    pub fn stop(&mut self) {
        self.kill9_proxy();
        self.kill9_netd();
        self.kubelet.kill9();
    }

    /// The kubelet's log directory of pods, for failure messages.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for TugNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of `text`, for failure messages.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Where test nodes live: a segment with the host on it, a relay there to the cluster's API
/// server, and the node identities bound as proxiers while it lasts.
#[derive(Debug)]
pub struct Segment {
    lan: Lan,
    relay: Relay,
    host: String,
    _proxiers: NodesAsProxiers,
}

impl Segment {
    /// A new segment `label` with the host at `host` (a /24 on it).
    pub async fn new(label: &str, host: &str) -> Segment {
        let proxiers = NodesAsProxiers::bind().await;
        let lan = Lan::new(label);
        lan.attach_host(&format!("{host}/24"));
        let server = cluster()
            .server_url()
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        let relay = Relay::start(format!("{host}:0").parse().expect("an IP"), &server);
        Segment {
            lan,
            relay,
            host: host.to_owned(),
            _proxiers: proxiers,
        }
    }

    /// The host's address on the segment.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Where the relay to the cluster's API server listens on the segment.
    pub fn api(&self) -> std::net::SocketAddr {
        self.relay.addr()
    }

    /// The relay to the cluster's API server, to cut it off from the segment's nodes.
    pub fn api_relay(&self) -> &Relay {
        &self.relay
    }

    /// A tap port on the segment, for a qemu guest.
    pub fn tap(&self) -> crate::lan::LanPort {
        self.lan.tap()
    }

    /// Starts a node at `ip` on the segment with its proxy in `proxy_mode`.
    pub async fn node(&self, ip: &str, proxy_mode: &str) -> TugNode {
        let api = format!("https://{}", self.relay.addr());
        TugNode::start(&self.lan, ip, &api, proxy_mode, false).await
    }

    /// [`Segment::node`] with the timers of an installation (the kubelet's `syncFrequency`,
    /// netd's resync), for measuring a node as it runs.
    pub async fn node_as_installed(&self, ip: &str, proxy_mode: &str) -> TugNode {
        let api = format!("https://{}", self.relay.addr());
        TugNode::start(&self.lan, ip, &api, proxy_mode, true).await
    }
}

/// Binds the node identities to `system:node-proxier` (what `tug join` asks an operator to do
/// once per cluster) and, if this created the binding, removes it on drop.
#[derive(Debug)]
pub struct NodesAsProxiers {
    created: bool,
}

impl NodesAsProxiers {
    /// Creates the binding unless it exists.
    pub async fn bind() -> NodesAsProxiers {
        let bindings: kube::Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
            kube::Api::all(cluster().admin().await);
        let binding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "tug-node-proxier"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node-proxier"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}]
        }))
        .expect("binding JSON");
        let created = bindings.create(&Default::default(), &binding).await.is_ok();
        NodesAsProxiers { created }
    }
}

impl Drop for NodesAsProxiers {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        crate::cluster::cleanup_blocking(|| async {
            let bindings: kube::Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
                kube::Api::all(cluster().admin().await);
            let _ = bindings
                .delete("tug-node-proxier", &Default::default())
                .await;
        });
    }
}
