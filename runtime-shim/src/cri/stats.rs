//! Container and sandbox statistics, read straight from the cgroup filesystem (v1 and v2) and
//! the snapshotter, plus the sandbox's interface counters from `/proc/<pid>/net/dev`.

use std::path::Path;

use containerd_client::services::v1::snapshots::UsageRequest;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use k8s_cri::v1::*;
use tonic::Status;

use super::containers::{Container, Phase};
use super::runtime::{Runtime, Sandbox, now_nanos};
use crate::image::pull::SNAPSHOTTER;

/// The value of `key` in a flat-keyed cgroup file (`key value` per line).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_number(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// CPU time used (ns) and memory figures of a cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// Cumulative CPU time, ns.
    pub cpu_ns: Option<u64>,
    /// Memory in use, bytes.
    pub memory: Option<u64>,
    /// Memory in use less inactive file cache.
    pub working_set: Option<u64>,
    /// Anonymous memory.
    pub rss: Option<u64>,
    /// Page faults.
    pub page_faults: Option<u64>,
    /// Major page faults.
    pub major_page_faults: Option<u64>,
}

/// Reads a cgroup's usage under `root` (`/sys/fs/cgroup`), v2 first, then v1.
pub fn cgroup_usage(root: &Path, cgroups_path: &str) -> CgroupUsage {
    let relative = cgroups_path.trim_start_matches('/');
    let v2 = root.join(relative);
    if v2.join("cgroup.controllers").exists() {
        let stat = read(&v2.join("memory.stat")).unwrap_or_default();
        let memory = read_number(&v2.join("memory.current"));
        return CgroupUsage {
            cpu_ns: read(&v2.join("cpu.stat"))
                .and_then(|s| keyed(&s, "usage_usec"))
                .map(|us| us * 1000),
            memory,
            working_set: memory
                .map(|m| m.saturating_sub(keyed(&stat, "inactive_file").unwrap_or(0))),
            rss: keyed(&stat, "anon"),
            page_faults: keyed(&stat, "pgfault"),
            major_page_faults: keyed(&stat, "pgmajfault"),
        };
    }
    let memory_dir = root.join("memory").join(relative);
    let stat = read(&memory_dir.join("memory.stat")).unwrap_or_default();
    let memory = read_number(&memory_dir.join("memory.usage_in_bytes"));
    let cpu_ns = ["cpuacct", "cpu,cpuacct"]
        .iter()
        .find_map(|c| read_number(&root.join(c).join(relative).join("cpuacct.usage")));
    CgroupUsage {
        cpu_ns,
        memory,
        working_set: memory
            .map(|m| m.saturating_sub(keyed(&stat, "total_inactive_file").unwrap_or(0))),
        rss: keyed(&stat, "total_rss"),
        page_faults: keyed(&stat, "total_pgfault"),
        major_page_faults: keyed(&stat, "total_pgmajfault"),
    }
}

/// Interface counters from `/proc/<pid>/net/dev` content.
pub fn net_dev(text: &str) -> Vec<NetworkInterfaceUsage> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let fields: Vec<u64> = counters
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            if fields.len() < 11 {
                return None;
            }
            let value = |v: u64| Some(UInt64Value { value: v });
            Some(NetworkInterfaceUsage {
                name: name.trim().to_owned(),
                rx_bytes: value(fields[0]),
                rx_errors: value(fields[2]),
                tx_bytes: value(fields[8]),
                tx_errors: value(fields[10]),
            })
        })
        .filter(|i| i.name != "lo")
        .collect()
}

fn value(v: Option<u64>) -> Option<UInt64Value> {
    v.map(|value| UInt64Value { value })
}

impl Runtime {
    /// Statistics of one container.
    pub(super) async fn stats_of(&self, container: &Container) -> ContainerStats {
        let timestamp = now_nanos();
        let attributes = Some(ContainerAttributes {
            id: container.id.clone(),
            metadata: container.config.metadata.clone(),
            labels: container.config.labels.clone(),
            annotations: container.config.annotations.clone(),
        });
        let usage = if container.state.phase == Phase::Running {
            cgroup_usage(Path::new("/sys/fs/cgroup"), &container.state.cgroups_path)
        } else {
            CgroupUsage::default()
        };
        let nano_cores = usage.cpu_ns.and_then(|cpu| {
            let mut samples = self
                .inner
                .cpu_samples
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let previous = samples.insert(container.id.clone(), (timestamp, cpu));
            let (then, before) = previous?;
            let elapsed = u64::try_from(timestamp - then).ok().filter(|e| *e > 0)?;
            Some((cpu.saturating_sub(before) as u128 * 1_000_000_000 / elapsed as u128) as u64)
        });
        let mut snapshots = SnapshotsClient::new(self.inner.containerd.channel());
        let layer = snapshots
            .usage(self.inner.containerd.request(
                UsageRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: container.id.clone(),
                },
                None,
            ))
            .await
            .ok()
            .map(|u| u.into_inner());
        ContainerStats {
            attributes,
            cpu: Some(CpuUsage {
                timestamp,
                usage_core_nano_seconds: value(usage.cpu_ns),
                usage_nano_cores: value(nano_cores),
            }),
            memory: Some(MemoryUsage {
                timestamp,
                working_set_bytes: value(usage.working_set),
                available_bytes: None,
                usage_bytes: value(usage.memory),
                rss_bytes: value(usage.rss),
                page_faults: value(usage.page_faults),
                major_page_faults: value(usage.major_page_faults),
            }),
            writable_layer: layer.map(|l| FilesystemUsage {
                timestamp,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: self.inner.images.snapshotter_root().to_owned(),
                }),
                used_bytes: value(Some(l.size.max(0) as u64)),
                inodes_used: value(Some(l.inodes.max(0) as u64)),
            }),
            swap: None,
        }
    }

    /// Statistics of a sandbox: its containers', summed, and its interfaces'.
    pub(super) async fn sandbox_stats(&self, sandbox: &Sandbox) -> Result<PodSandboxStats, Status> {
        let containers = self.containers_of(&sandbox.id).await?;
        let mut stats = Vec::new();
        for container in &containers {
            stats.push(self.stats_of(container).await);
        }
        let timestamp = now_nanos();
        let sum = |get: &dyn Fn(&ContainerStats) -> Option<u64>| -> Option<UInt64Value> {
            let values: Vec<u64> = stats.iter().filter_map(get).collect();
            (!values.is_empty()).then(|| UInt64Value {
                value: values.iter().sum(),
            })
        };
        let cpu = CpuUsage {
            timestamp,
            usage_core_nano_seconds: sum(&|s| {
                s.cpu
                    .as_ref()?
                    .usage_core_nano_seconds
                    .as_ref()
                    .map(|v| v.value)
            }),
            usage_nano_cores: sum(&|s| s.cpu.as_ref()?.usage_nano_cores.as_ref().map(|v| v.value)),
        };
        let memory = MemoryUsage {
            timestamp,
            working_set_bytes: sum(&|s| {
                s.memory
                    .as_ref()?
                    .working_set_bytes
                    .as_ref()
                    .map(|v| v.value)
            }),
            available_bytes: None,
            usage_bytes: sum(&|s| s.memory.as_ref()?.usage_bytes.as_ref().map(|v| v.value)),
            rss_bytes: sum(&|s| s.memory.as_ref()?.rss_bytes.as_ref().map(|v| v.value)),
            page_faults: sum(&|s| s.memory.as_ref()?.page_faults.as_ref().map(|v| v.value)),
            major_page_faults: sum(&|s| {
                s.memory
                    .as_ref()?
                    .major_page_faults
                    .as_ref()
                    .map(|v| v.value)
            }),
        };
        let mut network = None;
        if sandbox.state.netns.is_some() {
            for container in containers
                .iter()
                .filter(|c| c.state.phase == Phase::Running)
            {
                let Ok(task) = self.task(&container.id).await else {
                    continue;
                };
                let Some(pid) = task.map(|p| p.pid).filter(|p| *p > 0) else {
                    continue;
                };
                if let Some(text) = read(&Path::new("/proc").join(pid.to_string()).join("net/dev"))
                {
                    let interfaces = net_dev(&text);
                    network = Some(NetworkUsage {
                        timestamp,
                        default_interface: interfaces.iter().find(|i| i.name == "eth0").cloned(),
                        interfaces,
                    });
                    break;
                }
            }
        }
        Ok(PodSandboxStats {
            attributes: Some(PodSandboxAttributes {
                id: sandbox.id.clone(),
                metadata: sandbox.config.metadata.clone(),
                labels: sandbox.config.labels.clone(),
                annotations: sandbox.config.annotations.clone(),
            }),
            linux: Some(LinuxPodSandboxStats {
                cpu: Some(cpu),
                memory: Some(memory),
                network,
                process: None,
                containers: stats,
            }),
            windows: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_files_parse() {
        let stat = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(keyed(stat, "usage_usec"), Some(1234));
        assert_eq!(keyed(stat, "nope"), None);
    }

    #[test]
    fn cgroup_v2_and_v1_layouts_are_read() {
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("pods/c1");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "cpu memory").unwrap();
        std::fs::write(v2.join("cpu.stat"), "usage_usec 2000\n").unwrap();
        std::fs::write(v2.join("memory.current"), "1000000\n").unwrap();
        std::fs::write(
            v2.join("memory.stat"),
            "anon 600000\ninactive_file 300000\npgfault 7\npgmajfault 1\n",
        )
        .unwrap();
        let usage = cgroup_usage(root.path(), "/pods/c1");
        assert_eq!(usage.cpu_ns, Some(2_000_000));
        assert_eq!(usage.working_set, Some(700_000));
        assert_eq!(usage.rss, Some(600_000));

        let v1 = tempfile::tempdir().unwrap();
        let memory = v1.path().join("memory/pods/c2");
        let cpu = v1.path().join("cpuacct/pods/c2");
        std::fs::create_dir_all(&memory).unwrap();
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "5555\n").unwrap();
        std::fs::write(memory.join("memory.usage_in_bytes"), "4096\n").unwrap();
        std::fs::write(
            memory.join("memory.stat"),
            "total_rss 1024\ntotal_inactive_file 96\n",
        )
        .unwrap();
        let usage = cgroup_usage(v1.path(), "pods/c2");
        assert_eq!(usage.cpu_ns, Some(5555));
        assert_eq!(usage.working_set, Some(4000));
        assert_eq!(usage.rss, Some(1024));
    }

    #[test]
    fn net_dev_lists_interfaces_without_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  eth0:    5000      10    2    0    0     0          0         0     3000       8    1    0    0     0       0          0\n";
        let interfaces = net_dev(text);
        assert_eq!(interfaces.len(), 1);
        assert_eq!(interfaces[0].name, "eth0");
        assert_eq!(interfaces[0].rx_bytes, Some(UInt64Value { value: 5000 }));
        assert_eq!(interfaces[0].rx_errors, Some(UInt64Value { value: 2 }));
        assert_eq!(interfaces[0].tx_bytes, Some(UInt64Value { value: 3000 }));
        assert_eq!(interfaces[0].tx_errors, Some(UInt64Value { value: 1 }));
    }
}
