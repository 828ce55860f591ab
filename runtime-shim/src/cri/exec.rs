//! ExecSync: a process run in a running container (the kubelet's exec probes and `crictl exec
//! -s`), its stdout and stderr collected through FIFOs the runc shim writes, bounded by the
//! request's timeout.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    DeleteProcessRequest, ExecProcessRequest, KillRequest, StartRequest, WaitRequest,
};
use k8s_cri::v1::{ExecSyncRequest, ExecSyncResponse};
use tonic::Status;

use super::containers::Phase;
use super::runtime::Runtime;
use crate::spec;

/// Output kept per stream; more is read and dropped so the process never blocks on a full pipe.
const MAX_OUTPUT: usize = 16 << 20;
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// Reads a FIFO to its end (opening blocks until the writer opens it), keeping `MAX_OUTPUT` bytes.
fn drain(path: PathBuf) -> Vec<u8> {
    let Ok(mut fifo) = std::fs::File::open(&path) else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match fifo.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    kept
}

/// Creates a FIFO at `path` that only tug (root) can open.
pub(super) fn make_fifo(path: &Path) -> std::io::Result<()> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)
}

/// Unblocks a reader still waiting in `open` for a writer that will never come.
pub(super) fn release(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path);
}

impl Runtime {
    /// ExecSync.
    pub(super) async fn exec_sync(
        &self,
        request: ExecSyncRequest,
    ) -> Result<ExecSyncResponse, Status> {
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument("ExecSync needs a command"));
        }
        let container = self.require_container(&request.container_id).await?;
        if container.state.phase != Phase::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                container.id
            )));
        }
        let exec_id = format!("exec-{}", uuid::Uuid::new_v4().simple());
        let dir = self.inner.state_dir.join("exec").join(&exec_id);
        let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
        let io = |what: &str, e: &dyn std::fmt::Display| {
            Status::internal(format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(|e| io("create exec directory", &e))?;
        for fifo in [&stdout, &stderr] {
            make_fifo(fifo).map_err(|e| io("create FIFO in", &e))?;
        }
        let readers = (
            tokio::task::spawn_blocking({
                let path = stdout.clone();
                move || drain(path)
            }),
            tokio::task::spawn_blocking({
                let path = stderr.clone();
                move || drain(path)
            }),
        );
        let result = self
            .run_exec(
                &container.id,
                &exec_id,
                &container.spec,
                &request,
                &stdout,
                &stderr,
            )
            .await;
        if result.is_err() {
            release(&stdout);
            release(&stderr);
        }
        let collected = tokio::time::timeout(Duration::from_secs(5), async {
            (
                readers.0.await.unwrap_or_default(),
                readers.1.await.unwrap_or_default(),
            )
        })
        .await;
        let (out, err) = match collected {
            Ok(both) => both,
            Err(_) => {
                release(&stdout);
                release(&stderr);
                (Vec::new(), Vec::new())
            }
        };
        self.delete_exec(&container.id, &exec_id).await;
        let _ = std::fs::remove_dir_all(&dir);
        let exit_code = result?;
        Ok(ExecSyncResponse {
            stdout: out,
            stderr: err,
            exit_code,
        })
    }

    async fn run_exec(
        &self,
        container_id: &str,
        exec_id: &str,
        container_spec: &serde_json::Value,
        request: &ExecSyncRequest,
        stdout: &Path,
        stderr: &Path,
    ) -> Result<i32, Status> {
        self.start_exec(
            container_id,
            exec_id,
            container_spec,
            &request.cmd,
            ExecIo {
                stdout: stdout.display().to_string(),
                stderr: stderr.display().to_string(),
                ..Default::default()
            },
        )
        .await?;
        let mut tasks = TasksClient::new(self.inner.containerd.channel());
        let wait = tasks.wait(self.inner.containerd.request(
            WaitRequest {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
            },
            None,
        ));
        let waited = if request.timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(request.timeout as u64), wait).await {
                Ok(waited) => waited,
                Err(_) => {
                    self.kill_exec(container_id, exec_id).await;
                    let _ = TasksClient::new(self.inner.containerd.channel())
                        .wait(self.inner.containerd.request(
                            WaitRequest {
                                container_id: container_id.to_owned(),
                                exec_id: exec_id.to_owned(),
                            },
                            None,
                        ))
                        .await;
                    return Err(Status::deadline_exceeded(format!(
                        "command {:?} in container {container_id} timed out after {} s",
                        request.cmd.join(" "),
                        request.timeout
                    )));
                }
            }
        } else {
            wait.await
        };
        let waited = waited.map_err(|status| {
            Status::new(
                status.code(),
                format!(
                    "wait for {:?} in container {container_id}: {}",
                    request.cmd.join(" "),
                    status.message()
                ),
            )
        })?;
        Ok(waited.into_inner().exit_status as i32)
    }

    /// Creates and starts `cmd` (with the container's process settings) as exec `exec_id` in
    /// `container_id`; errors keep containerd's code and name the command and container.
    pub(super) async fn start_exec(
        &self,
        container_id: &str,
        exec_id: &str,
        container_spec: &serde_json::Value,
        cmd: &[String],
        io: ExecIo,
    ) -> Result<(), Status> {
        let process = spec::exec_process(container_spec, cmd, io.terminal);
        let mut tasks = TasksClient::new(self.inner.containerd.channel());
        let failed = |what: &'static str| {
            let command = cmd.join(" ");
            move |status: Status| {
                Status::new(
                    status.code(),
                    format!(
                        "{what} {command:?} in container {container_id}: {}",
                        status.message()
                    ),
                )
            }
        };
        tasks
            .exec(self.inner.containerd.request(
                ExecProcessRequest {
                    container_id: container_id.to_owned(),
                    stdin: io.stdin,
                    stdout: io.stdout,
                    stderr: io.stderr,
                    terminal: io.terminal,
                    spec: Some(prost_types::Any {
                        type_url: PROCESS_TYPE_URL.into(),
                        value: serde_json::to_vec(&process).expect("process serialises"),
                    }),
                    exec_id: exec_id.to_owned(),
                },
                None,
            ))
            .await
            .map_err(failed("exec"))?;
        tasks
            .start(self.inner.containerd.request(
                StartRequest {
                    container_id: container_id.to_owned(),
                    exec_id: exec_id.to_owned(),
                },
                None,
            ))
            .await
            .map_err(failed("start"))?;
        Ok(())
    }

    /// SIGKILLs exec `exec_id` (best effort).
    pub(super) async fn kill_exec(&self, container_id: &str, exec_id: &str) {
        let _ = TasksClient::new(self.inner.containerd.channel())
            .kill(self.inner.containerd.request(
                KillRequest {
                    container_id: container_id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    signal: nix::sys::signal::Signal::SIGKILL as u32,
                    all: false,
                },
                None,
            ))
            .await;
    }

    /// Removes exec `exec_id` from containerd (best effort).
    pub(super) async fn delete_exec(&self, container_id: &str, exec_id: &str) {
        let _ = TasksClient::new(self.inner.containerd.channel())
            .delete_process(self.inner.containerd.request(
                DeleteProcessRequest {
                    container_id: container_id.to_owned(),
                    exec_id: exec_id.to_owned(),
                },
                None,
            ))
            .await;
    }
}

/// The stdio of a process (an exec, or a container's task): FIFO paths or URIs (empty when
/// absent) and whether it gets a terminal.
#[derive(Debug, Default)]
pub(super) struct ExecIo {
    pub(super) stdin: String,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) terminal: bool,
}
