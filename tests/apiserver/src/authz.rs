//! Authorization, in the order a kubeadm cluster runs it: `system:masters` may do anything, then
//! the Node authorizer (a node reaches secrets, configmaps, PVCs and service-account tokens only
//! through pods bound to it, and otherwise the node rules), then RBAC over the stored Roles and
//! bindings, which start with the bootstrap policy kubeadm installs ([`default_policy`]).

use serde_json::{Value, json};

use crate::auth::User;
use crate::resources::{
    CLUSTERROLEBINDINGS, CLUSTERROLES, PERSISTENTVOLUMECLAIMS, PODS, ROLEBINDINGS, ROLES, Resource,
};
use crate::store::Store;

/// What is being asked for.
#[derive(Debug, Clone, Default)]
pub struct Attributes {
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// API group ("" for core); `None` for a non-resource path.
    pub group: Option<String>,
    /// Plural resource name.
    pub resource: String,
    /// Subresource (`status`, `token`, ...).
    pub subresource: String,
    /// Namespace of the request ("" for cluster scope).
    pub namespace: String,
    /// Object name ("" for collections, unless a field selector names one).
    pub name: String,
    /// Request path, for non-resource requests.
    pub path: String,
}

/// The authorizer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Not allowed; the reason, where an authorizer gave one, goes into the 403 message.
    Deny(Option<String>),
}

/// Decides whether `user` may do what `attrs` describe.
pub fn authorize(store: &Store, user: &User, attrs: &Attributes) -> Decision {
    if user.in_group("system:masters") {
        return Decision::Allow;
    }
    let mut reason = None;
    if let Some(node) = user.node_name() {
        match node_authorize(store, node, attrs) {
            NodeDecision::Allow => return Decision::Allow,
            NodeDecision::NoOpinion(why) => reason = why,
        }
    }
    if rbac_allows(store, user, attrs) {
        return Decision::Allow;
    }
    Decision::Deny(reason)
}

enum NodeDecision {
    Allow,
    NoOpinion(Option<String>),
}

/// The resources a node reaches only through the pods bound to it.
const GRAPH_RESOURCES: &[&str] = &[
    "secrets",
    "configmaps",
    "persistentvolumeclaims",
    "persistentvolumes",
];

fn node_authorize(store: &Store, node: &str, attrs: &Attributes) -> NodeDecision {
    let Some(group) = attrs.group.as_deref() else {
        return NodeDecision::NoOpinion(None);
    };
    let resource = attrs.resource.as_str();
    if group.is_empty() && GRAPH_RESOURCES.contains(&resource) && attrs.subresource.is_empty() {
        let reading = matches!(attrs.verb.as_str(), "get" | "list" | "watch");
        if !reading || attrs.name.is_empty() {
            return NodeDecision::NoOpinion(Some(format!(
                "can only {} a single {resource} referenced by a pod on node '{node}'",
                "get/list/watch"
            )));
        }
        return if references(store, node, resource, &attrs.namespace, &attrs.name) {
            NodeDecision::Allow
        } else {
            NodeDecision::NoOpinion(Some(format!(
                "no relationship found between node '{node}' and this object"
            )))
        };
    }
    if group.is_empty() && resource == "serviceaccounts" && attrs.subresource == "token" {
        return if attrs.verb == "create"
            && node_pods(store, node).iter().any(|pod| {
                pod["metadata"]["namespace"] == attrs.namespace.as_str()
                    && pod["spec"]["serviceAccountName"]
                        .as_str()
                        .unwrap_or("default")
                        == attrs.name
            }) {
            NodeDecision::Allow
        } else {
            NodeDecision::NoOpinion(Some(format!(
                "no relationship found between node '{node}' and this object"
            )))
        };
    }
    let rule = NODE_RULES.iter().any(|(g, resources, verbs)| {
        *g == group
            && resources.contains(&qualified_resource(attrs).as_str())
            && verbs.contains(&attrs.verb.as_str())
    });
    if rule {
        NodeDecision::Allow
    } else {
        NodeDecision::NoOpinion(None)
    }
}

/// The node rules of the upstream bootstrap policy (what a kubelet needs beyond the graph).
const NODE_RULES: &[(&str, &[&str], &[&str])] = &[
    (
        "",
        &["nodes"],
        &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
    ),
    ("", &["nodes/status"], &["update", "patch"]),
    ("", &["pods"], &["get", "list", "watch", "create", "delete"]),
    ("", &["pods/status"], &["update", "patch"]),
    ("", &["pods/eviction"], &["create"]),
    ("", &["services", "endpoints"], &["get", "list", "watch"]),
    ("", &["events"], &["create", "update", "patch"]),
    ("events.k8s.io", &["events"], &["create", "update", "patch"]),
    ("", &["persistentvolumeclaims/status"], &["update", "patch"]),
    (
        "certificates.k8s.io",
        &["certificatesigningrequests"],
        &["create", "get", "list", "watch"],
    ),
    ("authentication.k8s.io", &["tokenreviews"], &["create"]),
    (
        "authorization.k8s.io",
        &["subjectaccessreviews", "localsubjectaccessreviews"],
        &["create"],
    ),
    (
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update", "patch", "delete"],
    ),
];

fn qualified_resource(attrs: &Attributes) -> String {
    if attrs.subresource.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}/{}", attrs.resource, attrs.subresource)
    }
}

/// The pods bound to `node`.
pub fn node_pods(store: &Store, node: &str) -> Vec<Value> {
    store
        .list(PODS, None)
        .0
        .into_iter()
        .filter(|pod| pod["spec"]["nodeName"] == node)
        .collect()
}

/// Whether a pod on `node` references the object: volumes (also projected), env, envFrom,
/// imagePullSecrets; a PV through a PVC such a pod uses.
fn references(store: &Store, node: &str, resource: &str, namespace: &str, name: &str) -> bool {
    let pods = node_pods(store, node);
    if resource == "persistentvolumes" {
        return pods.iter().any(|pod| {
            let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
            pod_refs(pod, "persistentvolumeclaims").iter().any(|claim| {
                store
                    .get(PERSISTENTVOLUMECLAIMS, ns, claim)
                    .is_some_and(|pvc| pvc["spec"]["volumeName"] == name)
            })
        });
    }
    pods.iter()
        .filter(|pod| pod["metadata"]["namespace"] == namespace)
        .any(|pod| pod_refs(pod, resource).iter().any(|r| r == name))
}

/// Names of `resource` objects a pod references.
pub fn pod_refs(pod: &Value, resource: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut push = |v: &Value| {
        if let Some(s) = v.as_str() {
            names.push(s.to_owned());
        }
    };
    let spec = &pod["spec"];
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    for volume in &volumes {
        match resource {
            "secrets" => push(&volume["secret"]["secretName"]),
            "configmaps" => push(&volume["configMap"]["name"]),
            "persistentvolumeclaims" => push(&volume["persistentVolumeClaim"]["claimName"]),
            _ => {}
        }
        for source in volume["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
        {
            match resource {
                "secrets" => push(&source["secret"]["name"]),
                "configmaps" => push(&source["configMap"]["name"]),
                _ => {}
            }
        }
    }
    if resource == "secrets" {
        for secret in spec["imagePullSecrets"].as_array().into_iter().flatten() {
            push(&secret["name"]);
        }
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for container in spec[list].as_array().into_iter().flatten() {
            for env in container["env"].as_array().into_iter().flatten() {
                match resource {
                    "secrets" => push(&env["valueFrom"]["secretKeyRef"]["name"]),
                    "configmaps" => push(&env["valueFrom"]["configMapKeyRef"]["name"]),
                    _ => {}
                }
            }
            for from in container["envFrom"].as_array().into_iter().flatten() {
                match resource {
                    "secrets" => push(&from["secretRef"]["name"]),
                    "configmaps" => push(&from["configMapRef"]["name"]),
                    _ => {}
                }
            }
        }
    }
    names
}

fn subject_matches(subject: &Value, user: &User) -> bool {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str() {
        Some("User") => user.name == name,
        Some("Group") => user.in_group(name),
        Some("ServiceAccount") => {
            let ns = subject["namespace"].as_str().unwrap_or_default();
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

fn rule_allows(rule: &Value, attrs: &Attributes) -> bool {
    let list = |field: &str| -> Vec<&str> {
        rule[field]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let has = |field: &str, want: &str| list(field).iter().any(|v| *v == "*" || *v == want);
    if !has("verbs", &attrs.verb) {
        return false;
    }
    match &attrs.group {
        None => list("nonResourceURLs")
            .iter()
            .any(|url| match url.strip_suffix('*') {
                Some(prefix) => attrs.path.starts_with(prefix),
                None => *url == attrs.path,
            }),
        Some(group) => {
            let resource = qualified_resource(attrs);
            let names = list("resourceNames");
            has("apiGroups", group)
                && list("resources").iter().any(|r| {
                    *r == "*"
                        || *r == resource
                        || (r.starts_with("*/") && resource.ends_with(&r[1..]))
                })
                && (names.is_empty() || names.contains(&attrs.name.as_str()))
        }
    }
}

fn role_rules(store: &Store, role_ref: &Value, namespace: &str) -> Vec<Value> {
    let name = role_ref["name"].as_str().unwrap_or_default();
    let role = match role_ref["kind"].as_str() {
        Some("ClusterRole") => store.get(CLUSTERROLES, "", name),
        Some("Role") => store.get(ROLES, namespace, name),
        _ => None,
    };
    role.and_then(|r| r["rules"].as_array().cloned())
        .unwrap_or_default()
}

fn rbac_allows(store: &Store, user: &User, attrs: &Attributes) -> bool {
    let bound = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
    };
    let cluster = store.list(CLUSTERROLEBINDINGS, None).0;
    let namespaced = if attrs.namespace.is_empty() {
        Vec::new()
    } else {
        store.list(ROLEBINDINGS, Some(&attrs.namespace)).0
    };
    cluster
        .iter()
        .filter(|b| bound(b))
        .flat_map(|b| role_rules(store, &b["roleRef"], ""))
        .chain(
            namespaced
                .iter()
                .filter(|b| bound(b))
                .flat_map(|b| role_rules(store, &b["roleRef"], &attrs.namespace)),
        )
        .any(|rule| rule_allows(&rule, attrs))
}

/// The RBAC objects a fresh kubeadm cluster has that nodes and joiners rely on: discovery for
/// everyone, CSR creation and auto-approval for bootstrap tokens and nodes, `cluster-info` for
/// anonymous readers, and the `system:node-proxier` role.
pub fn default_policy() -> Vec<(Resource, Value)> {
    let cluster_role = |name: &str, rules: Value| {
        (
            CLUSTERROLES,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name}, "rules": rules}),
        )
    };
    let binding = |name: &str, role: &str, subjects: Value| {
        (
            CLUSTERROLEBINDINGS,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}, "subjects": subjects}),
        )
    };
    let group = |name: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": name});
    let node_token_group = "system:bootstrappers:kubeadm:default-node-token";
    vec![
        cluster_role(
            "system:discovery",
            json!([{"verbs": ["get"], "nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz", "/version", "/version/", "/openapi", "/openapi/*"]}]),
        ),
        binding(
            "system:discovery",
            "system:discovery",
            json!([group("system:authenticated")]),
        ),
        cluster_role(
            "system:basic-user",
            json!([{"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                   {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
        ),
        binding(
            "system:basic-user",
            "system:basic-user",
            json!([group("system:authenticated")]),
        ),
        cluster_role(
            "system:public-info-viewer",
            json!([{"verbs": ["get"], "nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"]}]),
        ),
        binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            json!([
                group("system:authenticated"),
                group("system:unauthenticated")
            ]),
        ),
        cluster_role(
            "system:node-bootstrapper",
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get", "list", "watch"]}]),
        ),
        binding(
            "kubeadm:kubelet-bootstrap",
            "system:node-bootstrapper",
            json!([group(node_token_group)]),
        ),
        cluster_role(
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/nodeclient"], "verbs": ["create"]}]),
        ),
        binding(
            "kubeadm:node-autoapprove-bootstrap",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            json!([group(node_token_group)]),
        ),
        cluster_role(
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/selfnodeclient"], "verbs": ["create"]}]),
        ),
        binding(
            "kubeadm:node-autoapprove-certificate-rotation",
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            json!([group("system:nodes")]),
        ),
        cluster_role(
            "kubeadm:get-nodes",
            json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]),
        ),
        binding(
            "kubeadm:get-nodes",
            "kubeadm:get-nodes",
            json!([group(node_token_group)]),
        ),
        cluster_role(
            "system:node-proxier",
            json!([
            {"apiGroups": [""], "resources": ["endpoints", "services"], "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]),
        ),
        binding(
            "kubeadm:node-proxier",
            "system:node-proxier",
            json!([{"kind": "ServiceAccount", "name": "kube-proxy", "namespace": "kube-system"}]),
        ),
        (
            ROLES,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "kubeadm:bootstrap-signer-clusterinfo", "namespace": "kube-public"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cluster-info"], "verbs": ["get"]}]}),
        ),
        (
            ROLEBINDINGS,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "kubeadm:bootstrap-signer-clusterinfo", "namespace": "kube-public"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubeadm:bootstrap-signer-clusterinfo"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:anonymous"}]}),
        ),
        (
            ROLES,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "kubeadm:kubelet-config", "namespace": "kube-system"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kubelet-config"], "verbs": ["get"]}]}),
        ),
        (
            ROLEBINDINGS,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "kubeadm:kubelet-config", "namespace": "kube-system"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubeadm:kubelet-config"},
            "subjects": [group("system:nodes"), group(node_token_group)]}),
        ),
        // kubeadm lets joining machines read the kube-proxy configuration.
        (
            ROLES,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kube-proxy"], "verbs": ["get"]}]}),
        ),
        (
            ROLEBINDINGS,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kube-proxy"},
            "subjects": [group(node_token_group)]}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_policy() -> Store {
        let store = Store::default();
        for (resource, mut object) in default_policy() {
            object["metadata"]["uid"] = json!("u");
            store.create(resource, object).unwrap();
        }
        store
    }

    fn attrs(
        verb: &str,
        group: &str,
        resource: &str,
        sub: &str,
        ns: &str,
        name: &str,
    ) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: Some(group.into()),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            path: String::new(),
        }
    }

    fn node(name: &str) -> User {
        User::authenticated(&format!("system:node:{name}"), &["system:nodes".into()])
    }

    #[test]
    fn nodes_read_only_secrets_their_pods_use() {
        let store = store_with_policy();
        store.create(PODS, json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1",
            "volumes": [{"name": "v", "secret": {"secretName": "mine"}}, {"name": "c", "projected": {"sources": [{"configMap": {"name": "kube-root-ca.crt"}}]}}],
            "containers": [{"name": "c", "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "k"}}}]}]}})).unwrap();
        let n1 = node("n1");
        let allowed = |a: &Attributes, u: &User| authorize(&store, u, a) == Decision::Allow;
        assert!(allowed(&attrs("get", "", "secrets", "", "ns", "mine"), &n1));
        assert!(allowed(
            &attrs("watch", "", "secrets", "", "ns", "env-secret"),
            &n1
        ));
        assert!(allowed(
            &attrs("get", "", "configmaps", "", "ns", "kube-root-ca.crt"),
            &n1
        ));
        assert!(!allowed(
            &attrs("get", "", "secrets", "", "ns", "other"),
            &n1
        ));
        assert!(!allowed(&attrs("list", "", "secrets", "", "ns", ""), &n1));
        assert!(!allowed(
            &attrs("get", "", "secrets", "", "ns", "mine"),
            &node("n2")
        ));
        let denied = authorize(
            &store,
            &node("n2"),
            &attrs("get", "", "secrets", "", "ns", "mine"),
        );
        assert_eq!(
            denied,
            Decision::Deny(Some(
                "no relationship found between node 'n2' and this object".into()
            ))
        );
        assert!(allowed(
            &attrs("create", "", "serviceaccounts", "token", "ns", "default"),
            &n1
        ));
        assert!(allowed(
            &attrs("patch", "", "nodes", "status", "", "n1"),
            &n1
        ));
        assert!(!allowed(
            &attrs("create", "", "namespaces", "", "", "x"),
            &n1
        ));
    }

    #[test]
    fn rbac_defaults_cover_bootstrap_anonymous_and_discovery() {
        let store = store_with_policy();
        let bootstrap = User::authenticated(
            "system:bootstrap:abcdef",
            &[
                "system:bootstrappers".into(),
                "system:bootstrappers:kubeadm:default-node-token".into(),
            ],
        );
        let allowed = |a: &Attributes, u: &User| authorize(&store, u, a) == Decision::Allow;
        assert!(allowed(
            &attrs(
                "create",
                "certificates.k8s.io",
                "certificatesigningrequests",
                "",
                "",
                ""
            ),
            &bootstrap
        ));
        assert!(allowed(
            &attrs(
                "create",
                "certificates.k8s.io",
                "certificatesigningrequests",
                "nodeclient",
                "",
                ""
            ),
            &bootstrap
        ));
        assert!(!allowed(&attrs("list", "", "pods", "", "", ""), &bootstrap));
        let anonymous = User::anonymous();
        assert!(allowed(
            &attrs("get", "", "configmaps", "", "kube-public", "cluster-info"),
            &anonymous
        ));
        assert!(!allowed(
            &attrs("get", "", "configmaps", "", "kube-public", "other"),
            &anonymous
        ));
        assert!(!allowed(
            &attrs("get", "", "configmaps", "", "kube-system", "cluster-info"),
            &anonymous
        ));
        let version = Attributes {
            verb: "get".into(),
            path: "/version".into(),
            ..Default::default()
        };
        assert!(allowed(&version, &anonymous));
        let api = Attributes {
            verb: "get".into(),
            path: "/api/v1".into(),
            ..Default::default()
        };
        assert!(
            !allowed(&api, &anonymous),
            "anonymous discovery is off, as in kubeadm"
        );
        assert!(allowed(&api, &bootstrap));
        let proxy = User::authenticated("system:serviceaccount:kube-system:kube-proxy", &[]);
        assert!(allowed(
            &attrs("watch", "discovery.k8s.io", "endpointslices", "", "", ""),
            &proxy
        ));
        let admin = User::authenticated("admin", &["system:masters".into()]);
        assert!(allowed(&attrs("delete", "", "nodes", "", "", "n1"), &admin));
    }
}
