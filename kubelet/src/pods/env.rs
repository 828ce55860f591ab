//! A container's environment: `envFrom` (ConfigMaps and Secrets, with prefixes), then `env` in
//! order — literal values with `$(VAR)` expansion over what is defined before, and `valueFrom`
//! (configMapKeyRef, secretKeyRef, fieldRef, resourceFieldRef). A missing non-optional
//! reference fails the container with `CreateContainerConfigError` and a message that names it.
//! Service links come first, as upstream: for each Service of the pod's namespace (unless
//! `enableServiceLinks: false`) and for `kubernetes` in `default` (always), the
//! `<NAME>_SERVICE_HOST`/`_PORT` and Docker-link variables ([`service_variables`]); `$(VAR)` can
//! refer to them and the container's own variables override them.
//! Pure: the ConfigMaps, Secrets and Services are fetched beforehand ([`referenced`]).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Service};

use super::quantity;
use super::translate::expand;

/// ConfigMaps and Secrets by name (`None`: it does not exist).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// ConfigMaps.
    pub config_maps: HashMap<String, Option<ConfigMap>>,
    /// Secrets.
    pub secrets: HashMap<String, Option<Secret>>,
    /// The Services whose links the pod gets (see [`linked_services`]).
    pub services: Vec<Service>,
}

/// The Services a pod gets variables for, from `namespace_services` (the Services of its
/// namespace) and `master` (`kubernetes` in `default`): the master Service always, the others
/// when `enableServiceLinks` is not false; a same-named Service of the namespace wins. Only
/// Services with a cluster IP count.
pub fn linked_services(
    pod: &Pod,
    namespace_services: Vec<Service>,
    master: Option<Service>,
) -> Vec<Service> {
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    let mut by_name: BTreeMap<String, Service> = BTreeMap::new();
    if links {
        for service in namespace_services {
            by_name.insert(service.metadata.name.clone().unwrap_or_default(), service);
        }
    }
    if let Some(master) = master {
        by_name
            .entry(master.metadata.name.clone().unwrap_or_default())
            .or_insert(master);
    }
    by_name
        .into_values()
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|spec| spec.cluster_ip.as_deref())
                .is_some_and(|ip| !ip.is_empty() && ip != "None")
        })
        .collect()
}

fn variable_name(text: &str) -> String {
    text.replace('-', "_").to_uppercase()
}

/// The variables of `services`, as upstream's kubelet makes them: `<NAME>_SERVICE_HOST`,
/// `<NAME>_SERVICE_PORT` (first port), `<NAME>_SERVICE_PORT_<PORT NAME>`, and the Docker-link
/// ones (`<NAME>_PORT`, `<NAME>_PORT_<port>_<PROTO>` with `_PROTO`, `_PORT`, `_ADDR`).
pub fn service_variables(services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let (Some(ip), Some(ports)) = (&spec.cluster_ip, &spec.ports) else {
            continue;
        };
        let Some(first) = ports.first() else { continue };
        let prefix = variable_name(service.metadata.name.as_deref().unwrap_or_default());
        out.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
        out.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for port in ports {
            if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((
                    format!("{prefix}_SERVICE_PORT_{}", variable_name(name)),
                    port.port.to_string(),
                ));
            }
        }
        let host = |port: i32| {
            if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            }
        };
        for (i, port) in ports.iter().enumerate() {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let lower = protocol.to_lowercase();
            let url = format!("{lower}://{}", host(port.port));
            if i == 0 {
                out.push((format!("{prefix}_PORT"), url.clone()));
            }
            let port_prefix = format!("{prefix}_PORT_{}_{}", port.port, protocol.to_uppercase());
            out.push((port_prefix.clone(), url));
            out.push((format!("{port_prefix}_PROTO"), lower));
            out.push((format!("{port_prefix}_PORT"), port.port.to_string()));
            out.push((format!("{port_prefix}_ADDR"), ip.clone()));
        }
    }
    out
}

/// What the node knows that the pod spec does not.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The pod's IPs.
    pub pod_ips: Vec<String>,
    /// The node's IPs.
    pub host_ips: Vec<String>,
    /// The node's allocatable CPU (millicores) and memory (bytes), for limits not set.
    pub allocatable_millicpu: i64,
    /// Bytes.
    pub allocatable_memory: i64,
}

/// The ConfigMaps and Secrets the container's environment names.
pub fn referenced(container: &Container) -> (Vec<String>, Vec<String>) {
    let mut maps = Vec::new();
    let mut secrets = Vec::new();
    for from in container.env_from.iter().flatten() {
        maps.extend(from.config_map_ref.as_ref().map(|r| r.name.clone()));
        secrets.extend(from.secret_ref.as_ref().map(|r| r.name.clone()));
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else {
            continue;
        };
        maps.extend(from.config_map_key_ref.as_ref().map(|r| r.name.clone()));
        secrets.extend(from.secret_key_ref.as_ref().map(|r| r.name.clone()));
    }
    maps.sort();
    maps.dedup();
    secrets.sort();
    secrets.dedup();
    (maps, secrets)
}

fn config_map_data(map: &ConfigMap) -> BTreeMap<String, String> {
    let mut data = map.data.clone().unwrap_or_default();
    for (key, value) in map.binary_data.iter().flatten() {
        data.insert(key.clone(), String::from_utf8_lossy(&value.0).into_owned());
    }
    data
}

fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    for (key, value) in secret.string_data.iter().flatten() {
        data.insert(key.clone(), value.clone());
    }
    data
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('=')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_graphic())
}

/// The value of a `fieldRef` path (also what downward API volume files hold).
pub fn field_value(pod: &Pod, path: &str, facts: &Facts) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.clone().unwrap_or_default();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    if let Some(value) = keyed("metadata.labels", &meta.labels) {
        return Ok(value);
    }
    if let Some(value) = keyed("metadata.annotations", &meta.annotations) {
        return Ok(value);
    }
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.node_name.unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.hostIP" => facts.host_ips.first().cloned().unwrap_or_default(),
        "status.hostIPs" => facts.host_ips.join(","),
        "status.podIP" => facts.pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => facts.pod_ips.join(","),
        other => return Err(format!("unsupported fieldRef fieldPath {other:?}")),
    })
}

fn resource_value(
    pod: &Pod,
    own: &Container,
    reference: &k8s_openapi::api::core::v1::ResourceFieldSelector,
    facts: &Facts,
) -> Result<String, String> {
    let container = match reference
        .container_name
        .as_deref()
        .filter(|n| !n.is_empty())
    {
        None => own.clone(),
        Some(name) => super::translate::find_container(pod, name)
            .cloned()
            .ok_or_else(|| {
                format!("resourceFieldRef names container {name:?}, which the pod does not have")
            })?,
    };
    let resources = container.resources.clone().unwrap_or_default();
    let (map, name) = match reference.resource.split_once('.') {
        Some(("limits", name)) => (resources.limits.unwrap_or_default(), name),
        Some(("requests", name)) => (resources.requests.unwrap_or_default(), name),
        _ => {
            return Err(format!(
                "unsupported resourceFieldRef resource {:?}",
                reference.resource
            ));
        }
    };
    let divisor = reference
        .divisor
        .as_ref()
        .map(|d| d.0.clone())
        .unwrap_or_else(|| "1".into());
    let divisor_milli = quantity::milli_value(&divisor)
        .filter(|d| *d > 0)
        .ok_or_else(|| format!("invalid resourceFieldRef divisor {divisor:?}"))?;
    let value_milli = match (map.get(name), name) {
        (Some(q), _) => {
            quantity::milli_value(&q.0).ok_or_else(|| format!("invalid quantity {:?}", q.0))?
        }
        (None, "cpu") if reference.resource.starts_with("limits") => {
            facts.allocatable_millicpu as i128
        }
        (None, "memory") if reference.resource.starts_with("limits") => {
            facts.allocatable_memory as i128 * 1000
        }
        (None, _) => 0,
    };
    // Rounded up, as upstream's ExtractContainerResourceValue does.
    Ok(((value_milli + divisor_milli - 1) / divisor_milli).to_string())
}

/// The container's environment, in order.
pub fn resolve(
    pod: &Pod,
    container: &Container,
    sources: &Sources,
    facts: &Facts,
) -> Result<Vec<(String, String)>, String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, key: String, value: String| match env
        .iter_mut()
        .find(|(k, _)| *k == key)
    {
        Some(slot) => slot.1 = value,
        None => env.push((key, value)),
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, optional) = if let Some(r) = &from.config_map_ref {
            match sources.config_maps.get(&r.name).cloned().flatten() {
                Some(map) => (config_map_data(&map), true),
                None if r.optional == Some(true) => continue,
                None => return Err(format!("configmap {:?} not found", r.name)),
            }
        } else if let Some(r) = &from.secret_ref {
            match sources.secrets.get(&r.name).cloned().flatten() {
                Some(secret) => (secret_data(&secret), true),
                None if r.optional == Some(true) => continue,
                None => return Err(format!("secret {:?} not found", r.name)),
            }
        } else {
            continue;
        };
        let _ = optional;
        for (key, value) in data {
            let name = format!("{prefix}{key}");
            if is_env_name(&name) {
                set(&mut env, name, value);
            }
        }
    }
    let links = service_variables(&sources.services);
    let linked: HashMap<String, String> = links.iter().cloned().collect();
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => {
                let defined: HashMap<String, String> = env.iter().cloned().collect();
                expand(var.value.as_deref().unwrap_or_default(), &|name| {
                    defined.get(name).or_else(|| linked.get(name)).cloned()
                })
            }
            Some(from) => {
                if let Some(r) = &from.config_map_key_ref {
                    match sources.config_maps.get(&r.name).cloned().flatten() {
                        None if r.optional == Some(true) => continue,
                        None => return Err(format!("configmap {:?} not found", r.name)),
                        Some(map) => match config_map_data(&map).get(&r.key) {
                            Some(value) => value.clone(),
                            None if r.optional == Some(true) => continue,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in ConfigMap {namespace}/{}",
                                    r.key, r.name
                                ));
                            }
                        },
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    match sources.secrets.get(&r.name).cloned().flatten() {
                        None if r.optional == Some(true) => continue,
                        None => return Err(format!("secret {:?} not found", r.name)),
                        Some(secret) => match secret_data(&secret).get(&r.key) {
                            Some(value) => value.clone(),
                            None if r.optional == Some(true) => continue,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in Secret {namespace}/{}",
                                    r.key, r.name
                                ));
                            }
                        },
                    }
                } else if let Some(r) = &from.field_ref {
                    field_value(pod, &r.field_path, facts)?
                } else if let Some(r) = &from.resource_field_ref {
                    resource_value(pod, container, r, facts)?
                } else {
                    String::new()
                }
            }
        };
        set(&mut env, var.name.clone(), value);
    }
    // Service links the container does not define itself.
    for (key, value) in links {
        if !env.iter().any(|(k, _)| *k == key) {
            env.push((key, value));
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(namespace: &str, name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "ports": ports}}))
        .unwrap()
    }

    #[test]
    fn service_links_follow_upstreams_names_and_precedence() {
        let pod = |links: Option<bool>| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "shop"},
                "spec": {"enableServiceLinks": links, "containers": [{"name": "c",
                    "env": [{"name": "URL", "value": "http://$(REDIS_MASTER_SERVICE_HOST):$(REDIS_MASTER_SERVICE_PORT)"},
                            {"name": "KUBERNETES_SERVICE_PORT", "value": "override"}]}]}}))
            .unwrap()
        };
        let namespace = vec![
            service(
                "shop",
                "redis-master",
                "10.96.0.20",
                json!([
                {"name": "redis", "port": 6379},
                {"name": "metrics", "port": 9121, "protocol": "UDP"}]),
            ),
            service("shop", "headless", "None", json!([{"port": 80}])),
        ];
        let master = service(
            "default",
            "kubernetes",
            "10.96.0.1",
            json!([{"name": "https", "port": 443}]),
        );
        let linked = linked_services(&pod(None), namespace.clone(), Some(master.clone()));
        assert_eq!(linked.len(), 2, "a headless Service has no links");
        let p = pod(None);
        let sources = Sources {
            services: linked,
            ..Default::default()
        };
        let env: HashMap<String, String> = resolve(
            &p,
            &p.spec.as_ref().unwrap().containers[0],
            &sources,
            &Facts::default(),
        )
        .unwrap()
        .into_iter()
        .collect();
        for (key, value) in [
            ("REDIS_MASTER_SERVICE_HOST", "10.96.0.20"),
            ("REDIS_MASTER_SERVICE_PORT", "6379"),
            ("REDIS_MASTER_SERVICE_PORT_REDIS", "6379"),
            ("REDIS_MASTER_SERVICE_PORT_METRICS", "9121"),
            ("REDIS_MASTER_PORT", "tcp://10.96.0.20:6379"),
            ("REDIS_MASTER_PORT_6379_TCP", "tcp://10.96.0.20:6379"),
            ("REDIS_MASTER_PORT_6379_TCP_PROTO", "tcp"),
            ("REDIS_MASTER_PORT_6379_TCP_PORT", "6379"),
            ("REDIS_MASTER_PORT_6379_TCP_ADDR", "10.96.0.20"),
            ("REDIS_MASTER_PORT_9121_UDP", "udp://10.96.0.20:9121"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "override"),
            ("URL", "http://10.96.0.20:6379"),
        ] {
            assert_eq!(env.get(key).map(String::as_str), Some(value), "{key}");
        }
        // enableServiceLinks: false keeps only the master Service's variables.
        let off = linked_services(&pod(Some(false)), namespace, Some(master));
        assert_eq!(off.len(), 1);
        assert_eq!(off[0].metadata.name.as_deref(), Some("kubernetes"));
        let v6 = service("shop", "v6", "fd00::10", json!([{"port": 80}]));
        let vars: HashMap<String, String> = service_variables(&[v6]).into_iter().collect();
        assert_eq!(vars["V6_PORT"], "tcp://[fd00::10]:80");
    }

    #[test]
    fn env_from_sources_fields_resources_and_expansion() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c",
                "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "250m"}},
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "URL", "value": "http://$(POD_IP):80/$(CFG_mode)"},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                    {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
                    {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                    {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k", "optional": true}}}
                ]}]}}))
        .unwrap();
        let container = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            referenced(container),
            (
                vec!["absent".to_owned(), "settings".to_owned()],
                vec!["creds".to_owned()]
            )
        );
        let mut sources = Sources::default();
        sources.config_maps.insert(
            "settings".into(),
            Some(
                serde_json::from_value(json!({"data": {"mode": "fast", "bad key": "x"}})).unwrap(),
            ),
        );
        sources.config_maps.insert("absent".into(), None);
        sources.secrets.insert(
            "creds".into(),
            Some(serde_json::from_value(json!({"data": {"password": "c2VjcmV0"}})).unwrap()),
        );
        let facts = Facts {
            pod_ips: vec!["10.244.0.9".into()],
            host_ips: vec!["192.0.2.1".into()],
            allocatable_millicpu: 2000,
            allocatable_memory: 1 << 30,
        };
        let env: HashMap<String, String> = resolve(&pod, container, &sources, &facts)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(env["CFG_mode"], "fast");
        assert!(!env.contains_key("CFG_bad key"));
        assert_eq!(env["POD_IP"], "10.244.0.9");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["URL"], "http://10.244.0.9:80/fast");
        assert_eq!(env["PASSWORD"], "secret");
        assert_eq!(env["MEM_MI"], "64");
        assert_eq!(env["CPU"], "250");
        assert_eq!(env["CPU_LIMIT"], "2");
        assert!(!env.contains_key("OPT"));
        // A missing key names itself.
        sources.secrets.insert(
            "creds".into(),
            Some(serde_json::from_value(json!({"data": {}})).unwrap()),
        );
        assert_eq!(
            resolve(&pod, container, &sources, &facts).unwrap_err(),
            "couldn't find key password in Secret shop/creds"
        );
    }
}
