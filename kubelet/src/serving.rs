//! The kubelet API's serving certificate: from files (`tlsCertFile`/`tlsPrivateKeyFile`, or a
//! self-signed pair in the cert dir), or issued by the cluster (`serverTLSBootstrap: true`):
//! the kubelet asks for it with a CertificateSigningRequest for signer
//! `kubernetes.io/kubelet-serving` (subject `system:node:<node>` in `system:nodes`, the node's
//! names and addresses as subject alternative names), keeps it as
//! `<cert-dir>/kubelet-server-current.pem`, and rotates it at a random point between 70 % and
//! 90 % of its lifetime, or at once when the node's names or addresses are no longer all in
//! it. Until the first one is issued (an operator approves serving CSRs in a kubeadm cluster),
//! TLS handshakes fail: the kubelet never serves with a certificate nobody vouches for.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::bootstrap::{SIGNER_SERVING, node_csr, request_certificate, store_pair};
use crate::metrics::Metrics;

/// The certificate the API serves now, swapped when a new one is issued.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Validity start and end (seconds since the epoch).
    pub not_before: i64,
    /// Validity end.
    pub not_after: i64,
    /// DNS names.
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
}

/// The facts of the first certificate in `pem`.
pub fn facts(pem: &[u8]) -> Result<Facts, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not PEM: {e}"))?;
    let cert = block
        .parse_x509()
        .map_err(|e| format!("not a certificate: {e}"))?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Ok(Some(names)) = cert.subject_alternative_name() {
        for name in &names.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    ips.extend(ip);
                }
                _ => {}
            }
        }
    }
    Ok(Facts {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        dns,
        ips,
    })
}

impl ServingCert {
    /// Nothing to serve yet.
    pub fn empty() -> ServingCert {
        ServingCert {
            current: RwLock::new(None),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// Serves the certificate chain and key in the PEM files (the same file for both works).
    pub fn from_files(cert: &Path, key: &Path) -> std::io::Result<ServingCert> {
        let serving = ServingCert::empty();
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("read {}: {e}", path.display())))
        };
        serving
            .install(&read(cert)?, &read(key)?)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", cert.display())))?;
        Ok(serving)
    }

    /// Serves `cert` (PEM chain) with `key` (PEM) from now on.
    pub fn install(&self, cert: &[u8], key: &[u8]) -> Result<(), String> {
        let chain: Vec<_> = rustls_pemfile::certs(&mut &cert[..])
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificates: {e}"))?;
        if chain.is_empty() {
            return Err("no certificate".into());
        }
        let key = rustls_pemfile::private_key(&mut &key[..])
            .map_err(|e| format!("private key: {e}"))?
            .ok_or("no private key")?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("private key: {e}"))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| format!("the key does not belong to the certificate: {e}"))?;
        *self.current.write().expect("serving lock") = Some(Arc::new(certified));
        Ok(())
    }

    /// Whether there is a certificate to serve.
    pub fn ready(&self) -> bool {
        self.current.read().expect("serving lock").is_some()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("serving lock").clone()
    }
}

/// Where and for what a cluster-issued serving certificate is kept.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// The cert dir (`/var/lib/kubelet/pki`).
    pub cert_dir: PathBuf,
    /// The node's name.
    pub node: String,
    /// DNS names it must carry (the node's hostname).
    pub dns: Vec<String>,
    /// Addresses it must carry (the node's IPs).
    pub ips: Vec<IpAddr>,
}

impl Bootstrap {
    /// `kubelet-server-current.pem`.
    pub fn current(&self) -> PathBuf {
        self.cert_dir.join("kubelet-server-current.pem")
    }

    /// When a certificate with `facts` is due for rotation (seconds since the epoch), given
    /// `jitter` in [0, 1): between 70 % and 90 % of its lifetime, or now when it lacks one of
    /// the names or addresses.
    pub fn rotation_due(&self, facts: &Facts, jitter: f64, now: i64) -> i64 {
        let covers = self.dns.iter().all(|d| facts.dns.contains(d))
            && self.ips.iter().all(|ip| facts.ips.contains(ip));
        if !covers {
            return now;
        }
        let lifetime = (facts.not_after - facts.not_before).max(0) as f64;
        facts.not_before + (lifetime * (0.7 + 0.2 * jitter.clamp(0.0, 1.0))).round() as i64
    }
}

/// Keeps a cluster-issued serving certificate in `serving` for as long as the kubelet runs:
/// loads the current one, and requests a new one when it is due (retrying with back-off while
/// the API refuses or nobody approves).
pub async fn rotate(
    client: kube::Client,
    bootstrap: Bootstrap,
    serving: Arc<ServingCert>,
    metrics: Arc<Metrics>,
) {
    let jitter = rand::random::<f64>();
    let mut backoff = Duration::from_secs(1);
    loop {
        let now = jiff::Timestamp::now().as_second();
        let current = std::fs::read(bootstrap.current()).ok();
        let due = match current.as_deref().map(|pem| (pem, facts(pem))) {
            Some((pem, Ok(facts))) if facts.not_after > now => {
                if !serving.ready()
                    && let Err(error) = serving.install(pem, pem)
                {
                    tracing::warn!(%error, path = %bootstrap.current().display(), "the current serving certificate cannot be used");
                }
                metrics.set(
                    "kubelet_certificate_manager_server_ttl_seconds",
                    &[],
                    (facts.not_after - now) as f64,
                );
                bootstrap.rotation_due(&facts, jitter, now)
            }
            _ => now,
        };
        if due > now {
            let wait = Duration::from_secs((due - now) as u64);
            tracing::info!(
                seconds = wait.as_secs(),
                "serving certificate rotation scheduled"
            );
            // Wake at least hourly: the clock may jump, and addresses may change.
            tokio::time::sleep(wait.min(Duration::from_secs(3600))).await;
            continue;
        }
        let request = async {
            let (key, pem) = node_csr(&bootstrap.node, &bootstrap.dns, &bootstrap.ips)
                .map_err(crate::bootstrap::BootstrapError::Csr)?;
            let (cert, key, name) = request_certificate(
                client.clone(),
                SIGNER_SERVING,
                &["digital signature", "server auth"],
                key,
                pem,
                Duration::from_secs(900),
            )
            .await?;
            store_pair(&bootstrap.cert_dir, "kubelet-server", &cert, &key)?;
            serving
                .install(cert.as_bytes(), key.as_bytes())
                .map_err(crate::bootstrap::BootstrapError::Csr)?;
            Ok::<_, crate::bootstrap::BootstrapError>(name)
        };
        match request.await {
            Ok(name) => {
                tracing::info!(csr = %name, "serving certificate issued and in use");
                backoff = Duration::from_secs(1);
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = backoff.as_secs(), "requesting a serving certificate failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(dns: &[&str], ips: &[IpAddr], from: i64, to: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn rotation_falls_between_70_and_90_percent_or_now_when_names_are_missing() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let (pem, _) = certificate(&["node-7"], &[ip], 1_000_000, 1_001_000);
        let facts = facts(pem.as_bytes()).unwrap();
        assert_eq!(facts.dns, ["node-7"]);
        assert_eq!(facts.ips, [ip]);
        let bootstrap = Bootstrap {
            cert_dir: "/nonexistent".into(),
            node: "node-7".into(),
            dns: vec!["node-7".into()],
            ips: vec![ip],
        };
        assert_eq!(bootstrap.rotation_due(&facts, 0.0, 0), 1_000_700);
        assert_eq!(bootstrap.rotation_due(&facts, 1.0, 0), 1_000_900);
        let moved = Bootstrap {
            ips: vec!["192.0.2.8".parse().unwrap()],
            ..bootstrap
        };
        assert_eq!(moved.rotation_due(&facts, 0.5, 42), 42);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let (pem, key) = certificate(&["a"], &[], 0, 4_000_000_000);
        let (_, other) = certificate(&["a"], &[], 0, 4_000_000_000);
        let serving = ServingCert::empty();
        assert!(!serving.ready());
        assert!(serving.install(pem.as_bytes(), other.as_bytes()).is_err());
        assert!(!serving.ready());
        serving.install(pem.as_bytes(), key.as_bytes()).unwrap();
        assert!(serving.ready());
    }
}
