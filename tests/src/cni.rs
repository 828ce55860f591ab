//! Driving CNI plugins as a runtime does: exec'd with the CNI environment and the configuration
//! on stdin, inside the node's network namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::netns::Netns;

/// The `tug` binary of this workspace (built by `cargo build`; scripts/test builds it), or the
/// one `TUG_BINARY` names (benchmarks use the release build).
pub fn tug_binary() -> PathBuf {
    if let Some(binary) = std::env::var_os("TUG_BINARY") {
        return PathBuf::from(binary);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let binary = target.join("debug/tug");
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build -p tug` (scripts/test does)",
        binary.display()
    );
    binary
}

/// The `tug-cni` plugin binary built beside [`tug_binary`] (a small binary of its own, because a
/// runtime execs it for every pod), or the one `TUG_CNI_BINARY` names.
pub fn tug_cni_binary() -> PathBuf {
    let binary = std::env::var_os("TUG_CNI_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| tug_binary().with_file_name("tug-cni"));
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build -p tug-cni` (scripts/test does)",
        binary.display()
    );
    binary
}

/// Installs the tug-cni plugin as `dir/tug-cni`, the way an operator puts it in the CNI bin dir.
pub fn install_plugin(dir: &Path) -> PathBuf {
    let link = dir.join("tug-cni");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(tug_cni_binary(), &link)
        .unwrap_or_else(|e| panic!("install tug-cni in {}: {e}", dir.display()));
    link
}

/// The addresses tug-cni's IPAM holds in `dir` (one file per address), sorted; none when the
/// directory does not exist.
pub fn ipam_allocations(dir: &Path) -> Vec<String> {
    let mut ips: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips
}

/// A CNI bin dir holding `tug-cni` (a link to the tug binary, as installed), and the plugin's
/// state directory, both removed on drop.
#[derive(Debug)]
pub struct TugCni {
    bin_dir: tempfile::TempDir,
    data_dir: tempfile::TempDir,
    pod_cidr: String,
    template: Option<Value>,
}

/// What one invocation returned.
#[derive(Debug)]
pub struct Outcome {
    /// Exit status.
    pub success: bool,
    /// stdout parsed as JSON (`Null` when empty).
    pub json: Value,
}

impl TugCni {
    /// A plugin configured for `pod_cidr`.
    pub fn new(pod_cidr: &str) -> TugCni {
        let bin_dir = tempfile::tempdir().expect("bin dir");
        install_plugin(bin_dir.path());
        TugCni {
            bin_dir,
            data_dir: tempfile::tempdir().expect("data dir"),
            pod_cidr: pod_cidr.to_owned(),
            template: None,
        }
    }

    /// A plugin driven by the conflist at `path` (as tug netd writes it), the way a runtime
    /// builds the plugin's configuration from a conflist: its first plugin with the list's
    /// `cniVersion` and `name`.
    pub fn from_conflist(path: &Path) -> TugCni {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let list: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        let mut cni = TugCni::new(conf["podCIDRs"][0].as_str().expect("a pod CIDR"));
        cni.template = Some(conf);
        cni
    }

    /// The plugin's path.
    pub fn plugin(&self) -> PathBuf {
        self.bin_dir.path().join("tug-cni")
    }

    /// IPAM state of network `tug`.
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir.path().join("tug")
    }

    /// The IPs IPAM holds.
    pub fn allocations(&self) -> Vec<String> {
        ipam_allocations(&self.ipam_dir())
    }

    /// The network configuration, with `extra` fields merged in.
    pub fn conf(&self, extra: Value) -> Value {
        let mut conf = self.template.clone().unwrap_or_else(|| {
            json!({"cniVersion": "1.1.0", "name": "tug", "type": "tug-cni", "podCIDRs": [self.pod_cidr], "mtu": 1450, "dataDir": self.data_dir.path()})
        });
        if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        conf
    }

    /// Builds the command for one invocation inside `node`.
    pub fn command(
        &self,
        node: &Netns,
        command: &str,
        container_id: &str,
        pod: Option<&Path>,
    ) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.path().display()))
            .arg(self.plugin())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.bin_dir.path())
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=test;K8S_POD_NAME=p",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(pod) = pod {
            cmd.env("CNI_NETNS", pod);
        }
        cmd
    }

    /// Runs one command with `conf` on stdin.
    pub fn run(
        &self,
        node: &Netns,
        command: &str,
        container_id: &str,
        pod: Option<&Path>,
        conf: &Value,
    ) -> Outcome {
        let mut child = self
            .command(node, command, container_id, pod)
            .spawn()
            .expect("exec tug-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write config");
        let output = child.wait_with_output().expect("tug-cni output");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("tug-cni printed non-JSON ({e}): {stdout}"))
        };
        Outcome {
            success: output.status.success(),
            json,
        }
    }

    /// Makes the plugin dual-stack: `podCIDRs` gets `v6_cidr` too.
    pub fn with_ipv6(mut self, v6_cidr: &str) -> TugCni {
        let mut conf = self.conf(json!({}));
        conf["podCIDRs"] = json!([self.pod_cidr, v6_cidr]);
        self.template = Some(conf);
        self
    }

    /// ADD `pod` as `container_id`; panics unless it succeeds; returns the pod IP.
    pub fn add(&self, node: &Netns, container_id: &str, pod: &Netns) -> (String, Value) {
        let outcome = self.run(
            node,
            "ADD",
            container_id,
            Some(&pod.path()),
            &self.conf(json!({})),
        );
        assert!(
            outcome.success,
            "ADD {container_id} failed: {}",
            outcome.json
        );
        let address = outcome.json["ips"][0]["address"]
            .as_str()
            .expect("an address")
            .to_owned();
        (address.trim_end_matches("/32").to_owned(), outcome.json)
    }
}
