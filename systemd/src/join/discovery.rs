//! Token discovery, as `kubeadm join` does it: fetch `cluster-info` from `kube-public` without
//! trusting the server yet, check the detached JWS the bootstrap signer put there with the
//! token's secret, check the CA against the operator's public-key pins, then fetch it again over
//! TLS verified with that CA and make sure it is the same.

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

/// The path of the ConfigMap discovery reads (readable anonymously on kubeadm clusters).
const CLUSTER_INFO: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";

/// How far this machine's clock may be from the API server's before joining is refused.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Why discovery failed; each names what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The token is not `[a-z0-9]{6}.[a-z0-9]{16}`.
    #[error(
        "malformed bootstrap token {0:?}: a token is 6 characters [a-z0-9], a dot, and 16 characters [a-z0-9] (as `kubeadm token create` prints it)"
    )]
    MalformedToken(String),
    /// A pin is not `sha256:<64 hex digits>`.
    #[error(
        "malformed --discovery-token-ca-cert-hash {0:?}: expected sha256:<64 hex digits> (as `kubeadm token create --print-join-command` prints it)"
    )]
    MalformedPin(String),
    /// No pin and no explicit opt-out.
    #[error(
        "refusing to join without verifying the cluster CA: pass --discovery-token-ca-cert-hash sha256:<hex> (from `kubeadm token create --print-join-command` on the control plane), or --discovery-token-unsafe-skip-ca-verification to trust whoever answers"
    )]
    NoPin,
    /// The API server could not be reached.
    #[error(
        "cannot reach the API server at {endpoint}: {cause} (check the address and port, the network path, and that kube-apiserver is running)"
    )]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        cause: String,
    },
    /// The server answered, but not with cluster-info.
    #[error("reading cluster-info from {endpoint}: HTTP {status}: {detail}")]
    Http {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// What it means here.
        detail: String,
    },
    /// cluster-info carries no signature for this token id.
    #[error(
        "cluster-info on {endpoint} has no signature for token id {id:?} after {waited:?}: the token is unknown to the cluster or has expired (list tokens with `kubeadm token list`, make a new one with `kubeadm token create --print-join-command`)"
    )]
    JwsMissing {
        /// The endpoint.
        endpoint: String,
        /// The token id.
        id: String,
        /// How long discovery waited for it.
        waited: Duration,
    },
    /// The signature does not verify with this token's secret.
    #[error(
        "the cluster-info signature for token id {id:?} does not match this token's secret: the token is mistyped, or the server is not the cluster that issued it"
    )]
    JwsMismatch {
        /// The token id.
        id: String,
    },
    /// The CA's public key matches no pin.
    #[error(
        "the cluster CA's public key hash is sha256:{actual}, which matches none of the --discovery-token-ca-cert-hash values given ({expected}): the server is not the cluster you meant, or the hash is from another cluster"
    )]
    PinMismatch {
        /// The CA's pin.
        actual: String,
        /// The pins given.
        expected: String,
    },
    /// The clocks disagree.
    #[error(
        "this machine's clock is {skew} the API server's (server time {server}): certificates and tokens the cluster issues would be judged wrongly here. Fix time synchronisation (systemd-timesyncd, chrony) and join again"
    )]
    ClockSkew {
        /// "N s ahead of" or "N s behind".
        skew: String,
        /// The server's Date header.
        server: String,
    },
    /// cluster-info is not what it should be.
    #[error("cluster-info from {endpoint}: {detail}")]
    Invalid {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        detail: String,
    },
}

/// A bootstrap token, `<id>.<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The public part (names the Secret `bootstrap-token-<id>`).
    pub id: String,
    /// The secret part.
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}.<redacted>)", self.id)
    }
}

impl std::str::FromStr for Token {
    type Err = DiscoveryError;
    fn from_str(text: &str) -> Result<Token, DiscoveryError> {
        let ok = |part: &str, len: usize| {
            part.len() == len
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        match text.split_once('.') {
            Some((id, secret)) if ok(id, 6) && ok(secret, 16) => Ok(Token {
                id: id.to_owned(),
                secret: secret.to_owned(),
            }),
            // The secret never goes into an error message.
            _ => Err(DiscoveryError::MalformedToken(match text.split_once('.') {
                Some((id, _)) => format!("{id}.<secret>"),
                None => "<no dot>".to_owned(),
            })),
        }
    }
}

impl Token {
    /// The whole token, as the API takes it for bearer authentication.
    pub fn bearer(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// A CA public-key pin: the SHA-256 of the certificate's DER SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin([u8; 32]);

impl std::str::FromStr for Pin {
    type Err = DiscoveryError;
    fn from_str(text: &str) -> Result<Pin, DiscoveryError> {
        let bad = || DiscoveryError::MalformedPin(text.to_owned());
        let hex = text.strip_prefix("sha256:").ok_or_else(bad)?;
        let bytes = hex::decode(hex).map_err(|_| bad())?;
        Ok(Pin(bytes.try_into().map_err(|_| bad())?))
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl Pin {
    /// The pin of a PEM certificate (the first one in `pem`).
    pub fn of_certificate(pem: &[u8]) -> Result<Pin, String> {
        let (_, block) = x509_parser::pem::parse_x509_pem(pem)
            .map_err(|e| format!("the CA is not a PEM certificate: {e}"))?;
        let cert = block
            .parse_x509()
            .map_err(|e| format!("the CA certificate does not parse: {e}"))?;
        Ok(Pin(Sha256::digest(cert.public_key().raw).into()))
    }
}

/// Checks a detached compact JWS (`header..signature`, HS256) over `content` with the token:
/// the header must name HS256 and the token's id, and the signature must be the token secret's
/// HMAC-SHA256 of `header.base64url(content)`.
pub fn verify_detached_jws(jws: &str, content: &str, token: &Token) -> Result<(), DiscoveryError> {
    let mismatch = || DiscoveryError::JwsMismatch {
        id: token.id.clone(),
    };
    let (header, signature) = jws.split_once("..").ok_or_else(mismatch)?;
    let header_json: serde_json::Value = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(mismatch)?;
    if header_json["alg"] != "HS256" || header_json["kid"] != token.id.as_str() {
        return Err(mismatch());
    }
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| mismatch())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(token.secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(URL_SAFE_NO_PAD.encode(content).as_bytes());
    mac.verify_slice(&signature).map_err(|_| mismatch())
}

/// What discovery established.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// The API server URL the node should use.
    pub server: String,
    /// The cluster CA, PEM.
    pub ca_pem: String,
    /// The CA's pin (to print).
    pub pin: Pin,
}

/// How to discover.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// `host:port` of the API server.
    pub endpoint: String,
    /// The token whose signature vouches for cluster-info.
    pub token: Token,
    /// Accepted CA pins; empty only with `unsafe_skip_ca_verification`.
    pub pins: Vec<Pin>,
    /// Trust the CA in cluster-info without a pin.
    pub unsafe_skip_ca_verification: bool,
    /// How long to wait for cluster-info and its signature to appear.
    pub timeout: Duration,
}

/// The server named in `endpoint` as a URL (`https://` is assumed).
pub fn endpoint_url(endpoint: &str) -> String {
    if endpoint.starts_with("https://") {
        endpoint.trim_end_matches('/').to_owned()
    } else {
        format!("https://{}", endpoint.trim_end_matches('/'))
    }
}

/// An anonymous client for `url`: trusting `ca_pem`, or (with `None`) any certificate.
fn anonymous_client(url: &str, ca_pem: Option<&str>) -> Result<kube::Client, String> {
    let mut config = kube::Config::new(url.parse().map_err(|e| format!("bad URL {url}: {e}"))?);
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(30));
    match ca_pem {
        Some(pem) => {
            let mut ders = Vec::new();
            for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
                ders.push(
                    block
                        .map_err(|e| format!("the CA is not PEM: {e}"))?
                        .contents,
                );
            }
            config.root_cert = Some(ders);
        }
        None => {
            // Nothing is verified on this read (the JWS and the pin are checked instead), so
            // the system's trust store is not needed either: a minimal machine has none.
            config.root_cert = Some(Vec::new());
            config.accept_invalid_certs = true;
        }
    }
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// One read of cluster-info: its `data` and the server's Date header.
async fn fetch(
    client: &kube::Client,
    endpoint: &str,
) -> Result<(serde_json::Map<String, serde_json::Value>, Option<String>), DiscoveryError> {
    let request = http::Request::get(CLUSTER_INFO)
        .header("Accept", "application/json")
        .body(kube::client::Body::empty())
        .expect("a static request");
    let response = client
        .send(request)
        .await
        .map_err(|e| DiscoveryError::Unreachable {
            endpoint: endpoint.to_owned(),
            cause: error_chain(&e),
        })?;
    let status = response.status().as_u16();
    let date = response
        .headers()
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| DiscoveryError::Unreachable {
            endpoint: endpoint.to_owned(),
            cause: error_chain(&e),
        })?
        .to_bytes();
    let http_error = |detail: &str| DiscoveryError::Http {
        endpoint: endpoint.to_owned(),
        status,
        detail: detail.to_owned(),
    };
    match status {
        200 => {}
        401 | 403 => {
            return Err(http_error(
                "anonymous reads of kube-public/cluster-info are not allowed on this cluster (kubeadm grants them with the Role kubeadm:bootstrap-signer-clusterinfo); use --discovery-file instead",
            ));
        }
        404 => return Err(http_error("no ConfigMap kube-public/cluster-info yet")),
        _ => return Err(http_error(String::from_utf8_lossy(&body).trim())),
    }
    let object: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| DiscoveryError::Invalid {
            endpoint: endpoint.to_owned(),
            detail: format!("not JSON: {e}"),
        })?;
    let data = object["data"].as_object().cloned().unwrap_or_default();
    Ok((data, date))
}

/// `error` and its sources, joined.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// How far `local` is from the HTTP date `server`, as an error past [`MAX_CLOCK_SKEW`].
pub fn check_clock(server: &str, local: SystemTime) -> Result<(), DiscoveryError> {
    let Ok(server_time) = httpdate::parse_http_date(server) else {
        return Ok(());
    };
    let (ahead, skew) = match local.duration_since(server_time) {
        Ok(ahead) => (true, ahead),
        Err(behind) => (false, behind.duration()),
    };
    if skew <= MAX_CLOCK_SKEW {
        return Ok(());
    }
    Err(DiscoveryError::ClockSkew {
        skew: format!(
            "{} s {}",
            skew.as_secs(),
            if ahead { "ahead of" } else { "behind" }
        ),
        server: server.to_owned(),
    })
}

/// The server and CA of the kubeconfig in cluster-info.
fn cluster_of(kubeconfig: &str, endpoint: &str) -> Result<(String, String), DiscoveryError> {
    let invalid = |detail: String| DiscoveryError::Invalid {
        endpoint: endpoint.to_owned(),
        detail,
    };
    let parsed = kube::config::Kubeconfig::from_yaml(kubeconfig)
        .map_err(|e| invalid(format!("its kubeconfig does not parse: {e}")))?;
    let cluster = parsed
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| invalid("its kubeconfig names no cluster".into()))?;
    let server = cluster
        .server
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| invalid("its kubeconfig's cluster has no server".into()))?;
    let data = cluster.certificate_authority_data.ok_or_else(|| {
        invalid("its kubeconfig's cluster has no certificate-authority-data".into())
    })?;
    let ca = STANDARD
        .decode(data.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| invalid("its certificate-authority-data is not base64 PEM".into()))?;
    Ok((server, ca))
}

/// Whether `url`'s host is a loopback address (which names no machine but the one asking).
fn loopback(url: &str) -> bool {
    let host = url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Discovery {
    /// Checks one read of cluster-info, `kubeconfig` and the token's detached signature `jws`:
    /// the signature must be the token's, the kubeconfig must name a server and carry a CA, and
    /// that CA must match a pin. Returns the server, the CA (PEM) and its pin. Everything here
    /// comes from an unauthenticated read, so it is also a fuzz target (`fuzz/`).
    pub fn verify(
        &self,
        kubeconfig: &str,
        jws: &str,
    ) -> Result<(String, String, Pin), DiscoveryError> {
        verify_detached_jws(jws, kubeconfig, &self.token)?;
        let (server, ca_pem) = cluster_of(kubeconfig, &self.endpoint)?;
        let pin =
            Pin::of_certificate(ca_pem.as_bytes()).map_err(|detail| DiscoveryError::Invalid {
                endpoint: self.endpoint.clone(),
                detail,
            })?;
        if !self.pins.is_empty() && !self.pins.contains(&pin) {
            return Err(DiscoveryError::PinMismatch {
                actual: pin.to_string().trim_start_matches("sha256:").to_owned(),
                expected: self
                    .pins
                    .iter()
                    .map(Pin::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok((server, ca_pem, pin))
    }

    /// Runs discovery: retries while the API is unreachable, cluster-info is missing or not yet
    /// signed for this token, up to `timeout`; fails at once on a bad signature, a pin mismatch
    /// or a skewed clock.
    pub async fn run(&self) -> Result<Discovered, DiscoveryError> {
        if self.pins.is_empty() && !self.unsafe_skip_ca_verification {
            return Err(DiscoveryError::NoPin);
        }
        let url = endpoint_url(&self.endpoint);
        let insecure =
            anonymous_client(&url, None).map_err(|cause| DiscoveryError::Unreachable {
                endpoint: self.endpoint.clone(),
                cause,
            })?;
        let began = tokio::time::Instant::now();
        let key = format!("jws-kubeconfig-{}", self.token.id);
        let (kubeconfig, jws) = loop {
            let outcome = fetch(&insecure, &self.endpoint).await;
            let retryable = match outcome {
                Ok((data, date)) => {
                    if let Some(date) = &date {
                        check_clock(date, SystemTime::now())?;
                    }
                    let kubeconfig = data.get("kubeconfig").and_then(|k| k.as_str());
                    match (kubeconfig, data.get(&key).and_then(|j| j.as_str())) {
                        (Some(kubeconfig), Some(jws)) => {
                            break (kubeconfig.to_owned(), jws.to_owned());
                        }
                        _ => DiscoveryError::JwsMissing {
                            endpoint: self.endpoint.clone(),
                            id: self.token.id.clone(),
                            waited: began.elapsed(),
                        },
                    }
                }
                Err(
                    error @ (DiscoveryError::Unreachable { .. }
                    | DiscoveryError::Http { status: 404, .. }),
                ) => error,
                Err(error) => return Err(error),
            };
            if began.elapsed() >= self.timeout {
                return Err(match retryable {
                    DiscoveryError::JwsMissing { endpoint, id, .. } => DiscoveryError::JwsMissing {
                        endpoint,
                        id,
                        waited: began.elapsed(),
                    },
                    other => other,
                });
            }
            tracing::info!(reason = %retryable, "discovery is not done yet; retrying");
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        let (server, ca_pem, pin) = self.verify(&kubeconfig, &jws)?;
        // Again, now trusting only that CA: the same cluster-info must come back.
        let secure =
            anonymous_client(&url, Some(&ca_pem)).map_err(|cause| DiscoveryError::Invalid {
                endpoint: self.endpoint.clone(),
                detail: cause,
            })?;
        let (again, _) = fetch(&secure, &self.endpoint).await.map_err(|error| match error {
            DiscoveryError::Unreachable { endpoint, cause } => DiscoveryError::Invalid {
                endpoint,
                detail: format!(
                    "the server's certificate does not verify against the CA it published ({cause}); is the endpoint one of the names or addresses in the API server's certificate?"
                ),
            },
            other => other,
        })?;
        if again.get("kubeconfig").and_then(|k| k.as_str()) != Some(kubeconfig.as_str()) {
            return Err(DiscoveryError::Invalid {
                endpoint: self.endpoint.clone(),
                detail: "it changed between the unverified and the CA-verified read; try again"
                    .into(),
            });
        }
        // A loopback address in cluster-info names the control plane's own machine, never this
        // one's way there: the endpoint the operator gave is.
        let server = if loopback(&server) && !loopback(&url) {
            tracing::info!(%server, endpoint = %url, "cluster-info names a loopback server; using the join endpoint");
            url
        } else {
            server
        };
        Ok(Discovered {
            server,
            ca_pem,
            pin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        "abcdef.0123456789abcdef".parse().unwrap()
    }

    #[test]
    fn tokens_parse_and_malformed_ones_are_refused_without_echoing_the_secret() {
        assert_eq!(token().id, "abcdef");
        assert_eq!(token().bearer(), "abcdef.0123456789abcdef");
        for bad in [
            "abcdef0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdef0",
            "abc-ef.0123456789abcdef",
        ] {
            let error = bad.parse::<Token>().unwrap_err().to_string();
            assert!(
                error.starts_with("malformed bootstrap token"),
                "{bad}: {error}"
            );
            assert!(!error.contains("0123456789abcde"), "{error}");
        }
    }

    #[test]
    fn pins_parse_from_sha256_hex() {
        let pin: Pin = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(pin.to_string(), format!("sha256:{}", "ab".repeat(32)));
        for bad in [
            "ab".repeat(32),
            format!("sha256:{}", "ab".repeat(31)),
            "sha256:xyz".into(),
            format!("md5:{}", "ab".repeat(32)),
        ] {
            assert!(
                matches!(bad.parse::<Pin>(), Err(DiscoveryError::MalformedPin(_))),
                "{bad}"
            );
        }
    }

    // The signer's output for ("hello", abcdef, 0123456789abcdef), computed independently with
    // python3's hmac/hashlib/base64 modules.
    const SIGNED_HELLO: &str =
        "eyJhbGciOiJIUzI1NiIsImtpZCI6ImFiY2RlZiJ9..MxsnbCjBaYzcbNIFa06F-wuF9LX26rhMlrL4zA1511s";

    #[test]
    fn a_detached_jws_verifies_with_the_right_secret_only() {
        verify_detached_jws(SIGNED_HELLO, "hello", &token()).unwrap();
        let wrong_secret: Token = "abcdef.0123456789abcdeg".parse().unwrap();
        assert!(matches!(
            verify_detached_jws(SIGNED_HELLO, "hello", &wrong_secret),
            Err(DiscoveryError::JwsMismatch { .. })
        ));
        assert!(verify_detached_jws(SIGNED_HELLO, "hello!", &token()).is_err());
        // The header must name the token: a signature made for another id is refused.
        let other: Token = "abcdeg.0123456789abcdef".parse().unwrap();
        assert!(verify_detached_jws(SIGNED_HELLO, "hello", &other).is_err());
        assert!(verify_detached_jws("not-a-jws", "hello", &token()).is_err());
    }

    #[test]
    fn the_pin_is_the_hash_of_the_subject_public_key_info() {
        use rcgen::PublicKeyData;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pin = Pin::of_certificate(cert.pem().as_bytes()).unwrap();
        // `openssl x509 -pubkey | openssl pkey -pubin -outform der | sha256sum`: the SPKI DER,
        // which rcgen builds on its own.
        assert_eq!(
            pin.0,
            <[u8; 32]>::from(Sha256::digest(key.subject_public_key_info()))
        );
    }

    #[test]
    fn clocks_more_than_five_minutes_apart_are_refused() {
        let server = "Sun, 22 Nov 2026 10:00:00 GMT";
        let at = httpdate::parse_http_date(server).unwrap();
        check_clock(server, at + Duration::from_secs(299)).unwrap();
        check_clock(server, at - Duration::from_secs(299)).unwrap();
        let ahead = check_clock(server, at + Duration::from_secs(3600))
            .unwrap_err()
            .to_string();
        assert!(ahead.contains("3600 s ahead of"), "{ahead}");
        let behind = check_clock(server, at - Duration::from_secs(600))
            .unwrap_err()
            .to_string();
        assert!(behind.contains("600 s behind"), "{behind}");
    }

    #[test]
    fn a_cluster_info_kubeconfig_without_a_server_is_refused() {
        for server in ["", "server: ''", "server: '  '"] {
            let kubeconfig = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    {server}\n    certificate-authority-data: eA==\n"
            );
            let error = cluster_of(&kubeconfig, "192.0.2.1:6443").unwrap_err();
            assert!(error.to_string().contains("has no server"), "{error}");
        }
    }

    #[test]
    fn loopback_servers_are_recognised() {
        assert!(loopback("https://127.0.0.1:6443"));
        assert!(loopback("https://localhost:6443"));
        assert!(loopback("https://[::1]:6443"));
        assert!(!loopback("https://10.0.0.5:6443"));
        assert!(!loopback("https://cp.example:6443"));
    }
}
