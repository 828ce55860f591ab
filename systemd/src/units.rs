//! tug's systemd units: what `tug join` installs and `tug reset` removes.
//!
//! Each service is `Type=notify` (it says READY=1 once serving and pings the watchdog from its
//! runtime), restarts always, and carries only the hardening it tolerates: the shim and the
//! kubelet run pods and mount volumes, so they keep the host writable and every capability; the
//! proxy and netd get a read-only system and only the network capabilities they use.

/// The units, in start order.
pub const SERVICES: [&str; 4] = ["tug-shim", "tug-kubelet", "tug-proxy", "tug-netd"];

/// Where units are installed, below the root.
pub const UNIT_DIR: &str = "etc/systemd/system";

/// What the units are generated from.
#[derive(Debug, Clone)]
pub struct UnitConfig {
    /// The installed tug binary.
    pub binary: String,
    /// This node's name.
    pub node_name: String,
    /// The cluster's pod CIDR.
    pub cluster_cidr: String,
    /// Write a `containerd.service` too (the distribution ships none).
    pub containerd: bool,
    /// Flags added to the proxy's command line (`--config`, `--proxy-mode`).
    pub proxy_flags: Vec<String>,
}

/// `(file name, text)` of each unit.
pub fn render(config: &UnitConfig) -> Vec<(String, String)> {
    let UnitConfig {
        binary,
        node_name,
        cluster_cidr,
        ..
    } = config;
    let proxy_flags: String = config
        .proxy_flags
        .iter()
        .map(|flag| format!(" {flag}"))
        .collect();
    let common = "Restart=always\nRestartSec=2\nWatchdogSec=60\nNotifyAccess=main\n";
    let install = "[Install]\nWantedBy=multi-user.target\n";
    let mut units = vec![
        (
            "tug-shim.service".to_owned(),
            format!(
                "[Unit]\nDescription=tug CRI runtime shim (CRI v1 over containerd)\nAfter=containerd.service network-online.target\nRequires=containerd.service\nWants=network-online.target\n\n[Service]\nType=notify\nExecStart={binary} shim\n{common}# Containers live under containerd's shims: a restart of tug-shim must not touch them.\nKillMode=process\nDelegate=yes\nLimitNOFILE=1048576\nOOMScoreAdjust=-999\n\n{install}"
            ),
        ),
        (
            "tug-kubelet.service".to_owned(),
            format!(
                "[Unit]\nDescription=tug kubelet (registers the node, runs its pods)\nAfter=tug-shim.service network-online.target\nWants=tug-shim.service network-online.target\n\n[Service]\nType=notify\nExecStart={binary} kubelet --config /var/lib/kubelet/config.yaml --kubeconfig /etc/kubernetes/kubelet.conf --bootstrap-kubeconfig /etc/kubernetes/bootstrap-kubelet.conf --hostname-override {node_name} --container-runtime-endpoint unix:///run/tug/cri.sock\n{common}# Pods outlive a kubelet restart; the kubelet adopts them again.\nKillMode=process\nDelegate=yes\nOOMScoreAdjust=-999\n\n{install}"
            ),
        ),
        (
            "tug-proxy.service".to_owned(),
            format!(
                "[Unit]\nDescription=tug kube-proxy (Services to netfilter or IPVS rules)\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nType=notify\nExecStart={binary} proxy --kubeconfig /etc/kubernetes/kubelet.conf --hostname-override {node_name} --cluster-cidr {cluster_cidr}{proxy_flags}\n{common}CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_MODULE\nAmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_MODULE\nNoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\nReadWritePaths=-/run/xtables.lock\nProtectKernelLogs=yes\nProtectControlGroups=yes\nRestrictNamespaces=yes\nLockPersonality=yes\nRestrictRealtime=yes\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\nSystemCallArchitectures=native\n\n{install}"
            ),
        ),
        (
            "tug-netd.service".to_owned(),
            format!(
                "[Unit]\nDescription=tug node network agent (pod CIDR, CNI config, routes to other nodes)\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nType=notify\nExecStart={binary} netd --kubeconfig /etc/kubernetes/kubelet.conf --node-name {node_name} --cluster-cidr {cluster_cidr}\n{common}CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW\nAmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW\nNoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\nReadWritePaths=/etc/cni/net.d /var/lib/tug -/run/xtables.lock\nProtectKernelLogs=yes\nProtectControlGroups=yes\nLockPersonality=yes\nRestrictRealtime=yes\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\nSystemCallArchitectures=native\n\n{install}"
            ),
        ),
    ];
    if config.containerd {
        units.insert(
            0,
            (
                "containerd.service".to_owned(),
                "[Unit]\nDescription=containerd container runtime (installed by tug join)\nAfter=network.target local-fs.target\n\n[Service]\nExecStartPre=-/sbin/modprobe overlay\nExecStart=/usr/bin/containerd\nType=notify\nDelegate=yes\nKillMode=process\nRestart=always\nRestartSec=5\nLimitNPROC=infinity\nLimitCORE=infinity\nLimitNOFILE=infinity\nTasksMax=infinity\nOOMScoreAdjust=-999\n\n[Install]\nWantedBy=multi-user.target\n".to_owned(),
            ),
        );
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(containerd: bool) -> UnitConfig {
        UnitConfig {
            binary: "/usr/local/bin/tug".into(),
            node_name: "node-1".into(),
            cluster_cidr: "10.244.0.0/16".into(),
            containerd,
            proxy_flags: Vec::new(),
        }
    }

    #[test]
    fn each_service_is_notify_with_a_watchdog_and_restarts() {
        let units = render(&config(false));
        assert_eq!(units.len(), 4);
        for (name, text) in &units {
            for line in [
                "Type=notify",
                "Restart=always",
                "WatchdogSec=60",
                "WantedBy=multi-user.target",
            ] {
                assert!(text.lines().any(|l| l == line), "{name} lacks {line}");
            }
        }
        let shim = &units[0].1;
        assert!(
            shim.contains("After=containerd.service")
                && shim.contains("KillMode=process")
                && shim.contains("Delegate=yes")
        );
        let kubelet = &units[1].1;
        assert!(
            kubelet.contains("After=tug-shim.service")
                && kubelet.contains("--hostname-override node-1")
        );
        let proxy = &units[2].1;
        assert!(proxy.contains("CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_MODULE"));
        assert!(proxy.contains("ProtectSystem=strict"));
    }

    #[test]
    fn proxy_flags_end_the_proxy_command_line() {
        let mut with = config(false);
        with.proxy_flags = vec![
            "--config /var/lib/kube-proxy/config.conf".into(),
            "--proxy-mode ipvs".into(),
        ];
        let units = render(&with);
        let exec = units[2]
            .1
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .expect("an ExecStart");
        assert!(
            exec.ends_with(
                "--cluster-cidr 10.244.0.0/16 --config /var/lib/kube-proxy/config.conf --proxy-mode ipvs"
            ),
            "{exec}"
        );
        assert_eq!(
            units[0].1,
            render(&config(false))[0].1,
            "the shim's unit is unchanged"
        );
    }

    #[test]
    fn containerd_gets_a_unit_only_when_asked() {
        assert!(
            !render(&config(false))
                .iter()
                .any(|(n, _)| n == "containerd.service")
        );
        assert_eq!(render(&config(true))[0].0, "containerd.service");
    }
}
