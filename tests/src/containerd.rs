//! The test-owned containerd, driven through its native gRPC API with `containerd-client`.
//!
//! Each [`ContainerdNs`] works in a containerd namespace of its own, so tests run in parallel without
//! seeing each other, and everything it created (tasks, containers, snapshots, images) is removed
//! when it is dropped.
//!
//! Images reach containerd the two ways the substrate offers: pulled from the local registry (for now
//! by `ctr`, which pulls client-side as containerd 1.6 requires; tug's own pull lands with the runtime
//! shim) or imported straight from the OCI archives that `scripts/build-images` writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use containerd_client::Client;
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, GetImageRequest, KillRequest,
    ReadContentRequest, StartRequest, WaitRequest,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use crate::substrate::Substrate;

/// The snapshotter the test containerd uses (its default).
pub const SNAPSHOTTER: &str = "overlayfs";
/// The runtime every tug container runs on.
pub const RUNTIME: &str = "io.containerd.runc.v2";
/// The type URL containerd expects on a JSON-encoded OCI runtime spec.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A private containerd namespace on the test containerd, emptied and removed on drop.
#[derive(Debug)]
pub struct ContainerdNs {
    client: ClientDebug,
    namespace: String,
    substrate: Substrate,
}

/// `containerd_client::Client` does not implement `Debug`.
struct ClientDebug(Client);

impl std::fmt::Debug for ClientDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("containerd_client::Client")
    }
}

/// What a container printed and how it ended.
#[derive(Debug)]
pub struct Exited {
    /// The exit status containerd reports (128 + signal for a signalled process).
    pub status: u32,
    /// Everything it wrote to stdout and stderr.
    pub output: String,
}

/// How to run one container.
#[derive(Debug, Default)]
pub struct RunSpec {
    /// Replaces the image's command (`CMD`), as a pod's `args` does; the entrypoint stays.
    pub args: Option<Vec<String>>,
    /// A network namespace to join (by path); a fresh empty one when `None`.
    pub netns: Option<PathBuf>,
}

/// The parts of an image a runtime needs to start it.
#[derive(Debug)]
pub struct ImageInfo {
    /// The chain ID of the unpacked rootfs: the snapshot to prepare a container's rootfs from.
    pub chain_id: String,
    /// `Entrypoint` followed by `Cmd` from the image config.
    pub entrypoint: Vec<String>,
    /// `Cmd` from the image config.
    pub cmd: Vec<String>,
    /// `Env` from the image config.
    pub env: Vec<String>,
}

impl ContainerdNs {
    /// Connects to the test containerd and claims a fresh namespace named after `label`.
    pub async fn connect(label: &str) -> ContainerdNs {
        let substrate = Substrate::from_env();
        let client = Client::from_path(&substrate.containerd_sock).await.unwrap_or_else(|e| {
            panic!(
                "connect to the test containerd at {}: {e} (start it with scripts/substrate up)",
                substrate.containerd_sock.display()
            )
        });
        let namespace = format!(
            "tug-test-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let fixture = ContainerdNs {
            client: ClientDebug(client),
            namespace,
            substrate,
        };
        // Everything this fixture creates is held by a lease, so a garbage collection triggered
        // by someone else cannot take a snapshot between Prepare and the container that uses it.
        let expire = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
        let lease = containerd_client::services::v1::CreateRequest {
            id: fixture.lease_id(),
            labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]),
        };
        let mut request = tonic::Request::new(lease);
        let value = fixture
            .namespace
            .parse()
            .expect("namespace is valid metadata");
        request.metadata_mut().insert("containerd-namespace", value);
        fixture
            .client
            .0
            .leases()
            .create(request)
            .await
            .unwrap_or_else(|e| panic!("create lease {}: {e}", fixture.lease_id()));
        fixture
    }

    fn lease_id(&self) -> String {
        format!("{}-lease", self.namespace)
    }

    /// The containerd namespace this fixture works in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Wraps a message in a request carrying this fixture's `containerd-namespace` and
    /// `containerd-lease` metadata.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = self.namespace.parse().expect("namespace is valid metadata");
        request.metadata_mut().insert("containerd-namespace", value);
        let lease = self.lease_id().parse().expect("lease id is valid metadata");
        request.metadata_mut().insert("containerd-lease", lease);
        request
    }

    /// Runs `ctr` against the test containerd in this namespace; panics with its stderr on failure.
    pub fn ctr(&self, args: &[&str]) -> Output {
        ctr(&self.substrate.containerd_sock, &self.namespace, args)
    }

    /// Pulls test image `name` from the local registry over plain HTTP; returns its reference.
    pub fn pull_from_registry(&self, name: &str) -> String {
        let reference = self.substrate.registry_image(name);
        self.ctr(&["images", "pull", "--plain-http", &reference]);
        reference
    }

    /// Imports test image `name` from its OCI archive; returns its reference.
    pub fn import_archive(&self, name: &str) -> String {
        let reference = format!("tug-test/{name}:latest");
        let archive = self.substrate.image_archive(name);
        let archive = archive.to_str().expect("archive path is UTF-8");
        // The archive's `org.opencontainers.image.ref.name` annotation names the image.
        self.ctr(&["images", "import", archive]);
        reference
    }

    /// Reads an image's manifest and config from the content store.
    pub async fn image_info(&self, reference: &str) -> ImageInfo {
        let image = self
            .client
            .0
            .images()
            .get(self.request(GetImageRequest {
                name: reference.to_owned(),
            }))
            .await
            .unwrap_or_else(|e| panic!("get image {reference}: {e}"))
            .into_inner()
            .image
            .unwrap_or_else(|| panic!("image {reference} has no record"));
        let target = image
            .target
            .unwrap_or_else(|| panic!("image {reference} has no target"));
        let mut manifest: Manifest = self.read_json(&target.digest).await;
        if let Some(manifests) = manifest.manifests.take() {
            // An index: pick the entry for this platform.
            let entry = manifests
                .into_iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .unwrap_or_else(|| panic!("image {reference} has no linux/amd64 manifest"));
            manifest = self.read_json(&entry.digest).await;
        }
        let config_digest = manifest
            .config
            .unwrap_or_else(|| panic!("image {reference} has no config"))
            .digest;
        let config: ImageConfig = self.read_json(&config_digest).await;
        let runtime = config.config.unwrap_or_default();
        ImageInfo {
            chain_id: chain_id(&config.rootfs.diff_ids),
            entrypoint: runtime.entrypoint.unwrap_or_default(),
            cmd: runtime.cmd.unwrap_or_default(),
            env: runtime.env.unwrap_or_default(),
        }
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(&self, digest: &str) -> T {
        let mut stream = self
            .client
            .0
            .content()
            .read(self.request(ReadContentRequest {
                digest: digest.to_owned(),
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|e| panic!("read content {digest}: {e}"))
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend(
                chunk
                    .unwrap_or_else(|e| panic!("read content {digest}: {e}"))
                    .data,
            );
        }
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse content {digest}: {e}"))
    }

    /// Creates and starts container `id` from `reference`; returns once its process runs.
    pub async fn start(&self, id: &str, reference: &str, run: RunSpec) {
        let image = self.image_info(reference).await;
        let args = [image.entrypoint, run.args.unwrap_or(image.cmd)].concat();
        assert!(
            !args.is_empty(),
            "image {reference} has no entrypoint or cmd and none was given"
        );
        let spec = oci_spec(id, &self.namespace, &args, &image.env, run.netns.as_deref());

        let mounts = self
            .client
            .0
            .snapshots()
            .prepare(self.request(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.into(),
                parent: image.chain_id.clone(),
                labels: HashMap::new(),
            }))
            .await
            .unwrap_or_else(|e| panic!("prepare snapshot {id} from {}: {e}", image.chain_id))
            .into_inner()
            .mounts;

        let container = Container {
            id: id.into(),
            image: reference.into(),
            runtime: Some(Runtime {
                name: RUNTIME.into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: serde_json::to_vec(&spec).expect("spec serialises"),
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: id.into(),
            ..Default::default()
        };
        self.client
            .0
            .containers()
            .create(self.request(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .unwrap_or_else(|e| panic!("create container {id}: {e}"));

        let log = format!("file://{}", self.log_path(id).display());
        self.client
            .0
            .tasks()
            .create(self.request(CreateTaskRequest {
                container_id: id.into(),
                rootfs: mounts,
                stdout: log.clone(),
                stderr: log,
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|e| panic!("create task {id}: {e}"));
        self.client
            .0
            .tasks()
            .start(self.request(StartRequest {
                container_id: id.into(),
                exec_id: String::new(),
            }))
            .await
            .unwrap_or_else(|e| panic!("start task {id}: {e}"));
    }

    /// Waits (bounded by `timeout`) for container `id`'s process to exit.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Exited {
        let mut tasks = self.client.0.tasks();
        let wait = tasks.wait(self.request(WaitRequest {
            container_id: id.into(),
            exec_id: String::new(),
        }));
        let status = tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| panic!("container {id} did not exit within {timeout:?}"))
            .unwrap_or_else(|e| panic!("wait for task {id}: {e}"))
            .into_inner()
            .exit_status;
        let output = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
        Exited { status, output }
    }

    /// Sends `signal` to container `id`'s process.
    pub async fn kill(&self, id: &str, signal: u32) {
        self.client
            .0
            .tasks()
            .kill(self.request(KillRequest {
                container_id: id.into(),
                signal,
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|e| panic!("kill task {id} with signal {signal}: {e}"));
    }

    /// Runs container `id` from `reference` to completion and returns how it ended.
    pub async fn run_to_exit(&self, id: &str, reference: &str, run: RunSpec) -> Exited {
        self.start(id, reference, run).await;
        self.wait(id, Duration::from_secs(30)).await
    }

    fn log_path(&self, id: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}-{id}.log", self.namespace))
    }
}

impl Drop for ContainerdNs {
    fn drop(&mut self) {
        // Best effort and idempotent (STYLE.md §5): keep cleaning after a failure.
        let sock = &self.substrate.containerd_sock;
        let ns = &self.namespace;
        let list = |what: &str| -> Vec<String> {
            try_ctr(sock, ns, &[what, "ls", "-q"])
                .map(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        for task in list("tasks") {
            let _ = try_ctr(sock, ns, &["tasks", "kill", "-s", "SIGKILL", &task]);
            let _ = try_ctr(sock, ns, &["tasks", "delete", "-f", &task]);
        }
        for container in list("containers") {
            let _ = try_ctr(sock, ns, &["containers", "delete", &container]);
            let _ = std::fs::remove_file(self.log_path(&container));
        }
        for image in list("images") {
            let _ = try_ctr(sock, ns, &["images", "rm", &image]);
        }
        let _ = try_ctr(sock, ns, &["leases", "rm", "--sync", &self.lease_id()]);
        // Garbage collection of content and snapshots is asynchronous; retry the removal briefly.
        for _ in 0..50 {
            if try_ctr(sock, ns, &["namespaces", "remove", ns]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: containerd namespace {ns} could not be removed");
    }
}

fn try_ctr(sock: &Path, namespace: &str, args: &[&str]) -> Result<Output, String> {
    let output = Command::new("ctr")
        .arg("--address")
        .arg(sock)
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .map_err(|e| format!("run ctr {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "ctr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn ctr(sock: &Path, namespace: &str, args: &[&str]) -> Output {
    try_ctr(sock, namespace, args).unwrap_or_else(|e| panic!("{e}"))
}

/// The OCI image spec's chain ID of a layer stack: `ChainID(L0) = DiffID(L0)`,
/// `ChainID(L0|...|Ln) = sha256(ChainID(L0|...|Ln-1) + " " + DiffID(Ln))`.
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut ids = diff_ids.iter();
    let first = ids.next().expect("an image has at least one layer").clone();
    ids.fold(first, |parent, diff_id| {
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{parent} {diff_id}")))
        )
    })
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Option<ManifestDescriptor>,
    manifests: Option<Vec<ManifestDescriptor>>,
}

#[derive(Debug, Deserialize)]
struct ManifestDescriptor {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

#[derive(Debug, Deserialize)]
struct ImageConfig {
    config: Option<RuntimeConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// A minimal OCI runtime spec for a test container: default capabilities, no new privileges, the
/// usual pseudo-filesystems, its own pid/ipc/uts/mount namespaces and either a given network
/// namespace or a fresh one.
fn oci_spec(
    id: &str,
    namespace: &str,
    args: &[String],
    env: &[String],
    netns: Option<&Path>,
) -> serde_json::Value {
    // The CRI default set, as the shim grants it.
    let caps = tug_runtime_shim::spec::DEFAULT_CAPABILITIES;
    let network = match netns {
        Some(path) => serde_json::json!({"type": "network", "path": path}),
        None => serde_json::json!({"type": "network"}),
    };
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "cgroupsPath": format!("/tug-test/{namespace}/{id}"),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, network],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::chain_id;

    #[test]
    fn chain_id_of_one_layer_is_its_diff_id() {
        assert_eq!(chain_id(&["sha256:aa".into()]), "sha256:aa");
    }

    #[test]
    fn chain_id_hashes_parent_space_diff_id() {
        // sha256("sha256:aa sha256:bb"), computed independently with sha256sum.
        assert_eq!(
            chain_id(&["sha256:aa".into(), "sha256:bb".into()]),
            "sha256:b68ad689d6d1ec110ea1c13617437ad6f3766d4b3b309f6a603a222e07a0164f"
        );
    }
}
