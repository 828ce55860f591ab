//! Containers: created from a CRI config into a containerd container record (OCI spec,
//! snapshot, and the CRI config and state as extensions), run as containerd tasks with the
//! runc v2 shim, logged by `tug shim-logger` (see [`crate::logger`]), and followed through
//! containerd's event stream so exits and OOM kills are recorded even while nobody asks.
//!
//! Lifecycle ([`Phase`]): `Created` → `Running` (StartContainer) → `Exited` (the task exited,
//! was stopped, or failed to start); `RemoveContainer` deletes it from any phase. Every
//! transition happens in one place, under the container's own lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

use containerd_client::events::{TaskExit, TaskOom};
use containerd_client::services::v1::container::Runtime as CdRuntime;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container as CdContainer, CreateTaskRequest, DeleteTaskRequest, GetRequest, KillRequest,
    StartRequest, SubscribeRequest, UpdateTaskRequest, WaitRequest,
};
use containerd_client::types::Mount as CdMount;
use containerd_client::types::v1::{Process, Status as TaskStatus};
use k8s_cri::v1::*;
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::Status;

use super::exec::{ExecIo, make_fifo, release};
use super::records::{self, ignore_not_found};
use super::runtime::{Runtime, Sandbox, now_nanos};
use crate::image::pull::SNAPSHOTTER;
use crate::namespaces;
use crate::spec::{self, ProcessUser, SPEC_TYPE_URL, SpecInput};

const KIND_LABEL: &str = "tug.io/kind";
const SANDBOX_LABEL: &str = "tug.io/sandbox";
const CONFIG_EXTENSION: &str = "tug.io/container-config";
const STATE_EXTENSION: &str = "tug.io/container";
const RESOURCES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
/// The exit code recorded when a container could not start (containerd's CRI uses the same).
const START_FAILED_EXIT: i32 = 128;
/// The exit code recorded when a container's exit status was lost (its task vanished).
const UNKNOWN_EXIT: i32 = 255;

/// Where a container is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Phase {
    /// Created; no process yet.
    Created,
    /// Its process runs.
    Running,
    /// Its process is gone; exit code and reason are recorded.
    Exited,
}

/// What the shim keeps about a container beyond its CRI config.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ContainerState {
    pub(super) sandbox_id: String,
    pub(super) phase: Phase,
    pub(super) created_at: i64,
    pub(super) started_at: i64,
    pub(super) finished_at: i64,
    pub(super) exit_code: i32,
    pub(super) reason: String,
    pub(super) message: String,
    pub(super) image_id: String,
    pub(super) image_ref: String,
    pub(super) log_path: Option<PathBuf>,
    pub(super) cgroups_path: String,
    pub(super) stop_signal: String,
    pub(super) oom_killed: bool,
}

/// A container: its CRI config, its state and its OCI spec.
#[derive(Debug, Clone)]
pub(super) struct Container {
    pub(super) id: String,
    pub(super) config: ContainerConfig,
    pub(super) state: ContainerState,
    pub(super) spec: Value,
}

impl Container {
    /// Where its log writer writes: its CRI log, or nowhere when it has none.
    fn log_target(&self) -> PathBuf {
        self.state
            .log_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("/dev/null"))
    }

    pub(super) fn name(&self) -> String {
        self.config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default()
    }

    fn cri_state(&self) -> ContainerState_ {
        match self.state.phase {
            Phase::Created => ContainerState_::ContainerCreated,
            Phase::Running => ContainerState_::ContainerRunning,
            Phase::Exited => ContainerState_::ContainerExited,
        }
    }
}

use k8s_cri::v1::ContainerState as ContainerState_;

fn containerd_error(what: String) -> impl FnOnce(Status) -> Status {
    move |status| Status::new(status.code(), format!("{what}: {}", status.message()))
}

/// A container task's stdio: FIFO paths or `binary://` URIs, and the output FIFOs a logger
/// waits on (released if the task is never created).
struct TaskIo {
    stdio: ExecIo,
    fifos: Vec<PathBuf>,
}

/// `binary://` stdio for containerd's runc shim: it runs `<logger> shim-logger <path>`.
fn logger_uri(logger: &Path, log_path: &Path) -> String {
    fn encode(text: &str, keep_slash: bool) -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }
    format!(
        "binary://{}?shim-logger={}",
        encode(&logger.to_string_lossy(), true),
        encode(&log_path.to_string_lossy(), false)
    )
}

fn signal_number(name: &str) -> u32 {
    if name.is_empty() {
        return nix::sys::signal::Signal::SIGTERM as u32;
    }
    if let Ok(number) = name.parse::<u32>() {
        return number;
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|s| s as u32)
        .unwrap_or(nix::sys::signal::Signal::SIGTERM as u32)
}

/// Reads the OOM-kill counter of a container's memory cgroup (v1 `memory.oom_control`, v2
/// `memory.events`); `None` when the cgroup is gone.
fn oom_kills(cgroups_path: &str) -> Option<u64> {
    let relative = cgroups_path.trim_start_matches('/');
    let candidates = [
        (
            Path::new("/sys/fs/cgroup/memory")
                .join(relative)
                .join("memory.oom_control"),
            "oom_kill ",
        ),
        (
            Path::new("/sys/fs/cgroup")
                .join(relative)
                .join("memory.events"),
            "oom_kill ",
        ),
    ];
    candidates.iter().find_map(|(path, key)| {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|n| n.trim().parse().ok())
    })
}

fn timestamp_nanos(ts: Option<prost_types::Timestamp>) -> i64 {
    ts.map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos))
        .filter(|n| *n > 0)
        .unwrap_or_else(now_nanos)
}

type Mounts = Vec<CdMount>;

/// Mounts `mounts` (a snapshot view) at `target`, runs `read`, unmounts.
fn with_mounted<T>(
    mounts: &Mounts,
    target: &Path,
    read: impl FnOnce(&Path) -> T,
) -> std::io::Result<T> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let Some(first) = mounts.first() else {
        return Err(std::io::Error::other("the snapshot has no mounts"));
    };
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in &first.options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "bind" => flags |= MsFlags::MS_BIND,
            other => data.push(other.to_owned()),
        }
    }
    let data = data.join(",");
    let kind = if first.r#type == "bind" {
        None
    } else {
        Some(first.r#type.as_str())
    };
    mount(
        Some(first.source.as_str()),
        target,
        kind,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )?;
    let value = read(target);
    let _ = umount2(target, MntFlags::MNT_DETACH);
    Ok(value)
}

impl Runtime {
    pub(super) fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn container_record(&self, container: &Container) -> CdContainer {
        let labels = HashMap::from([
            (KIND_LABEL.to_owned(), "container".to_owned()),
            (SANDBOX_LABEL.to_owned(), container.state.sandbox_id.clone()),
        ]);
        let extensions = HashMap::from([
            (
                CONFIG_EXTENSION.to_owned(),
                prost_types::Any {
                    type_url: "runtime.v1.ContainerConfig".into(),
                    value: container.config.encode_to_vec(),
                },
            ),
            (
                STATE_EXTENSION.to_owned(),
                prost_types::Any {
                    type_url: "tug.io/ContainerState".into(),
                    value: serde_json::to_vec(&container.state).expect("state serialises"),
                },
            ),
        ]);
        CdContainer {
            id: container.id.clone(),
            labels,
            image: container
                .config
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default(),
            runtime: Some(CdRuntime {
                name: "io.containerd.runc.v2".into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: serde_json::to_vec(&container.spec).expect("spec serialises"),
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: container.id.clone(),
            extensions,
            ..Default::default()
        }
    }

    fn decode_container(record: CdContainer) -> Option<Container> {
        if record.labels.get(KIND_LABEL).map(String::as_str) != Some("container") {
            return None;
        }
        let config =
            ContainerConfig::decode(record.extensions.get(CONFIG_EXTENSION)?.value.as_slice())
                .ok()?;
        let state = serde_json::from_slice(&record.extensions.get(STATE_EXTENSION)?.value).ok()?;
        let spec = serde_json::from_slice(&record.spec?.value).ok()?;
        Some(Container {
            id: record.id,
            config,
            state,
            spec,
        })
    }

    pub(super) async fn load_container(&self, id: &str) -> Result<Option<Container>, Status> {
        Ok(records::get(&self.inner.containerd, id)
            .await?
            .and_then(Self::decode_container))
    }

    /// The container `id` names: exactly, or by a unique ID prefix as crictl allows.
    pub(super) async fn require_container(&self, id: &str) -> Result<Container, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("container ID is required"));
        }
        if let Some(container) = self.load_container(id).await? {
            return Ok(container);
        }
        let mut matches: Vec<Container> = self
            .all_containers()
            .await?
            .into_iter()
            .filter(|c| c.id.starts_with(id))
            .collect();
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(Status::not_found(format!("container {id} not found"))),
            n => Err(Status::invalid_argument(format!(
                "container ID prefix {id} matches {n} containers"
            ))),
        }
    }

    async fn save_container(&self, container: &Container) -> Result<(), Status> {
        records::update(
            &self.inner.containerd,
            self.container_record(container),
            &["labels", "extensions", "spec"],
        )
        .await
        .map_err(containerd_error(format!(
            "update container {}",
            container.id
        )))
    }

    pub(super) async fn all_containers(&self) -> Result<Vec<Container>, Status> {
        self.list_records(format!("labels.\"{KIND_LABEL}\"==container"))
            .await
    }

    pub(super) async fn containers_of(&self, sandbox_id: &str) -> Result<Vec<Container>, Status> {
        self.list_records(format!(
            "labels.\"{KIND_LABEL}\"==container,labels.\"{SANDBOX_LABEL}\"=={sandbox_id}"
        ))
        .await
    }

    async fn list_records(&self, filter: String) -> Result<Vec<Container>, Status> {
        Ok(records::list(&self.inner.containerd, filter)
            .await?
            .into_iter()
            .filter_map(Self::decode_container)
            .collect())
    }

    fn emit(&self, container: &Container, kind: ContainerEventType) {
        // Nobody listening is fine.
        let _ = self.inner.events.send(ContainerEventResponse {
            container_id: container.id.clone(),
            container_event_type: kind as i32,
            created_at: now_nanos(),
            pod_sandbox_status: None,
            containers_statuses: vec![cri_status(container)],
        });
    }

    /// Reads `/etc/passwd` and `/etc/group` from an image's layers through a read-only view.
    async fn image_user_files(&self, chain_id: &str) -> Result<(String, String), Status> {
        let key = format!("tug-view-{}", uuid::Uuid::new_v4().simple());
        let mut snapshots = SnapshotsClient::new(self.inner.containerd.channel());
        let mounts = snapshots
            .view(self.inner.containerd.request(
                ViewSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.clone(),
                    parent: chain_id.to_owned(),
                    labels: HashMap::new(),
                },
                None,
            ))
            .await
            .map_err(containerd_error(format!("view image layers {chain_id}")))?
            .into_inner()
            .mounts;
        let target = self.inner.state_dir.join("views").join(&key);
        let files = tokio::task::spawn_blocking({
            let target = target.clone();
            move || {
                std::fs::create_dir_all(&target)?;
                let read = with_mounted(&mounts, &target, |root| {
                    (
                        std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default(),
                        std::fs::read_to_string(root.join("etc/group")).unwrap_or_default(),
                    )
                });
                let _ = std::fs::remove_dir(&target);
                read
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let _ = snapshots
            .remove(self.inner.containerd.request(
                RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key,
                },
                None,
            ))
            .await;
        files.map_err(|e| Status::internal(format!("mount image layers {chain_id}: {e}")))
    }

    /// CreateContainer.
    pub(super) async fn create(
        &self,
        request: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, Status> {
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("CreateContainer needs a config"))?;
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument("the container config needs metadata with a name")
            })?;
        let attempt = config.metadata.as_ref().map(|m| m.attempt).unwrap_or(0);
        let sandbox = self.require(&request.pod_sandbox_id).await?;
        if !sandbox.state.ready {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        if self.containers_of(&sandbox.id).await?.iter().any(|c| {
            c.name() == name && c.config.metadata.as_ref().map(|m| m.attempt) == Some(attempt)
        }) {
            return Err(Status::already_exists(format!(
                "container {name} attempt {attempt} already exists in pod sandbox {}",
                sandbox.id
            )));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(format!("container {name:?} names no image"))
            })?;
        let image = self
            .inner
            .images
            .for_container(&image_name)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "image {image_name} for container {name:?} is not present; pull it first"
                ))
            })?;

        let id =
            uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
        let security = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref());
        let (passwd, group) = if spec::user_needs_image_files(security, &image.config.user) {
            let (p, g) = self.image_user_files(&image.chain_id).await?;
            (Some(p), Some(g))
        } else {
            (None, None)
        };
        let user: ProcessUser = spec::resolve_user(
            &name,
            security,
            &image.config.user,
            passwd.as_deref(),
            group.as_deref(),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let parent = sandbox
            .config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let cgroups_path = spec::cgroups_path(&name, &parent, &id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let pid_namespace = self.pid_namespace_for(&name, &config, &sandbox).await?;
        let sandbox_dir = self.sandbox_dir(&sandbox.id);
        let (resolv, hostname) = (
            sandbox_dir.join("resolv.conf"),
            sandbox_dir.join("hostname"),
        );
        let spec = spec::build(&SpecInput {
            id: &id,
            config: &config,
            sandbox: &sandbox.config,
            netns: sandbox.state.netns.as_deref(),
            ipc: sandbox.state.ipc.as_deref(),
            shm: sandbox.state.shm.as_deref(),
            pid: pid_namespace.as_deref(),
            resolv_conf: resolv.exists().then_some(resolv.as_path()),
            hostname_file: hostname.exists().then_some(hostname.as_path()),
            image: &image.config,
            user,
            cgroups_path: &cgroups_path,
        })
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for mount in &config.mounts {
            // containerd creates a missing host path as a directory; so does tug.
            if !Path::new(&mount.host_path).exists() {
                std::fs::create_dir_all(&mount.host_path).map_err(|e| {
                    Status::invalid_argument(format!(
                        "container {name:?}: create mount source {}: {e}",
                        mount.host_path
                    ))
                })?;
            }
        }
        let log_path = (!config.log_path.is_empty())
            .then(|| Path::new(&sandbox.config.log_directory).join(&config.log_path));
        let container = Container {
            id: id.clone(),
            state: ContainerState {
                sandbox_id: sandbox.id.clone(),
                phase: Phase::Created,
                created_at: now_nanos(),
                started_at: 0,
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
                message: String::new(),
                image_id: image.id.clone(),
                image_ref: image.repo_digest.clone().unwrap_or(image.id.clone()),
                log_path,
                cgroups_path,
                stop_signal: image.config.stop_signal.clone(),
                oom_killed: false,
            },
            config,
            spec,
        };
        records::create(&self.inner.containerd, self.container_record(&container))
            .await
            .map_err(containerd_error(format!("create container {name:?}")))?;
        let mut snapshots = SnapshotsClient::new(self.inner.containerd.channel());
        if let Err(status) = snapshots
            .prepare(self.inner.containerd.request(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: id.clone(),
                    parent: image.chain_id.clone(),
                    labels: HashMap::new(),
                },
                None,
            ))
            .await
        {
            let _ = records::delete(&self.inner.containerd, &id).await;
            return Err(containerd_error(format!(
                "prepare the rootfs of container {name:?} from {}",
                image.chain_id
            ))(status));
        }
        tracing::info!(container = %id, name = %name, sandbox = %sandbox.id, "container created");
        self.emit(&container, ContainerEventType::ContainerCreatedEvent);
        Ok(CreateContainerResponse { container_id: id })
    }

    /// StartContainer.
    pub(super) async fn start(&self, id: &str) -> Result<(), Status> {
        let container = self.require_container(id).await?;
        let lock = self.lock(&container.id);
        let _guard = lock.lock().await;
        let mut container = self.require_container(&container.id).await?;
        if container.state.phase != Phase::Created {
            return Err(Status::failed_precondition(format!(
                "container {} is {:?}, not created; only a created container can start",
                container.id, container.state.phase
            )));
        }
        let sandbox = self.require(&container.state.sandbox_id).await?;
        if !sandbox.state.ready {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} of container {} is not ready",
                sandbox.id, container.id
            )));
        }
        // Taken before the process starts, so a process that exits at once never looks as if
        // it finished before it started.
        let starting = now_nanos();
        match self.create_and_start_task(&container).await {
            Ok(()) => {
                container.state.phase = Phase::Running;
                container.state.started_at = starting;
                self.save_container(&container).await?;
                tracing::info!(container = %container.id, name = %container.name(), "container started");
                self.emit(&container, ContainerEventType::ContainerStartedEvent);
                Ok(())
            }
            Err(status) => {
                let _ = self.delete_task(&container.id).await;
                container.state.phase = Phase::Exited;
                container.state.finished_at = now_nanos();
                container.state.exit_code = START_FAILED_EXIT;
                container.state.reason = "StartError".into();
                container.state.message = status.message().to_owned();
                self.save_container(&container).await?;
                self.emit(&container, ContainerEventType::ContainerStoppedEvent);
                Err(status)
            }
        }
    }

    /// The FIFOs of a container with `stdin: true`.
    fn io_dir(&self, id: &str) -> PathBuf {
        self.inner.state_dir.join("io").join(id)
    }

    /// The FIFO a container with `stdin: true` reads its stdin from.
    pub(super) fn stdin_path(&self, id: &str) -> PathBuf {
        self.io_dir(id).join("stdin")
    }

    /// Plain FIFO stdio for a container with stdin, which containerd's binary stdio cannot give.
    /// The runc shim writes the output FIFOs and reads the stdin FIFO; a `tug shim-logger`
    /// started here, in a process group of its own, turns the output into the CRI log and holds
    /// the stdin FIFO open, so the container's stdin outlives tug shim's restarts.
    async fn fifo_io(&self, container: &Container) -> Result<TaskIo, Status> {
        let dir = self.io_dir(&container.id);
        let failed = |what: &str, e: std::io::Error| {
            Status::internal(format!(
                "{what} for container {} ({}) in {}: {e}",
                container.id,
                container.name(),
                dir.display()
            ))
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| failed("create the FIFO directory", e))?;
        let make = |name: &str| -> Result<PathBuf, Status> {
            let path = dir.join(name);
            make_fifo(&path).map_err(|e| failed(&format!("create the {name} FIFO"), e))?;
            Ok(path)
        };
        let stdin = make("stdin")?;
        let stdout = make("stdout")?;
        let stderr = (!container.config.tty)
            .then(|| make("stderr"))
            .transpose()?;
        let log_path = container.log_target();
        let mut logger = tokio::process::Command::new(&self.inner.logger);
        logger
            .arg("shim-logger")
            .arg(&log_path)
            .arg("--stdout-fifo")
            .arg(&stdout)
            .arg("--stdin-fifo")
            .arg(&stdin)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .process_group(0);
        if let Some(stderr) = &stderr {
            logger.arg("--stderr-fifo").arg(stderr);
        }
        let start = format!("start {} shim-logger", self.inner.logger.display());
        let mut child = logger.spawn().map_err(|e| failed(&start, e))?;
        let not_ready = || {
            failed(
                &start,
                std::io::Error::other("it exited before it was ready"),
            )
        };
        // It closes its stdout once it holds the stdin FIFO.
        let mut ready = child.stdout.take().ok_or_else(not_ready)?;
        let mut rest = Vec::new();
        let waited =
            tokio::time::timeout(Duration::from_secs(10), ready.read_to_end(&mut rest)).await;
        // Reaped here while tug shim runs; after a restart it belongs to init.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let path = |p: &Path| p.display().to_string();
        let io = TaskIo {
            stdio: ExecIo {
                stdin: path(&stdin),
                stdout: path(&stdout),
                stderr: stderr.as_deref().map(path).unwrap_or_default(),
                terminal: container.config.tty,
            },
            fifos: [Some(stdout), stderr].into_iter().flatten().collect(),
        };
        if !matches!(waited, Ok(Ok(_))) {
            for fifo in &io.fifos {
                release(fifo);
            }
            return Err(not_ready());
        }
        Ok(io)
    }

    /// Sends `signal` to the log writer of the container whose log is `log_path`; whether one
    /// was found.
    fn signal_logger(log_path: &Path, signal: nix::sys::signal::Signal) -> Result<bool, Status> {
        let wanted = format!("shim-logger\0{}\0", log_path.display());
        let mut signalled = false;
        for entry in std::fs::read_dir("/proc")
            .map_err(|e| Status::internal(format!("read /proc: {e}")))?
            .flatten()
        {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&wanted) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
                signalled = true;
            }
        }
        Ok(signalled)
    }

    /// Ends the stdin of a container created with stdin (its `stdinOnce` session ended): the
    /// log writer lets go of the FIFO; so does the runc shim, told through CloseIO.
    pub(super) async fn end_stdin(&self, id: &str) {
        if let Ok(Some(container)) = self.load_container(id).await {
            let log_path = container.log_target();
            let _ = Self::signal_logger(&log_path, nix::sys::signal::Signal::SIGUSR2);
        }
    }

    async fn create_and_start_task(&self, container: &Container) -> Result<(), Status> {
        let mut snapshots = SnapshotsClient::new(self.inner.containerd.channel());
        let rootfs = snapshots
            .mounts(self.inner.containerd.request(
                MountsRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: container.id.clone(),
                },
                None,
            ))
            .await
            .map_err(containerd_error(format!(
                "rootfs of container {}",
                container.id
            )))?
            .into_inner()
            .mounts;
        tracing::debug!(container = %container.id, stdin = container.config.stdin, "task stdio");
        let io = if container.config.stdin {
            self.fifo_io(container).await?
        } else {
            // containerd's binary stdio: the runc shim runs `tug shim-logger` itself.
            let (stdout, stderr) = match &container.state.log_path {
                Some(path) => {
                    let uri = logger_uri(&self.inner.logger, path);
                    if container.config.tty {
                        (uri, String::new())
                    } else {
                        (uri.clone(), uri)
                    }
                }
                None => (String::new(), String::new()),
            };
            TaskIo {
                stdio: ExecIo {
                    stdin: String::new(),
                    stdout,
                    stderr,
                    terminal: container.config.tty,
                },
                fifos: Vec::new(),
            }
        };
        let mut tasks = TasksClient::new(self.inner.containerd.channel());
        tasks
            .create(self.inner.containerd.request(
                CreateTaskRequest {
                    container_id: container.id.clone(),
                    rootfs,
                    stdin: io.stdio.stdin,
                    stdout: io.stdio.stdout,
                    stderr: io.stdio.stderr,
                    terminal: io.stdio.terminal,
                    ..Default::default()
                },
                None,
            ))
            .await
            .map_err(|status| {
                // A logger waiting for output FIFOs nobody will write: let it go.
                for fifo in &io.fifos {
                    release(fifo);
                }
                containerd_error(format!(
                    "create the task of container {} ({})",
                    container.id,
                    container.name()
                ))(status)
            })?;
        tasks
            .start(self.inner.containerd.request(
                StartRequest {
                    container_id: container.id.clone(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(containerd_error(format!(
                "start container {} ({})",
                container.id,
                container.name()
            )))?;
        Ok(())
    }

    /// Records that a container's process is gone: exit code and time from containerd (deleting
    /// the task), OOMKilled from the event or the cgroup's counter. Idempotent.
    pub(super) async fn finish(&self, id: &str) -> Result<(), Status> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let Some(mut container) = self.load_container(id).await? else {
            return Ok(());
        };
        if container.state.phase == Phase::Exited {
            return Ok(());
        }
        let oom = oom_kills(&container.state.cgroups_path).is_some_and(|n| n > 0);
        let (exit_code, finished_at, lost) = match self.delete_task(id).await {
            Ok(response) => (
                response.exit_status as i32,
                timestamp_nanos(response.exited_at),
                false,
            ),
            Err(status) if status.code() == tonic::Code::NotFound => {
                (UNKNOWN_EXIT, now_nanos(), true)
            }
            Err(status) => {
                return Err(containerd_error(format!(
                    "delete the task of container {id}"
                ))(status));
            }
        };
        let state = &mut container.state;
        state.phase = Phase::Exited;
        state.finished_at = finished_at;
        state.exit_code = exit_code;
        state.oom_killed |= oom;
        state.reason = if state.oom_killed {
            "OOMKilled".into()
        } else if lost {
            "Unknown".into()
        } else if exit_code == 0 {
            "Completed".into()
        } else {
            "Error".into()
        };
        if lost {
            state.message = "the container's task is gone; its exit status was lost".into();
        }
        if state.started_at == 0 {
            state.started_at = finished_at;
        }
        state.finished_at = state.finished_at.max(state.started_at);
        self.save_container(&container).await?;
        self.inner
            .cpu_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        tracing::info!(container = %id, name = %container.name(), exit_code, reason = %container.state.reason, "container exited");
        self.emit(&container, ContainerEventType::ContainerStoppedEvent);
        Ok(())
    }

    async fn signal(&self, id: &str, signal: u32, all: bool) -> Result<(), Status> {
        let mut tasks = TasksClient::new(self.inner.containerd.channel());
        ignore_not_found(
            tasks
                .kill(self.inner.containerd.request(
                    KillRequest {
                        container_id: id.to_owned(),
                        exec_id: String::new(),
                        signal,
                        all,
                    },
                    None,
                ))
                .await
                .map(|_| ()),
        )
    }

    async fn wait_exit(&self, id: &str, timeout: Duration) -> bool {
        let mut tasks = TasksClient::new(self.inner.containerd.channel());
        let wait = tasks.wait(self.inner.containerd.request(
            WaitRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            },
            None,
        ));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => status.code() == tonic::Code::NotFound,
            Err(_) => false,
        }
    }

    /// StopContainer: the stop signal, `timeout` seconds, then SIGKILL. Stopping a container
    /// that is not running succeeds.
    pub(super) async fn stop(&self, container: &Container, timeout: i64) -> Result<(), Status> {
        if container.state.phase != Phase::Running {
            return Ok(());
        }
        let id = &container.id;
        if timeout > 0 {
            self.signal(id, signal_number(&container.state.stop_signal), false)
                .await?;
            if self
                .wait_exit(id, Duration::from_secs(timeout as u64))
                .await
            {
                return self.finish(id).await;
            }
        }
        self.signal(id, nix::sys::signal::Signal::SIGKILL as u32, true)
            .await?;
        if !self.wait_exit(id, Duration::from_secs(30)).await {
            return Err(Status::deadline_exceeded(format!(
                "container {id} did not exit within 30 s of SIGKILL"
            )));
        }
        self.finish(id).await
    }

    /// Deletes the container's task in containerd (its exit status comes back).
    async fn delete_task(
        &self,
        id: &str,
    ) -> Result<containerd_client::services::v1::DeleteResponse, Status> {
        let mut tasks = TasksClient::new(self.inner.containerd.channel());
        tasks
            .delete(self.inner.containerd.request(
                DeleteTaskRequest {
                    container_id: id.to_owned(),
                },
                None,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// RemoveContainer: kills it if it runs, then deletes the record and its rootfs. Removing
    /// what is gone succeeds.
    pub(super) async fn remove(&self, container: &Container) -> Result<(), Status> {
        self.stop(container, 0).await?;
        // A created container may still have a task record from a failed start.
        let _ = self.delete_task(&container.id).await;
        records::delete(&self.inner.containerd, &container.id)
            .await
            .map_err(containerd_error(format!(
                "delete container {}",
                container.id
            )))?;
        let mut snapshots = SnapshotsClient::new(self.inner.containerd.channel());
        ignore_not_found(
            snapshots
                .remove(self.inner.containerd.request(
                    RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: container.id.clone(),
                    },
                    None,
                ))
                .await
                .map(|_| ()),
        )
        .map_err(containerd_error(format!(
            "remove the rootfs of container {}",
            container.id
        )))?;
        let _ = std::fs::remove_dir_all(self.io_dir(&container.id));
        self.inner
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&container.id);
        self.emit(container, ContainerEventType::ContainerDeletedEvent);
        Ok(())
    }

    /// ListContainers.
    pub(super) async fn list(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<Vec<k8s_cri::v1::Container>, Status> {
        let filter = filter.unwrap_or_default();
        let containers = if filter.pod_sandbox_id.is_empty() {
            self.all_containers().await?
        } else {
            self.containers_of(&filter.pod_sandbox_id).await?
        };
        Ok(containers
            .iter()
            .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
            .filter(|c| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == c.cri_state() as i32)
            })
            .filter(|c| {
                filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| c.config.labels.get(k) == Some(v))
            })
            .map(|c| k8s_cri::v1::Container {
                id: c.id.clone(),
                pod_sandbox_id: c.state.sandbox_id.clone(),
                metadata: c.config.metadata.clone(),
                image: c.config.image.clone(),
                image_ref: c.state.image_ref.clone(),
                state: c.cri_state() as i32,
                created_at: c.state.created_at,
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
                image_id: c.state.image_id.clone(),
            })
            .collect())
    }

    /// UpdateContainerResources: the stored spec always; the running task when there is one.
    pub(super) async fn update_resources(
        &self,
        request: UpdateContainerResourcesRequest,
    ) -> Result<(), Status> {
        let container = self.require_container(&request.container_id).await?;
        let lock = self.lock(&container.id);
        let _guard = lock.lock().await;
        let mut container = self.require_container(&container.id).await?;
        let Some(resources) = request.linux else {
            return Ok(());
        };
        let privileged = container
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .is_some_and(|s| s.privileged);
        let mut linux_resources = spec::resources(Some(&resources), privileged);
        // Device rules are fixed at creation; keep them.
        if let Some(devices) = container.spec.pointer("/linux/resources/devices") {
            linux_resources["devices"] = devices.clone();
        }
        if container.state.phase == Phase::Running {
            let mut tasks = TasksClient::new(self.inner.containerd.channel());
            tasks
                .update(self.inner.containerd.request(
                    UpdateTaskRequest {
                        container_id: container.id.clone(),
                        resources: Some(prost_types::Any {
                            type_url: RESOURCES_TYPE_URL.into(),
                            value:
                                serde_json::to_vec(&linux_resources).expect("resources serialise"),
                        }),
                        annotations: HashMap::new(),
                    },
                    None,
                ))
                .await
                .map_err(containerd_error(format!(
                    "update the resources of container {}",
                    container.id
                )))?;
        }
        container.spec["linux"]["resources"] = linux_resources;
        container.spec["process"]["oomScoreAdj"] =
            serde_json::json!(resources.oom_score_adj.clamp(-1000, 1000));
        container
            .config
            .linux
            .get_or_insert_with(Default::default)
            .resources = Some(resources);
        self.save_container(&container).await
    }

    /// ReopenContainerLog: tells the container's log writer to reopen its file.
    pub(super) async fn reopen_log(&self, id: &str) -> Result<(), Status> {
        let container = self.require_container(id).await?;
        if container.state.phase != Phase::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                container.id
            )));
        }
        let Some(log_path) = &container.state.log_path else {
            return Ok(());
        };
        let signalled = Self::signal_logger(log_path, nix::sys::signal::Signal::SIGUSR1)?;
        if signalled {
            Ok(())
        } else {
            Err(Status::internal(format!(
                "no log writer for container {} ({}) is running",
                container.id,
                log_path.display()
            )))
        }
    }

    /// Follows containerd's task events for this namespace: exits and OOM kills are recorded as
    /// they happen. Reconnects (and re-checks every running container) when the stream breaks.
    pub fn watch_exits(&self) -> tokio::task::JoinHandle<()> {
        let runtime = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(status) = runtime.follow_events().await {
                    tracing::warn!(error = %status, "containerd event stream broke; resubscribing");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    async fn follow_events(&self) -> Result<(), Status> {
        let namespace = self.inner.containerd.namespace().to_owned();
        let mut events = EventsClient::new(self.inner.containerd.channel());
        let mut stream = events
            .subscribe(SubscribeRequest {
                filters: vec![
                    format!("namespace=={namespace},topic==\"/tasks/exit\""),
                    format!("namespace=={namespace},topic==\"/tasks/oom\""),
                ],
            })
            .await?
            .into_inner();
        // Subscribed first, then reconciled: nothing that exits in between is missed.
        self.reconcile().await?;
        while let Some(envelope) = stream.message().await? {
            let Some(event) = envelope.event else {
                continue;
            };
            match envelope.topic.as_str() {
                "/tasks/exit" => {
                    let Ok(exit) = TaskExit::decode(event.value.as_slice()) else {
                        continue;
                    };
                    if exit.id == exit.container_id || exit.id.is_empty() {
                        let runtime = self.clone();
                        tokio::spawn(async move {
                            if let Err(status) = runtime.finish(&exit.container_id).await {
                                tracing::warn!(container = %exit.container_id, error = %status, "recording exit failed");
                            }
                        });
                    }
                }
                "/tasks/oom" => {
                    let Ok(oom) = TaskOom::decode(event.value.as_slice()) else {
                        continue;
                    };
                    let lock = self.lock(&oom.container_id);
                    let _guard = lock.lock().await;
                    if let Some(mut container) = self.load_container(&oom.container_id).await? {
                        container.state.oom_killed = true;
                        self.save_container(&container).await?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Records the exit of every container whose task stopped or vanished while nobody watched
    /// (a shim restart, a lost event stream).
    pub async fn reconcile(&self) -> Result<(), Status> {
        for container in self.all_containers().await? {
            if container.state.phase != Phase::Running {
                continue;
            }
            let stopped = self
                .task(&container.id)
                .await?
                .is_none_or(|p| p.status == TaskStatus::Stopped as i32);
            if stopped {
                self.finish(&container.id).await?;
            }
        }
        Ok(())
    }

    /// The init process of container `id`'s task; `None` when it has no task.
    /// The PID namespace a new container joins: the pod's shared one (mode POD) or its target
    /// container's (mode TARGET, for ephemeral containers); `None` for its own or the node's.
    async fn pid_namespace_for(
        &self,
        name: &str,
        config: &ContainerConfig,
        sandbox: &Sandbox,
    ) -> Result<Option<PathBuf>, Status> {
        let options = spec::namespace_options(config, &sandbox.config);
        match NamespaceMode::try_from(options.pid) {
            Ok(NamespaceMode::Pod) => sandbox
                .state
                .pid
                .as_ref()
                .filter(|ns| namespaces::pid_alive(ns))
                .map(|ns| Some(ns.path.clone()))
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "container {name:?} shares the pod's PID namespace, but sandbox {} has none running (it was not created with PID mode POD, or its pod-init has exited); recreate the sandbox",
                        sandbox.id
                    ))
                }),
            Ok(NamespaceMode::Target) => {
                let target = self.require_container(&options.target_id).await?;
                if target.state.sandbox_id != sandbox.id {
                    return Err(Status::invalid_argument(format!(
                        "container {name:?}: PID namespace target {} is in another sandbox",
                        options.target_id
                    )));
                }
                match self.task(&target.id).await? {
                    Some(task) if task.pid > 0 && target.state.phase == Phase::Running => {
                        Ok(Some(PathBuf::from(format!("/proc/{}/ns/pid", task.pid))))
                    }
                    _ => Err(Status::failed_precondition(format!(
                        "container {name:?}: PID namespace target {} is not running",
                        options.target_id
                    ))),
                }
            }
            _ => Ok(None),
        }
    }

    pub(super) async fn task(&self, id: &str) -> Result<Option<Process>, Status> {
        let mut tasks = TasksClient::new(self.inner.containerd.channel());
        match tasks
            .get(self.inner.containerd.request(
                GetRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
        {
            Ok(response) => Ok(response.into_inner().process),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// GetContainerEvents: a stream of container lifecycle events from now on.
    pub(super) fn subscribe(&self) -> EventStream {
        let receiver = self.inner.events.subscribe();
        Box::pin(
            tokio_stream::wrappers::BroadcastStream::new(receiver)
                .filter_map(|event| event.ok().map(Ok)),
        )
    }
}

pub(super) type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

use tokio_stream::StreamExt;

/// The CRI status of a container.
pub(super) fn cri_status(container: &Container) -> k8s_cri::v1::ContainerStatus {
    let user = container
        .spec
        .pointer("/process/user")
        .map(|u| LinuxContainerUser {
            uid: u["uid"].as_i64().unwrap_or(0),
            gid: u["gid"].as_i64().unwrap_or(0),
            supplemental_groups: u["additionalGids"]
                .as_array()
                .map(|g| g.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default(),
        });
    k8s_cri::v1::ContainerStatus {
        id: container.id.clone(),
        metadata: container.config.metadata.clone(),
        state: container.cri_state() as i32,
        created_at: container.state.created_at,
        started_at: container.state.started_at,
        finished_at: container.state.finished_at,
        exit_code: container.state.exit_code,
        image: container.config.image.clone(),
        image_ref: container.state.image_ref.clone(),
        reason: container.state.reason.clone(),
        message: container.state.message.clone(),
        labels: container.config.labels.clone(),
        annotations: container.config.annotations.clone(),
        mounts: container.config.mounts.clone(),
        log_path: container
            .state
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        resources: container
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|linux| ContainerResources {
                linux: Some(linux),
                windows: None,
            }),
        image_id: container.state.image_id.clone(),
        user: user.map(|linux| ContainerUser { linux: Some(linux) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logger_uri_carries_one_query_key_with_the_encoded_path() {
        assert_eq!(
            logger_uri(
                Path::new("/usr/local/bin/tug"),
                Path::new("/var/log/pods/ns_web_u-1/app/0.log")
            ),
            "binary:///usr/local/bin/tug?shim-logger=%2Fvar%2Flog%2Fpods%2Fns_web_u-1%2Fapp%2F0.log"
        );
        assert!(logger_uri(Path::new("/t"), Path::new("/a b&c")).ends_with("%2Fa%20b%26c"));
    }

    #[test]
    fn stop_signals_parse_by_name_or_number() {
        assert_eq!(signal_number(""), 15);
        assert_eq!(signal_number("SIGQUIT"), 3);
        assert_eq!(signal_number("quit"), 3);
        assert_eq!(signal_number("9"), 9);
        assert_eq!(signal_number("SIGNOPE"), 15);
    }

    #[test]
    fn oom_kills_of_a_missing_cgroup_is_none() {
        assert_eq!(oom_kills("/tug/does-not-exist-anywhere"), None);
    }
}
