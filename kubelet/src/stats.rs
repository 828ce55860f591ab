//! Resource usage of the node and its pods: the Summary API (`/stats/summary`,
//! `stats/v1alpha1`, what `kubectl top` and metrics-server read through `/metrics/resource`),
//! and the eviction signals ([`Signals`]).
//!
//! The node's figures come from the kernel (the root cgroup's `cpu.stat` or `/proc/stat`,
//! `/proc/meminfo`, `statvfs` of the kubelet's root dir and of the runtime's image filesystem,
//! `/proc/net/dev`, `pid_max` and the process count); the containers' from the CRI
//! (`ListContainerStats`, `ListPodSandboxStats` for pod networks where the runtime has it).
//! Memory working set is usage less inactive file pages, as upstream counts it; CPU rates
//! (`usageNanoCores`) come from the previous sample of the same counter.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use k8s_cri::v1::{
    ContainerStatsFilter, ImageFsInfoRequest, ListContainerStatsRequest,
    ListPodSandboxStatsRequest, PodSandboxStatsFilter,
};
use serde_json::{Value, json};

use crate::pods::translate::POD_UID;
use crate::pods::worker::Shared;

/// A filesystem's size and use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fs {
    /// Bytes in all.
    pub capacity: u64,
    /// Bytes an unprivileged user can still write.
    pub available: u64,
    /// Bytes in use.
    pub used: u64,
    /// Inodes in all.
    pub inodes: u64,
    /// Inodes free.
    pub inodes_free: u64,
}

impl Fs {
    /// `statvfs` of the filesystem holding `path`.
    pub fn of(path: &Path) -> std::io::Result<Fs> {
        let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
        let block = s.fragment_size();
        Ok(Fs {
            capacity: s.blocks() * block,
            available: s.blocks_available() * block,
            used: (s.blocks() - s.blocks_free()) * block,
            inodes: s.files(),
            inodes_free: s.files_free(),
        })
    }

    fn json(&self, time: &str) -> Value {
        json!({
            "time": time,
            "availableBytes": self.available,
            "capacityBytes": self.capacity,
            "usedBytes": self.used,
            "inodesFree": self.inodes_free,
            "inodes": self.inodes,
            "inodesUsed": self.inodes.saturating_sub(self.inodes_free),
        })
    }
}

/// The node's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `MemTotal`.
    pub capacity: u64,
    /// In use: total less free.
    pub usage: u64,
    /// Usage less inactive file pages (what cannot be reclaimed cheaply).
    pub working_set: u64,
    /// Anonymous memory.
    pub rss: u64,
}

impl Memory {
    /// From `/proc/meminfo`.
    pub fn read() -> std::io::Result<Memory> {
        Ok(Memory::parse(&std::fs::read_to_string("/proc/meminfo")?))
    }

    /// From the text of `/proc/meminfo`.
    pub fn parse(meminfo: &str) -> Memory {
        let kib = |key: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
                * 1024
        };
        let capacity = kib("MemTotal:");
        let usage = capacity.saturating_sub(kib("MemFree:"));
        Memory {
            capacity,
            usage,
            working_set: usage.saturating_sub(kib("Inactive(file):")),
            rss: kib("AnonPages:"),
        }
    }

    /// `memory.available` as eviction sees it: capacity less the working set.
    pub fn available(&self) -> u64 {
        self.capacity.saturating_sub(self.working_set)
    }
}

/// The node's CPU time in nanoseconds: the root cgroup's `usage_usec` where there is one,
/// else the busy jiffies of `/proc/stat`.
pub fn node_cpu_ns() -> u64 {
    if let Ok(text) = std::fs::read_to_string("/sys/fs/cgroup/cpu.stat")
        && let Some(usec) = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return usec * 1000;
    }
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    busy * (1_000_000_000 / hz.max(1))
}

/// Processes now and the most there may be (`pid.available` is their difference).
pub fn pids() -> (u64, u64) {
    let running = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .count() as u64
        })
        .unwrap_or(0);
    let max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    (running, max)
}

/// Rates of cumulative counters (CPU nanoseconds → nanocores), from the previous sample of
/// each counter.
#[derive(Debug, Default)]
pub struct Rates(Mutex<HashMap<String, (u64, i64)>>);

impl Rates {
    /// The rate of `key` per second since its last sample (none for the first), and keeps
    /// this sample.
    pub fn per_second(&self, key: &str, value: u64, at_ns: i64) -> Option<u64> {
        let mut samples = self.0.lock().expect("rates lock");
        let previous = samples.insert(key.to_owned(), (value, at_ns));
        let (before, then) = previous?;
        let elapsed = at_ns - then;
        if elapsed <= 0 || value < before {
            return None;
        }
        Some(((value - before) as u128 * 1_000_000_000 / elapsed as u128) as u64)
    }

    /// Forgets counters not in `keep`.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0.lock().expect("rates lock").retain(|k, _| keep(k));
    }
}

/// The node's eviction signals, measured now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    /// Memory.
    pub memory: Memory,
    /// The kubelet's root dir's filesystem (`nodefs`).
    pub nodefs: Fs,
    /// The runtime's image filesystem (`imagefs`), when the runtime names it.
    pub imagefs: Option<Fs>,
    /// Processes now and the maximum.
    pub pids: (u64, u64),
}

/// The filesystem the runtime keeps images on (from `ImageFsInfo`), if it says.
async fn image_fs(shared: &Shared) -> Option<(Fs, u64, u64)> {
    let mut images = shared.cri.images().await.ok()?;
    let info = images
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .ok()?
        .into_inner();
    let usage = info.image_filesystems.into_iter().next()?;
    let mountpoint = usage.fs_id.map(|f| f.mountpoint).unwrap_or_default();
    let fs = Fs::of(Path::new(&mountpoint)).ok()?;
    Some((
        fs,
        usage.used_bytes.map(|u| u.value).unwrap_or_default(),
        usage.inodes_used.map(|u| u.value).unwrap_or_default(),
    ))
}

/// Measures the eviction signals.
pub async fn signals(shared: &Shared) -> std::io::Result<Signals> {
    Ok(Signals {
        memory: Memory::read()?,
        nodefs: Fs::of(&shared.root_dir)?,
        imagefs: image_fs(shared).await.map(|(fs, ..)| fs),
        pids: pids(),
    })
}

fn rfc3339_ns(ns: i64) -> String {
    jiff::Timestamp::from_nanosecond(ns as i128)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// `/proc/net/dev` (of this network namespace): name → (rx bytes, rx errors, tx bytes, tx errors).
fn interfaces(text: &str) -> Vec<(String, [u64; 4])> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            (v.len() >= 11).then(|| (name.trim().to_owned(), [v[0], v[2], v[8], v[10]]))
        })
        .collect()
}

fn network_json(time: &str, interfaces: &[(String, [u64; 4])], default: Option<&str>) -> Value {
    let each = |(name, [rx, rx_errors, tx, tx_errors]): &(String, [u64; 4])| json!({"name": name, "rxBytes": rx, "rxErrors": rx_errors, "txBytes": tx, "txErrors": tx_errors});
    let mut value = json!({
        "time": time,
        "interfaces": interfaces.iter().map(each).collect::<Vec<_>>(),
    });
    if let Some(first) = interfaces
        .iter()
        .find(|(n, _)| Some(n.as_str()) == default)
        .or_else(|| interfaces.first())
        && let (Value::Object(into), Value::Object(from)) = (&mut value, each(first))
    {
        into.extend(from);
    }
    value
}

/// The interface of the default route (`/proc/net/route`).
fn default_interface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    text.lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[1] == "00000000")
        .map(|f| f[0].to_owned())
}

/// Bytes and inodes under `path` (not crossing into other filesystems' mounts is not
/// attempted: the volumes measured are the kubelet's own directories).
fn disk_usage(path: &Path) -> (u64, u64) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return (0, 0);
    };
    use std::os::unix::fs::MetadataExt;
    let mut total = (meta.blocks() * 512, 1);
    if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for entry in entries.flatten() {
            let (bytes, inodes) = disk_usage(&entry.path());
            total = (total.0 + bytes, total.1 + inodes);
        }
    }
    total
}

/// The Summary (`/stats/summary`): the node and every pod with a running sandbox.
pub async fn summary(shared: &Shared) -> Result<Value, String> {
    let now_ns = jiff::Timestamp::now().as_nanosecond() as i64;
    let time = rfc3339_ns(now_ns);
    let rates = &shared.rates;
    let memory = Memory::read().map_err(|e| format!("read /proc/meminfo: {e}"))?;
    let nodefs = Fs::of(&shared.root_dir)
        .map_err(|e| format!("statvfs {}: {e}", shared.root_dir.display()))?;
    let cpu = node_cpu_ns();
    let (procs, pid_max) = pids();
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<i64>().ok())
        })
        .unwrap_or(0);
    let mut image_fs_json = Value::Null;
    if let Some((fs, used, inodes_used)) = image_fs(shared).await {
        image_fs_json = fs.json(&time);
        image_fs_json["usedBytes"] = json!(used);
        image_fs_json["inodesUsed"] = json!(inodes_used);
    }
    let host_interfaces = interfaces(&std::fs::read_to_string("/proc/net/dev").unwrap_or_default());
    let node = json!({
        "nodeName": shared.node_name,
        "startTime": rfc3339_ns(boot * 1_000_000_000),
        "cpu": {
            "time": time,
            "usageCoreNanoSeconds": cpu,
            "usageNanoCores": rates.per_second("node", cpu, now_ns),
        },
        "memory": {
            "time": time,
            "availableBytes": memory.available(),
            "usageBytes": memory.usage,
            "workingSetBytes": memory.working_set,
            "rssBytes": memory.rss,
        },
        "network": network_json(
            &time,
            &host_interfaces.into_iter().filter(|(n, _)| n != "lo").collect::<Vec<_>>(),
            default_interface().as_deref(),
        ),
        "fs": nodefs.json(&time),
        "runtime": {"imageFs": image_fs_json},
        "rlimit": {"time": time, "maxpid": pid_max, "curproc": procs},
    });

    let mut runtime = shared
        .cri
        .runtime()
        .await
        .map_err(|e| format!("the container runtime: {e}"))?;
    let container_stats = runtime
        .list_container_stats(ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter::default()),
        })
        .await
        .map_err(|e| format!("ListContainerStats: {}", e.message()))?
        .into_inner()
        .stats;
    // Pod networks, where the runtime reports them (containerd's CRI and tug shim do).
    let sandbox_stats = runtime
        .list_pod_sandbox_stats(ListPodSandboxStatsRequest {
            filter: Some(PodSandboxStatsFilter::default()),
        })
        .await
        .map(|r| r.into_inner().stats)
        .unwrap_or_default();
    let pods = shared.pods_now();
    let mut kept = vec!["node".to_owned()];
    let mut pod_summaries = Vec::new();
    for pod in &pods {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        // Running containers only, by the ID the status reports.
        let running: HashMap<String, (String, String)> = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
            .filter_map(|c| {
                let started = c.state.as_ref()?.running.as_ref()?.started_at.as_ref()?;
                let id = c.container_id.as_ref()?.split("://").last()?.to_owned();
                Some((id, (c.name.clone(), started.0.to_string())))
            })
            .collect();
        if running.is_empty() {
            continue;
        }
        let mut containers = Vec::new();
        let (mut pod_cpu, mut pod_cores, mut pod_ws, mut pod_usage, mut pod_rss) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut ephemeral = 0u64;
        let log_dir = crate::pods::translate::pod_log_dir(&shared.node.pod_logs_dir, pod);
        for stats in &container_stats {
            let Some(attributes) = &stats.attributes else {
                continue;
            };
            if attributes.labels.get(POD_UID) != Some(&uid) {
                continue;
            }
            let Some((name, started)) = running.get(&attributes.id) else {
                continue;
            };
            let cpu_ns = stats
                .cpu
                .as_ref()
                .and_then(|c| c.usage_core_nano_seconds.as_ref())
                .map(|v| v.value)
                .unwrap_or(0);
            let reported = stats
                .cpu
                .as_ref()
                .and_then(|c| c.usage_nano_cores.as_ref())
                .map(|v| v.value)
                .filter(|v| *v > 0);
            let cores = rates.per_second(&attributes.id, cpu_ns, now_ns);
            let cores = reported.or(cores);
            kept.push(attributes.id.clone());
            let m = stats.memory.unwrap_or_default();
            let value = |v: Option<k8s_cri::v1::UInt64Value>| v.map(|v| v.value).unwrap_or(0);
            let working_set = value(m.working_set_bytes);
            let usage = value(m.usage_bytes);
            let rss = value(m.rss_bytes);
            let layer = stats.writable_layer.clone().unwrap_or_default();
            let rootfs_used = value(layer.used_bytes);
            let (log_bytes, log_inodes) = disk_usage(&log_dir.join(name));
            ephemeral += rootfs_used + log_bytes;
            pod_cpu += cpu_ns;
            pod_cores += cores.unwrap_or(0);
            pod_ws += working_set;
            pod_usage += usage;
            pod_rss += rss;
            let mut memory = json!({
                "time": time,
                "usageBytes": usage,
                "workingSetBytes": working_set,
                "rssBytes": rss,
                "pageFaults": value(m.page_faults),
                "majorPageFaults": value(m.major_page_faults),
            });
            if let Some(available) = m.available_bytes.filter(|v| v.value > 0) {
                memory["availableBytes"] = json!(available.value);
            }
            let mut rootfs = json!({"time": time, "usedBytes": rootfs_used, "inodesUsed": value(layer.inodes_used)});
            let mut logs = nodefs.json(&time);
            logs["usedBytes"] = json!(log_bytes);
            logs["inodesUsed"] = json!(log_inodes);
            if let Value::Object(fs) = &image_fs_json {
                for key in ["availableBytes", "capacityBytes", "inodes", "inodesFree"] {
                    if let Some(v) = fs.get(key) {
                        rootfs[key] = v.clone();
                    }
                }
            }
            containers.push(json!({
                "name": name,
                "startTime": started,
                "cpu": {"time": time, "usageCoreNanoSeconds": cpu_ns, "usageNanoCores": cores},
                "memory": memory,
                "rootfs": rootfs,
                "logs": logs,
            }));
        }
        let pod_dir = shared.pod_dir(&uid);
        let mut volumes = Vec::new();
        if let Ok(plugins) = std::fs::read_dir(pod_dir.join("volumes")) {
            for plugin in plugins.flatten() {
                let local = plugin.file_name() == "kubernetes.io~empty-dir";
                for volume in std::fs::read_dir(plugin.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let (bytes, inodes) = disk_usage(&volume.path());
                    if local {
                        ephemeral += bytes;
                    }
                    let mut v = nodefs.json(&time);
                    v["usedBytes"] = json!(bytes);
                    v["inodesUsed"] = json!(inodes);
                    v["name"] = json!(volume.file_name().to_string_lossy());
                    volumes.push(v);
                }
            }
        }
        let network = sandbox_stats
            .iter()
            .find(|s| {
                s.attributes
                    .as_ref()
                    .is_some_and(|a| a.labels.get(POD_UID) == Some(&uid))
            })
            .and_then(|s| s.linux.as_ref())
            .and_then(|l| l.network.as_ref())
            .map(|n| {
                let list: Vec<(String, [u64; 4])> = n
                    .default_interface
                    .iter()
                    .chain(&n.interfaces)
                    .map(|i| {
                        let v = |x: &Option<k8s_cri::v1::UInt64Value>| {
                            x.as_ref().map_or(0, |x| x.value)
                        };
                        (
                            i.name.clone(),
                            [
                                v(&i.rx_bytes),
                                v(&i.rx_errors),
                                v(&i.tx_bytes),
                                v(&i.tx_errors),
                            ],
                        )
                    })
                    .collect();
                let mut unique = list.clone();
                unique.dedup_by(|a, b| a.0 == b.0);
                network_json(
                    &time,
                    &unique,
                    n.default_interface.as_ref().map(|i| i.name.as_str()),
                )
            });
        let mut ephemeral_json = nodefs.json(&time);
        ephemeral_json["usedBytes"] = json!(ephemeral);
        let mut summary = json!({
            "podRef": {"name": meta.name, "namespace": meta.namespace, "uid": uid},
            "startTime": status.start_time.map(|t| t.0.to_string()),
            "containers": containers,
            "cpu": {"time": time, "usageCoreNanoSeconds": pod_cpu, "usageNanoCores": pod_cores},
            "memory": {"time": time, "usageBytes": pod_usage, "workingSetBytes": pod_ws, "rssBytes": pod_rss},
            "volume": volumes,
            "ephemeral-storage": ephemeral_json,
        });
        if let Some(network) = network {
            summary["network"] = network;
        }
        pod_summaries.push(summary);
    }
    rates.retain(|key| kept.iter().any(|k| k == key));
    Ok(json!({"node": node, "pods": pod_summaries}))
}

/// The machine (`/spec`, cAdvisor's MachineInfo fields that clients read).
pub fn machine_info(shared: &Shared) -> Value {
    let trimmed = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nodefs = Fs::of(&shared.root_dir).unwrap_or_default();
    json!({
        "timestamp": jiff::Timestamp::now().to_string(),
        "num_cores": cores,
        "memory_capacity": Memory::read().map(|m| m.capacity).unwrap_or(0),
        "machine_id": trimmed("/etc/machine-id"),
        "system_uuid": trimmed("/sys/class/dmi/id/product_uuid"),
        "boot_id": trimmed("/proc/sys/kernel/random/boot_id"),
        "filesystems": [{
            "device": shared.root_dir.display().to_string(),
            "capacity": nodefs.capacity,
            "inodes": nodefs.inodes,
        }],
    })
}

/// `/metrics/resource` from a summary: the node's, pods' and containers' CPU seconds and
/// memory working sets, with the sample times, as metrics-server reads them.
pub fn resource_metrics(summary: &Value) -> String {
    use crate::metrics::{escape, number};
    let millis = |time: &Value| {
        time.as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_millisecond())
            .unwrap_or(0)
    };
    let seconds = |ns: &Value| ns.as_u64().unwrap_or(0) as f64 / 1e9;
    let mut families: Vec<(&str, &str, &str, Vec<String>)> = vec![
        (
            "container_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed by the container in core-seconds",
            vec![],
        ),
        (
            "container_memory_working_set_bytes",
            "gauge",
            "Current working set of the container in bytes",
            vec![],
        ),
        (
            "container_start_time_seconds",
            "gauge",
            "Start time of the container since unix epoch in seconds",
            vec![],
        ),
        (
            "node_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed by the node in core-seconds",
            vec![],
        ),
        (
            "node_memory_working_set_bytes",
            "gauge",
            "Current working set of the node in bytes",
            vec![],
        ),
        (
            "pod_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed by the pod in core-seconds",
            vec![],
        ),
        (
            "pod_memory_working_set_bytes",
            "gauge",
            "Current working set of the pod in bytes",
            vec![],
        ),
        (
            "resource_scrape_error",
            "gauge",
            "1 if there was an error while getting container metrics, 0 otherwise",
            vec!["resource_scrape_error 0".into()],
        ),
    ];
    let mut add = |family: &str, line: String| {
        if let Some(f) = families.iter_mut().find(|f| f.0 == family) {
            f.3.push(line);
        }
    };
    // `<level>_cpu_usage_seconds_total` and `<level>_memory_working_set_bytes` of one entry of
    // the summary, as (family, line).
    let usage = |level: &str, labels: &str, stats: &serde_json::Value| {
        let (cpu, memory) = (
            format!("{level}_cpu_usage_seconds_total"),
            format!("{level}_memory_working_set_bytes"),
        );
        let series = |family: &str| {
            if labels.is_empty() {
                family.to_owned()
            } else {
                format!("{family}{{{labels}}}")
            }
        };
        [
            (
                series(&cpu),
                cpu,
                number(seconds(&stats["cpu"]["usageCoreNanoSeconds"])),
                millis(&stats["cpu"]["time"]),
            ),
            (
                series(&memory),
                memory,
                stats["memory"]["workingSetBytes"].to_string(),
                millis(&stats["memory"]["time"]),
            ),
        ]
        .map(|(series, family, value, time)| (family, format!("{series} {value} {time}")))
    };
    for (family, line) in usage("node", "", &summary["node"]) {
        add(&family, line);
    }
    for pod in summary["pods"].as_array().into_iter().flatten() {
        let (namespace, name) = (
            escape(pod["podRef"]["namespace"].as_str().unwrap_or_default()),
            escape(pod["podRef"]["name"].as_str().unwrap_or_default()),
        );
        let labels = format!("namespace=\"{namespace}\",pod=\"{name}\"");
        for (family, line) in usage("pod", &labels, pod) {
            add(&family, line);
        }
        for c in pod["containers"].as_array().into_iter().flatten() {
            let labels = format!(
                "container=\"{}\",{labels}",
                escape(c["name"].as_str().unwrap_or_default())
            );
            for (family, line) in usage("container", &labels, c) {
                add(&family, line);
            }
            add(
                "container_start_time_seconds",
                format!(
                    "container_start_time_seconds{{{labels}}} {} {}",
                    number(millis(&c["startTime"]) as f64 / 1000.0),
                    millis(&c["cpu"]["time"])
                ),
            );
        }
    }
    let mut out = String::new();
    for (name, kind, help, lines) in families {
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "# HELP {name} [STABLE] {help}\n# TYPE {name} {kind}\n"
        ));
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_working_set_excludes_inactive_file_pages() {
        let memory = Memory::parse(
            "MemTotal:       1000 kB\nMemFree:         200 kB\nMemAvailable:    600 kB\nInactive(file):  300 kB\nAnonPages:       250 kB\n",
        );
        assert_eq!(memory.capacity, 1000 * 1024);
        assert_eq!(memory.usage, 800 * 1024);
        assert_eq!(memory.working_set, 500 * 1024);
        assert_eq!(memory.available(), 500 * 1024);
        assert_eq!(memory.rss, 250 * 1024);
    }

    #[test]
    fn rates_come_from_the_previous_sample() {
        let rates = Rates::default();
        assert_eq!(rates.per_second("c", 1_000, 0), None);
        assert_eq!(rates.per_second("c", 501_000, 1_000_000_000), Some(500_000));
        // A counter that went back (a new container with the same key) restarts the rate.
        assert_eq!(rates.per_second("c", 10, 2_000_000_000), None);
        rates.retain(|k| k != "c");
        assert_eq!(rates.per_second("c", 20, 3_000_000_000), None);
    }

    #[test]
    fn net_dev_lines_give_bytes_and_errors() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n  eth0: 1000 10 1 0 0 0 0 0 2000 20 2 0 0 0 0 0\n";
        assert_eq!(
            interfaces(text),
            vec![("eth0".to_owned(), [1000, 1, 2000, 2])]
        );
    }

    #[test]
    fn resource_metrics_name_containers_pods_and_the_node() {
        let summary = json!({
            "node": {"cpu": {"time": "2026-01-01T00:00:00Z", "usageCoreNanoSeconds": 2_500_000_000u64},
                     "memory": {"time": "2026-01-01T00:00:00Z", "workingSetBytes": 1024}},
            "pods": [{"podRef": {"name": "web", "namespace": "shop"},
                      "cpu": {"time": "2026-01-01T00:00:00Z", "usageCoreNanoSeconds": 1_000_000_000u64},
                      "memory": {"time": "2026-01-01T00:00:00Z", "workingSetBytes": 512},
                      "containers": [{"name": "app", "startTime": "2026-01-01T00:00:00Z",
                                      "cpu": {"time": "2026-01-01T00:00:00Z", "usageCoreNanoSeconds": 1_000_000_000u64},
                                      "memory": {"time": "2026-01-01T00:00:00Z", "workingSetBytes": 512}}]}]
        });
        let text = resource_metrics(&summary);
        assert!(
            text.contains("node_cpu_usage_seconds_total 2.5 1767225600000\n"),
            "{text}"
        );
        assert!(text.contains("container_memory_working_set_bytes{container=\"app\",namespace=\"shop\",pod=\"web\"} 512 1767225600000\n"), "{text}");
        assert!(
            text.contains(
                "pod_cpu_usage_seconds_total{namespace=\"shop\",pod=\"web\"} 1 1767225600000\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE container_cpu_usage_seconds_total counter\n"),
            "{text}"
        );
        assert!(text.contains("resource_scrape_error 0\n"), "{text}");
    }
}
