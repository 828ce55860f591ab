//! A Pod (as the API gives it) → the CRI configs the runtime gets: the sandbox config (hostname,
//! DNS, port mappings, namespaces, cgroup parent, sysctls, pod security context, labels) and one
//! container config per container (command, environment, mounts, resources, security context,
//! log path, the labels and annotations upstream's kubelet writes so a restarted kubelet — ours
//! or upstream's — recognises what it started). Everything here is pure.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, DnsConfig, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PortMapping, Protocol, SecurityProfile,
    security_profile::ProfileType,
};
use k8s_openapi::api::core::v1::{
    Container, Pod, PodSecurityContext, SeccompProfile, SecurityContext,
};

use super::quantity;

/// Label: the pod's name.
pub const POD_NAME: &str = "io.kubernetes.pod.name";
/// Label: the pod's namespace.
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Label: the pod's UID (how sandboxes and containers are found again).
pub const POD_UID: &str = "io.kubernetes.pod.uid";
/// Label: the container's name.
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// Annotation: hash of the container spec the instance was started from.
pub const CONTAINER_HASH: &str = "io.kubernetes.container.hash";
/// Annotation: the restart count of the instance.
pub const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
/// Annotation: where the termination message is written inside the container.
pub const TERMINATION_MESSAGE_PATH: &str = "io.kubernetes.container.terminationMessagePath";
/// Annotation: `File` or `FallbackToLogsOnError`.
pub const TERMINATION_MESSAGE_POLICY: &str = "io.kubernetes.container.terminationMessagePolicy";
/// Annotation: the pod's grace period, so an orphaned container can still be stopped gently.
pub const GRACE_PERIOD: &str = "io.kubernetes.pod.terminationGracePeriod";

/// Masked paths the kubelet asks for in unprivileged containers (upstream's defaults).
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// Read-only paths the kubelet asks for in unprivileged containers.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// How cgroups are named for the runtime (`cgroupDriver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupDriver {
    /// Paths: `/kubepods/burstable/pod<uid>`.
    #[default]
    Cgroupfs,
    /// Slices: `kubepods-burstable-pod<uid>.slice`.
    Systemd,
}

/// A parsed resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines.
    pub servers: Vec<String>,
    /// `search` (or `domain`) entries.
    pub searches: Vec<String>,
    /// `options` entries.
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses resolv.conf text; unknown lines are ignored as the resolver ignores them.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => conf.servers.extend(words.next().map(str::to_owned)),
                Some("search" | "domain") => {
                    conf.searches = words.map(str::to_owned).collect();
                }
                Some("options") => conf.options.extend(words.map(str::to_owned)),
                _ => {}
            }
        }
        conf
    }
}

/// What translation needs from the node's configuration.
#[derive(Debug, Clone, Default)]
pub struct NodeContext {
    /// `clusterDNS`.
    pub cluster_dns: Vec<String>,
    /// `clusterDomain` (e.g. `cluster.local`).
    pub cluster_domain: String,
    /// The host's resolv.conf (`resolvConf`), for `dnsPolicy: Default`.
    pub host_resolv: ResolvConf,
    /// Root of the pod log directories (`/var/log/pods`).
    pub pod_logs_dir: PathBuf,
    /// How the runtime names cgroups.
    pub cgroup_driver: CgroupDriver,
    /// The node's memory, bytes (for burstable OOM scores).
    pub memory_capacity: i64,
    /// `seccompDefault`: unset profiles are RuntimeDefault (tug's default) rather than Unconfined.
    pub seccomp_default: bool,
    /// Where `Localhost` seccomp profiles live (`<root-dir>/seccomp`).
    pub seccomp_root: PathBuf,
}

/// Why a pod or container could not be translated (the pod or container fails with this
/// message; nothing else is affected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// A pod's QoS class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Every container has equal CPU and memory requests and limits.
    Guaranteed,
    /// Some requests or limits.
    Burstable,
    /// None at all.
    BestEffort,
}

impl Qos {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.into_iter().flat_map(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
    })
}

/// The container (or init container) of `pod` named `name`.
pub fn find_container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

/// The pod's QoS class, as the apiserver computes it.
pub fn qos(pod: &Pod) -> Qos {
    let mut any = false;
    let mut guaranteed = true;
    for container in all_containers(pod) {
        let resources = container.resources.clone().unwrap_or_default();
        let requests = resources.requests.unwrap_or_default();
        let limits = resources.limits.unwrap_or_default();
        any |= !requests.is_empty() || !limits.is_empty();
        for name in ["cpu", "memory"] {
            match (limits.get(name), requests.get(name).or(limits.get(name))) {
                (Some(l), Some(r))
                    if quantity::milli_value(&l.0) == quantity::milli_value(&r.0) => {}
                _ => guaranteed = false,
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => Qos::BestEffort,
        (true, true) => Qos::Guaranteed,
        (true, false) => Qos::Burstable,
    }
}

fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}
fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}
fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// The cgroup parent of the pod's sandbox and containers.
pub fn cgroup_parent(pod: &Pod, driver: CgroupDriver) -> String {
    let qos = qos(pod);
    match driver {
        CgroupDriver::Cgroupfs => match qos {
            Qos::Guaranteed => format!("/kubepods/pod{}", uid(pod)),
            Qos::Burstable => format!("/kubepods/burstable/pod{}", uid(pod)),
            Qos::BestEffort => format!("/kubepods/besteffort/pod{}", uid(pod)),
        },
        CgroupDriver::Systemd => {
            let id = uid(pod).replace('-', "_");
            match qos {
                Qos::Guaranteed => format!("kubepods-pod{id}.slice"),
                Qos::Burstable => format!("kubepods-burstable-pod{id}.slice"),
                Qos::BestEffort => format!("kubepods-besteffort-pod{id}.slice"),
            }
        }
    }
}

/// The pod's log directory: `<root>/<namespace>_<name>_<uid>`.
pub fn pod_log_dir(root: &Path, pod: &Pod) -> PathBuf {
    root.join(format!("{}_{}_{}", namespace(pod), name(pod), uid(pod)))
}

/// The pod's hostname and, with a subdomain, its fully qualified name.
pub fn hostname(pod: &Pod, cluster_domain: &str) -> (String, Option<String>) {
    let spec = pod.spec.clone().unwrap_or_default();
    let host = match spec.hostname.filter(|h| !h.is_empty()) {
        Some(host) => host,
        None => {
            // Truncated to a DNS label as upstream does.
            let mut host: String = name(pod).chars().take(63).collect();
            while host.ends_with(['-', '.']) {
                host.pop();
            }
            host
        }
    };
    let fqdn = spec
        .subdomain
        .filter(|s| !s.is_empty())
        .map(|sub| format!("{host}.{sub}.{}.svc.{cluster_domain}", namespace(pod)));
    (host, fqdn)
}

/// The resolver configuration for the pod (`dnsPolicy` + `dnsConfig`), or `None` for
/// host-network pods that use the host's resolv.conf as it is.
pub fn dns_config(pod: &Pod, node: &NodeContext) -> Option<DnsConfig> {
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    } && !node.cluster_dns.is_empty();
    let mut config = if policy == "None" {
        DnsConfig::default()
    } else if cluster {
        let domain = &node.cluster_domain;
        let mut searches = vec![
            format!("{}.svc.{domain}", namespace(pod)),
            format!("svc.{domain}"),
            domain.clone(),
        ];
        searches.extend(node.host_resolv.searches.iter().cloned());
        DnsConfig {
            servers: node.cluster_dns.clone(),
            searches,
            options: vec!["ndots:5".into()],
        }
    } else if host_network && spec.dns_config.is_none() {
        return None;
    } else {
        DnsConfig {
            servers: node.host_resolv.servers.clone(),
            searches: node.host_resolv.searches.clone(),
            options: node.host_resolv.options.clone(),
        }
    };
    if let Some(extra) = spec.dns_config {
        config
            .servers
            .extend(extra.nameservers.into_iter().flatten());
        config.searches.extend(extra.searches.into_iter().flatten());
        for option in extra.options.into_iter().flatten() {
            let Some(key) = option.name else { continue };
            let text = match option.value {
                Some(value) => format!("{key}:{value}"),
                None => key.clone(),
            };
            config
                .options
                .retain(|o| o.split(':').next() != Some(key.as_str()));
            config.options.push(text);
        }
    }
    // The resolver's limits: 3 servers, 32 search domains, no duplicates.
    let mut seen = std::collections::HashSet::new();
    config.servers.retain(|s| seen.insert(s.clone()));
    config.servers.truncate(3);
    let mut seen = std::collections::HashSet::new();
    config.searches.retain(|s| seen.insert(s.clone()));
    config.searches.truncate(32);
    Some(config)
}

fn pod_security(pod: &Pod) -> PodSecurityContext {
    pod.spec
        .as_ref()
        .and_then(|s| s.security_context.clone())
        .unwrap_or_default()
}

fn profile(
    container: Option<&SeccompProfile>,
    pod: Option<&SeccompProfile>,
    node: &NodeContext,
    privileged: bool,
) -> Result<Option<SecurityProfile>, SpecError> {
    let Some(chosen) = container.or(pod) else {
        if privileged || !node.seccomp_default {
            return Ok(Some(SecurityProfile {
                profile_type: ProfileType::Unconfined as i32,
                localhost_ref: String::new(),
            }));
        }
        return Ok(Some(SecurityProfile {
            profile_type: ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        }));
    };
    Ok(Some(match chosen.type_.as_str() {
        "RuntimeDefault" => SecurityProfile {
            profile_type: ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        },
        "Unconfined" => SecurityProfile {
            profile_type: ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        },
        "Localhost" => {
            let path = chosen.localhost_profile.clone().ok_or_else(|| {
                SpecError("seccompProfile type Localhost needs localhostProfile".into())
            })?;
            if Path::new(&path).is_absolute() || path.split('/').any(|p| p == "..") {
                return Err(SpecError(format!(
                    "seccompProfile.localhostProfile {path:?} must be a relative path below {}",
                    node.seccomp_root.display()
                )));
            }
            SecurityProfile {
                profile_type: ProfileType::Localhost as i32,
                localhost_ref: node.seccomp_root.join(path).display().to_string(),
            }
        }
        other => {
            return Err(SpecError(format!(
                "unknown seccompProfile type {other:?} (RuntimeDefault, Unconfined or Localhost)"
            )));
        }
    }))
}

fn namespaces(pod: &Pod) -> NamespaceOption {
    let spec = pod.spec.clone().unwrap_or_default();
    let mode = |on: Option<bool>, otherwise: NamespaceMode| {
        if on.unwrap_or(false) {
            NamespaceMode::Node as i32
        } else {
            otherwise as i32
        }
    };
    NamespaceOption {
        network: mode(spec.host_network, NamespaceMode::Pod),
        pid: if spec.host_pid.unwrap_or(false) {
            NamespaceMode::Node as i32
        } else if spec.share_process_namespace.unwrap_or(false) {
            NamespaceMode::Pod as i32
        } else {
            NamespaceMode::Container as i32
        },
        ipc: mode(spec.host_ipc, NamespaceMode::Pod),
        ..Default::default()
    }
}

fn protocol(name: Option<&str>) -> i32 {
    match name {
        Some("UDP") => Protocol::Udp as i32,
        Some("SCTP") => Protocol::Sctp as i32,
        _ => Protocol::Tcp as i32,
    }
}

fn string_map(map: Option<&BTreeMap<String, String>>) -> HashMap<String, String> {
    map.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn supplemental_groups(sc: &PodSecurityContext) -> Vec<i64> {
    let mut groups = sc.supplemental_groups.clone().unwrap_or_default();
    if let Some(fs_group) = sc.fs_group
        && !groups.contains(&fs_group)
    {
        groups.push(fs_group);
    }
    groups
}

/// The sandbox config for the pod's `attempt`-th sandbox.
pub fn sandbox_config(
    pod: &Pod,
    node: &NodeContext,
    attempt: u32,
) -> Result<PodSandboxConfig, SpecError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let (host, fqdn) = hostname(pod, &node.cluster_domain);
    let host = if spec.set_hostname_as_fqdn.unwrap_or(false) {
        fqdn.ok_or_else(|| SpecError("setHostnameAsFQDN needs a subdomain".into()))?
    } else {
        host
    };
    if host.len() > 64 {
        return Err(SpecError(format!(
            "the pod's hostname {host:?} is longer than 64 characters"
        )));
    }
    let sc = pod_security(pod);
    let privileged = all_containers(pod).any(|c| {
        c.security_context
            .as_ref()
            .and_then(|s| s.privileged)
            .unwrap_or(false)
    });
    let mut labels = string_map(pod.metadata.labels.as_ref());
    labels.insert(POD_NAME.into(), name(pod).into());
    labels.insert(POD_NAMESPACE.into(), namespace(pod).into());
    labels.insert(POD_UID.into(), uid(pod).into());
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| PortMapping {
            protocol: protocol(p.protocol.as_deref()),
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or_default(),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect();
    let sysctls = sc
        .sysctls
        .iter()
        .flatten()
        .map(|s| (s.name.clone(), s.value.clone()))
        .collect();
    Ok(PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name(pod).into(),
            uid: uid(pod).into(),
            namespace: namespace(pod).into(),
            attempt,
        }),
        hostname: if host_network { String::new() } else { host },
        log_directory: pod_log_dir(&node.pod_logs_dir, pod).display().to_string(),
        dns_config: dns_config(pod, node),
        port_mappings,
        labels,
        annotations: string_map(pod.metadata.annotations.as_ref()),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent(pod, node.cgroup_driver),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces(pod)),
                run_as_user: sc.run_as_user.map(|value| Int64Value { value }),
                run_as_group: sc.run_as_group.map(|value| Int64Value { value }),
                supplemental_groups: supplemental_groups(&sc),
                privileged,
                seccomp: profile(None, sc.seccomp_profile.as_ref(), node, privileged)?,
                ..Default::default()
            }),
            sysctls,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// `milliCPUToShares`: 1024 shares per CPU, at least 2 and at most the kernel's 262,144.
fn cpu_shares(millicores: i64) -> i64 {
    (millicores.saturating_mul(1024) / 1000).clamp(2, 262_144)
}

/// The container's cgroup resources and OOM score.
pub fn resources(
    pod: &Pod,
    container: &Container,
    memory_capacity: i64,
) -> LinuxContainerResources {
    let resources = container.resources.clone().unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    let get = |map: &BTreeMap<_, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
               name: &str,
               parse: fn(&str) -> Option<i64>| {
        map.get(name).and_then(|q| parse(&q.0)).unwrap_or(0)
    };
    let cpu_request = get(&requests, "cpu", quantity::millicores);
    let cpu_limit = get(&limits, "cpu", quantity::millicores);
    let memory_request = get(&requests, "memory", quantity::bytes);
    let memory_limit = get(&limits, "memory", quantity::bytes);
    let shares = if cpu_request == 0 && cpu_limit != 0 {
        cpu_shares(cpu_limit)
    } else {
        cpu_shares(cpu_request)
    };
    let (period, quota) = if cpu_limit > 0 {
        (
            100_000,
            (cpu_limit.saturating_mul(100_000) / 1000).max(1000),
        )
    } else {
        (0, 0)
    };
    let oom = match qos(pod) {
        Qos::Guaranteed => -997,
        Qos::BestEffort => 1000,
        Qos::Burstable => {
            // In i128: a request of pebibytes times 1000 outgrows an i64.
            let score = if memory_capacity > 0 {
                1000 - (1000 * i128::from(memory_request)) / i128::from(memory_capacity)
            } else {
                999
            };
            score.clamp(3, 999) as i64
        }
    };
    LinuxContainerResources {
        cpu_period: period,
        cpu_quota: quota,
        cpu_shares: shares,
        memory_limit_in_bytes: memory_limit,
        oom_score_adj: oom,
        ..Default::default()
    }
}

/// Checks `runAsNonRoot` against the user the container will run as: the spec's `runAsUser`,
/// else the image's user (`image_uid`, or `image_user` when the image names a user).
pub fn verify_non_root(
    pod: &Pod,
    container: &Container,
    image_uid: Option<i64>,
    image_user: &str,
) -> Result<(), SpecError> {
    let sc = container.security_context.clone().unwrap_or_default();
    let psc = pod_security(pod);
    if !sc.run_as_non_root.or(psc.run_as_non_root).unwrap_or(false) {
        return Ok(());
    }
    match sc.run_as_user.or(psc.run_as_user) {
        Some(0) => Err(SpecError(
            "container's runAsUser breaks non-root policy".into(),
        )),
        Some(_) => Ok(()),
        None => match image_uid {
            Some(0) => Err(SpecError(
                "container has runAsNonRoot and image will run as root".into(),
            )),
            Some(_) => Ok(()),
            None if !image_user.is_empty() => Err(SpecError(format!(
                "container has runAsNonRoot and image has non-numeric user ({image_user}), cannot verify user is non-root"
            ))),
            None => Err(SpecError(
                "container has runAsNonRoot and image will run as root".into(),
            )),
        },
    }
}

/// The container's security context for the runtime.
pub fn container_security(
    pod: &Pod,
    container: &Container,
    node: &NodeContext,
) -> Result<LinuxContainerSecurityContext, SpecError> {
    let sc: SecurityContext = container.security_context.clone().unwrap_or_default();
    let psc = pod_security(pod);
    let privileged = sc.privileged.unwrap_or(false);
    let unmasked = sc.proc_mount.as_deref() == Some("Unmasked");
    let paths = |defaults: &[&str]| {
        if privileged || unmasked {
            Vec::new()
        } else {
            defaults.iter().map(|p| (*p).to_owned()).collect()
        }
    };
    let capabilities = sc.capabilities.clone().map(|c| Capability {
        add_capabilities: c.add.unwrap_or_default(),
        drop_capabilities: c.drop.unwrap_or_default(),
        ..Default::default()
    });
    Ok(LinuxContainerSecurityContext {
        capabilities,
        privileged,
        namespace_options: Some(namespaces(pod)),
        run_as_user: sc
            .run_as_user
            .or(psc.run_as_user)
            .map(|value| Int64Value { value }),
        run_as_group: sc
            .run_as_group
            .or(psc.run_as_group)
            .map(|value| Int64Value { value }),
        readonly_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
        supplemental_groups: supplemental_groups(&psc),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        masked_paths: paths(DEFAULT_MASKED_PATHS),
        readonly_paths: paths(DEFAULT_READONLY_PATHS),
        seccomp: profile(
            sc.seccomp_profile.as_ref(),
            psc.seccomp_profile.as_ref(),
            node,
            privileged,
        )?,
        ..Default::default()
    })
}

/// A stable hash of what a running instance was started from (the container spec); an
/// instance whose hash differs from the spec's is restarted (only `image` can change).
pub fn container_hash(container: &Container) -> String {
    use sha2::Digest;
    let mut copy = container.clone();
    copy.resources = None;
    let json = serde_json::to_vec(&copy).unwrap_or_default();
    let digest = sha2::Sha256::digest(&json);
    hex::encode(&digest[..8])
}

/// The termination grace period of the pod, seconds.
pub fn grace_period(pod: &Pod) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
}

/// Everything the container config needs that is not in the pod spec.
#[derive(Debug, Clone, Default)]
pub struct ContainerInputs {
    /// The image reference the runtime resolved (what to create from).
    pub image_ref: String,
    /// The resolved environment, in order.
    pub env: Vec<(String, String)>,
    /// Volume and kubelet-managed mounts.
    pub mounts: Vec<Mount>,
}

/// The container config for the `attempt`-th instance of `container`.
pub fn container_config(
    pod: &Pod,
    container: &Container,
    attempt: u32,
    node: &NodeContext,
    inputs: ContainerInputs,
) -> Result<ContainerConfig, SpecError> {
    let env_map: HashMap<&str, &str> = inputs
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let expand_all = |items: &Option<Vec<String>>| -> Vec<String> {
        items
            .iter()
            .flatten()
            .map(|s| expand(s, &|name| env_map.get(name).map(|v| (*v).to_owned())))
            .collect()
    };
    let labels = HashMap::from([
        (CONTAINER_NAME.to_owned(), container.name.clone()),
        (POD_NAME.to_owned(), name(pod).to_owned()),
        (POD_NAMESPACE.to_owned(), namespace(pod).to_owned()),
        (POD_UID.to_owned(), uid(pod).to_owned()),
    ]);
    let annotations = HashMap::from([
        (CONTAINER_HASH.to_owned(), container_hash(container)),
        (RESTART_COUNT.to_owned(), attempt.to_string()),
        (
            TERMINATION_MESSAGE_PATH.to_owned(),
            container
                .termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".into()),
        ),
        (
            TERMINATION_MESSAGE_POLICY.to_owned(),
            container
                .termination_message_policy
                .clone()
                .unwrap_or_else(|| "File".into()),
        ),
        (GRACE_PERIOD.to_owned(), grace_period(pod).to_string()),
    ]);
    Ok(ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: container.name.clone(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: inputs.image_ref,
            user_specified_image: container.image.clone().unwrap_or_default(),
            ..Default::default()
        }),
        command: expand_all(&container.command),
        args: expand_all(&container.args),
        working_dir: container.working_dir.clone().unwrap_or_default(),
        envs: inputs
            .env
            .iter()
            .map(|(key, value)| KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        mounts: inputs.mounts,
        labels,
        annotations,
        log_path: format!("{}/{attempt}.log", container.name),
        stdin: container.stdin.unwrap_or(false),
        stdin_once: container.stdin_once.unwrap_or(false),
        tty: container.tty.unwrap_or(false),
        linux: Some(LinuxContainerConfig {
            resources: Some(resources(pod, container, node.memory_capacity)),
            security_context: Some(container_security(pod, container, node)?),
        }),
        ..Default::default()
    })
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, `$$` is a literal `$`, and
/// anything else (undefined variables, unclosed references) is left as written.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
        {
            let name = &inner[..close];
            match lookup(name) {
                Some(value) => out.push_str(&value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "1234-5678", "labels": {"app": "web"}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn node() -> NodeContext {
        NodeContext {
            cluster_dns: vec!["10.96.0.10".into()],
            cluster_domain: "cluster.local".into(),
            host_resolv: ResolvConf::parse(
                "nameserver 192.0.2.53\nsearch corp.example\noptions edns0\n",
            ),
            pod_logs_dir: "/var/log/pods".into(),
            memory_capacity: 8 << 30,
            seccomp_default: true,
            seccomp_root: "/var/lib/kubelet/seccomp".into(),
            ..Default::default()
        }
    }

    #[test]
    fn cluster_first_dns_with_search_path_and_dns_config_merged() {
        let p = pod(json!({"containers": [{"name": "c"}], "dnsConfig": {
            "nameservers": ["192.0.2.99"], "searches": ["extra.example"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}));
        let dns = dns_config(&p, &node()).unwrap();
        assert_eq!(dns.servers, ["10.96.0.10", "192.0.2.99"]);
        assert_eq!(
            dns.searches,
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
                "extra.example"
            ]
        );
        assert_eq!(dns.options, ["ndots:2", "edns0"]);
    }

    #[test]
    fn dns_policies_default_none_and_host_network() {
        let default = pod(json!({"containers": [], "dnsPolicy": "Default"}));
        let dns = dns_config(&default, &node()).unwrap();
        assert_eq!(dns.servers, ["192.0.2.53"]);
        assert_eq!(dns.options, ["edns0"]);
        let none = pod(
            json!({"containers": [], "dnsPolicy": "None", "dnsConfig": {"nameservers": ["1.1.1.1"]}}),
        );
        let dns = dns_config(&none, &node()).unwrap();
        assert_eq!(dns.servers, ["1.1.1.1"]);
        assert!(dns.searches.is_empty());
        let host = pod(json!({"containers": [], "hostNetwork": true}));
        assert_eq!(dns_config(&host, &node()), None);
        let host_cluster = pod(
            json!({"containers": [], "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}),
        );
        assert_eq!(
            dns_config(&host_cluster, &node()).unwrap().servers,
            ["10.96.0.10"]
        );
        let mut no_cluster_dns = node();
        no_cluster_dns.cluster_dns.clear();
        let p = pod(json!({"containers": []}));
        assert_eq!(
            dns_config(&p, &no_cluster_dns).unwrap().servers,
            ["192.0.2.53"]
        );
    }

    #[test]
    fn sandbox_carries_identity_hostname_ports_and_namespaces() {
        let p = pod(
            json!({"hostname": "front", "subdomain": "web", "shareProcessNamespace": true,
            "securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}], "fsGroup": 2000},
            "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}, {"containerPort": 81}]}]}),
        );
        let config = sandbox_config(&p, &node(), 2).unwrap();
        let meta = config.metadata.unwrap();
        assert_eq!(
            (
                meta.name.as_str(),
                meta.namespace.as_str(),
                meta.uid.as_str(),
                meta.attempt
            ),
            ("web-0", "shop", "1234-5678", 2)
        );
        assert_eq!(config.hostname, "front");
        assert_eq!(config.log_directory, "/var/log/pods/shop_web-0_1234-5678");
        assert_eq!(config.labels[POD_UID], "1234-5678");
        assert_eq!(config.labels["app"], "web");
        assert_eq!(config.port_mappings.len(), 1);
        assert_eq!(config.port_mappings[0].protocol, Protocol::Udp as i32);
        let linux = config.linux.unwrap();
        assert_eq!(linux.cgroup_parent, "/kubepods/besteffort/pod1234-5678");
        assert_eq!(linux.sysctls["net.ipv4.ip_unprivileged_port_start"], "0");
        let sc = linux.security_context.unwrap();
        assert_eq!(sc.namespace_options.unwrap().pid, NamespaceMode::Pod as i32);
        assert_eq!(sc.supplemental_groups, [2000]);
        assert_eq!(
            sc.seccomp.unwrap().profile_type,
            ProfileType::RuntimeDefault as i32
        );
        let (_, fqdn) = hostname(&p, "cluster.local");
        assert_eq!(fqdn.as_deref(), Some("front.web.shop.svc.cluster.local"));
    }

    #[test]
    fn resources_and_oom_scores_follow_qos() {
        let guaranteed = pod(json!({"containers": [{"name": "c", "resources": {
            "limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "500m", "memory": "256Mi"}}}]}));
        assert_eq!(qos(&guaranteed), Qos::Guaranteed);
        let c = &guaranteed.spec.as_ref().unwrap().containers[0];
        let r = resources(&guaranteed, c, 8 << 30);
        assert_eq!(
            (
                r.cpu_shares,
                r.cpu_quota,
                r.cpu_period,
                r.memory_limit_in_bytes,
                r.oom_score_adj
            ),
            (512, 50_000, 100_000, 256 << 20, -997)
        );
        assert_eq!(
            cgroup_parent(&guaranteed, CgroupDriver::Systemd),
            "kubepods-pod1234_5678.slice"
        );
        let burstable = pod(
            json!({"containers": [{"name": "c", "resources": {"requests": {"memory": "4Gi"}}}]}),
        );
        assert_eq!(qos(&burstable), Qos::Burstable);
        let c = &burstable.spec.as_ref().unwrap().containers[0];
        let r = resources(&burstable, c, 8 << 30);
        assert_eq!((r.cpu_shares, r.cpu_quota, r.oom_score_adj), (2, 0, 500));
        let best = pod(json!({"containers": [{"name": "c"}]}));
        let c = &best.spec.as_ref().unwrap().containers[0];
        assert_eq!(resources(&best, c, 8 << 30).oom_score_adj, 1000);
    }

    /// Found by the pod_spec fuzz target: a memory request of 64Pi overflowed the OOM score's
    /// arithmetic (a panic with overflow checks, a wrapped score without).
    #[test]
    fn huge_requests_and_limits_do_not_overflow() {
        let pod: Pod = serde_json::from_value(json!({"spec": {"containers": [{"name": "c",
            "resources": {"requests": {"cpu": "100m", "memory": "64Pi"},
                          "limits": {"cpu": "9223372036854775", "memory": "128Mi"}}}]}}))
        .unwrap();
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let r = resources(&pod, c, 8 << 30);
        // Requests far above the node's memory: as low a score as a burstable pod gets.
        assert_eq!(r.oom_score_adj, 3);
        assert_eq!(r.cpu_shares, 102);
        assert!(r.cpu_quota >= 1000, "{}", r.cpu_quota);
        let pod: Pod = serde_json::from_value(json!({"spec": {"containers": [{"name": "c",
            "resources": {"requests": {"cpu": "9223372036854775"}}}]}}))
        .unwrap();
        let c = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(resources(&pod, c, 8 << 30).cpu_shares, 262_144);
    }

    #[test]
    fn security_context_layers_container_over_pod() {
        let p = pod(
            json!({"securityContext": {"runAsUser": 1000, "runAsNonRoot": true, "seccompProfile": {"type": "Unconfined"}},
            "containers": [{"name": "c", "securityContext": {"runAsUser": 2000, "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true, "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
                "seccompProfile": {"type": "Localhost", "localhostProfile": "audit.json"}}},
                {"name": "root", "securityContext": {"runAsUser": 0}},
                {"name": "priv", "securityContext": {"privileged": true}},
                {"name": "bad", "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "../etc/x"}}}]}),
        );
        let containers = &p.spec.as_ref().unwrap().containers;
        let sc = container_security(&p, &containers[0], &node()).unwrap();
        assert_eq!(sc.run_as_user.unwrap().value, 2000);
        assert!(sc.no_new_privs && sc.readonly_rootfs && !sc.privileged);
        let caps = sc.capabilities.unwrap();
        assert_eq!(
            (caps.add_capabilities, caps.drop_capabilities),
            (vec!["NET_ADMIN".to_owned()], vec!["ALL".to_owned()])
        );
        let seccomp = sc.seccomp.unwrap();
        assert_eq!(seccomp.profile_type, ProfileType::Localhost as i32);
        assert_eq!(seccomp.localhost_ref, "/var/lib/kubelet/seccomp/audit.json");
        assert_eq!(sc.masked_paths.len(), DEFAULT_MASKED_PATHS.len());
        assert!(verify_non_root(&p, &containers[0], None, "").is_ok());
        assert!(verify_non_root(&p, &containers[1], None, "").is_err());
        let priv_sc = container_security(&p, &containers[2], &node()).unwrap();
        assert!(priv_sc.privileged && priv_sc.masked_paths.is_empty());
        // The pod's Unconfined applies where the container says nothing.
        assert_eq!(
            priv_sc.seccomp.unwrap().profile_type,
            ProfileType::Unconfined as i32
        );
        let error = container_security(&p, &containers[3], &node()).unwrap_err();
        assert!(error.0.contains("../etc/x"), "{error}");
        // No runAsUser anywhere: the image's user decides.
        let q =
            pod(json!({"securityContext": {"runAsNonRoot": true}, "containers": [{"name": "c"}]}));
        let c = &q.spec.as_ref().unwrap().containers[0];
        assert!(verify_non_root(&q, c, Some(65534), "").is_ok());
        assert!(verify_non_root(&q, c, Some(0), "").is_err());
        assert!(
            verify_non_root(&q, c, None, "nobody")
                .unwrap_err()
                .0
                .contains("non-numeric user (nobody)")
        );
    }

    #[test]
    fn container_config_expands_variables_and_labels_the_instance() {
        let p = pod(json!({"containers": [{"name": "app", "image": "busybox",
            "command": ["sh", "-c"], "args": ["echo $(GREETING) $$(HOME) $(MISSING)"]}]}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let config = container_config(
            &p,
            c,
            3,
            &node(),
            ContainerInputs {
                image_ref: "sha256:abc".into(),
                env: vec![("GREETING".into(), "hello".into())],
                mounts: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(config.args, ["echo hello $(HOME) $(MISSING)"]);
        assert_eq!(config.log_path, "app/3.log");
        assert_eq!(config.annotations[RESTART_COUNT], "3");
        assert_eq!(config.labels[CONTAINER_NAME], "app");
        assert_eq!(config.image.unwrap().user_specified_image, "busybox");
        assert_eq!(config.envs[0].value, "hello");
    }
}
