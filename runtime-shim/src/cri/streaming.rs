//! The streaming server behind CRI `Exec`, `Attach` and `PortForward`: each call checks its
//! target and returns a single-use URL (`http://<address>/<exec|attach|portforward>/<token>`,
//! valid for one minute); the kubelet proxies the client's upgraded connection there. Sessions
//! are SPDY/3.1 with the `v4.channel.k8s.io` family (exec, attach) or `portforward.k8s.io`, or
//! WebSocket with `v5.channel.k8s.io` or `v4.channel.k8s.io` (exec, attach).
//!
//! Exec runs the command through containerd with FIFOs (a terminal when asked), copies stdin,
//! stdout and stderr, applies resizes to the terminal and ends with a v4 `Status` carrying the
//! exit code. Attach follows the container's output from its CRI log (the runc shim writes it
//! through `tug shim-logger`), and writes the client's stdin into the container's stdin FIFO when
//! the container was created with stdin. Port-forward connects to the port inside the pod's
//! network namespace, once per stream pair.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{CloseIoRequest, ResizePtyRequest, WaitRequest};
use k8s_cri::v1::{AttachRequest, ExecRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Status;
use tug_streaming::spdy::{self, Role, Session, Stream, StreamWriter, header};
use tug_streaming::upgrade::{self, choose, read_request, refuse, switch};
use tug_streaming::{portforward, remotecommand};

use super::containers::Phase;
use super::exec::{ExecIo, make_fifo, release};
use super::runtime::Runtime;

/// How long a URL stays usable.
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long the client has to open the streams it asked for.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(30);

/// A request waiting for its client to connect.
#[derive(Debug, Clone)]
pub(super) enum Pending {
    Exec(ExecRequest),
    Attach {
        request: AttachRequest,
        log_path: PathBuf,
        /// The container's stdin FIFO, when the client sends stdin.
        stdin: Option<PathBuf>,
        /// Whether the first attach session's end closes the container's stdin.
        stdin_once: bool,
    },
    PortForward {
        sandbox: String,
        netns: Option<PathBuf>,
    },
}

impl Pending {
    fn kind(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach { .. } => "attach",
            Pending::PortForward { .. } => "portforward",
        }
    }
}

/// The pending requests and the address they are served on.
#[derive(Debug)]
pub struct Streaming {
    address: SocketAddr,
    pending: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl Streaming {
    /// The server for `address` (already bound by the caller).
    pub fn new(address: SocketAddr) -> Streaming {
        Streaming {
            address,
            pending: Mutex::default(),
        }
    }

    /// Registers `pending` and returns its URL.
    pub(super) fn register(&self, pending: Pending) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let url = format!("http://{}/{}/{token}", self.address, pending.kind());
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
        map.insert(token, (pending, Instant::now()));
        url
    }

    /// Takes the request of `kind` behind `token` (single use).
    fn take(&self, kind: &str, token: &str) -> Option<Pending> {
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (pending, at) = map.remove(token)?;
        (at.elapsed() < TOKEN_TTL && pending.kind() == kind).then_some(pending)
    }
}

impl Runtime {
    /// CRI Exec: checks the container runs and returns the URL of the session.
    pub(super) async fn exec_url(&self, request: ExecRequest) -> Result<String, Status> {
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument("Exec needs a command"));
        }
        if !(request.stdin || request.stdout || request.stderr) {
            return Err(Status::invalid_argument(
                "Exec needs at least one of stdin, stdout and stderr",
            ));
        }
        if request.tty && request.stderr {
            return Err(Status::invalid_argument(
                "Exec with a TTY has no separate stderr (stderr must be false)",
            ));
        }
        let container = self.require_container(&request.container_id).await?;
        if container.state.phase != Phase::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                container.id
            )));
        }
        Ok(self.inner.streaming.register(Pending::Exec(request)))
    }

    /// CRI Attach: checks the container runs (and, for stdin, that it was created with stdin)
    /// and returns the URL of the session.
    pub(super) async fn attach_url(&self, request: AttachRequest) -> Result<String, Status> {
        let container = self.require_container(&request.container_id).await?;
        if request.stdin && !container.config.stdin {
            return Err(Status::invalid_argument(format!(
                "container {} ({}) was created without stdin, so there is none to attach to \
                 (set stdin: true in its spec)",
                container.id,
                container.name()
            )));
        }
        if request.tty != container.config.tty {
            return Err(Status::invalid_argument(format!(
                "attach asks for tty={} but container {} ({}) has tty={}",
                request.tty,
                container.id,
                container.name(),
                container.config.tty
            )));
        }
        if container.state.phase != Phase::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                container.id
            )));
        }
        let Some(log_path) = container.state.log_path.clone() else {
            return Err(Status::failed_precondition(format!(
                "container {} has no log, so there is no output to attach to",
                container.id
            )));
        };
        let stdin = request.stdin.then(|| self.stdin_path(&container.id));
        Ok(self.inner.streaming.register(Pending::Attach {
            request,
            log_path,
            stdin,
            stdin_once: container.config.stdin_once,
        }))
    }

    /// CRI PortForward: checks the sandbox is ready and returns the URL of the session.
    pub(super) async fn port_forward_url(&self, sandbox_id: &str) -> Result<String, Status> {
        let sandbox = self.require(sandbox_id).await?;
        if !sandbox.state.ready {
            return Err(Status::failed_precondition(format!(
                "sandbox {} is not ready",
                sandbox.id
            )));
        }
        Ok(self.inner.streaming.register(Pending::PortForward {
            sandbox: sandbox.id.clone(),
            netns: sandbox.state.netns.clone(),
        }))
    }

    /// Serves streaming sessions on `listener` until the task is aborted.
    pub fn serve_streams(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let runtime = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else {
                    continue;
                };
                let runtime = runtime.clone();
                tokio::spawn(async move {
                    if let Err(error) = runtime.session(conn).await {
                        tracing::warn!(%peer, %error, "streaming session failed");
                    }
                });
            }
        })
    }

    async fn session(&self, conn: tokio::net::TcpStream) -> std::io::Result<()> {
        let _ = conn.set_nodelay(true);
        let (request, mut io) = tokio::time::timeout(Duration::from_secs(10), read_request(conn))
            .await
            .map_err(|_| std::io::Error::other("no request within 10 s"))??;
        let mut parts = request.path().trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let Some(pending) = self.inner.streaming.take(kind, token) else {
            return refuse(
                &mut io,
                "404 Not Found",
                &format!("{}: unknown or expired streaming URL (each is good for one session within a minute)", request.path()),
            )
            .await;
        };
        if tug_streaming::websocket::is_upgrade(&request) {
            let kind = kind.to_owned();
            return self.websocket_session(request, io, &kind, pending).await;
        }
        let upgrade_to = request.values("Upgrade");
        if !upgrade_to
            .iter()
            .any(|u| u.eq_ignore_ascii_case(spdy::UPGRADE))
        {
            return refuse(
                &mut io,
                "400 Bad Request",
                &format!(
                    "{kind} needs an upgrade to {} (asked: {upgrade_to:?})",
                    spdy::UPGRADE
                ),
            )
            .await;
        }
        let supported: &[&str] = match pending {
            Pending::PortForward { .. } => &[portforward::PROTOCOL],
            _ => remotecommand::PROTOCOLS,
        };
        let Some(protocol) = choose(&request, supported) else {
            return refuse(
                &mut io,
                "403 Forbidden",
                &format!(
                    "none of the offered {} {:?} is supported; supported: {supported:?}",
                    upgrade::PROTOCOL_HEADER,
                    request.values(upgrade::PROTOCOL_HEADER)
                ),
            )
            .await;
        };
        switch(&mut io, spdy::UPGRADE, protocol).await?;
        tracing::debug!(kind, protocol, "streaming session");
        let session = Session::new(io, Role::Server);
        match pending {
            Pending::PortForward { sandbox, netns } => {
                serve_port_forward(&session, &sandbox, netns).await
            }
            other => {
                self.serve_command(&mut Transport::Spdy(&session), other)
                    .await
            }
        }
        session.close();
        Ok(())
    }

    /// Serves an exec or attach on `transport`.
    async fn serve_command(&self, transport: &mut Transport<'_>, pending: Pending) {
        match pending {
            Pending::Exec(exec) => self.serve_exec(transport, exec).await,
            Pending::Attach {
                request,
                log_path,
                stdin,
                stdin_once,
            } => {
                self.serve_attach(transport, request, log_path, stdin, stdin_once)
                    .await
            }
            Pending::PortForward { .. } => {}
        }
    }

    /// Exec and attach over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`).
    async fn websocket_session<T>(
        &self,
        request: upgrade::Request,
        mut io: T,
        kind: &str,
        pending: Pending,
    ) -> std::io::Result<()>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use tug_streaming::websocket::{self, Channels, Side};
        if matches!(pending, Pending::PortForward { .. }) {
            return refuse(
                &mut io,
                "400 Bad Request",
                "port-forward is served over SPDY (portforward.k8s.io); the API server tunnels kubectl's WebSocket port-forward onto it",
            )
            .await;
        }
        let offered = request.values(websocket::PROTOCOL_HEADER);
        let Some(protocol) = websocket::PROTOCOLS
            .iter()
            .find(|p| offered.iter().any(|o| o == *p))
        else {
            return refuse(
                &mut io,
                "403 Forbidden",
                &format!(
                    "none of the offered {} {offered:?} is supported; supported: {:?}",
                    websocket::PROTOCOL_HEADER,
                    websocket::PROTOCOLS
                ),
            )
            .await;
        };
        websocket::switch(&mut io, &request, protocol).await?;
        tracing::debug!(kind, protocol, "streaming session over WebSocket");
        let v5 = *protocol == "v5.channel.k8s.io";
        let mut channels =
            Channels::new(io, Side::Server, v5, &[websocket::STDIN, websocket::RESIZE]);
        self.serve_command(&mut Transport::WebSocket(&mut channels), pending)
            .await;
        channels.close();
        Ok(())
    }

    async fn serve_exec(&self, transport: &mut Transport<'_>, request: ExecRequest) {
        let Some(mut streams) = Streams::accept(transport, &request_wants(&request)).await else {
            return;
        };
        tracing::debug!(container = %request.container_id, "exec streams are open");
        let result = self.run_streamed(&request, &mut streams).await;
        tracing::debug!(container = %request.container_id, ?result, "exec finished");
        let status = match result {
            Ok(code) => remotecommand::exit_status(code),
            Err(message) => remotecommand::error_status(&message),
        };
        streams.finish(&status);
    }

    async fn run_streamed(
        &self,
        request: &ExecRequest,
        streams: &mut Streams,
    ) -> Result<i32, String> {
        let container = self
            .require_container(&request.container_id)
            .await
            .map_err(|s| s.message().to_owned())?;
        let exec_id = format!("exec-{}", uuid::Uuid::new_v4().simple());
        let dir = self.inner.state_dir.join("exec").join(&exec_id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let fifo = |name: &str, wanted: bool| -> Result<Option<PathBuf>, String> {
            if !wanted {
                return Ok(None);
            }
            let path = dir.join(name);
            make_fifo(&path).map_err(|e| format!("create FIFO {}: {e}", path.display()))?;
            Ok(Some(path))
        };
        let stdin = fifo("stdin", streams.stdin.is_some())?;
        // containerd's runc shim needs both output FIFOs of a process without a terminal; an
        // output the client did not ask for is read and dropped.
        let stdout = fifo("stdout", true)?;
        let stderr = fifo("stderr", !request.tty)?;
        // Readers first: opening a FIFO blocks until the other end opens.
        let copies: Vec<tokio::task::JoinHandle<()>> = [
            (stdout.clone(), streams.stdout.clone()),
            (stderr.clone(), streams.stderr.clone()),
        ]
        .into_iter()
        .filter_map(|(path, writer)| Some((path?, writer)))
        .map(|(path, writer)| tokio::task::spawn_blocking(move || pump_out(&path, writer.as_ref())))
        .collect();
        // The stdin writer opens before the exec: the runc shim opens its end while creating
        // the process and waits for a writer.
        // At the end of the client's stdin the runc shim is told to close the process's stdin.
        let input = match (stdin.clone(), streams.stdin.take()) {
            (Some(path), Some(stream)) => {
                let runtime = self.clone();
                let (container_id, exec_id) = (container.id.clone(), exec_id.clone());
                Some(tokio::spawn(async move {
                    pump_in(path, stream).await;
                    runtime.close_stdin(container_id, exec_id).await;
                }))
            }
            _ => None,
        };
        let path_of = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let started = self
            .start_exec(
                &container.id,
                &exec_id,
                &container.spec,
                &request.cmd,
                ExecIo {
                    stdin: path_of(&stdin),
                    stdout: path_of(&stdout),
                    stderr: path_of(&stderr),
                    terminal: request.tty,
                },
            )
            .await;
        let outcome = match started {
            Err(status) => Err(status.message().to_owned()),
            Ok(()) => {
                let resizer = streams.resize.take().map(|stream| {
                    tokio::spawn(resize(
                        self.clone(),
                        container.id.clone(),
                        exec_id.clone(),
                        stream,
                    ))
                });
                let waited = TasksClient::new(self.inner.containerd.channel())
                    .wait(self.inner.containerd.request(
                        WaitRequest {
                            container_id: container.id.clone(),
                            exec_id: exec_id.clone(),
                        },
                        None,
                    ))
                    .await;
                if let Some(task) = resizer {
                    task.abort();
                }
                waited
                    .map(|w| w.into_inner().exit_status as i32)
                    .map_err(|s| format!("wait for the exec: {}", s.message()))
            }
        };
        if let Some(input) = input {
            input.abort();
        }
        if outcome.is_err() {
            for path in [&stdin, &stdout, &stderr].into_iter().flatten() {
                release(path);
            }
        }
        for copy in copies {
            if tokio::time::timeout(Duration::from_secs(5), copy)
                .await
                .is_err()
            {
                for path in [&stdout, &stderr].into_iter().flatten() {
                    release(path);
                }
            }
        }
        if outcome.is_err() {
            self.kill_exec(&container.id, &exec_id).await;
        }
        self.delete_exec(&container.id, &exec_id).await;
        let _ = std::fs::remove_dir_all(&dir);
        outcome
    }
}

fn request_wants(request: &ExecRequest) -> Wants {
    Wants {
        stdin: request.stdin,
        stdout: request.stdout,
        stderr: request.stderr && !request.tty,
        tty: request.tty,
    }
}

/// The streams a session must open.
#[derive(Debug, Clone, Copy)]
struct Wants {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

/// What an exec or attach session runs on.
enum Transport<'a> {
    /// A SPDY session: the client opens a stream per kind.
    Spdy(&'a Session),
    /// WebSocket channels: every channel is there from the start.
    WebSocket(&'a mut tug_streaming::websocket::Channels),
}

impl Transport<'_> {
    /// Resolves when the client has gone (on SPDY, streams opened after the session started
    /// are refused meanwhile).
    async fn closed(&self) {
        match self {
            Transport::Spdy(session) => {
                while let Some(extra) = session.accept().await {
                    extra.writer().reset();
                }
            }
            Transport::WebSocket(channels) => channels.gone().await,
        }
    }
}

/// The streams of an exec or attach session.
struct Streams {
    error: StreamWriter,
    stdin: Option<Stream>,
    stdout: Option<StreamWriter>,
    stderr: Option<StreamWriter>,
    resize: Option<Stream>,
}

impl Streams {
    /// Waits until the client opened every stream `wants` needs (error always; resize with a
    /// TTY is taken when it comes but not waited for).
    async fn accept(transport: &mut Transport<'_>, wants: &Wants) -> Option<Streams> {
        use tug_streaming::websocket as ws;
        let session = match transport {
            Transport::Spdy(session) => *session,
            Transport::WebSocket(channels) => {
                let stdin = channels.take(ws::STDIN);
                let resize = channels.take(ws::RESIZE);
                return Some(Streams {
                    error: channels.writer(ws::ERROR),
                    stdin: stdin.filter(|_| wants.stdin),
                    stdout: wants.stdout.then(|| channels.writer(ws::STDOUT)),
                    stderr: wants.stderr.then(|| channels.writer(ws::STDERR)),
                    resize: resize.filter(|_| wants.tty),
                });
            }
        };
        let mut error = None;
        let mut stdin = None;
        let mut stdout = None;
        let mut stderr = None;
        let mut resize = None;
        let deadline = Instant::now() + STREAMS_TIMEOUT;
        loop {
            let complete = error.is_some()
                && (!wants.stdin || stdin.is_some())
                && (!wants.stdout || stdout.is_some())
                && (!wants.stderr || stderr.is_some())
                && (!wants.tty || resize.is_some());
            if complete {
                break;
            }
            let next = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                session.accept(),
            )
            .await;
            match next {
                Ok(Some(stream)) => {
                    let kind = header(&stream.headers, remotecommand::STREAM_TYPE)
                        .unwrap_or_default()
                        .to_owned();
                    // A stream the request did not ask for is refused, as upstream does.
                    match kind.as_str() {
                        remotecommand::ERROR => error = Some(stream.writer()),
                        remotecommand::STDIN if wants.stdin => stdin = Some(stream),
                        remotecommand::STDOUT if wants.stdout => stdout = Some(stream.writer()),
                        remotecommand::STDERR if wants.stderr => stderr = Some(stream.writer()),
                        remotecommand::RESIZE => resize = Some(stream),
                        other => {
                            tracing::debug!(stream_type = other, "unknown stream type; reset");
                            stream.writer().reset();
                        }
                    }
                }
                Ok(None) => return None,
                // A client that never opens the resize stream (v1/v2 protocols) still gets
                // its session once the others are there.
                Err(_) if error.is_some() && wants.tty && resize.is_none() => break,
                Err(_) => {
                    if let Some(error) = &error {
                        let status = remotecommand::error_status(
                            "timed out waiting for the client to create its streams",
                        );
                        let _ = error.send(status.to_string().as_bytes());
                        error.close();
                    }
                    return None;
                }
            }
        }
        Some(Streams {
            error: error?,
            stdin,
            stdout,
            stderr,
            resize,
        })
    }

    /// Ends the session: output streams closed, then the status on the error stream.
    fn finish(&self, status: &serde_json::Value) {
        for writer in [&self.stdout, &self.stderr].into_iter().flatten() {
            writer.close();
        }
        let _ = self.error.send(status.to_string().as_bytes());
        self.error.close();
    }
}

/// Copies a FIFO to a stream (or nowhere) until the writer closes it.
fn pump_out(path: &Path, writer: Option<&StreamWriter>) {
    let Ok(mut fifo) = std::fs::File::open(path) else {
        return;
    };
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match fifo.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(writer) = writer
                    && writer.send(&buffer[..n]).is_err()
                {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
}

/// Copies the client's stdin stream into the process's stdin FIFO; closes it at the end.
async fn pump_in(path: PathBuf, mut stream: Stream) {
    let opened =
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(&path))
            .await;
    let Ok(Ok(fifo)) = opened else {
        return;
    };
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let writer = tokio::task::spawn_blocking(move || {
        let mut fifo = fifo;
        while let Some(chunk) = receiver.blocking_recv() {
            if fifo.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    while let Some(chunk) = stream.recv().await {
        if sender.send(chunk).await.is_err() {
            break;
        }
    }
    drop(sender);
    let _ = writer.await;
}

/// Applies the client's terminal sizes to the exec's terminal.
async fn resize(runtime: Runtime, container: String, exec_id: String, mut stream: Stream) {
    let mut tasks = TasksClient::new(runtime.inner.containerd.channel());
    while let Some(message) = stream.recv().await {
        let Some((width, height)) = remotecommand::parse_resize(&message) else {
            continue;
        };
        let _ = tasks
            .resize_pty(runtime.inner.containerd.request(
                ResizePtyRequest {
                    container_id: container.clone(),
                    exec_id: exec_id.clone(),
                    width: u32::from(width),
                    height: u32::from(height),
                },
                None,
            ))
            .await;
    }
}

impl Runtime {
    /// Attach: the container's output from now on, read from its CRI log, until the container
    /// exits or the client goes; the client's stdin into the container's stdin FIFO (closing
    /// the container's stdin at its end when the container is `stdin_once`); terminal resizes
    /// to the container's terminal.
    async fn serve_attach(
        &self,
        transport: &mut Transport<'_>,
        request: AttachRequest,
        log_path: PathBuf,
        stdin: Option<PathBuf>,
        stdin_once: bool,
    ) {
        let wants = Wants {
            stdin: stdin.is_some(),
            stdout: request.stdout,
            stderr: request.stderr && !request.tty,
            tty: request.tty,
        };
        let Some(mut streams) = Streams::accept(transport, &wants).await else {
            return;
        };
        // Output from now on: the log's end is found before any input can cause output.
        let mut log = match tokio::fs::File::open(&log_path).await {
            Ok(file) => file,
            Err(error) => {
                streams.finish(&remotecommand::error_status(&format!(
                    "open the container log {}: {error}",
                    log_path.display()
                )));
                return;
            }
        };
        let _ = log.seek_end().await;
        let input = match (stdin, streams.stdin.take()) {
            (Some(path), Some(stream)) => {
                let runtime = self.clone();
                let container_id = request.container_id.clone();
                Some(tokio::spawn(async move {
                    pump_in(path, stream).await;
                    if stdin_once {
                        runtime.end_stdin(&container_id).await;
                        runtime.close_stdin(container_id, String::new()).await;
                    }
                }))
            }
            _ => None,
        };
        let resizer = streams.resize.take().map(|stream| {
            tokio::spawn(resize(
                self.clone(),
                request.container_id.clone(),
                String::new(),
                stream,
            ))
        });
        self.follow_log(transport, &request, log, &streams).await;
        for task in [input, resizer].into_iter().flatten() {
            task.abort();
        }
    }

    /// Tells containerd's runc shim to close the stdin of a container (empty `exec_id`) or an
    /// exec: it holds a writer of the FIFO itself, so closing ours is no end of file.
    async fn close_stdin(&self, container_id: String, exec_id: String) {
        let mut tasks = TasksClient::new(self.inner.containerd.channel());
        let _ = tasks
            .close_io(self.inner.containerd.request(
                CloseIoRequest {
                    container_id,
                    exec_id,
                    stdin: true,
                },
                None,
            ))
            .await;
    }

    /// Sends the container's output recorded in its CRI log past where `file` stands to the
    /// session's streams, until the container stops running or the client goes.
    async fn follow_log(
        &self,
        transport: &Transport<'_>,
        request: &AttachRequest,
        mut file: tokio::fs::File,
        streams: &Streams,
    ) {
        let mut pending = Vec::new();
        let mut buffer = vec![0u8; 32 * 1024];
        let mut quiet = Instant::now();
        loop {
            let read = tokio::select! {
                // The session ends when the client goes.
                () = transport.closed() => return,
                read = file.read(&mut buffer) => read,
            };
            let n = match read {
                Ok(0) => {
                    if quiet.elapsed() > Duration::from_secs(1) {
                        quiet = Instant::now();
                        let running = matches!(
                            self.load_container(&request.container_id).await,
                            Ok(Some(c)) if c.state.phase == Phase::Running
                        );
                        if !running {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(n) => n,
                Err(_) => break,
            };
            pending.extend_from_slice(&buffer[..n]);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let mut fields = line.splitn(4, |b| *b == b' ');
                let (_, stream, tag, body) =
                    (fields.next(), fields.next(), fields.next(), fields.next());
                let body = body.unwrap_or_default();
                let body = body.strip_suffix(b"\n").unwrap_or(body);
                let writer = match stream {
                    Some(b"stdout") => streams.stdout.as_ref(),
                    Some(b"stderr") => streams.stderr.as_ref().or(streams.stdout.as_ref()),
                    _ => None,
                };
                if let Some(writer) = writer {
                    let mut out = body.to_vec();
                    if tag == Some(b"F") {
                        out.push(b'\n');
                    }
                    if writer.send(&out).is_err() {
                        return;
                    }
                }
            }
        }
        streams.finish(&remotecommand::exit_status(0));
    }
}

trait SeekEnd {
    async fn seek_end(&mut self) -> std::io::Result<u64>;
}

impl SeekEnd for tokio::fs::File {
    async fn seek_end(&mut self) -> std::io::Result<u64> {
        use tokio::io::AsyncSeekExt;
        self.seek(std::io::SeekFrom::End(0)).await
    }
}

/// Connects to `port` on the loopback of the network namespace at `netns` (the host's when
/// `None`), from a thread that enters it (a socket stays in the namespace it was made in).
async fn connect_in(netns: Option<PathBuf>, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let connect = || -> std::io::Result<std::net::TcpStream> {
            if let Some(path) = &netns {
                let file = std::fs::File::open(path)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            let timeout = Duration::from_secs(5);
            std::net::TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout)
                .or_else(|_| {
                    std::net::TcpStream::connect_timeout(
                        &SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                        timeout,
                    )
                })
        };
        let _ = sender.send(connect());
    });
    let stream = receiver
        .await
        .map_err(|_| std::io::Error::other("the connecting thread died"))??;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

/// Port-forward: pairs of streams (error, data) per `requestID`, each data stream one
/// connection to its port in the pod.
async fn serve_port_forward(session: &Session, sandbox: &str, netns: Option<PathBuf>) {
    let mut errors: HashMap<String, StreamWriter> = HashMap::new();
    let mut orphans: HashMap<String, Stream> = HashMap::new();
    while let Some(stream) = session.accept().await {
        let kind = header(&stream.headers, remotecommand::STREAM_TYPE).unwrap_or_default();
        let id = header(&stream.headers, portforward::REQUEST_ID)
            .unwrap_or_default()
            .to_owned();
        match kind {
            portforward::ERROR => {
                let writer = stream.writer();
                if let Some(data) = orphans.remove(&id) {
                    tokio::spawn(forward(netns.clone(), sandbox.to_owned(), data, writer));
                } else {
                    errors.insert(id, writer);
                }
            }
            portforward::DATA => match errors.remove(&id) {
                Some(error) => {
                    tokio::spawn(forward(netns.clone(), sandbox.to_owned(), stream, error));
                }
                None => {
                    orphans.insert(id, stream);
                }
            },
            _ => stream.writer().reset(),
        }
    }
}

/// One forwarded connection.
async fn forward(netns: Option<PathBuf>, sandbox: String, mut data: Stream, error: StreamWriter) {
    let port = header(&data.headers, portforward::PORT)
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0);
    let Some(port) = port else {
        let _ = error.send(b"port-forward: the data stream has no valid port header");
        error.close();
        data.close();
        return;
    };
    let conn = match connect_in(netns, port).await {
        Ok(conn) => conn,
        Err(e) => {
            let message =
                format!("error forwarding port {port} to pod sandbox {sandbox}: connect: {e}");
            let _ = error.send(message.as_bytes());
            error.close();
            data.close();
            return;
        }
    };
    let _ = conn.set_nodelay(true);
    let (mut from_pod, mut to_pod) = conn.into_split();
    let writer = data.writer();
    let upstream = tokio::spawn(async move {
        let mut buffer = vec![0u8; 32 * 1024];
        loop {
            match from_pod.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if writer.send(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        writer.close();
    });
    while let Some(chunk) = data.recv().await {
        if to_pod.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = to_pod.shutdown().await;
    let _ = upstream.await;
    error.close();
}
