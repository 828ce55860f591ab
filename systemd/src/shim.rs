//! `tug shim` (flags, then `tug_runtime_shim::server::run`) and `tug shim-logger`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tug_runtime_shim::image::registry::RegistryConfig;
use tug_runtime_shim::server::{ShimConfig, run as serve};

/// Flags of `tug shim`.
#[derive(Debug, Args)]
pub struct ShimArgs {
    /// The CRI socket to serve (the kubelet's `--container-runtime-endpoint`).
    #[arg(long, default_value = "/run/tug/cri.sock")]
    listen: PathBuf,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// containerd namespace for images, containers and tasks.
    #[arg(long, default_value = "k8s.io")]
    namespace: String,
    /// CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// CNI plugin directory; repeat for several, searched in order.
    #[arg(long = "cni-bin-dir", default_values = ["/opt/cni/bin", "/usr/lib/cni"])]
    cni_bin_dirs: Vec<PathBuf>,
    /// Where pod network namespaces are pinned.
    #[arg(long, default_value = "/run/tug/netns")]
    netns_dir: PathBuf,
    /// Runtime state: sandbox resolv.conf/hostname files, exec FIFOs.
    #[arg(long, default_value = "/run/tug/shim")]
    state_dir: PathBuf,
    /// containerd's overlayfs snapshotter root (reported as the image filesystem).
    #[arg(
        long,
        default_value = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs"
    )]
    snapshotter_root: String,
    /// A registry (`host:port`) reached over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Where the streaming server for exec, attach and port-forward listens (the kubelet
    /// proxies to it); port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    streaming_address: std::net::SocketAddr,
    /// A mirror for a registry, `registry=URL`; repeatable, tried in order.
    #[arg(long = "registry-mirror")]
    registry_mirrors: Vec<String>,
}

/// Runs the CRI server until a signal.
pub async fn run(args: ShimArgs) -> anyhow::Result<()> {
    let mut registry = RegistryConfig {
        insecure: args.insecure_registries,
        ..Default::default()
    };
    for mirror in &args.registry_mirrors {
        let (host, url) = mirror
            .split_once('=')
            .with_context(|| format!("--registry-mirror {mirror:?}: expected registry=URL"))?;
        registry
            .mirrors
            .entry(host.to_owned())
            .or_default()
            .push(url.to_owned());
    }
    crate::notify::spawn(crate::notify::Probe::Unix(args.listen.clone()));
    let logger = std::env::current_exe().context("find the tug binary (the log writer)")?;
    serve(
        ShimConfig {
            listen: args.listen,
            containerd_socket: args.containerd,
            namespace: args.namespace,
            cni_conf_dir: args.cni_conf_dir,
            cni_bin_dirs: args.cni_bin_dirs,
            netns_dir: args.netns_dir,
            state_dir: args.state_dir,
            snapshotter_root: args.snapshotter_root,
            registry,
            logger,
            streaming_address: args.streaming_address,
        },
        crate::shutdown::signalled(),
    )
    .await?;
    Ok(())
}
