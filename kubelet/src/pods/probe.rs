//! Probes and lifecycle hooks. One action runner (exec through the CRI with its timeout
//! enforced, HTTP/HTTPS GET with headers, TCP connect, gRPC `grpc.health.v1.Health/Check`, and
//! for hooks `sleep`), and one prober task per running container instance that runs its
//! startup probe, then its liveness and readiness probes, with upstream's semantics: period,
//! timeout, success and failure thresholds, initial delay; liveness and readiness wait until
//! the startup probe has passed. The prober publishes a [`Verdict`] and wakes the pod worker
//! when it changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1::ExecSyncRequest;
use k8s_openapi::api::core::v1::{
    Container, ExecAction, GRPCAction, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::Notify;

use crate::runtime::Cri;

/// `User-Agent` of HTTP probes (upstream: `kube-probe/<major>.<minor>`).
pub const USER_AGENT: &str = "kube-probe/1.33";

/// A probe's or hook's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It passed.
    Success,
    /// It failed, with the output or error.
    Failure(String),
}

/// Where a probe goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The container runtime (for exec).
    pub cri: Cri,
    /// The container instance.
    pub container_id: String,
    /// The container spec (named ports).
    pub container: Container,
    /// The pod's primary IP (default host for HTTP, TCP and gRPC).
    pub pod_ip: String,
    /// The pod's namespace, name and UID (for the probe metrics).
    pub pod: [String; 3],
}

fn port_number(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| {
                    format!(
                        "couldn't find port {name:?} in container {:?}",
                        container.name
                    )
                })
        }
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Runs `command` in the container through the CRI; exit 0 passes.
pub async fn exec(target: &Target, action: &ExecAction, timeout: Duration) -> Outcome {
    let mut runtime = match target.cri.runtime().await {
        Ok(runtime) => runtime,
        Err(error) => return Outcome::Failure(error.to_string()),
    };
    let request = ExecSyncRequest {
        container_id: target.container_id.clone(),
        cmd: action.command.clone().unwrap_or_default(),
        timeout: timeout.as_secs().max(1) as i64,
    };
    // The runtime enforces the timeout; ours is the backstop for one that does not.
    let reply =
        tokio::time::timeout(timeout + Duration::from_secs(2), runtime.exec_sync(request)).await;
    match reply {
        Err(_) => Outcome::Failure(format!("command timed out after {}s", timeout.as_secs())),
        Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
            Outcome::Failure(format!("command timed out after {}s", timeout.as_secs()))
        }
        Ok(Err(status)) => Outcome::Failure(format!("exec failed: {}", status.message())),
        Ok(Ok(reply)) => {
            let reply = reply.into_inner();
            if reply.exit_code == 0 {
                Outcome::Success
            } else {
                let mut output = String::from_utf8_lossy(&reply.stdout).into_owned();
                output.push_str(&String::from_utf8_lossy(&reply.stderr));
                let output = output.trim();
                Outcome::Failure(if output.is_empty() {
                    format!("command exited with {}", reply.exit_code)
                } else {
                    output.chars().take(1024).collect()
                })
            }
        }
    }
}

/// Accepts any server certificate, checking only that the handshake is signed by its key:
/// HTTPS probes do not verify, as upstream's do not.
#[derive(Debug)]
pub struct AnyCertificate(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn http_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .user_agent(USER_AGENT)
            // Redirects are followed on the same host only; a redirect elsewhere is
            // answered as it is (3xx passes), as upstream's prober does.
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let same = attempt
                    .previous()
                    .first()
                    .is_some_and(|first| first.host_str() == attempt.url().host_str());
                if attempt.previous().len() >= 10 || !same {
                    attempt.stop()
                } else {
                    attempt.follow()
                }
            }))
            .no_proxy()
            .build()
            .expect("the probe HTTP client builds")
    })
}

/// HTTP(S) GET; 200–399 passes.
pub async fn http_get(target: &Target, action: &HTTPGetAction, timeout: Duration) -> Outcome {
    let port = match port_number(&action.port, &target.container) {
        Ok(port) => port,
        Err(error) => return Outcome::Failure(error),
    };
    let host = action
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| target.pod_ip.clone());
    let scheme = action
        .scheme
        .as_deref()
        .unwrap_or("HTTP")
        .to_ascii_lowercase();
    let mut path = action.path.clone().unwrap_or_default();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    let url = format!("{scheme}://{}{path}", host_port(&host, port));
    let mut request = http_client().get(&url).timeout(timeout);
    for header in action.http_headers.iter().flatten() {
        request = request.header(header.name.as_str(), header.value.as_str());
    }
    match request.send().await {
        Err(error) => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            Outcome::Failure(format!("Get {url:?}: {text}"))
        }
        Ok(response) => {
            let code = response.status().as_u16();
            if (200..400).contains(&code) {
                Outcome::Success
            } else {
                let body = response.text().await.unwrap_or_default();
                let body: String = body.chars().take(1024).collect();
                Outcome::Failure(format!(
                    "HTTP probe failed with statuscode: {code}{}",
                    if body.is_empty() {
                        String::new()
                    } else {
                        format!(", body: {}", body.trim())
                    }
                ))
            }
        }
    }
}

/// TCP connect.
pub async fn tcp(target: &Target, action: &TCPSocketAction, timeout: Duration) -> Outcome {
    let port = match port_number(&action.port, &target.container) {
        Ok(port) => port,
        Err(error) => return Outcome::Failure(error),
    };
    let host = action
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| target.pod_ip.clone());
    let address = host_port(&host, port);
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address)).await {
        Ok(Ok(_)) => Outcome::Success,
        Ok(Err(error)) => Outcome::Failure(format!("dial tcp {address}: {error}")),
        Err(_) => Outcome::Failure(format!("dial tcp {address}: i/o timeout")),
    }
}

/// gRPC health check; SERVING passes.
pub async fn grpc(target: &Target, action: &GRPCAction, timeout: Duration) -> Outcome {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let Ok(port) = u16::try_from(action.port) else {
        return Outcome::Failure(format!("invalid port {}", action.port));
    };
    let address = host_port(&target.pod_ip, port);
    let call = async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connecting to {address}: {e}"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: action.service.clone().unwrap_or_default(),
            })
            .await
            .map_err(|status| {
                format!("health rpc failed: {}: {}", status.code(), status.message())
            })?;
        Ok::<i32, String>(reply.into_inner().status)
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Outcome::Failure(format!(
            "timeout: health rpc did not complete within {}s",
            timeout.as_secs()
        )),
        Ok(Err(error)) => Outcome::Failure(error),
        Ok(Ok(1)) => Outcome::Success,
        Ok(Ok(status)) => Outcome::Failure(format!(
            "service unhealthy (responded with {:?})",
            tonic_health::pb::health_check_response::ServingStatus::try_from(status)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN")
        )),
    }
}

/// Runs one probe.
pub async fn run_probe(target: &Target, probe: &Probe) -> Outcome {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(action) = &probe.exec {
        exec(target, action, timeout).await
    } else if let Some(action) = &probe.http_get {
        http_get(target, action, timeout).await
    } else if let Some(action) = &probe.tcp_socket {
        tcp(target, action, timeout).await
    } else if let Some(action) = &probe.grpc {
        grpc(target, action, timeout).await
    } else {
        Outcome::Failure("the probe has no handler (exec, httpGet, tcpSocket or grpc)".into())
    }
}

/// Runs a lifecycle hook within `timeout`.
pub async fn run_hook(target: &Target, hook: &LifecycleHandler, timeout: Duration) -> Outcome {
    if let Some(action) = &hook.exec {
        exec(target, action, timeout).await
    } else if let Some(action) = &hook.http_get {
        http_get(target, action, timeout).await
    } else if let Some(action) = &hook.tcp_socket {
        tcp(target, action, timeout).await
    } else if let Some(sleep) = &hook.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64).min(timeout)).await;
        Outcome::Success
    } else {
        Outcome::Failure("the hook has no handler (exec, httpGet or sleep)".into())
    }
}

/// What the probes currently say about one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The startup probe passed (or there is none).
    pub started: bool,
    /// Ready (readiness passes, or there is no readiness probe, once started).
    pub ready: bool,
    /// The liveness or startup probe failed: why. The worker kills the instance.
    pub unhealthy: Option<String>,
}

/// Verdicts by instance id, shared between a pod's probers and its worker.
pub type Verdicts = Arc<Mutex<HashMap<String, Verdict>>>;

/// A probe failure worth an event (`Unhealthy`).
#[derive(Debug, Clone)]
pub struct Failure {
    /// The container.
    pub container: String,
    /// `Liveness probe failed: …`.
    pub message: String,
}

/// Starts the prober of one running instance. `seed` is what the previous kubelet reported for
/// this very instance (a restarted kubelet does not flip a ready container to unready while
/// its first probe is pending).
pub fn spawn(
    target: Target,
    started_at_ns: i64,
    seed: Option<Verdict>,
    verdicts: Verdicts,
    wake: Arc<Notify>,
    failures: tokio::sync::mpsc::UnboundedSender<Failure>,
) -> tokio::task::JoinHandle<()> {
    let container = target.container.clone();
    let id = target.container_id.clone();
    let initial = seed.unwrap_or(Verdict {
        started: container.startup_probe.is_none(),
        ready: container.startup_probe.is_none() && container.readiness_probe.is_none(),
        unhealthy: None,
    });
    let update = {
        let verdicts = verdicts.clone();
        let wake = wake.clone();
        let id = id.clone();
        move |change: &dyn Fn(&mut Verdict)| {
            let mut map = verdicts.lock().expect("verdicts lock");
            let entry = map.entry(id.clone()).or_default();
            let before = entry.clone();
            change(entry);
            if *entry != before {
                wake.notify_one();
            }
        }
    };
    update(&|v| *v = initial.clone());
    let started_at = std::time::UNIX_EPOCH + Duration::from_nanos(started_at_ns.max(0) as u64);
    let delay_from_start = move |probe: &Probe| {
        let initial = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        let elapsed = std::time::SystemTime::now()
            .duration_since(started_at)
            .unwrap_or_default();
        initial.saturating_sub(elapsed)
    };
    tokio::spawn(async move {
        let report = |message: &str| {
            let _ = failures.send(Failure {
                container: container.name.clone(),
                message: message.to_owned(),
            });
        };
        if let (Some(probe), false) = (&container.startup_probe, initial.started) {
            let threshold = probe.failure_threshold.unwrap_or(3).max(1);
            let passed = repeat(
                &target,
                probe,
                "Startup",
                delay_from_start(probe),
                |streak| match streak {
                    Streak::Passed(_) => {
                        update(&|v| {
                            v.started = true;
                            v.ready = container.readiness_probe.is_none();
                        });
                        false
                    }
                    Streak::Failed(failed, message) => {
                        report(&message);
                        if failed >= threshold {
                            update(&|v| v.unhealthy = Some(message.clone()));
                        }
                        failed < threshold
                    }
                },
            )
            .await;
            if !passed {
                return;
            }
        }
        let liveness = async {
            let Some(probe) = &container.liveness_probe else {
                return std::future::pending::<()>().await;
            };
            let threshold = probe.failure_threshold.unwrap_or(3).max(1);
            repeat(
                &target,
                probe,
                "Liveness",
                delay_from_start(probe),
                |streak| {
                    let Streak::Failed(failed, message) = streak else {
                        return true;
                    };
                    report(&message);
                    if failed >= threshold {
                        update(&|v| v.unhealthy = Some(message.clone()));
                    }
                    failed < threshold
                },
            )
            .await;
        };
        let readiness = async {
            let Some(probe) = &container.readiness_probe else {
                return std::future::pending::<()>().await;
            };
            let fail_threshold = probe.failure_threshold.unwrap_or(3).max(1);
            let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
            repeat(
                &target,
                probe,
                "Readiness",
                delay_from_start(probe),
                |streak| {
                    match streak {
                        Streak::Passed(ok) if ok >= success_threshold => {
                            update(&|v| v.ready = true)
                        }
                        Streak::Passed(_) => {}
                        Streak::Failed(failed, message) => {
                            report(&message);
                            if failed >= fail_threshold {
                                update(&|v| v.ready = false);
                            }
                        }
                    }
                    true
                },
            )
            .await;
        };
        tokio::join!(liveness, readiness);
    })
}

/// The run of equal results a probe is on.
enum Streak {
    /// This many passes in a row.
    Passed(i32),
    /// This many failures in a row, and `<Kind> probe failed: <why>`.
    Failed(i32, String),
}

/// Runs `probe` after `delay`, then every period, telling `next` each streak, until `next`
/// says stop; returns whether the last result passed.
async fn repeat(
    target: &Target,
    probe: &Probe,
    kind: &str,
    delay: Duration,
    mut next: impl FnMut(Streak) -> bool,
) -> bool {
    tokio::time::sleep(delay).await;
    let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
    let (mut ok, mut failed) = (0, 0);
    let [namespace, pod, uid] = &target.pod;
    let labels = [
        ("probe_type", kind),
        ("container", target.container.name.as_str()),
        ("pod", pod.as_str()),
        ("namespace", namespace.as_str()),
        ("pod_uid", uid.as_str()),
    ];
    let metrics = target.cri.metrics();
    loop {
        let started = std::time::Instant::now();
        let outcome = run_probe(target, probe).await;
        metrics.observe(
            "prober_probe_duration_seconds",
            &labels,
            started.elapsed().as_secs_f64(),
        );
        let result = match outcome {
            Outcome::Success => "successful",
            Outcome::Failure(_) => "failed",
        };
        let mut counted = labels.to_vec();
        counted.insert(1, ("result", result));
        metrics.inc("prober_probe_total", &counted);
        let (passed, streak) = match outcome {
            Outcome::Success => {
                (ok, failed) = (ok + 1, 0);
                (true, Streak::Passed(ok))
            }
            Outcome::Failure(why) => {
                (ok, failed) = (0, failed + 1);
                (
                    false,
                    Streak::Failed(failed, format!("{kind} probe failed: {why}")),
                )
            }
        };
        if !next(streak) {
            return passed;
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_ports_resolve_through_the_container() {
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "web", "ports": [{"name": "http", "containerPort": 8080}]}))
        .unwrap();
        assert_eq!(
            port_number(&IntOrString::String("http".into()), &container),
            Ok(8080)
        );
        assert_eq!(port_number(&IntOrString::Int(81), &container), Ok(81));
        assert!(
            port_number(&IntOrString::String("grpc".into()), &container)
                .unwrap_err()
                .contains("grpc")
        );
        assert_eq!(host_port("fd00::1", 80), "[fd00::1]:80");
    }

    #[tokio::test]
    async fn grpc_probes_ask_the_health_service() {
        use tonic_health::ServingStatus;
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("db", ServingStatus::NotServing)
            .await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve(address),
        );
        let target = Target {
            cri: Cri::new("/nonexistent"),
            container_id: String::new(),
            container: Container::default(),
            pod_ip: "127.0.0.1".into(),
            pod: Default::default(),
        };
        let action = |service: Option<&str>| GRPCAction {
            port: i32::from(port),
            service: service.map(str::to_owned),
        };
        let mut outcome = Outcome::Failure(String::new());
        for _ in 0..50 {
            outcome = grpc(&target, &action(None), Duration::from_secs(2)).await;
            if outcome == Outcome::Success {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(outcome, Outcome::Success);
        let Outcome::Failure(why) =
            grpc(&target, &action(Some("db")), Duration::from_secs(2)).await
        else {
            panic!("a NOT_SERVING service passed")
        };
        assert!(why.contains("NOT_SERVING"), "{why}");
        let Outcome::Failure(why) =
            grpc(&target, &action(Some("unknown")), Duration::from_secs(2)).await
        else {
            panic!("an unknown service passed")
        };
        assert!(
            why.contains("NotFound") || why.contains("not found") || why.contains("Not found"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_real_listener() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]).to_string();
                    let ok = request.starts_with("GET /healthz ")
                        && request
                            .to_ascii_lowercase()
                            .contains("user-agent: kube-probe/1.33")
                        && request.to_ascii_lowercase().contains("x-probe: yes");
                    let reply = if ok {
                        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    } else {
                        "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nsick"
                    };
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        });
        let target = Target {
            cri: Cri::new("/nonexistent"),
            container_id: String::new(),
            container: Container::default(),
            pod_ip: "127.0.0.1".into(),
            pod: Default::default(),
        };
        let mut action: HTTPGetAction = serde_json::from_value(serde_json::json!({
            "path": "/healthz", "port": port, "httpHeaders": [{"name": "X-Probe", "value": "yes"}]})).unwrap();
        assert_eq!(
            http_get(&target, &action, Duration::from_secs(2)).await,
            Outcome::Success
        );
        action.path = Some("/other".into());
        let Outcome::Failure(why) = http_get(&target, &action, Duration::from_secs(2)).await else {
            panic!("500 passed")
        };
        assert!(why.contains("statuscode: 500"), "{why}");
        let tcp_ok: TCPSocketAction =
            serde_json::from_value(serde_json::json!({"port": port})).unwrap();
        assert_eq!(
            tcp(&target, &tcp_ok, Duration::from_secs(2)).await,
            Outcome::Success
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tcp_bad: TCPSocketAction =
            serde_json::from_value(serde_json::json!({"port": closed})).unwrap();
        let Outcome::Failure(why) = tcp(&target, &tcp_bad, Duration::from_secs(2)).await else {
            panic!("closed port passed")
        };
        assert!(why.contains("refused"), "{why}");
    }
}
