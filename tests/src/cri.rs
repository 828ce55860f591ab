//! A CRI v1 client for the runtime under test (containerd's own CRI plugin on the test
//! containerd's socket, or tug shim), as the kubelet talks to it.

use std::path::Path;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// RuntimeService and ImageService clients on one connection.
#[derive(Debug, Clone)]
pub struct Cri {
    /// RuntimeService.
    pub runtime: RuntimeServiceClient<Channel>,
    /// ImageService.
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to the CRI socket at `path`.
    pub async fn connect(path: &Path) -> Cri {
        let channel = containerd_client::connect(path)
            .await
            .unwrap_or_else(|e| panic!("connect to the CRI socket {}: {e}", path.display()));
        Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    /// Whether the runtime reports the condition `kind` (`RuntimeReady`, `NetworkReady`) true.
    pub async fn condition(&mut self, kind: &str) -> bool {
        let Ok(status) = self
            .runtime
            .status(k8s_cri::v1::StatusRequest { verbose: false })
            .await
        else {
            return false;
        };
        status
            .into_inner()
            .status
            .is_some_and(|s| s.conditions.iter().any(|c| c.r#type == kind && c.status))
    }
}
