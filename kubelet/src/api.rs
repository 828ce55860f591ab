//! The kubelet API on its secure port (10250): TLS with a serving certificate, every request
//! authenticated (client certificate from the client CA, or a bearer token checked with a
//! TokenReview; anonymous requests refused unless enabled) and authorized with a
//! SubjectAccessReview on the Node's subresource, as upstream does (`nodes/proxy`, `nodes/log`,
//! `nodes/stats`, `nodes/metrics`, `nodes/spec`, with `nodes/healthz` and `nodes/pods` tried
//! first and `nodes/proxy` as the fallback).
//!
//! Routes: `/healthz`, `/pods`, `/spec`, `/stats/summary`, `/metrics`, `/metrics/probes`,
//! `/metrics/resource`, `/containerLogs/{namespace}/{pod}/{container}`, and the
//! streaming routes `/exec/{namespace}/{pod}/{container}`, `/attach/…` and
//! `/portForward/{namespace}/{pod}`, which ask the CRI runtime for a streaming URL and proxy
//! the client's upgraded connection to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tug_streaming::upgrade::{Request, read_request};

use crate::pods::worker::Shared;

/// The Prometheus text format's content type.
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How requests are authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization {
    /// SubjectAccessReview against the API server (upstream's `Webhook`).
    Webhook,
    /// Every authenticated request is allowed.
    AlwaysAllow,
}

/// The API's configuration.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// Where the serving certificate comes from.
    pub serving: Serving,
    /// CA bundle that signs client certificates; none: client certificates are not accepted.
    pub client_ca_file: Option<PathBuf>,
    /// Bearer tokens checked with TokenReview.
    pub webhook_authentication: bool,
    /// Let unauthenticated requests through as `system:anonymous` (off by default).
    pub anonymous: bool,
    /// Authorization mode.
    pub authorization: Authorization,
}

/// Where the API's serving certificate comes from.
#[derive(Debug, Clone)]
pub enum Serving {
    /// PEM files (`tlsCertFile`, `tlsPrivateKeyFile`, or the self-signed pair).
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// Its key.
        key: PathBuf,
    },
    /// Issued by the cluster and rotated (`serverTLSBootstrap`).
    Bootstrap(crate::rotation::Managed),
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User name.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
}

/// The verb and Node subresources (in the order tried) a request needs.
pub fn attributes(method: &str, path: &str) -> (&'static str, Vec<&'static str>) {
    let verb = match method {
        "GET" | "HEAD" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "",
    };
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    let subresources = if under("/stats") {
        vec!["stats"]
    } else if under("/metrics") {
        vec!["metrics"]
    } else if under("/logs") {
        vec!["log"]
    } else if under("/spec") {
        vec!["spec"]
    } else if under("/healthz") {
        vec!["healthz", "proxy"]
    } else if under("/pods") {
        vec!["pods", "proxy"]
    } else {
        vec!["proxy"]
    };
    (verb, subresources)
}

/// Creates a self-signed serving certificate for `names` unless `cert`/`key` exist (upstream
/// writes `kubelet.crt` and `kubelet.key` in its cert dir the same way).
pub fn ensure_serving_cert(cert: &Path, key: &Path, names: &[String]) -> std::io::Result<()> {
    if cert.exists() && key.exists() {
        return Ok(());
    }
    let generated = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| std::io::Error::other(format!("generate the serving certificate: {e}")))?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::bootstrap::write_private(key, generated.signing_key.serialize_pem().as_bytes())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    std::fs::write(cert, generated.cert.pem())?;
    Ok(())
}

fn pem_certs(path: &Path) -> std::io::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
    rustls_pemfile::certs(&mut reader).collect()
}

/// The TLS configuration: the serving certificate from `serving`, and client certificates from
/// the CA when one is configured (optional: a request may authenticate with a token instead).
pub fn tls(
    config: &ApiConfig,
    serving: Arc<crate::serving::ServingCert>,
) -> std::io::Result<rustls::ServerConfig> {
    let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        std::io::Error::other(format!("{what} {}: {e}", path.display()))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?;
    let builder = match &config.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in pem_certs(ca).map_err(|e| bad("read the client CA", ca, &e))? {
                roots
                    .add(cert)
                    .map_err(|e| bad("use the client CA", ca, &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad("use the client CA", ca, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_cert_resolver(serving);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The user a verified client certificate names: CN, and O as groups.
fn certificate_user(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    Some(User { name, groups })
}

/// Why a request is refused.
#[derive(Debug)]
enum Refusal {
    Unauthorized(String),
    Forbidden(String),
    Unavailable(String),
}

/// Runs the API until the task is aborted.
pub async fn serve(
    config: ApiConfig,
    tls: rustls::ServerConfig,
    client: Option<kube::Client>,
    node_name: String,
    shared: Arc<Shared>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(config.address)
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("the kubelet API on {}: {e}", config.address),
            )
        })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let config = Arc::new(config);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((conn, peer)) = listener.accept().await else {
                continue;
            };
            let (acceptor, config, client, node_name, shared) = (
                acceptor.clone(),
                config.clone(),
                client.clone(),
                node_name.clone(),
                shared.clone(),
            );
            tokio::spawn(async move {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(conn))
                        .await
                else {
                    return;
                };
                let user = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|der| certificate_user(der));
                if let Err(error) =
                    handle(stream, user, &config, client.as_ref(), &node_name, &shared).await
                {
                    tracing::debug!(%peer, %error, "kubelet API request failed");
                }
            });
        }
    }))
}

async fn authenticate(
    request: &Request,
    certificate: Option<User>,
    config: &ApiConfig,
    client: Option<&kube::Client>,
) -> Result<User, Refusal> {
    if let Some(user) = certificate {
        return Ok(user);
    }
    let bearer = request
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    if let Some(token) = bearer {
        let (true, Some(client)) = (config.webhook_authentication, client) else {
            return Err(Refusal::Unauthorized(
                "bearer tokens are not accepted (webhook authentication is off)".into(),
            ));
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthorized(
                status
                    .error
                    .unwrap_or_else(|| "the token is not valid".into()),
            ));
        }
        let user = status.user.unwrap_or_default();
        return Ok(User {
            name: user.username.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
        });
    }
    if config.anonymous {
        return Ok(User {
            name: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
        });
    }
    Err(Refusal::Unauthorized(
        "anonymous requests are not allowed: present a client certificate or a bearer token".into(),
    ))
}

async fn authorize(
    user: &User,
    request: &Request,
    config: &ApiConfig,
    client: Option<&kube::Client>,
    node_name: &str,
) -> Result<(), Refusal> {
    if config.authorization == Authorization::AlwaysAllow {
        return Ok(());
    }
    let Some(client) = client else {
        return Err(Refusal::Forbidden(
            "no API server to authorize against (standalone kubelet with Webhook authorization)"
                .into(),
        ));
    };
    let (verb, subresources) = attributes(&request.method, request.path());
    for subresource in &subresources {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    resource: Some("nodes".into()),
                    subresource: Some((*subresource).into()),
                    name: Some(node_name.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("SubjectAccessReview failed: {e}")))?;
        if reviewed.status.is_some_and(|s| s.allowed) {
            return Ok(());
        }
    }
    Err(Refusal::Forbidden(format!(
        "Forbidden (user={}, verb={verb}, resource=nodes, subresource({}))",
        user.name,
        subresources.join("|")
    )))
}

async fn respond<T: AsyncWrite + Unpin>(
    io: &mut T,
    status: &str,
    kind: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        body.len()
    );
    io.write_all(head.as_bytes()).await?;
    io.write_all(body).await?;
    io.shutdown().await
}

async fn handle<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
    certificate: Option<User>,
    config: &ApiConfig,
    client: Option<&kube::Client>,
    node_name: &str,
    shared: &Shared,
) -> std::io::Result<()> {
    let (request, mut io) =
        tokio::time::timeout(std::time::Duration::from_secs(10), read_request(io))
            .await
            .map_err(|_| std::io::Error::other("no request within 10 s"))??;
    let allowed = match authenticate(&request, certificate, config, client).await {
        Ok(user) => authorize(&user, &request, config, client, node_name).await,
        Err(refusal) => Err(refusal),
    };
    match allowed {
        Ok(()) => {}
        Err(Refusal::Unauthorized(why)) => {
            return respond(
                &mut io,
                "401 Unauthorized",
                "text/plain",
                format!("Unauthorized: {why}\n").as_bytes(),
            )
            .await;
        }
        Err(Refusal::Forbidden(why)) => {
            return respond(
                &mut io,
                "403 Forbidden",
                "text/plain",
                format!("{why}\n").as_bytes(),
            )
            .await;
        }
        Err(Refusal::Unavailable(why)) => {
            return respond(
                &mut io,
                "503 Service Unavailable",
                "text/plain",
                format!("{why}\n").as_bytes(),
            )
            .await;
        }
    }
    let path = request.path().to_owned();
    if ["/exec/", "/attach/", "/portForward/"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        return match streaming_url(&request, shared).await {
            Ok(url) => proxy_stream(io, &request, &url).await,
            Err((status, why)) => {
                respond(&mut io, status, "text/plain", format!("{why}\n").as_bytes()).await
            }
        };
    }
    if request.method != "GET" && request.method != "HEAD" {
        return respond(
            &mut io,
            "405 Method Not Allowed",
            "text/plain",
            b"only GET\n",
        )
        .await;
    }
    match path.as_str() {
        "/healthz" => respond(&mut io, "200 OK", "text/plain", b"ok").await,
        "/pods" | "/pods/" => {
            let body = crate::run::pod_list(shared);
            respond(&mut io, "200 OK", "application/json", body.as_bytes()).await
        }
        "/spec" | "/spec/" => {
            let body = crate::stats::machine_info(shared).to_string();
            respond(&mut io, "200 OK", "application/json", body.as_bytes()).await
        }
        "/metrics" => {
            let body = crate::metrics::kubelet_text(shared);
            respond(&mut io, "200 OK", PROMETHEUS, body.as_bytes()).await
        }
        "/metrics/probes" => {
            let body = shared
                .cri
                .metrics()
                .render(crate::metrics::Endpoint::Probes);
            respond(&mut io, "200 OK", PROMETHEUS, body.as_bytes()).await
        }
        "/stats/summary" | "/stats/summary/" | "/metrics/resource" => {
            match crate::stats::summary(shared).await {
                Ok(summary) if path == "/metrics/resource" => {
                    let body = crate::stats::resource_metrics(&summary);
                    respond(&mut io, "200 OK", PROMETHEUS, body.as_bytes()).await
                }
                Ok(summary) => {
                    let body = serde_json::to_vec_pretty(&summary).unwrap_or_default();
                    respond(&mut io, "200 OK", "application/json", &body).await
                }
                Err(why) => {
                    respond(
                        &mut io,
                        "500 Internal Server Error",
                        "text/plain",
                        format!("failed to get the stats summary: {why}\n").as_bytes(),
                    )
                    .await
                }
            }
        }
        _ if path.starts_with("/containerLogs/") => {
            let parts: Vec<&str> = path["/containerLogs/".len()..].split('/').collect();
            let [namespace, pod, container] = parts.as_slice() else {
                return respond(
                    &mut io,
                    "400 Bad Request",
                    "text/plain",
                    b"expected /containerLogs/{namespace}/{pod}/{container}\n",
                )
                .await;
            };
            match crate::pods::logs::read(shared, namespace, pod, container, &request.query()) {
                Ok(selected) if selected.options.follow => {
                    follow_logs(io, shared, namespace, pod, container, selected).await
                }
                Ok(selected) => respond(&mut io, "200 OK", "text/plain", &selected.body).await,
                Err(crate::pods::logs::LogError::NotFound(why)) => {
                    respond(
                        &mut io,
                        "404 Not Found",
                        "text/plain",
                        format!("{why}\n").as_bytes(),
                    )
                    .await
                }
                Err(crate::pods::logs::LogError::BadRequest(why)) => {
                    respond(
                        &mut io,
                        "400 Bad Request",
                        "text/plain",
                        format!("{why}\n").as_bytes(),
                    )
                    .await
                }
            }
        }
        _ => {
            respond(
                &mut io,
                "404 Not Found",
                "text/plain",
                b"404 page not found\n",
            )
            .await
        }
    }
}

/// `follow`: what was selected, then new output as it is written, until the container stops
/// or the client goes. The body ends with the connection.
async fn follow_logs<T: AsyncWrite + Unpin>(
    mut io: T,
    shared: &Shared,
    namespace: &str,
    pod: &str,
    container: &str,
    selected: crate::pods::logs::Selected,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    io.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
    )
    .await?;
    io.write_all(&selected.body).await?;
    io.flush().await?;
    let mut file = tokio::fs::File::open(&selected.file).await?;
    file.seek(std::io::SeekFrom::Start(selected.offset)).await?;
    let mut pending = Vec::new();
    let mut buffer = vec![0u8; 32 * 1024];
    let mut line_start = true;
    let mut idle = 0u32;
    loop {
        let n = file.read(&mut buffer).await?;
        if n == 0 {
            idle += 1;
            // Every second of quiet, check the container still runs.
            if idle.is_multiple_of(5)
                && !crate::pods::logs::running(shared, namespace, pod, container)
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        idle = 0;
        pending.extend_from_slice(&buffer[..n]);
        let (out, used) =
            crate::pods::logs::render_more(&pending, selected.options.timestamps, &mut line_start);
        pending.drain(..used);
        if !out.is_empty() {
            io.write_all(&out).await?;
            io.flush().await?;
        }
    }
    io.shutdown().await
}

/// A flag of a streaming request's query (`1` or `true`).
fn flag(query: &[(String, String)], name: &str) -> bool {
    query
        .iter()
        .any(|(k, v)| k == name && matches!(v.as_str(), "1" | "true" | "True"))
}

/// The UID of the pod `namespace`/`name` this kubelet runs (checked against `uid` when the
/// path gives one).
fn pod_uid(
    shared: &Shared,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
) -> Result<String, String> {
    let found = shared.pod(namespace, name).and_then(|p| p.metadata.uid);
    match (found, uid) {
        (Some(found), Some(uid)) if found != uid => Err(format!(
            "pod {namespace}/{name} on this node has UID {found}, not {uid}"
        )),
        (Some(found), _) => Ok(found),
        (None, _) => Err(format!("pod {namespace}/{name} is not on this node")),
    }
}

type Failure = (&'static str, String);

/// The CRI URL a streaming request (`/exec`, `/attach`, `/portForward`) is served at.
async fn streaming_url(request: &Request, shared: &Shared) -> Result<String, Failure> {
    use crate::pods::translate::{CONTAINER_NAME, POD_UID};
    let not_found = |m: String| ("404 Not Found", m);
    let unavailable = |m: String| ("503 Service Unavailable", m);
    let path = request.path();
    let mut parts = path.trim_start_matches('/').split('/');
    let kind = parts.next().unwrap_or_default().to_owned();
    let rest: Vec<&str> = parts.collect();
    let query = request.query();
    let mut cri = shared
        .cri
        .runtime()
        .await
        .map_err(|e| unavailable(format!("the container runtime: {e}")))?;
    if kind == "portForward" {
        let (namespace, name, uid) = match rest.as_slice() {
            [ns, pod] => (*ns, *pod, None),
            [ns, pod, uid] => (*ns, *pod, Some(*uid)),
            _ => {
                return Err((
                    "400 Bad Request",
                    "expected /portForward/{namespace}/{pod}".into(),
                ));
            }
        };
        let uid = pod_uid(shared, namespace, name, uid).map_err(not_found)?;
        let sandboxes = cri
            .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest {
                filter: Some(k8s_cri::v1::PodSandboxFilter {
                    label_selector: [(POD_UID.to_owned(), uid)].into(),
                    state: Some(k8s_cri::v1::PodSandboxStateValue { state: 0 }),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|e| unavailable(format!("ListPodSandbox: {}", e.message())))?
            .into_inner()
            .items;
        let sandbox = sandboxes
            .first()
            .ok_or_else(|| not_found(format!("pod {namespace}/{name} has no ready sandbox")))?;
        let ports = query
            .iter()
            .filter(|(k, _)| k == "port")
            .filter_map(|(_, v)| v.parse().ok())
            .collect();
        return cri
            .port_forward(k8s_cri::v1::PortForwardRequest {
                pod_sandbox_id: sandbox.id.clone(),
                port: ports,
            })
            .await
            .map(|r| r.into_inner().url)
            .map_err(|e| unavailable(format!("PortForward: {}", e.message())));
    }
    let (namespace, name, uid, container) = match rest.as_slice() {
        [ns, pod, container] => (*ns, *pod, None, *container),
        [ns, pod, uid, container] => (*ns, *pod, Some(*uid), *container),
        _ => {
            return Err((
                "400 Bad Request",
                format!("expected /{kind}/{{namespace}}/{{pod}}/{{container}}"),
            ));
        }
    };
    let uid = pod_uid(shared, namespace, name, uid).map_err(not_found)?;
    let containers = cri
        .list_containers(k8s_cri::v1::ListContainersRequest {
            filter: Some(k8s_cri::v1::ContainerFilter {
                label_selector: [
                    (POD_UID.to_owned(), uid),
                    (CONTAINER_NAME.to_owned(), container.to_owned()),
                ]
                .into(),
                state: Some(k8s_cri::v1::ContainerStateValue { state: 1 }),
                ..Default::default()
            }),
        })
        .await
        .map_err(|e| unavailable(format!("ListContainers: {}", e.message())))?
        .into_inner()
        .containers;
    let id = containers.first().map(|c| c.id.clone()).ok_or_else(|| {
        not_found(format!(
            "container {container:?} of pod {namespace}/{name} is not running"
        ))
    })?;
    let (stdin, stdout, stderr, tty) = (
        flag(&query, "stdin"),
        flag(&query, "stdout"),
        flag(&query, "stderr"),
        flag(&query, "tty"),
    );
    let answer = if kind == "exec" {
        let cmd: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.clone())
            .collect();
        if cmd.is_empty() {
            return Err((
                "400 Bad Request",
                "exec needs at least one command parameter".into(),
            ));
        }
        cri.exec(k8s_cri::v1::ExecRequest {
            container_id: id,
            cmd,
            tty,
            stdin,
            stdout,
            stderr,
        })
        .await
        .map(|r| r.into_inner().url)
    } else {
        cri.attach(k8s_cri::v1::AttachRequest {
            container_id: id,
            stdin,
            tty,
            stdout,
            stderr,
        })
        .await
        .map(|r| r.into_inner().url)
    };
    answer.map_err(|e| {
        let status = if e.code() == tonic::Code::InvalidArgument {
            "400 Bad Request"
        } else {
            "503 Service Unavailable"
        };
        (status, format!("{kind}: {}", e.message()))
    })
}

/// Proxies the client's upgrade request to the runtime's streaming `url`, then copies bytes
/// both ways until either side closes (upstream's kubelet proxies the same way).
async fn proxy_stream<T: AsyncRead + AsyncWrite + Unpin>(
    mut io: T,
    request: &Request,
    url: &str,
) -> std::io::Result<()> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other(format!("unsupported streaming URL {url}")))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut backend = tokio::net::TcpStream::connect(host).await?;
    let mut head = format!("{} {path} HTTP/1.1\r\nHost: {host}\r\n", request.method);
    for (name, value) in &request.headers {
        if ["host", "authorization", "content-length"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            continue;
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Content-Length: 0\r\n\r\n");
    backend.write_all(head.as_bytes()).await?;
    tokio::io::copy_bidirectional(&mut io, &mut backend).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_node_subresources_as_upstream() {
        assert_eq!(attributes("GET", "/stats/summary"), ("get", vec!["stats"]));
        assert_eq!(
            attributes("GET", "/metrics/probes"),
            ("get", vec!["metrics"])
        );
        assert_eq!(attributes("GET", "/logs/syslog"), ("get", vec!["log"]));
        assert_eq!(
            attributes("GET", "/healthz"),
            ("get", vec!["healthz", "proxy"])
        );
        assert_eq!(attributes("GET", "/pods"), ("get", vec!["pods", "proxy"]));
        assert_eq!(
            attributes("POST", "/exec/default/web/c"),
            ("create", vec!["proxy"])
        );
        assert_eq!(
            attributes("GET", "/containerLogs/default/web/c"),
            ("get", vec!["proxy"])
        );
        // A prefix match is on path segments: "/statsfoo" is not "/stats".
        assert_eq!(attributes("GET", "/statsfoo"), ("get", vec!["proxy"]));
    }

    #[test]
    fn certificates_name_users_and_groups() {
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:n1");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_user(cert.der()),
            Some(User {
                name: "system:node:n1".into(),
                groups: vec!["system:nodes".into()]
            })
        );
    }
}
