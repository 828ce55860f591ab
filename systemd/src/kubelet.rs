//! `tug kubelet`: flags and the `KubeletConfiguration` file, then `tug_kubelet::run::run`.
//! Without `--kubeconfig` the kubelet runs standalone (no API server).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Taint;
use tug_kubelet::config::{KubeletConfiguration, parse_taint};
use tug_kubelet::node::NodeIdentity;
use tug_kubelet::pods::translate::{CgroupDriver, NodeContext, ResolvConf};
use tug_kubelet::run::{KubeletConfig, run as serve};

use crate::kubeconfig;

/// Flags of `tug kubelet` (upstream kubelet's names). A flag given explicitly wins over the
/// `--config` file.
#[derive(Debug, Args)]
pub struct KubeletArgs {
    /// A KubeletConfiguration file (YAML or JSON), as upstream's kubelet reads.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kubeconfig with the node's identity; without it the kubelet runs standalone.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig with a bootstrap token: when `--kubeconfig` has no usable client certificate,
    /// the kubelet requests one (TLS bootstrap) and writes `--kubeconfig`.
    #[arg(long, requires = "kubeconfig")]
    bootstrap_kubeconfig: Option<PathBuf>,
    /// Where the client certificate goes (default: <root-dir>/pki).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// This node's IP addresses (comma-separated; default: the source address of the default
    /// route).
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<IpAddr>,
    /// This node's name (default: the host name, lower case).
    #[arg(long)]
    hostname_override: Option<String>,
    /// The CRI endpoint (default unix:///run/tug/cri.sock).
    #[arg(long)]
    container_runtime_endpoint: Option<String>,
    /// DNS servers for ClusterFirst pods (comma-separated).
    #[arg(long, value_delimiter = ',')]
    cluster_dns: Vec<IpAddr>,
    /// The cluster's DNS domain (e.g. cluster.local).
    #[arg(long)]
    cluster_domain: Option<String>,
    /// Pods this node accepts (110).
    #[arg(long)]
    max_pods: Option<u32>,
    /// Taints to register the Node with: key[=value]:Effect, comma-separated.
    #[arg(long, value_delimiter = ',')]
    register_with_taints: Vec<String>,
    /// Labels to register the Node with: key=value, comma-separated.
    #[arg(long, value_delimiter = ',')]
    node_labels: Vec<String>,
    /// A directory of static pod manifests (watched).
    #[arg(long)]
    pod_manifest_path: Option<PathBuf>,
    /// The unauthenticated read-only port (/healthz, /pods); 0 (the default) keeps it off.
    #[arg(long)]
    read_only_port: Option<u16>,
    /// The kubelet's state directory.
    #[arg(long, default_value = "/var/lib/kubelet")]
    root_dir: PathBuf,
}

/// The address the host would send from to reach the world: the default route's source.
fn default_route_ip() -> anyhow::Result<IpAddr> {
    for target in ["192.0.2.1:9", "[2001:db8::1]:9"] {
        let bind = if target.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        if let Ok(socket) = std::net::UdpSocket::bind(bind)
            && socket.connect(target).is_ok()
            && let Ok(address) = socket.local_addr()
        {
            return Ok(address.ip());
        }
    }
    bail!("this host has no default route to take its node IP from; pass --node-ip")
}

fn config_from(args: &KubeletArgs) -> anyhow::Result<KubeletConfiguration> {
    let mut file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            let file = KubeletConfiguration::parse(&text)
                .with_context(|| format!("{}", path.display()))?;
            let unused = file.unused_fields();
            if !unused.is_empty() {
                tracing::warn!(file = %path.display(), fields = ?unused, "tug's kubelet does not act on these KubeletConfiguration fields");
            }
            file
        }
        None => KubeletConfiguration::default(),
    };
    if let Some(endpoint) = &args.container_runtime_endpoint {
        file.container_runtime_endpoint = endpoint.clone();
    }
    if !args.cluster_dns.is_empty() {
        file.cluster_dns = args.cluster_dns.iter().map(|ip| ip.to_string()).collect();
    }
    if let Some(domain) = &args.cluster_domain {
        file.cluster_domain = domain.clone();
    }
    if let Some(max) = args.max_pods {
        file.max_pods = max;
    }
    if !args.register_with_taints.is_empty() {
        file.register_with_taints = args
            .register_with_taints
            .iter()
            .map(|t| parse_taint(t).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()
            .context("--register-with-taints")?;
    }
    if let Some(path) = &args.pod_manifest_path {
        file.static_pod_path = path.display().to_string();
    }
    if let Some(port) = args.read_only_port {
        file.read_only_port = port;
    }
    Ok(file)
}

/// The kubelet API's settings: on `address:port` when there is an API server to authenticate
/// and authorize against (a standalone kubelet has none, so its API stays off), with the
/// configured serving certificate or a self-signed one in the cert dir.
fn api_config(
    args: &KubeletArgs,
    file: &KubeletConfiguration,
    name: &str,
    node_ips: &[IpAddr],
    with_api_server: bool,
) -> anyhow::Result<Option<tug_kubelet::api::ApiConfig>> {
    if file.port == 0 || !with_api_server {
        if file.port != 0 {
            tracing::info!("standalone: the kubelet API (port {}) stays off", file.port);
        }
        return Ok(None);
    }
    let port = u16::try_from(file.port).context("port: not a TCP port")?;
    let ip: IpAddr = file.address.parse().context("address: not an IP address")?;
    let cert_dir = args
        .cert_dir
        .clone()
        .unwrap_or_else(|| args.root_dir.join("pki"));
    let serving = if file.server_tls_bootstrap {
        tug_kubelet::api::Serving::Bootstrap(tug_kubelet::rotation::Managed {
            kind: tug_kubelet::rotation::Kind::Serving,
            cert_dir,
            node: name.to_owned(),
            dns: vec![name.to_owned()],
            ips: node_ips.to_vec(),
        })
    } else if file.tls_cert_file.is_empty() {
        let (cert, key) = (cert_dir.join("kubelet.crt"), cert_dir.join("kubelet.key"));
        let mut names = vec![name.to_owned()];
        names.extend(node_ips.iter().map(ToString::to_string));
        tug_kubelet::api::ensure_serving_cert(&cert, &key, &names)
            .context("the kubelet API's self-signed serving certificate")?;
        tug_kubelet::api::Serving::Files { cert, key }
    } else {
        tug_kubelet::api::Serving::Files {
            cert: PathBuf::from(&file.tls_cert_file),
            key: PathBuf::from(&file.tls_private_key_file),
        }
    };
    let authorization = match file.authorization.mode.as_str() {
        "Webhook" | "" => tug_kubelet::api::Authorization::Webhook,
        "AlwaysAllow" => {
            tracing::warn!(
                "authorization mode AlwaysAllow: every authenticated client may use the kubelet API"
            );
            tug_kubelet::api::Authorization::AlwaysAllow
        }
        other => bail!("authorization.mode {other:?}: expected Webhook or AlwaysAllow"),
    };
    let auth = &file.authentication;
    if auth.anonymous.enabled {
        tracing::warn!(
            "authentication.anonymous.enabled: unauthenticated requests reach authorization as system:anonymous"
        );
    }
    Ok(Some(tug_kubelet::api::ApiConfig {
        address: SocketAddr::new(ip, port),
        serving,
        client_ca_file: (!auth.x509.client_ca_file.is_empty())
            .then(|| PathBuf::from(&auth.x509.client_ca_file)),
        webhook_authentication: auth.webhook.enabled,
        anonymous: auth.anonymous.enabled,
        authorization,
    }))
}

/// The client certificate `rotateCertificates` renews: `<cert-dir>/kubelet-client-current.pem`,
/// which the kubeconfig at `path` must name (as the TLS bootstrap writes it), since tug's
/// services follow the file their kubeconfig names.
fn client_rotation(
    path: &std::path::Path,
    cert_dir: &std::path::Path,
    name: &str,
) -> Option<tug_kubelet::rotation::Managed> {
    let managed = tug_kubelet::rotation::Managed::client(cert_dir.to_owned(), name.to_owned());
    let named = kube::config::Kubeconfig::read_from(path)
        .ok()
        .and_then(|k| k.auth_infos.into_iter().next())
        .and_then(|a| a.auth_info)
        .and_then(|u| u.client_certificate);
    if named.as_deref().map(std::path::Path::new) == Some(managed.current().as_path()) {
        return Some(managed);
    }
    tracing::warn!(
        kubeconfig = %path.display(),
        expected = %managed.current().display(),
        "rotateCertificates: the kubeconfig's client certificate is not the cert dir's current one, so it is not rotated"
    );
    None
}

/// Runs the kubelet until a signal.
pub async fn run(args: KubeletArgs) -> anyhow::Result<()> {
    let file = config_from(&args)?;
    let name = kubeconfig::node_name(args.hostname_override.clone())?;
    let node_ips = if args.node_ip.is_empty() {
        vec![default_route_ip()?]
    } else {
        args.node_ip.clone()
    };
    let mut labels = BTreeMap::new();
    for label in &args.node_labels {
        let (key, value) = label
            .split_once('=')
            .with_context(|| format!("--node-labels: {label:?} is not key=value"))?;
        labels.insert(key.to_owned(), value.to_owned());
    }
    let resolv = if file.resolv_conf.is_empty() {
        ResolvConf::default()
    } else {
        ResolvConf::parse(&std::fs::read_to_string(&file.resolv_conf).unwrap_or_default())
    };
    let cert_dir = args
        .cert_dir
        .clone()
        .unwrap_or_else(|| args.root_dir.join("pki"));
    if let (Some(path), Some(bootstrap)) = (&args.kubeconfig, &args.bootstrap_kubeconfig) {
        tug_kubelet::bootstrap::ensure(path, bootstrap, &cert_dir, &name)
            .await
            .context("TLS bootstrap")?;
    }
    let client_rotation = match &args.kubeconfig {
        Some(path) if file.rotate_certificates => client_rotation(path, &cert_dir, &name),
        _ => None,
    };
    let (client, connections) = match &args.kubeconfig {
        Some(path) => {
            let (client, connections) = kubeconfig::closable_client(path).await?;
            (Some(client), Some(connections))
        }
        None => {
            tracing::warn!("no --kubeconfig: running standalone, without an API server");
            (None, None)
        }
    };
    let api = api_config(&args, &file, &name, &node_ips, client.is_some())?;
    let config = KubeletConfig {
        api,
        identity: NodeIdentity {
            name: name.clone(),
            hostname: name,
            node_ips,
            labels,
            taints: file
                .register_with_taints
                .iter()
                .map(|t| Taint {
                    key: t.key.clone(),
                    value: t.value.clone(),
                    effect: t.effect.clone(),
                    time_added: None,
                })
                .collect(),
            max_pods: file.max_pods,
            kubelet_port: file.port,
        },
        root_dir: args.root_dir.clone(),
        cri_endpoint: file.container_runtime_endpoint.clone(),
        node: NodeContext {
            cluster_dns: file.cluster_dns.clone(),
            cluster_domain: file.cluster_domain.clone(),
            host_resolv: resolv,
            pod_logs_dir: PathBuf::from(&file.pod_logs_dir),
            cgroup_driver: if file.cgroup_driver == "systemd" {
                CgroupDriver::Systemd
            } else {
                CgroupDriver::Cgroupfs
            },
            memory_capacity: 0,
            seccomp_default: file.seccomp_default,
            seccomp_root: args.root_dir.join("seccomp"),
        },
        heartbeat: Duration::from_secs(10),
        relist: Duration::from_secs(1),
        healthz: (file.healthz_port != 0)
            .then(|| {
                (file.healthz_bind_address.parse::<IpAddr>())
                    .map(|ip| SocketAddr::new(ip, file.healthz_port))
            })
            .transpose()
            .context("healthzBindAddress/healthzPort")?,
        read_only: (file.read_only_port != 0)
            .then(|| {
                file.address
                    .parse::<IpAddr>()
                    .map(|ip| SocketAddr::new(ip, file.read_only_port))
            })
            .transpose()
            .context("address/readOnlyPort")?,
        static_pod_path: (!file.static_pod_path.is_empty())
            .then(|| PathBuf::from(&file.static_pod_path)),
        sync_frequency: file.sync_period()?,
        eviction: file.eviction()?,
        client_rotation,
        close_connections: connections.map(|connections| {
            tug_kubelet::register::CloseConnections(std::sync::Arc::new(move || {
                connections.close_all()
            }))
        }),
    };
    crate::notify::spawn(match config.healthz {
        Some(address) => crate::notify::Probe::Http(address, "/healthz"),
        None => crate::notify::Probe::Now,
    });
    serve(config, client, crate::shutdown::signalled())
        .await
        .context("kubelet")?;
    Ok(())
}
