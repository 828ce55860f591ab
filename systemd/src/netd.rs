//! `tug netd`: flags, then `tug_cni::netd::run`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// Flags of `tug netd`.
#[derive(Debug, Args)]
pub struct NetdArgs {
    /// Kubeconfig with this node's identity.
    #[arg(long, default_value = "/etc/kubernetes/kubelet.conf")]
    kubeconfig: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The cluster's pod CIDR; traffic from it to elsewhere is masqueraded.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::Ipv4Net,
    /// Directory the CRI runtime reads CNI configurations from.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// File name of tug's conflist in it.
    #[arg(long, default_value = "10-tug.conflist")]
    cni_conf_name: String,
    /// tug-cni's IPAM state directory.
    #[arg(long, default_value = "/var/lib/tug/ipam")]
    ipam_dir: PathBuf,
    /// MTU of pod interfaces (leave room for VXLAN's 50 bytes).
    #[arg(long, default_value_t = 1450)]
    mtu: u32,
    /// VXLAN UDP port.
    #[arg(long, default_value_t = 4789)]
    vxlan_port: u16,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = 1)]
    vxlan_vni: u32,
    /// The nft program.
    #[arg(long, default_value = "nft")]
    nft: PathBuf,
    /// Standalone mode (tug's own, no API server): this node's pod CIDRs (comma-separated).
    /// Without it netd reads them from its Node's `spec.podCIDRs`.
    #[arg(long, value_delimiter = ',')]
    pod_cidr: Vec<ipnet::IpNet>,
    /// Seconds between full resyncs.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
}

/// Runs netd until a signal.
pub async fn run(args: NetdArgs) -> anyhow::Result<()> {
    let node_name = crate::kubeconfig::node_name(args.node_name)?;
    let config = tug_cni::netd::Config {
        node_name,
        dataplane: tug_cni::netd::apply::Dataplane {
            cni_conf_dir: args.cni_conf_dir,
            cni_conf_name: args.cni_conf_name,
            cluster_cidr: args.cluster_cidr,
            vxlan_port: args.vxlan_port,
            vxlan_vni: args.vxlan_vni,
            nft: args.nft,
        },
        mtu: args.mtu,
        ipam_dir: args.ipam_dir,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
    };
    tracing::info!(node = %config.node_name, "tug netd starting");
    crate::notify::spawn(crate::notify::Probe::File(
        config
            .dataplane
            .cni_conf_dir
            .join(&config.dataplane.cni_conf_name),
    ));
    if !args.pod_cidr.is_empty() {
        tracing::info!(pod_cidrs = ?args.pod_cidr, "standalone: no API server");
        return tug_cni::netd::run_standalone(config, args.pod_cidr, crate::shutdown::signalled())
            .await
            .context("tug netd");
    }
    let client = crate::kubeconfig::client(&args.kubeconfig).await?;
    tug_cni::netd::run(config, client, crate::shutdown::signalled())
        .await
        .context("tug netd")
}
