//! `tug join`: make this machine a node of an existing cluster.
//!
//! Preflight checks → token discovery (`cluster-info`, its JWS, the CA pin) → the bootstrap
//! kubeconfig → the kubelet's TLS bootstrap, done here so that a refused token or an unapproved
//! CSR fails the command rather than a service log → kubeadm's shared kubelet configuration →
//! tug's systemd units, enabled and started. Files go where kubeadm puts them:
//!
//! | file | what |
//! |---|---|
//! | `/etc/kubernetes/pki/ca.crt` | the cluster CA |
//! | `/etc/kubernetes/bootstrap-kubelet.conf` | the bootstrap token kubeconfig (0600) |
//! | `/etc/kubernetes/kubelet.conf` | the node's kubeconfig (0600) |
//! | `/var/lib/kubelet/pki/kubelet-client-current.pem` | the node's client certificate and key (0600) |
//! | `/var/lib/kubelet/config.yaml` | the KubeletConfiguration (`kube-system/kubelet-config`) |
//! | `/var/lib/kube-proxy/config.conf` | the KubeProxyConfiguration (`kube-system/kube-proxy`), when the cluster has one |
//! | `/etc/systemd/system/tug-*.service` | the units |

#![allow(
    clippy::print_stdout,
    reason = "tug join reports to the operator on stdout"
)]

pub mod discovery;
pub mod preflight;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::Args;

use discovery::{Discovered, Discovery, Pin, Token};

use crate::units::{self, UnitConfig};

/// Flags of `tug join` (kubeadm join's names).
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The API server, `host:port` (as `kubeadm token create --print-join-command` prints it).
    #[arg(required_unless_present = "discovery_file")]
    api_server_endpoint: Option<String>,
    /// The bootstrap token, `<id>.<secret>`.
    #[arg(long, env = "TUG_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// The cluster CA's public-key pin, `sha256:<hex>` (repeat or comma-separate for several).
    #[arg(long = "discovery-token-ca-cert-hash", value_delimiter = ',')]
    pins: Vec<String>,
    /// Trust the CA that cluster-info names without a pin (anyone on the path could be the
    /// cluster).
    #[arg(long = "discovery-token-unsafe-skip-ca-verification")]
    unsafe_skip_ca_verification: bool,
    /// A kubeconfig with the cluster's server and CA, instead of token discovery.
    #[arg(long)]
    discovery_file: Option<PathBuf>,
    /// How long to wait for the API server and cluster-info's signature.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    discovery_timeout: Duration,
    /// This node's name (default: the host name, lower case).
    #[arg(long)]
    node_name: Option<String>,
    /// The cluster's pod CIDR (for netd's masquerade rule and the proxy).
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::IpNet,
    /// This node's proxy mode (iptables, nftables or ipvs), over the mode in the cluster's
    /// kube-proxy configuration (kubeadm has one mode for every node; tug lets a node differ).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(tug_proxy::config::MODES))]
    proxy_mode: Option<String>,
    /// Checks to report but not fail on (names as printed, comma-separated, or `all`).
    #[arg(long, value_delimiter = ',')]
    ignore_preflight_errors: Vec<String>,
    /// Do everything but write, request or start anything: print what would be written.
    #[arg(long)]
    dry_run: bool,
    /// Install the units but do not start them.
    #[arg(long)]
    no_start: bool,
    /// Write below this directory instead of `/` (for images and tests).
    #[arg(long, default_value = "/", hide = true)]
    root: PathBuf,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?} (e.g. 30s, 5m)"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration {text:?} (e.g. 30s, 5m)")),
    }
}

/// The kubeadm paths, relative to the root.
pub const CA: &str = "etc/kubernetes/pki/ca.crt";
/// The bootstrap kubeconfig.
pub const BOOTSTRAP_KUBECONFIG: &str = "etc/kubernetes/bootstrap-kubelet.conf";
/// The node's kubeconfig.
pub const KUBECONFIG: &str = "etc/kubernetes/kubelet.conf";
/// The node's certificates.
pub const CERT_DIR: &str = "var/lib/kubelet/pki";
/// The KubeletConfiguration.
pub const KUBELET_CONFIG: &str = "var/lib/kubelet/config.yaml";
/// The KubeProxyConfiguration (where kubeadm's kube-proxy DaemonSet mounts it).
pub const PROXY_CONFIG: &str = "var/lib/kube-proxy/config.conf";
/// Where the binary is installed.
pub const BINARY: &str = "usr/local/bin/tug";

/// One file `tug join` writes.
#[derive(Debug)]
struct Planned {
    path: PathBuf,
    mode: u32,
    text: String,
    /// Printed as `<redacted>` by --dry-run.
    secret: bool,
}

/// Runs `tug join`.
pub async fn run(args: JoinArgs) -> anyhow::Result<()> {
    let token: Token = args.token.parse()?;
    let pins = args
        .pins
        .iter()
        .map(|p| p.parse::<Pin>())
        .collect::<Result<Vec<_>, _>>()?;
    let node_name = crate::kubeconfig::node_name(args.node_name.clone())?;
    let root = &args.root;

    println!("[preflight] checking this machine");
    let report = preflight::run(root);
    let failed = preflight::print_and_judge(&report, &args.ignore_preflight_errors);
    if !failed.is_empty() && !args.dry_run {
        anyhow::bail!(
            "preflight checks failed: {} (fix them, or pass --ignore-preflight-errors={} to go on anyway)",
            failed.join(", "),
            failed.join(",")
        );
    }

    let discovered = match &args.discovery_file {
        Some(path) => from_file(path)?,
        None => {
            let endpoint = args
                .api_server_endpoint
                .clone()
                .context("the API server endpoint is required for token discovery")?;
            println!("[discovery] reading cluster-info from {endpoint}");
            Discovery {
                endpoint,
                token: token.clone(),
                pins,
                unsafe_skip_ca_verification: args.unsafe_skip_ca_verification,
                timeout: args.discovery_timeout,
            }
            .run()
            .await?
        }
    };
    println!(
        "[discovery] cluster CA verified ({}); API server {}",
        discovered.pin, discovered.server
    );

    let bootstrap_kubeconfig = kubeconfig(
        &discovered,
        &format!("    token: {}\n", token.bearer()),
        "tls-bootstrap-token-user",
    );
    let bootstrap_client = crate::kubeconfig::client_from_yaml(&bootstrap_kubeconfig).await?;
    check_token(&bootstrap_client, &token).await?;
    let kubelet_config = match fetch_kubelet_config(&bootstrap_client).await {
        Some(config) => {
            println!(
                "[kubelet] using the cluster's KubeletConfiguration (kube-system/kubelet-config)"
            );
            let (config, changed) = cgroupfs_driver(&config);
            if changed {
                println!(
                    "[kubelet] the cluster's KubeletConfiguration asks for cgroupDriver: systemd; tug shim drives cgroups directly (cgroupfs), so this node's copy says cgroupDriver: cgroupfs"
                );
            }
            config
        }
        None => {
            println!(
                "[kubelet] the cluster shares no KubeletConfiguration; writing tug's defaults"
            );
            DEFAULT_KUBELET_CONFIG.to_owned()
        }
    };

    let proxy_config = fetch_proxy_config(&bootstrap_client).await?;
    if let (Some((_, mode)), None) = (&proxy_config, &args.proxy_mode)
        && !tug_proxy::config::MODES.contains(&mode.as_str())
    {
        anyhow::bail!(
            "the cluster's kube-proxy configuration (kube-system/kube-proxy) asks for mode {mode:?}, which tug proxy does not have; pass --proxy-mode iptables, nftables or ipvs"
        );
    }
    let mut proxy_flags = Vec::new();
    if proxy_config.is_some() {
        proxy_flags.push(format!("--config /{PROXY_CONFIG}"));
    }
    if let Some(mode) = &args.proxy_mode {
        proxy_flags.push(format!("--proxy-mode {mode}"));
    }
    match (&proxy_config, &args.proxy_mode) {
        (Some((_, mode)), None) => println!(
            "[proxy] using the cluster's KubeProxyConfiguration (kube-system/kube-proxy): mode {mode}"
        ),
        (Some((_, cluster)), Some(mode)) => println!(
            "[proxy] using the cluster's KubeProxyConfiguration (kube-system/kube-proxy) with this node's mode {mode} (the cluster's is {cluster})"
        ),
        (None, mode) => println!(
            "[proxy] the cluster shares no kube-proxy configuration; mode {}",
            mode.as_deref().unwrap_or("iptables")
        ),
    }

    let binary = Path::new("/").join(BINARY);
    let containerd_unit = ![
        "lib/systemd/system/containerd.service",
        "etc/systemd/system/containerd.service",
    ]
    .iter()
    .any(|p| root.join(p).exists());
    let unit_config = UnitConfig {
        binary: binary.display().to_string(),
        node_name: node_name.clone(),
        cluster_cidr: args.cluster_cidr.to_string(),
        containerd: containerd_unit,
        proxy_flags,
    };
    let mut plan = vec![
        Planned {
            path: root.join(CA),
            mode: 0o644,
            text: discovered.ca_pem.clone(),
            secret: false,
        },
        Planned {
            path: root.join(BOOTSTRAP_KUBECONFIG),
            mode: 0o600,
            text: bootstrap_kubeconfig,
            secret: true,
        },
        Planned {
            path: root.join(KUBELET_CONFIG),
            mode: 0o644,
            text: kubelet_config,
            secret: false,
        },
    ];
    if let Some((text, _)) = proxy_config {
        plan.push(Planned {
            path: root.join(PROXY_CONFIG),
            mode: 0o644,
            text,
            secret: false,
        });
    }
    for (name, text) in units::render(&unit_config) {
        plan.push(Planned {
            path: root.join(units::UNIT_DIR).join(name),
            mode: 0o644,
            text,
            secret: false,
        });
    }

    if args.dry_run {
        println!("[dry-run] would write:");
        for file in &plan {
            println!("--- {} (mode {:o})", file.path.display(), file.mode);
            if file.secret {
                println!("<redacted: holds the bootstrap token>");
            } else {
                println!("{}", file.text.trim_end());
            }
        }
        println!(
            "--- {} (mode 600): the node's kubeconfig, after the TLS bootstrap",
            root.join(KUBECONFIG).display()
        );
        println!(
            "--- {}/kubelet-client-current.pem (mode 600): the node's certificate and key",
            root.join(CERT_DIR).display()
        );
        println!("--- {} (this binary)", root.join(BINARY).display());
        println!("[dry-run] would then start: {}", units::SERVICES.join(", "));
        if !failed.is_empty() {
            anyhow::bail!("preflight checks failed: {}", failed.join(", "));
        }
        return Ok(());
    }

    for file in &plan {
        write_file(&file.path, file.mode, &file.text)?;
    }
    for dir in ["etc/cni/net.d", "var/lib/tug", "etc/kubernetes/manifests"] {
        std::fs::create_dir_all(root.join(dir))
            .with_context(|| format!("create {}", root.join(dir).display()))?;
    }
    install_binary(root)?;

    println!(
        "[kubelet-start] TLS bootstrap: requesting a client certificate for system:node:{node_name}"
    );
    tug_kubelet::bootstrap::ensure(
        &root.join(KUBECONFIG),
        &root.join(BOOTSTRAP_KUBECONFIG),
        &root.join(CERT_DIR),
        &node_name,
    )
    .await
    .context("the kubelet TLS bootstrap failed")?;
    println!(
        "[kubelet-start] certificate issued; wrote {}",
        root.join(KUBECONFIG).display()
    );

    let proxy_ready = match proxy_access(&root.join(KUBECONFIG)).await {
        Ok(missing) if missing.is_empty() => true,
        Ok(missing) => {
            println!(
                "[proxy] WARNING: this node's identity may not {}, so tug-proxy programs no rules and does not report ready until it may. On the control plane, run once for all nodes:\n    {}",
                missing.join(", "),
                tug_proxy::run::BIND_NODES_AS_PROXIERS
            );
            false
        }
        Err(error) => {
            println!("[proxy] could not check the proxy's permissions: {error:#}");
            true
        }
    };

    if args.no_start {
        println!(
            "[units] installed; not started (--no-start): systemctl enable --now {}",
            units::SERVICES.join(" ")
        );
    } else if Path::new("/run/systemd/system").exists() && root == Path::new("/") {
        // A proxy that cannot be ready yet must not hold the command until systemd gives up.
        start_units(proxy_ready)?;
    } else {
        println!("[units] installed; systemd is not running here, so nothing was started");
    }
    println!(
        "\nThis node has joined the cluster as {node_name}. On the control plane, `kubectl get node {node_name}` shows it once the kubelet registers."
    );
    Ok(())
}

/// `config` with `cgroupDriver: systemd` replaced by `cgroupfs` (tug shim creates pod and
/// container cgroups itself; it does not yet ask systemd for slices), and whether it changed.
pub fn cgroupfs_driver(config: &str) -> (String, bool) {
    let mut changed = false;
    let lines: Vec<String> = config
        .lines()
        .map(|line| {
            let value = line.strip_prefix("cgroupDriver:").map(str::trim);
            if matches!(value, Some("systemd" | "\"systemd\"")) {
                changed = true;
                "cgroupDriver: cgroupfs".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect();
    let mut text = lines.join("\n");
    if config.ends_with('\n') {
        text.push('\n');
    }
    (text, changed)
}

/// The kubeconfig of `discovered` with `user` (YAML lines under `user:`).
fn kubeconfig(discovered: &Discovered, user: &str, user_name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kubernetes\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: {user_name}\n  user:\n{user}contexts:\n- name: {user_name}@kubernetes\n  context:\n    cluster: kubernetes\n    user: {user_name}\ncurrent-context: {user_name}@kubernetes\n",
        discovered.server,
        STANDARD.encode(&discovered.ca_pem),
    )
}

/// `--discovery-file`: a kubeconfig naming the server and carrying its CA.
fn from_file(path: &Path) -> anyhow::Result<Discovered> {
    let parsed = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("--discovery-file {}", path.display()))?;
    let (server, ca_pem) = tug_kubelet::bootstrap::server_and_ca(&parsed)
        .map_err(|e| anyhow::anyhow!("--discovery-file {}: {e}", path.display()))?;
    let pin = Pin::of_certificate(ca_pem.as_bytes()).map_err(anyhow::Error::msg)?;
    Ok(Discovered {
        server,
        ca_pem,
        pin,
    })
}

/// The API must accept the token for what the TLS bootstrap does (create and read CSRs): a
/// refusal here gets its own message instead of a failed CSR.
async fn check_token(client: &kube::Client, token: &Token) -> anyhow::Result<()> {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    let csrs: kube::Api<CertificateSigningRequest> = kube::Api::all(client.clone());
    match csrs
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 401 => anyhow::bail!(
            "the API server refused bootstrap token {}.<secret> (401 Unauthorized): the token is unknown or has expired, or is not meant for authentication (usage-bootstrap-authentication); make a new one with `kubeadm token create --print-join-command`",
            token.id
        ),
        Err(kube::Error::Api(status)) if status.code == 403 => anyhow::bail!(
            "bootstrap token {}.<secret> may not request node certificates (403 Forbidden: {}): the token's groups need the ClusterRole system:node-bootstrapper, as kubeadm binds it for system:bootstrappers:kubeadm:default-node-token",
            token.id,
            status.message
        ),
        Err(error) => Err(error).context("checking the bootstrap token with the API server"),
    }
}

/// kubeadm's shared KubeletConfiguration, when the cluster has one and lets bootstrappers read it.
async fn fetch_kubelet_config(client: &kube::Client) -> Option<String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let maps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), "kube-system");
    match maps.get("kubelet-config").await {
        Ok(map) => map.data?.remove("kubelet"),
        Err(error) => {
            tracing::debug!(%error, "no kube-system/kubelet-config");
            None
        }
    }
}

/// kubeadm's KubeProxyConfiguration (`config.conf` of `kube-system/kube-proxy`, which kubeadm
/// lets bootstrap tokens read) and the mode it names, when the cluster has one. A configuration
/// that tug proxy cannot read fails the join here rather than the proxy later.
async fn fetch_proxy_config(client: &kube::Client) -> anyhow::Result<Option<(String, String)>> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let maps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), "kube-system");
    let text = match maps.get("kube-proxy").await {
        Ok(map) => map.data.and_then(|mut d| d.remove("config.conf")),
        Err(error) => {
            tracing::debug!(%error, "no kube-system/kube-proxy");
            None
        }
    };
    let Some(text) = text else {
        return Ok(None);
    };
    let parsed = tug_proxy::config::KubeProxyConfiguration::parse(&text).with_context(|| {
        "the cluster's kube-proxy configuration (config.conf of ConfigMap kube-system/kube-proxy) is not a KubeProxyConfiguration tug proxy can read; fix the ConfigMap"
    })?;
    let mode = if parsed.mode.is_empty() {
        "iptables".to_owned()
    } else {
        parsed.mode.clone()
    };
    Ok(Some((text, mode)))
}

/// What the kubelet runs with when the cluster shares no configuration: kubeadm's security
/// defaults (webhook authentication and authorization, no anonymous access, no read-only port).
const DEFAULT_KUBELET_CONFIG: &str = "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: /etc/kubernetes/pki/ca.crt
authorization:
  mode: Webhook
clusterDomain: cluster.local
readOnlyPort: 0
rotateCertificates: true
staticPodPath: /etc/kubernetes/manifests
";

/// Writes `text` to `path` with `mode`, atomically, creating its directory.
fn write_file(path: &Path, mode: u32, text: &str) -> anyhow::Result<()> {
    let parent = path.parent().context("a file path has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    Ok(tug_kubelet::bootstrap::write_atomic(
        path,
        text.as_bytes(),
        mode,
    )?)
}

/// Copies the running binary to `target` (unless it is that file already) and links the CNI
/// plugin name to it.
fn install_binary(root: &Path) -> anyhow::Result<()> {
    let target = root.join(BINARY);
    let target = target.as_path();
    let me = std::env::current_exe().context("find the running tug binary")?;
    let same = std::fs::canonicalize(&me).ok() == std::fs::canonicalize(target).ok();
    if !same {
        let parent = target.parent().context("a binary path has a parent")?;
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        let tmp = target.with_extension("tug-tmp");
        std::fs::copy(&me, &tmp)
            .with_context(|| format!("copy {} to {}", me.display(), tmp.display()))?;
        std::fs::rename(&tmp, target).with_context(|| format!("install {}", target.display()))?;
    }
    // The CRI runtime execs CNI plugins by name from /opt/cni/bin.
    let cni = root.join("opt/cni/bin/tug-cni");
    std::fs::create_dir_all(cni.parent().context("a parent")?)?;
    let _ = std::fs::remove_file(&cni);
    std::os::unix::fs::symlink(Path::new("/").join(BINARY), &cni)
        .with_context(|| format!("link {}", cni.display()))?;
    Ok(())
}

/// What the node's identity may not do of what its proxy needs (list and watch Services and
/// EndpointSlices in every namespace), asked with SelfSubjectAccessReviews.
async fn proxy_access(kubeconfig: &Path) -> anyhow::Result<Vec<String>> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let client = crate::kubeconfig::client(kubeconfig).await?;
    let reviews: kube::Api<SelfSubjectAccessReview> = kube::Api::all(client);
    let mut missing = Vec::new();
    for (group, resource) in [("", "services"), ("discovery.k8s.io", "endpointslices")] {
        for verb in ["list", "watch"] {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        verb: Some(verb.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = reviews
                .create(&Default::default(), &review)
                .await
                .with_context(|| format!("ask whether this node may {verb} {resource}"))?;
            if !answer.status.is_some_and(|s| s.allowed) {
                missing.push(format!("{verb} {resource}"));
            }
        }
    }
    Ok(missing)
}

/// `systemctl daemon-reload` then `enable --now` each unit; with `wait`, until each reports
/// ready.
fn start_units(wait: bool) -> anyhow::Result<()> {
    let systemctl = |args: &[&str]| -> anyhow::Result<()> {
        let status = std::process::Command::new("systemctl")
            .args(args)
            .status()
            .with_context(|| format!("run systemctl {}", args.join(" ")))?;
        anyhow::ensure!(
            status.success(),
            "systemctl {} failed ({status})",
            args.join(" ")
        );
        Ok(())
    };
    systemctl(&["daemon-reload"])?;
    let mut args = vec!["enable", "--now", "containerd.service"];
    if !wait {
        args.insert(2, "--no-block");
    }
    let names: Vec<String> = units::SERVICES
        .iter()
        .map(|s| format!("{s}.service"))
        .collect();
    args.extend(names.iter().map(String::as_str));
    systemctl(&args)?;
    if wait {
        println!("[units] started and ready: {}", units::SERVICES.join(", "));
    } else {
        println!(
            "[units] starting: {} (`tug status` shows how far they are)",
            units::SERVICES.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_systemd_cgroup_driver_becomes_cgroupfs_and_nothing_else_changes() {
        let (text, changed) =
            cgroupfs_driver("kind: KubeletConfiguration\ncgroupDriver: systemd\nmaxPods: 50\n");
        assert!(changed);
        assert_eq!(
            text,
            "kind: KubeletConfiguration\ncgroupDriver: cgroupfs\nmaxPods: 50\n"
        );
        let (text, changed) = cgroupfs_driver("cgroupDriver: cgroupfs\n");
        assert!(!changed);
        assert_eq!(text, "cgroupDriver: cgroupfs\n");
    }

    #[test]
    fn durations_take_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("5 minutes").is_err());
    }
}
