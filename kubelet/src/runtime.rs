//! The container runtime as the kubelet's node status sees it: CRI `Status` (RuntimeReady,
//! NetworkReady) and `Version`, over the runtime's Unix socket (`--container-runtime-endpoint`).

use std::path::{Path, PathBuf};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{StatusRequest, VersionRequest};
use tonic::transport::Channel;

use crate::node::RuntimeHealth;

/// A CRI RuntimeService client.
#[derive(Debug, Clone)]
pub struct Cri {
    endpoint: PathBuf,
    client: Option<RuntimeServiceClient<Channel>>,
}

impl Cri {
    /// A client for the socket at `endpoint` (a path, or `unix://` + path). It connects lazily
    /// and reconnects after failures, so a runtime that starts later is found.
    pub fn new(endpoint: &str) -> Cri {
        Cri {
            endpoint: PathBuf::from(endpoint.trim_start_matches("unix://")),
            client: None,
        }
    }

    /// The socket path.
    pub fn endpoint(&self) -> &Path {
        &self.endpoint
    }

    async fn client(&mut self) -> Result<RuntimeServiceClient<Channel>, String> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let channel = containerd_client::connect(&self.endpoint)
            .await
            .map_err(|e| {
                format!(
                    "connect to the container runtime at {}: {e}",
                    self.endpoint.display()
                )
            })?;
        let client = RuntimeServiceClient::new(channel);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// The runtime's health; an unreachable runtime is not ready, with the reason.
    pub async fn health(&mut self) -> RuntimeHealth {
        let mut client = match self.client().await {
            Ok(client) => client,
            Err(message) => {
                return RuntimeHealth {
                    message,
                    ..Default::default()
                };
            }
        };
        let status = match client.status(StatusRequest { verbose: false }).await {
            Ok(status) => status.into_inner(),
            Err(error) => {
                self.client = None;
                return RuntimeHealth {
                    message: format!(
                        "CRI Status on {}: {}",
                        self.endpoint.display(),
                        error.message()
                    ),
                    ..Default::default()
                };
            }
        };
        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        let condition = |kind: &str| conditions.iter().find(|c| c.r#type == kind);
        let ok = |kind: &str| condition(kind).is_some_and(|c| c.status);
        let message = conditions
            .iter()
            .filter(|c| !c.status)
            .map(|c| {
                format!(
                    "{}=false reason:{} message:{}",
                    c.r#type, c.reason, c.message
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let version = client
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .map(|v| {
                let v = v.into_inner();
                format!("{}://{}", v.runtime_name, v.runtime_version)
            })
            .unwrap_or_default();
        RuntimeHealth {
            runtime_ready: ok("RuntimeReady"),
            network_ready: ok("NetworkReady"),
            message,
            version,
        }
    }
}
