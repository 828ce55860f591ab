//! `tug kubelet` as an operator runs it: the real binary with a node identity from the real TLS
//! bootstrap, a KubeletConfiguration file, and a CRI endpoint (tug shim or containerd's own
//! CRI). Killable with SIGKILL and restartable on the same state; killed on drop (its pods keep
//! running until the test's runtime goes away, as on a real node).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::cluster::{client_from_kubeconfig, cluster, unique_name};
use crate::cni::tug_binary;
use crate::eventually::eventually;

/// Makes cert-dir files (name, content) for a node name.
pub type PkiFiles = fn(&str) -> Vec<(String, Vec<u8>)>;

/// How to run it beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// No kubeconfig: standalone, static pods only.
    pub standalone: bool,
    /// `--pod-manifest-path`.
    pub manifests: Option<PathBuf>,
    /// `--read-only-port`.
    pub read_only_port: Option<u16>,
    /// More KubeletConfiguration lines (YAML, top level).
    pub config: String,
    /// Files to put in the cert dir (`<root-dir>/pki`) before the kubelet starts, made for
    /// the node's name.
    pub pki: Option<PkiFiles>,
    /// Start with a client certificate asked for with this lifetime (`expirationSeconds`, at
    /// least 600) through the bootstrap token, already in the cert dir and the kubeconfig, as
    /// a kubelet that bootstrapped earlier finds them.
    pub client_cert_seconds: Option<u32>,
    /// Run the kubelet with libfaketime's offset (e.g. `+9m`): its wall clock ahead of the
    /// cluster's, as if that much time had passed (monotonic time is left alone).
    pub faketime: Option<&'static str>,
    /// Run it in this network namespace, as on a node of its own.
    pub netns: Option<PathBuf>,
    /// Reach the API server at this URL (a relay into the node's namespace) instead, with TLS
    /// still checked against the name `kubernetes`.
    pub api_server: Option<String>,
    /// Return once it has its identity and has registered its Node, without waiting for
    /// Ready (which needs the node's network agent); call [`TugKubelet::wait_ready`] then.
    pub ready_later: bool,
    /// Put the root dir on a tmpfs of this size (`mount -o size=`), a disk of its own that a
    /// test can fill.
    pub root_tmpfs: Option<&'static str>,
    /// Keep the installed defaults' timers (`syncFrequency` 1m) rather than the tests' quicker
    /// ones, for a footprint measured as a node runs.
    pub installed_timers: bool,
}

/// A running `tug kubelet`.
#[derive(Debug)]
pub struct TugKubelet {
    child: Option<Child>,
    args: Vec<String>,
    /// The Node's name.
    pub name: String,
    /// The node's IP (status.hostIP of its pods).
    pub node_ip: String,
    /// Its root dir.
    pub root_dir: PathBuf,
    /// Its pod log dir.
    pub logs_dir: PathBuf,
    /// The kubelet API's port (on 127.0.0.1).
    pub api_port: u16,
    /// The node's kubeconfig, which the kubelet writes after its TLS bootstrap (and the
    /// node's other services use).
    pub kubeconfig: PathBuf,
    options: Options,
    _dirs: Vec<tempfile::TempDir>,
}

impl TugKubelet {
    /// Starts `tug kubelet` against the CRI at `endpoint` and waits for its Node to be Ready.
    pub async fn start(prefix: &str, endpoint: &Path, node_ip: &str) -> TugKubelet {
        TugKubelet::start_with(prefix, endpoint, node_ip, Options::default()).await
    }

    /// Starts it with `options`; a standalone kubelet is ready when its read-only port answers.
    pub async fn start_with(
        prefix: &str,
        endpoint: &Path,
        node_ip: &str,
        options: Options,
    ) -> TugKubelet {
        let name = unique_name(prefix);
        // The kubelet bootstraps its own identity from a bootstrap token (TLS bootstrap).
        let token = if options.standalone {
            None
        } else {
            Some(cluster().bootstrap_token().await)
        };
        let bootstrap = token
            .as_ref()
            .map(|t| cluster().token_kubeconfig(Some(&t.token())))
            .map(|k| match &options.api_server {
                Some(server) => crate::lan::redirect_kubeconfig(&k, server, "kubernetes"),
                None => k,
            })
            .unwrap_or_default();
        let dir = tempfile::tempdir().expect("temp dir");
        let root_dir = dir.path().join("root");
        if let Some(size) = options.root_tmpfs {
            std::fs::create_dir_all(&root_dir).expect("create the root dir");
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&root_dir)
                .status()
                .expect("run mount");
            assert!(mounted.success(), "mount a tmpfs on the kubelet's root dir");
        }
        let logs_dir = dir.path().join("logs");
        let kubeconfig_path = dir.path().join("kubelet.conf");
        let bootstrap_path = dir.path().join("bootstrap-kubelet.conf");
        std::fs::write(&bootstrap_path, &bootstrap).expect("write the bootstrap kubeconfig");
        let config_path = dir.path().join("config.yaml");
        // The kubelet API on a port of its own (several test kubelets share the host),
        // trusting the cluster's CA for client certificates.
        let api_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let client_ca = dir.path().join("client-ca.crt");
        std::fs::write(&client_ca, cluster().ca_pem()).expect("write the client CA");
        // In a node's namespace the API listens on the node's address, as the API server
        // reaches a kubelet; on the host, on loopback only.
        let address = if options.netns.is_some() {
            node_ip
        } else {
            "127.0.0.1"
        };
        // Test kubelets share the build machine's disk, whose free space depends on what else
        // was built there: only memory pressure evicts, unless a test sets its own thresholds
        // (a partial evictionHard disables the signals it leaves out, as upstream).
        let eviction = if options.config.contains("evictionHard:") {
            ""
        } else {
            "evictionHard:\n  memory.available: 100Mi\n"
        };
        std::fs::write(
            &config_path,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nclusterDNS: [10.96.0.10]\nclusterDomain: cluster.local\npodLogsDir: {}\nhealthzPort: 0\nsyncFrequency: {sync}\ncontainerRuntimeEndpoint: unix://{}\naddress: {address}\nport: {api_port}\nauthentication:\n  x509:\n    clientCAFile: {}\n{eviction}{}",
                logs_dir.display(),
                endpoint.display(),
                client_ca.display(),
                options.config,
                sync = if options.installed_timers { "1m" } else { "2s" },
            ),
        )
        .expect("write the kubelet config");
        if let (Some(seconds), Some(_)) = (options.client_cert_seconds, &token) {
            let (cert, key, _) = tug_kubelet::bootstrap::request_client_certificate(
                client_from_kubeconfig(&bootstrap).await,
                &name,
                Some(Duration::from_secs(seconds.into())),
                Duration::from_secs(60),
            )
            .await
            .expect("a client certificate for the node");
            let current = tug_kubelet::bootstrap::store_pair(
                &root_dir.join("pki"),
                "kubelet-client",
                &cert,
                &key,
            )
            .expect("store the client certificate");
            std::fs::write(
                &kubeconfig_path,
                tug_kubelet::bootstrap::node_kubeconfig(
                    cluster().server_url(),
                    cluster().ca_pem(),
                    None,
                    &current,
                ),
            )
            .expect("write the node's kubeconfig");
        }
        for (name, bytes) in options.pki.map(|make| make(&name)).unwrap_or_default() {
            let file = root_dir.join("pki").join(name);
            std::fs::create_dir_all(file.parent().unwrap()).expect("create the cert dir");
            std::fs::write(&file, bytes).expect("write into the cert dir");
        }
        let path = |p: &Path| p.display().to_string();
        let mut args = vec![
            "kubelet".to_owned(),
            "--config".into(),
            path(&config_path),
            "--hostname-override".into(),
            name.clone(),
            "--node-ip".into(),
            node_ip.to_owned(),
            "--root-dir".into(),
            path(&root_dir),
            "--node-labels".into(),
            "tug.io/test=kubelet".into(),
        ];
        if !options.standalone {
            args.extend([
                "--kubeconfig".to_owned(),
                path(&kubeconfig_path),
                "--bootstrap-kubeconfig".to_owned(),
                path(&bootstrap_path),
            ]);
        }
        if let Some(dir) = &options.manifests {
            args.extend(["--pod-manifest-path".to_owned(), path(dir)]);
        }
        if let Some(port) = options.read_only_port {
            args.extend(["--read-only-port".to_owned(), port.to_string()]);
        }
        let mut kubelet = TugKubelet {
            child: None,
            args,
            name,
            node_ip: node_ip.to_owned(),
            root_dir,
            logs_dir,
            api_port,
            kubeconfig: kubeconfig_path.clone(),
            options,
            _dirs: vec![dir],
        };
        kubelet.spawn();
        if kubelet.options.ready_later {
            kubelet.wait_registered(&kubeconfig_path).await;
        } else {
            kubelet.wait_ready().await;
        }
        drop(token);
        if !kubelet.options.standalone {
            assert!(
                kubeconfig_path.exists(),
                "the kubelet wrote no kubeconfig after its TLS bootstrap"
            );
        }
        kubelet
    }

    fn spawn(&mut self) {
        let mut command = crate::netns::command_in(self.options.netns.as_deref(), &tug_binary());
        if let Some(offset) = self.options.faketime {
            // libfaketime preloaded into the kubelet itself (not the `faketime` wrapper, which
            // would stand between the test and the process it kills).
            command
                .env("LD_PRELOAD", libfaketime())
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = command
            .args(&self.args)
            .env("RUST_LOG", "info,tug_kubelet=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tug kubelet");
        self.child = Some(child);
    }

    /// Waits until it has bootstrapped its identity into `kubeconfig` and its Node exists.
    async fn wait_registered(&self, kubeconfig: &Path) {
        let nodes: Api<Node> = Api::all(cluster().admin().await);
        let name = self.name.clone();
        eventually(
            "the kubelet's identity and Node",
            Duration::from_secs(60),
            || {
                let nodes = nodes.clone();
                let name = name.clone();
                let exists = kubeconfig.exists();
                async move {
                    exists.then_some(())?;
                    nodes.get_opt(&name).await.ok()?.map(|_| ())
                }
            },
        )
        .await;
    }

    /// Waits until its Node is Ready (a standalone kubelet: until its read-only port answers).
    pub async fn wait_ready(&self) {
        if self.options.standalone {
            let port = self
                .options
                .read_only_port
                .expect("a standalone kubelet in tests needs its read-only port");
            eventually(
                "the standalone kubelet's read-only port",
                Duration::from_secs(30),
                || async move {
                    crate::http::get(&format!("127.0.0.1:{port}"), "/healthz")
                        .ok()
                        .filter(|r| r.starts_with("HTTP/1.1 200"))
                        .map(|_| ())
                },
            )
            .await;
            return;
        }
        let nodes: Api<Node> = Api::all(cluster().admin().await);
        let name = self.name.clone();
        eventually(
            "the kubelet's Node to be Ready",
            Duration::from_secs(60),
            || {
                let nodes = nodes.clone();
                let name = name.clone();
                async move {
                    let node = nodes.get_opt(&name).await.ok()??;
                    node.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await;
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same state.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready().await;
    }
}

/// The multi-threaded libfaketime (Debian's `faketime` package).
fn libfaketime() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketimeMT.so.1"))
        .find(|path| path.exists())
        .expect("libfaketime (apt package faketime) is installed")
}

impl Drop for TugKubelet {
    fn drop(&mut self) {
        self.kill9();
        if self.options.root_tmpfs.is_some() {
            let _ = std::process::Command::new("umount")
                .args(["--lazy"])
                .arg(&self.root_dir)
                .status();
        }
        if self.options.standalone {
            return;
        }
        let (name, kubeconfig) = (
            self.name.clone(),
            cluster().admin_kubeconfig_path().to_owned(),
        );
        crate::cluster::cleanup_blocking(move || async move {
            let text = std::fs::read_to_string(&kubeconfig).unwrap_or_default();
            let nodes: Api<Node> = Api::all(client_from_kubeconfig(&text).await);
            let _ = nodes.delete(&name, &Default::default()).await;
        });
    }
}
