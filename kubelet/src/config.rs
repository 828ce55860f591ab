//! The kubelet's configuration file: upstream's `KubeletConfiguration`
//! (`kubelet.config.k8s.io/v1beta1`, YAML or JSON). The fields tug acts on are read; others are
//! accepted (so a kubeadm-written file loads) and listed in a warning, never silently
//! misread. Flags given on the command line win over the file.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The fields of `KubeletConfiguration` tug reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeletConfiguration {
    /// `kubelet.config.k8s.io/v1beta1`.
    pub api_version: String,
    /// `KubeletConfiguration`.
    pub kind: String,
    /// DNS servers for ClusterFirst pods.
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Vec<String>,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
    /// Pods this node accepts.
    pub max_pods: u32,
    /// Taints the Node registers with.
    pub register_with_taints: Vec<TaintSpec>,
    /// The CRI socket.
    pub container_runtime_endpoint: String,
    /// Where pod logs go.
    pub pod_logs_dir: String,
    /// The resolv.conf pods with `dnsPolicy: Default` get.
    pub resolv_conf: String,
    /// `cgroupfs` or `systemd`.
    pub cgroup_driver: String,
    /// Unset seccomp profiles are RuntimeDefault (tug's default: true; upstream's: false).
    pub seccomp_default: bool,
    /// The API port.
    pub port: i32,
    /// Port of the local `/healthz` (0 to disable).
    pub healthz_port: u16,
    /// Address of the local `/healthz`.
    pub healthz_bind_address: String,
    /// Static pod manifests.
    pub static_pod_path: String,
    /// The unauthenticated read-only port (0: off, the default).
    pub read_only_port: u16,
    /// The address the kubelet's ports bind to.
    pub address: String,
    /// How often every pod is synced without a change (a Go duration, `1m`).
    pub sync_frequency: String,
    /// The API's serving certificate (PEM); empty: a self-signed one in the cert dir.
    pub tls_cert_file: String,
    /// Its key.
    pub tls_private_key_file: String,
    /// Serving certificate from the cluster (signer `kubernetes.io/kubelet-serving`), rotated,
    /// instead of `tlsCertFile` or a self-signed one.
    #[serde(rename = "serverTLSBootstrap")]
    pub server_tls_bootstrap: bool,
    /// Renew the node's client certificate (`<cert-dir>/kubelet-client-current.pem`) before it
    /// expires (kubeadm turns this on).
    pub rotate_certificates: bool,
    /// Hard eviction thresholds (signal → `100Mi` or `10%`); unset: upstream's defaults.
    pub eviction_hard: Option<BTreeMap<String, String>>,
    /// How long a pressure condition holds after its threshold was last crossed (`5m`).
    pub eviction_pressure_transition_period: String,
    /// How API requests are authenticated.
    pub authentication: Authentication,
    /// How API requests are authorized.
    pub authorization: AuthorizationConfig,
    /// Everything else, reported as not acted on.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

/// `authentication`: client certificates, webhook (TokenReview) tokens, anonymous.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Authentication {
    /// `x509.clientCAFile`.
    pub x509: X509,
    /// `webhook.enabled` (default true).
    pub webhook: Enabled,
    /// `anonymous.enabled` (default false).
    pub anonymous: Enabled,
}

impl Default for Authentication {
    fn default() -> Authentication {
        Authentication {
            x509: X509::default(),
            webhook: Enabled { enabled: true },
            anonymous: Enabled { enabled: false },
        }
    }
}

/// `x509`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct X509 {
    /// The CA bundle that signs client certificates.
    #[serde(rename = "clientCAFile")]
    pub client_ca_file: String,
}

/// `{enabled: bool}`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct Enabled {
    /// On or off.
    pub enabled: bool,
}

/// `authorization`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthorizationConfig {
    /// `Webhook` (default) or `AlwaysAllow`.
    pub mode: String,
}

impl Default for AuthorizationConfig {
    fn default() -> AuthorizationConfig {
        AuthorizationConfig {
            mode: "Webhook".into(),
        }
    }
}

/// A taint as the file writes it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct TaintSpec {
    /// Key.
    pub key: String,
    /// Value.
    pub value: Option<String>,
    /// NoSchedule, PreferNoSchedule or NoExecute.
    pub effect: String,
}

impl Default for KubeletConfiguration {
    fn default() -> Self {
        KubeletConfiguration {
            api_version: "kubelet.config.k8s.io/v1beta1".into(),
            kind: "KubeletConfiguration".into(),
            cluster_dns: Vec::new(),
            cluster_domain: String::new(),
            max_pods: 110,
            register_with_taints: Vec::new(),
            container_runtime_endpoint: "unix:///run/tug/cri.sock".into(),
            pod_logs_dir: "/var/log/pods".into(),
            resolv_conf: "/etc/resolv.conf".into(),
            cgroup_driver: "cgroupfs".into(),
            seccomp_default: true,
            port: 10250,
            healthz_port: 10248,
            healthz_bind_address: "127.0.0.1".into(),
            static_pod_path: String::new(),
            read_only_port: 0,
            address: "0.0.0.0".into(),
            sync_frequency: "1m".into(),
            tls_cert_file: String::new(),
            tls_private_key_file: String::new(),
            server_tls_bootstrap: false,
            rotate_certificates: false,
            eviction_hard: None,
            eviction_pressure_transition_period: "5m".into(),
            authentication: Authentication::default(),
            authorization: AuthorizationConfig::default(),
            other: BTreeMap::new(),
        }
    }
}

/// Why the file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, or a field of the wrong type.
    #[error("not a valid KubeletConfiguration: {0}")]
    Syntax(String),
    /// Another kind of file.
    #[error(
        "expected kind KubeletConfiguration (apiVersion kubelet.config.k8s.io/v1beta1), got {kind} ({api_version})"
    )]
    Kind {
        /// Its kind.
        kind: String,
        /// Its apiVersion.
        api_version: String,
    },
    /// A value tug cannot use.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Fields upstream defines that tug reads under another name or does not need to act on.
const IGNORED_QUIETLY: &[&str] = &["staticPodURL"];

impl KubeletConfiguration {
    /// Parses and checks the file.
    pub fn parse(text: &str) -> Result<KubeletConfiguration, ConfigError> {
        let config: KubeletConfiguration =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        if config.kind != "KubeletConfiguration"
            || !config.api_version.starts_with("kubelet.config.k8s.io/")
        {
            return Err(ConfigError::Kind {
                kind: config.kind,
                api_version: config.api_version,
            });
        }
        if !matches!(config.cgroup_driver.as_str(), "cgroupfs" | "systemd") {
            return Err(ConfigError::Invalid {
                field: "cgroupDriver",
                message: format!("{:?} is neither cgroupfs nor systemd", config.cgroup_driver),
            });
        }
        config.sync_period()?;
        config.eviction()?;
        for server in &config.cluster_dns {
            if server.parse::<std::net::IpAddr>().is_err() {
                return Err(ConfigError::Invalid {
                    field: "clusterDNS",
                    message: format!("{server:?} is not an IP address"),
                });
            }
        }
        for taint in &config.register_with_taints {
            if !matches!(
                taint.effect.as_str(),
                "NoSchedule" | "PreferNoSchedule" | "NoExecute"
            ) {
                return Err(ConfigError::Invalid {
                    field: "registerWithTaints",
                    message: format!(
                        "taint {:?} has effect {:?} (NoSchedule, PreferNoSchedule or NoExecute)",
                        taint.key, taint.effect
                    ),
                });
            }
        }
        Ok(config)
    }

    /// The eviction manager's settings (`evictionHard`, `evictionPressureTransitionPeriod`).
    pub fn eviction(&self) -> Result<crate::eviction::EvictionConfig, ConfigError> {
        let thresholds = match &self.eviction_hard {
            None => crate::eviction::defaults(),
            Some(map) => crate::eviction::parse(map).map_err(|message| ConfigError::Invalid {
                field: "evictionHard",
                message,
            })?,
        };
        Ok(crate::eviction::EvictionConfig {
            thresholds,
            period: std::time::Duration::from_secs(10),
            transition: duration(
                "evictionPressureTransitionPeriod",
                &self.eviction_pressure_transition_period,
            )?,
        })
    }

    /// `syncFrequency` as a duration.
    pub fn sync_period(&self) -> Result<std::time::Duration, ConfigError> {
        let invalid = |why: String| ConfigError::Invalid {
            field: "syncFrequency",
            message: why,
        };
        let period = duration("syncFrequency", &self.sync_frequency)?;
        if period < std::time::Duration::from_secs(1) {
            return Err(invalid(format!(
                "{:?} is shorter than 1s",
                self.sync_frequency
            )));
        }
        Ok(period)
    }

    /// Fields present in the file that tug does not act on.
    pub fn unused_fields(&self) -> Vec<&str> {
        self.other
            .keys()
            .map(String::as_str)
            .filter(|k| !IGNORED_QUIETLY.contains(k))
            .collect()
    }
}

/// A duration field (`1m30s`, `5m`), not negative.
fn duration(field: &'static str, text: &str) -> Result<std::time::Duration, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { field, message };
    let parsed: jiff::SignedDuration = text
        .parse()
        .map_err(|e| invalid(format!("{text:?} is not a duration like 1m or 30s: {e}")))?;
    std::time::Duration::try_from(parsed).map_err(|_| invalid("must not be negative".into()))
}

/// Parses `key[=value]:Effect` (the `--register-with-taints` form).
pub fn parse_taint(text: &str) -> Result<TaintSpec, String> {
    let (left, effect) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("taint {text:?} has no effect (key[=value]:Effect)"))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!(
            "taint {text:?}: effect {effect:?} is not NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = match left.split_once('=') {
        Some((k, v)) => (k, Some(v.to_owned())),
        None => (left, None),
    };
    if key.is_empty() {
        return Err(format!("taint {text:?} has an empty key"));
    }
    Ok(TaintSpec {
        key: key.to_owned(),
        value,
        effect: effect.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeadm_style_file_loads_and_reports_what_tug_ignores() {
        let config = KubeletConfiguration::parse(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nclusterDNS: [10.96.0.10]\nclusterDomain: cluster.local\ncgroupDriver: systemd\nmaxPods: 50\nserverTLSBootstrap: true\nrotateCertificates: true\nauthentication:\n  anonymous:\n    enabled: false\nevictionHard:\n  memory.available: 100Mi\nregisterWithTaints:\n- key: dedicated\n  value: infra\n  effect: NoSchedule\n",
        )
        .unwrap();
        assert_eq!(config.cluster_dns, ["10.96.0.10"]);
        assert_eq!(config.max_pods, 50);
        assert!(config.server_tls_bootstrap);
        assert!(config.rotate_certificates);
        assert_eq!(config.cgroup_driver, "systemd");
        assert!(config.seccomp_default);
        assert_eq!(
            config.register_with_taints[0].value.as_deref(),
            Some("infra")
        );
        assert!(
            config.unused_fields().is_empty(),
            "{:?}",
            config.unused_fields()
        );
        let eviction = config.eviction().unwrap();
        assert_eq!(eviction.thresholds.len(), 1, "only what evictionHard names");
        assert_eq!(eviction.transition, std::time::Duration::from_secs(300));
        assert_eq!(
            config.sync_period().unwrap(),
            std::time::Duration::from_secs(60)
        );
        let mut fast = config.clone();
        fast.sync_frequency = "1m30s".into();
        assert_eq!(
            fast.sync_period().unwrap(),
            std::time::Duration::from_secs(90)
        );
        fast.sync_frequency = "soon".into();
        assert!(
            fast.sync_period()
                .unwrap_err()
                .to_string()
                .starts_with("syncFrequency:")
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let kind = KubeletConfiguration::parse("apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert!(kind.to_string().contains("got ConfigMap"), "{kind}");
        let driver = KubeletConfiguration::parse("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: cgroupv3\n").unwrap_err();
        assert!(driver.to_string().starts_with("cgroupDriver:"), "{driver}");
        let dns = KubeletConfiguration::parse("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nclusterDNS: [dns.local]\n").unwrap_err();
        assert!(dns.to_string().contains("dns.local"), "{dns}");
        assert_eq!(
            parse_taint("a=b:NoExecute").unwrap(),
            TaintSpec {
                key: "a".into(),
                value: Some("b".into()),
                effect: "NoExecute".into()
            }
        );
        assert!(
            parse_taint("a:Sometimes")
                .unwrap_err()
                .contains("Sometimes")
        );
    }
}
