//! `tug shim`'s server: the CRI RuntimeService and ImageService on a Unix socket, over one
//! containerd connection, with the exit watcher running beside them.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;

use crate::cri::images::Images;
use crate::cri::runtime::{Runtime, RuntimeConfig};
use crate::cri::streaming::Streaming;
use crate::image::pull::Containerd;
use crate::image::registry::{Registry, RegistryConfig};
use crate::network::Cni;

/// Everything `tug shim` is configured with.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// The CRI socket to serve.
    pub listen: PathBuf,
    /// containerd's socket.
    pub containerd_socket: PathBuf,
    /// The containerd namespace (`k8s.io`, shared with containerd's own CRI images).
    pub namespace: String,
    /// CNI configuration directory.
    pub cni_conf_dir: PathBuf,
    /// CNI plugin directories, searched in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Where sandbox network namespaces are pinned.
    pub netns_dir: PathBuf,
    /// Where sandbox files and exec FIFOs live.
    pub state_dir: PathBuf,
    /// containerd's overlayfs snapshotter root (reported by ImageFsInfo).
    pub snapshotter_root: String,
    /// Registry access (plain-HTTP registries, mirrors).
    pub registry: RegistryConfig,
    /// The binary containerd's shim runs to write container logs (`tug` itself).
    pub logger: PathBuf,
    /// Where the streaming server (exec, attach, port-forward) listens; port 0 picks one. The
    /// kubelet proxies clients to it, so loopback is enough.
    pub streaming_address: std::net::SocketAddr,
}

/// Why the server could not run. Not retryable without a change (socket in use, containerd down).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// containerd could not be reached.
    #[error("connect to containerd at {path}: {source}")]
    Containerd {
        /// Its socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The socket could not be set up.
    #[error("{what} {path}: {source}")]
    Socket {
        /// The operation.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serve CRI on {path}: {source}")]
    Serve {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Serves the CRI until `shutdown` completes.
pub async fn run(config: ShimConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let channel = containerd_client::connect(&config.containerd_socket)
        .await
        .map_err(|source| ServeError::Containerd {
            path: config.containerd_socket.clone(),
            source,
        })?;
    let containerd = Containerd::new(channel, config.namespace.clone());
    let images = Images::new(
        containerd.clone(),
        Registry::new(config.registry.clone()),
        config.snapshotter_root.clone(),
    );
    let streams = tokio::net::TcpListener::bind(config.streaming_address)
        .await
        .map_err(|source| ServeError::Socket {
            what: "listen for streaming sessions on",
            path: PathBuf::from(config.streaming_address.to_string()),
            source,
        })?;
    let streaming_address = streams.local_addr().map_err(|source| ServeError::Socket {
        what: "address of",
        path: PathBuf::from(config.streaming_address.to_string()),
        source,
    })?;
    let runtime = Runtime::new(RuntimeConfig {
        containerd,
        images: images.clone(),
        cni: Cni {
            conf_dir: config.cni_conf_dir.clone(),
            bin_dirs: config.cni_bin_dirs.clone(),
        },
        netns_dir: config.netns_dir.clone(),
        state_dir: config.state_dir.clone(),
        logger: config.logger.clone(),
        streaming: std::sync::Arc::new(Streaming::new(streaming_address)),
    });
    let watcher = runtime.watch_exits();
    let streamer = runtime.serve_streams(streams);

    let socket = &config.listen;
    let io = |what: &'static str| {
        let path = socket.clone();
        move |source| ServeError::Socket { what, path, source }
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove the stale socket")(e)),
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(io("listen on"))?;
    // The CRI is root's alone: whoever reaches it can run anything on the node.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restrict permissions of"))?;
    tracing::info!(socket = %socket.display(), streaming = %streaming_address, containerd = %config.containerd_socket.display(), namespace = %config.namespace, "serving CRI");
    let served = tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::new(runtime))
        .add_service(ImageServiceServer::new(images))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    watcher.abort();
    streamer.abort();
    let _ = std::fs::remove_file(socket);
    served.map_err(|source| ServeError::Serve {
        path: socket.clone(),
        source,
    })
}
