//! Static pods: Pod manifests (YAML or JSON, one pod per file) in a directory the kubelet
//! watches (`staticPodPath`, `--pod-manifest-path`). Each becomes a pod of this node named
//! `<name>-<node>`, defaulted as the apiserver would, with a UID derived from its content (a
//! changed manifest is a new pod) and the `kubernetes.io/config.*` annotations. When the
//! kubelet has an API server it keeps a mirror pod there (annotation
//! `kubernetes.io/config.mirror`, owned by the Node) that carries the static pod's status.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use sha2::Digest;

/// Annotation: where the pod came from (`file`, `api`).
pub const CONFIG_SOURCE: &str = "kubernetes.io/config.source";
/// Annotation: the static pod's hash (= its UID).
pub const CONFIG_HASH: &str = "kubernetes.io/config.hash";
/// Annotation: on a mirror pod, the hash of the static pod it mirrors.
pub const CONFIG_MIRROR: &str = "kubernetes.io/config.mirror";
/// Annotation: when the kubelet first saw the pod.
pub const CONFIG_SEEN: &str = "kubernetes.io/config.seen";

/// Whether `pod` came from a manifest file.
pub fn is_static(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONFIG_SOURCE))
        .is_some_and(|s| s == "file")
}

/// Whether `pod` is a mirror pod (in the API, standing for a static pod).
pub fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CONFIG_MIRROR))
}

/// The static pod's hash (its UID), which its mirror records.
pub fn hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(CONFIG_HASH)
        .map(String::as_str)
}

fn default_pull_policy(image: &str) -> &'static str {
    super::worker::default_pull_policy(image)
}

/// Applies the apiserver's defaults that the kubelet relies on.
fn default(pod: &mut Pod) {
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
    spec.termination_grace_period_seconds.get_or_insert(30);
    spec.scheduler_name
        .get_or_insert_with(|| "default-scheduler".into());
    spec.enable_service_links.get_or_insert(true);
    // Static pods tolerate every NoExecute taint (upstream's behaviour).
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    if !tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    {
        tolerations.push(Toleration {
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            ..Default::default()
        });
    }
    let containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for container in containers {
        container
            .termination_message_path
            .get_or_insert_with(|| "/dev/termination-log".into());
        container
            .termination_message_policy
            .get_or_insert_with(|| "File".into());
        let image = container.image.clone().unwrap_or_default();
        container
            .image_pull_policy
            .get_or_insert_with(|| default_pull_policy(&image).into());
        for port in container.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".into());
        }
        for probe in [
            &mut container.liveness_probe,
            &mut container.readiness_probe,
            &mut container.startup_probe,
        ]
        .into_iter()
        .flatten()
        {
            probe.timeout_seconds.get_or_insert(1);
            probe.period_seconds.get_or_insert(10);
            probe.success_threshold.get_or_insert(1);
            probe.failure_threshold.get_or_insert(3);
            if let Some(http) = &mut probe.http_get {
                http.scheme.get_or_insert_with(|| "HTTP".into());
            }
        }
    }
}

/// A static pod from one manifest.
pub fn from_manifest(text: &str, path: &Path, node: &str) -> Result<Pod, String> {
    let value: serde_json::Value = serde_yaml::from_str(text)
        .map_err(|e| format!("{}: not YAML or JSON: {e}", path.display()))?;
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    if kind != "Pod" {
        return Err(format!("{}: kind is {kind:?}, not Pod", path.display()));
    }
    let mut pod: Pod = serde_json::from_value(value)
        .map_err(|e| format!("{}: not a valid Pod: {e}", path.display()))?;
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{}: the pod has no metadata.name", path.display()))?;
    if pod.spec.as_ref().is_none_or(|s| s.containers.is_empty()) {
        return Err(format!("{}: the pod has no containers", path.display()));
    }
    let digest = sha2::Sha256::new()
        .chain_update(node.as_bytes())
        .chain_update(path.display().to_string().as_bytes())
        .chain_update(text.as_bytes())
        .finalize();
    let uid = hex::encode(&digest[..16]);
    default(&mut pod);
    let meta = &mut pod.metadata;
    meta.name = Some(format!("{name}-{node}"));
    meta.namespace.get_or_insert_with(|| "default".into());
    meta.uid = Some(uid.clone());
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(CONFIG_SOURCE.into(), "file".into());
    annotations.insert(CONFIG_HASH.into(), uid);
    annotations.insert(CONFIG_SEEN.into(), jiff::Timestamp::now().to_string());
    if let Some(spec) = &mut pod.spec {
        spec.node_name = Some(node.to_owned());
    }
    Ok(pod)
}

/// The manifests in `dir`: pods, and the files that could not be used, with why.
pub fn load_dir(dir: &Path, node: &str) -> (Vec<Pod>, Vec<(PathBuf, String)>) {
    let mut pods = Vec::new();
    let mut errors = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (pods, errors);
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    for path in paths {
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| from_manifest(&text, &path, node))
        {
            Ok(pod) => pods.push(pod),
            Err(error) => errors.push((path, error)),
        }
    }
    (pods, errors)
}

/// The mirror pod for `pod` on the Node with `node_uid`.
pub fn mirror(pod: &Pod, node_name: &str, node_uid: Option<&str>) -> Pod {
    let mut mirror = pod.clone();
    mirror.metadata.uid = None;
    mirror.metadata.resource_version = None;
    let hash = hash(pod).unwrap_or_default().to_owned();
    mirror
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(CONFIG_MIRROR.into(), hash);
    mirror.metadata.owner_references = node_uid.map(|uid| {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node_name.to_owned(),
            uid: uid.to_owned(),
            controller: Some(true),
            ..Default::default()
        }]
    });
    mirror.status = None;
    mirror
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_become_defaulted_node_pods_with_content_uids() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: c\n    image: reg/web:1.0\n    livenessProbe:\n      httpGet: {port: 80}\n";
        let path = Path::new("/etc/kubernetes/manifests/web.yaml");
        let pod = from_manifest(text, path, "node-1").unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("web-node-1"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        assert!(is_static(&pod) && !is_mirror(&pod));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        let c = &spec.containers[0];
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(c.liveness_probe.as_ref().unwrap().period_seconds, Some(10));
        assert_eq!(hash(&pod), pod.metadata.uid.as_deref());
        // Same content, same UID; changed content, a new pod.
        assert_eq!(
            from_manifest(text, path, "node-1").unwrap().metadata.uid,
            pod.metadata.uid
        );
        let changed = text.replace("1.0", "1.1");
        assert_ne!(
            from_manifest(&changed, path, "node-1")
                .unwrap()
                .metadata
                .uid,
            pod.metadata.uid
        );
        let m = mirror(&pod, "node-1", Some("node-uid"));
        assert!(is_mirror(&m));
        assert_eq!(m.metadata.owner_references.unwrap()[0].kind, "Node");
        assert!(m.metadata.uid.is_none());
    }

    #[test]
    fn bad_manifests_say_which_file_and_why() {
        let path = Path::new("/m/x.yaml");
        assert!(
            from_manifest("kind: Service\n", path, "n")
                .unwrap_err()
                .contains("not Pod")
        );
        assert!(
            from_manifest(
                "kind: Pod\nmetadata: {}\nspec: {containers: [{name: c}]}\n",
                path,
                "n"
            )
            .unwrap_err()
            .contains("no metadata.name")
        );
        assert!(
            from_manifest("{{{", path, "n")
                .unwrap_err()
                .starts_with("/m/x.yaml")
        );
    }
}
