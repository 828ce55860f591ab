//! What every API-watching component starts with: its node name and an API client from a
//! kubeconfig file.
//!
//! A kubeconfig whose user names certificate or key *files* (the node's kubeconfig names
//! `/var/lib/kubelet/pki/kubelet-client-current.pem`) gets a client that follows those files:
//! when the kubelet rotates its client certificate, each tug service opens its next
//! connections with the new one, and the old connections are let go once their requests
//! finish, so no service keeps presenting a certificate that is about to expire (upstream's
//! client-go does the same for kubeconfigs that name certificate files).
//!
//! Every such client's connections can also be closed all at once ([`Connections`]): requests
//! waiting on a connection to an API server that stopped answering without a reset (a
//! partition, a host gone) fail at once and start over on a fresh connection, instead of
//! waiting out TCP's retransmissions for minutes. The kubelet does this when its heartbeat
//! fails, as upstream's does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper_util::client::legacy::connect::HttpConnector;
use kube::client::{Body, ConfigExt};
use std::future::Future as _;

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
    Ok(closable_client(path).await?.0)
}

/// [`client`], with the handle that closes all its connections.
pub async fn closable_client(path: &Path) -> anyhow::Result<(kube::Client, Connections)> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("read kubeconfig {}", path.display()))?;
    from_kubeconfig(kubeconfig)
        .await
        .with_context(|| format!("kubeconfig {}", path.display()))
}

/// An API client from kubeconfig YAML.
pub async fn client_from_yaml(yaml: &str) -> anyhow::Result<kube::Client> {
    Ok(
        from_kubeconfig(kube::config::Kubeconfig::from_yaml(yaml).context("parse the kubeconfig")?)
            .await?
            .0,
    )
}

async fn from_kubeconfig(
    kubeconfig: kube::config::Kubeconfig,
) -> anyhow::Result<(kube::Client, Connections)> {
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .context("load the kubeconfig")?;
    let mut files: Vec<PathBuf> = [
        &config.auth_info.client_certificate,
        &config.auth_info.client_key,
    ]
    .into_iter()
    .flatten()
    .map(PathBuf::from)
    .collect();
    files.dedup();
    let connections = Connections::default();
    if config.proxy_url.is_some() {
        // Through an HTTP proxy: kube's own stack, which speaks to proxies.
        let client = kube::Client::try_from(config).context("build the API client")?;
        return Ok((client, connections));
    }
    let client = following_files(config, files, connections.clone())?;
    Ok((client, connections))
}

/// Closes every connection of the clients it was made with ([`closable_client`]): what is
/// waiting on one (a request, a watch, a connect) fails with `ConnectionAborted` at once, and
/// what comes next opens a fresh one.
#[derive(Clone, Default)]
pub struct Connections {
    current: Arc<Mutex<tokio_util::sync::CancellationToken>>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connections")
    }
}

impl Connections {
    /// Closes every connection opened (or being opened) so far.
    pub fn close_all(&self) {
        let mut current = self.current.lock().expect("connections lock");
        current.cancel();
        *current = tokio_util::sync::CancellationToken::new();
    }

    /// What a new connection is closed by.
    fn token(&self) -> tokio_util::sync::CancellationToken {
        self.current.lock().expect("connections lock").clone()
    }
}

/// The TCP connector under the TLS one, whose connections [`Connections::close_all`] closes.
#[derive(Clone)]
struct Closable {
    inner: HttpConnector,
    connections: Connections,
}

fn closed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "connection closed: the API server stopped answering on it",
    )
}

impl tower::Service<http::Uri> for Closable {
    type Response = ClosableStream;
    type Error = tower::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<ClosableStream, tower::BoxError>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let token = self.connections.token();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            tokio::select! {
                stream = connecting => Ok(ClosableStream {
                    inner: stream?,
                    closed: Box::pin(token.cancelled_owned()),
                }),
                () = token.clone().cancelled_owned() => Err(closed().into()),
            }
        })
    }
}

/// A TCP connection that fails every read and write once its token is cancelled.
struct ClosableStream {
    inner: hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    closed: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl ClosableStream {
    /// Whether it was closed; if not, the task is woken when it is.
    fn is_closed(&mut self, cx: &mut TaskContext<'_>) -> bool {
        self.closed.as_mut().poll(cx).is_ready()
    }
}

impl hyper::rt::Read for ClosableStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.is_closed(cx) {
            return Poll::Ready(Err(closed()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ClosableStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_closed(cx) {
            return Poll::Ready(Err(closed()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.is_closed(cx) {
            return Poll::Ready(Err(closed()));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl hyper_util::client::legacy::connect::Connection for ClosableStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected()
    }
}

/// How long an API connection idles before TCP keepalive probes it.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// How often the certificate files are looked at (on a request, at most this often).
const RECHECK: Duration = Duration::from_secs(1);

/// A file's identity and version, following links (a rotation replaces a link).
type Stamp = Option<(u64, u64, i64, i64, u64)>;

fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|file| {
            std::fs::metadata(file)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
        })
        .collect()
}

type Pool = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<Closable>, Body>;

/// The HTTP client under the API client: one connection pool per certificate version.
#[derive(Clone)]
struct FollowingFiles {
    shared: Arc<Shared>,
}

struct Shared {
    config: kube::Config,
    files: Vec<PathBuf>,
    connections: Connections,
    state: Mutex<State>,
}

struct State {
    pool: Pool,
    stamps: Vec<Stamp>,
    checked: Instant,
}

fn pool(config: &kube::Config, connections: &Connections) -> anyhow::Result<Pool> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    // A watch idles for as long as nothing changes: without keepalive, a connection to an API
    // server that vanished without a reset (a partition, a crashed host) would look alive until
    // the watch's own timeout, minutes later. Probed after 30 s idle, every 10 s, it is given up
    // within a minute and the watch resumes on a new one (client-go's HTTP/2 health check
    // takes 45 s).
    http.set_keepalive(Some(KEEPALIVE_IDLE));
    http.set_keepalive_interval(Some(Duration::from_secs(10)));
    http.set_keepalive_retries(Some(3));
    let closable = Closable {
        inner: http,
        connections: connections.clone(),
    };
    let https = config
        .rustls_https_connector_with_connector(closable)
        .context("the TLS client configuration")?;
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

impl Shared {
    /// The pool for the certificate files as they are now.
    fn pool(&self) -> Pool {
        let mut state = self.state.lock().expect("client state lock");
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let now = stamps(&self.files);
            if now != state.stamps {
                state.stamps = now;
                match pool(&self.config, &self.connections) {
                    Ok(pool) => {
                        tracing::info!(files = ?self.files, "the client certificate changed: new connections use it");
                        state.pool = pool;
                    }
                    Err(error) => {
                        tracing::warn!(files = ?self.files, error = format!("{error:#}"), "the client certificate changed but cannot be used; keeping the previous one");
                    }
                }
            }
        }
        state.pool.clone()
    }
}

impl tower::Service<http::Request<Body>> for FollowingFiles {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.shared.pool().request(request)
    }
}

/// kube's own client stack (base URI, retries, auth, extra headers) over [`FollowingFiles`].
fn following_files(
    config: kube::Config,
    files: Vec<PathBuf>,
    connections: Connections,
) -> anyhow::Result<kube::Client> {
    let state = State {
        pool: pool(&config, &connections)?,
        stamps: stamps(&files),
        checked: Instant::now(),
    };
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| {
            tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry())
        }))
        .option_layer(
            config
                .auth_layer()
                .context("the kubeconfig's credentials")?,
        )
        .layer(
            config
                .extra_headers_layer()
                .context("the kubeconfig's impersonation headers")?,
        )
        .map_err(tower::BoxError::from)
        .service(FollowingFiles {
            shared: Arc::new(Shared {
                files,
                state: Mutex::new(state),
                config: config.clone(),
                connections,
            }),
        });
    Ok(kube::Client::new(service, config.default_namespace))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use base64::Engine;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn signed(issuer: &Issuer<'_, KeyPair>, cn: &str, server: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(if server {
            vec!["127.0.0.1".to_owned()]
        } else {
            vec![]
        })
        .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// An HTTPS server that wants a client certificate from `ca` and answers every request
    /// (keeping connections alive) with the common name the connection presented.
    async fn whoami_server(ca: &str, cert: &str, key: &str) -> u16 {
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certificates(ca) {
            roots.add(c).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(pem_certificates(cert), key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                    let (_, parsed) = x509_parser::parse_x509_certificate(&presented).unwrap();
                    let cn = parsed
                        .subject()
                        .iter_common_name()
                        .next()
                        .and_then(|c| c.as_str().ok())
                        .unwrap()
                        .to_owned();
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 4096];
                    loop {
                        match tls.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            head.clear();
                            let reply = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{cn}",
                                cn.len()
                            );
                            tls.write_all(reply.as_bytes()).await.unwrap();
                        }
                    }
                });
            }
        });
        port
    }

    fn pem_certificates(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[tokio::test]
    async fn a_rotated_client_certificate_is_used_from_the_next_connection_on() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test-ca");
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let (server_cert, server_key) = signed(&issuer, "apiserver", true);
        let port = whoami_server(&ca_pem, &server_cert, &server_key).await;

        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = signed(&issuer, "system:node:before", false);
        let current =
            tug_kubelet::bootstrap::store_pair(dir.path(), "kubelet-client", &cert, &key).unwrap();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    client-certificate: {current}\n    client-key: {current}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
            base64::engine::general_purpose::STANDARD.encode(&ca_pem),
            current = current.display()
        );
        let client = client_from_yaml(&kubeconfig).await.unwrap();
        let whoami = || {
            let client = client.clone();
            async move {
                client
                    .request_text(http::Request::get("/whoami").body(Vec::new()).unwrap())
                    .await
                    .unwrap()
            }
        };
        assert_eq!(whoami().await, "system:node:before");
        assert_eq!(
            whoami().await,
            "system:node:before",
            "the same identity until a rotation"
        );

        // The kubelet's rotation: a new pair, and the link moved to it.
        let (cert, key) = signed(&issuer, "system:node:after", false);
        tug_kubelet::bootstrap::store_pair(dir.path(), "kubelet-client", &cert, &key).unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(200)).await;
        assert_eq!(
            whoami().await,
            "system:node:after",
            "the client still presents the replaced certificate"
        );

        // A broken file keeps the identity that works.
        std::fs::write(dir.path().join("broken.pem"), "not a certificate").unwrap();
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink(dir.path().join("broken.pem"), &current).unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(200)).await;
        assert_eq!(whoami().await, "system:node:after");
    }

    /// An API server that takes the first connection's request and never answers it (as one
    /// behind a partition), and answers on every later connection.
    async fn silent_first_server() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let silent = std::mem::take(&mut first);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 4096];
                    loop {
                        match socket.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                        if head.windows(4).any(|w| w == b"\r\n\r\n") && !silent {
                            head.clear();
                            let reply = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                            socket.write_all(reply.as_bytes()).await.unwrap();
                        }
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn closing_all_connections_fails_a_request_stuck_on_one_and_the_next_uses_a_fresh_one() {
        let port = silent_first_server().await;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n"
        );
        let (client, connections) =
            from_kubeconfig(kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap())
                .await
                .unwrap();
        let get = || {
            let client = client.clone();
            async move {
                client
                    .request_text(http::Request::get("/healthz").body(Vec::new()).unwrap())
                    .await
            }
        };
        let stuck = tokio::spawn(get());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stuck.is_finished(), "the silent server answered?");
        let closed_at = Instant::now();
        connections.close_all();
        let error = tokio::time::timeout(Duration::from_secs(5), stuck)
            .await
            .expect("the stuck request still waits after its connection was closed")
            .unwrap()
            .unwrap_err();
        assert!(
            closed_at.elapsed() < Duration::from_secs(1),
            "{:?}",
            closed_at.elapsed()
        );
        let chain = format!("{:?}", anyhow::Error::from(error));
        assert!(
            chain.contains("connection closed: the API server stopped answering on it"),
            "{chain}"
        );
        assert_eq!(get().await.unwrap(), "ok");
    }
}
