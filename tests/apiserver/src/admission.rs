//! What the apiserver does to an object between decoding and storing it: object metadata,
//! defaulting, validation (422 with field causes), the ServiceAccount admission plugin (token
//! volume), Service IP and NodePort allocation, CSR requester identity, and NodeRestriction.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use serde_json::{Map, Value, json};

use crate::auth::User;
use crate::resources::{self, Resource, ResourceDef};
use crate::status::ApiError;
use crate::store::Store;

/// Cluster settings admission needs.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Service ClusterIP range.
    pub service_cidr: ipnet::Ipv4Net,
    /// NodePort range, inclusive.
    pub node_ports: (u16, u16),
}

/// One validation failure: (field path, reason, message).
pub type Cause = (String, &'static str, String);

fn required(field: &str, what: &str) -> Cause {
    (
        field.to_owned(),
        "FieldValueRequired",
        format!("Required value: {what}"),
    )
}

fn invalid(field: &str, value: &Value, why: &str) -> Cause {
    (
        field.to_owned(),
        "FieldValueInvalid",
        format!("Invalid value: {value}: {why}"),
    )
}

fn forbidden(field: &str, why: &str) -> Cause {
    (
        field.to_owned(),
        "FieldValueForbidden",
        format!("Forbidden: {why}"),
    )
}

/// RFC 1123 subdomain: lower-case alphanumerics, '-' and '.', alphanumeric at both ends, ≤ 253.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && !name.is_empty()
        && name.split('.').all(|label| is_dns_label_part(label, 253))
}

/// RFC 1123 label: lower-case alphanumerics and '-', alphanumeric at both ends, ≤ 63.
pub fn is_dns_label(name: &str) -> bool {
    is_dns_label_part(name, 63)
}

fn is_dns_label_part(label: &str, max: usize) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Whether `name` is a valid object name for the resource, and the rule it broke if not.
fn name_rule(resource: Resource, name: &str) -> Result<(), &'static str> {
    let def = resource.def();
    let (ok, rule) = match def.plural {
        "namespaces" => (
            is_dns_label(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        ),
        "services" => (
            is_dns_label(name) && name.as_bytes()[0].is_ascii_lowercase(),
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
        ),
        "certificatesigningrequests"
        | "clusterroles"
        | "clusterrolebindings"
        | "roles"
        | "rolebindings" => (
            !name.is_empty()
                && name != "."
                && name != ".."
                && !name.contains('/')
                && !name.contains('%'),
            "may not contain '/' or '%' and may not be '.' or '..'",
        ),
        _ => (
            is_dns_subdomain(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ),
    };
    if ok { Ok(()) } else { Err(rule) }
}

/// The current time as Kubernetes writes `metav1.Time` (seconds, UTC, `Z`).
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .expect("round to seconds")
        .to_string()
}

/// Five characters as the apiserver appends to `generateName` (no vowels, no ambiguous digits).
pub fn random_suffix(len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..len)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Decodes a request body for `resource`: checks apiVersion/kind, rejects wrong types (400),
/// and reports unknown fields (an error under `strict`, else returned as warnings).
pub fn decode(
    def: &ResourceDef,
    body: Value,
    strict: bool,
) -> Result<(Value, Vec<String>), ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: the body is not a JSON object",
            def.kind, def.version, def.kind
        )));
    }
    let api_version = def.api_version();
    if let Some(sent) = body["apiVersion"].as_str().filter(|v| *v != api_version) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({sent}) does not match the expected API version ({api_version})"
        )));
    }
    if let Some(sent) = body["kind"].as_str().filter(|k| *k != def.kind) {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({sent}) does not match the expected kind ({})",
            def.kind
        )));
    }
    let mut decoded = (def.decode)(body.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            def.kind, def.version, def.kind
        ))
    })?;
    let mut unknown = Vec::new();
    unknown_fields(&body, &decoded, "", &mut unknown);
    if strict && !unknown.is_empty() {
        let list = unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect::<Vec<_>>();
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            list.join(", ")
        )));
    }
    decoded["apiVersion"] = json!(api_version);
    decoded["kind"] = json!(def.kind);
    let warnings = unknown
        .into_iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    Ok((decoded, warnings))
}

fn unknown_fields(sent: &Value, kept: &Value, path: &str, out: &mut Vec<String>) {
    match (sent, kept) {
        (Value::Object(sent), Value::Object(kept)) => {
            for (key, value) in sent {
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match kept.get(key) {
                    Some(kept_value) => unknown_fields(value, kept_value, &field, out),
                    None if !value.is_null() && !is_free_form(path) => out.push(field),
                    None => {}
                }
            }
        }
        (Value::Array(sent), Value::Array(kept)) => {
            for (i, (s, k)) in sent.iter().zip(kept).enumerate() {
                unknown_fields(s, k, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Maps whose keys are data, not schema (labels, annotations, data, selectors, ...).
fn is_free_form(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    matches!(
        last,
        "labels"
            | "annotations"
            | "data"
            | "stringData"
            | "binaryData"
            | "selector"
            | "nodeSelector"
            | "capacity"
            | "allocatable"
            | "limits"
            | "requests"
            | "extra"
            | "matchLabels"
    )
}

/// Fills metadata for a new object and runs the kind's admission; `path_namespace` is the
/// namespace in the URL ("" for cluster scope).
pub fn admit_create(
    store: &Store,
    allocations: &Allocations,
    user: &User,
    resource: Resource,
    object: &mut Value,
    path_namespace: &str,
) -> Result<(), ApiError> {
    let def = resource.def();
    let meta = object["metadata"]
        .as_object_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut meta = Value::Object(meta);
    if def.namespaced {
        match meta["namespace"].as_str() {
            None | Some("") => meta["namespace"] = json!(path_namespace),
            Some(ns) if ns != path_namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            Some(_) => {}
        }
    } else if let Some(m) = meta.as_object_mut() {
        m.remove("namespace");
    }
    if meta["name"].as_str().unwrap_or_default().is_empty() {
        match meta["generateName"].as_str() {
            Some(prefix) if !prefix.is_empty() => {
                meta["name"] = json!(format!("{prefix}{}", random_suffix(5)));
            }
            _ => {
                return Err(ApiError::invalid(
                    def,
                    "",
                    &[required(
                        "metadata.name",
                        "name or generateName is required",
                    )],
                ));
            }
        }
    }
    let name = meta["name"].as_str().unwrap_or_default().to_owned();
    if let Err(rule) = name_rule(resource, &name) {
        return Err(ApiError::invalid(
            def,
            &name,
            &[invalid("metadata.name", &json!(name), rule)],
        ));
    }
    if meta
        .get("resourceVersion")
        .is_some_and(|rv| rv.as_str().is_some_and(|s| !s.is_empty()))
    {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let m = meta.as_object_mut().expect("metadata is an object");
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
    ] {
        m.remove(field);
    }
    m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    m.insert("creationTimestamp".into(), json!(now()));
    if object.get("spec").is_some() {
        m.insert("generation".into(), json!(1));
    }
    object["metadata"] = meta;
    node_restriction(store, user, resource, object, None)?;
    let namespace = path_namespace.to_owned();
    let causes = match def.plural {
        "namespaces" => {
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            object["status"] = json!({"phase": "Active"});
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            Vec::new()
        }
        "pods" => {
            default_pod(object);
            service_account_admission(store, object, &namespace)?;
            let causes = validate_pod(object);
            if causes.is_empty() {
                object["status"] =
                    json!({"phase": "Pending", "qosClass": qos_class(&object["spec"])});
            }
            causes
        }
        "services" => {
            default_service(object);
            let mut causes = validate_service(object);
            if causes.is_empty() {
                causes = allocate_service(allocations, object, None);
            }
            object["status"] = json!({"loadBalancer": {}});
            causes
        }
        "secrets" => {
            secret_string_data(object);
            if object["type"].as_str().is_none() {
                object["type"] = json!("Opaque");
            }
            Vec::new()
        }
        "certificatesigningrequests" => {
            object["spec"]["username"] = json!(user.name);
            object["spec"]["uid"] = json!(user.uid);
            object["spec"]["groups"] = json!(user.groups);
            object["status"] = json!({});
            validate_csr(object)
        }
        "endpointslices" => {
            if object["addressType"].as_str().is_none() {
                vec![required("addressType", "")]
            } else {
                Vec::new()
            }
        }
        _ => Vec::new(),
    };
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(def, &name, &causes))
    }
}

/// Runs the kind's update admission: `object` is the new state (already merged for status
/// writes), `old` the stored one.
pub fn admit_update(
    store: &Store,
    allocations: &Allocations,
    user: &User,
    resource: Resource,
    object: &mut Value,
    old: &Value,
    subresource: Option<&str>,
) -> Result<(), ApiError> {
    let def = resource.def();
    let name = old["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if object["metadata"]["name"] != old["metadata"]["name"]
        || (def.namespaced && object["metadata"]["namespace"] != old["metadata"]["namespace"])
    {
        return Err(ApiError::bad_request(
            "the name or namespace of the object does not match the name or namespace in the request",
        ));
    }
    // Fields the server owns come from the stored object.
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(field) {
            Some(value) => object["metadata"][field] = value.clone(),
            None => {
                if let Some(m) = object["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    match subresource {
        Some("status") => {
            // A status write changes only status (and nothing in metadata but the version check).
            let status = object.get("status").cloned();
            let rv = object["metadata"].get("resourceVersion").cloned();
            *object = old.clone();
            match status {
                Some(status) => object["status"] = status,
                None => {
                    if let Some(o) = object.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            match rv {
                Some(rv) => object["metadata"]["resourceVersion"] = rv,
                None => {
                    if let Some(m) = object["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                }
            }
        }
        Some("approval") => {
            let conditions = object["status"]["conditions"].clone();
            *object = old.clone();
            object["status"]["conditions"] = conditions;
        }
        _ => {
            if def.has_status {
                match old.get("status") {
                    Some(status) => object["status"] = status.clone(),
                    None => {
                        if let Some(o) = object.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            if object.get("spec").is_some() && object["spec"] != old["spec"] {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                object["metadata"]["generation"] = json!(generation);
            }
        }
    }
    node_restriction(store, user, resource, object, Some(old))?;
    let causes = match (def.plural, subresource) {
        ("pods", None) => {
            default_pod(object);
            let mut causes = validate_pod(object);
            causes.extend(pod_update_rules(object, old));
            causes
        }
        ("services", None) => {
            default_service(object);
            let mut causes = validate_service(object);
            if causes.is_empty() {
                causes = allocate_service(allocations, object, Some(old));
            }
            causes
        }
        ("secrets", _) => {
            secret_string_data(object);
            Vec::new()
        }
        ("certificatesigningrequests", None) => {
            object["spec"] = old["spec"].clone();
            Vec::new()
        }
        ("namespaces", None) => {
            object["spec"] = old["spec"].clone();
            Vec::new()
        }
        _ => Vec::new(),
    };
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(def, &name, &causes))
    }
}

/// NodeRestriction: a node may write only its own Node and Lease, pods bound to it (and create
/// only mirror pods), and CSRs; nothing else it could reach through its rules.
fn node_restriction(
    _store: &Store,
    user: &User,
    resource: Resource,
    object: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let Some(node) = user.node_name() else {
        return Ok(());
    };
    let def = resource.def();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let deny = |why: String| {
        Err(ApiError::forbidden(
            &user.name,
            if old.is_some() { "update" } else { "create" },
            def,
            None,
            object["metadata"]["namespace"].as_str(),
            Some(name),
            Some(&why),
        ))
    };
    if resource == resources::NODES && name != node {
        return deny(format!(
            "node \"{node}\" is not allowed to modify node \"{name}\""
        ));
    }
    if resource == resources::LEASES
        && (object["metadata"]["namespace"] != "kube-node-lease" || name != node)
    {
        return deny(
            "can only access node lease with the same name as the requesting node".to_string(),
        );
    }
    if resource == resources::PODS {
        let bound = old.unwrap_or(object)["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default();
        if bound != node {
            return deny(format!(
                "node \"{node}\" can only modify pods bound to itself"
            ));
        }
        if old.is_none()
            && object["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null()
        {
            return deny(format!(
                "pod does not have \"kubernetes.io/config.mirror\" annotation, node \"{node}\" can only create mirror pods"
            ));
        }
    }
    Ok(())
}

fn default_if_missing(object: &mut Value, field: &str, value: Value) {
    if object.get(field).is_none_or(Value::is_null) {
        object[field] = value;
    }
}

fn default_pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    default_if_missing(spec, "restartPolicy", json!("Always"));
    default_if_missing(spec, "dnsPolicy", json!("ClusterFirst"));
    default_if_missing(spec, "terminationGracePeriodSeconds", json!(30));
    default_if_missing(spec, "schedulerName", json!("default-scheduler"));
    default_if_missing(spec, "securityContext", json!({}));
    default_if_missing(spec, "enableServiceLinks", json!(true));
    default_if_missing(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    default_if_missing(spec, "priority", json!(0));
    if spec.get("tolerations").is_none_or(Value::is_null) {
        spec["tolerations"] = json!([
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        ]);
    }
    for list in ["initContainers", "containers"] {
        for container in spec[list].as_array_mut().into_iter().flatten() {
            default_if_missing(
                container,
                "terminationMessagePath",
                json!("/dev/termination-log"),
            );
            default_if_missing(container, "terminationMessagePolicy", json!("File"));
            default_if_missing(container, "resources", json!({}));
            let image = container["image"].as_str().unwrap_or_default().to_owned();
            default_if_missing(
                container,
                "imagePullPolicy",
                json!(default_pull_policy(&image)),
            );
            for port in container["ports"].as_array_mut().into_iter().flatten() {
                default_if_missing(port, "protocol", json!("TCP"));
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(probe) = container.get_mut(probe).filter(|p| p.is_object()) {
                    default_if_missing(probe, "timeoutSeconds", json!(1));
                    default_if_missing(probe, "periodSeconds", json!(10));
                    default_if_missing(probe, "successThreshold", json!(1));
                    default_if_missing(probe, "failureThreshold", json!(3));
                    if probe["httpGet"].is_object() {
                        default_if_missing(&mut probe["httpGet"], "scheme", json!("HTTP"));
                    }
                }
            }
            let resources = &mut container["resources"];
            if let Some(limits) = resources["limits"].as_object().cloned() {
                for (name, value) in limits {
                    if resources["requests"].get(&name).is_none() {
                        resources["requests"][&name] = value;
                    }
                }
            }
        }
    }
    for volume in spec["volumes"].as_array_mut().into_iter().flatten() {
        for source in ["secret", "configMap", "projected", "downwardAPI"] {
            if let Some(source) = volume.get_mut(source).filter(|s| s.is_object()) {
                default_if_missing(source, "defaultMode", json!(420));
            }
        }
    }
}

fn default_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        "IfNotPresent"
    } else {
        match last.split_once(':') {
            Some((_, "latest")) | None => "Always",
            Some(_) => "IfNotPresent",
        }
    }
}

/// `Guaranteed` when every container has equal cpu and memory requests and limits,
/// `BestEffort` when none has any, else `Burstable`.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|l| spec[*l].as_array().into_iter().flatten())
        .collect();
    let any = containers.iter().any(|c| {
        ["requests", "limits"].iter().any(|k| {
            c["resources"][*k]
                .as_object()
                .is_some_and(|m| !m.is_empty())
        })
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = &c["resources"]["limits"][*r];
            !limit.is_null() && *limit == c["resources"]["requests"][*r]
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn service_account_admission(
    store: &Store,
    pod: &mut Value,
    namespace: &str,
) -> Result<(), ApiError> {
    if !pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null() {
        return Ok(()); // mirror pods never get service-account tokens
    }
    let sa_name = pod["spec"]["serviceAccountName"]
        .as_str()
        .or(pod["spec"]["serviceAccount"].as_str())
        .unwrap_or("default")
        .to_owned();
    pod["spec"]["serviceAccountName"] = json!(sa_name);
    pod["spec"]["serviceAccount"] = json!(sa_name);
    let Some(sa) = store.get(resources::SERVICEACCOUNTS, namespace, &sa_name) else {
        return Err(ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "pods \"{}\" is forbidden: error looking up service account {namespace}/{sa_name}: serviceaccount \"{sa_name}\" not found",
                pod["metadata"]["name"].as_str().unwrap_or_default()
            ),
            details: None,
        });
    };
    let automount = pod["spec"]["automountServiceAccountToken"]
        .as_bool()
        .or(sa["automountServiceAccountToken"].as_bool())
        .unwrap_or(true);
    let already_mounted = ["initContainers", "containers"].iter().any(|l| {
        pod["spec"][*l].as_array().into_iter().flatten().any(|c| {
            c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["mountPath"] == SA_MOUNT)
        })
    });
    if !automount || already_mounted {
        return Ok(());
    }
    let volume_name = format!("kube-api-access-{}", random_suffix(5));
    let volume = json!({"name": volume_name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
    ]}});
    match pod["spec"]["volumes"].as_array_mut() {
        Some(volumes) => volumes.push(volume),
        None => pod["spec"]["volumes"] = json!([volume]),
    }
    for list in ["initContainers", "containers"] {
        for container in pod["spec"][list].as_array_mut().into_iter().flatten() {
            let mount = json!({"name": volume_name, "readOnly": true, "mountPath": SA_MOUNT});
            match container["volumeMounts"].as_array_mut() {
                Some(mounts) => mounts.push(mount),
                None => container["volumeMounts"] = json!([mount]),
            }
        }
    }
    Ok(())
}

fn validate_pod(pod: &Value) -> Vec<Cause> {
    let spec = &pod["spec"];
    let mut causes = Vec::new();
    let containers = spec["containers"].as_array().cloned().unwrap_or_default();
    if containers.is_empty() {
        causes.push(required("spec.containers", ""));
    }
    let volumes: BTreeSet<String> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let mut names = BTreeSet::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in spec[list].as_array().into_iter().flatten().enumerate() {
            let field = format!("spec.{list}[{i}]");
            match c["name"].as_str() {
                None | Some("") => causes.push(required(&format!("{field}.name"), "")),
                Some(name) if !is_dns_label(name) => causes.push(invalid(&format!("{field}.name"), &c["name"], "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character")),
                Some(name) => {
                    if !names.insert(name.to_owned()) {
                        causes.push((format!("{field}.name"), "FieldValueDuplicate", format!("Duplicate value: \"{name}\"")));
                    }
                }
            }
            if c["image"].as_str().is_none_or(str::is_empty) {
                causes.push(required(&format!("{field}.image"), ""));
            }
            for (j, m) in c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = m["name"].as_str().unwrap_or_default();
                if !volumes.contains(name) {
                    causes.push((
                        format!("{field}.volumeMounts[{j}].name"),
                        "FieldValueNotFound",
                        format!("Not found: \"{name}\""),
                    ));
                }
            }
            for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
                if !p["containerPort"]
                    .as_i64()
                    .is_some_and(|port| (1..=65535).contains(&port))
                {
                    causes.push(invalid(
                        &format!("{field}.ports[{j}].containerPort"),
                        &p["containerPort"],
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let p = &c[probe];
                if p.is_object() {
                    let handlers = ["exec", "httpGet", "tcpSocket", "grpc"]
                        .iter()
                        .filter(|h| p[**h].is_object())
                        .count();
                    if handlers != 1 {
                        causes.push(required(
                            &format!("{field}.{probe}"),
                            "must specify a handler type",
                        ));
                    }
                }
            }
        }
    }
    if let Some(policy) = spec["restartPolicy"].as_str()
        && !["Always", "OnFailure", "Never"].contains(&policy)
    {
        causes.push((
                "spec.restartPolicy".into(),
                "FieldValueNotSupported",
                format!("Unsupported value: \"{policy}\": supported values: \"Always\", \"OnFailure\", \"Never\""),
            ));
    }
    causes
}

/// Pod spec fields are immutable after creation, except container images, activeDeadlineSeconds
/// and additional tolerations.
fn pod_update_rules(new: &Value, old: &Value) -> Vec<Cause> {
    let mask = |pod: &Value| {
        let mut spec = pod["spec"].clone();
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array_mut().into_iter().flatten() {
                c["image"] = Value::Null;
            }
        }
        if let Some(s) = spec.as_object_mut() {
            s.remove("activeDeadlineSeconds");
            s.remove("tolerations");
        }
        spec
    };
    if mask(new) == mask(old) {
        Vec::new()
    } else {
        vec![forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations)",
        )]
    }
}

fn default_service(service: &mut Value) {
    let spec = &mut service["spec"];
    default_if_missing(spec, "type", json!("ClusterIP"));
    default_if_missing(spec, "sessionAffinity", json!("None"));
    if spec["type"] == "ExternalName" {
        return;
    }
    default_if_missing(spec, "internalTrafficPolicy", json!("Cluster"));
    default_if_missing(spec, "ipFamilies", json!(["IPv4"]));
    default_if_missing(spec, "ipFamilyPolicy", json!("SingleStack"));
    if spec["sessionAffinity"] == "ClientIP" {
        default_if_missing(
            spec,
            "sessionAffinityConfig",
            json!({"clientIP": {"timeoutSeconds": 10800}}),
        );
    }
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        default_if_missing(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if spec["type"] == "LoadBalancer" {
        default_if_missing(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    for port in spec["ports"].as_array_mut().into_iter().flatten() {
        default_if_missing(port, "protocol", json!("TCP"));
        let number = port["port"].clone();
        default_if_missing(port, "targetPort", number);
    }
}

fn validate_service(service: &Value) -> Vec<Cause> {
    let spec = &service["spec"];
    let mut causes = Vec::new();
    let kind = spec["type"].as_str().unwrap_or_default();
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&kind) {
        causes.push(("spec.type".into(), "FieldValueNotSupported", format!("Unsupported value: \"{kind}\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"")));
    }
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    if ports.is_empty() && kind != "ExternalName" && spec["clusterIP"] != "None" {
        causes.push(required("spec.ports", ""));
    }
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        if !p["port"].as_i64().is_some_and(|n| (1..=65535).contains(&n)) {
            causes.push(invalid(
                &format!("{field}.port"),
                &p["port"],
                "must be between 1 and 65535, inclusive",
            ));
        }
        let protocol = p["protocol"].as_str().unwrap_or_default();
        if !["TCP", "UDP", "SCTP"].contains(&protocol) {
            causes.push(("{field}.protocol".replace("{field}", &field), "FieldValueNotSupported", format!("Unsupported value: \"{protocol}\": supported values: \"SCTP\", \"TCP\", \"UDP\"")));
        }
        let name = p["name"].as_str().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            causes.push(required(&format!("{field}.name"), ""));
        }
        if !name.is_empty() && !names.insert(name.to_owned()) {
            causes.push((
                format!("{field}.name"),
                "FieldValueDuplicate",
                format!("Duplicate value: \"{name}\""),
            ));
        }
        if !p["nodePort"].is_null() && !matches!(kind, "NodePort" | "LoadBalancer") {
            causes.push(forbidden(
                &format!("{field}.nodePort"),
                "may not be used when `type` is 'ClusterIP'",
            ));
        }
    }
    causes
}

/// The ClusterIPs and NodePorts Services hold, but for the one being written: read once per
/// write (the caller holds the allocation lock from here until the write is stored, so two
/// Services created at once never get one address).
#[derive(Debug)]
pub struct Allocations {
    settings: ClusterSettings,
    ips: HashSet<Ipv4Addr>,
    node_ports: BTreeSet<i64>,
}

impl Allocations {
    /// Nothing held (for writes that allocate nothing).
    pub fn none(settings: &ClusterSettings) -> Allocations {
        Allocations {
            settings: settings.clone(),
            ips: HashSet::new(),
            node_ports: BTreeSet::new(),
        }
    }

    /// What every Service but `namespace/name` holds.
    pub fn of(
        store: &Store,
        settings: &ClusterSettings,
        namespace: &str,
        name: &str,
    ) -> Allocations {
        let mut allocations = Allocations::none(settings);
        store.visit(resources::SERVICES, |service| {
            let meta = &service["metadata"];
            if meta["namespace"] == namespace && meta["name"] == name {
                return;
            }
            if let Some(ip) = service["spec"]["clusterIP"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
            {
                allocations.ips.insert(ip);
            }
            for port in service["spec"]["ports"].as_array().into_iter().flatten() {
                if let Some(n) = port["nodePort"].as_i64() {
                    allocations.node_ports.insert(n);
                }
            }
        });
        allocations
    }
}

/// ClusterIP and NodePort allocation (and conflicts) for a Service being created or updated.
fn allocate_service(
    allocations: &Allocations,
    service: &mut Value,
    old: Option<&Value>,
) -> Vec<Cause> {
    let settings = &allocations.settings;
    let mut causes = Vec::new();
    let kind = service["spec"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if kind != "ExternalName" {
        let old_ip = old
            .and_then(|o| o["spec"]["clusterIP"].as_str())
            .map(str::to_owned);
        let requested = service["spec"]["clusterIP"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        match (old_ip, requested) {
            (Some(old_ip), Some(new_ip)) if old_ip != new_ip => {
                causes.push(invalid("spec.clusterIPs[0]", &json!(new_ip), "may not change once set"));
            }
            (Some(old_ip), None) => service["spec"]["clusterIP"] = json!(old_ip),
            (_, Some(ip)) if ip == "None" => {}
            (None, Some(ip)) => match ip.parse::<Ipv4Addr>() {
                Ok(addr) if settings.service_cidr.contains(&addr) => {
                    if allocations.ips.contains(&addr) {
                        causes.push(invalid("spec.clusterIPs", &json!([ip]), "failed to allocate IP: provided IP is already allocated"));
                    }
                }
                _ => causes.push(invalid("spec.clusterIPs", &json!([ip]), &format!("failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}", settings.service_cidr))),
            },
            (_, _) => {
                // .0 is the network, .1 the `kubernetes` Service.
                let free = settings.service_cidr.hosts().skip(1).find(|ip| !allocations.ips.contains(ip));
                match free {
                    Some(ip) => service["spec"]["clusterIP"] = json!(ip.to_string()),
                    None => causes.push(("spec.clusterIPs".into(), "FieldValueInvalid", "Internal error: range is full".into())),
                }
            }
        }
        let ip = service["spec"]["clusterIP"].clone();
        if ip.is_string() {
            service["spec"]["clusterIPs"] = json!([ip]);
        }
    }
    if matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
        let used = &allocations.node_ports;
        let (low, high) = (
            i64::from(settings.node_ports.0),
            i64::from(settings.node_ports.1),
        );
        let mut mine = BTreeSet::new();
        for (i, port) in service["spec"]["ports"]
            .as_array_mut()
            .into_iter()
            .flatten()
            .enumerate()
        {
            match port["nodePort"].as_i64() {
                Some(n) if !(low..=high).contains(&n) => causes.push(invalid(
                    &format!("spec.ports[{i}].nodePort"),
                    &json!(n),
                    &format!("provided port is not in the valid range. The range of valid ports is {low}-{high}"),
                )),
                Some(n) if used.contains(&n) || !mine.insert(n) => causes.push(invalid(
                    &format!("spec.ports[{i}].nodePort"),
                    &json!(n),
                    "provided port is already allocated",
                )),
                Some(_) => {}
                None => {
                    let reuse = old.and_then(|o| {
                        o["spec"]["ports"].as_array()?.iter().find(|p| p["port"] == port["port"] && p["protocol"] == port["protocol"])?["nodePort"].as_i64()
                    });
                    let pick = reuse.or_else(|| (low..=high).find(|n| !used.contains(n) && !mine.contains(n)));
                    match pick {
                        Some(n) => {
                            port["nodePort"] = json!(n);
                            mine.insert(n);
                        }
                        None => causes.push(("spec.ports".into(), "FieldValueInvalid", "range is full".into())),
                    }
                }
            }
        }
    }
    causes
}

fn secret_string_data(secret: &mut Value) {
    use base64::Engine;
    let Some(string_data) = secret.get("stringData").and_then(Value::as_object).cloned() else {
        return;
    };
    if !secret["data"].is_object() {
        secret["data"] = Value::Object(Map::new());
    }
    for (key, value) in string_data {
        let text = value.as_str().unwrap_or_default();
        secret["data"][key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
    if let Some(s) = secret.as_object_mut() {
        s.remove("stringData");
    }
}

fn validate_csr(csr: &Value) -> Vec<Cause> {
    use base64::Engine;
    let mut causes = Vec::new();
    if csr["spec"]["signerName"].as_str().is_none_or(str::is_empty) {
        causes.push(required("spec.signerName", ""));
    }
    if csr["spec"]["usages"].as_array().is_none_or(Vec::is_empty) {
        causes.push(required("spec.usages", ""));
    }
    let pem = csr["spec"]["request"]
        .as_str()
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok());
    if pem.is_none_or(|pem| crate::pki::csr_subject(&pem).is_none()) {
        causes.push(invalid(
            "spec.request",
            &json!("<request>"),
            "PEM block type must be CERTIFICATE REQUEST",
        ));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_rules() {
        assert!(is_dns_subdomain("a.b-c"));
        assert!(!is_dns_subdomain("A"));
        assert!(!is_dns_subdomain("-a"));
        assert!(is_dns_label("web-1"));
        assert!(!is_dns_label("a.b"));
        assert!(name_rule(resources::SERVICES, "1abc").is_err());
        assert!(name_rule(resources::CSRS, "node-csr-XyZ").is_ok());
    }

    #[test]
    fn pull_policy_and_qos_defaults() {
        assert_eq!(default_pull_policy("busybox"), "Always");
        assert_eq!(default_pull_policy("reg:5000/x:latest"), "Always");
        assert_eq!(default_pull_policy("reg:5000/x:1.0"), "IfNotPresent");
        assert_eq!(default_pull_policy("x@sha256:ab"), "IfNotPresent");
        assert_eq!(
            qos_class(&json!({"containers": [{"resources": {}}]})),
            "BestEffort"
        );
        let guaranteed = json!({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}}]});
        assert_eq!(qos_class(&guaranteed), "Guaranteed");
        assert_eq!(
            qos_class(&json!({"containers": [{"resources": {"requests": {"cpu": "1"}}}]})),
            "Burstable"
        );
    }

    #[test]
    fn strict_decoding_reports_unknown_fields_but_not_free_form_maps() {
        let def = resources::PODS.def();
        let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"any": "x"}}, "spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicyy": "Always"}]}});
        let err = decode(def, body.clone(), true).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message
                .contains("unknown field \"spec.containers[0].imagePullPolicyy\""),
            "{}",
            err.message
        );
        let (_, warnings) = decode(def, body, false).unwrap();
        assert_eq!(warnings.len(), 1);
        let wrong = decode(def, json!({"apiVersion": "v2", "kind": "Pod"}), false).unwrap_err();
        assert!(
            wrong
                .message
                .contains("does not match the expected API version")
        );
    }
}
