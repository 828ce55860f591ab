//! The whole kubelet: the node agent (registration, Lease, node status) and the pod manager
//! against the API, or the pod manager alone in standalone mode, plus the local `/healthz`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
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
}

async fn serve_healthz(address: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving /healthz");
    loop {
        let (mut socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buffer = [0u8; 1024];
            let n = socket.read(&mut buffer).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buffer[..n]);
            let reply = if request.starts_with("GET /healthz ") {
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n"
            };
            let _ = socket.write_all(reply.as_bytes()).await;
        });
    }
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
    let healthz = match config.healthz {
        Some(address) => {
            // Bind now so a taken port is an error at start, not a log line later.
            let probe = std::net::TcpListener::bind(address).map_err(|e| {
                std::io::Error::new(e.kind(), format!("/healthz on {address}: {e}"))
            })?;
            drop(probe);
            Some(tokio::spawn(serve_healthz(address)))
        }
        None => None,
    };
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
            },
            client,
            cri.clone(),
            wait(stopped.clone()),
        ))
    });
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
    };
    pods::run(manager, client, cri, wait(stopped)).await;
    if let Some(agent) = agent {
        let _ = agent.await;
    }
    if let Some(healthz) = healthz {
        healthz.abort();
    }
    Ok(())
}
