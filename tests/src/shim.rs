//! `tug shim` as the kubelet meets it: the real binary serving a CRI socket against the test
//! containerd, in a namespace of its own, with tug-cni as its network. Killable with SIGKILL
//! and restartable on the same state, to prove recovery; killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::cni::{install_plugin, tug_binary};
use crate::containerd::ContainerdNs;
use crate::cri::Cri;
use crate::eventually::eventually;
use crate::substrate::Substrate;

/// Where a shim runs beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ShimOptions {
    /// Run it (and so its pods' host-side links) in this network namespace, as on a node of
    /// its own.
    pub netns: Option<PathBuf>,
    /// Read the CNI configuration from here (as a node agent writes it) instead of a conflist
    /// of the shim's own.
    pub cni_conf_dir: Option<PathBuf>,
}

/// A running `tug shim`.
#[derive(Debug)]
pub struct TugShim {
    child: Option<Child>,
    args: Vec<String>,
    netns: Option<PathBuf>,
    /// The CRI socket it serves.
    pub socket: PathBuf,
    /// Its containerd namespace (removed with everything in it on drop).
    pub ns: ContainerdNs,
    ipam: tempfile::TempDir,
    _dirs: Vec<tempfile::TempDir>,
}

impl TugShim {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts `tug shim` with tug-cni on `pod_cidr` and waits until its socket answers.
    pub async fn start(label: &str, pod_cidr: &str) -> TugShim {
        TugShim::start_with(label, pod_cidr, ShimOptions::default()).await
    }

    /// Starts it with `options` (`pod_cidr` is unused when the CNI configuration comes from
    /// elsewhere).
    pub async fn start_with(label: &str, pod_cidr: &str, options: ShimOptions) -> TugShim {
        let substrate = Substrate::from_env();
        let ns = ContainerdNs::connect(label).await;
        let dir = || tempfile::tempdir().expect("temp dir");
        let (conf, bin, ipam, run) = (dir(), dir(), dir(), dir());
        install_plugin(bin.path());
        let list = serde_json::json!({"cniVersion": "1.0.0", "name": "tug", "plugins": [{"type": "tug-cni", "podCIDRs": [pod_cidr], "dataDir": ipam.path()}]});
        std::fs::write(conf.path().join("10-tug.conflist"), list.to_string())
            .expect("write conflist");
        let socket = run.path().join("cri.sock");
        let path = |p: &Path| p.display().to_string();
        let args = vec![
            "shim".to_owned(),
            "--listen".into(),
            path(&socket),
            "--containerd".into(),
            path(&substrate.containerd_sock),
            "--namespace".into(),
            ns.namespace().to_owned(),
            "--cni-conf-dir".into(),
            path(options.cni_conf_dir.as_deref().unwrap_or(conf.path())),
            "--cni-bin-dir".into(),
            path(bin.path()),
            "--netns-dir".into(),
            path(&run.path().join("netns")),
            "--state-dir".into(),
            path(&run.path().join("state")),
            "--snapshotter-root".into(),
            path(
                &substrate
                    .state
                    .join("containerd/root/io.containerd.snapshotter.v1.overlayfs"),
            ),
            "--insecure-registry".into(),
            substrate.registry.clone(),
        ];
        let mut shim = TugShim {
            child: None,
            args,
            netns: options.netns,
            socket,
            ns,
            ipam,
            _dirs: vec![conf, bin, run],
        };
        shim.spawn().await;
        shim
    }

    async fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut command = crate::netns::command_in(self.netns.as_deref(), &tug_binary());
        let child = command
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("TUG_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tug shim");
        self.child = Some(child);
        let socket = self.socket.clone();
        eventually(
            "tug shim to serve its socket",
            Duration::from_secs(20),
            || {
                let socket = socket.clone();
                async move { socket.exists().then_some(()) }
            },
        )
        .await;
    }

    /// A CRI client on its socket.
    pub async fn cri(&self) -> Cri {
        Cri::connect(&self.socket).await
    }

    /// The CNI configuration directory the shim reads.
    pub fn cni_conf_dir(&self) -> &Path {
        self._dirs[0].path()
    }

    /// tug-cni's IPAM directory for network `tug`.
    pub fn ipam_dir(&self) -> PathBuf {
        self.ipam.path().join("tug")
    }

    /// SIGKILLs the shim (containers, their runc shims and log writers keep running).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the shim again on the same state.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }
}

impl Drop for TugShim {
    fn drop(&mut self) {
        self.kill9();
    }
}
