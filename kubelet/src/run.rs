//! The whole kubelet: the node agent (registration, Lease, node status) and the pod manager
//! against the API, or the pod manager alone in standalone mode, plus the local `/healthz` and,
//! when configured, the read-only port.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::node::{self, NodeIdentity};
use crate::pods::{self, PodManagerConfig, translate::NodeContext};
use crate::register::{self, NodeAgentConfig};
use crate::runtime::Cri;

/// Everything the kubelet runs with.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// How the node presents itself.
    pub identity: NodeIdentity,
    /// `/var/lib/kubelet`.
    pub root_dir: PathBuf,
    /// The CRI endpoint.
    pub cri_endpoint: String,
    /// Node facts for pods (DNS, log dir, cgroup driver, seccomp).
    pub node: NodeContext,
    /// Lease/status period (10 s).
    pub heartbeat: Duration,
    /// Runtime relist period without an event stream (1 s).
    pub relist: Duration,
    /// Where `/healthz` answers (127.0.0.1:10248), if anywhere.
    pub healthz: Option<SocketAddr>,
    /// The read-only port (`/healthz`, `/pods`; unauthenticated, so off unless configured).
    pub read_only: Option<SocketAddr>,
    /// Static pod manifests.
    pub static_pod_path: Option<PathBuf>,
    /// The periodic pod sync (`syncFrequency`).
    pub sync_frequency: Duration,
    /// The kubelet API on its secure port (off when `None`).
    pub api: Option<crate::api::ApiConfig>,
    /// Node-pressure eviction.
    pub eviction: crate::eviction::EvictionConfig,
    /// The client certificate to renew before it expires (`rotateCertificates`).
    pub client_rotation: Option<crate::rotation::Managed>,
    /// Closes the API client's connections (when a heartbeat fails).
    pub close_connections: Option<register::CloseConnections>,
}

type Routes = Arc<dyn Fn(&str) -> Option<(&'static str, String)> + Send + Sync>;

/// A minimal HTTP/1 GET server: `routes` maps a path to a content type and body.
async fn serve(listener: tokio::net::TcpListener, routes: Routes) -> std::io::Result<()> {
    loop {
        let (mut socket, _) = listener.accept().await?;
        let routes = routes.clone();
        tokio::spawn(async move {
            let Some(head) = read_head(&mut socket).await else {
                return;
            };
            let request = String::from_utf8_lossy(&head);
            let mut words = request.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or(path);
            let (status, kind, body) = match (method, routes(path)) {
                ("GET", Some((kind, body))) => ("200 OK", kind, body),
                ("GET", None) => (
                    "404 Not Found",
                    "text/plain",
                    "404 page not found\n".to_owned(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET\n".to_owned(),
                ),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(reply.as_bytes()).await;
        });
    }
}

/// Reads a request's head (up to the blank line, at most 8 KiB, 10 s); `None` when the client
/// sent no complete head.
async fn read_head(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
        true
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
        Ok(true) => Some(head),
        _ => None,
    }
}

async fn listen(address: SocketAddr, what: &str) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{what} on {address}: {e}")))
}

/// The pods this kubelet runs, with their current status, as a PodList (`/pods`).
pub fn pod_list(shared: &pods::worker::Shared) -> String {
    let mut items = shared.pods_now();
    items.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        .to_string()
}

/// Runs the kubelet until `shutdown`; the pods keep running after it returns.
pub async fn run(
    config: KubeletConfig,
    client: Option<kube::Client>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    std::fs::create_dir_all(config.root_dir.join("pods"))?;
    let cri = Cri::new(&config.cri_endpoint);
    let host = node::read_host(&config.root_dir);
    let mut servers = Vec::new();
    if let Some(address) = config.healthz {
        let listener = listen(address, "/healthz").await?;
        tracing::info!(%address, "serving /healthz");
        let routes: Routes =
            Arc::new(|path| (path == "/healthz").then(|| ("text/plain", "ok".to_owned())));
        servers.push(tokio::spawn(serve(listener, routes)));
    }
    let manager = PodManagerConfig {
        node_name: config.identity.name.clone(),
        host_ips: config
            .identity
            .node_ips
            .iter()
            .map(|ip| ip.to_string())
            .collect(),
        node: NodeContext {
            memory_capacity: host.memory_bytes as i64,
            ..config.node.clone()
        },
        root_dir: config.root_dir.clone(),
        allocatable: (host.cpus as i64 * 1000, host.memory_bytes as i64),
        relist: config.relist,
        static_pod_path: config.static_pod_path.clone(),
        sync_frequency: config.sync_frequency,
    };
    let shared = pods::shared(&manager, client.clone(), cri.clone());
    if let Some(address) = config.read_only {
        let listener = listen(address, "the read-only port").await?;
        tracing::warn!(%address, "serving the unauthenticated read-only port (/healthz, /pods, /spec)");
        let shared = shared.clone();
        let routes: Routes = Arc::new(move |path| match path {
            "/healthz" => Some(("text/plain", "ok".to_owned())),
            "/pods" | "/pods/" => Some(("application/json", pod_list(&shared))),
            "/spec" | "/spec/" => Some((
                "application/json",
                crate::stats::machine_info(&shared).to_string(),
            )),
            _ => None,
        });
        servers.push(tokio::spawn(serve(listener, routes)));
    }
    if let Some(api) = &config.api {
        let serving = match &api.serving {
            crate::api::Serving::Files { cert, key } => {
                Arc::new(crate::serving::ServingCert::from_files(cert, key)?)
            }
            crate::api::Serving::Bootstrap(bootstrap) => {
                let serving = Arc::new(crate::serving::ServingCert::empty());
                let Some(client) = client.clone() else {
                    return Err(std::io::Error::other(
                        "serverTLSBootstrap needs an API server to issue the certificate",
                    ));
                };
                servers.push(tokio::spawn({
                    let (bootstrap, serving, metrics) =
                        (bootstrap.clone(), serving.clone(), cri.metrics().clone());
                    async move {
                        crate::rotation::rotate(client, bootstrap, Some(serving), metrics).await;
                        Ok(())
                    }
                }));
                serving
            }
        };
        let tls = crate::api::tls(api, serving)?;
        tracing::info!(address = %api.address, authorization = ?api.authorization, anonymous = api.anonymous, "serving the kubelet API");
        let api = crate::api::serve(
            api.clone(),
            tls,
            client.clone(),
            config.identity.name.clone(),
            shared.clone(),
        )
        .await?;
        servers.push(tokio::spawn(async move {
            let _ = api.await;
            Ok(())
        }));
    }
    if let (Some(managed), Some(client)) = (&config.client_rotation, &client) {
        servers.push(tokio::spawn({
            let (managed, client, metrics) =
                (managed.clone(), client.clone(), cri.metrics().clone());
            async move {
                crate::rotation::rotate(client, managed, None, metrics).await;
                Ok(())
            }
        }));
    }
    servers.push(tokio::spawn({
        let (shared, eviction) = (shared.clone(), config.eviction.clone());
        async move {
            crate::eviction::run(shared, eviction).await;
            Ok(())
        }
    }));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let agent = client.clone().map(|client| {
        tokio::spawn(register::run(
            NodeAgentConfig {
                identity: config.identity.clone(),
                root_dir: config.root_dir.clone(),
                heartbeat: config.heartbeat,
                pressures: shared.pressures.clone(),
                close_connections: config.close_connections.clone(),
            },
            client,
            cri.clone(),
            wait(stopped.clone()),
        ))
    });
    pods::run(manager, shared, wait(stopped)).await;
    if let Some(agent) = agent {
        let _ = agent.await;
    }
    for server in servers {
        server.abort();
    }
    Ok(())
}
