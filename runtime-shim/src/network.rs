//! Attaching sandboxes to the pod network by executing CNI plugins exactly as the CNI spec
//! says (what libcni does for containerd's CRI): the lowest-named configuration in the
//! configuration directory, its plugins run in order for ADD — each given the previous result —
//! and in reverse for DEL; capabilities (`portMappings`, ...) passed as `runtimeConfig` only to
//! plugins that declare them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// Why attaching or detaching failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No usable configuration yet (the network is not ready). Retryable.
    #[error("no CNI configuration in {dir}: {why}")]
    NotConfigured {
        /// The configuration directory.
        dir: PathBuf,
        /// What was missing or wrong.
        why: String,
    },
    /// A plugin is not in any plugin directory. Not retryable until it is installed.
    #[error("CNI plugin {plugin:?} not found in {dirs:?}")]
    PluginNotFound {
        /// The plugin type.
        plugin: String,
        /// Where it was looked for.
        dirs: Vec<PathBuf>,
    },
    /// A plugin failed; its CNI error, verbatim.
    #[error("CNI plugin {plugin} {command} failed (code {code}): {msg}: {details}")]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// ADD or DEL.
        command: &'static str,
        /// The CNI error code.
        code: u64,
        /// Its message.
        msg: String,
        /// Its details.
        details: String,
    },
    /// Running a plugin failed. Retryable.
    #[error("run CNI plugin {plugin}: {source}")]
    Exec {
        /// The plugin type.
        plugin: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A loaded network configuration list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    /// Network name.
    pub name: String,
    /// CNI version of the list.
    pub cni_version: String,
    /// Plugin configurations, in order.
    pub plugins: Vec<Value>,
    /// The file it came from.
    pub source: PathBuf,
}

/// Where configurations and plugins are.
#[derive(Debug, Clone)]
pub struct Cni {
    /// Configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// Plugin directories, searched in order (`/opt/cni/bin`).
    pub bin_dirs: Vec<PathBuf>,
}

/// One sandbox's attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// Container (sandbox) ID.
    pub container_id: String,
    /// Its network namespace.
    pub netns: PathBuf,
    /// Interface name in it.
    pub ifname: String,
    /// `CNI_ARGS` pairs (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ...).
    pub args: Vec<(String, String)>,
    /// Capability arguments by capability name (`portMappings`, `dns`, ...).
    pub capabilities: BTreeMap<String, Value>,
}

impl Cni {
    /// The network configuration in use: the lexically first `*.conflist`, `*.conf` or `*.json`.
    pub fn load(&self) -> Result<NetworkList, NetworkError> {
        let not_configured = |why: String| NetworkError::NotConfigured {
            dir: self.conf_dir.clone(),
            why,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| not_configured(e.to_string()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        let file = files
            .first()
            .ok_or_else(|| not_configured("no *.conflist, *.conf or *.json file".into()))?;
        let text = std::fs::read_to_string(file)
            .map_err(|e| not_configured(format!("read {}: {e}", file.display())))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| not_configured(format!("parse {}: {e}", file.display())))?;
        let plugins = match value.get("plugins").and_then(Value::as_array) {
            Some(plugins) => plugins.clone(),
            None => vec![value.clone()], // a single-plugin .conf
        };
        if plugins.is_empty()
            || plugins
                .iter()
                .any(|p| p["type"].as_str().is_none_or(str::is_empty))
        {
            return Err(not_configured(format!(
                "{}: every plugin needs a \"type\"",
                file.display()
            )));
        }
        Ok(NetworkList {
            name: value["name"].as_str().unwrap_or_default().to_owned(),
            cni_version: value["cniVersion"].as_str().unwrap_or("1.0.0").to_owned(),
            plugins,
            source: file.clone(),
        })
    }

    fn find(&self, plugin: &str) -> Result<PathBuf, NetworkError> {
        self.bin_dirs
            .iter()
            .map(|dir| dir.join(plugin))
            .find(|path| path.is_file())
            .ok_or_else(|| NetworkError::PluginNotFound {
                plugin: plugin.to_owned(),
                dirs: self.bin_dirs.clone(),
            })
    }

    /// The configuration one plugin gets: its own fields, the list's name and version, the
    /// previous result, and the capabilities it declares.
    fn plugin_conf(
        list: &NetworkList,
        plugin: &Value,
        prev: Option<&Value>,
        attachment: &Attachment,
    ) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = json!(list.name);
        conf["cniVersion"] = json!(list.cni_version);
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let declared = plugin["capabilities"].as_object();
        let runtime: serde_json::Map<String, Value> = attachment
            .capabilities
            .iter()
            .filter(|(name, _)| {
                declared.is_some_and(|d| d.get(*name).and_then(Value::as_bool) == Some(true))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !runtime.is_empty() {
            conf["runtimeConfig"] = Value::Object(runtime);
        }
        conf
    }

    async fn exec(
        &self,
        plugin: &str,
        command: &'static str,
        conf: &Value,
        attachment: &Attachment,
    ) -> Result<Value, NetworkError> {
        let path = self.find(plugin)?;
        let mut args: Vec<String> = vec!["IgnoreUnknown=1".into()];
        args.extend(attachment.args.iter().map(|(k, v)| format!("{k}={v}")));
        let cni_path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        let exec_error = |source| NetworkError::Exec {
            plugin: plugin.to_owned(),
            source,
        };
        let mut child = tokio::process::Command::new(&path)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &attachment.container_id)
            .env("CNI_NETNS", &attachment.netns)
            .env("CNI_IFNAME", &attachment.ifname)
            .env("CNI_ARGS", args.join(";"))
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(exec_error)?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(conf.to_string().as_bytes())
            .await
            .map_err(exec_error)?;
        drop(stdin);
        let output = child.wait_with_output().await.map_err(exec_error)?;
        let stdout: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if output.status.success() {
            return Ok(stdout);
        }
        let text = |key: &str| stdout[key].as_str().map(str::to_owned).unwrap_or_default();
        Err(NetworkError::Plugin {
            plugin: plugin.to_owned(),
            command,
            code: stdout["code"].as_u64().unwrap_or(999),
            msg: if stdout.is_null() {
                String::from_utf8_lossy(&output.stderr).trim().to_owned()
            } else {
                text("msg")
            },
            details: text("details"),
        })
    }

    /// ADD: runs every plugin in order; returns the final result.
    pub async fn add(
        &self,
        list: &NetworkList,
        attachment: &Attachment,
    ) -> Result<Value, NetworkError> {
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let kind = plugin["type"].as_str().unwrap_or_default();
            let conf = Self::plugin_conf(list, plugin, prev.as_ref(), attachment);
            match self.exec(kind, "ADD", &conf, attachment).await {
                Ok(result) => prev = Some(result),
                Err(error) => {
                    // Undo what the earlier plugins did; the ADD failed as a whole.
                    let _ = self.del(list, attachment, prev.as_ref()).await;
                    return Err(error);
                }
            }
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL: runs every plugin in reverse order with the ADD result; best effort — every plugin
    /// runs, and the first failure is reported.
    pub async fn del(
        &self,
        list: &NetworkList,
        attachment: &Attachment,
        prev: Option<&Value>,
    ) -> Result<(), NetworkError> {
        let mut first = None;
        for plugin in list.plugins.iter().rev() {
            let kind = plugin["type"].as_str().unwrap_or_default();
            let conf = Self::plugin_conf(list, plugin, prev, attachment);
            if let Err(error) = self.exec(kind, "DEL", &conf, attachment).await {
                first.get_or_insert(error);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// The pod IPs of an ADD result (in result order).
pub fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .map(|cidr| cidr.split('/').next().unwrap_or(cidr).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(capabilities: BTreeMap<String, Value>) -> Attachment {
        Attachment {
            container_id: "c".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: Vec::new(),
            capabilities,
        }
    }

    #[test]
    fn plugins_get_the_list_name_version_previous_result_and_only_declared_capabilities() {
        let list = NetworkList {
            name: "net".into(),
            cni_version: "1.0.0".into(),
            plugins: Vec::new(),
            source: PathBuf::new(),
        };
        let ports = BTreeMap::from([(
            "portMappings".to_owned(),
            json!([{"hostPort": 30080, "containerPort": 80, "protocol": "tcp"}]),
        )]);
        let portmap = json!({"type": "portmap", "capabilities": {"portMappings": true}});
        let conf = Cni::plugin_conf(
            &list,
            &portmap,
            Some(&json!({"ips": []})),
            &attachment(ports.clone()),
        );
        assert_eq!(conf["name"], "net");
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(conf["prevResult"], json!({"ips": []}));
        assert_eq!(conf["runtimeConfig"]["portMappings"][0]["hostPort"], 30080);
        let plain = Cni::plugin_conf(&list, &json!({"type": "tug-cni"}), None, &attachment(ports));
        assert!(plain.get("runtimeConfig").is_none() && plain.get("prevResult").is_none());
    }

    #[test]
    fn the_lexically_first_configuration_wins_and_single_plugin_confs_become_lists() {
        let dir = tempfile::tempdir().unwrap();
        let cni = Cni {
            conf_dir: dir.path().to_owned(),
            bin_dirs: Vec::new(),
        };
        assert!(matches!(
            cni.load(),
            Err(NetworkError::NotConfigured { .. })
        ));
        std::fs::write(
            dir.path().join("20-b.conflist"),
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("10-a.conf"),
            r#"{"cniVersion":"0.4.0","name":"a","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("00-ignored.txt"), "x").unwrap();
        let list = cni.load().unwrap();
        assert_eq!(
            (
                list.name.as_str(),
                list.cni_version.as_str(),
                list.plugins.len()
            ),
            ("a", "0.4.0", 1)
        );
        assert_eq!(
            result_ips(&json!({"ips": [{"address": "10.0.0.5/32"}, {"address": "fd00::5/128"}]})),
            ["10.0.0.5", "fd00::5"]
        );
    }
}
