//! A client for the OCI distribution API (Docker Registry HTTP API v2): manifests (OCI and
//! Docker, lists and indexes) and blobs, with bearer-token and basic authentication, plain HTTP
//! only for registries configured as insecure, and mirrors tried before the registry itself.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, WWW_AUTHENTICATE};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::reference::Reference;

/// Media types of manifests and indexes, in the order a client prefers them.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Credentials for one pull (the CRI's `AuthConfig`).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// User name for basic auth (or for the token endpoint).
    pub username: String,
    /// Password.
    pub password: String,
    /// A pre-obtained bearer token (`registry_token`/`identity_token`).
    pub token: String,
}

/// Where registries are reached.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host:port`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Per-registry mirrors (endpoint URLs), tried in order before the registry itself.
    pub mirrors: HashMap<String, Vec<String>>,
}

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image or blob does not exist (404). Not retryable.
    #[error("{what}: not found")]
    NotFound {
        /// What was asked for.
        what: String,
    },
    /// Credentials were missing or refused (401/403). Not retryable without other credentials.
    #[error("{what}: access denied: {detail}")]
    Denied {
        /// What was asked for.
        what: String,
        /// The registry's answer.
        detail: String,
    },
    /// The registry answered something else. Retryable.
    #[error("{what}: the registry answered {status}: {body}")]
    Status {
        /// What was asked for.
        what: String,
        /// HTTP status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
    /// The registry could not be reached. Retryable.
    #[error("{what}: {source}")]
    Transport {
        /// What was asked for.
        what: String,
        /// The HTTP error.
        #[source]
        source: reqwest::Error,
    },
    /// The content is not what was asked for (wrong digest, unparseable manifest). Not retryable.
    #[error("{what}: {detail}")]
    Invalid {
        /// What was asked for.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

/// A registry client.
#[derive(Debug, Clone)]
pub struct Registry {
    http: reqwest::Client,
    config: Arc<RegistryConfig>,
}

/// A descriptor (OCI image spec).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// Digest.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// A platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// OS (`linux`).
    pub os: String,
}

/// A manifest or index, whichever the registry returned.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Media type (also from the response's Content-Type when absent).
    #[serde(default)]
    pub media_type: String,
    /// Config (manifests).
    pub config: Option<Descriptor>,
    /// Layers (manifests).
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Entries (indexes).
    pub manifests: Option<Vec<Descriptor>>,
}

/// This machine's platform in OCI terms.
pub fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    Platform {
        architecture: architecture.to_owned(),
        os: "linux".to_owned(),
    }
}

fn tls_config() -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl Registry {
    /// A client with the system's trust roots.
    pub fn new(config: RegistryConfig) -> Registry {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config())
            .user_agent(concat!("tug/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("the HTTP client builds");
        Registry {
            http,
            config: Arc::new(config),
        }
    }

    /// Endpoints to try for `registry`: its mirrors, then itself.
    fn endpoints(&self, registry: &str) -> Vec<String> {
        let mut endpoints = self
            .config
            .mirrors
            .get(registry)
            .cloned()
            .unwrap_or_default();
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let scheme = if self.config.insecure.iter().any(|r| r == registry) {
            "http"
        } else {
            "https"
        };
        endpoints.push(format!("{scheme}://{host}"));
        endpoints
    }

    /// GETs `path` on the first endpoint of `reference`'s registry that answers, with auth.
    async fn get(
        &self,
        reference: &Reference,
        path: &str,
        accept: &str,
        credentials: &Credentials,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut last = None;
        for endpoint in self.endpoints(&reference.registry) {
            let url = format!("{endpoint}/v2/{}/{path}", reference.repository);
            // A mirror's failure falls through to the next endpoint; the registry's is final.
            match self
                .get_with_auth(&url, accept, reference, credentials, what)
                .await
            {
                Ok(response) => return Ok(response),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least the registry itself is an endpoint"))
    }

    async fn get_with_auth(
        &self,
        url: &str,
        accept: &str,
        reference: &Reference,
        credentials: &Credentials,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let transport = |source| RegistryError::Transport {
            what: what.to_owned(),
            source,
        };
        let mut request = self.http.get(url).header(ACCEPT, accept);
        if !credentials.token.is_empty() {
            request = request.bearer_auth(&credentials.token);
        }
        let response = request.send().await.map_err(transport)?;
        let response = if response.status() == StatusCode::UNAUTHORIZED {
            let authorization = self
                .authorize(response.headers(), reference, credentials, what)
                .await?;
            self.http
                .get(url)
                .header(ACCEPT, accept)
                .header(AUTHORIZATION, authorization)
                .send()
                .await
                .map_err(transport)?
        } else {
            response
        };
        match response.status() {
            s if s.is_success() => Ok(response),
            StatusCode::NOT_FOUND => Err(RegistryError::NotFound {
                what: what.to_owned(),
            }),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(RegistryError::Denied {
                what: what.to_owned(),
                detail: response
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect(),
            }),
            status => Err(RegistryError::Status {
                what: what.to_owned(),
                status,
                body: response
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect(),
            }),
        }
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token from the realm.
    async fn authorize(
        &self,
        headers: &HeaderMap,
        reference: &Reference,
        credentials: &Credentials,
        what: &str,
    ) -> Result<String, RegistryError> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let basic = || {
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", credentials.username, credentials.password))
        };
        if challenge.to_ascii_lowercase().starts_with("basic") {
            return Ok(format!("Basic {}", basic()));
        }
        let params = parse_challenge(&challenge);
        let realm = params.get("realm").ok_or_else(|| RegistryError::Denied {
            what: what.to_owned(),
            detail: format!("unsupported authentication challenge {challenge:?}"),
        })?;
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", reference.repository));
        let mut request = self.http.get(realm).query(&[("scope", scope.as_str())]);
        if let Some(service) = params.get("service") {
            request = request.query(&[("service", service.as_str())]);
        }
        if !credentials.username.is_empty() {
            request = request.header(AUTHORIZATION, format!("Basic {}", basic()));
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let response = request
            .send()
            .await
            .map_err(|source| RegistryError::Transport {
                what: format!("{what} (token from {realm})"),
                source,
            })?;
        if !response.status().is_success() {
            return Err(RegistryError::Denied {
                what: what.to_owned(),
                detail: format!(
                    "the token service at {realm} answered {}",
                    response.status()
                ),
            });
        }
        let token: Token = response
            .json()
            .await
            .map_err(|source| RegistryError::Transport {
                what: format!("{what} (token from {realm})"),
                source,
            })?;
        let token = token
            .token
            .or(token.access_token)
            .ok_or_else(|| RegistryError::Denied {
                what: what.to_owned(),
                detail: format!("the token service at {realm} returned no token"),
            })?;
        Ok(format!("Bearer {token}"))
    }

    /// The manifest for `reference`'s tag or digest, resolved through an index to this
    /// platform's manifest: (descriptor of the top-level object, its bytes, and the manifest).
    pub async fn resolve(
        &self,
        reference: &Reference,
        credentials: &Credentials,
    ) -> Result<Resolved, RegistryError> {
        let what = format!("manifest {}", reference.name());
        let (top, top_bytes) = self
            .fetch_manifest(reference, reference.manifest_ref(), credentials, &what)
            .await?;
        if let Some(expected) = &reference.digest
            && top.digest != *expected
        {
            return Err(RegistryError::Invalid {
                what,
                detail: format!("the registry served {} for {expected}", top.digest),
            });
        }
        let parsed: Manifest =
            serde_json::from_slice(&top_bytes).map_err(|e| RegistryError::Invalid {
                what: what.clone(),
                detail: format!("unparseable manifest: {e}"),
            })?;
        let Some(entries) = parsed.manifests else {
            return Ok(Resolved {
                index: None,
                manifest: (top, top_bytes),
                parsed,
            });
        };
        let platform = host_platform();
        let entry = entries
            .iter()
            .find(|e| {
                e.platform
                    .as_ref()
                    .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
            })
            .ok_or_else(|| RegistryError::NotFound {
                what: format!("{what} for {}/{}", platform.os, platform.architecture),
            })?
            .clone();
        let (descriptor, bytes) = self
            .fetch_manifest(reference, &entry.digest, credentials, &what)
            .await?;
        if descriptor.digest != entry.digest {
            return Err(RegistryError::Invalid {
                what,
                detail: format!(
                    "the index names {} but the registry served {}",
                    entry.digest, descriptor.digest
                ),
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::Invalid {
                what: what.clone(),
                detail: format!("unparseable manifest: {e}"),
            })?;
        Ok(Resolved {
            index: Some((top, top_bytes)),
            manifest: (descriptor, bytes),
            parsed: manifest,
        })
    }

    async fn fetch_manifest(
        &self,
        reference: &Reference,
        tag_or_digest: &str,
        credentials: &Credentials,
        what: &str,
    ) -> Result<(Descriptor, Vec<u8>), RegistryError> {
        let response = self
            .get(
                reference,
                &format!("manifests/{tag_or_digest}"),
                &MANIFEST_TYPES.join(", "),
                credentials,
                what,
            )
            .await?;
        let media_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| RegistryError::Transport {
                what: what.to_owned(),
                source,
            })?
            .to_vec();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if tag_or_digest.starts_with("sha256:") && tag_or_digest != digest {
            return Err(RegistryError::Invalid {
                what: what.to_owned(),
                detail: format!("content digest {digest} does not match {tag_or_digest}"),
            });
        }
        let declared: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let media_type = declared["mediaType"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or(media_type);
        Ok((
            Descriptor {
                media_type,
                digest,
                size: bytes.len() as i64,
                platform: None,
            },
            bytes,
        ))
    }

    /// A blob's body, to stream.
    pub async fn blob(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        credentials: &Credentials,
    ) -> Result<reqwest::Response, RegistryError> {
        self.get(
            reference,
            &format!("blobs/{}", descriptor.digest),
            "*/*",
            credentials,
            &format!("blob {} of {}", descriptor.digest, reference.name()),
        )
        .await
    }
}

/// A resolved image: the index (if the tag named one) and this platform's manifest.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The index or manifest list, with its bytes.
    pub index: Option<(Descriptor, Vec<u8>)>,
    /// The manifest, with its bytes.
    pub manifest: (Descriptor, Vec<u8>),
    /// The manifest, parsed.
    pub parsed: Manifest,
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
fn parse_challenge(challenge: &str) -> HashMap<String, String> {
    let rest = challenge.split_once(' ').map_or("", |(_, rest)| rest);
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_owned();
        let (value, remaining) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.split_once('"') {
                Some((value, remaining)) => (value.to_owned(), remaining),
                None => (quoted.to_owned(), ""),
            },
            None => match after.split_once(',') {
                Some((value, remaining)) => (value.to_owned(), remaining),
                None => (after.to_owned(), ""),
            },
        };
        params.insert(key, value);
        rest = remaining.trim_start_matches(',').trim();
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse() {
        let params = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(params["realm"], "https://auth.docker.io/token");
        assert_eq!(params["service"], "registry.docker.io");
        assert_eq!(params["scope"], "repository:library/busybox:pull");
    }

    #[test]
    fn mirrors_come_first_and_insecure_registries_use_http() {
        let registry = Registry::new(RegistryConfig {
            insecure: vec!["127.0.0.1:5000".into()],
            mirrors: HashMap::from([("docker.io".into(), vec!["http://mirror.local:5000".into()])]),
        });
        assert_eq!(
            registry.endpoints("docker.io"),
            ["http://mirror.local:5000", "https://registry-1.docker.io"]
        );
        assert_eq!(
            registry.endpoints("127.0.0.1:5000"),
            ["http://127.0.0.1:5000"]
        );
        assert_eq!(registry.endpoints("quay.io"), ["https://quay.io"]);
    }
}
