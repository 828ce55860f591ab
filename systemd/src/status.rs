//! `tug status`: one screen on the node. Each service with its systemd state (when systemd
//! runs) and what it answers itself (containerd's socket, the CRI's `Status`, the kubelet's and
//! the proxy's `/healthz`, netd's CNI config); the Node's Ready condition as the cluster sees
//! it; the pods the runtime runs; the proxy's rule counts and netd's routes.
//!
//! It exits 0 when every service answers and the Node is Ready (or the node is standalone),
//! and 1 otherwise, so scripts and monitoring can use it.

#![allow(
    clippy::print_stdout,
    reason = "tug status reports to the operator on stdout"
)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::notify::http_get;
use crate::units;

/// Flags of `tug status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's kubeconfig (without it, the node is shown as standalone).
    #[arg(long, default_value = "/etc/kubernetes/kubelet.conf")]
    kubeconfig: PathBuf,
    /// The CRI socket whose pods are listed.
    #[arg(long, default_value = "unix:///run/tug/cri.sock")]
    cri_socket: String,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// The kubelet's `/healthz`.
    #[arg(long, default_value = "127.0.0.1:10248")]
    kubelet_healthz: SocketAddr,
    /// The proxy's `/healthz`.
    #[arg(long, default_value = "127.0.0.1:10256")]
    proxy_healthz: SocketAddr,
    /// The proxy's `/metrics` and `/proxyMode`.
    #[arg(long, default_value = "127.0.0.1:10249")]
    proxy_metrics: SocketAddr,
    /// Where netd writes the CNI config.
    #[arg(long, default_value = "/etc/cni/net.d/10-tug.conflist")]
    cni_config: PathBuf,
}

/// One line of the services table.
struct Service {
    name: &'static str,
    unit: String,
    healthy: bool,
    detail: String,
}

/// Runs `tug status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut out = String::new();
    let mut healthy = true;

    let services = services(&args).await;
    healthy &= services.iter().all(|s| s.healthy);
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s.name.to_owned(),
                s.unit.clone(),
                if s.healthy { "ok" } else { "DOWN" }.to_owned(),
                s.detail.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&["SERVICE", "UNIT", "HEALTH", "DETAIL"], &rows));

    out.push('\n');
    match node(&args.kubeconfig).await {
        Ok(Some((ready, text))) => {
            healthy &= ready;
            out.push_str(&text);
        }
        Ok(None) => out.push_str("NODE  standalone (no node kubeconfig)\n"),
        Err(error) => {
            healthy = false;
            let _ = writeln!(out, "NODE  unknown: {error:#}");
        }
    }

    out.push('\n');
    match pods(&args.cri_socket).await {
        Ok(text) => out.push_str(&text),
        Err(error) => {
            let _ = writeln!(out, "PODS  unknown: {error:#}");
        }
    }

    out.push('\n');
    out.push_str(&rules(&args).await);
    print!("{out}");
    if healthy {
        Ok(())
    } else {
        anyhow::bail!("the node is not healthy (see above)")
    }
}

/// `systemctl show`'s state of `unit` ("active (running), 2 restarts"), or `-` without systemd.
fn unit_state(unit: &str) -> String {
    if !Path::new("/run/systemd/system").exists() {
        return "-".into();
    }
    let output = std::process::Command::new("systemctl")
        .args([
            "show",
            "--property=LoadState,ActiveState,SubState,NRestarts",
            unit,
        ])
        .output();
    let Ok(output) = output else {
        return "?".into();
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or("")
            .to_owned()
    };
    if field("LoadState") == "not-found" {
        return "not installed".into();
    }
    let mut state = format!("{} ({})", field("ActiveState"), field("SubState"));
    match field("NRestarts").as_str() {
        "" | "0" => {}
        "1" => state.push_str(", 1 restart"),
        n => {
            let _ = write!(state, ", {n} restarts");
        }
    }
    state
}

async fn services(args: &StatusArgs) -> Vec<Service> {
    let mut services = Vec::new();
    let containerd = tokio::net::UnixStream::connect(&args.containerd_socket).await;
    services.push(Service {
        name: "containerd",
        unit: unit_state("containerd.service"),
        healthy: containerd.is_ok(),
        detail: match containerd {
            Ok(_) => format!("{} accepts", args.containerd_socket.display()),
            Err(e) => format!("{}: {e}", args.containerd_socket.display()),
        },
    });

    let health = tug_kubelet::runtime::Cri::new(&args.cri_socket)
        .health()
        .await;
    let cri_ok = health.runtime_ready && health.network_ready;
    services.push(Service {
        name: units::SERVICES[0],
        unit: unit_state("tug-shim.service"),
        healthy: cri_ok,
        detail: if cri_ok {
            format!("CRI on {}: runtime and network ready", args.cri_socket)
        } else {
            format!(
                "CRI on {}: runtime ready {}, network ready {}{}",
                args.cri_socket,
                health.runtime_ready,
                health.network_ready,
                if health.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", health.message)
                }
            )
        },
    });

    for (name, address) in [
        (units::SERVICES[1], args.kubelet_healthz),
        (units::SERVICES[2], args.proxy_healthz),
    ] {
        services.push(healthz_service(name, address).await);
    }

    let conflist = std::fs::read_to_string(&args.cni_config);
    let pod_cidrs = conflist
        .as_ref()
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .map(|conf| conf["plugins"][0]["podCIDRs"].clone())
        .and_then(|cidrs| serde_json::from_value::<Vec<String>>(cidrs).ok())
        .unwrap_or_default();
    services.push(Service {
        name: units::SERVICES[3],
        unit: unit_state("tug-netd.service"),
        healthy: !pod_cidrs.is_empty(),
        detail: match conflist {
            Ok(_) if pod_cidrs.is_empty() => {
                format!("{} names no pod CIDR", args.cni_config.display())
            }
            Ok(_) => format!(
                "{}: pod CIDR {}",
                args.cni_config.display(),
                pod_cidrs.join(", ")
            ),
            Err(e) => format!("{}: {e}", args.cni_config.display()),
        },
    });
    services
}

/// A service whose health is its `/healthz` on `address`.
async fn healthz_service(name: &'static str, address: SocketAddr) -> Service {
    let answer = http_get(address, "/healthz").await;
    Service {
        name,
        unit: unit_state(&format!("{name}.service")),
        healthy: matches!(answer, Ok((200, _))),
        detail: describe_healthz(address, &answer),
    }
}

fn describe_healthz(address: SocketAddr, answer: &std::io::Result<(u16, String)>) -> String {
    match answer {
        Ok((200, _)) => format!("http://{address}/healthz: 200"),
        Ok((status, body)) => format!(
            "http://{address}/healthz: {status} {}",
            body.trim().chars().take(80).collect::<String>()
        ),
        Err(e) => format!("http://{address}/healthz: {e}"),
    }
}

/// The Node as the cluster sees it; `None` without a node kubeconfig.
async fn node(kubeconfig: &Path) -> anyhow::Result<Option<(bool, String)>> {
    use k8s_openapi::api::core::v1::Node;
    if !kubeconfig.exists() {
        return Ok(None);
    }
    let name = crate::reset::node_of(kubeconfig)?;
    let client = crate::kubeconfig::client(kubeconfig).await?;
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let node = tokio::time::timeout(std::time::Duration::from_secs(5), nodes.get(&name))
        .await
        .map_err(|_| anyhow::anyhow!("the API server did not answer within 5 s"))?
        .with_context(|| format!("get Node {name}"))?;
    let status = node.status.unwrap_or_default();
    let conditions = status.conditions.unwrap_or_default();
    let ready = conditions.iter().find(|c| c.type_ == "Ready");
    let is_ready = ready.is_some_and(|c| c.status == "True");
    let mut text = format!(
        "NODE  {name}  Ready={}",
        ready.map_or("Unknown", |c| c.status.as_str())
    );
    if let Some(ready) = ready {
        let _ = write!(
            text,
            " ({}: {})",
            ready.reason.as_deref().unwrap_or(""),
            ready.message.as_deref().unwrap_or("")
        );
    }
    text.push('\n');
    let pressures: Vec<String> = conditions
        .iter()
        .filter(|c| c.type_ != "Ready" && c.status != "False")
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect();
    let _ = writeln!(
        text,
        "      pressure: {}",
        if pressures.is_empty() {
            "none".to_owned()
        } else {
            pressures.join(", ")
        }
    );
    let addresses: Vec<String> = status
        .addresses
        .unwrap_or_default()
        .into_iter()
        .map(|a| format!("{}={}", a.type_, a.address))
        .collect();
    let _ = writeln!(
        text,
        "      addresses: {}  pod CIDR: {}  kubelet: {}",
        addresses.join(" "),
        node.spec
            .and_then(|s| s.pod_cidrs.or(s.pod_cidr.map(|c| vec![c])))
            .unwrap_or_default()
            .join(","),
        status
            .node_info
            .map(|i| i.kubelet_version)
            .unwrap_or_default()
    );
    Ok(Some((is_ready, text)))
}

/// The pods the runtime runs: their state, running containers, restarts and IP.
async fn pods(socket: &str) -> anyhow::Result<String> {
    use k8s_cri::v1::{ListContainersRequest, ListPodSandboxRequest, PodSandboxStatusRequest};
    let cri = tug_kubelet::runtime::Cri::new(socket);
    let mut runtime = cri.runtime().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut sandboxes = runtime
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .context("ListPodSandbox")?
        .into_inner()
        .items;
    let containers = runtime
        .list_containers(ListContainersRequest { filter: None })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers;
    sandboxes.sort_by_key(|s| {
        let m = s.metadata.clone().unwrap_or_default();
        (m.namespace, m.name, std::cmp::Reverse(s.created_at))
    });
    let mut rows = Vec::new();
    let mut running = 0;
    for sandbox in &sandboxes {
        let metadata = sandbox.metadata.clone().unwrap_or_default();
        let ready = sandbox.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32;
        running += usize::from(ready);
        let mine: Vec<_> = containers
            .iter()
            .filter(|c| c.pod_sandbox_id == sandbox.id)
            .collect();
        // The newest attempt of each container counts: its attempt number is its restarts.
        let mut newest: std::collections::BTreeMap<String, &k8s_cri::v1::Container> =
            Default::default();
        for c in &mine {
            let m = c.metadata.clone().unwrap_or_default();
            let keep = newest
                .get(&m.name)
                .is_none_or(|n| n.metadata.as_ref().is_some_and(|o| o.attempt < m.attempt));
            if keep {
                newest.insert(m.name, c);
            }
        }
        let up = newest
            .values()
            .filter(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
            .count();
        let restarts: u32 = newest
            .values()
            .map(|c| c.metadata.as_ref().map_or(0, |m| m.attempt))
            .sum();
        let ip = if ready {
            runtime
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox.id.clone(),
                    verbose: false,
                })
                .await
                .ok()
                .and_then(|s| s.into_inner().status?.network)
                .map(|n| n.ip)
                .unwrap_or_default()
        } else {
            String::new()
        };
        rows.push(vec![
            metadata.namespace,
            metadata.name,
            if ready { "Ready" } else { "NotReady" }.to_owned(),
            format!("{up}/{}", newest.len()),
            restarts.to_string(),
            if ip.is_empty() { "-".into() } else { ip },
        ]);
    }
    let mut text = format!(
        "PODS  {} sandboxes, {running} ready (from the CRI on {socket})\n",
        sandboxes.len()
    );
    if !rows.is_empty() {
        text.push_str(&table(
            &["NAMESPACE", "NAME", "SANDBOX", "RUNNING", "RESTARTS", "IP"],
            &rows,
        ));
    }
    Ok(text)
}

/// A value of a Prometheus text exposition without labels.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The proxy's rule counts (from its metrics) and netd's routes (from the kernel).
async fn rules(args: &StatusArgs) -> String {
    let mut text = String::new();
    let mode = http_get(args.proxy_metrics, "/proxyMode").await;
    let metrics = http_get(args.proxy_metrics, "/metrics").await;
    match (mode, metrics) {
        (Ok((200, mode)), Ok((200, metrics))) => {
            let value = |name| metric(&metrics, name).unwrap_or(0.0);
            let last = metric(&metrics, "tug_proxy_last_sync_timestamp_seconds").unwrap_or(0.0);
            let age = if last > 0.0 {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                format!("{}s ago", (now - last).max(0.0).round())
            } else {
                "never".to_owned()
            };
            let _ = writeln!(
                text,
                "RULES  proxy mode {}: {} service ports, {} service chains, {} skipped as invalid; last sync {age} ({:.1} ms), {} syncs, {} failed",
                mode.trim(),
                value("tug_proxy_service_ports"),
                value("tug_proxy_service_chains"),
                value("tug_proxy_skipped_service_ports"),
                value("tug_proxy_last_sync_duration_seconds") * 1000.0,
                value("tug_proxy_syncs_total"),
                value("tug_proxy_sync_errors_total"),
            );
        }
        (mode, metrics) => {
            let error = [mode.err(), metrics.err()]
                .into_iter()
                .flatten()
                .map(|e| e.to_string())
                .next()
                .unwrap_or_else(|| "unexpected answer".into());
            let _ = writeln!(
                text,
                "RULES  unknown: the proxy's metrics on {}: {error}",
                args.proxy_metrics
            );
        }
    }
    match routes().await {
        Ok((v4, v6)) => {
            let _ = writeln!(
                text,
                "ROUTES  {v4} IPv4 and {v6} IPv6 routes to other nodes' pod CIDRs (netd)"
            );
        }
        Err(error) => {
            let _ = writeln!(text, "ROUTES  unknown: {error:#}");
        }
    }
    text
}

async fn routes() -> anyhow::Result<(usize, usize)> {
    let (connection, handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
    let task = tokio::spawn(connection);
    let v4 = tug_cni::netd::apply::tug_routes(&handle, false).await;
    let v6 = tug_cni::netd::apply::tug_routes(&handle, true).await;
    task.abort();
    Ok((v4?.len(), v6?.len()))
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        text.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_metrics_are_read_by_name() {
        let text = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["b".into(), "y".into()],
            ],
        );
        assert_eq!(text, "A          LONGER\nwide cell  x\nb          y\n");
        let metrics = "# HELP tug_proxy_service_ports x\n# TYPE tug_proxy_service_ports gauge\ntug_proxy_service_ports 42\ntug_proxy_service_ports_other 7\n";
        assert_eq!(metric(metrics, "tug_proxy_service_ports"), Some(42.0));
        assert_eq!(metric(metrics, "tug_proxy_missing"), None);
    }
}
