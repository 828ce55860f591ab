//! Where the test substrate lives: the settings `scripts/lib.sh` exports, with the same defaults.

use std::path::PathBuf;

/// Locations of the test-owned containerd, registry, images and VM assets.
#[derive(Debug, Clone)]
pub struct Substrate {
    /// Persistent state owned by the tests (`TUG_TEST_STATE`).
    pub state: PathBuf,
    /// containerd's gRPC socket (`TUG_TEST_CONTAINERD_SOCK`).
    pub containerd_sock: PathBuf,
    /// `host:port` of the local plain-HTTP registry (`TUG_TEST_REGISTRY`).
    pub registry: String,
    /// Directory of the built OCI archives (`TUG_TEST_IMAGES`).
    pub images: PathBuf,
}

impl Substrate {
    /// Reads the settings from the environment, falling back to `scripts/lib.sh`'s defaults.
    pub fn from_env() -> Self {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
        let state = PathBuf::from(var("TUG_TEST_STATE", "/var/lib/tug-test"));
        let run = PathBuf::from(var("TUG_TEST_RUN", "/run/tug-test"));
        let containerd_default = run.join("containerd/containerd.sock");
        let images_default = state.join("images");
        Substrate {
            containerd_sock: PathBuf::from(var(
                "TUG_TEST_CONTAINERD_SOCK",
                &containerd_default.to_string_lossy(),
            )),
            registry: var("TUG_TEST_REGISTRY", "127.0.0.1:5000"),
            images: PathBuf::from(var("TUG_TEST_IMAGES", &images_default.to_string_lossy())),
            state,
        }
    }

    /// The reference of a test image in the local registry, e.g. `127.0.0.1:5000/tug-test/http:latest`.
    pub fn registry_image(&self, name: &str) -> String {
        format!("{}/tug-test/{name}:latest", self.registry)
    }

    /// The OCI archive of a test image, for importing straight into a runtime.
    pub fn image_archive(&self, name: &str) -> PathBuf {
        self.images.join(format!("{name}.tar"))
    }

    /// The CNI configuration directory of the test containerd's CRI plugin.
    pub fn cri_cni_conf_dir(&self) -> PathBuf {
        self.state.join("cni/net.d")
    }

    /// The CNI plugin directory of the test containerd's CRI plugin.
    pub fn cri_cni_bin_dir(&self) -> PathBuf {
        self.state.join("cni/bin")
    }

    /// Debian's guest kernel and its modules, unpacked by `scripts/vm-assets`.
    pub fn vm_dir(&self) -> PathBuf {
        self.state.join("vm")
    }

    /// The guest kernel image.
    pub fn vm_kernel(&self) -> PathBuf {
        self.vm_dir().join("vmlinuz")
    }
}
