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

/// tug-cni and a conflist for `pod_cidr`, installed where the test containerd's CRI plugin looks
/// for them; both removed on drop.
#[derive(Debug)]
pub struct InstalledCni {
    files: Vec<std::path::PathBuf>,
    ipam: tempfile::TempDir,
}

impl InstalledCni {
    /// tug-cni's IPAM directory for network `tug`.
    pub fn ipam_dir(&self) -> std::path::PathBuf {
        self.ipam.path().join("tug")
    }
}

impl Drop for InstalledCni {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Installs tug-cni for the test containerd's CRI plugin.
pub fn install_tug_cni(substrate: &crate::substrate::Substrate, pod_cidr: &str) -> InstalledCni {
    let ipam = tempfile::tempdir().expect("IPAM dir");
    let link = crate::cni::install_plugin(&substrate.cri_cni_bin_dir());
    let conflist = substrate.cri_cni_conf_dir().join("10-tug.conflist");
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "tug", "plugins": [{"type": "tug-cni", "podCIDRs": [pod_cidr], "mtu": 1450, "dataDir": ipam.path()}]});
    std::fs::write(
        &conflist,
        serde_json::to_string_pretty(&conf).expect("JSON"),
    )
    .expect("write the conflist");
    InstalledCni {
        files: vec![conflist, link],
        ipam,
    }
}
