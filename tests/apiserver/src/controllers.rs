//! The controllers of a real control plane that nodes rely on, reacting to the store's changes:
//! namespace defaults (`default` ServiceAccount, `kube-root-ca.crt`) and termination, node pod
//! CIDR allocation, the bootstrap signer (`cluster-info` JWS), CSR approval and signing, the
//! EndpointSlice controller, and garbage collection of pods orphaned on deleted nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;

use crate::admission;
use crate::api::{self, ApiState};
use crate::auth::{self, User};
use crate::authz::{self, Attributes, Decision};
use crate::resources::{self, Resource};
use crate::selectors::LabelSelector;
use crate::store::{Change, EventType, StoreError, key_of};

const SIGNER_CLIENT_KUBELET: &str = "kubernetes.io/kube-apiserver-client-kubelet";
const SIGNER_SERVING: &str = "kubernetes.io/kubelet-serving";
const SIGNER_CLIENT: &str = "kubernetes.io/kube-apiserver-client";
const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// Starts the controllers on the current runtime.
pub fn spawn(
    state: Arc<ApiState>,
    cluster_cidr: ipnet::Ipv4Net,
    prefix: u8,
    cluster_cidr_v6: Option<(ipnet::Ipv6Net, u8)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let controllers = Controllers {
            state,
            cluster_cidr,
            cluster_cidr_v6,
            prefix,
            deleted_nodes: Default::default(),
        };
        let mut changes = controllers.state.store.subscribe();
        controllers.resync();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                received = changes.recv() => match received {
                    Ok(change) => controllers.react(&change),
                    Err(RecvError::Lagged(_)) => controllers.resync(),
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => controllers.periodic(),
            }
        }
    })
}

struct Controllers {
    state: Arc<ApiState>,
    cluster_cidr: ipnet::Ipv4Net,
    prefix: u8,
    /// A dual-stack cluster's IPv6 cluster CIDR and per-node prefix length.
    cluster_cidr_v6: Option<(ipnet::Ipv6Net, u8)>,
    /// Nodes seen deleted (and not back since): their pods are orphans.
    deleted_nodes: std::sync::Mutex<BTreeSet<String>>,
}

impl Controllers {
    fn store(&self) -> &crate::store::Store {
        &self.state.store
    }

    fn resync(&self) {
        for ns in self.store().list(resources::NAMESPACES, None).0 {
            let name = key_of(&ns).1;
            self.namespace_defaults(&name);
            self.endpoint_slices(&name);
        }
        for node in self.store().list(resources::NODES, None).0 {
            self.allocate_pod_cidr(&key_of(&node).1);
        }
        for csr in self.store().list(resources::CSRS, None).0 {
            self.approve_and_sign(&key_of(&csr).1);
        }
        self.sign_cluster_info();
        self.periodic();
    }

    fn periodic(&self) {
        self.collect_orphaned_pods();
        for ns in self.store().list(resources::NAMESPACES, None).0 {
            if !ns["metadata"]["deletionTimestamp"].is_null() {
                self.finalize_namespace(&key_of(&ns).1);
            }
        }
        self.sign_cluster_info();
    }

    fn react(&self, change: &Change) {
        let (namespace, name) = key_of(&change.object);
        match change.resource {
            r if r == resources::NAMESPACES => {
                if change.kind == EventType::Added {
                    self.namespace_defaults(&name);
                } else if !change.object["metadata"]["deletionTimestamp"].is_null() {
                    self.finalize_namespace(&name);
                }
            }
            r if r == resources::NODES && change.kind != EventType::Deleted => {
                self.deleted_nodes_mut().remove(&name);
                self.allocate_pod_cidr(&name)
            }
            r if r == resources::NODES => {
                self.deleted_nodes_mut().insert(name);
                self.collect_orphaned_pods();
            }
            r if r == resources::SECRETS && namespace == "kube-system" => self.sign_cluster_info(),
            r if r == resources::CONFIGMAPS
                && namespace == "kube-public"
                && name == "cluster-info" =>
            {
                self.sign_cluster_info()
            }
            r if r == resources::CONFIGMAPS && name == "kube-root-ca.crt" => {
                self.namespace_defaults(&namespace)
            }
            r if r == resources::SERVICEACCOUNTS && name == "default" => {
                self.namespace_defaults(&namespace)
            }
            r if r == resources::CSRS && change.kind != EventType::Deleted => {
                self.approve_and_sign(&name)
            }
            // A Service without a selector that owns no slice changes nothing here: skipping it
            // keeps creating thousands of them linear rather than quadratic.
            r if r == resources::SERVICES && !self.may_own_slices(&change.object) => {}
            r if r == resources::PODS
                || r == resources::SERVICES
                || r == resources::ENDPOINTSLICES =>
            {
                self.endpoint_slices(&namespace)
            }
            _ => {}
        }
        if !namespace.is_empty() && change.kind == EventType::Deleted {
            let terminating = self
                .store()
                .get(resources::NAMESPACES, "", &namespace)
                .is_some_and(|ns| !ns["metadata"]["deletionTimestamp"].is_null());
            if terminating {
                self.finalize_namespace(&namespace);
            }
        }
    }

    /// Creates an object the way a controller does (through the API's metadata rules).
    fn create(&self, resource: Resource, mut object: Value) {
        object["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        object["metadata"]["creationTimestamp"] = json!(admission::now());
        match self.store().create(resource, object) {
            Ok(_) | Err(StoreError::AlreadyExists) => {}
            Err(e) => {
                tracing::warn!(error = %e, resource = resource.def().plural, "controller create failed")
            }
        }
    }

    fn namespace_defaults(&self, namespace: &str) {
        let Some(ns) = self.store().get(resources::NAMESPACES, "", namespace) else {
            return;
        };
        if !ns["metadata"]["deletionTimestamp"].is_null() {
            return;
        }
        if self
            .store()
            .get(resources::SERVICEACCOUNTS, namespace, "default")
            .is_none()
        {
            self.create(resources::SERVICEACCOUNTS, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": namespace}}));
        }
        let ca = self.state.ca.cert_pem().to_owned();
        match self.store().get(resources::CONFIGMAPS, namespace, "kube-root-ca.crt") {
            None => self.create(resources::CONFIGMAPS, json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "kube-root-ca.crt", "namespace": namespace, "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
                "data": {"ca.crt": ca}})),
            Some(cm) if cm["data"]["ca.crt"] != ca.as_str() => {
                let _ = self.store().update_with(resources::CONFIGMAPS, namespace, "kube-root-ca.crt", |cm| {
                    cm["data"] = json!({"ca.crt": ca});
                    Ok::<_, ()>(())
                });
            }
            Some(_) => {}
        }
    }

    /// Deletes everything in a terminating namespace; removes it once it is empty.
    fn finalize_namespace(&self, namespace: &str) {
        let mut remaining = 0;
        for resource in Resource::all().filter(|r| r.def().namespaced && !r.def().review) {
            for object in self.store().list(resource, Some(namespace)).0 {
                remaining += 1;
                if object["metadata"]["deletionTimestamp"].is_null() {
                    let name = key_of(&object).1;
                    let _ = api::delete_object(
                        self.store(),
                        resource,
                        namespace,
                        &name,
                        None,
                        &Value::Null,
                        false,
                    );
                }
            }
        }
        if remaining == 0 {
            let _ = self.store().delete(resources::NAMESPACES, "", namespace);
        }
    }

    /// The pod GC controller's orphan rule: pods bound to a node that no longer exists are
    /// deleted (after a short quarantine upstream; at once here for terminating ones).
    fn deleted_nodes_mut(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.deleted_nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Upstream's pod garbage collector for orphans: pods bound to a node that does not exist
    /// are deleted once it is known gone (here: seen deleted; upstream: missing for 40 s), and
    /// terminating ones at once (nobody is left to finish their termination).
    fn collect_orphaned_pods(&self) {
        let nodes: BTreeSet<String> = self
            .store()
            .list(resources::NODES, None)
            .0
            .iter()
            .map(|n| key_of(n).1)
            .collect();
        let deleted = self.deleted_nodes_mut().clone();
        for pod in self.store().list(resources::PODS, None).0 {
            let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
            let terminating = !pod["metadata"]["deletionTimestamp"].is_null();
            if !node.is_empty() && !nodes.contains(node) && (terminating || deleted.contains(node))
            {
                let (ns, name) = key_of(&pod);
                let _ = self.store().delete(resources::PODS, &ns, &name);
            }
        }
    }

    fn allocate_pod_cidr(&self, node: &str) {
        let nodes = self.store().list(resources::NODES, None).0;
        if nodes.iter().any(|n| {
            key_of(n).1 == node && n["spec"]["podCIDR"].as_str().is_some_and(|c| !c.is_empty())
        }) {
            return;
        }
        let used: BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| n["spec"]["podCIDR"].as_str().map(str::to_owned))
            .collect();
        let Ok(mut subnets) = self.cluster_cidr.subnets(self.prefix) else {
            return;
        };
        let Some(free) = subnets.find(|s| !used.contains(&s.to_string())) else {
            tracing::warn!(node, "no pod CIDR left in {}", self.cluster_cidr);
            return;
        };
        // Dual-stack: one IPv6 subnet per node as well, listed after the IPv4 one.
        let free6 = self.cluster_cidr_v6.and_then(|(cidr, prefix)| {
            let used6: BTreeSet<String> = nodes
                .iter()
                .flat_map(|n| {
                    n["spec"]["podCIDRs"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|c| c.as_str().filter(|c| c.contains(':')).map(str::to_owned))
                .collect();
            cidr.subnets(prefix)
                .ok()?
                .find(|s| !used6.contains(&s.to_string()))
        });
        let _ = self.store().update_with(resources::NODES, "", node, |n| {
            if n["spec"]["podCIDR"].as_str().is_none_or(str::is_empty) {
                n["spec"]["podCIDR"] = json!(free.to_string());
                let mut cidrs = vec![free.to_string()];
                cidrs.extend(free6.map(|c| c.to_string()));
                n["spec"]["podCIDRs"] = json!(cidrs);
            }
            Ok::<_, ()>(())
        });
    }

    /// The bootstrap signer: one `jws-kubeconfig-<id>` per usable signing token.
    fn sign_cluster_info(&self) {
        let Some(cluster_info) =
            self.store()
                .get(resources::CONFIGMAPS, "kube-public", "cluster-info")
        else {
            return;
        };
        let Some(kubeconfig) = cluster_info["data"]["kubeconfig"]
            .as_str()
            .map(str::to_owned)
        else {
            return;
        };
        let mut signatures = BTreeMap::new();
        for secret in self.store().list(resources::SECRETS, Some("kube-system")).0 {
            if secret["type"] != "bootstrap.kubernetes.io/token"
                || auth::secret_data(&secret, "usage-bootstrap-signing").as_deref() != Some("true")
                || auth::bootstrap_token_expired(&secret)
            {
                continue;
            }
            let (Some(id), Some(token_secret)) = (
                auth::secret_data(&secret, "token-id"),
                auth::secret_data(&secret, "token-secret"),
            ) else {
                continue;
            };
            signatures.insert(
                format!("jws-kubeconfig-{id}"),
                detached_jws(&kubeconfig, &id, &token_secret),
            );
        }
        let _ =
            self.store()
                .update_with(resources::CONFIGMAPS, "kube-public", "cluster-info", |cm| {
                    let mut data = serde_json::Map::new();
                    data.insert("kubeconfig".into(), json!(kubeconfig));
                    for (key, jws) in &signatures {
                        data.insert(key.clone(), json!(jws));
                    }
                    cm["data"] = Value::Object(data);
                    Ok::<_, ()>(())
                });
    }

    fn approve_and_sign(&self, name: &str) {
        let Some(csr) = self.store().get(resources::CSRS, "", name) else {
            return;
        };
        let conditions = csr["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let has = |kind: &str| {
            conditions
                .iter()
                .any(|c| c["type"] == kind && c["status"] != "False")
        };
        let signer = csr["spec"]["signerName"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let pem = csr["spec"]["request"]
            .as_str()
            .and_then(|b| STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        if conditions.is_empty()
            && signer == SIGNER_CLIENT_KUBELET
            && let Some(reason) = self.auto_approval(&csr, &pem)
        {
            let now = admission::now();
            let _ = self.store().update_with(resources::CSRS, "", name, |csr| {
                    csr["status"]["conditions"] = json!([{"type": "Approved", "status": "True", "reason": "AutoApproved", "message": reason, "lastUpdateTime": now, "lastTransitionTime": now}]);
                    Ok::<_, ()>(())
                });
            return; // the approval is a change of its own; signing follows on it
        }
        if !has("Approved")
            || has("Denied")
            || has("Failed")
            || csr["status"]["certificate"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        {
            return;
        }
        let usages = match signer.as_str() {
            SIGNER_CLIENT_KUBELET | SIGNER_CLIENT => vec![ExtendedKeyUsagePurpose::ClientAuth],
            SIGNER_SERVING => vec![ExtendedKeyUsagePurpose::ServerAuth],
            _ => return, // another signer's request: not ours to sign
        };
        let seconds = csr["spec"]["expirationSeconds"]
            .as_u64()
            .map_or(365 * 86400, |s| s.max(600));
        let result = self
            .state
            .ca
            .sign_csr(&pem, &usages, Duration::from_secs(seconds));
        let now = admission::now();
        let _ = self.store().update_with(resources::CSRS, "", name, |csr| {
            match &result {
                Ok(cert) => csr["status"]["certificate"] = json!(STANDARD.encode(cert)),
                Err(e) => {
                    let failed = json!({"type": "Failed", "status": "True", "reason": "SignerValidationFailure", "message": e.to_string(), "lastUpdateTime": now, "lastTransitionTime": now});
                    match csr["status"]["conditions"].as_array_mut() {
                        Some(conditions) => conditions.push(failed),
                        None => csr["status"]["conditions"] = json!([failed]),
                    }
                }
            }
            Ok::<_, ()>(())
        });
    }

    /// The csrapproving controller's rule for kubelet client certificates: the subject is
    /// `system:node:<name>` in `system:nodes`, the usages are a client's, and the requester may
    /// create `certificatesigningrequests/nodeclient` (or `/selfnodeclient` when renewing its own).
    fn auto_approval(&self, csr: &Value, pem: &str) -> Option<String> {
        let (cn, orgs) = crate::pki::csr_subject(pem)?;
        if !cn.starts_with("system:node:") || orgs != ["system:nodes"] {
            return None;
        }
        let usages: BTreeSet<&str> = csr["spec"]["usages"]
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let allowed_sets: [BTreeSet<&str>; 2] = [
            ["digital signature", "key encipherment", "client auth"]
                .into_iter()
                .collect(),
            ["digital signature", "client auth"].into_iter().collect(),
        ];
        if !allowed_sets.contains(&usages) {
            return None;
        }
        let requester = User {
            name: csr["spec"]["username"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            uid: csr["spec"]["uid"].as_str().unwrap_or_default().to_owned(),
            groups: csr["spec"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
        };
        let subresource = if requester.name == cn {
            "selfnodeclient"
        } else {
            "nodeclient"
        };
        let attrs = Attributes {
            verb: "create".into(),
            group: Some("certificates.k8s.io".into()),
            resource: "certificatesigningrequests".into(),
            subresource: subresource.into(),
            ..Default::default()
        };
        (authz::authorize(self.store(), &requester, &attrs) == Decision::Allow).then(|| {
            "Auto approving kubelet client certificate after SubjectAccessReview.".to_owned()
        })
    }

    /// The EndpointSlice controller for one namespace: a slice per Service with a selector (per
    /// distinct resolved port list), endpoints for its pods that have an IP, with ready, serving
    /// and terminating from the pod.
    /// Whether `service` has a selector or slices of its controller's making.
    fn may_own_slices(&self, service: &Value) -> bool {
        let has_selector = service["spec"]["selector"]
            .as_object()
            .is_some_and(|s| !s.is_empty());
        let (namespace, name) = key_of(service);
        has_selector
            || self
                .store()
                .list(resources::ENDPOINTSLICES, Some(&namespace))
                .0
                .iter()
                .any(|slice| {
                    slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str()
                        == Some(name.as_str())
                })
    }

    fn endpoint_slices(&self, namespace: &str) {
        let store = self.store();
        let services = store.list(resources::SERVICES, Some(namespace)).0;
        let pods = store.list(resources::PODS, Some(namespace)).0;
        let nodes = store.list(resources::NODES, None).0;
        let zone = |node: &str| {
            nodes.iter().find(|n| key_of(n).1 == node).and_then(|n| {
                n["metadata"]["labels"]["topology.kubernetes.io/zone"]
                    .as_str()
                    .map(str::to_owned)
            })
        };
        let mut wanted: BTreeMap<String, Value> = BTreeMap::new();
        let mut owners: BTreeSet<String> = BTreeSet::new();
        for service in &services {
            let Some(selector) = service["spec"]["selector"]
                .as_object()
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let svc_name = key_of(service).1;
            owners.insert(svc_name.clone());
            let selector = LabelSelector::from_map(selector);
            let publish_not_ready = service["spec"]["publishNotReadyAddresses"]
                .as_bool()
                .unwrap_or(false);
            let mut groups: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
            for pod in pods.iter().filter(|p| selector.matches(p)) {
                let Some(ip) = pod["status"]["podIP"].as_str() else {
                    continue;
                };
                if matches!(
                    pod["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed")
                ) {
                    continue;
                }
                let ports = resolve_ports(service, pod);
                let terminating = !pod["metadata"]["deletionTimestamp"].is_null();
                let pod_ready = pod["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let serving = pod_ready || publish_not_ready;
                let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
                let mut endpoint = json!({
                    "addresses": [ip],
                    "conditions": {"ready": serving && !terminating, "serving": serving, "terminating": terminating},
                    "targetRef": {"kind": "Pod", "namespace": namespace, "name": key_of(pod).1, "uid": pod["metadata"]["uid"]},
                });
                if !node.is_empty() {
                    endpoint["nodeName"] = json!(node);
                }
                if let Some(zone) = zone(node) {
                    endpoint["zone"] = json!(zone);
                }
                groups
                    .entry(ports.to_string())
                    .or_insert_with(|| (ports.clone(), Vec::new()))
                    .1
                    .push(endpoint);
            }
            if groups.is_empty() {
                let ports = resolve_ports(service, &Value::Null);
                groups.insert(ports.to_string(), (ports, Vec::new()));
            }
            let uid = service["metadata"]["uid"].as_str().unwrap_or_default();
            for (i, (_, (ports, endpoints))) in groups.into_iter().enumerate() {
                let name = format!("{svc_name}-{}", stable_suffix(&format!("{uid}/{i}")));
                let mut labels = service["metadata"]["labels"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                labels.insert("kubernetes.io/service-name".into(), json!(svc_name));
                labels.insert(
                    "endpointslice.kubernetes.io/managed-by".into(),
                    json!(MANAGED_BY),
                );
                wanted.insert(name.clone(), json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": name, "namespace": namespace, "labels": labels,
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc_name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
                    "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
                }));
            }
        }
        let existing: Vec<Value> = store
            .list(resources::ENDPOINTSLICES, Some(namespace))
            .0
            .into_iter()
            .filter(|s| {
                s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == MANAGED_BY
            })
            .collect();
        for slice in &existing {
            let name = key_of(slice).1;
            match wanted.remove(&name) {
                Some(want) => {
                    let _ =
                        store.update_with(resources::ENDPOINTSLICES, namespace, &name, |current| {
                            current["metadata"]["labels"] = want["metadata"]["labels"].clone();
                            current["metadata"]["ownerReferences"] =
                                want["metadata"]["ownerReferences"].clone();
                            current["endpoints"] = want["endpoints"].clone();
                            current["ports"] = want["ports"].clone();
                            Ok::<_, ()>(())
                        });
                }
                None => {
                    let service = slice["metadata"]["labels"]["kubernetes.io/service-name"]
                        .as_str()
                        .unwrap_or_default();
                    if !owners.contains(service) || slice["metadata"]["deletionTimestamp"].is_null()
                    {
                        let _ = store.delete(resources::ENDPOINTSLICES, namespace, &name);
                    }
                }
            }
        }
        for (_, slice) in wanted {
            self.create(resources::ENDPOINTSLICES, slice);
        }
    }
}

/// A Service's ports as an EndpointSlice lists them for one pod: named target ports resolved
/// against the pod's container ports (a port that does not resolve is left out).
fn resolve_ports(service: &Value, pod: &Value) -> Value {
    let mut ports = Vec::new();
    for port in service["spec"]["ports"].as_array().into_iter().flatten() {
        let number = match &port["targetPort"] {
            Value::Number(n) => n.as_i64(),
            Value::String(name) => pod["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                .find(|p| p["name"] == name.as_str() && p["protocol"] == port["protocol"])
                .and_then(|p| p["containerPort"].as_i64()),
            _ => port["port"].as_i64(),
        };
        let Some(number) = number else { continue };
        let mut entry = json!({"name": port["name"].as_str().unwrap_or(""), "port": number, "protocol": port["protocol"]});
        if let Some(app) = port["appProtocol"].as_str() {
            entry["appProtocol"] = json!(app);
        }
        ports.push(entry);
    }
    Value::Array(ports)
}

/// Five characters derived from `seed`, in the alphabet of generated names.
fn stable_suffix(seed: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    Sha256::digest(seed.as_bytes())
        .iter()
        .take(5)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

/// A detached compact JWS (`header..signature`, HS256, `kid` = token id, key = token secret)
/// over `content`, byte for byte as the upstream bootstrap signer writes it.
pub fn detached_jws(content: &str, token_id: &str, token_secret: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","kid":"{token_id}"}}"#));
    let payload = URL_SAFE_NO_PAD.encode(content);
    let mut mac = Hmac::<Sha256>::new_from_slice(token_secret.as_bytes())
        .expect("any key length works for HMAC");
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}..{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_jws_matches_an_independent_computation() {
        // Computed independently: python3 -c "import hmac,hashlib,base64; ..." over the same input.
        let jws = detached_jws("hello", "abcdef", "0123456789abcdef");
        let (header, signature) = jws.split_once("..").expect("detached form");
        assert_eq!(header, "eyJhbGciOiJIUzI1NiIsImtpZCI6ImFiY2RlZiJ9");
        assert_eq!(signature, EXPECTED_SIGNATURE);
    }

    const EXPECTED_SIGNATURE: &str = "MxsnbCjBaYzcbNIFa06F-wuF9LX26rhMlrL4zA1511s";

    #[test]
    fn named_target_ports_resolve_per_pod() {
        let service = json!({"spec": {"ports": [{"name": "web", "port": 80, "protocol": "TCP", "targetPort": "http"}, {"name": "raw", "port": 81, "protocol": "TCP", "targetPort": 8081}]}});
        let pod = json!({"spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]}});
        assert_eq!(
            resolve_ports(&service, &pod),
            json!([{"name": "web", "port": 8080, "protocol": "TCP"}, {"name": "raw", "port": 8081, "protocol": "TCP"}])
        );
        assert_eq!(
            resolve_ports(&service, &Value::Null),
            json!([{"name": "raw", "port": 8081, "protocol": "TCP"}])
        );
    }
}
