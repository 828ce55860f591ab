//! The cluster tier: a Kubernetes API to test against.
//!
//! By default, the in-process test API server (`tug-test-apiserver`), started once per test
//! binary. When `TUG_TEST_KUBECONFIG` names a kubeconfig with admin rights, every cluster test
//! runs against that real cluster instead, unchanged: tests create only objects a real cluster
//! accepts, in namespaces and with node names of their own, get node identities through the real
//! TLS bootstrap (bootstrap token → CSR → auto-approval), and clean up after themselves.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use tug_test_apiserver::{ServerConfig, TestApiServer};

/// The environment variable naming a real cluster's admin kubeconfig.
pub const KUBECONFIG_ENV: &str = "TUG_TEST_KUBECONFIG";

static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The API the cluster tests run against.
#[derive(Debug)]
pub struct TestCluster {
    admin_kubeconfig: String,
    admin_kubeconfig_path: PathBuf,
    server_url: String,
    ca_pem: String,
    real: bool,
    _server: Option<TestApiServer>,
}

/// The shared cluster of this test binary (started on first use).
pub fn cluster() -> &'static TestCluster {
    CLUSTER.get_or_init(|| {
        let (kubeconfig, server, real) = match std::env::var(KUBECONFIG_ENV) {
            Ok(path) if !path.is_empty() => {
                let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                    panic!("{KUBECONFIG_ENV}={path}: cannot read the kubeconfig: {e}")
                });
                (text, None, true)
            }
            _ => {
                // qemu guests reach the host's loopback at the slirp host address: the
                // server's certificate names it too, so a guest can verify it there.
                let server = TestApiServer::start(ServerConfig {
                    extra_ips: vec![crate::vm::HOST_ADDRESS.parse().expect("an IP")],
                    ..ServerConfig::default()
                })
                .expect("start the test API server");
                (server.admin_kubeconfig(), Some(server), false)
            }
        };
        let parsed = Kubeconfig::from_yaml(&kubeconfig).expect("the admin kubeconfig parses");
        let cluster = &parsed
            .clusters
            .first()
            .and_then(|c| c.cluster.clone())
            .expect("the kubeconfig names a cluster");
        let server_url = cluster
            .server
            .clone()
            .expect("the kubeconfig's cluster has a server");
        let ca_pem = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(data), _) => String::from_utf8(STANDARD.decode(data).expect("CA data is base64"))
                .expect("CA is PEM"),
            (None, Some(file)) => {
                std::fs::read_to_string(file).expect("read the kubeconfig's CA file")
            }
            (None, None) => panic!("the admin kubeconfig must carry the cluster CA"),
        };
        let path =
            std::env::temp_dir().join(format!("tug-test-admin-{}.kubeconfig", std::process::id()));
        std::fs::write(&path, &kubeconfig).expect("write the admin kubeconfig for kubectl");
        TestCluster {
            admin_kubeconfig: kubeconfig,
            admin_kubeconfig_path: path,
            server_url,
            ca_pem,
            real,
            _server: server,
        }
    })
}

/// A kube client from kubeconfig YAML.
pub async fn client_from_kubeconfig(yaml: &str) -> kube::Client {
    let kubeconfig = Kubeconfig::from_yaml(yaml).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    kube::Client::try_from(config).expect("build a kube client")
}

/// A unique name for this test process: `<prefix>-<pid>-<n>` (valid as a namespace or node name).
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl TestCluster {
    /// The CA's pin for `tug join --discovery-token-ca-cert-hash`, computed the way kubeadm's
    /// documentation tells operators to (openssl over the CA's public key).
    pub fn ca_pin(&self) -> String {
        let script = "openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum";
        let mut child = std::process::Command::new("sh")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run openssl");
        std::io::Write::write_all(
            &mut child.stdin.take().expect("openssl's stdin"),
            self.ca_pem.as_bytes(),
        )
        .expect("feed openssl");
        let output = child.wait_with_output().expect("openssl");
        let text = String::from_utf8(output.stdout).expect("openssl prints text");
        format!("sha256:{}", text.split_whitespace().next().expect("a hash"))
    }

    /// Whether this is a real cluster (`TUG_TEST_KUBECONFIG`) rather than the test server.
    pub fn is_real(&self) -> bool {
        self.real
    }

    /// The API server URL.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The cluster CA, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// An admin client for the calling test's runtime.
    pub async fn admin(&self) -> kube::Client {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// The admin kubeconfig on disk (for kubectl).
    pub fn admin_kubeconfig_path(&self) -> &std::path::Path {
        &self.admin_kubeconfig_path
    }

    /// A kubeconfig for this cluster that authenticates with a bearer token (or anonymously
    /// with `None`).
    pub fn token_kubeconfig(&self, token: Option<&str>) -> String {
        let user = match token {
            Some(token) => format!("users:\n- name: u\n  user:\n    token: {token}\n"),
            None => "users:\n- name: u\n  user: {}\n".to_owned(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n{user}contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
            self.server_url,
            STANDARD.encode(&self.ca_pem)
        )
    }

    /// A kube-proxy identity: a token for `kube-system/kube-proxy` (bound to
    /// `system:node-proxier` by kubeadm), as a kubeconfig.
    pub async fn proxy_kubeconfig(&self) -> String {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        let accounts: Api<ServiceAccount> = Api::namespaced(self.admin().await, "kube-system");
        let account: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "kube-proxy"}}))
                .expect("a ServiceAccount");
        let _ = accounts.create(&PostParams::default(), &account).await;
        let request: TokenRequest =
            serde_json::from_value(json!({"spec": {"expirationSeconds": 3600}}))
                .expect("a TokenRequest");
        let token = accounts
            .create_token_request("kube-proxy", &PostParams::default(), &request)
            .await
            .expect("a token for kube-system/kube-proxy")
            .status
            .expect("token status")
            .token;
        self.token_kubeconfig(Some(&token))
    }

    /// Creates a namespace of this test's own, deleted when the returned guard drops.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        let name = unique_name(prefix);
        let api: Api<Namespace> = Api::all(self.admin().await);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        TestNamespace {
            name,
            kubeconfig: self.admin_kubeconfig.clone(),
        }
    }

    /// Creates a bootstrap token (as `kubeadm token create` does) valid for 10 minutes, usable
    /// for authentication and signing, in the group kubeadm binds node bootstrap rights to.
    /// Returns `<id>.<secret>`; the Secret is deleted when the guard drops.
    pub async fn bootstrap_token(&self) -> BootstrapToken {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let pick = |n: usize| {
            (0..n)
                .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
                .collect::<String>()
        };
        let (id, secret) = (pick(6), pick(16));
        let expiration = (jiff::Timestamp::now() + jiff::SignedDuration::from_mins(10))
            .round(jiff::Unit::Second)
            .expect("round")
            .to_string();
        let object: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("bootstrap-token-{id}"), "namespace": "kube-system"},
            "type": "bootstrap.kubernetes.io/token",
            "stringData": {"token-id": id, "token-secret": secret, "expiration": expiration,
                "usage-bootstrap-authentication": "true", "usage-bootstrap-signing": "true",
                "auth-extra-groups": "system:bootstrappers:kubeadm:default-node-token"}
        }))
        .expect("secret JSON");
        let api: Api<Secret> = Api::namespaced(self.admin().await, "kube-system");
        api.create(&PostParams::default(), &object)
            .await
            .expect("create the bootstrap token secret");
        BootstrapToken {
            id,
            secret,
            kubeconfig: self.admin_kubeconfig.clone(),
        }
    }

    /// A kubeconfig for node `node`, obtained through the kubelet TLS bootstrap: a CSR for
    /// `system:node:<node>` made with a bootstrap token, approved by the cluster's approver,
    /// signed by its signer.
    pub async fn node_kubeconfig(&self, node: &str) -> String {
        let token = self.bootstrap_token().await;
        let bootstrap = client_from_kubeconfig(&self.token_kubeconfig(Some(&token.token()))).await;
        let (cert, key, name) = tug_kubelet::bootstrap::request_client_certificate(
            bootstrap,
            node,
            None,
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS bootstrap for node {node}: {e}"));
        let admin_csrs: Api<CertificateSigningRequest> = Api::all(self.admin().await);
        let _ = admin_csrs.delete(&name, &DeleteParams::default()).await;
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: {node}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: {node}\ncurrent-context: c\n",
            self.server_url,
            STANDARD.encode(&self.ca_pem),
            STANDARD.encode(cert),
            STANDARD.encode(key)
        )
    }

    /// Registers a Node object (as a kubelet would) with this node's own identity, and returns
    /// that identity's client; the Node is deleted when the guard drops.
    pub async fn node(&self, prefix: &str) -> TestNode {
        let name = unique_name(prefix);
        let kubeconfig = self.node_kubeconfig(&name).await;
        let client = client_from_kubeconfig(&kubeconfig).await;
        let nodes: Api<Node> = Api::all(client.clone());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("register node {name} as itself: {e}"));
        TestNode {
            name,
            client,
            kubeconfig,
            admin_kubeconfig: self.admin_kubeconfig.clone(),
        }
    }
}

/// Runs `cleanup` on a fresh runtime on its own thread, so guards can clean up from `Drop` on
/// any runtime.
pub fn cleanup_blocking<F, Fut>(cleanup: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cleanup runtime");
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), cleanup())
                .await
                .ok()
        });
    });
    let _ = thread.join();
}

/// A namespace deleted when dropped.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubeconfig: String,
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        cleanup_blocking(move || async move {
            let api: Api<Namespace> = Api::all(client_from_kubeconfig(&kubeconfig).await);
            let _ = api.delete(&name, &DeleteParams::default()).await;
        });
    }
}

/// A bootstrap token whose Secret is deleted when dropped.
#[derive(Debug)]
pub struct BootstrapToken {
    /// Token ID (`[a-z0-9]{6}`).
    pub id: String,
    /// Token secret (`[a-z0-9]{16}`).
    pub secret: String,
    kubeconfig: String,
}

impl BootstrapToken {
    /// `<id>.<secret>`.
    pub fn token(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

impl Drop for BootstrapToken {
    fn drop(&mut self) {
        let (id, kubeconfig) = (self.id.clone(), self.kubeconfig.clone());
        cleanup_blocking(move || async move {
            let api: Api<Secret> =
                Api::namespaced(client_from_kubeconfig(&kubeconfig).await, "kube-system");
            let _ = api
                .delete(&format!("bootstrap-token-{id}"), &DeleteParams::default())
                .await;
        });
    }
}

/// A registered Node with its own identity's client; the Node is deleted when dropped.
pub struct TestNode {
    /// Node name.
    pub name: String,
    /// A client authenticated as `system:node:<name>`.
    pub client: kube::Client,
    /// The node's kubeconfig (client certificate).
    pub kubeconfig: String,
    admin_kubeconfig: String,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNode")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let (name, kubeconfig) = (self.name.clone(), self.admin_kubeconfig.clone());
        cleanup_blocking(move || async move {
            let api: Api<Node> = Api::all(client_from_kubeconfig(&kubeconfig).await);
            let _ = api.delete(&name, &DeleteParams::default()).await;
        });
    }
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits (up to `timeout`) until `count` of the pods `pods` lists are Ready.
pub async fn pods_ready(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    count: usize,
    timeout: Duration,
) {
    crate::eventually::eventually(&format!("{count} pods Ready"), timeout, || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&Default::default()).await.ok()?;
            let ready = list.items.iter().filter(|p| pod_ready(p)).count();
            (ready == count).then_some(())
        }
    })
    .await;
}

/// The `code` and `reason` of a failed API call, for asserting on them.
pub fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A JSON value's string at `pointer`, or "".
pub fn text(value: &Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}
