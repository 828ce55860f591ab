//! Kubelet TLS bootstrap: with a bootstrap kubeconfig (a bootstrap token) and no usable
//! kubeconfig of its own, the kubelet generates a key that never leaves the node, asks for a
//! client certificate with a CertificateSigningRequest (signer
//! `kubernetes.io/kube-apiserver-client-kubelet`, subject `O=system:nodes,
//! CN=system:node:<node>`), waits until it is issued, and writes the certificate and key
//! (`<cert-dir>/kubelet-client-<time>.pem`, 0600, linked from `kubelet-client-current.pem`) and
//! a kubeconfig that uses them, as upstream's kubelet does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

/// Why the bootstrap failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The bootstrap kubeconfig cannot be used.
    #[error("bootstrap kubeconfig {path}: {message}")]
    Kubeconfig {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The API refused or failed the CSR.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// It was not issued in time.
    #[error(
        "certificate signing request {name} was not issued within {seconds}s (is a CSR approver running for signer {signer}?)"
    )]
    Timeout {
        /// The CSR.
        name: String,
        /// Its signer.
        signer: String,
        /// The wait.
        seconds: u64,
    },
    /// Files could not be written.
    #[error("{0}")]
    Io(String),
}

/// The signer of kubelet client certificates.
pub const SIGNER_CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// The signer of kubelet serving certificates.
pub const SIGNER_SERVING: &str = "kubernetes.io/kubelet-serving";

/// A key and the CSR for `node`'s client certificate (ECDSA P-256, as upstream).
pub fn client_csr(node: &str) -> Result<(rcgen::KeyPair, String), String> {
    node_csr(node, &[], &[])
}

/// A key and a CSR with the subject `O=system:nodes, CN=system:node:<node>` and the given DNS
/// and IP subject alternative names (a serving certificate's).
pub fn node_csr(
    node: &str,
    dns: &[String],
    ips: &[std::net::IpAddr],
) -> Result<(rcgen::KeyPair, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generate the node key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    for name in dns {
        let name = name
            .clone()
            .try_into()
            .map_err(|e| format!("DNS name {name:?}: {e}"))?;
        params.subject_alt_names.push(rcgen::SanType::DnsName(name));
    }
    for ip in ips {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(*ip));
    }
    let pem = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| format!("build the CSR: {e}"))?;
    Ok((key, pem))
}

/// The key usages a kubelet client certificate asks for.
pub const CLIENT_USAGES: &[&str] = &["digital signature", "client auth"];

/// Asks the API for a client certificate for `node` (valid for `expiration` when given) and
/// waits until it is issued; returns the certificate (PEM), the key (PEM) and the CSR's name.
pub async fn request_client_certificate(
    client: kube::Client,
    node: &str,
    expiration: Option<Duration>,
    wait: Duration,
) -> Result<(String, String, String), BootstrapError> {
    let (key, pem) = client_csr(node).map_err(BootstrapError::Csr)?;
    request_certificate(
        client,
        SIGNER_CLIENT,
        CLIENT_USAGES,
        key,
        pem,
        expiration,
        wait,
    )
    .await
}

/// Creates a CertificateSigningRequest for `signer` from `pem` (asking for a certificate valid
/// for `expiration` when given; the signer may shorten it) and waits until it is issued (or
/// denied, or failed); returns the certificate (PEM), the key (PEM) and the CSR's name.
pub async fn request_certificate(
    client: kube::Client,
    signer: &str,
    usages: &[&str],
    key: rcgen::KeyPair,
    pem: String,
    expiration: Option<Duration>,
    wait: Duration,
) -> Result<(String, String, String), BootstrapError> {
    let csrs: Api<CertificateSigningRequest> = Api::all(client);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(
                if signer == SIGNER_SERVING {
                    "csr-"
                } else {
                    "node-csr-"
                }
                .into(),
            ),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(pem.into_bytes()),
            signer_name: signer.into(),
            usages: Some(usages.iter().map(|u| (*u).to_owned()).collect()),
            expiration_seconds: expiration.map(|e| e.as_secs().try_into().unwrap_or(i32::MAX)),
            ..Default::default()
        },
        status: None,
    };
    let created = csrs
        .create(&PostParams::default(), &csr)
        .await
        .map_err(|e| BootstrapError::Csr(e.to_string()))?;
    let name = created.metadata.name.clone().unwrap_or_default();
    tracing::info!(csr = %name, %signer, "waiting for the certificate to be issued");
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let csr = csrs
            .get(&name)
            .await
            .map_err(|e| BootstrapError::Csr(format!("get {name}: {e}")))?;
        let status = csr.status.unwrap_or_default();
        for condition in status.conditions.iter().flatten() {
            if matches!(condition.type_.as_str(), "Denied" | "Failed") && condition.status == "True"
            {
                return Err(BootstrapError::Csr(format!(
                    "{name} was {}: {} {}",
                    condition.type_.to_lowercase(),
                    condition.reason.clone().unwrap_or_default(),
                    condition.message.clone().unwrap_or_default()
                )));
            }
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            let cert = String::from_utf8(cert.0)
                .map_err(|_| BootstrapError::Csr(format!("{name}: the certificate is not PEM")))?;
            return Ok((cert, key.serialize_pem(), name));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BootstrapError::Timeout {
                name,
                signer: signer.to_owned(),
                seconds: wait.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes a certificate and its key as `<dir>/<prefix>-<time>.pem` (0600) and points
/// `<dir>/<prefix>-current.pem` at it (replaced atomically), as upstream's kubelet keeps
/// `kubelet-client-current.pem` and `kubelet-server-current.pem`; returns the link.
pub fn store_pair(
    dir: &Path,
    prefix: &str,
    cert: &str,
    key: &str,
) -> Result<PathBuf, BootstrapError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BootstrapError::Io(format!("create {}: {e}", dir.display())))?;
    let stamp = jiff::Timestamp::now()
        .strftime("%Y-%m-%d-%H-%M-%S")
        .to_string();
    let pem_path = dir.join(format!("{prefix}-{stamp}.pem"));
    write_private(&pem_path, format!("{cert}{key}").as_bytes())?;
    let current = dir.join(format!("{prefix}-current.pem"));
    let link_tmp = dir.join(format!(".{prefix}-current.tmp"));
    let _ = std::fs::remove_file(&link_tmp);
    std::os::unix::fs::symlink(&pem_path, &link_tmp)
        .map_err(|e| BootstrapError::Io(format!("link {}: {e}", link_tmp.display())))?;
    std::fs::rename(&link_tmp, &current)
        .map_err(|e| BootstrapError::Io(format!("link {}: {e}", current.display())))?;
    Ok(current)
}

/// The PEM client certificate a kubeconfig user authenticates with, from its file or its
/// inline data; `None` when the user has no client certificate.
pub fn client_certificate(user: &kube::config::AuthInfo) -> Option<Result<Vec<u8>, String>> {
    match (&user.client_certificate, &user.client_certificate_data) {
        (Some(file), _) => Some(std::fs::read(file).map_err(|e| format!("read {file}: {e}"))),
        (None, Some(data)) => Some(
            STANDARD
                .decode(data)
                .map_err(|e| format!("client-certificate-data is not base64: {e}")),
        ),
        (None, None) => None,
    }
}

/// Whether the kubeconfig at `path` has a client certificate that has not expired (as
/// upstream's kubelet decides whether to bootstrap again; one about to expire is renewed by
/// rotation with its own identity, which needs no bootstrap token that may be gone by then).
pub fn usable(path: &Path) -> bool {
    let Ok(config) = kube::config::Kubeconfig::read_from(path) else {
        return false;
    };
    let Some(user) = config.auth_infos.first().and_then(|a| a.auth_info.clone()) else {
        return false;
    };
    let pem = match client_certificate(&user) {
        None => return user.token.is_some() || user.token_file.is_some(),
        Some(pem) => pem,
    };
    let Ok(pem) = pem else { return false };
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(&pem) else {
        return false;
    };
    let Ok(cert) = block.parse_x509() else {
        return false;
    };
    let not_after = cert.validity().not_after.timestamp();
    not_after > jiff::Timestamp::now().as_second()
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), BootstrapError> {
    write_atomic(path, bytes, 0o600)
}

/// Writes `bytes` to `path` with permissions `mode`, atomically: a new file beside it, renamed
/// over it, so a reader sees the old content or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BootstrapError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| BootstrapError::Io(format!("write {}: {e}", tmp.display())))?;
    file.write_all(bytes)
        .map_err(|e| BootstrapError::Io(format!("write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| BootstrapError::Io(format!("write {}: {e}", path.display())))
}

/// A kubeconfig's current context's cluster (or its first context's).
fn current_cluster(file: &kube::config::Kubeconfig) -> Result<kube::config::Cluster, String> {
    let context_name = file.current_context.clone().unwrap_or_default();
    let context = file
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .or(file.contexts.first())
        .and_then(|c| c.context.clone())
        .ok_or("no context")?;
    file.clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| format!("no cluster {:?}", context.cluster))
}

/// The server and the CA certificate (PEM, from inline data or its file) of a kubeconfig's
/// current context's cluster (or its first context's).
pub fn server_and_ca(file: &kube::config::Kubeconfig) -> Result<(String, String), String> {
    let cluster = current_cluster(file)?;
    let server = cluster.server.ok_or("the cluster has no server")?;
    let ca = match (
        cluster.certificate_authority_data,
        cluster.certificate_authority,
    ) {
        (Some(data), _) => STANDARD
            .decode(data.trim())
            .ok()
            .and_then(|pem| String::from_utf8(pem).ok())
            .ok_or("the cluster's certificate-authority-data is not base64 PEM")?,
        (None, Some(path)) => {
            std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?
        }
        (None, None) => {
            return Err(
                "the cluster has no certificate authority (refusing to bootstrap without one)"
                    .into(),
            );
        }
    };
    Ok((server, ca))
}

/// The node's kubeconfig, as upstream's kubelet writes it after the TLS bootstrap: the cluster's
/// server and CA, and the client certificate and key in the file `current` (the cert dir's
/// `kubelet-client-current.pem`, which rotation replaces).
pub fn node_kubeconfig(
    server: &str,
    ca_pem: &str,
    tls_server_name: Option<&str>,
    current: &Path,
) -> String {
    let server_name = tls_server_name
        .map(|name| format!("\n    tls-server-name: {name}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: default-cluster\n  cluster:\n    server: {server}{server_name}\n    certificate-authority-data: {ca}\nusers:\n- name: default-auth\n  user:\n    client-certificate: {cert}\n    client-key: {cert}\ncontexts:\n- name: default-context\n  context:\n    cluster: default-cluster\n    namespace: default\n    user: default-auth\ncurrent-context: default-context\n",
        ca = STANDARD.encode(ca_pem),
        cert = current.display()
    )
}

/// Makes sure `kubeconfig` holds a usable client identity, bootstrapping it with
/// `bootstrap` when it does not.
pub async fn ensure(
    kubeconfig: &Path,
    bootstrap: &Path,
    cert_dir: &Path,
    node: &str,
) -> Result<(), BootstrapError> {
    if usable(kubeconfig) {
        return Ok(());
    }
    let fail = |message: String| BootstrapError::Kubeconfig {
        path: bootstrap.to_owned(),
        message,
    };
    let file = kube::config::Kubeconfig::read_from(bootstrap).map_err(|e| fail(e.to_string()))?;
    let (server, ca_pem) = server_and_ca(&file).map_err(fail)?;
    // A name the server's certificate is checked against stays with the server (tug keeps it
    // where upstream's kubelet drops it).
    let server_name = current_cluster(&file).ok().and_then(|c| c.tls_server_name);
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let client = kube::Client::try_from(config).map_err(|e| fail(e.to_string()))?;
    let (cert, key, csr) =
        request_client_certificate(client, node, None, Duration::from_secs(300)).await?;
    let current = store_pair(cert_dir, "kubelet-client", &cert, &key)?;
    let text = node_kubeconfig(&server, &ca_pem, server_name.as_deref(), &current);
    if let Some(parent) = kubeconfig.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| BootstrapError::Io(format!("create {}: {e}", parent.display())))?;
    }
    write_private(kubeconfig, text.as_bytes())?;
    tracing::info!(%csr, kubeconfig = %kubeconfig.display(), "TLS bootstrap done: client certificate issued");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_kubeconfig_keeps_the_server_name_tls_is_checked_against() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let current = Path::new("/var/lib/kubelet/pki/kubelet-client-current.pem");
        let named = node_kubeconfig("https://10.0.0.5:6443", ca, Some("kubernetes"), current);
        let file = kube::config::Kubeconfig::from_yaml(&named).unwrap();
        let cluster = current_cluster(&file).unwrap();
        assert_eq!(cluster.tls_server_name.as_deref(), Some("kubernetes"));
        assert_eq!(
            server_and_ca(&file).unwrap(),
            ("https://10.0.0.5:6443".into(), ca.into())
        );
        let plain = node_kubeconfig("https://10.0.0.5:6443", ca, None, current);
        let file = kube::config::Kubeconfig::from_yaml(&plain).unwrap();
        assert_eq!(current_cluster(&file).unwrap().tls_server_name, None);
    }

    #[test]
    fn the_csr_names_the_node_in_system_nodes() {
        let (_, pem) = client_csr("node-7").unwrap();
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, csr) =
            <x509_parser::certification_request::X509CertificationRequest<'_> as x509_parser::prelude::FromDer<_>>::from_der(&block.contents)
                .unwrap();
        let subject = csr.certification_request_info.subject.to_string();
        assert!(subject.contains("CN=system:node:node-7"), "{subject}");
        assert!(subject.contains("O=system:nodes"), "{subject}");
    }

    #[test]
    fn a_missing_or_certless_kubeconfig_is_not_usable() {
        assert!(!usable(Path::new("/nonexistent/kubelet.conf")));
    }
}
