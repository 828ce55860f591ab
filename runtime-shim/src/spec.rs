//! The OCI runtime spec of a container, built from its CRI config, its sandbox and its image —
//! the one place where CRI security and resource fields become runc's. Pure except for `stat` on
//! device paths; everything else is data in, JSON out, so it is unit-tested field by field.
//!
//! Defaults follow containerd's CRI plugin (capability set, pseudo-filesystems, masked paths,
//! `HOSTNAME`), with two stricter departures documented in the README: an absent seccomp profile
//! means `RuntimeDefault` (not unconfined), and empty masked/read-only path lists mean the
//! defaults (not none).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{
    ContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext, MountPropagation,
    NamespaceMode, PodSandboxConfig,
};
use serde_json::{Value, json};

use crate::image::config::{Ids, ImageConfig, lookup_group, lookup_user, member_groups};

/// The type URL containerd stores an OCI spec under.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// The capabilities a container gets unless it adds or drops some (containerd's CRI default).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability the kernel knows (what `ALL` and privileged mean).
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

const DEFAULT_MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

const DEFAULT_READONLY_PATHS: [&str; 6] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/sys/devices/virtual/powercap",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a container config cannot become a spec. Not retryable: the config must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {container:?}: {detail}")]
pub struct SpecError {
    /// The container's name.
    pub container: String,
    /// What is wrong, naming the field.
    pub detail: String,
}

/// Everything a spec is built from besides the CRI configs.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    /// The container's ID.
    pub id: &'a str,
    /// Its CRI config.
    pub config: &'a ContainerConfig,
    /// Its sandbox's CRI config.
    pub sandbox: &'a PodSandboxConfig,
    /// The sandbox's pinned network namespace; `None` for hostNetwork pods.
    pub netns: Option<&'a Path>,
    /// The sandbox's pinned IPC namespace and shared `/dev/shm`, which its containers join;
    /// `None` for hostIPC pods.
    pub ipc: Option<&'a Path>,
    /// See `ipc`.
    pub shm: Option<&'a Path>,
    /// The PID namespace to join for PID mode POD (the pod's shared one) or TARGET (the target
    /// container's); `None` for the other modes.
    pub pid: Option<&'a Path>,
    /// The sandbox's `resolv.conf` and `hostname` files, when it has them.
    pub resolv_conf: Option<&'a Path>,
    /// See `resolv_conf`.
    pub hostname_file: Option<&'a Path>,
    /// The image's run configuration.
    pub image: &'a ImageConfig,
    /// The resolved process user.
    pub user: ProcessUser,
    /// The cgroup path (cgroupfs style).
    pub cgroups_path: &'a str,
}

/// The namespace modes of a container: its own security context's, else its sandbox's.
pub fn namespace_options(
    config: &ContainerConfig,
    sandbox: &PodSandboxConfig,
) -> k8s_cri::v1::NamespaceOption {
    let own = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    own.or_else(|| {
        sandbox
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
    })
    .unwrap_or_default()
}

/// The user a process runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessUser {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

/// The user named by the security context, else by the image (`user[:group]`), resolved through
/// the image's `passwd`/`group` content when names (or a uid without a gid) need it.
pub fn resolve_user(
    container: &str,
    security: Option<&LinuxContainerSecurityContext>,
    image_user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ProcessUser, SpecError> {
    let error = |detail: String| SpecError {
        container: container.to_owned(),
        detail,
    };
    let (passwd, group) = (passwd.unwrap_or(""), group.unwrap_or(""));
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let explicit_uid = security.and_then(|s| s.run_as_user).map(|v| v.value);
    let username = security
        .map(|s| s.run_as_username.as_str())
        .filter(|s| !s.is_empty());
    let (uid, mut gid, name) = if let Some(uid) = explicit_uid {
        let uid =
            u32::try_from(uid).map_err(|_| error(format!("runAsUser {uid} is not a valid uid")))?;
        let ids = lookup_user(passwd, &uid.to_string());
        (uid, ids.map(|i| i.gid).unwrap_or(0), None)
    } else {
        let name = username.unwrap_or(user_part);
        if name.is_empty() {
            (0, 0, Some("root".to_owned()))
        } else if let Ok(uid) = name.parse::<u32>() {
            let ids = lookup_user(passwd, name);
            (uid, ids.map(|i| i.gid).unwrap_or(0), None)
        } else {
            let Ids { uid, gid } = lookup_user(passwd, name)
                .ok_or_else(|| error(format!("user {name:?} is not in the image's /etc/passwd")))?;
            (uid, gid, Some(name.to_owned()))
        }
    };
    if let Some(group_name) = group_part.filter(|g| !g.is_empty()) {
        gid = match group_name.parse::<u32>() {
            Ok(number) => number,
            Err(_) => lookup_group(group, group_name).ok_or_else(|| {
                error(format!(
                    "group {group_name:?} is not in the image's /etc/group"
                ))
            })?,
        };
    }
    if let Some(explicit) = security.and_then(|s| s.run_as_group).map(|v| v.value) {
        gid = u32::try_from(explicit)
            .map_err(|_| error(format!("runAsGroup {explicit} is not a valid gid")))?;
    }
    let mut additional_gids: Vec<u32> = name.map(|n| member_groups(group, &n)).unwrap_or_default();
    for extra in security
        .map(|s| s.supplemental_groups.as_slice())
        .unwrap_or_default()
    {
        let extra = u32::try_from(*extra).map_err(|_| {
            error(format!(
                "supplementalGroups entry {extra} is not a valid gid"
            ))
        })?;
        additional_gids.push(extra);
    }
    additional_gids.retain(|g| *g != gid);
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ProcessUser {
        uid,
        gid,
        additional_gids,
    })
}

/// Whether resolving the user needs the image's `/etc/passwd` and `/etc/group`.
pub fn user_needs_image_files(
    security: Option<&LinuxContainerSecurityContext>,
    image_user: &str,
) -> bool {
    if security.and_then(|s| s.run_as_user).is_some() {
        return security.and_then(|s| s.run_as_group).is_none();
    }
    let name = security
        .map(|s| s.run_as_username.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(image_user);
    !name.is_empty() && name != "0" && name != "0:0" && name != "root"
}

fn capability_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

fn capabilities(
    container: &str,
    security: Option<&LinuxContainerSecurityContext>,
) -> Result<Vec<String>, SpecError> {
    if security.is_some_and(|s| s.privileged) {
        return Ok(ALL_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect());
    }
    let mut set: Vec<String> = DEFAULT_CAPABILITIES
        .iter()
        .map(|c| (*c).to_owned())
        .collect();
    let Some(caps) = security.and_then(|s| s.capabilities.as_ref()) else {
        return Ok(set);
    };
    let known = |name: &str| -> Result<String, SpecError> {
        let cap = capability_name(name);
        if ALL_CAPABILITIES.contains(&cap.as_str()) {
            Ok(cap)
        } else {
            Err(SpecError {
                container: container.to_owned(),
                detail: format!("unknown capability {name:?}"),
            })
        }
    };
    // Upstream order: add, then drop (so `drop: [ALL], add: [X]` keeps X only if added after).
    for add in &caps.add_capabilities {
        if add.eq_ignore_ascii_case("ALL") {
            set = ALL_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
        } else {
            let cap = known(add)?;
            if !set.contains(&cap) {
                set.push(cap);
            }
        }
    }
    for drop in &caps.drop_capabilities {
        if drop.eq_ignore_ascii_case("ALL") {
            let added: Vec<String> = caps
                .add_capabilities
                .iter()
                .filter(|a| !a.eq_ignore_ascii_case("ALL"))
                .map(|a| capability_name(a))
                .collect();
            set.retain(|c| added.contains(c));
        } else {
            let cap = known(drop)?;
            set.retain(|c| *c != cap);
        }
    }
    Ok(set)
}

/// tug's `RuntimeDefault` seccomp profile: everything allowed except syscalls that reach kernel
/// state a container must not touch without the matching capability (keyrings, modules, kexec,
/// clocks, mounts and namespaces, tracing other processes, BPF, perf). New user namespaces via
/// `clone` are refused; `clone3` answers ENOSYS so libc falls back to `clone`.
pub fn runtime_default_seccomp(capabilities: &[String]) -> Value {
    let has = |cap: &str| capabilities.iter().any(|c| c == cap);
    let mut denied: Vec<&str> = vec![
        "add_key",
        "keyctl",
        "request_key",
        "kexec_load",
        "kexec_file_load",
        "open_by_handle_at",
        "lookup_dcookie",
        "uselib",
        "ustat",
        "sysfs",
        "_sysctl",
        "nfsservctl",
        "get_kernel_syms",
        "query_module",
        "create_module",
        "vm86",
        "vm86old",
        "userfaultfd",
        "personality",
    ];
    let gated: [(&str, &[&str]); 9] = [
        (
            "CAP_SYS_ADMIN",
            &[
                "mount",
                "umount",
                "umount2",
                "pivot_root",
                "unshare",
                "setns",
                "swapon",
                "swapoff",
                "quotactl",
                "quotactl_fd",
                "fanotify_init",
                "name_to_handle_at",
                "fsopen",
                "fsconfig",
                "fsmount",
                "fspick",
                "move_mount",
                "open_tree",
                "mount_setattr",
                "bpf",
                "perf_event_open",
            ],
        ),
        (
            "CAP_SYS_MODULE",
            &["init_module", "finit_module", "delete_module"],
        ),
        ("CAP_SYS_BOOT", &["reboot"]),
        (
            "CAP_SYS_TIME",
            &[
                "settimeofday",
                "stime",
                "clock_settime",
                "clock_settime64",
                "adjtimex",
                "clock_adjtime",
                "clock_adjtime64",
            ],
        ),
        (
            "CAP_SYS_PTRACE",
            &["ptrace", "process_vm_readv", "process_vm_writev", "kcmp"],
        ),
        ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
        ("CAP_SYSLOG", &["syslog"]),
        ("CAP_SYS_PACCT", &["acct"]),
        (
            "CAP_SYS_NICE",
            &["get_mempolicy", "set_mempolicy", "mbind", "move_pages"],
        ),
    ];
    for (cap, names) in gated {
        if !has(cap) {
            denied.extend(names);
        }
    }
    let mut syscalls = vec![json!({"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": 1})];
    if !has("CAP_SYS_ADMIN") {
        // CLONE_NEWUSER (0x10000000) in clone's flags (argument 0 on x86).
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
            "args": [{"index": 0, "value": 0x1000_0000u64, "valueTwo": 0x1000_0000u64, "op": "SCMP_CMP_MASKED_EQ"}]
        }));
        syscalls.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": syscalls,
    })
}

fn seccomp(
    container: &str,
    security: Option<&LinuxContainerSecurityContext>,
    caps: &[String],
) -> Result<Option<Value>, SpecError> {
    if security.is_some_and(|s| s.privileged) {
        return Ok(None);
    }
    let profile = security.and_then(|s| s.seccomp.as_ref());
    match profile.map(|p| ProfileType::try_from(p.profile_type)) {
        None | Some(Ok(ProfileType::RuntimeDefault)) => Ok(Some(runtime_default_seccomp(caps))),
        Some(Ok(ProfileType::Unconfined)) => Ok(None),
        Some(Ok(ProfileType::Localhost)) => {
            let path = &profile.expect("matched Some").localhost_ref;
            let text = std::fs::read_to_string(path).map_err(|e| SpecError {
                container: container.to_owned(),
                detail: format!("read seccomp profile {path}: {e}"),
            })?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| SpecError {
                    container: container.to_owned(),
                    detail: format!("parse seccomp profile {path}: {e}"),
                })
        }
        Some(Err(_)) => Err(SpecError {
            container: container.to_owned(),
            detail: "unknown seccomp profile type".into(),
        }),
    }
}

/// The `linux.resources` of a container's CRI resources (also what UpdateContainerResources sends).
pub fn resources(resources: Option<&LinuxContainerResources>, privileged: bool) -> Value {
    let mut out = serde_json::Map::new();
    out.insert(
        "devices".into(),
        json!([{"allow": privileged, "access": "rwm"}]),
    );
    let Some(r) = resources else {
        return Value::Object(out);
    };
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }
    let mut memory = serde_json::Map::new();
    if r.memory_limit_in_bytes > 0 {
        memory.insert("limit".into(), json!(r.memory_limit_in_bytes));
    }
    if r.memory_swap_limit_in_bytes > 0 {
        memory.insert("swap".into(), json!(r.memory_swap_limit_in_bytes));
    }
    if !memory.is_empty() {
        out.insert("memory".into(), Value::Object(memory));
    }
    if !r.hugepage_limits.is_empty() {
        out.insert(
            "hugepageLimits".into(),
            r.hugepage_limits
                .iter()
                .map(|h| json!({"pageSize": h.page_size, "limit": h.limit}))
                .collect(),
        );
    }
    if !r.unified.is_empty() {
        let unified: BTreeMap<&String, &String> = r.unified.iter().collect();
        out.insert("unified".into(), json!(unified));
    }
    Value::Object(out)
}

fn mount_options(readonly: bool, propagation: i32) -> Vec<&'static str> {
    let mut options = vec!["rbind"];
    options.push(match MountPropagation::try_from(propagation) {
        Ok(MountPropagation::PropagationHostToContainer) => "rslave",
        Ok(MountPropagation::PropagationBidirectional) => "rshared",
        _ => "rprivate",
    });
    options.push(if readonly { "ro" } else { "rw" });
    options
}

fn devices(
    config: &ContainerConfig,
    container: &str,
) -> Result<(Vec<Value>, Vec<Value>), SpecError> {
    let (mut nodes, mut rules) = (Vec::new(), Vec::new());
    for device in &config.devices {
        let error = |detail: String| SpecError {
            container: container.to_owned(),
            detail,
        };
        let metadata = std::fs::metadata(&device.host_path)
            .map_err(|e| error(format!("device {}: {e}", device.host_path)))?;
        let file_type = metadata.file_type();
        let kind = if file_type.is_char_device() {
            "c"
        } else if file_type.is_block_device() {
            "b"
        } else {
            return Err(error(format!(
                "device {} is not a character or block device",
                device.host_path
            )));
        };
        let rdev = metadata.rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        let path = if device.container_path.is_empty() {
            &device.host_path
        } else {
            &device.container_path
        };
        let access = if device.permissions.is_empty() {
            "rwm"
        } else {
            device.permissions.as_str()
        };
        nodes.push(
            json!({"path": path, "type": kind, "major": major, "minor": minor,
            "fileMode": metadata.mode() & 0o7777, "uid": metadata.uid(), "gid": metadata.gid()}),
        );
        rules.push(
            json!({"allow": true, "type": kind, "major": major, "minor": minor, "access": access}),
        );
    }
    Ok((nodes, rules))
}

/// The command line: CRI command replaces the entrypoint, CRI args replace the image's Cmd, and
/// a CRI command without args drops the image's Cmd (containerd's rule).
pub fn command_line(config: &ContainerConfig, image: &ImageConfig) -> Vec<String> {
    let command = if config.command.is_empty() {
        image.entrypoint.clone()
    } else {
        config.command.clone()
    };
    let args = if !config.args.is_empty() {
        config.args.clone()
    } else if config.command.is_empty() {
        image.cmd.clone()
    } else {
        Vec::new()
    };
    [command, args].concat()
}

fn environment(config: &ContainerConfig, image: &ImageConfig, hostname: &str) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |entry: String| {
        let key = entry.split('=').next().unwrap_or_default().to_owned();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(entry);
    };
    set(DEFAULT_PATH.to_owned());
    for entry in &image.env {
        set(entry.clone());
    }
    set(format!("HOSTNAME={hostname}"));
    for kv in &config.envs {
        set(format!("{}={}", kv.key, kv.value));
    }
    env
}

/// The cgroup path (cgroupfs style) of container `id` under its sandbox's cgroup parent.
pub fn cgroups_path(container: &str, parent: &str, id: &str) -> Result<String, SpecError> {
    if parent.ends_with(".slice") {
        return Err(SpecError {
            container: container.to_owned(),
            detail: format!(
                "cgroup parent {parent} is a systemd slice; tug shim drives cgroupfs — run the kubelet with cgroupDriver: cgroupfs"
            ),
        });
    }
    Ok(if parent.is_empty() {
        format!("/tug/{id}")
    } else {
        format!("{}/{id}", parent.trim_end_matches('/'))
    })
}

/// The OCI runtime spec for `input`.
pub fn build(input: &SpecInput<'_>) -> Result<Value, SpecError> {
    let config = input.config;
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let error = |detail: String| SpecError {
        container: name.clone(),
        detail,
    };
    let security = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let sandbox_linux = input.sandbox.linux.as_ref();
    let sandbox_security = sandbox_linux.and_then(|l| l.security_context.as_ref());
    let privileged = security.is_some_and(|s| s.privileged);
    if privileged && !sandbox_security.is_some_and(|s| s.privileged) {
        return Err(error(
            "a privileged container needs a privileged sandbox".into(),
        ));
    }
    let args = command_line(config, input.image);
    if args.is_empty() {
        return Err(error(
            "no command: the image has no entrypoint or cmd and the config gives none".into(),
        ));
    }
    let options = namespace_options(config, input.sandbox);
    let host_network = options.network == NamespaceMode::Node as i32;
    let hostname = if host_network {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        input.sandbox.hostname.clone()
    };
    let working_dir = [
        config.working_dir.as_str(),
        input.image.working_dir.as_str(),
    ]
    .into_iter()
    .find(|d| !d.is_empty())
    .unwrap_or("/")
    .to_owned();
    if !working_dir.starts_with('/') {
        return Err(error(format!(
            "working directory {working_dir:?} is not absolute"
        )));
    }
    let caps = capabilities(&name, security)?;
    let resources_in = config.linux.as_ref().and_then(|l| l.resources.as_ref());
    let oom_score_adj = resources_in
        .map(|r| r.oom_score_adj.clamp(-1000, 1000))
        .unwrap_or(0);

    let mut process = json!({
        "terminal": config.tty,
        "user": {"uid": input.user.uid, "gid": input.user.gid},
        "args": args,
        "env": environment(config, input.image, &hostname),
        "cwd": working_dir,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": security.is_some_and(|s| s.no_new_privs),
        "oomScoreAdj": oom_score_adj,
    });
    if !input.user.additional_gids.is_empty() {
        process["user"]["additionalGids"] = json!(input.user.additional_gids);
    }

    let sys_options: &[&str] = if privileged {
        &["nosuid", "noexec", "nodev", "rw"]
    } else {
        &["nosuid", "noexec", "nodev", "ro"]
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", if privileged { "rw" } else { "ro" }]}),
    ];
    let host_ipc = options.ipc == NamespaceMode::Node as i32;
    let pod_ipc = options.ipc == NamespaceMode::Pod as i32;
    // The pod's containers share one /dev/shm, as they share the IPC namespace; a hostIPC pod
    // uses the node's.
    match (host_ipc, pod_ipc.then_some(input.shm).flatten()) {
        (true, _) => mounts.push(json!({"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind", "rprivate", "rw"]})),
        (false, Some(shm)) => mounts.push(json!({"destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind", "rprivate", "rw"]})),
        (false, None) => mounts.push(json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})),
    }
    if let Some(path) = input.hostname_file {
        mounts.push(json!({"destination": "/etc/hostname", "type": "bind", "source": path, "options": ["rbind", "rprivate", "rw"]}));
    }
    if let Some(path) = input.resolv_conf {
        mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind", "source": path, "options": ["rbind", "rprivate", "rw"]}));
    }
    let mut rootfs_propagation = "rprivate";
    for mount in &config.mounts {
        if !mount.container_path.starts_with('/') {
            return Err(error(format!(
                "mount container path {:?} is not absolute",
                mount.container_path
            )));
        }
        if mount.host_path.is_empty() || !mount.host_path.starts_with('/') {
            return Err(error(format!(
                "mount host path {:?} for {} is not an absolute path",
                mount.host_path, mount.container_path
            )));
        }
        match MountPropagation::try_from(mount.propagation) {
            Ok(MountPropagation::PropagationBidirectional) => rootfs_propagation = "rshared",
            Ok(MountPropagation::PropagationHostToContainer) if rootfs_propagation != "rshared" => {
                rootfs_propagation = "rslave"
            }
            _ => {}
        }
        // A CRI mount replaces a default one at the same place (e.g. /dev/shm, /etc/hosts).
        let destination = mount.container_path.trim_end_matches('/').to_owned();
        mounts.retain(|m| m["destination"] != destination.as_str());
        mounts.push(json!({
            "destination": destination,
            "type": "bind",
            "source": mount.host_path,
            "options": mount_options(mount.readonly, mount.propagation),
        }));
    }

    let (device_nodes, device_rules) = devices(config, &name)?;
    let mut linux_resources = resources(resources_in, privileged);
    if let Some(list) = linux_resources["devices"].as_array_mut() {
        list.extend(device_rules);
    }

    let mut namespaces = vec![json!({"type": "mount"})];
    match NamespaceMode::try_from(options.pid) {
        Ok(NamespaceMode::Node) => {}
        Ok(mode @ (NamespaceMode::Pod | NamespaceMode::Target)) => match input.pid {
            Some(path) => namespaces.push(json!({"type": "pid", "path": path})),
            None => {
                return Err(error(format!(
                    "PID namespace mode {} but there is no such namespace to join",
                    mode.as_str_name()
                )));
            }
        },
        _ => namespaces.push(json!({"type": "pid"})),
    }
    match (host_ipc, pod_ipc.then_some(input.ipc).flatten()) {
        (true, _) => {}
        (false, Some(path)) => namespaces.push(json!({"type": "ipc", "path": path})),
        (false, None) => namespaces.push(json!({"type": "ipc"})),
    }
    if !host_network {
        namespaces.push(json!({"type": "uts"}));
        match input.netns {
            Some(path) => namespaces.push(json!({"type": "network", "path": path})),
            None => namespaces.push(json!({"type": "network"})),
        }
    }

    let mut linux = json!({
        "cgroupsPath": input.cgroups_path,
        "resources": linux_resources,
        "namespaces": namespaces,
        "rootfsPropagation": rootfs_propagation,
    });
    if !device_nodes.is_empty() {
        linux["devices"] = Value::Array(device_nodes);
    }
    let sysctls: BTreeMap<&String, &String> = sandbox_linux
        .map(|l| l.sysctls.iter().collect())
        .unwrap_or_default();
    if !sysctls.is_empty() {
        if host_network && sysctls.keys().any(|k| k.starts_with("net.")) {
            return Err(error(
                "net.* sysctls cannot be set in a hostNetwork pod".into(),
            ));
        }
        linux["sysctl"] = json!(sysctls);
    }
    if !privileged {
        let masked = security.map(|s| s.masked_paths.clone()).unwrap_or_default();
        let readonly = security
            .map(|s| s.readonly_paths.clone())
            .unwrap_or_default();
        linux["maskedPaths"] = if masked.is_empty() {
            json!(DEFAULT_MASKED_PATHS)
        } else {
            json!(masked)
        };
        linux["readonlyPaths"] = if readonly.is_empty() {
            json!(DEFAULT_READONLY_PATHS)
        } else {
            json!(readonly)
        };
    }
    if let Some(profile) = seccomp(&name, security, &caps)? {
        linux["seccomp"] = profile;
    }

    let mut annotations: BTreeMap<String, String> = config
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert(
        "io.kubernetes.cri.container-type".into(),
        "container".into(),
    );
    annotations.insert("io.kubernetes.cri.container-name".into(), name.clone());
    if let Some(metadata) = &input.sandbox.metadata {
        annotations.insert(
            "io.kubernetes.cri.sandbox-name".into(),
            metadata.name.clone(),
        );
        annotations.insert(
            "io.kubernetes.cri.sandbox-namespace".into(),
            metadata.namespace.clone(),
        );
        annotations.insert("io.kubernetes.cri.sandbox-uid".into(), metadata.uid.clone());
    }

    Ok(json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs", "readonly": security.is_some_and(|s| s.readonly_rootfs)},
        "hostname": hostname,
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }))
}

/// The process spec for an exec in a container whose spec is `spec`: the container's user,
/// environment, working directory and capabilities with `args`.
pub fn exec_process(spec: &Value, args: &[String], tty: bool) -> Value {
    let mut process = spec.get("process").cloned().unwrap_or_else(|| json!({}));
    process["args"] = json!(args);
    process["terminal"] = json!(tty);
    process
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{
        Capability, ContainerMetadata, Device, Int64Value, KeyValue, LinuxContainerConfig,
        LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceOption,
        PodSandboxMetadata, SecurityProfile,
    };

    fn sandbox() -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web".into(),
                uid: "u1".into(),
                namespace: "ns".into(),
                attempt: 0,
            }),
            hostname: "web".into(),
            ..Default::default()
        }
    }

    fn container(security: LinuxContainerSecurityContext) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            linux: Some(LinuxContainerConfig {
                resources: None,
                security_context: Some(security),
            }),
            ..Default::default()
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into(), "--port=80".into()],
            env: vec!["PATH=/app/bin".into(), "MODE=image".into()],
            working_dir: "/srv".into(),
            ..Default::default()
        }
    }

    fn spec_of(config: &ContainerConfig, sandbox: &PodSandboxConfig) -> Result<Value, SpecError> {
        let image = image();
        build(&SpecInput {
            id: "c1",
            config,
            sandbox,
            netns: Some(Path::new("/run/tug/netns/tug-1")),
            ipc: Some(Path::new("/run/tug/shim/s1/ipc")),
            shm: Some(Path::new("/run/tug/shim/s1/shm")),
            pid: Some(Path::new("/run/tug/shim/s1/pid")),
            resolv_conf: Some(Path::new("/run/tug/shim/s1/resolv.conf")),
            hostname_file: None,
            image: &image,
            user: ProcessUser::default(),
            cgroups_path: "/kubepods/podu1/c1",
        })
    }

    #[test]
    fn command_and_args_follow_containerds_rule() {
        let mut config = container(Default::default());
        assert_eq!(
            command_line(&config, &image()),
            ["/entry", "serve", "--port=80"]
        );
        config.args = vec!["other".into()];
        assert_eq!(command_line(&config, &image()), ["/entry", "other"]);
        config.command = vec!["/bin/sh".into()];
        config.args.clear();
        assert_eq!(command_line(&config, &image()), ["/bin/sh"]);
        config.args = vec!["-c".into(), "true".into()];
        assert_eq!(command_line(&config, &image()), ["/bin/sh", "-c", "true"]);
    }

    #[test]
    fn environment_layers_image_then_config_with_hostname() {
        let mut config = container(Default::default());
        config.envs = vec![KeyValue {
            key: "MODE".into(),
            value: "pod".into(),
        }];
        let spec = spec_of(&config, &sandbox()).unwrap();
        let env: Vec<&str> = spec["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(env, ["PATH=/app/bin", "HOSTNAME=web", "MODE=pod"]);
        assert_eq!(spec["process"]["cwd"], "/srv");
        assert_eq!(spec["hostname"], "web");
    }

    #[test]
    fn default_security_is_the_cri_capability_set_masked_paths_and_seccomp() {
        let spec = spec_of(&container(Default::default()), &sandbox()).unwrap();
        let caps = spec["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap();
        assert_eq!(caps.len(), DEFAULT_CAPABILITIES.len());
        assert!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
        assert_eq!(spec["linux"]["maskedPaths"][2], "/proc/kcore");
        assert_eq!(spec["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        let denied = &spec["linux"]["seccomp"]["syscalls"][0]["names"];
        assert!(denied.as_array().unwrap().iter().any(|n| n == "mount"));
        assert!(denied.as_array().unwrap().iter().any(|n| n == "keyctl"));
        assert_eq!(
            spec["linux"]["namespaces"][4]["path"],
            "/run/tug/netns/tug-1"
        );
        let sys = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert!(sys["options"].as_array().unwrap().iter().any(|o| o == "ro"));
    }

    #[test]
    fn capabilities_add_and_drop_by_bare_name() {
        let security = LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["NET_RAW".into(), "MKNOD".into()],
                add_ambient_capabilities: vec![],
            }),
            ..Default::default()
        };
        let spec = spec_of(&container(security), &sandbox()).unwrap();
        let caps = &spec["process"]["capabilities"]["effective"];
        let caps: Vec<&str> = caps
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(caps.contains(&"CAP_NET_ADMIN"));
        assert!(!caps.contains(&"CAP_NET_RAW") && !caps.contains(&"CAP_MKNOD"));
        // With NET_ADMIN but not SYS_ADMIN, mount stays denied.
        let drop_all = LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["CHOWN".into()],
                drop_capabilities: vec!["ALL".into()],
                add_ambient_capabilities: vec![],
            }),
            ..Default::default()
        };
        let spec = spec_of(&container(drop_all), &sandbox()).unwrap();
        assert_eq!(
            spec["process"]["capabilities"]["bounding"],
            json!(["CAP_CHOWN"])
        );
        let bad = LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: vec!["FLY".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let error = spec_of(&container(bad), &sandbox()).unwrap_err();
        assert!(
            error.to_string().contains("unknown capability \"FLY\""),
            "{error}"
        );
    }

    #[test]
    fn privileged_needs_a_privileged_sandbox_and_drops_confinement() {
        let security = LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        };
        let error = spec_of(&container(security.clone()), &sandbox()).unwrap_err();
        assert!(error.detail.contains("privileged sandbox"));
        let mut privileged_sandbox = sandbox();
        privileged_sandbox.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        let spec = spec_of(&container(security), &privileged_sandbox).unwrap();
        assert_eq!(
            spec["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            ALL_CAPABILITIES.len()
        );
        assert!(spec["linux"].get("seccomp").is_none());
        assert!(spec["linux"].get("maskedPaths").is_none());
        assert_eq!(spec["linux"]["resources"]["devices"][0]["allow"], true);
    }

    #[test]
    fn unconfined_seccomp_and_read_only_rootfs_are_honoured() {
        let security = LinuxContainerSecurityContext {
            seccomp: Some(SecurityProfile {
                profile_type: ProfileType::Unconfined as i32,
                localhost_ref: String::new(),
            }),
            readonly_rootfs: true,
            no_new_privs: true,
            run_as_user: Some(Int64Value { value: 1000 }),
            ..Default::default()
        };
        let spec = spec_of(&container(security), &sandbox()).unwrap();
        assert!(spec["linux"].get("seccomp").is_none());
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
    }

    #[test]
    fn mounts_validate_paths_and_map_propagation() {
        let mut config = container(Default::default());
        config.mounts = vec![
            Mount {
                container_path: "/data".into(),
                host_path: "/var/lib/data".into(),
                readonly: true,
                propagation: MountPropagation::PropagationHostToContainer as i32,
                ..Default::default()
            },
            Mount {
                container_path: "/dev/shm".into(),
                host_path: "/run/shm-pod".into(),
                ..Default::default()
            },
        ];
        let spec = spec_of(&config, &sandbox()).unwrap();
        let mounts = spec["mounts"].as_array().unwrap();
        let data = mounts.iter().find(|m| m["destination"] == "/data").unwrap();
        assert_eq!(data["options"], json!(["rbind", "rslave", "ro"]));
        let shm: Vec<_> = mounts
            .iter()
            .filter(|m| m["destination"] == "/dev/shm")
            .collect();
        assert_eq!(shm.len(), 1, "a CRI mount replaces the default one");
        assert_eq!(shm[0]["source"], "/run/shm-pod");
        assert_eq!(spec["linux"]["rootfsPropagation"], "rslave");

        config.mounts = vec![Mount {
            container_path: "relative".into(),
            host_path: "/x".into(),
            ..Default::default()
        }];
        let error = spec_of(&config, &sandbox()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "container \"app\": mount container path \"relative\" is not absolute"
        );
    }

    #[test]
    fn devices_are_stat_ed_and_allowed() {
        let mut config = container(Default::default());
        config.devices = vec![Device {
            container_path: "/dev/mynull".into(),
            host_path: "/dev/null".into(),
            permissions: "rw".into(),
        }];
        let spec = spec_of(&config, &sandbox()).unwrap();
        assert_eq!(spec["linux"]["devices"][0]["major"], 1);
        assert_eq!(spec["linux"]["devices"][0]["minor"], 3);
        assert_eq!(spec["linux"]["resources"]["devices"][1]["access"], "rw");
        config.devices[0].host_path = "/etc/hostname-nope".into();
        assert!(
            spec_of(&config, &sandbox())
                .unwrap_err()
                .detail
                .contains("/etc/hostname-nope")
        );
    }

    #[test]
    fn resources_and_sysctls_and_host_namespaces() {
        let mut config = container(Default::default());
        config.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
            cpu_shares: 512,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 64 << 20,
            oom_score_adj: 5000,
            ..Default::default()
        });
        let mut sandbox = sandbox();
        sandbox.linux = Some(LinuxPodSandboxConfig {
            sysctls: [(
                "net.ipv4.ip_unprivileged_port_start".to_owned(),
                "0".to_owned(),
            )]
            .into(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let spec = spec_of(&config, &sandbox).unwrap();
        assert_eq!(
            spec["linux"]["resources"]["cpu"],
            json!({"shares": 512, "quota": 50000, "period": 100000})
        );
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["process"]["oomScoreAdj"], 1000);
        assert_eq!(
            spec["linux"]["sysctl"]["net.ipv4.ip_unprivileged_port_start"],
            "0"
        );
        let kinds: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["mount", "ipc", "uts", "network"],
            "host pid namespace"
        );
    }

    #[test]
    fn containers_join_the_pods_ipc_namespace_and_shm_unless_the_pod_uses_the_nodes() {
        let config = container(Default::default());
        let shm_of = |spec: &Value| {
            spec["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == "/dev/shm")
                .cloned()
                .unwrap()
        };
        let ipc_of = |spec: &Value| {
            spec["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["type"] == "ipc")
                .cloned()
        };
        let spec = spec_of(&config, &sandbox()).unwrap();
        assert_eq!(
            ipc_of(&spec),
            Some(json!({"type": "ipc", "path": "/run/tug/shim/s1/ipc"}))
        );
        assert_eq!(shm_of(&spec)["source"], "/run/tug/shim/s1/shm");
        assert_eq!(shm_of(&spec)["type"], "bind");

        let mut host_ipc = sandbox();
        host_ipc.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    ipc: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let spec = spec_of(&config, &host_ipc).unwrap();
        assert_eq!(ipc_of(&spec), None, "the node's IPC namespace");
        assert_eq!(shm_of(&spec)["source"], "/dev/shm", "the node's /dev/shm");
    }

    #[test]
    fn pid_namespace_modes() {
        let pid_of = |spec: &Value| {
            spec["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["type"] == "pid")
                .cloned()
        };
        let with_mode = |mode: NamespaceMode| {
            let mut sandbox = sandbox();
            sandbox.linux = Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        pid: mode as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            sandbox
        };
        let config = container(Default::default());
        let image = image();
        let build_with = |sandbox: &PodSandboxConfig, pid: Option<&Path>| {
            build(&SpecInput {
                id: "c1",
                config: &config,
                sandbox,
                netns: None,
                ipc: None,
                shm: None,
                pid,
                resolv_conf: None,
                hostname_file: None,
                image: &image,
                user: ProcessUser::default(),
                cgroups_path: "/x",
            })
        };
        // CONTAINER: a namespace of its own.
        let own = build_with(&with_mode(NamespaceMode::Container), None).unwrap();
        assert_eq!(pid_of(&own), Some(json!({"type": "pid"})));
        // POD and TARGET join the namespace they are given.
        let shared = Path::new("/run/tug/shim/sandboxes/s1/pid");
        for mode in [NamespaceMode::Pod, NamespaceMode::Target] {
            let spec = build_with(&with_mode(mode), Some(shared)).unwrap();
            assert_eq!(pid_of(&spec), Some(json!({"type": "pid", "path": shared})));
            let error = build_with(&with_mode(mode), None).unwrap_err().to_string();
            assert!(error.contains(mode.as_str_name()), "{error}");
        }
    }

    #[test]
    fn an_image_without_a_command_is_refused_by_name() {
        let config = container(Default::default());
        let error = build(&SpecInput {
            id: "c1",
            config: &config,
            sandbox: &sandbox(),
            netns: None,
            ipc: None,
            shm: None,
            pid: None,
            resolv_conf: None,
            hostname_file: None,
            image: &ImageConfig::default(),
            user: ProcessUser::default(),
            cgroups_path: "/x",
        })
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("container \"app\": no command")
        );
    }

    #[test]
    fn users_resolve_from_security_context_then_image() {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n";
        let group = "root:x:0:\napp:x:1001:\nextra:x:2000:app\n";
        let image_user = resolve_user("c", None, "app", Some(passwd), Some(group)).unwrap();
        assert_eq!(
            image_user,
            ProcessUser {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![2000]
            }
        );
        let numeric = resolve_user("c", None, "1234:55", None, None).unwrap();
        assert_eq!((numeric.uid, numeric.gid), (1234, 55));
        let security = LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: 1000 }),
            run_as_group: Some(Int64Value { value: 7 }),
            supplemental_groups: vec![9],
            ..Default::default()
        };
        let explicit =
            resolve_user("c", Some(&security), "app", Some(passwd), Some(group)).unwrap();
        assert_eq!(
            explicit,
            ProcessUser {
                uid: 1000,
                gid: 7,
                additional_gids: vec![9]
            }
        );
        let missing = resolve_user("c", None, "ghost", Some(passwd), Some(group)).unwrap_err();
        assert!(missing.detail.contains("\"ghost\""));
        assert!(!user_needs_image_files(None, ""));
        assert!(user_needs_image_files(None, "app"));
        assert!(!user_needs_image_files(Some(&security), "app"));
    }
}
