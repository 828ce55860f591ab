//! Standalone mode: a node without an API server. Services come from manifest files in a
//! directory (YAML or JSON, several documents per file allowed); their EndpointSlices are derived
//! from the pods the local kubelet runs, read from its read-only port's `/pods`, the way the
//! EndpointSlice controller derives them in a cluster. The rest of the proxy (model, backends,
//! partial syncs) is the same as in a cluster.
//!
//! A Service without `clusterIP` gets one from the service CIDR, and a NodePort without
//! `nodePort` gets one from the range, both chosen from a hash of the Service's name so that a
//! restart picks the same ones. A manifest that cannot be read is skipped with a warning naming
//! it; the other Services are programmed as usual.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::watcher::{self, Event};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Label upstream's controllers put on the EndpointSlices they manage.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// The `managed-by` value of slices derived here.
pub const MANAGER: &str = "tug-proxy-standalone";

/// Where a standalone proxy gets its Services and pods.
#[derive(Debug, Clone)]
pub struct Standalone {
    /// Directory of Service manifests.
    pub manifests: PathBuf,
    /// The local kubelet's read-only address (`/pods` is read from it).
    pub kubelet: SocketAddr,
    /// Where ClusterIPs are allocated from when a manifest gives none.
    pub service_cidr: IpNet,
    /// The NodePort range.
    pub node_port_range: (u16, u16),
    /// How often the manifests and pods are read.
    pub poll: Duration,
}

fn hash_of(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// The Services in the manifests under `dir`, defaulted and with addresses allocated, and the
/// problems met (each naming its file).
pub fn read_services(
    dir: &Path,
    service_cidr: IpNet,
    node_port_range: (u16, u16),
) -> (Vec<Service>, Vec<String>) {
    let mut services = Vec::new();
    let mut problems = Vec::new();
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect(),
        Err(error) => {
            problems.push(format!("{}: {error}", dir.display()));
            Vec::new()
        }
    };
    paths.sort();
    for path in paths {
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) => {
                problems.push(format!("{}: {error}", path.display()));
                continue;
            }
        };
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let place = format!("{} (document {})", path.display(), index + 1);
            let value = match serde_json::Value::deserialize(document) {
                Ok(serde_json::Value::Null) => continue,
                Ok(value) => value,
                Err(error) => {
                    // The parser cannot find the next document after a syntax error.
                    problems.push(format!("{place}: not YAML or JSON: {error}"));
                    break;
                }
            };
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if kind != "Service" {
                problems.push(format!("{place}: kind {kind:?} is not a Service; ignored"));
                continue;
            }
            match serde_json::from_value::<Service>(value) {
                Ok(service)
                    if service
                        .metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| !n.is_empty()) =>
                {
                    services.push(service);
                }
                Ok(_) => problems.push(format!("{place}: the Service has no metadata.name")),
                Err(error) => problems.push(format!("{place}: not a valid Service: {error}")),
            }
        }
    }
    allocate(&mut services, service_cidr, node_port_range);
    (services, problems)
}

/// Fills in what the API server would: namespace, type, ClusterIP, NodePorts, defaults.
fn allocate(services: &mut [Service], cidr: IpNet, (low, high): (u16, u16)) {
    let mut taken_ips: BTreeSet<IpAddr> = BTreeSet::new();
    let mut taken_ports: BTreeSet<u16> = BTreeSet::new();
    for service in services.iter_mut() {
        service
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into());
        let spec = service.spec.get_or_insert_with(Default::default);
        spec.type_.get_or_insert_with(|| "ClusterIP".into());
        if let Some(ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()) {
            taken_ips.insert(ip);
        }
        for port in spec.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".into());
            port.target_port.get_or_insert(IntOrString::Int(port.port));
            if let Some(node_port) = port.node_port {
                taken_ports.insert(u16::try_from(node_port).unwrap_or(0));
            }
        }
    }
    // Hosts of the CIDR, leaving out the network address and the first host (upstream gives
    // it to the `kubernetes` Service).
    let size: u128 = match cidr {
        IpNet::V4(net) => 1u128 << (32 - net.prefix_len()),
        IpNet::V6(net) => 1u128 << (128 - net.prefix_len()).min(64),
    };
    let host = |offset: u128| -> IpAddr {
        match cidr {
            IpNet::V4(net) => {
                IpAddr::V4((u32::from(net.network()) + u32::try_from(offset).unwrap_or(0)).into())
            }
            IpNet::V6(net) => IpAddr::V6((u128::from(net.network()) + offset).into()),
        }
    };
    for service in services.iter_mut() {
        let id = format!(
            "{}/{}",
            service.metadata.namespace.as_deref().unwrap_or_default(),
            service.metadata.name.as_deref().unwrap_or_default()
        );
        let spec = service.spec.get_or_insert_with(Default::default);
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let external = spec.type_.as_deref() == Some("ExternalName");
        if !headless
            && !external
            && spec.cluster_ip.as_deref().is_none_or(str::is_empty)
            && size > 3
        {
            let usable = size - 2; // offsets 2 ..= size-2 (no network, no .1, no broadcast)
            let start = u128::from(hash_of(&id)) % (usable - 1);
            let ip = (0..usable - 1)
                .map(|i| host(2 + (start + i) % (usable - 1)))
                .find(|ip| !taken_ips.contains(ip));
            if let Some(ip) = ip {
                taken_ips.insert(ip);
                spec.cluster_ip = Some(ip.to_string());
                spec.cluster_ips = Some(vec![ip.to_string()]);
            }
        }
        if matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
            spec.external_traffic_policy
                .get_or_insert_with(|| "Cluster".into());
            let span = u64::from(high.saturating_sub(low)) + 1;
            for port in spec.ports.iter_mut().flatten() {
                if port.node_port.is_some() {
                    continue;
                }
                let key = format!(
                    "{id}:{}/{}",
                    port.port,
                    port.protocol.as_deref().unwrap_or("TCP")
                );
                let start = hash_of(&key) % span;
                let chosen = (0..span)
                    .map(|i| low + u16::try_from((start + i) % span).unwrap_or(0))
                    .find(|p| !taken_ports.contains(p));
                if let Some(node_port) = chosen {
                    taken_ports.insert(node_port);
                    port.node_port = Some(i32::from(node_port));
                }
            }
        }
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn selected(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The port of `pod` a Service port's `targetPort` means (a number, or a container port's name).
fn resolve(target: &IntOrString, protocol: &str, pod: &Pod) -> Option<i32> {
    match target {
        IntOrString::Int(port) => Some(*port),
        IntOrString::String(name) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            })
            .map(|p| p.container_port),
    }
}

/// A Service port resolved for one pod: name, protocol, the pod's port number.
type ResolvedPort = (String, String, i32);

/// The EndpointSlices the EndpointSlice controller would keep for `services` given `pods`: per
/// Service with a selector, the selected pods with an IP that have not finished, grouped by
/// address family and resolved ports; `ready` only when the pod is Ready and not terminating
/// (or the Service publishes not-ready addresses), `serving` when Ready, `terminating` when
/// being deleted.
pub fn endpoint_slices(services: &[Service], pods: &[Pod]) -> Vec<EndpointSlice> {
    let mut slices = Vec::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let name = service.metadata.name.clone().unwrap_or_default();
        let publish = spec.publish_not_ready_addresses.unwrap_or(false);
        // (family, ports) → endpoints
        let mut groups: BTreeMap<(&str, Vec<ResolvedPort>), Vec<Endpoint>> = BTreeMap::new();
        let mut chosen: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()))
            .filter(|p| selected(selector, p))
            .collect();
        chosen.sort_by_key(|p| p.metadata.name.clone());
        for pod in chosen {
            let status = pod.status.clone().unwrap_or_default();
            if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                continue;
            }
            let mut ips: Vec<String> = status
                .pod_ips
                .iter()
                .flatten()
                .map(|ip| ip.ip.clone())
                .collect();
            if ips.is_empty() {
                ips.extend(status.pod_ip.clone());
            }
            let ports: Vec<ResolvedPort> = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|port| {
                    let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
                    let target = port
                        .target_port
                        .clone()
                        .unwrap_or(IntOrString::Int(port.port));
                    let number = resolve(&target, &protocol, pod)?;
                    Some((port.name.clone().unwrap_or_default(), protocol, number))
                })
                .collect();
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let serving = pod_ready(pod);
            for ip in ips {
                let Ok(address) = ip.parse::<IpAddr>() else {
                    continue;
                };
                let family = if address.is_ipv4() { "IPv4" } else { "IPv6" };
                let pod_spec = pod.spec.clone().unwrap_or_default();
                let hostname = pod_spec
                    .hostname
                    .clone()
                    .filter(|_| pod_spec.subdomain.as_deref() == Some(name.as_str()));
                groups
                    .entry((family, ports.clone()))
                    .or_default()
                    .push(Endpoint {
                        addresses: vec![ip],
                        conditions: Some(EndpointConditions {
                            ready: Some(publish || (serving && !terminating)),
                            serving: Some(publish || serving),
                            terminating: Some(terminating),
                        }),
                        hostname,
                        node_name: pod_spec.node_name.clone(),
                        target_ref: Some(ObjectReference {
                            kind: Some("Pod".into()),
                            namespace: Some(namespace.clone()),
                            name: pod.metadata.name.clone(),
                            uid: pod.metadata.uid.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
            }
        }
        for ((family, ports), endpoints) in groups {
            let key = format!("{family}{ports:?}");
            let labels = BTreeMap::from([
                ("kubernetes.io/service-name".to_owned(), name.clone()),
                (MANAGED_BY.to_owned(), MANAGER.to_owned()),
            ]);
            slices.push(EndpointSlice {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("{name}-{:08x}", hash_of(&key) as u32)),
                    namespace: Some(namespace.clone()),
                    labels: Some(labels),
                    ..Default::default()
                },
                address_type: family.into(),
                endpoints,
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, protocol, port)| EndpointPort {
                            name: Some(name),
                            protocol: Some(protocol),
                            port: Some(port),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            });
        }
    }
    slices
}

/// Why the kubelet's pods could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the pods from the kubelet's read-only port http://{address}/pods: {reason}")]
pub struct PodsError {
    address: SocketAddr,
    reason: String,
}

/// The pods the kubelet at `address` (its read-only port) runs.
pub async fn kubelet_pods(address: SocketAddr) -> Result<Vec<Pod>, PodsError> {
    let fail = |reason: String| PodsError { address, reason };
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(address).await?;
        conn.write_all(format!("GET /pods HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        conn.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| fail("no answer within 5 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("not an HTTP response".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(fail(format!("answered {status:?}")));
    }
    #[derive(Deserialize)]
    struct PodList {
        items: Vec<Pod>,
    }
    serde_json::from_str::<PodList>(body)
        .map(|list| list.items)
        .map_err(|e| fail(format!("not a PodList: {e}")))
}

type Events<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

fn relist<K: Send + 'static>(
    receiver: tokio::sync::mpsc::UnboundedReceiver<Vec<K>>,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> {
    futures::stream::unfold(receiver, |mut receiver| async move {
        let items = receiver.recv().await?;
        let events = std::iter::once(Event::Init)
            .chain(items.into_iter().map(Event::InitApply))
            .chain(std::iter::once(Event::InitDone))
            .map(Ok);
        Some((futures::stream::iter(events), receiver))
    })
    .flatten()
}

/// The Services and EndpointSlices of `source` as two event streams shaped like watches: a
/// full relist each time something changed. While the kubelet cannot be read the endpoints
/// stay as they were last read (and the first sync waits for the first read).
pub fn watch(source: Standalone) -> (Events<Service>, Events<EndpointSlice>) {
    let (services_tx, services_rx) = tokio::sync::mpsc::unbounded_channel();
    let (slices_tx, slices_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reported: BTreeSet<String> = BTreeSet::new();
        let mut last_services: Option<String> = None;
        let mut last_slices: Option<String> = None;
        let mut pods: Option<Vec<Pod>> = None;
        let mut kubelet_failing = false;
        let mut ticker = tokio::time::interval(source.poll);
        loop {
            ticker.tick().await;
            let (services, problems) = read_services(
                &source.manifests,
                source.service_cidr,
                source.node_port_range,
            );
            for problem in &problems {
                if reported.insert(problem.clone()) {
                    tracing::warn!(%problem, "service manifest left out; every other service is still programmed");
                }
            }
            reported.retain(|p| problems.contains(p));
            match kubelet_pods(source.kubelet).await {
                Ok(list) => {
                    if kubelet_failing {
                        tracing::info!("reading the kubelet's pods again");
                    }
                    kubelet_failing = false;
                    pods = Some(list);
                }
                Err(error) => {
                    if !kubelet_failing {
                        tracing::warn!(%error, "endpoints stay as they were last read");
                    }
                    kubelet_failing = true;
                }
            }
            let text = serde_json::to_string(&services).unwrap_or_default();
            if last_services.as_ref() != Some(&text) {
                last_services = Some(text);
                for service in &services {
                    let spec = service.spec.clone().unwrap_or_default();
                    tracing::debug!(service = %service.metadata.name.as_deref().unwrap_or_default(), cluster_ip = ?spec.cluster_ip, "standalone service");
                }
                if services_tx.send(services.clone()).is_err() {
                    return;
                }
            }
            if let Some(pods) = &pods {
                let slices = endpoint_slices(&services, pods);
                let text = serde_json::to_string(&slices).unwrap_or_default();
                if last_slices.as_ref() != Some(&text) {
                    last_slices = Some(text);
                    if slices_tx.send(slices).is_err() {
                        return;
                    }
                }
            }
        }
    });
    (relist(services_rx).boxed(), relist(slices_rx).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: serde_json::Value, ip: &str, ready: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels, "uid": format!("uid-{name}")},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn manifests_become_services_with_stable_addresses_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "web.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: fixed, namespace: ops}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 53, protocol: UDP, nodePort: 31000}]\n",
        );
        write(dir.path(), "broken.yaml", "kind: Service\nspec: [\n");
        write(dir.path(), "pod.yaml", "kind: Pod\nmetadata: {name: p}\n");
        let cidr: IpNet = "10.96.0.0/12".parse().unwrap();
        let (services, problems) = read_services(dir.path(), cidr, (30000, 32767));
        assert_eq!(services.len(), 2, "{problems:?}");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("broken.yaml") && p.contains("not YAML"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("pod.yaml") && p.contains("\"Pod\""))
        );
        let web = services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("web"))
            .unwrap();
        assert_eq!(web.metadata.namespace.as_deref(), Some("default"));
        let spec = web.spec.as_ref().unwrap();
        let ip: IpAddr = spec.cluster_ip.as_deref().unwrap().parse().unwrap();
        assert!(
            cidr.contains(&ip) && ip.to_string() != "10.96.0.1" && ip.to_string() != "10.96.0.10"
        );
        let node_port = spec.ports.as_ref().unwrap()[0].node_port.unwrap();
        assert!((30000..=32767).contains(&node_port));
        // The same manifests give the same addresses (a restart keeps them).
        let (again, _) = read_services(dir.path(), cidr, (30000, 32767));
        assert_eq!(again, services);
        let fixed = services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("fixed"))
            .unwrap();
        assert_eq!(
            fixed.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10")
        );
        assert_eq!(
            fixed.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port,
            Some(31000)
        );
    }

    #[test]
    fn slices_follow_selectors_readiness_termination_and_named_ports() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}
        }))
        .unwrap();
        let mut terminating = pod("c", serde_json::json!({"app": "web"}), "10.1.0.3", true);
        terminating.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        let mut done = pod("d", serde_json::json!({"app": "web"}), "10.1.0.4", false);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let pods = vec![
            pod("a", serde_json::json!({"app": "web"}), "10.1.0.1", true),
            pod("b", serde_json::json!({"app": "web"}), "10.1.0.2", false),
            terminating,
            done,
            pod("other", serde_json::json!({"app": "db"}), "10.1.0.5", true),
        ];
        let slices = endpoint_slices(&[service], &pods);
        assert_eq!(slices.len(), 1);
        let slice = &slices[0];
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(
            slice.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
            "web"
        );
        let port = &slice.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port),
            (Some("http"), Some(8080))
        );
        let view: Vec<(String, bool, bool, bool)> = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (
                    e.addresses[0].clone(),
                    c.ready.unwrap(),
                    c.serving.unwrap(),
                    c.terminating.unwrap(),
                )
            })
            .collect();
        assert_eq!(
            view,
            vec![
                ("10.1.0.1".into(), true, true, false),
                ("10.1.0.2".into(), false, false, false),
                ("10.1.0.3".into(), false, true, true),
            ]
        );
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("node-1"));
        // The model turns them into the same service port a cluster would.
        let node = crate::model::NodeContext {
            node_name: "node-1".into(),
            node_port_range: (30000, 32767),
        };
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}
        }))
        .unwrap();
        let (ports, skipped) = crate::model::build(&[service], &slices, &node);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(ports.len(), 1);
    }
}
