//! `tug reset`: undo `tug join`. Stops and removes the units, removes the pods through the CRI,
//! every rule the proxy programmed (all modes), netd's routes, device and table, the CNI
//! state, kubelet mounts, and the files join wrote. Each step is best effort and reported:
//! a machine half set up is still cleaned as far as it can be.

#![allow(
    clippy::print_stdout,
    reason = "tug reset reports to the operator on stdout"
)]

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::join::{BOOTSTRAP_KUBECONFIG, CA, CERT_DIR, KUBECONFIG, KUBELET_CONFIG, PROXY_CONFIG};
use crate::units;

/// Flags of `tug reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Do not ask for confirmation.
    #[arg(short, long)]
    force: bool,
    /// Also delete this node's Node object from the cluster (with the node's own identity).
    #[arg(long)]
    delete_node: bool,
    /// The CRI socket whose pods are removed.
    #[arg(long, default_value = "unix:///run/tug/cri.sock")]
    cri_socket: String,
    /// Work below this directory instead of `/` (for images and tests).
    #[arg(long, default_value = "/", hide = true)]
    root: PathBuf,
}

/// Runs `tug reset`.
pub async fn run(args: ResetArgs) -> anyhow::Result<()> {
    let root = &args.root;
    if !args.force {
        println!(
            "tug reset stops tug's services, removes its pods, rules, routes and files. Go on? [y/N]"
        );
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("read the answer")?;
        anyhow::ensure!(answer.trim().eq_ignore_ascii_case("y"), "reset cancelled");
    }
    let mut problems = Vec::new();
    let mut step = |what: &str, outcome: anyhow::Result<String>| match outcome {
        Ok(done) => println!("[reset] {what}: {done}"),
        Err(error) => {
            println!("[reset] {what}: FAILED: {error:#}");
            problems.push(what.to_owned());
        }
    };

    if args.delete_node {
        step("delete the Node", delete_node(&root.join(KUBECONFIG)).await);
    }
    let live = root == Path::new("/");
    let systemd = live && Path::new("/run/systemd/system").exists();
    // The kubelet stops first, so that it starts no pod again; the pods go through the shim
    // while it still runs; then the other services stop.
    if systemd {
        step("stop the kubelet", stop_units(&["tug-kubelet"]));
    }
    if live {
        step("remove the pods", remove_pods(&args.cri_socket).await);
    }
    if systemd {
        step(
            "stop the other units",
            stop_units(&["tug-netd", "tug-proxy", "tug-shim"]),
        );
    }
    step("remove the proxy's rules", proxy_cleanup());
    step("remove netd's routes and devices", netd_cleanup().await);
    step(
        "unmount kubelet volumes",
        unmount_below(&root.join("var/lib/kubelet")),
    );
    step("remove files", remove_files(root));
    if systemd {
        step("reload systemd", daemon_reload());
    }
    if problems.is_empty() {
        println!(
            "[reset] done: tug's services, rules, routes and files are gone (the tug binary stays)"
        );
        Ok(())
    } else {
        anyhow::bail!("reset left work undone: {}", problems.join(", "))
    }
}

async fn delete_node(kubeconfig: &Path) -> anyhow::Result<String> {
    use k8s_openapi::api::core::v1::Node;
    if !kubeconfig.exists() {
        return Ok("no node kubeconfig; nothing to delete".into());
    }
    let name = node_of(kubeconfig)?;
    let client = crate::kubeconfig::client(kubeconfig).await?;
    let nodes: kube::Api<Node> = kube::Api::all(client);
    match nodes.delete(&name, &Default::default()).await {
        Ok(_) => Ok(format!("deleted Node {name}")),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(format!("Node {name} was gone")),
        Err(error) => Err(error).with_context(|| {
            format!("delete Node {name} (or run `kubectl delete node {name}` on the control plane)")
        }),
    }
}

/// The node name in the client certificate the kubeconfig uses (`CN=system:node:<name>`).
pub fn node_of(kubeconfig: &Path) -> anyhow::Result<String> {
    let parsed = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let user = parsed
        .auth_infos
        .first()
        .and_then(|a| a.auth_info.clone())
        .context("the kubeconfig has no user")?;
    let pem = tug_kubelet::bootstrap::client_certificate(&user)
        .context("the kubeconfig has no client certificate")?
        .map_err(anyhow::Error::msg)?;
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem)?;
    let cert = block.parse_x509()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .context("the certificate has no common name")?;
    cn.strip_prefix("system:node:")
        .map(str::to_owned)
        .with_context(|| format!("the certificate is {cn:?}, not a node's"))
}

/// `systemctl daemon-reload`, so that systemd forgets the removed units.
fn daemon_reload() -> anyhow::Result<String> {
    let status = std::process::Command::new("systemctl")
        .arg("daemon-reload")
        .status()
        .context("run systemctl")?;
    anyhow::ensure!(
        status.success(),
        "systemctl daemon-reload failed ({status})"
    );
    Ok("the removed units are unloaded".into())
}

/// Disables and stops `services` (those installed).
fn stop_units(services: &[&str]) -> anyhow::Result<String> {
    let mut names: Vec<String> = services.iter().map(|s| format!("{s}.service")).collect();
    names.retain(|n| Path::new("/etc/systemd/system").join(n).exists());
    if names.is_empty() {
        return Ok("none installed".into());
    }
    let status = std::process::Command::new("systemctl")
        .args(["disable", "--now"])
        .args(&names)
        .status()
        .context("run systemctl")?;
    anyhow::ensure!(
        status.success(),
        "systemctl disable --now failed ({status})"
    );
    Ok(names.join(", "))
}

async fn remove_pods(socket: &str) -> anyhow::Result<String> {
    use k8s_cri::v1::{ListPodSandboxRequest, RemovePodSandboxRequest, StopPodSandboxRequest};
    if !Path::new(socket.trim_start_matches("unix://")).exists() {
        return Ok(format!("no runtime at {socket}"));
    }
    let cri = tug_kubelet::runtime::Cri::new(socket);
    let mut runtime = cri.runtime().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let sandboxes = runtime
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    for sandbox in &sandboxes {
        let id = sandbox.id.clone();
        runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .with_context(|| format!("stop sandbox {id}"))?;
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .with_context(|| format!("remove sandbox {id}"))?;
    }
    Ok(format!("{} pod sandboxes", sandboxes.len()))
}

/// `tug proxy --cleanup`: what every proxy mode may have left.
fn proxy_cleanup() -> anyhow::Result<String> {
    let me = std::env::current_exe().context("find the tug binary")?;
    let output = std::process::Command::new(me)
        .args(["proxy", "--cleanup"])
        .output()
        .context("run tug proxy --cleanup")?;
    anyhow::ensure!(
        output.status.success(),
        "tug proxy --cleanup: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok("iptables, nftables and IPVS".into())
}

async fn netd_cleanup() -> anyhow::Result<String> {
    let (connection, handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
    let task = tokio::spawn(connection);
    let removed = tug_cni::netd::apply::cleanup(&handle, Path::new("nft")).await;
    task.abort();
    let removed = removed?;
    Ok(if removed.is_empty() {
        "nothing left".into()
    } else {
        removed.join(", ")
    })
}

/// Unmounts every mount at or below `dir`, deepest first.
fn unmount_below(dir: &Path) -> anyhow::Result<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for mount in &mounts {
        nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmount {}", mount.display()))?;
    }
    Ok(format!("{} mounts", mounts.len()))
}

/// Files and directories join and the services wrote.
fn remove_files(root: &Path) -> anyhow::Result<String> {
    let mut paths: Vec<PathBuf> = [
        KUBECONFIG,
        BOOTSTRAP_KUBECONFIG,
        CA,
        KUBELET_CONFIG,
        CERT_DIR,
        "var/lib/kubelet",
        "var/lib/tug",
        "etc/cni/net.d/10-tug.conflist",
        "opt/cni/bin/tug-cni",
        "run/tug",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    // The KubeProxyConfiguration's directory, with it.
    paths.extend(Path::new(PROXY_CONFIG).parent().map(|dir| root.join(dir)));
    paths.extend(
        units::SERVICES
            .iter()
            .map(|s| root.join(units::UNIT_DIR).join(format!("{s}.service"))),
    );
    let mut removed = 0;
    for path in &paths {
        let outcome = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
            Err(_) => continue,
        };
        outcome.with_context(|| format!("remove {}", path.display()))?;
        removed += 1;
    }
    Ok(format!("{removed} paths"))
}
