//! What the runtime has for one pod: its sandboxes and every container instance, found by the
//! `io.kubernetes.pod.uid` label. This is the only record of what runs: a restarted kubelet
//! reads it back and carries on (nothing is restarted, nothing started twice).

use k8s_cri::v1::{
    ContainerFilter, ContainerState, ContainerStatusRequest, ListContainersRequest,
    ListPodSandboxRequest, PodSandboxFilter, PodSandboxState, PodSandboxStatusRequest,
};

use super::translate::{CONTAINER_HASH, GRACE_PERIOD, POD_UID};
use crate::runtime::{Cri, CriError};

/// A container instance's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created, never started.
    Created,
    /// Running.
    Running,
    /// Exited (or failed to start).
    Exited,
    /// The runtime does not know.
    Unknown,
}

/// One sandbox of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Runtime id.
    pub id: String,
    /// Metadata attempt (0 for the first).
    pub attempt: u32,
    /// SANDBOX_READY.
    pub ready: bool,
    /// Creation time, ns.
    pub created_at: i64,
    /// Pod IPs (first is the primary).
    pub ips: Vec<String>,
}

/// One container instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Runtime id.
    pub id: String,
    /// The sandbox it runs in.
    pub sandbox_id: String,
    /// The container's name in the pod spec.
    pub name: String,
    /// Metadata attempt = restart count.
    pub attempt: u32,
    /// State.
    pub state: RunState,
    /// Times, ns since the epoch (0 when not yet).
    pub created_at: i64,
    /// Started.
    pub started_at: i64,
    /// Finished.
    pub finished_at: i64,
    /// Exit code when exited.
    pub exit_code: i32,
    /// Runtime's reason (`Completed`, `Error`, `OOMKilled`, `StartError`).
    pub reason: String,
    /// Runtime's message.
    pub message: String,
    /// The image the kubelet asked for.
    pub image: String,
    /// The image's digest reference.
    pub image_ref: String,
    /// Hash of the spec it was started from.
    pub hash: String,
    /// Log file (absolute).
    pub log_path: String,
    /// The pod's grace period when it was started (for orphans, whose pod is unknown).
    pub grace: Option<i64>,
}

impl Instance {
    /// Whether it ran and stopped (or never could).
    pub fn exited(&self) -> bool {
        matches!(self.state, RunState::Exited | RunState::Unknown)
    }
}

/// Everything the runtime has for one pod; newest first in both lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Sandboxes, newest first.
    pub sandboxes: Vec<Sandbox>,
    /// Container instances, newest first.
    pub instances: Vec<Instance>,
}

impl Observed {
    /// The newest sandbox.
    pub fn current(&self) -> Option<&Sandbox> {
        self.sandboxes.first()
    }

    /// The newest instance of `name` in the current sandbox.
    pub fn latest(&self, name: &str) -> Option<&Instance> {
        let sandbox = self.current()?;
        self.instances
            .iter()
            .find(|i| i.name == name && i.sandbox_id == sandbox.id)
    }

    /// The instance before the newest one of `name` (any sandbox).
    pub fn previous(&self, name: &str) -> Option<&Instance> {
        self.instances.iter().filter(|i| i.name == name).nth(1)
    }

    /// The restart count the next instance of `name` gets.
    pub fn next_attempt(&self, name: &str) -> u32 {
        self.instances
            .iter()
            .filter(|i| i.name == name)
            .map(|i| i.attempt + 1)
            .max()
            .unwrap_or(0)
    }

    /// Running instances (any sandbox).
    pub fn running(&self) -> impl Iterator<Item = &Instance> {
        self.instances
            .iter()
            .filter(|i| matches!(i.state, RunState::Running | RunState::Unknown))
    }
}

/// Reads the pod's sandboxes and containers from the runtime.
pub async fn observe(cri: &Cri, pod_uid: &str) -> Result<Observed, CriError> {
    let mut runtime = cri.runtime().await?;
    let label = std::collections::HashMap::from([(POD_UID.to_owned(), pod_uid.to_owned())]);
    let sandboxes = runtime
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: label.clone(),
                ..Default::default()
            }),
        })
        .await
        .map_err(|e| CriError::call("ListPodSandbox", e))?
        .into_inner()
        .items;
    let mut observed = Observed::default();
    for sandbox in sandboxes {
        let ready = sandbox.state == PodSandboxState::SandboxReady as i32;
        let mut ips = Vec::new();
        if ready
            && let Ok(status) = runtime
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox.id.clone(),
                    verbose: false,
                })
                .await
            && let Some(network) = status.into_inner().status.and_then(|s| s.network)
        {
            ips.extend(Some(network.ip).filter(|ip| !ip.is_empty()));
            ips.extend(network.additional_ips.into_iter().map(|ip| ip.ip));
        }
        observed.sandboxes.push(Sandbox {
            id: sandbox.id,
            attempt: sandbox.metadata.map(|m| m.attempt).unwrap_or(0),
            ready,
            created_at: sandbox.created_at,
            ips,
        });
    }
    observed
        .sandboxes
        .sort_by_key(|s| std::cmp::Reverse((s.attempt, s.created_at)));
    let containers = runtime
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                label_selector: label,
                ..Default::default()
            }),
        })
        .await
        .map_err(|e| CriError::call("ListContainers", e))?
        .into_inner()
        .containers;
    for container in containers {
        let status = match runtime
            .container_status(ContainerStatusRequest {
                container_id: container.id.clone(),
                verbose: false,
            })
            .await
        {
            Ok(reply) => reply.into_inner().status,
            // Removed between the list and the status: it is gone.
            Err(status) if status.code() == tonic::Code::NotFound => continue,
            Err(status) => return Err(CriError::call("ContainerStatus", status)),
        };
        let Some(status) = status else { continue };
        let state = match ContainerState::try_from(status.state) {
            Ok(ContainerState::ContainerCreated) => RunState::Created,
            Ok(ContainerState::ContainerRunning) => RunState::Running,
            Ok(ContainerState::ContainerExited) => RunState::Exited,
            _ => RunState::Unknown,
        };
        let metadata = status.metadata.clone().unwrap_or_default();
        observed.instances.push(Instance {
            id: status.id,
            sandbox_id: container.pod_sandbox_id,
            name: metadata.name,
            attempt: metadata.attempt,
            state,
            created_at: status.created_at,
            started_at: status.started_at,
            finished_at: status.finished_at,
            exit_code: status.exit_code,
            reason: status.reason,
            message: status.message,
            image: status
                .image
                .map(|i| {
                    if i.user_specified_image.is_empty() {
                        i.image
                    } else {
                        i.user_specified_image
                    }
                })
                .unwrap_or_default(),
            image_ref: status.image_ref,
            hash: status
                .annotations
                .get(CONTAINER_HASH)
                .cloned()
                .unwrap_or_default(),
            log_path: status.log_path,
            grace: status
                .annotations
                .get(GRACE_PERIOD)
                .and_then(|g| g.parse().ok()),
        });
    }
    observed
        .instances
        .sort_by_key(|i| std::cmp::Reverse((i.attempt, i.created_at)));
    Ok(observed)
}
