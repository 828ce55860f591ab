//! The CNI protocol as the spec (1.1) defines it: the environment, the network configuration on
//! stdin, results, and errors with their codes. Results are written in the version the
//! configuration asked for (0.3.0 through 1.1.0).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The CNI version tug-cni speaks natively.
pub const CURRENT_VERSION: &str = "1.1.0";

/// Every version whose configurations tug-cni accepts.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The link-local gateway every pod routes through (never on the wire: the pod resolves it to
/// its host veth's MAC with a permanent neighbour entry).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The IPv6 gateway every dual-stack pod routes through (resolved the same way).
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// A CNI error: what goes to stdout as JSON, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    /// The spec's error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// What exactly went wrong, and where.
    pub details: String,
}

/// Error codes from the CNI spec (and tug's own, from 100).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin is not available (no pod CIDR yet).
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin is not available for ADD requests (address pool exhausted).
    pub const NOT_AVAILABLE_FOR_ADD: u32 = 51;
    /// CHECK found the container's network not as ADD left it.
    pub const CHECK_FAILED: u32 = 100;
}

impl CniError {
    /// An error with a code, a message and its details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error as the spec's JSON.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The CNI command (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach it.
    Del,
    /// Verify the attachment.
    Check,
    /// Report whether the plugin can serve ADDs.
    Status,
    /// Release everything not in the valid attachments.
    Gc,
    /// Report supported versions.
    Version,
}

/// The environment of one invocation.
#[derive(Debug, Clone)]
pub struct Env {
    /// The command.
    pub command: Command,
    /// `CNI_CONTAINERID` (ADD, DEL, CHECK).
    pub container_id: String,
    /// `CNI_NETNS`: path of the container's network namespace (ADD, CHECK; optional for DEL).
    pub netns: Option<String>,
    /// `CNI_IFNAME`: the interface to create inside the container.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// Reads the CNI environment through `var`; errors name the variable (code 4).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "unknown CNI_COMMAND",
                    format!(
                        "CNI_COMMAND={other} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
                    ),
                ));
            }
            None => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "missing CNI_COMMAND",
                    "CNI_COMMAND is not set; tug-cni is a CNI plugin, run by a container runtime",
                ));
            }
        };
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |name: &str| -> Result<String, CniError> {
            match var(name).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v),
                None => Err(CniError::new(
                    code::INVALID_ENV,
                    format!("missing {name}"),
                    format!("{name} is required for this CNI_COMMAND"),
                )),
            }
        };
        let container_id = if needs_container {
            required("CNI_CONTAINERID")?
        } else {
            String::new()
        };
        let ifname = if needs_container {
            required("CNI_IFNAME")?
        } else {
            String::new()
        };
        if needs_container && !valid_ifname(&ifname) {
            return Err(CniError::new(
                code::INVALID_ENV,
                "invalid CNI_IFNAME",
                format!(
                    "CNI_IFNAME={ifname}: interface names are 1-15 characters, not '.' or '..', without '/', ':' or whitespace"
                ),
            ));
        }
        if needs_container
            && !container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(CniError::new(
                code::INVALID_ENV,
                "invalid CNI_CONTAINERID",
                format!(
                    "CNI_CONTAINERID={container_id}: only letters, digits, '_', '.' and '-' are allowed"
                ),
            ));
        }
        let netns = var("CNI_NETNS").filter(|v| !v.is_empty());
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(CniError::new(
                code::INVALID_ENV,
                "missing CNI_NETNS",
                "CNI_NETNS is required for ADD and CHECK",
            ));
        }
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
                None => Err(CniError::new(
                    code::INVALID_ENV,
                    "invalid CNI_ARGS",
                    format!("CNI_ARGS entry {kv:?} is not KEY=VALUE"),
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// tug-cni's network configuration (one plugin entry of the conflist netd writes).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The configuration's CNI version.
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Plugin type (`tug-cni`).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The node's pod CIDRs (IPv4 required; an IPv6 one enables dual-stack).
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// MTU of pod interfaces.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Where IPAM keeps its state (default `/var/lib/tug/ipam`).
    #[serde(default)]
    pub data_dir: Option<String>,
    /// The previous result (DEL, CHECK).
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC's attachments that are still in use.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Anything else: tug-cni rejects fields it does not understand only in `ipam`.
    #[serde(default)]
    pub ipam: Option<Value>,
}

/// One attachment in `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// Container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

impl NetConf {
    /// Parses and checks the configuration from stdin (codes 6, 1, 7, 2).
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "failed to decode the network configuration",
                format!("stdin is not JSON: {e}"),
            )
        })?;
        let version = value["cniVersion"].as_str().unwrap_or_default().to_owned();
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "cniVersion {version:?} is not one of {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                code::DECODE,
                "failed to decode the network configuration",
                e.to_string(),
            )
        })?;
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                "\"name\" is required",
            ));
        }
        if conf.ipam.as_ref().is_some_and(|ipam| !ipam.is_null()) {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "unsupported field",
                "\"ipam\": tug-cni allocates from \"podCIDRs\" itself and does not delegate to an IPAM plugin",
            ));
        }
        if conf.mtu.is_some_and(|mtu| !(576..=65535).contains(&mtu)) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                format!(
                    "\"mtu\": {} is outside 576-65535",
                    conf.mtu.unwrap_or_default()
                ),
            ));
        }
        // The network address is never handed out, so a /32 (or /128) has nothing to give.
        if let Some(cidr) = conf
            .pod_cidrs
            .iter()
            .find(|c| c.prefix_len() == c.max_prefix_len())
        {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                format!(
                    "\"podCIDRs\": {cidr} is too small to allocate from (a pod CIDR needs at least one address besides its network address)"
                ),
            ));
        }
        Ok(conf)
    }

    /// The IPv4 pod CIDR, if netd has written one.
    pub fn ipv4_cidr(&self) -> Option<ipnet::Ipv4Net> {
        self.pod_cidrs.iter().find_map(|c| match c {
            ipnet::IpNet::V4(v4) => Some(*v4),
            ipnet::IpNet::V6(_) => None,
        })
    }

    /// The IPv6 pod CIDR, when the node is dual-stack.
    pub fn ipv6_cidr(&self) -> Option<ipnet::Ipv6Net> {
        self.pod_cidrs.iter().find_map(|c| match c {
            ipnet::IpNet::V6(v6) => Some(*v6),
            ipnet::IpNet::V4(_) => None,
        })
    }

    /// The IPAM state directory.
    pub fn data_dir(&self) -> &str {
        self.data_dir.as_deref().unwrap_or("/var/lib/tug/ipam")
    }
}

/// An interface in a result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Interface {
    /// Name.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// The netns path for interfaces inside the container; absent on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// The result of ADD (and the prevResult of DEL and CHECK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    /// Host veth, then the container interface.
    pub interfaces: Vec<Interface>,
    /// The pod's addresses: IPv4 (/32), then IPv6 (/128) when the node is dual-stack.
    pub addresses: Vec<ipnet::IpNet>,
}

impl AddResult {
    /// The result JSON in `version`'s format.
    pub fn to_json(&self, version: &str) -> Value {
        let (mut ips, mut routes) = (Vec::new(), Vec::new());
        for address in &self.addresses {
            let (gateway, default, family) = match address {
                ipnet::IpNet::V4(_) => (GATEWAY.to_string(), "0.0.0.0/0", "4"),
                ipnet::IpNet::V6(_) => (GATEWAY6.to_string(), "::/0", "6"),
            };
            let mut ip =
                json!({"address": address.to_string(), "gateway": gateway, "interface": 1});
            if version.starts_with("0.") {
                ip["version"] = json!(family); // 0.3.x and 0.4.0 tag each IP with its family
            }
            ips.push(ip);
            routes.push(json!({"dst": default, "gw": gateway}));
        }
        json!({"cniVersion": version, "interfaces": self.interfaces, "ips": ips, "routes": routes, "dns": {}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Env::from_vars(|k| vars.get(k).cloned())
    }

    #[test]
    fn the_environment_is_checked_with_code_4_naming_the_variable() {
        let ok = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
        ])
        .unwrap();
        assert_eq!(ok.args["K8S_POD_NAME"], "p");
        let missing = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert_eq!(
            (missing.code, missing.msg.as_str()),
            (4, "missing CNI_NETNS")
        );
        assert_eq!(env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code, 4);
        assert_eq!(env(&[]).unwrap_err().code, 4);
        let bad_if = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "a-very-long-interface-name"),
        ])
        .unwrap_err();
        assert_eq!(bad_if.msg, "invalid CNI_IFNAME");
        assert!(
            env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0")
            ])
            .is_ok(),
            "DEL needs no netns"
        );
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
    }

    #[test]
    fn configurations_are_checked_with_the_spec_codes() {
        let good = br#"{"cniVersion":"1.1.0","name":"tug","type":"tug-cni","podCIDRs":["10.244.1.0/24"],"mtu":1450}"#;
        assert_eq!(
            NetConf::parse(good)
                .unwrap()
                .ipv4_cidr()
                .unwrap()
                .to_string(),
            "10.244.1.0/24"
        );
        assert_eq!(NetConf::parse(b"{nope").unwrap_err().code, 6);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"x","type":"tug-cni"}"#)
                .unwrap_err()
                .code,
            1
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"","type":"tug-cni"}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(NetConf::parse(br#"{"cniVersion":"1.0.0","name":"x","type":"tug-cni","ipam":{"type":"host-local"}}"#).unwrap_err().code, 2);
        assert_eq!(
            NetConf::parse(
                br#"{"cniVersion":"1.0.0","name":"x","type":"tug-cni","podCIDRs":["nope"]}"#
            )
            .unwrap_err()
            .code,
            6
        );
        // Found by the cni_config fuzz target: a /32 pod CIDR handed out the address after it.
        for tiny in ["10.244.3.0/32", "fd00::/128"] {
            let conf = format!(
                r#"{{"cniVersion":"1.0.0","name":"x","type":"tug-cni","podCIDRs":["{tiny}"]}}"#
            );
            let error = NetConf::parse(conf.as_bytes()).unwrap_err();
            assert_eq!(error.code, 7, "{tiny}");
            assert!(error.details.contains(tiny), "{}", error.details);
        }
        let smallest =
            br#"{"cniVersion":"1.0.0","name":"x","type":"tug-cni","podCIDRs":["10.244.3.0/31"]}"#;
        assert!(NetConf::parse(smallest).is_ok());
    }

    #[test]
    fn results_follow_the_requested_version() {
        let result = AddResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                sandbox: Some("/run/netns/x".into()),
            }],
            addresses: vec![
                "10.244.1.5/32".parse().unwrap(),
                "fd00::5/128".parse().unwrap(),
            ],
        };
        let new = result.to_json("1.1.0");
        assert_eq!(
            new["ips"][0],
            json!({"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1})
        );
        assert_eq!(
            new["ips"][1],
            json!({"address": "fd00::5/128", "gateway": "fe80::1", "interface": 1})
        );
        assert_eq!(new["routes"][1], json!({"dst": "::/0", "gw": "fe80::1"}));
        let old = result.to_json("0.4.0");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["cniVersion"], "0.4.0");
    }
}
