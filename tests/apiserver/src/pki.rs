//! The cluster's certificate authority: the server's serving certificate, client certificates for
//! the identities tests use, and signing of approved CertificateSigningRequests.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// A generated CA and the material made with it.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate with its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// Why a CSR could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The request is not a parseable, self-consistent PKCS#10 CSR. Not retryable.
    #[error("invalid certificate signing request: {0}")]
    InvalidRequest(String),
    /// The CA could not produce the certificate. Not retryable.
    #[error("sign certificate: {0}")]
    Sign(#[source] rcgen::Error),
}

impl Ca {
    /// Generates a fresh CA named `kubernetes`, as kubeadm names its cluster CA.
    pub fn generate() -> Ca {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("kubernetes", &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyCertSign,
        ];
        params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(3650);
        let cert = params.self_signed(&key).expect("self-sign CA");
        Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// A serving certificate for the API server at `ips` and `dns_names`.
    pub fn serving_cert(&self, ips: &[IpAddr], dns_names: &[&str]) -> Issued {
        let key = KeyPair::generate().expect("generate serving key");
        let mut params = leaf_params("kube-apiserver", &[], Duration::from_secs(365 * 86400));
        params.subject_alt_names = ips
            .iter()
            .map(|ip| SanType::IpAddress(*ip))
            .chain(
                dns_names
                    .iter()
                    .map(|n| SanType::DnsName((*n).try_into().expect("dns name"))),
            )
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign serving cert");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate for user `user` in `groups` (CN and O, as Kubernetes reads them).
    pub fn client_cert(&self, user: &str, groups: &[&str], validity: Duration) -> Issued {
        let key = KeyPair::generate().expect("generate client key");
        let mut params = leaf_params(user, groups, validity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign client cert");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Signs a PEM CSR for client or server use, keeping its subject and SANs, valid for
    /// `validity`; returns the certificate PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        usages: &[ExtendedKeyUsagePurpose],
        validity: Duration,
    ) -> Result<String, SignError> {
        let request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::InvalidRequest(e.to_string()))?;
        let mut params = request.params;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::try_from(validity).expect("validity fits");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(SignError::Sign)?;
        Ok(cert.pem())
    }
}

fn dn(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for org in organizations {
        dn.push(DnType::OrganizationName, *org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn leaf_params(common_name: &str, organizations: &[&str], validity: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(common_name, organizations);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::try_from(validity).expect("validity fits");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    params
}

/// The subject of a DER certificate as Kubernetes reads it: CN is the user, each O a group.
pub fn subject_identity(cert_der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let subject = cert.subject();
    let user = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    Some((user, groups))
}

/// Subject and extended key usages requested by a PEM CSR, for the approver's checks.
pub fn csr_subject(csr_pem: &str) -> Option<(String, Vec<String>)> {
    let request = CertificateSigningRequestParams::from_pem(csr_pem).ok()?;
    let mut user = None;
    let mut groups = Vec::new();
    for (kind, value) in request.params.distinguished_name.iter() {
        let text = dn_value_text(value)?;
        match kind {
            DnType::CommonName => user = Some(text),
            DnType::OrganizationName => groups.push(text),
            _ => {}
        }
    }
    Some((user?, groups))
}

fn dn_value_text(value: &rcgen::DnValue) -> Option<String> {
    match value {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::TeletexString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificates_carry_user_and_groups() {
        let ca = Ca::generate();
        let issued = ca.client_cert("system:node:n1", &["system:nodes"], Duration::from_secs(60));
        let der = rustls_pemfile_der(&issued.cert_pem);
        let (user, groups) = subject_identity(&der).expect("subject parses");
        assert_eq!(user, "system:node:n1");
        assert_eq!(groups, ["system:nodes"]);
    }

    #[test]
    fn a_csr_is_signed_with_its_own_subject() {
        let ca = Ca::generate();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("system:node:n2", &["system:nodes"]);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert_eq!(
            csr_subject(&csr),
            Some(("system:node:n2".into(), vec!["system:nodes".into()]))
        );
        let cert = ca
            .sign_csr(
                &csr,
                &[ExtendedKeyUsagePurpose::ClientAuth],
                Duration::from_secs(600),
            )
            .unwrap();
        let (user, groups) = subject_identity(&rustls_pemfile_der(&cert)).unwrap();
        assert_eq!(
            (user.as_str(), groups),
            ("system:node:n2", vec!["system:nodes".to_owned()])
        );
        assert!(
            ca.sign_csr("not a csr", &[], Duration::from_secs(600))
                .is_err()
        );
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        let block = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, block).unwrap()
    }
}
