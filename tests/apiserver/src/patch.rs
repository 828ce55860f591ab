//! PATCH: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and strategic merge patch with the
//! merge keys of the lists nodes patch (conditions by `type`, containerStatuses by `name`,
//! addresses by `type`, ...) and its directives (`$patch`, `$retainKeys`,
//! `$deleteFromPrimitiveList`, `$setElementOrder`).

use serde_json::{Map, Value};

/// The patch formats the API accepts, by content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply; JSON bodies). Applied as a strategic
    /// merge that also creates a missing object; field ownership is not tracked.
    Apply,
}

impl PatchKind {
    /// The patch kind for a content type, if it is one.
    pub fn from_content_type(content_type: &str) -> Option<PatchKind> {
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// Why a patch was not applied, split as the apiserver splits it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch document itself is malformed (400 BadRequest).
    #[error("{0}")]
    Malformed(String),
    /// A well-formed patch could not be applied to the object, e.g. a failed `test` (422).
    #[error("{0}")]
    NotApplicable(String),
}

/// Applies `patch` of `kind` to `target`.
pub fn apply(kind: PatchKind, target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    match kind {
        PatchKind::Merge => {
            if !patch.is_object() {
                return Err(PatchError::Malformed(
                    "a merge patch must be a JSON object".into(),
                ));
            }
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| PatchError::Malformed(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &ops.0).map_err(|e| PatchError::NotApplicable(e.to_string()))
        }
        PatchKind::Strategic | PatchKind::Apply => {
            if !patch.is_object() {
                return Err(PatchError::Malformed(
                    "a strategic merge patch must be a JSON object".into(),
                ));
            }
            strategic_merge(target, patch, &mut Vec::new());
            Ok(())
        }
    }
}

/// The merge key of the list at `field`, whose parent object is at `path`. Lists without one
/// (among them the pod's `containerStatuses`, which upstream declares atomic) are replaced.
fn merge_key(path: &[String], field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "volumesAttached"
        | "resourceClaims" => "name",
        "conditions" | "addresses" => "type",
        "podIPs" | "hostIPs" | "hostAliases" => "ip",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ownerReferences" => "uid",
        "taints" => "key",
        "topologySpreadConstraints" => "topologyKey",
        // Container ports merge by containerPort, Service ports by port.
        "ports" if path.iter().any(|p| p.ends_with("ontainers")) => "containerPort",
        "ports" => "port",
        _ => return None,
    })
}

/// Primitive lists whose patch strategy is merge (union) rather than replace.
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

fn strategic_merge(target: &mut Value, patch: &Value, path: &mut Vec<String>) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replacement = patch_map.clone();
        replacement.remove("$patch");
        *target = Value::Object(replacement);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let retain: Option<Vec<String>> =
        patch_map
            .get("$retainKeys")
            .and_then(Value::as_array)
            .map(|keys| {
                keys.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            });
    for (key, value) in patch_map {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        let target_map = target.as_object_mut().expect("target is an object");
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(remove)) =
                (target_map.get_mut(field), value.as_array())
            {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(_) => {
                path.push(key.clone());
                let slot = target_map.entry(key.clone()).or_insert(Value::Null);
                strategic_merge(slot, value, path);
                path.pop();
            }
            Value::Array(items) => {
                let existing = target_map.remove(key);
                let merged = match (existing, merge_key(path, key)) {
                    (Some(Value::Array(current)), Some(merge_key))
                        if items.iter().all(Value::is_object) =>
                    {
                        path.push(key.clone());
                        let merged = merge_list(current, items, merge_key, path);
                        path.pop();
                        merged
                    }
                    (Some(Value::Array(mut current)), None) if merges_primitives(key) => {
                        for item in items {
                            if !current.contains(item) {
                                current.push(item.clone());
                            }
                        }
                        current
                    }
                    _ => items
                        .iter()
                        .filter(|item| item.get("$patch").is_none())
                        .cloned()
                        .collect(),
                };
                target_map.insert(key.clone(), Value::Array(merged));
            }
            primitive => {
                target_map.insert(key.clone(), primitive.clone());
            }
        }
    }
    if let (Some(keys), Some(target_map)) = (retain, target.as_object_mut()) {
        target_map.retain(|k, _| keys.contains(k));
    }
}

fn merge_list(
    mut current: Vec<Value>,
    patch: &[Value],
    merge_key: &str,
    path: &mut Vec<String>,
) -> Vec<Value> {
    for item in patch {
        let key_value = item.get(merge_key);
        let position =
            key_value.and_then(|kv| current.iter().position(|c| c.get(merge_key) == Some(kv)));
        match item.get("$patch").and_then(Value::as_str) {
            Some("delete") => {
                if let Some(i) = position {
                    current.remove(i);
                }
            }
            _ => match position {
                Some(i) => strategic_merge(&mut current[i], item, path),
                None => {
                    let mut fresh = Value::Object(Map::new());
                    strategic_merge(&mut fresh, item, path);
                    current.push(fresh);
                }
            },
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(target: Value, patch: Value) -> Value {
        let mut target = target;
        apply(PatchKind::Strategic, &mut target, &patch).unwrap();
        target
    }

    #[test]
    fn conditions_merge_by_type_and_container_statuses_are_replaced_whole() {
        let pod = json!({"status": {
            "conditions": [{"type": "Ready", "status": "False"}, {"type": "Initialized", "status": "True"}],
            "containerStatuses": [{"name": "a", "ready": false, "restartCount": 0}, {"name": "b", "ready": true}]}});
        let patched = smp(
            pod,
            json!({"status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "a", "ready": true}]}}),
        );
        assert_eq!(
            patched["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}])
        );
        // Upstream declares containerStatuses atomic: the patch's list replaces the old one.
        assert_eq!(
            patched["status"]["containerStatuses"],
            json!([{"name": "a", "ready": true}])
        );
    }

    #[test]
    fn directives_delete_replace_and_order_hints() {
        let node = json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": "n"}]},
                          "metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}}});
        let patched = smp(
            node,
            json!({
            "$setElementOrder/status": [],
            "status": {"addresses": [{"type": "Hostname", "$patch": "delete"}]},
            "metadata": {"finalizers": ["b"], "labels": {"x": null}}}),
        );
        assert_eq!(
            patched["status"]["addresses"],
            json!([{"type": "InternalIP", "address": "10.0.0.1"}])
        );
        assert_eq!(patched["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(patched["metadata"]["labels"], json!({"y": "2"}));
        let replaced = smp(
            json!({"spec": {"a": 1, "b": 2}}),
            json!({"spec": {"$patch": "replace", "c": 3}}),
        );
        assert_eq!(replaced, json!({"spec": {"c": 3}}));
        let removed = smp(
            json!({"metadata": {"finalizers": ["a", "b"]}}),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        );
        assert_eq!(removed["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn lists_without_merge_keys_are_replaced_and_ports_merge_by_context() {
        let svc =
            json!({"spec": {"ports": [{"port": 80, "name": "http"}], "externalIPs": ["1.1.1.1"]}});
        let patched = smp(
            svc,
            json!({"spec": {"ports": [{"port": 443, "name": "https"}], "externalIPs": ["2.2.2.2"]}}),
        );
        assert_eq!(patched["spec"]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(patched["spec"]["externalIPs"], json!(["2.2.2.2"]));
        let pod = json!({"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}], "args": ["a"]}]}});
        let patched = smp(
            pod,
            json!({"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "name": "web"}], "args": ["b"]}]}}),
        );
        assert_eq!(
            patched["spec"]["containers"][0]["ports"],
            json!([{"containerPort": 80, "name": "web"}])
        );
        assert_eq!(patched["spec"]["containers"][0]["args"], json!(["b"]));
    }

    #[test]
    fn merge_and_json_patches() {
        let mut o = json!({"a": {"b": 1, "c": 2}});
        apply(PatchKind::Merge, &mut o, &json!({"a": {"b": null, "d": 3}})).unwrap();
        assert_eq!(o, json!({"a": {"c": 2, "d": 3}}));
        apply(
            PatchKind::Json,
            &mut o,
            &json!([{"op": "replace", "path": "/a/c", "value": 5}]),
        )
        .unwrap();
        assert_eq!(o["a"]["c"], 5);
        let err = apply(
            PatchKind::Json,
            &mut o,
            &json!([{"op": "test", "path": "/a/c", "value": 6}]),
        );
        assert!(err.is_err());
        assert!(apply(PatchKind::Merge, &mut o, &json!([1])).is_err());
    }
}
