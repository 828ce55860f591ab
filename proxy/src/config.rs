//! Upstream's `KubeProxyConfiguration` file (`kubeproxy.config.k8s.io/v1alpha1`, YAML or JSON):
//! the fields tug honours, with upstream's defaults. Unknown fields are ignored, as upstream's
//! lenient decoding does, so an existing kube-proxy ConfigMap can be reused as it is.

use std::time::Duration;

use serde::Deserialize;

/// The parts of a `KubeProxyConfiguration` tug uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeProxyConfiguration {
    /// `apiVersion`.
    #[serde(deserialize_with = "nullable")]
    pub api_version: String,
    /// `kind`.
    #[serde(deserialize_with = "nullable")]
    pub kind: String,
    /// `mode`: `""`/`iptables`, `nftables`, `ipvs`.
    #[serde(deserialize_with = "nullable")]
    pub mode: String,
    /// `clusterCIDR`: comma-separated pod CIDRs.
    #[serde(rename = "clusterCIDR")]
    #[serde(deserialize_with = "nullable")]
    pub cluster_cidr: String,
    /// `hostnameOverride`.
    #[serde(deserialize_with = "nullable")]
    pub hostname_override: String,
    /// `healthzBindAddress` (`0.0.0.0:10256`).
    #[serde(deserialize_with = "nullable")]
    pub healthz_bind_address: String,
    /// `metricsBindAddress` (`127.0.0.1:10249`).
    #[serde(deserialize_with = "nullable")]
    pub metrics_bind_address: String,
    /// `nodePortAddresses`.
    #[serde(deserialize_with = "nullable")]
    pub node_port_addresses: Vec<String>,
    /// `clientConnection`.
    #[serde(deserialize_with = "nullable")]
    pub client_connection: ClientConnection,
    /// `iptables`.
    #[serde(deserialize_with = "nullable")]
    pub iptables: IptablesSection,
    /// `ipvs`.
    #[serde(deserialize_with = "nullable")]
    pub ipvs: IpvsSection,
    /// `syncPeriod` (newer top-level form).
    #[serde(deserialize_with = "nullable")]
    pub sync_period: String,
    /// `minSyncPeriod` (newer top-level form).
    #[serde(deserialize_with = "nullable")]
    pub min_sync_period: String,
}

/// `clientConnection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientConnection {
    /// `kubeconfig`.
    #[serde(deserialize_with = "nullable")]
    pub kubeconfig: String,
}

/// `iptables`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IptablesSection {
    /// `masqueradeAll`.
    #[serde(deserialize_with = "nullable")]
    pub masquerade_all: bool,
    /// `syncPeriod`.
    #[serde(deserialize_with = "nullable")]
    pub sync_period: String,
    /// `minSyncPeriod`.
    #[serde(deserialize_with = "nullable")]
    pub min_sync_period: String,
}

/// `ipvs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IpvsSection {
    /// `scheduler` (empty: `rr`).
    #[serde(deserialize_with = "nullable")]
    pub scheduler: String,
}

/// Reads `null` as the default (YAML written by Go marshals unset fields as null).
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Why a configuration file is refused. Not retryable: the file must change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It does not parse.
    #[error("parse KubeProxyConfiguration: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// It is some other kind of object.
    #[error(
        "expected kind KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1), got {kind:?} {api_version:?}"
    )]
    Kind {
        /// Its kind.
        kind: String,
        /// Its apiVersion.
        api_version: String,
    },
    /// A duration field is not a Go duration.
    #[error("{field}: {value:?} is not a duration like 30s, 1m0s or 500ms")]
    Duration {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
    },
}

/// The proxy modes tug proxy has (`mode` in a configuration; empty is iptables).
pub const MODES: [&str; 3] = ["iptables", "nftables", "ipvs"];

impl KubeProxyConfiguration {
    /// Parses a configuration file's content.
    pub fn parse(text: &str) -> Result<KubeProxyConfiguration, ConfigError> {
        let config: KubeProxyConfiguration = serde_yaml::from_str(text)?;
        if (!config.kind.is_empty() && config.kind != "KubeProxyConfiguration")
            || (!config.api_version.is_empty()
                && !config.api_version.starts_with("kubeproxy.config.k8s.io/"))
        {
            return Err(ConfigError::Kind {
                kind: config.kind,
                api_version: config.api_version,
            });
        }
        Ok(config)
    }

    /// `syncPeriod` (default 30 s).
    pub fn sync_period(&self) -> Result<Duration, ConfigError> {
        let value = first(&self.sync_period, &self.iptables.sync_period);
        duration_or("syncPeriod", value, Duration::from_secs(30))
    }

    /// `minSyncPeriod` (default 1 s).
    pub fn min_sync_period(&self) -> Result<Duration, ConfigError> {
        let value = first(&self.min_sync_period, &self.iptables.min_sync_period);
        duration_or("minSyncPeriod", value, Duration::from_secs(1))
    }
}

fn first<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() { b } else { a }
}

fn duration_or(
    field: &'static str,
    value: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    if value.is_empty() {
        return Ok(default);
    }
    // As upstream defaults them: a zero duration (kubeadm writes `0s`) is the default.
    match parse_duration(value) {
        Some(Duration::ZERO) => Ok(default),
        Some(duration) => Ok(duration),
        None => Err(ConfigError::Duration {
            field,
            value: value.to_owned(),
        }),
    }
}

/// Parses a Go duration (`1h2m3s`, `500ms`, `1.5s`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text.trim();
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeadm_style_config_parses() {
        let text = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 10.244.0.0/16
iptables:
  masqueradeAll: false
  minSyncPeriod: 0s
  syncPeriod: 1m0s
mode: ""
nodePortAddresses: null
conntrack:
  maxPerCore: null
"#;
        let config = KubeProxyConfiguration::parse(text).unwrap();
        assert_eq!(config.cluster_cidr, "10.244.0.0/16");
        assert_eq!(
            config.client_connection.kubeconfig,
            "/var/lib/kube-proxy/kubeconfig.conf"
        );
        assert_eq!(config.mode, "");
        assert_eq!(config.sync_period().unwrap(), Duration::from_secs(60));
        // kubeadm's `0s` is unset: upstream's defaults (1 s) apply.
        assert_eq!(config.min_sync_period().unwrap(), Duration::from_secs(1));
        let zero = KubeProxyConfiguration::parse("iptables:\n  syncPeriod: 0s\n").unwrap();
        assert_eq!(zero.sync_period().unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn wrong_kinds_and_durations_are_named() {
        let error = KubeProxyConfiguration::parse(
            "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\n",
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("KubeletConfiguration"),
            "{error}"
        );
        let config = KubeProxyConfiguration::parse("iptables:\n  syncPeriod: soon\n").unwrap();
        assert_eq!(
            config.sync_period().unwrap_err().to_string(),
            "syncPeriod: \"soon\" is not a duration like 30s, 1m0s or 500ms"
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("3d"), None);
    }
}
