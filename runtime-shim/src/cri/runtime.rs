//! The CRI RuntimeService: Version, Status and the pod sandbox lifecycle here; containers in
//! [`super::containers`], exec in [`super::exec`], stats in [`super::stats`].
//!
//! A sandbox is a pinned network namespace (none for hostNetwork pods) attached through CNI, plus
//! its `resolv.conf` and `hostname` files; it needs no pause process or image. Its state lives in
//! containerd — a container record holding the CRI `PodSandboxConfig` (protobuf) and the sandbox
//! state (JSON) as extensions — so a restarted shim finds every sandbox again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use containerd_client::services::v1::Container as CdContainer;
use containerd_client::services::v1::container::Runtime as CdRuntime;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::*;
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::containers::{EventStream, cri_status};
use super::images::Images;
use super::records;
use crate::image::pull::Containerd;
use crate::namespaces;
use crate::network::{Attachment, Cni, NetworkError, result_ips};
use crate::spec::SPEC_TYPE_URL;

const KIND_LABEL: &str = "tug.io/kind";
const STATE_LABEL: &str = "tug.io/sandbox-state";
const CONFIG_EXTENSION: &str = "tug.io/sandbox-config";
const STATE_EXTENSION: &str = "tug.io/sandbox";

/// What a RuntimeService is built from.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// containerd clients in the CRI namespace.
    pub containerd: Containerd,
    /// Images (shared with the ImageService).
    pub images: Images,
    /// The CNI configuration and plugin directories.
    pub cni: Cni,
    /// Where sandbox network namespaces are pinned.
    pub netns_dir: PathBuf,
    /// Where sandbox files (`resolv.conf`, `hostname`) and exec FIFOs live.
    pub state_dir: PathBuf,
    /// The `tug` binary containerd's shim runs as each container's log writer.
    pub logger: PathBuf,
    /// The streaming server (exec, attach, port-forward URLs).
    pub streaming: Arc<super::streaming::Streaming>,
}

/// The RuntimeService.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) containerd: Containerd,
    pub(super) images: Images,
    pub(super) cni: Cni,
    pub(super) netns_dir: PathBuf,
    pub(super) state_dir: PathBuf,
    pub(super) logger: PathBuf,
    pub(super) streaming: Arc<super::streaming::Streaming>,
    pub(super) events: tokio::sync::broadcast::Sender<ContainerEventResponse>,
    pub(super) locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(super) cpu_samples: std::sync::Mutex<HashMap<String, (i64, u64)>>,
}

/// What the shim keeps about a sandbox beyond its CRI config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct SandboxState {
    pub(super) ready: bool,
    created_at: i64,
    pub(super) netns: Option<PathBuf>,
    /// The pod's pinned IPC namespace, unless it uses the node's.
    #[serde(default)]
    pub(super) ipc: Option<PathBuf>,
    /// The pod's shared `/dev/shm` (a tmpfs), unless it uses the node's.
    #[serde(default)]
    pub(super) shm: Option<PathBuf>,
    /// The pod's shared PID namespace and its init, for `shareProcessNamespace` pods.
    #[serde(default)]
    pub(super) pid: Option<namespaces::PidNamespace>,
    cni_result: Option<serde_json::Value>,
    ips: Vec<String>,
}

pub(super) struct Sandbox {
    pub(super) id: String,
    pub(super) config: PodSandboxConfig,
    pub(super) state: SandboxState,
}

fn network_status(error: &NetworkError) -> Status {
    match error {
        NetworkError::NotConfigured { .. } | NetworkError::PluginNotFound { .. } => {
            Status::failed_precondition(error.to_string())
        }
        NetworkError::Plugin { .. } | NetworkError::Exec { .. } => {
            Status::internal(error.to_string())
        }
    }
}

/// The size of a pod's `/dev/shm`, as containerd's CRI makes it (64 MiB).
const SHM_SIZE_KIB: u64 = 64 * 1024;

fn namespace_options(config: &PodSandboxConfig) -> Option<&NamespaceOption> {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
}

/// Whether the pod uses the node's IPC namespace (`hostIPC`).
fn host_ipc(config: &PodSandboxConfig) -> bool {
    namespace_options(config).is_some_and(|n| n.ipc == NamespaceMode::Node as i32)
}

/// Whether the pod's containers may share a PID namespace: mode POD, which is also the CRI's
/// default when the sandbox gives no namespace options (the kubelet always gives them).
fn pod_pid(config: &PodSandboxConfig) -> bool {
    namespace_options(config).is_none_or(|n| n.pid == NamespaceMode::Pod as i32)
}

fn host_network(config: &PodSandboxConfig) -> bool {
    namespace_options(config).is_some_and(|n| n.network == NamespaceMode::Node as i32)
}

pub(super) fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn unimplemented<T>(call: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{call} is not implemented by tug shim yet (issue #5)"
    )))
}

/// The `resolv.conf` of a sandbox: its DNS config, or the host's when it gives none (as
/// containerd does for `dnsPolicy: Default` pods that the kubelet hands no servers).
pub fn resolv_conf(dns: Option<&DnsConfig>, host: &str) -> String {
    let Some(dns) =
        dns.filter(|d| !d.servers.is_empty() || !d.searches.is_empty() || !d.options.is_empty())
    else {
        return host.to_owned();
    };
    let mut out = String::new();
    if !dns.searches.is_empty() {
        out.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for server in &dns.servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    out
}

impl Runtime {
    /// A RuntimeService keeping sandboxes and containers in containerd's namespace. Call
    /// [`Runtime::watch_exits`] to follow containers exiting.
    pub fn new(config: RuntimeConfig) -> Runtime {
        let (events, _) = tokio::sync::broadcast::channel(1024);
        Runtime {
            inner: Arc::new(Inner {
                containerd: config.containerd,
                images: config.images,
                cni: config.cni,
                netns_dir: config.netns_dir,
                state_dir: config.state_dir,
                logger: config.logger,
                streaming: config.streaming,
                events,
                locks: std::sync::Mutex::new(HashMap::new()),
                cpu_samples: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The directory holding a sandbox's `resolv.conf` and `hostname`.
    pub(super) fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.inner.state_dir.join("sandboxes").join(id)
    }

    fn write_sandbox_files(&self, sandbox: &Sandbox) -> Result<(), Status> {
        let dir = self.sandbox_dir(&sandbox.id);
        let io = |what: &str, e: std::io::Error| {
            Status::internal(format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(|e| io("create sandbox directory", e))?;
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        std::fs::write(
            dir.join("resolv.conf"),
            resolv_conf(sandbox.config.dns_config.as_ref(), &host),
        )
        .map_err(|e| io("write resolv.conf in", e))?;
        let hostname = if host_network(&sandbox.config) {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            sandbox.config.hostname.clone()
        };
        std::fs::write(dir.join("hostname"), format!("{hostname}\n"))
            .map_err(|e| io("write hostname in", e))?;
        Ok(())
    }

    /// Gives the pod an IPC namespace and a `/dev/shm` of its own for its containers to share,
    /// unless it uses the node's IPC namespace (then containers get the node's `/dev/shm`).
    fn share_ipc(&self, sandbox: &mut Sandbox) -> Result<(), Status> {
        if host_ipc(&sandbox.config) {
            return Ok(());
        }
        let dir = self.sandbox_dir(&sandbox.id);
        let ipc =
            namespaces::create_ipc(&dir, "ipc").map_err(|e| Status::internal(e.to_string()))?;
        sandbox.state.ipc = Some(ipc);
        let shm = dir.join("shm");
        namespaces::mount_shm(&shm, SHM_SIZE_KIB).map_err(|e| Status::internal(e.to_string()))?;
        sandbox.state.shm = Some(shm);
        Ok(())
    }

    /// Gives a `shareProcessNamespace` pod a PID namespace of its own, held by `tug pod-init`
    /// (the pause container's part in such a pod).
    fn share_pid(&self, sandbox: &mut Sandbox) -> Result<(), Status> {
        if !pod_pid(&sandbox.config) {
            return Ok(());
        }
        let dir = self.sandbox_dir(&sandbox.id);
        let pid = namespaces::create_pid(&dir, "pid", &self.inner.logger, &["pod-init"])
            .map_err(|e| Status::internal(e.to_string()))?;
        sandbox.state.pid = Some(pid);
        Ok(())
    }

    /// Ends the pod's shared PID namespace (and whatever still runs in it), as stopping the
    /// pause container does. Already gone is fine.
    async fn stop_pid(sandbox: &Sandbox) -> Result<(), Status> {
        let Some(pid) = sandbox.state.pid.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || namespaces::stop_pid(&pid))
            .await
            .map_err(|e| Status::internal(format!("stop the pod's PID namespace: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// Undoes [`Self::share_ipc`] and [`Self::share_pid`] (after [`Self::stop_pid`]). Already
    /// gone is fine.
    fn release_namespaces(&self, sandbox: &Sandbox) -> Result<(), Status> {
        if let Some(pid) = &sandbox.state.pid {
            namespaces::remove(&pid.path).map_err(|e| Status::internal(e.to_string()))?;
        }
        if let Some(shm) = &sandbox.state.shm {
            namespaces::unmount_shm(shm).map_err(|e| Status::internal(e.to_string()))?;
        }
        if let Some(ipc) = &sandbox.state.ipc {
            namespaces::remove(ipc).map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(())
    }

    fn record(&self, sandbox: &Sandbox) -> CdContainer {
        let mut labels = HashMap::from([(KIND_LABEL.to_owned(), "sandbox".to_owned())]);
        labels.insert(
            STATE_LABEL.into(),
            if sandbox.state.ready {
                "ready".into()
            } else {
                "notready".into()
            },
        );
        let extensions = HashMap::from([
            (
                CONFIG_EXTENSION.to_owned(),
                prost_types::Any {
                    type_url: "runtime.v1.PodSandboxConfig".into(),
                    value: sandbox.config.encode_to_vec(),
                },
            ),
            (
                STATE_EXTENSION.to_owned(),
                prost_types::Any {
                    type_url: "tug.io/SandboxState".into(),
                    value: serde_json::to_vec(&sandbox.state).expect("state serialises"),
                },
            ),
        ]);
        CdContainer {
            id: sandbox.id.clone(),
            labels,
            runtime: Some(CdRuntime {
                name: "io.containerd.runc.v2".into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: b"{}".to_vec(),
            }),
            extensions,
            ..Default::default()
        }
    }

    fn decode(record: CdContainer) -> Option<Sandbox> {
        if record.labels.get(KIND_LABEL).map(String::as_str) != Some("sandbox") {
            return None;
        }
        let config =
            PodSandboxConfig::decode(record.extensions.get(CONFIG_EXTENSION)?.value.as_slice())
                .ok()?;
        let state = serde_json::from_slice(&record.extensions.get(STATE_EXTENSION)?.value).ok()?;
        Some(Sandbox {
            id: record.id,
            config,
            state,
        })
    }

    pub(super) async fn load(&self, id: &str) -> Result<Option<Sandbox>, Status> {
        Ok(records::get(&self.inner.containerd, id)
            .await?
            .and_then(Self::decode))
    }

    pub(super) async fn require(&self, id: &str) -> Result<Sandbox, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("pod sandbox ID is required"));
        }
        self.load(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found")))
    }

    async fn save(&self, sandbox: &Sandbox) -> Result<(), Status> {
        records::update(
            &self.inner.containerd,
            self.record(sandbox),
            &["labels", "extensions"],
        )
        .await
    }

    pub(super) async fn all(&self) -> Result<Vec<Sandbox>, Status> {
        let filter = format!("labels.\"{KIND_LABEL}\"==sandbox");
        Ok(records::list(&self.inner.containerd, filter)
            .await?
            .into_iter()
            .filter_map(Self::decode)
            .collect())
    }

    fn attachment(sandbox: &Sandbox, netns: &std::path::Path) -> Attachment {
        let metadata = sandbox.config.metadata.clone().unwrap_or_default();
        let ports: Vec<serde_json::Value> = sandbox
            .config
            .port_mappings
            .iter()
            .filter(|p| p.host_port > 0)
            .map(|p| {
                let protocol = match Protocol::try_from(p.protocol) {
                    Ok(Protocol::Udp) => "udp",
                    Ok(Protocol::Sctp) => "sctp",
                    _ => "tcp",
                };
                serde_json::json!({"hostPort": p.host_port, "containerPort": p.container_port, "protocol": protocol, "hostIP": p.host_ip})
            })
            .collect();
        let mut capabilities = std::collections::BTreeMap::new();
        if !ports.is_empty() {
            capabilities.insert("portMappings".to_owned(), serde_json::Value::Array(ports));
        }
        Attachment {
            container_id: sandbox.id.clone(),
            netns: netns.to_owned(),
            ifname: "eth0".into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), metadata.namespace),
                ("K8S_POD_NAME".into(), metadata.name),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), sandbox.id.clone()),
                ("K8S_POD_UID".into(), metadata.uid),
            ],
            capabilities,
        }
    }

    /// Detaches and unpins the sandbox's network; idempotent.
    async fn release_network(&self, sandbox: &mut Sandbox) -> Result<(), Status> {
        if let Some(netns) = sandbox.state.netns.clone()
            && (sandbox.state.cni_result.is_some() || !sandbox.state.ips.is_empty())
        {
            let list = self.inner.cni.load().map_err(|e| network_status(&e))?;
            self.inner
                .cni
                .del(
                    &list,
                    &Self::attachment(sandbox, &netns),
                    sandbox.state.cni_result.as_ref(),
                )
                .await
                .map_err(|e| network_status(&e))?;
            sandbox.state.cni_result = None;
            sandbox.state.ips.clear();
        }
        Ok(())
    }
}

fn cri_sandbox(sandbox: &Sandbox) -> PodSandbox {
    PodSandbox {
        id: sandbox.id.clone(),
        metadata: sandbox.config.metadata.clone(),
        // A shared PID namespace whose init is gone cannot take containers any more: the
        // sandbox is NotReady and the kubelet recreates it, as when a pause container dies.
        state: if sandbox.state.ready
            && sandbox.state.pid.as_ref().is_none_or(namespaces::pid_alive)
        {
            PodSandboxState::SandboxReady
        } else {
            PodSandboxState::SandboxNotready
        } as i32,
        created_at: sandbox.state.created_at,
        labels: sandbox.config.labels.clone(),
        annotations: sandbox.config.annotations.clone(),
        runtime_handler: String::new(),
    }
}

#[tonic::async_trait]
impl RuntimeService for Runtime {
    async fn version(
        &self,
        _request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "tug".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let runtime = self.all().await;
        let network = self.inner.cni.load();
        let conditions = vec![
            RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: runtime.is_ok(),
                reason: if runtime.is_ok() {
                    String::new()
                } else {
                    "ContainerdUnreachable".into()
                },
                message: runtime.err().map(|e| e.to_string()).unwrap_or_default(),
            },
            RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: network.is_ok(),
                reason: if network.is_ok() {
                    String::new()
                } else {
                    "NetworkPluginNotReady".into()
                },
                message: network.err().map(|e| e.to_string()).unwrap_or_default(),
            },
        ];
        Ok(Response::new(StatusResponse {
            status: Some(RuntimeStatus { conditions }),
            ..Default::default()
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<RunPodSandboxRequest>,
    ) -> Result<Response<RunPodSandboxResponse>, Status> {
        let config = request
            .into_inner()
            .config
            .ok_or_else(|| Status::invalid_argument("RunPodSandbox needs a config"))?;
        let metadata = config
            .metadata
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("the sandbox config needs metadata"))?;
        if metadata.name.is_empty() || metadata.namespace.is_empty() || metadata.uid.is_empty() {
            return Err(Status::invalid_argument(
                "sandbox metadata needs a name, namespace and uid",
            ));
        }
        let id = format!("{:032x}{:032x}", rand_u128(), rand_u128());
        let mut sandbox = Sandbox {
            id: id.clone(),
            config,
            state: SandboxState {
                ready: true,
                created_at: now_nanos(),
                netns: None,
                ipc: None,
                shm: None,
                pid: None,
                cni_result: None,
                ips: Vec::new(),
            },
        };
        if !host_network(&sandbox.config) {
            let list = self.inner.cni.load().map_err(|e| network_status(&e))?;
            let netns = namespaces::create(&self.inner.netns_dir, &format!("tug-{}", &id[..16]))
                .map_err(|e| Status::internal(e.to_string()))?;
            match self
                .inner
                .cni
                .add(&list, &Self::attachment(&sandbox, &netns))
                .await
            {
                Ok(result) => {
                    sandbox.state.ips = result_ips(&result);
                    sandbox.state.cni_result = Some(result);
                    sandbox.state.netns = Some(netns);
                }
                Err(error) => {
                    let _ = namespaces::remove(&netns);
                    return Err(network_status(&error));
                }
            }
        }
        let created = match self
            .write_sandbox_files(&sandbox)
            .and_then(|()| self.share_ipc(&mut sandbox))
            .and_then(|()| self.share_pid(&mut sandbox))
        {
            Ok(()) => records::create(&self.inner.containerd, self.record(&sandbox)).await,
            Err(status) => Err(status),
        };
        if let Err(status) = created {
            let _ = Self::stop_pid(&sandbox).await;
            let _ = self.release_namespaces(&sandbox);
            let _ = std::fs::remove_dir_all(self.sandbox_dir(&id));
            let _ = self.release_network(&mut sandbox).await;
            if let Some(netns) = &sandbox.state.netns {
                let _ = namespaces::remove(netns);
            }
            return Err(status);
        }
        tracing::info!(sandbox = %id, pod = %sandbox.config.metadata.as_ref().map(|m| format!("{}/{}", m.namespace, m.name)).unwrap_or_default(), ips = ?sandbox.state.ips, "sandbox ready");
        Ok(Response::new(RunPodSandboxResponse { pod_sandbox_id: id }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<StopPodSandboxRequest>,
    ) -> Result<Response<StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        // Idempotent: stopping what is gone succeeds.
        let Some(mut sandbox) = self.load(&id).await? else {
            return Ok(Response::new(StopPodSandboxResponse {}));
        };
        // Every container in the sandbox is killed first (containerd's CRI does the same: the
        // kubelet has already stopped them gracefully).
        for container in self.containers_of(&id).await? {
            self.stop(&container, 0).await?;
        }
        Self::stop_pid(&sandbox).await?;
        self.release_network(&mut sandbox).await?;
        sandbox.state.ready = false;
        self.save(&sandbox).await?;
        Ok(Response::new(StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<RemovePodSandboxRequest>,
    ) -> Result<Response<RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let Some(mut sandbox) = self.load(&id).await? else {
            return Ok(Response::new(RemovePodSandboxResponse {}));
        };
        for container in self.containers_of(&id).await? {
            self.remove(&container).await?;
        }
        self.release_network(&mut sandbox).await?;
        Self::stop_pid(&sandbox).await?;
        self.release_namespaces(&sandbox)?;
        match std::fs::remove_dir_all(self.sandbox_dir(&id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "remove {}: {e}",
                    self.sandbox_dir(&id).display()
                )));
            }
        }
        if let Some(netns) = &sandbox.state.netns {
            namespaces::remove(netns).map_err(|e| Status::internal(e.to_string()))?;
        }
        records::delete(&self.inner.containerd, &id).await?;
        Ok(Response::new(RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<PodSandboxStatusRequest>,
    ) -> Result<Response<PodSandboxStatusResponse>, Status> {
        let sandbox = self.require(&request.into_inner().pod_sandbox_id).await?;
        let mut ips = sandbox.state.ips.iter();
        let network = PodSandboxNetworkStatus {
            ip: ips.next().cloned().unwrap_or_default(),
            additional_ips: ips.map(|ip| PodIp { ip: ip.clone() }).collect(),
        };
        let options = namespace_options(&sandbox.config).cloned();
        let base = cri_sandbox(&sandbox);
        let status = PodSandboxStatus {
            id: base.id,
            metadata: base.metadata,
            state: base.state,
            created_at: base.created_at,
            network: Some(network),
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace { options }),
            }),
            labels: base.labels,
            annotations: base.annotations,
            runtime_handler: String::new(),
        };
        Ok(Response::new(PodSandboxStatusResponse {
            status: Some(status),
            ..Default::default()
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<ListPodSandboxRequest>,
    ) -> Result<Response<ListPodSandboxResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let items = self
            .all()
            .await?
            .iter()
            .map(cri_sandbox)
            .filter(|s| filter.id.is_empty() || s.id.starts_with(&filter.id))
            .filter(|s| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|want| want.state == s.state)
            })
            .filter(|s| {
                filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| s.labels.get(k) == Some(v))
            })
            .collect();
        Ok(Response::new(ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        self.create(request.into_inner()).await.map(Response::new)
    }
    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        self.start(&request.into_inner().container_id).await?;
        Ok(Response::new(StartContainerResponse {}))
    }
    async fn stop_container(
        &self,
        request: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        let request = request.into_inner();
        // Idempotent: stopping what is gone succeeds.
        if let Some(container) = self.load_container(&request.container_id).await? {
            self.stop(&container, request.timeout).await?;
        }
        Ok(Response::new(StopContainerResponse {}))
    }
    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        if let Some(container) = self
            .load_container(&request.into_inner().container_id)
            .await?
        {
            self.remove(&container).await?;
        }
        Ok(Response::new(RemoveContainerResponse {}))
    }
    async fn list_containers(
        &self,
        request: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        let containers = self.list(request.into_inner().filter).await?;
        Ok(Response::new(ListContainersResponse { containers }))
    }
    async fn container_status(
        &self,
        request: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        let container = self
            .require_container(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(ContainerStatusResponse {
            status: Some(cri_status(&container)),
            info: Default::default(),
        }))
    }
    async fn update_container_resources(
        &self,
        request: Request<UpdateContainerResourcesRequest>,
    ) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        self.update_resources(request.into_inner()).await?;
        Ok(Response::new(UpdateContainerResourcesResponse {}))
    }
    async fn reopen_container_log(
        &self,
        request: Request<ReopenContainerLogRequest>,
    ) -> Result<Response<ReopenContainerLogResponse>, Status> {
        self.reopen_log(&request.into_inner().container_id).await?;
        Ok(Response::new(ReopenContainerLogResponse {}))
    }
    async fn exec_sync(
        &self,
        request: Request<ExecSyncRequest>,
    ) -> Result<Response<ExecSyncResponse>, Status> {
        Runtime::exec_sync(self, request.into_inner())
            .await
            .map(Response::new)
    }
    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        let url = self.exec_url(request.into_inner()).await?;
        Ok(Response::new(ExecResponse { url }))
    }
    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        let url = self.attach_url(request.into_inner()).await?;
        Ok(Response::new(AttachResponse { url }))
    }
    async fn port_forward(
        &self,
        request: Request<PortForwardRequest>,
    ) -> Result<Response<PortForwardResponse>, Status> {
        let url = self
            .port_forward_url(&request.into_inner().pod_sandbox_id)
            .await?;
        Ok(Response::new(PortForwardResponse { url }))
    }
    async fn container_stats(
        &self,
        request: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        let container = self
            .require_container(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(ContainerStatsResponse {
            stats: Some(self.stats_of(&container).await),
        }))
    }
    async fn list_container_stats(
        &self,
        request: Request<ListContainerStatsRequest>,
    ) -> Result<Response<ListContainerStatsResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let containers = if filter.pod_sandbox_id.is_empty() {
            self.all_containers().await?
        } else {
            self.containers_of(&filter.pod_sandbox_id).await?
        };
        let mut stats = Vec::new();
        for container in containers
            .iter()
            .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
            .filter(|c| {
                filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| c.config.labels.get(k) == Some(v))
            })
        {
            stats.push(self.stats_of(container).await);
        }
        Ok(Response::new(ListContainerStatsResponse { stats }))
    }
    async fn pod_sandbox_stats(
        &self,
        request: Request<PodSandboxStatsRequest>,
    ) -> Result<Response<PodSandboxStatsResponse>, Status> {
        let sandbox = self.require(&request.into_inner().pod_sandbox_id).await?;
        Ok(Response::new(PodSandboxStatsResponse {
            stats: Some(self.sandbox_stats(&sandbox).await?),
        }))
    }
    async fn list_pod_sandbox_stats(
        &self,
        request: Request<ListPodSandboxStatsRequest>,
    ) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        for sandbox in self.all().await? {
            if (!filter.id.is_empty() && !sandbox.id.starts_with(&filter.id))
                || !filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| sandbox.config.labels.get(k) == Some(v))
            {
                continue;
            }
            stats.push(self.sandbox_stats(&sandbox).await?);
        }
        Ok(Response::new(ListPodSandboxStatsResponse { stats }))
    }
    async fn update_runtime_config(
        &self,
        _: Request<UpdateRuntimeConfigRequest>,
    ) -> Result<Response<UpdateRuntimeConfigResponse>, Status> {
        Ok(Response::new(UpdateRuntimeConfigResponse {}))
    }
    async fn checkpoint_container(
        &self,
        _: Request<CheckpointContainerRequest>,
    ) -> Result<Response<CheckpointContainerResponse>, Status> {
        unimplemented("CheckpointContainer")
    }
    type GetContainerEventsStream = EventStream;
    async fn get_container_events(
        &self,
        _: Request<GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Ok(Response::new(self.subscribe()))
    }
    async fn list_metric_descriptors(
        &self,
        _: Request<ListMetricDescriptorsRequest>,
    ) -> Result<Response<ListMetricDescriptorsResponse>, Status> {
        unimplemented("ListMetricDescriptors")
    }
    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<ListPodSandboxMetricsRequest>,
    ) -> Result<Response<ListPodSandboxMetricsResponse>, Status> {
        unimplemented("ListPodSandboxMetrics")
    }
    async fn runtime_config(
        &self,
        _: Request<RuntimeConfigRequest>,
    ) -> Result<Response<RuntimeConfigResponse>, Status> {
        Ok(Response::new(RuntimeConfigResponse {
            linux: Some(LinuxRuntimeConfiguration {
                cgroup_driver: CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}

fn rand_u128() -> u128 {
    u128::from_le_bytes(*uuid::Uuid::new_v4().as_bytes())
}
