//! The kubelet API's serving certificate: from files (`tlsCertFile`/`tlsPrivateKeyFile`, or a
//! self-signed pair in the cert dir), or issued by the cluster (`serverTLSBootstrap: true`,
//! see [`crate::rotation`]). Until the first one is issued (an operator approves serving CSRs
//! in a kubeadm cluster), TLS handshakes fail: the kubelet never serves with a certificate
//! nobody vouches for.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The certificate the API serves now, swapped when a new one is issued.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
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

#[cfg(test)]
pub(crate) mod tests {
    use std::net::IpAddr;

    use super::*;

    /// A self-signed certificate and its key, valid between two times (seconds).
    pub(crate) fn certificate(
        dns: &[&str],
        ips: &[IpAddr],
        from: i64,
        to: i64,
    ) -> (String, String) {
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
