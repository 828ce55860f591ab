//! What every API-watching component starts with: its node name and an API client from a
//! kubeconfig file.

use std::path::Path;

use anyhow::Context;

/// `name`, or this host's name in lower case (what the kubelet registers by default).
pub fn node_name(name: Option<String>) -> anyhow::Result<String> {
    match name {
        Some(name) => Ok(name),
        None => Ok(nix::unistd::gethostname()
            .context("read the host name (or pass the node name explicitly)")?
            .to_string_lossy()
            .to_lowercase()),
    }
}

/// An API client from the kubeconfig file at `path`.
pub async fn client(path: &Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("read kubeconfig {}", path.display()))?;
    from_kubeconfig(kubeconfig)
        .await
        .with_context(|| format!("kubeconfig {}", path.display()))
}

/// An API client from kubeconfig YAML.
pub async fn client_from_yaml(yaml: &str) -> anyhow::Result<kube::Client> {
    from_kubeconfig(kube::config::Kubeconfig::from_yaml(yaml).context("parse the kubeconfig")?)
        .await
}

async fn from_kubeconfig(kubeconfig: kube::config::Kubeconfig) -> anyhow::Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .context("load the kubeconfig")?;
    kube::Client::try_from(config).context("build the API client")
}
