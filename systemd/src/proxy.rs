//! `tug proxy`: flags and the `KubeProxyConfiguration` file, then `tug_proxy::run::run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tug_proxy::backend::RuleBackend;
use tug_proxy::config::KubeProxyConfiguration;
use tug_proxy::iptables::{Iptables, IptablesConfig};
use tug_proxy::nftables::{NftConfig, Nftables};
use tug_proxy::run::{ProxyConfig, Source, run as serve};
use tug_proxy::standalone::Standalone;

/// Flags of `tug proxy` (upstream kube-proxy's names). A flag given explicitly wins over the
/// `--config` file.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// A KubeProxyConfiguration file (YAML or JSON), as upstream kube-proxy reads.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kubeconfig with the proxy's identity.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long)]
    hostname_override: Option<String>,
    /// Proxy mode: iptables (default), nftables or ipvs.
    #[arg(long)]
    proxy_mode: Option<String>,
    /// The IPVS scheduler in ipvs mode (rr, wrr, lc, sh, ...; default rr).
    #[arg(long)]
    ipvs_scheduler: Option<String>,
    /// The cluster's pod CIDR: ClusterIP traffic from outside it is masqueraded.
    #[arg(long)]
    cluster_cidr: Option<String>,
    /// Masquerade all ClusterIP traffic.
    #[arg(long)]
    masquerade_all: bool,
    /// The iptables program (`iptables`, `iptables-nft` or `iptables-legacy`).
    #[arg(long, default_value = "iptables")]
    iptables_program: String,
    /// `/healthz` address.
    #[arg(long)]
    healthz_bind_address: Option<String>,
    /// `/metrics` address.
    #[arg(long)]
    metrics_bind_address: Option<String>,
    /// Accept NodePort traffic only on local addresses inside these CIDRs (comma-separated;
    /// default: every local address).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// Remove every rule tug programmed, then exit.
    #[arg(long)]
    cleanup: bool,
    /// Standalone mode (tug's own, no API server): the Service manifests in this directory,
    /// with endpoints from the pods of the kubelet at --standalone-kubelet.
    #[arg(long, value_name = "DIR")]
    standalone_services: Option<PathBuf>,
    /// Standalone mode: the local kubelet's read-only address (its `/pods` gives the endpoints).
    #[arg(long, default_value = "127.0.0.1:10255")]
    standalone_kubelet: SocketAddr,
    /// Standalone mode: where ClusterIPs are allocated for manifests that give none.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: ipnet::IpNet,
}

fn address(value: &str, what: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    // Upstream also accepts a bare IP with the default port, or "0" to disable.
    if value == "0" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("{what} {value:?} is not an ip:port address"))
}

/// Runs the proxy until a signal (or cleans up and returns).
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            KubeProxyConfiguration::parse(&text).with_context(|| format!("{}", path.display()))?
        }
        None => KubeProxyConfiguration::default(),
    };
    let cluster_cidr = args
        .cluster_cidr
        .clone()
        .unwrap_or(file.cluster_cidr.clone());
    let ipv4_cidr = cluster_cidr
        .split(',')
        .map(str::trim)
        .find(|c| c.contains('.'))
        .map(str::to_owned);
    let ipv6_cidr = cluster_cidr
        .split(',')
        .map(str::trim)
        .find(|c| c.contains(':'))
        .map(str::to_owned);
    let masquerade_all = args.masquerade_all || file.iptables.masquerade_all;
    let node_port_entries = if args.nodeport_addresses.is_empty() {
        file.node_port_addresses.clone()
    } else {
        args.nodeport_addresses.clone()
    };
    let node_port_cidrs = tug_proxy::addresses::parse(&node_port_entries)?;
    let (ipv4_cidr_for_nft, ipv6_cidr_for_nft) = (ipv4_cidr.clone(), ipv6_cidr.clone());
    let iptables = IptablesConfig {
        cluster_cidr: ipv4_cidr,
        masquerade_all,
        ipv6: false,
        node_port_cidrs: node_port_cidrs.clone(),
        node_port_ips: None,
    };
    // IPv6 rules when the node has ip6tables (Debian's iptables package ships both).
    let v6_program = tug_proxy::iptables::ipv6_program(&args.iptables_program);
    let has_ip6tables = std::process::Command::new(&v6_program)
        .args(["-w", "-t", "nat", "-S", "POSTROUTING"])
        .output()
        .is_ok_and(|o| o.status.success());
    let ip6tables = has_ip6tables.then_some(IptablesConfig {
        cluster_cidr: ipv6_cidr,
        masquerade_all,
        ipv6: true,
        node_port_cidrs: node_port_cidrs.clone(),
        node_port_ips: None,
    });
    if !has_ip6tables {
        tracing::warn!(program = %v6_program, "no working ip6tables: IPv6 Services are not programmed");
    }
    let nft = |cidr: Option<String>, ipv6: bool| {
        Box::new(Nftables::new(NftConfig {
            cluster_cidr: cidr,
            masquerade_all,
            ipv6,
            node_port_cidrs: node_port_cidrs.clone(),
            node_port_ips: None,
        })) as Box<dyn RuleBackend>
    };
    let ipvs_config = tug_proxy::ipvs::IpvsConfig {
        scheduler: args
            .ipvs_scheduler
            .clone()
            .or_else(|| (!file.ipvs.scheduler.is_empty()).then(|| file.ipvs.scheduler.clone()))
            .unwrap_or_else(|| "rr".into()),
        cluster_cidrs: ipv4_cidr_for_nft
            .iter()
            .chain(&ipv6_cidr_for_nft)
            .cloned()
            .collect(),
        masquerade_all,
        node_port_cidrs: node_port_cidrs.clone(),
        node_port_range: (30000, 32767),
    };
    let ipt = |program: &str, config: IptablesConfig| {
        Box::new(Iptables::new(program, config)) as Box<dyn RuleBackend>
    };
    if args.cleanup {
        // Upstream's --cleanup removes what every mode may have left.
        let mut all = vec![
            ipt(&args.iptables_program, iptables.clone()),
            nft(None, false),
            nft(None, true),
        ];
        // IPVS's virtual services and VIP device, where the kernel has IPVS.
        if std::path::Path::new("/proc/net/ip_vs").exists() {
            all.push(Box::new(tug_proxy::ipvs::IpvsBackend::new(
                ipvs_config.clone(),
            )));
        }
        if let Some(v6) = ip6tables.clone() {
            all.push(ipt(&v6_program, v6));
        }
        for mut backend in all {
            if let Err(error) = backend.cleanup() {
                tracing::warn!(%error, "cleanup of {backend:?} failed");
            }
        }
        tracing::info!("removed every rule tug programmed");
        return Ok(());
    }
    let mode = args.proxy_mode.clone().unwrap_or(file.mode.clone());
    let backends: Vec<Box<dyn RuleBackend>> = match mode.as_str() {
        "" | "iptables" => {
            let mut list = vec![ipt(&args.iptables_program, iptables)];
            if let Some(v6) = ip6tables {
                list.push(ipt(&v6_program, v6));
            }
            list
        }
        "nftables" => {
            let mut list = vec![nft(ipv4_cidr_for_nft.clone(), false)];
            // IPv6 where the kernel can take the table (its IPv6 nf_tables expressions may be
            // missing): programmed once empty to find out, as upstream probes before it runs
            // dual-stack.
            let mut v6 = nft(ipv6_cidr_for_nft.clone(), true);
            let empty = tug_proxy::model::Model::new(Default::default());
            match v6.sync(&empty, &Default::default(), true) {
                Ok(_) => list.push(v6),
                Err(error) => tracing::warn!(
                    %error,
                    "the kernel refuses an ip6 nftables table: IPv6 Services are not programmed"
                ),
            }
            list
        }
        "ipvs" => {
            vec![Box::new(tug_proxy::ipvs::IpvsBackend::new(ipvs_config)) as Box<dyn RuleBackend>]
        }
        other => bail!("unknown proxy mode {other:?}: expected iptables, nftables or ipvs"),
    };
    let kubeconfig = args
        .kubeconfig
        .clone()
        .or_else(|| {
            (!file.client_connection.kubeconfig.is_empty())
                .then(|| file.client_connection.kubeconfig.clone().into())
        })
        .unwrap_or_else(|| PathBuf::from("/etc/kubernetes/kubelet.conf"));
    let node_name =
        crate::kubeconfig::node_name(args.hostname_override.clone().or_else(|| {
            (!file.hostname_override.is_empty()).then(|| file.hostname_override.clone())
        }))?;
    let healthz = args
        .healthz_bind_address
        .clone()
        .or_else(|| {
            (!file.healthz_bind_address.is_empty()).then(|| file.healthz_bind_address.clone())
        })
        .unwrap_or_else(|| "0.0.0.0:10256".into());
    let metrics = args
        .metrics_bind_address
        .clone()
        .or_else(|| {
            (!file.metrics_bind_address.is_empty()).then(|| file.metrics_bind_address.clone())
        })
        .unwrap_or_else(|| "127.0.0.1:10249".into());
    let config = ProxyConfig {
        node_name,
        node_port_range: (30000, 32767),
        backends,
        min_sync_period: file.min_sync_period()?,
        sync_period: file.sync_period()?.max(Duration::from_secs(1)),
        full_sync_period: Duration::from_secs(3600),
        healthz_address: address(&healthz, "--healthz-bind-address")?,
        metrics_address: address(&metrics, "--metrics-bind-address")?,
    };
    let source = match &args.standalone_services {
        Some(dir) => {
            tracing::info!(services = %dir.display(), kubelet = %args.standalone_kubelet, "standalone: no API server");
            Source::Standalone(Standalone {
                manifests: dir.clone(),
                kubelet: args.standalone_kubelet,
                service_cidr: args.service_cluster_ip_range,
                node_port_range: config.node_port_range,
                poll: Duration::from_secs(1),
            })
        }
        None => Source::Cluster(crate::kubeconfig::client(&kubeconfig).await?),
    };
    crate::notify::spawn(match config.healthz_address {
        Some(address) => crate::notify::Probe::Http(address, "/healthz"),
        None => crate::notify::Probe::Now,
    });
    tracing::info!(node = %config.node_name, mode = %if mode.is_empty() { "iptables" } else { mode.as_str() }, "tug proxy starting");
    serve(config, source, crate::shutdown::signalled())
        .await
        .context("tug proxy")
}
