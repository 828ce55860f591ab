//! Rotation of the kubelet's two cluster-issued certificates, as upstream's certificate
//! managers do:
//!
//! - the **client** certificate (`rotateCertificates: true`): the node's identity towards the
//!   API server, signer `kubernetes.io/kube-apiserver-client-kubelet`, kept as
//!   `<cert-dir>/kubelet-client-current.pem`. The CSR is made with the current certificate, so
//!   a kubeadm cluster approves it by itself (`selfnodeclient`). Clients built on the node's
//!   kubeconfig re-read the file when it changes (`tug`'s kubeconfig loader), so the new
//!   identity is used from the next connection on, in every tug service.
//! - the **serving** certificate of the kubelet API (`serverTLSBootstrap: true`): signer
//!   `kubernetes.io/kubelet-serving`, the node's names and addresses as subject alternative
//!   names, kept as `<cert-dir>/kubelet-server-current.pem` and swapped into the live TLS
//!   server.
//!
//! Each is renewed at a random point between 70 % and 90 % of its lifetime (a serving
//! certificate at once when one of the node's names or addresses is missing from it), with a
//! new key generated on the node; a refused or unapproved request is retried with back-off
//! while the current certificate keeps being used.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::bootstrap::{
    BootstrapError, CLIENT_USAGES, SIGNER_CLIENT, SIGNER_SERVING, node_csr, request_certificate,
    store_pair,
};
use crate::metrics::Metrics;
use crate::serving::ServingCert;

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Validity start (seconds since the epoch).
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

/// Which certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The node's client identity.
    Client,
    /// The kubelet API's serving certificate.
    Serving,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Client => "kubelet-client",
            Kind::Serving => "kubelet-server",
        }
    }

    fn signer(self) -> &'static str {
        match self {
            Kind::Client => SIGNER_CLIENT,
            Kind::Serving => SIGNER_SERVING,
        }
    }

    fn usages(self) -> &'static [&'static str] {
        match self {
            Kind::Client => CLIENT_USAGES,
            Kind::Serving => &["digital signature", "server auth"],
        }
    }

    /// Upstream's gauge of the seconds the certificate has left.
    fn ttl_metric(self) -> &'static str {
        match self {
            Kind::Client => "kubelet_certificate_manager_client_ttl_seconds",
            Kind::Serving => "kubelet_certificate_manager_server_ttl_seconds",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Serving => "serving",
        }
    }
}

/// A cluster-issued certificate: which one, where it is kept and what it must carry.
#[derive(Debug, Clone)]
pub struct Managed {
    /// Client or serving.
    pub kind: Kind,
    /// The cert dir (`/var/lib/kubelet/pki`).
    pub cert_dir: PathBuf,
    /// The node's name.
    pub node: String,
    /// DNS names it must carry (a serving certificate: the node's hostname).
    pub dns: Vec<String>,
    /// Addresses it must carry (a serving certificate: the node's IPs).
    pub ips: Vec<IpAddr>,
}

impl Managed {
    /// The node's client certificate in `cert_dir`.
    pub fn client(cert_dir: PathBuf, node: String) -> Managed {
        Managed {
            kind: Kind::Client,
            cert_dir,
            node,
            dns: Vec::new(),
            ips: Vec::new(),
        }
    }

    /// `kubelet-client-current.pem` or `kubelet-server-current.pem`.
    pub fn current(&self) -> PathBuf {
        self.cert_dir
            .join(format!("{}-current.pem", self.kind.prefix()))
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

    /// Asks for a new certificate with a new key, stores it as the current one and, for a
    /// serving certificate, puts it into `serving`; returns the CSR's name.
    async fn renew(
        &self,
        client: kube::Client,
        serving: Option<&ServingCert>,
    ) -> Result<String, BootstrapError> {
        let (key, pem) = node_csr(&self.node, &self.dns, &self.ips).map_err(BootstrapError::Csr)?;
        let (cert, key, name) = request_certificate(
            client,
            self.kind.signer(),
            self.kind.usages(),
            key,
            pem,
            None,
            Duration::from_secs(900),
        )
        .await?;
        store_pair(&self.cert_dir, self.kind.prefix(), &cert, &key)?;
        if let Some(serving) = serving {
            serving
                .install(cert.as_bytes(), key.as_bytes())
                .map_err(BootstrapError::Csr)?;
        }
        Ok(name)
    }
}

/// Keeps `managed` current for as long as the kubelet runs: reads the current certificate
/// (and puts a serving one into `serving`), and requests a new one when it is due, retrying
/// with back-off while the API refuses or nobody approves.
pub async fn rotate(
    client: kube::Client,
    managed: Managed,
    serving: Option<Arc<ServingCert>>,
    metrics: Arc<Metrics>,
) {
    let kind = managed.kind.name();
    let jitter = rand::random::<f64>();
    let mut backoff = Duration::from_secs(1);
    loop {
        let now = jiff::Timestamp::now().as_second();
        let current = std::fs::read(managed.current()).ok();
        let due = match current.as_deref().map(|pem| (pem, facts(pem))) {
            Some((pem, Ok(facts))) if facts.not_after > now => {
                if let Some(serving) = &serving
                    && !serving.ready()
                    && let Err(error) = serving.install(pem, pem)
                {
                    tracing::warn!(%error, path = %managed.current().display(), "the current serving certificate cannot be used");
                }
                metrics.set(
                    managed.kind.ttl_metric(),
                    &[],
                    (facts.not_after - now) as f64,
                );
                managed.rotation_due(&facts, jitter, now)
            }
            _ => now,
        };
        if due > now {
            let wait = Duration::from_secs((due - now) as u64);
            tracing::info!(
                certificate = kind,
                seconds = wait.as_secs(),
                "certificate rotation scheduled"
            );
            // Wake at least hourly: the clock may jump, and addresses may change.
            tokio::time::sleep(wait.min(Duration::from_secs(3600))).await;
            continue;
        }
        match managed.renew(client.clone(), serving.as_deref()).await {
            Ok(name) => {
                tracing::info!(certificate = kind, csr = %name, path = %managed.current().display(), "certificate rotated: the new one is in use");
                backoff = Duration::from_secs(1);
            }
            Err(error) => {
                tracing::warn!(certificate = kind, %error, retry_in = backoff.as_secs(), "requesting a new certificate failed; the current one stays in use");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::tests::certificate;

    #[test]
    fn rotation_falls_between_70_and_90_percent_or_now_when_names_are_missing() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let (pem, _) = certificate(&["node-7"], &[ip], 1_000_000, 1_001_000);
        let facts = facts(pem.as_bytes()).unwrap();
        assert_eq!(facts.dns, ["node-7"]);
        assert_eq!(facts.ips, [ip]);
        let serving = Managed {
            kind: Kind::Serving,
            cert_dir: "/nonexistent".into(),
            node: "node-7".into(),
            dns: vec!["node-7".into()],
            ips: vec![ip],
        };
        assert_eq!(serving.rotation_due(&facts, 0.0, 0), 1_000_700);
        assert_eq!(serving.rotation_due(&facts, 1.0, 0), 1_000_900);
        let moved = Managed {
            ips: vec!["192.0.2.8".parse().unwrap()],
            ..serving
        };
        assert_eq!(moved.rotation_due(&facts, 0.5, 42), 42);
        // A client certificate carries no names: only its age counts.
        let client = Managed::client("/var/lib/kubelet/pki".into(), "node-7".into());
        assert_eq!(client.rotation_due(&facts, 0.5, 42), 1_000_800);
        assert_eq!(
            client.current(),
            PathBuf::from("/var/lib/kubelet/pki/kubelet-client-current.pem")
        );
    }
}
