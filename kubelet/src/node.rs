//! The Node this kubelet registers, and the status it keeps on it: labels, taints, addresses,
//! capacity and allocatable from the host, nodeInfo, the kubelet endpoint, and conditions
//! (Ready from the container runtime's and the network's readiness, MemoryPressure,
//! DiskPressure, PIDPressure). Everything here is pure: host facts and runtime health in, a
//! Node out, so each field is unit-tested; [`crate::register`] talks to the API.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

/// How this node presents itself.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeIdentity {
    /// The Node's name.
    pub name: String,
    /// The host name (label `kubernetes.io/hostname`, address `Hostname`).
    pub hostname: String,
    /// InternalIP addresses (`--node-ip`, else the host's).
    pub node_ips: Vec<IpAddr>,
    /// Extra labels.
    pub labels: BTreeMap<String, String>,
    /// Taints to register with (`--register-with-taints`).
    pub taints: Vec<Taint>,
    /// `--max-pods` (110).
    pub max_pods: u32,
    /// The kubelet API port (10250).
    pub kubelet_port: i32,
}

/// What the host has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    /// CPUs.
    pub cpus: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Memory available now, bytes.
    pub memory_available_bytes: u64,
    /// Size of the filesystem holding the kubelet's root dir, bytes.
    pub ephemeral_bytes: u64,
    /// Free bytes on it.
    pub ephemeral_free_bytes: u64,
    /// Processes running and the maximum.
    pub pids: (u64, u64),
    /// `uname -r`.
    pub kernel: String,
    /// `PRETTY_NAME` from os-release.
    pub os_image: String,
    /// GOARCH-style architecture (`amd64`, `arm64`).
    pub arch: String,
    /// `/etc/machine-id`.
    pub machine_id: String,
    /// The boot ID.
    pub boot_id: String,
}

/// What the container runtime (CRI `Status` and `Version`) says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeHealth {
    /// `RuntimeReady`.
    pub runtime_ready: bool,
    /// `NetworkReady`.
    pub network_ready: bool,
    /// Why not, when not.
    pub message: String,
    /// `<runtime name>://<version>`, e.g. `containerd://1.6.20`.
    pub version: String,
}

/// GOARCH for Rust's architecture name.
pub fn go_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

fn quantity(value: impl ToString) -> Quantity {
    Quantity(value.to_string())
}

/// Kibibytes as upstream writes memory (`16384256Ki`).
fn kibibytes(bytes: u64) -> Quantity {
    Quantity(format!("{}Ki", bytes / 1024))
}

/// The Node object to register.
pub fn desired(identity: &NodeIdentity, host: &Host) -> Node {
    let mut labels = identity.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), identity.hostname.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), go_arch(&host.arch).to_owned());
    labels.insert("beta.kubernetes.io/os".into(), "linux".into());
    labels.insert(
        "beta.kubernetes.io/arch".into(),
        go_arch(&host.arch).to_owned(),
    );
    Node {
        metadata: ObjectMeta {
            name: Some(identity.name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: (!identity.taints.is_empty()).then(|| identity.taints.clone()),
            ..Default::default()
        }),
        status: None,
    }
}

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    previous: &[NodeCondition],
    now: &Time,
) -> NodeCondition {
    let status = if ok { "True" } else { "False" };
    let before = previous.iter().find(|c| c.type_ == kind);
    let transition = match before {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Some(now.clone()),
    };
    NodeCondition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: transition,
    }
}

/// The conditions: Ready from the runtime and network, the pressures the eviction manager
/// reports (see [`crate::eviction`]). Transition times carry over while a status holds.
pub fn conditions(
    pressures: &[crate::eviction::Pressure],
    health: &RuntimeHealth,
    previous: &[NodeCondition],
    now: &Time,
) -> Vec<NodeCondition> {
    use crate::eviction::Pressure;
    let memory = pressures.contains(&Pressure::Memory);
    let disk = pressures.contains(&Pressure::Disk);
    let pids = pressures.contains(&Pressure::Pid);
    let pressure = |kind: &str, under: bool, yes: &str, no: &str, what: &str| {
        // For pressures True is the bad state.
        let mut c = condition(
            kind,
            !under,
            if under { yes } else { no },
            &if under {
                format!("kubelet has {what} pressure")
            } else {
                format!("kubelet has sufficient {what}")
            },
            previous,
            now,
        );
        c.status = if under { "True" } else { "False" }.into();
        if let Some(before) = previous.iter().find(|p| p.type_ == kind) {
            c.last_transition_time = if before.status == c.status {
                before.last_transition_time.clone()
            } else {
                Some(now.clone())
            };
        }
        c
    };
    let ready = health.runtime_ready && health.network_ready;
    let message = if ready {
        "kubelet is posting ready status".to_owned()
    } else if !health.runtime_ready {
        format!("container runtime is not ready: {}", health.message)
    } else {
        format!(
            "container runtime network not ready: NetworkReady=false: {}",
            health.message
        )
    };
    vec![
        pressure(
            "MemoryPressure",
            memory,
            "KubeletHasInsufficientMemory",
            "KubeletHasSufficientMemory",
            "memory",
        ),
        pressure(
            "DiskPressure",
            disk,
            "KubeletHasDiskPressure",
            "KubeletHasNoDiskPressure",
            "disk",
        ),
        pressure(
            "PIDPressure",
            pids,
            "KubeletHasInsufficientPID",
            "KubeletHasSufficientPID",
            "PID",
        ),
        condition(
            "Ready",
            ready,
            if ready {
                "KubeletReady"
            } else {
                "KubeletNotReady"
            },
            &message,
            previous,
            now,
        ),
    ]
}

/// The Node's status (everything but its conditions' heartbeat is stable while nothing changes).
pub fn status(
    identity: &NodeIdentity,
    host: &Host,
    health: &RuntimeHealth,
    conditions: Vec<NodeCondition>,
) -> NodeStatus {
    let capacity = BTreeMap::from([
        ("cpu".to_owned(), quantity(host.cpus)),
        ("memory".to_owned(), kibibytes(host.memory_bytes)),
        (
            "ephemeral-storage".to_owned(),
            kibibytes(host.ephemeral_bytes),
        ),
        ("pods".to_owned(), quantity(identity.max_pods)),
    ]);
    // Allocatable keeps the hard eviction threshold for memory (100Mi) out, as upstream does
    // with no reservations configured.
    let mut allocatable = capacity.clone();
    allocatable.insert(
        "memory".into(),
        kibibytes(host.memory_bytes.saturating_sub(100 << 20)),
    );
    let mut addresses: Vec<NodeAddress> = identity
        .node_ips
        .iter()
        .map(|ip| NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        })
        .collect();
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: identity.hostname.clone(),
    });
    NodeStatus {
        capacity: Some(capacity),
        allocatable: Some(allocatable),
        addresses: Some(addresses),
        conditions: Some(conditions),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: identity.kubelet_port,
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: go_arch(&host.arch).to_owned(),
            boot_id: host.boot_id.clone(),
            container_runtime_version: health.version.clone(),
            kernel_version: host.kernel.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: format!("v1.33.0-tug.{}", env!("CARGO_PKG_VERSION")),
            machine_id: host.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: host.os_image.clone(),
            system_uuid: host.machine_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Reads the host's facts; `root` is the kubelet's root dir (its filesystem is the node's
/// ephemeral storage).
pub fn read_host(root: &std::path::Path) -> Host {
    let memory = crate::stats::Memory::read().unwrap_or_default();
    let disk = crate::stats::Fs::of(root)
        .or_else(|_| crate::stats::Fs::of(std::path::Path::new("/")))
        .unwrap_or_default();
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let pretty = os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "Linux".into());
    let trimmed = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    Host {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: memory.capacity,
        memory_available_bytes: memory.available(),
        ephemeral_bytes: disk.capacity,
        ephemeral_free_bytes: disk.available,
        pids: crate::stats::pids(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        os_image: pretty,
        arch: std::env::consts::ARCH.to_owned(),
        machine_id: trimmed("/etc/machine-id"),
        boot_id: trimmed("/proc/sys/kernel/random/boot_id"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> NodeIdentity {
        NodeIdentity {
            name: "worker-1".into(),
            hostname: "worker-1".into(),
            node_ips: vec!["192.168.5.10".parse().unwrap()],
            labels: BTreeMap::new(),
            taints: vec![Taint {
                key: "dedicated".into(),
                value: Some("gpu".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            }],
            max_pods: 110,
            kubelet_port: 10250,
        }
    }

    fn host() -> Host {
        Host {
            cpus: 2,
            memory_bytes: 24 << 30,
            memory_available_bytes: 20 << 30,
            ephemeral_bytes: 100 << 30,
            ephemeral_free_bytes: 50 << 30,
            pids: (300, 4_194_304),
            kernel: "6.1.0-26-amd64".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            arch: "x86_64".into(),
            machine_id: "abc".into(),
            boot_id: "boot".into(),
        }
    }

    fn now() -> Time {
        Time("2026-11-23T00:00:00Z".parse().unwrap())
    }

    #[test]
    fn the_node_carries_upstreams_labels_and_the_taints() {
        let node = desired(&identity(), &host());
        let labels = node.metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/hostname"], "worker-1");
        assert_eq!(labels["kubernetes.io/os"], "linux");
        assert_eq!(labels["kubernetes.io/arch"], "amd64");
        assert_eq!(node.spec.unwrap().taints.unwrap()[0].key, "dedicated");
    }

    #[test]
    fn status_reports_capacity_addresses_info_and_endpoint() {
        let health = RuntimeHealth {
            runtime_ready: true,
            network_ready: true,
            message: String::new(),
            version: "tug://0.1.0".into(),
        };
        let status = status(&identity(), &host(), &health, Vec::new());
        let capacity = status.capacity.unwrap();
        assert_eq!(capacity["cpu"], Quantity("2".into()));
        assert_eq!(capacity["memory"], Quantity("25165824Ki".into()));
        assert_eq!(capacity["pods"], Quantity("110".into()));
        assert_eq!(
            status.allocatable.unwrap()["memory"],
            Quantity("25063424Ki".into())
        );
        let addresses = status.addresses.unwrap();
        assert_eq!(addresses[0].type_, "InternalIP");
        assert_eq!(addresses[0].address, "192.168.5.10");
        assert_eq!(
            status
                .daemon_endpoints
                .unwrap()
                .kubelet_endpoint
                .unwrap()
                .port,
            10250
        );
        let info = status.node_info.unwrap();
        assert_eq!(info.container_runtime_version, "tug://0.1.0");
        assert_eq!(info.architecture, "amd64");
    }

    #[test]
    fn ready_follows_the_runtime_and_the_network_with_a_reason() {
        let mut health = RuntimeHealth {
            runtime_ready: true,
            network_ready: false,
            message: "no CNI configuration in /etc/cni/net.d".into(),
            version: String::new(),
        };
        let conditions_now = conditions(&[], &health, &[], &now());
        let ready = conditions_now.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("KubeletNotReady"));
        assert!(
            ready
                .message
                .as_deref()
                .unwrap()
                .contains("network not ready")
                && ready
                    .message
                    .as_deref()
                    .unwrap()
                    .contains("no CNI configuration")
        );
        let pressures: Vec<&str> = conditions_now
            .iter()
            .filter(|c| c.type_ != "Ready")
            .map(|c| c.status.as_str())
            .collect();
        assert_eq!(pressures, ["False", "False", "False"]);

        health.network_ready = true;
        let later = Time("2026-11-23T00:00:10Z".parse().unwrap());
        let next = conditions(&[], &health, &conditions_now, &later);
        let ready = next.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("True", Some("KubeletReady"))
        );
        assert_eq!(
            ready.last_transition_time,
            Some(later.clone()),
            "a change moves the transition time"
        );
        let memory = next.iter().find(|c| c.type_ == "MemoryPressure").unwrap();
        assert_eq!(
            memory.last_transition_time,
            Some(now()),
            "an unchanged condition keeps it"
        );
        assert_eq!(memory.last_heartbeat_time, Some(later));
    }

    #[test]
    fn pressures_come_from_the_eviction_manager() {
        use crate::eviction::Pressure;
        let health = RuntimeHealth {
            runtime_ready: true,
            network_ready: true,
            ..Default::default()
        };
        let c = conditions(&[Pressure::Memory, Pressure::Disk], &health, &[], &now());
        let status = |kind: &str| c.iter().find(|x| x.type_ == kind).unwrap().status.clone();
        assert_eq!(status("MemoryPressure"), "True");
        assert_eq!(status("DiskPressure"), "True");
        assert_eq!(status("PIDPressure"), "False");
    }

    #[test]
    fn the_host_is_read() {
        let host = read_host(std::path::Path::new("/"));
        assert!(
            host.cpus >= 1 && host.memory_bytes > 0 && host.ephemeral_bytes > 0,
            "{host:?}"
        );
        assert!(!host.kernel.is_empty());
    }
}
