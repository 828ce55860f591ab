//! A streaming client as kubectl (through the API server and kubelet) meets a runtime's
//! streaming server: exec and port-forward over SPDY/3.1 at the URL a CRI `Exec` or
//! `PortForward` returned. The same client is run against containerd's CRI, so it is checked
//! against a real Go server, not only against tug's.

use tokio::net::TcpStream;
use tug_streaming::spdy::{self, Headers, Role, Session};
use tug_streaming::upgrade::{Rewind, request_upgrade};
use tug_streaming::{portforward, remotecommand};

/// What an exec produced.
#[derive(Debug)]
pub struct ExecOutput {
    /// stdout (with a TTY: the terminal's output).
    pub stdout: Vec<u8>,
    /// stderr.
    pub stderr: Vec<u8>,
    /// The exit code, or why the command failed.
    pub exit: Result<i32, String>,
    /// The sub-protocol the server chose.
    pub protocol: String,
}

async fn session(url: &str, protocols: &[&str]) -> std::io::Result<(String, Session)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other(format!("{url}: not an http:// URL")))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let conn = TcpStream::connect(host).await?;
    upgrade(conn, host, path, protocols).await
}

async fn upgrade<T>(
    conn: T,
    host: &str,
    path: &str,
    protocols: &[&str],
) -> std::io::Result<(String, Session)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, io): (String, Rewind<T>) =
        request_upgrade(conn, path, host, spdy::UPGRADE, protocols, &[]).await?;
    Ok((protocol, Session::new(io, Role::Client)))
}

/// A TLS connection to `addr` as a client with `cert`/`key` (PEM), verifying the server's
/// certificate against `ca` (PEM) for `server_name`: how the API server reaches a kubelet.
pub async fn tls(
    addr: &str,
    server_name: &str,
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(der?).map_err(std::io::Error::other)?;
    }
    let config = client_config(cert, key, |builder| builder.with_root_certificates(roots))?;
    connect(addr, server_name, config).await
}

/// A TLS connection to a kubelet at `addr` (`ip:port`) as kube-apiserver makes it by default
/// (kubeadm sets no `--kubelet-certificate-authority`): `cert`/`key` (PEM) presented, the
/// kubelet's serving certificate taken as it is (its signatures still checked).
pub async fn tls_to_kubelet(
    addr: &str,
    cert: &[u8],
    key: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = client_config(cert, key, |builder| {
        builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(
                tug_kubelet::pods::probe::AnyCertificate(std::sync::Arc::new(provider())),
            ))
    })?;
    let ip = addr
        .rsplit_once(':')
        .map_or(addr, |(ip, _)| ip)
        .trim_matches(['[', ']']);
    connect(addr, ip, config).await
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

type Verified = rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>;
type Versioned = rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>;

fn client_config(
    cert: &[u8],
    key: &[u8],
    verify: impl FnOnce(Versioned) -> Verified,
) -> std::io::Result<rustls::ClientConfig> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &cert[..]).collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut &key[..])?
        .ok_or_else(|| std::io::Error::other("no private key"))?;
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?;
    verify(builder)
        .with_client_auth_cert(certs, key)
        .map_err(std::io::Error::other)
}

async fn connect(
    addr: &str,
    server_name: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(std::io::Error::other)?;
    let conn = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, conn)
        .await
}

/// Runs an exec through `conn` (already connected, e.g. over TLS to a kubelet) at `path`.
pub async fn exec_over<T>(
    conn: T,
    host: &str,
    path: &str,
    stdin: Option<&[u8]>,
    tty: bool,
) -> std::io::Result<ExecOutput>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, session) = upgrade(conn, host, path, remotecommand::PROTOCOLS).await?;
    run_exec(protocol, session, stdin, !tty, tty).await
}

/// Runs an exec over WebSocket (`v5.channel.k8s.io` preferred, as kubectl does) through
/// `conn` at `path`: sends `stdin` and then closes it (v5), collects stdout and stderr until the
/// server ends the session, and reads the status from the error channel.
pub async fn exec_websocket<T>(
    mut conn: T,
    host: &str,
    path: &str,
    stdin: Option<&[u8]>,
) -> std::io::Result<ExecOutput>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tug_streaming::websocket::{self, Channels, Side};
    let protocol =
        websocket::request_upgrade(&mut conn, path, host, websocket::PROTOCOLS, &[]).await?;
    let v5 = protocol == "v5.channel.k8s.io";
    let mut channels = Channels::new(
        conn,
        Side::Client,
        v5,
        &[websocket::STDOUT, websocket::STDERR, websocket::ERROR],
    );
    if let Some(data) = stdin {
        let input = channels.writer(websocket::STDIN);
        input.send(data)?;
        input.close();
    }
    let taken = |channels: &mut Channels, n| channels.take(n).expect("a channel asked for");
    let mut stdout = taken(&mut channels, websocket::STDOUT);
    let mut stderr = taken(&mut channels, websocket::STDERR);
    let mut error = taken(&mut channels, websocket::ERROR);
    let (out, err, status) = tokio::join!(
        stdout.read_to_end(),
        stderr.read_to_end(),
        error.read_to_end()
    );
    channels.close();
    Ok(ExecOutput {
        stdout: out,
        stderr: err,
        exit: remotecommand::parse_status(&status),
        protocol,
    })
}

fn typed(kind: &str) -> Headers {
    vec![(remotecommand::STREAM_TYPE.into(), kind.into())]
}

/// Runs the exec (or attach) at `url`: sends `stdin` (then closes it) when given, collects
/// stdout and stderr (stderr not with `tty`), and reads the status.
pub async fn exec(url: &str, stdin: Option<&[u8]>, tty: bool) -> std::io::Result<ExecOutput> {
    exec_streams(url, stdin, !tty, tty).await
}

/// [`exec`], opening a stderr stream only when `stderr` (the request must agree).
pub async fn exec_streams(
    url: &str,
    stdin: Option<&[u8]>,
    stderr: bool,
    tty: bool,
) -> std::io::Result<ExecOutput> {
    let (protocol, session) = session(url, remotecommand::PROTOCOLS).await?;
    run_exec(protocol, session, stdin, stderr, tty).await
}

async fn run_exec(
    protocol: String,
    session: Session,
    stdin: Option<&[u8]>,
    with_stderr: bool,
    tty: bool,
) -> std::io::Result<ExecOutput> {
    let mut error = session.open(typed(remotecommand::ERROR)).await?;
    let input = match stdin {
        Some(_) => Some(session.open(typed(remotecommand::STDIN)).await?),
        None => None,
    };
    let mut stdout = session.open(typed(remotecommand::STDOUT)).await?;
    let mut stderr = if with_stderr && !tty {
        Some(session.open(typed(remotecommand::STDERR)).await?)
    } else {
        None
    };
    let _resize = if tty {
        let resize = session.open(typed(remotecommand::RESIZE)).await?;
        resize.send(br#"{"Width":100,"Height":30}"#)?;
        Some(resize)
    } else {
        None
    };
    // With a TTY, the end of stdin ends the terminal session (as `kubectl exec -it` does when
    // its input ends), so stdin stays open until the output is done.
    if let (Some(stream), Some(data)) = (&input, stdin) {
        stream.send(data)?;
        if !tty {
            stream.close();
        }
    }
    let (out, err, status) = tokio::join!(
        stdout.read_to_end(),
        async {
            match &mut stderr {
                Some(s) => s.read_to_end().await,
                None => Vec::new(),
            }
        },
        error.read_to_end()
    );
    if let Some(stream) = &input {
        stream.close();
    }
    session.close();
    Ok(ExecOutput {
        stdout: out,
        stderr: err,
        exit: remotecommand::parse_status(&status),
        protocol,
    })
}

/// A port-forward session: each `connect` is one connection to the pod's port.
#[derive(Debug)]
pub struct PortForward {
    session: Session,
    next: std::sync::atomic::AtomicU32,
}

impl PortForward {
    /// Upgrades the port-forward `url` to a session.
    pub async fn open(url: &str) -> std::io::Result<PortForward> {
        let (protocol, session) = session(url, &[portforward::PROTOCOL]).await?;
        if protocol != portforward::PROTOCOL {
            return Err(std::io::Error::other(format!(
                "the server chose {protocol:?}, not {}",
                portforward::PROTOCOL
            )));
        }
        Ok(PortForward {
            session,
            next: Default::default(),
        })
    }

    /// Sends `request` to `port` in the pod, closes the sending side, and returns everything
    /// the pod answered, or the error the server reported.
    pub async fn exchange(&self, port: u16, request: &[u8]) -> Result<Vec<u8>, String> {
        let id = self
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let headers = |kind: &str| -> Headers {
            vec![
                (remotecommand::STREAM_TYPE.into(), kind.into()),
                (portforward::PORT.into(), port.to_string()),
                (portforward::REQUEST_ID.into(), id.clone()),
            ]
        };
        let mut error = self
            .session
            .open(headers(portforward::ERROR))
            .await
            .map_err(|e| e.to_string())?;
        error.close();
        let mut data = self
            .session
            .open(headers(portforward::DATA))
            .await
            .map_err(|e| e.to_string())?;
        data.send(request).map_err(|e| e.to_string())?;
        data.close();
        let (answer, failure) = tokio::join!(data.read_to_end(), error.read_to_end());
        if !failure.is_empty() {
            return Err(String::from_utf8_lossy(&failure).into_owned());
        }
        Ok(answer)
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.session.close();
    }
}
