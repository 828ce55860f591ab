//! The container runtime over the CRI (`--container-runtime-endpoint`): one connection for the
//! RuntimeService and the ImageService, and the runtime's health as node status sees it
//! (`Status`: RuntimeReady, NetworkReady; `Version`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{StatusRequest, VersionRequest};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::metrics::{Metrics, operation_type};
use crate::node::RuntimeHealth;

/// A CRI client (RuntimeService and ImageService) on one connection.
#[derive(Debug, Clone)]
pub struct Cri {
    endpoint: PathBuf,
    channel: Arc<Mutex<Option<Channel>>>,
    metrics: Arc<Metrics>,
}

/// The connection to the runtime, counting and timing every call by its operation type
/// (`kubelet_runtime_operations_total`, `…_errors_total`, `…_duration_seconds`).
#[derive(Debug, Clone)]
pub struct Instrumented {
    inner: Channel,
    metrics: Arc<Metrics>,
}

type Response = http::Response<tonic::body::Body>;

impl tower::Service<http::Request<tonic::body::Body>> for Instrumented {
    type Response = Response;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let operation = operation_type(request.uri().path().rsplit('/').next().unwrap_or(""));
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = tower::Service::call(&mut self.inner, request);
        Box::pin(async move {
            let result = call.await;
            // An error answer comes trailers-only: its grpc-status is among the headers.
            let failed = match &result {
                Ok(response) => {
                    !response.status().is_success()
                        || response
                            .headers()
                            .get("grpc-status")
                            .is_some_and(|s| s.as_bytes() != b"0")
                }
                Err(_) => true,
            };
            let labels = [("operation_type", operation.as_str())];
            metrics.inc("kubelet_runtime_operations_total", &labels);
            if failed {
                metrics.inc("kubelet_runtime_operations_errors_total", &labels);
            }
            metrics.observe(
                "kubelet_runtime_operations_duration_seconds",
                &labels,
                started.elapsed().as_secs_f64(),
            );
            result
        })
    }
}

/// A failed CRI call, naming the call and the runtime's answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{call}: {message}")]
pub struct CriError {
    /// The RPC (or `connect`).
    pub call: &'static str,
    /// The gRPC code.
    pub code: tonic::Code,
    /// The runtime's message.
    pub message: String,
}

impl CriError {
    /// A failed call.
    pub fn call(call: &'static str, status: tonic::Status) -> CriError {
        CriError {
            call,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

impl Cri {
    /// A client for the socket at `endpoint` (a path, or `unix://` + path). It connects lazily
    /// and reconnects after failures, so a runtime that starts later is found.
    pub fn new(endpoint: &str) -> Cri {
        Cri {
            endpoint: PathBuf::from(endpoint.trim_start_matches("unix://")),
            channel: Arc::new(Mutex::new(None)),
            metrics: Arc::default(),
        }
    }

    /// The kubelet's metrics (the CRI client is where they start).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The socket path.
    pub fn endpoint(&self) -> &Path {
        &self.endpoint
    }

    async fn channel(&self) -> Result<Instrumented, CriError> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = &*slot {
            return Ok(self.instrumented(channel.clone()));
        }
        let channel = containerd_client::connect(&self.endpoint)
            .await
            .map_err(|e| CriError {
                call: "connect",
                code: tonic::Code::Unavailable,
                message: format!(
                    "connect to the container runtime at {}: {e}",
                    self.endpoint.display()
                ),
            })?;
        *slot = Some(channel.clone());
        Ok(self.instrumented(channel))
    }

    fn instrumented(&self, inner: Channel) -> Instrumented {
        Instrumented {
            inner,
            metrics: self.metrics.clone(),
        }
    }

    async fn forget(&self) {
        *self.channel.lock().await = None;
    }

    /// The RuntimeService.
    pub async fn runtime(&self) -> Result<RuntimeServiceClient<Instrumented>, CriError> {
        Ok(RuntimeServiceClient::new(self.channel().await?).max_decoding_message_size(64 << 20))
    }

    /// The ImageService.
    pub async fn images(&self) -> Result<ImageServiceClient<Instrumented>, CriError> {
        Ok(ImageServiceClient::new(self.channel().await?).max_decoding_message_size(64 << 20))
    }

    /// The runtime's name from `Version` (`containerd`, `tug`): container IDs in pod status
    /// are `<name>://<id>`.
    pub async fn runtime_name(&self) -> Result<String, CriError> {
        let mut client = self.runtime().await?;
        let version = client
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(|e| CriError::call("Version", e))?;
        Ok(version.into_inner().runtime_name)
    }

    /// The runtime's health; an unreachable runtime is not ready, with the reason.
    pub async fn health(&self) -> RuntimeHealth {
        let mut client = match self.runtime().await {
            Ok(client) => client,
            Err(error) => {
                return RuntimeHealth {
                    message: error.message,
                    ..Default::default()
                };
            }
        };
        let status = match client.status(StatusRequest { verbose: false }).await {
            Ok(status) => status.into_inner(),
            Err(error) => {
                self.forget().await;
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
