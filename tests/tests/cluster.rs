//! cluster tier: the Kubernetes API behaviour nodes rely on, against the in-process test API
//! server or — with `TUG_TEST_KUBECONFIG` naming an admin kubeconfig — a real cluster, unchanged.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::{StreamExt, TryStreamExt};
use hmac::{Hmac, Mac};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::{Value, json};
use sha2::Sha256;
use tug_tests::cluster::{api_error, client_from_kubeconfig, cluster, text, unique_name};
use tug_tests::eventually::eventually;

const TIMEOUT: Duration = Duration::from_secs(30);

fn cm(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .expect("configmap JSON")
}

/// A pod bound to `node` (no scheduler involved), with label `app`.
fn bound_pod(name: &str, node: &str, app: &str, extra_spec: Value) -> Pod {
    let mut spec = json!({"nodeName": node, "containers": [{"name": "web", "image": "127.0.0.1:5000/tug-test/http:latest",
        "ports": [{"name": "http", "containerPort": 8080}]}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"app": app}}, "spec": spec}),
    )
    .expect("pod JSON")
}

/// Sends a raw request with the admin's credentials; returns the status code and JSON body.
async fn raw(method: &str, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let client = cluster().admin().await;
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("Content-Type", content_type)
        .body(body)
        .expect("request");
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .expect("send raw request");
    let status = response.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("read body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn create_get_update_conflict_and_status_errors() {
    let ns = cluster().namespace("crud").await;
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin().await, ns.name());
    let created = api
        .create(&PostParams::default(), &cm("a", json!({})))
        .await
        .expect("create");
    let uid = created.metadata.uid.clone().expect("uid is set");
    let stale = created.clone();
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(
        api_error(
            api.create(&PostParams::default(), &cm("a", json!({})))
                .await
        ),
        (409, "AlreadyExists".into())
    );
    assert_eq!(
        api_error(api.get("missing").await),
        (404, "NotFound".into())
    );

    let mut fresh = api.get("a").await.expect("get");
    fresh.data = Some([("k".to_owned(), "w".to_owned())].into());
    let updated = api
        .replace("a", &PostParams::default(), &fresh)
        .await
        .expect("update with the current version");
    assert_eq!(updated.metadata.uid.as_deref(), Some(uid.as_str()));
    assert_ne!(
        updated.metadata.resource_version,
        stale.metadata.resource_version
    );
    assert_eq!(
        api_error(api.replace("a", &PostParams::default(), &stale).await),
        (409, "Conflict".into())
    );
    assert_eq!(
        api_error(
            api.create(&PostParams::default(), &cm("Bad_Name", json!({})))
                .await
        ),
        (422, "Invalid".into())
    );

    let generated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "gen-"}})).unwrap();
    let generated = api
        .create(&PostParams::default(), &generated)
        .await
        .expect("generateName");
    let name = generated.metadata.name.expect("a generated name");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let path = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    let (code, body) = raw("POST", &path, "application/json", b"{not json".to_vec()).await;
    assert_eq!(
        (code, text(&body, "/reason")),
        (400, "BadRequest".into()),
        "malformed JSON: {body}"
    );
    assert_eq!(text(&body, "/kind"), "Status");
    let (code, body) = raw(
        "POST",
        &format!("{path}?fieldValidation=Strict"),
        "application/json",
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"s"},"bogus":1}"#.to_vec(),
    )
    .await;
    assert_eq!(code, 400, "strict decoding rejects unknown fields: {body}");
    assert!(
        text(&body, "/message").contains("unknown field \"bogus\""),
        "{body}"
    );
    let huge = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"huge"}},"data":{{"k":"{}"}}}}"#,
        "x".repeat(4 << 20)
    );
    let (code, _) = raw("POST", &path, "application/json", huge.into_bytes()).await;
    assert_eq!(code, 413, "bodies over 3 MiB are refused");
    let (code, _) = raw("PATCH", &format!("{path}/a"), "text/plain", b"{}".to_vec()).await;
    assert_eq!(code, 415, "a PATCH needs a patch content type");
    let (code, _) = raw(
        "GET",
        "/api/v1/nosuchresources",
        "application/json",
        Vec::new(),
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn watches_resume_from_a_resource_version_and_old_versions_expire() {
    let ns = cluster().namespace("watch").await;
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin().await, ns.name());
    let start = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("list version");
    api.create(&PostParams::default(), &cm("w", json!({})))
        .await
        .expect("create");
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .expect("patch");
    api.delete("w", &DeleteParams::default())
        .await
        .expect("delete");

    let events: Vec<String> = api
        .watch(&WatchParams::default().timeout(5), &start)
        .await
        .expect("watch from the list's version")
        .filter_map(|e| async move {
            match e.expect("watch event") {
                WatchEvent::Added(c) => Some(format!("ADDED {}", c.metadata.name?)),
                WatchEvent::Modified(c) => Some(format!("MODIFIED {}", c.data?["k"])),
                WatchEvent::Deleted(c) => Some(format!("DELETED {}", c.metadata.name?)),
                _ => None,
            }
        })
        .take(3)
        .collect()
        .await;
    assert_eq!(events, ["ADDED w", "MODIFIED 2", "DELETED w"]);

    // Version 1 is long compacted on any cluster: 410 Gone, in-stream or as the response.
    let expired = match api.watch(&WatchParams::default().timeout(5), "1").await {
        Err(kube::Error::Api(status)) => status.code,
        Ok(stream) => match Box::pin(stream).next().await {
            Some(Ok(WatchEvent::Error(status))) => status.code,
            other => panic!("expected a 410 error event, got {other:?}"),
        },
        Err(other) => panic!("unexpected watch failure: {other}"),
    };
    assert_eq!(expired, 410);
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn selector_watches_see_objects_enter_and_leave_and_lists_filter() {
    let ns = cluster().namespace("sel").await;
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin().await, ns.name());
    let start = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let stream = api
        .watch(
            &WatchParams::default().labels("tier=front").timeout(10),
            &start,
        )
        .await
        .expect("watch");
    api.create(
        &PostParams::default(),
        &cm("x", json!({"tier": "back", "app": "a"})),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &cm("y", json!({"tier": "front", "app": "b"})),
    )
    .await
    .unwrap();
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
    )
    .await
    .unwrap();
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "back"}}})),
    )
    .await
    .unwrap();
    let events: Vec<String> = stream
        .try_filter_map(|e| async move {
            Ok(match e {
                WatchEvent::Added(c) => {
                    Some(format!("ADDED {}", c.metadata.name.unwrap_or_default()))
                }
                WatchEvent::Modified(c) => {
                    Some(format!("MODIFIED {}", c.metadata.name.unwrap_or_default()))
                }
                WatchEvent::Deleted(c) => {
                    Some(format!("DELETED {}", c.metadata.name.unwrap_or_default()))
                }
                _ => None,
            })
        })
        .take(3)
        .try_collect()
        .await
        .expect("watch events");
    assert_eq!(
        events,
        ["ADDED y", "ADDED x", "DELETED x"],
        "entering and leaving the selection"
    );

    let names = |list: kube::core::ObjectList<ConfigMap>| {
        let mut names: Vec<String> = list
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        names.sort();
        names
    };
    let listed = |selector: &'static str| {
        let api = api.clone();
        async move {
            names(
                api.list(&ListParams::default().labels(selector))
                    .await
                    .expect("list"),
            )
        }
    };
    assert_eq!(listed("tier in (front,back)").await, ["x", "y"]);
    assert_eq!(
        listed("app,tier notin (front)").await,
        ["x"],
        "notin also matches objects without the key, so require app"
    );
    assert_eq!(listed("app=b,tier").await, ["y"]);
    assert_eq!(listed("app,!tier").await, Vec::<String>::new());
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=y"))
        .await
        .unwrap();
    assert_eq!(names(by_name), ["y"]);

    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, ns.name());
    let node_a = unique_name("nosuch-node");
    pods.create(
        &PostParams::default(),
        &bound_pod("on-a", &node_a, "web", json!({})),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &bound_pod("on-b", &unique_name("nosuch-node"), "web", json!({})),
    )
    .await
    .unwrap();
    let on_a = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_a}")))
        .await
        .unwrap();
    assert_eq!(
        on_a.items
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect::<Vec<_>>(),
        ["on-a"]
    );
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn bootstrap_token_discovery_and_tls_bootstrap() {
    let token = cluster().bootstrap_token().await;
    let anonymous = client_from_kubeconfig(&cluster().token_kubeconfig(None)).await;
    let public: Api<ConfigMap> = Api::namespaced(anonymous.clone(), "kube-public");
    let key = format!("jws-kubeconfig-{}", token.id);
    let info = eventually("the bootstrap signer to sign cluster-info", TIMEOUT, || {
        let public = public.clone();
        let key = key.clone();
        async move {
            public
                .get("cluster-info")
                .await
                .ok()
                .filter(|c| c.data.as_ref().is_some_and(|d| d.contains_key(&key)))
        }
    })
    .await;
    let data = info.data.expect("cluster-info data");
    let kubeconfig = &data["kubeconfig"];
    let (header, signature) = data[&key]
        .split_once("..")
        .expect("a detached JWS: header..signature");
    let header_json: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header_json, json!({"alg": "HS256", "kid": token.id}));
    let mut mac = Hmac::<Sha256>::new_from_slice(token.secret.as_bytes()).unwrap();
    mac.update(format!("{header}.{}", URL_SAFE_NO_PAD.encode(kubeconfig)).as_bytes());
    mac.verify_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap())
        .expect("the JWS verifies with the token secret");
    assert!(
        kubeconfig.contains(cluster().server_url())
            && kubeconfig.contains("certificate-authority-data"),
        "{kubeconfig}"
    );

    let kube_system: Api<ConfigMap> = Api::namespaced(anonymous, "kube-system");
    assert_eq!(
        api_error(kube_system.get("kube-root-ca.crt").await).0,
        403,
        "anonymous reads only cluster-info"
    );

    let bootstrap = client_from_kubeconfig(&cluster().token_kubeconfig(Some(&token.token()))).await;
    let pods: Api<Pod> = Api::all(bootstrap);
    assert_eq!(
        api_error(pods.list(&ListParams::default()).await).0,
        403,
        "a bootstrap token may not list pods"
    );
    let bogus =
        client_from_kubeconfig(&cluster().token_kubeconfig(Some("abcdef.0123456789abcdef"))).await;
    let nodes: Api<Node> = Api::all(bogus);
    assert_eq!(
        api_error(nodes.list(&ListParams::default()).await),
        (401, "Unauthorized".into())
    );

    // TLS bootstrap: the CSR made with a bootstrap token is approved and signed; the
    // certificate authenticates as the node.
    let node = cluster().node("boot").await;
    let nodes: Api<Node> = Api::all(node.client.clone());
    let own = nodes
        .get(&node.name)
        .await
        .expect("a node reads its own Node");
    assert_eq!(own.metadata.name.as_deref(), Some(node.name.as_str()));
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn nodes_reach_only_their_own_objects() {
    let ns = cluster().namespace("noderestr").await;
    let admin = cluster().admin().await;
    let node = cluster().node("nra").await;
    let other = cluster().node("nrb").await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns.name());
    for name in ["mine", "other"] {
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"k": "v"}}))
                .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    let pod = bound_pod(
        "uses-mine",
        &node.name,
        "x",
        json!({"volumes": [{"name": "s", "secret": {"secretName": "mine"}}]}),
    );
    pods.create(&PostParams::default(), &pod).await.unwrap();

    let node_secrets: Api<Secret> = Api::namespaced(node.client.clone(), ns.name());
    eventually("the node to read a secret its pod uses", TIMEOUT, || {
        let s = node_secrets.clone();
        async move { s.get("mine").await.ok() }
    })
    .await;
    assert_eq!(
        api_error(node_secrets.get("other").await).0,
        403,
        "a secret no pod of the node uses"
    );
    assert_eq!(
        api_error(node_secrets.list(&ListParams::default()).await).0,
        403,
        "listing secrets"
    );
    let other_secrets: Api<Secret> = Api::namespaced(other.client.clone(), ns.name());
    assert_eq!(
        api_error(other_secrets.get("mine").await).0,
        403,
        "another node's pod's secret"
    );

    let nodes: Api<Node> = Api::all(node.client.clone());
    let condition = json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "test", "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    nodes
        .patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Strategic(condition.clone()),
        )
        .await
        .expect("own node status");
    assert_eq!(
        api_error(
            nodes
                .patch_status(
                    &other.name,
                    &PatchParams::default(),
                    &Patch::Strategic(condition)
                )
                .await
        )
        .0,
        403
    );

    let leases: Api<Lease> = Api::namespaced(node.client.clone(), "kube-node-lease");
    let lease = |name: &str| {
        serde_json::from_value::<Lease>(json!({"metadata": {"name": name}, "spec": {"holderIdentity": name, "leaseDurationSeconds": 40}})).unwrap()
    };
    leases
        .create(&PostParams::default(), &lease(&node.name))
        .await
        .expect("own lease");
    assert_eq!(
        api_error(
            leases
                .create(&PostParams::default(), &lease(&other.name))
                .await
        )
        .0,
        403
    );
    let _ = Api::<Lease>::namespaced(admin.clone(), "kube-node-lease")
        .delete(&node.name, &DeleteParams::default())
        .await;

    let node_pods: Api<Pod> = Api::namespaced(node.client.clone(), ns.name());
    let result = node_pods
        .create(
            &PostParams::default(),
            &bound_pod("not-mirror", &node.name, "x", json!({})),
        )
        .await;
    assert_eq!(api_error(result).0, 403, "a node creates only mirror pods");
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn status_patches_merge_lists_by_key_and_endpointslices_follow_readiness() {
    let ns = cluster().namespace("eps").await;
    let admin = cluster().admin().await;
    let node = cluster().node("epn").await;
    let app = unique_name("app");
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(admin.clone(), ns.name());
    let service = serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})).unwrap();
    let service = services
        .create(&PostParams::default(), &service)
        .await
        .expect("service");
    let cluster_ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP is allocated");
    assert!(
        cluster_ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "{cluster_ip}"
    );
    Api::<Pod>::namespaced(admin.clone(), ns.name())
        .create(
            &PostParams::default(),
            &bound_pod("web-1", &node.name, &app, json!({})),
        )
        .await
        .unwrap();

    let node_pods: Api<Pod> = Api::namespaced(node.client.clone(), ns.name());
    let status = |ready: &str| {
        json!({"status": {"phase": "Running", "podIP": "10.244.77.7", "podIPs": [{"ip": "10.244.77.7"}], "hostIP": "192.0.2.10",
        "conditions": [{"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": ready}, {"type": "Initialized", "status": "True"}]}})
    };
    node_pods
        .patch_status(
            "web-1",
            &PatchParams::default(),
            &Patch::Strategic(status("True")),
        )
        .await
        .expect("the node patches its pod's status");
    // A strategic merge of one condition keeps the others (merge key `type`).
    let patched = node_pods
        .patch_status(
            "web-1",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}),
            ),
        )
        .await
        .unwrap();
    let types: Vec<String> = patched
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    for t in ["Ready", "ContainersReady", "Initialized", "PodScheduled"] {
        assert!(types.iter().any(|x| x == t), "{t} kept in {types:?}");
    }

    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), ns.name());
    let endpoint = |want_ready: bool| {
        let slices = slices.clone();
        async move {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .ok()?;
            let slice = list
                .items
                .into_iter()
                .find(|s| s.endpoints.iter().any(|e| e.addresses == ["10.244.77.7"]))?;
            let endpoint = slice
                .endpoints
                .iter()
                .find(|e| e.addresses == ["10.244.77.7"])?
                .clone();
            let ports: Vec<i32> = slice
                .ports
                .unwrap_or_default()
                .iter()
                .filter_map(|p| p.port)
                .collect();
            (endpoint.conditions?.ready == Some(want_ready)).then_some((endpoint.node_name, ports))
        }
    };
    let (node_name, ports) =
        eventually("a ready endpoint for the pod", TIMEOUT, || endpoint(true)).await;
    assert_eq!(node_name.as_deref(), Some(node.name.as_str()));
    assert_eq!(
        ports,
        [8080],
        "the named target port resolves to the pod's container port"
    );
    node_pods
        .patch_status(
            "web-1",
            &PatchParams::default(),
            &Patch::Strategic(status("False")),
        )
        .await
        .unwrap();
    eventually("the endpoint to turn not ready", TIMEOUT, || {
        endpoint(false)
    })
    .await;
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn pods_on_a_node_are_deleted_gracefully_until_the_node_confirms() {
    let ns = cluster().namespace("grace").await;
    let node = cluster().node("grn").await;
    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, ns.name());
    pods.create(
        &PostParams::default(),
        &bound_pod(
            "p",
            &node.name,
            "x",
            json!({"terminationGracePeriodSeconds": 45}),
        ),
    )
    .await
    .unwrap();
    pods.delete("p", &DeleteParams::default())
        .await
        .expect("delete");
    let terminating = pods
        .get("p")
        .await
        .expect("still there while its node has not confirmed");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(45));

    let node_pods: Api<Pod> = Api::namespaced(node.client.clone(), ns.name());
    node_pods
        .delete(
            "p",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .expect("the node confirms");
    eventually("the pod to be gone", TIMEOUT, || {
        let pods = pods.clone();
        async move {
            matches!(pods.get("p").await, Err(kube::Error::Api(s)) if s.code == 404).then_some(())
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn controllers_give_nodes_pod_cidrs_and_namespaces_their_defaults() {
    let node = cluster().node("cidr").await;
    let nodes: Api<Node> = Api::all(cluster().admin().await);
    let cidr = eventually("a pod CIDR for the new node", TIMEOUT, || {
        let nodes = nodes.clone();
        let name = node.name.clone();
        async move { nodes.get(&name).await.ok()?.spec?.pod_cidr }
    })
    .await;
    assert!(cidr.parse::<ipnet::IpNet>().is_ok(), "{cidr}");

    let ns = cluster().namespace("defaults").await;
    let admin = cluster().admin().await;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns.name());
    eventually("the default service account", TIMEOUT, || {
        let sas = sas.clone();
        async move { sas.get("default").await.ok() }
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(admin, ns.name());
    let root_ca = eventually("kube-root-ca.crt", TIMEOUT, || {
        let cms = cms.clone();
        async move {
            cms.get("kube-root-ca.crt")
                .await
                .ok()?
                .data?
                .remove("ca.crt")
        }
    })
    .await;
    assert!(
        root_ca.contains(cluster().ca_pem().trim()),
        "kube-root-ca.crt carries the cluster CA"
    );
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn token_requests_reviews_and_access_reviews() {
    let ns = cluster().namespace("tokens").await;
    let admin = cluster().admin().await;
    let node = cluster().node("tkn").await;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns.name());
    eventually("the default service account", TIMEOUT, || {
        let sas = sas.clone();
        async move { sas.get("default").await.ok() }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    let pod = pods
        .create(
            &PostParams::default(),
            &bound_pod("tok", &node.name, "x", json!({})),
        )
        .await
        .unwrap();
    let pod_uid = pod.metadata.uid.unwrap();

    let node_sas: Api<ServiceAccount> = Api::namespaced(node.client.clone(), ns.name());
    let request: TokenRequest = serde_json::from_value(json!({"spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"], "expirationSeconds": 3600,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "tok", "uid": pod_uid}}})).unwrap();
    let issued = eventually("the node to get a token for its pod", TIMEOUT, || {
        let node_sas = node_sas.clone();
        let request = request.clone();
        async move {
            node_sas
                .create_token_request("default", &PostParams::default(), &request)
                .await
                .ok()
        }
    })
    .await;
    let token = issued.status.expect("token status").token;

    let reviews: Api<TokenReview> = Api::all(admin.clone());
    let review: TokenReview = serde_json::from_value(json!({"spec": {"token": token}})).unwrap();
    let reviewed = reviews
        .create(&PostParams::default(), &review)
        .await
        .expect("token review");
    let status = reviewed.status.expect("review status");
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.expect("user info");
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:default", ns.name()).as_str())
    );
    let bad: TokenReview =
        serde_json::from_value(json!({"spec": {"token": "not-a-token"}})).unwrap();
    assert_ne!(
        reviews
            .create(&PostParams::default(), &bad)
            .await
            .unwrap()
            .status
            .unwrap()
            .authenticated,
        Some(true)
    );

    let sars: Api<SubjectAccessReview> = Api::all(admin);
    let ask = |name: &str| {
        serde_json::from_value::<SubjectAccessReview>(json!({"spec": {"user": format!("system:node:{}", node.name), "groups": ["system:nodes", "system:authenticated"],
        "resourceAttributes": {"verb": "get", "resource": "nodes", "name": name}}})).unwrap()
    };
    let allowed = sars
        .create(&PostParams::default(), &ask(&node.name))
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed;
    assert!(allowed, "a node may get its own Node");
    let delete: SubjectAccessReview = serde_json::from_value(json!({"spec": {"user": format!("system:node:{}", node.name), "groups": ["system:nodes", "system:authenticated"],
        "resourceAttributes": {"verb": "delete", "resource": "namespaces", "name": ns.name()}}})).unwrap();
    assert!(
        !sars
            .create(&PostParams::default(), &delete)
            .await
            .unwrap()
            .status
            .unwrap()
            .allowed,
        "nodes may not delete namespaces"
    );
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cluster().admin_kubeconfig_path())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl (install it with scripts/install-deps)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let output = child.wait_with_output().expect("kubectl output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn kubectl_applies_gets_watches_deletes_and_approves_certificates() {
    let ns = cluster().namespace("kubectl").await;
    let manifest = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: {}\ndata:\n  mode: one\n",
        ns.name()
    );
    let (ok, out) = tokio::task::block_in_place(|| kubectl(&["apply", "-f", "-"], Some(&manifest)));
    assert!(ok && out.contains("configmap/settings created"), "{out}");
    let (ok, out) = tokio::task::block_in_place(|| {
        kubectl(&["apply", "-f", "-"], Some(&manifest.replace("one", "two")))
    });
    assert!(ok && out.contains("configmap/settings configured"), "{out}");
    let (ok, out) = tokio::task::block_in_place(|| {
        kubectl(
            &[
                "get",
                "configmap",
                "settings",
                "-n",
                ns.name(),
                "-o",
                "yaml",
            ],
            None,
        )
    });
    assert!(
        ok && out.contains("mode: two") && out.contains("last-applied-configuration"),
        "{out}"
    );

    let watch = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cluster().admin_kubeconfig_path())
        .args([
            "get",
            "configmap",
            "settings",
            "-n",
            ns.name(),
            "--watch",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} {.object.data.mode}{\"\\n\"}",
            "--request-timeout=20s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl get --watch");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out) = tokio::task::block_in_place(|| {
        kubectl(
            &[
                "patch",
                "configmap",
                "settings",
                "-n",
                ns.name(),
                "--type=merge",
                "-p",
                r#"{"data":{"mode":"three"}}"#,
            ],
            None,
        )
    });
    assert!(ok, "{out}");
    let (ok, out) = tokio::task::block_in_place(|| {
        kubectl(&["delete", "configmap", "settings", "-n", ns.name()], None)
    });
    assert!(ok && out.contains("deleted"), "{out}");
    let watched = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut watch = watch;
        let stdout = watch.stdout.take().expect("watch stdout");
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let done = line.starts_with("DELETED");
            seen.push(line);
            if done {
                break;
            }
        }
        let _ = watch.kill();
        let _ = watch.wait();
        seen.join("\n")
    });
    let watched = tokio::time::timeout(Duration::from_secs(30), watched)
        .await
        .expect("kubectl watch ends")
        .unwrap();
    let lines: Vec<&str> = watched.lines().collect();
    assert!(
        lines.contains(&"MODIFIED three") && lines.iter().any(|l| l.starts_with("DELETED")),
        "{watched}"
    );

    // A kubelet serving certificate is never auto-approved: an admin approves it with kubectl.
    let node = cluster().node("srv").await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["node.example".to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("system:node:{}", node.name),
    );
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let name = unique_name("serving");
    let csr: CertificateSigningRequest = serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"request": base64::engine::general_purpose::STANDARD.encode(pem),
        "signerName": "kubernetes.io/kubelet-serving", "usages": ["digital signature", "server auth"]}})).unwrap();
    let node_csrs: Api<CertificateSigningRequest> = Api::all(node.client.clone());
    node_csrs
        .create(&PostParams::default(), &csr)
        .await
        .expect("a node requests a serving certificate");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        node_csrs
            .get(&name)
            .await
            .unwrap()
            .status
            .and_then(|s| s.certificate)
            .is_none(),
        "not approved automatically"
    );
    let (ok, out) =
        tokio::task::block_in_place(|| kubectl(&["certificate", "approve", &name], None));
    assert!(ok && out.contains("approved"), "{out}");
    eventually(
        "the approved serving certificate to be issued",
        TIMEOUT,
        || {
            let node_csrs = node_csrs.clone();
            let name = name.clone();
            async move { node_csrs.get(&name).await.ok()?.status?.certificate }
        },
    )
    .await;
    let _ = Api::<CertificateSigningRequest>::all(cluster().admin().await)
        .delete(&name, &DeleteParams::default())
        .await;
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn finalizers_hold_a_deletion_until_they_are_removed() {
    let ns = cluster().namespace("final").await;
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin().await, ns.name());
    let held: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "held", "finalizers": ["tug.test/hold"]}}),
    )
    .unwrap();
    api.create(&PostParams::default(), &held).await.unwrap();
    api.delete("held", &DeleteParams::default())
        .await
        .expect("delete is accepted");
    let marked = api
        .get("held")
        .await
        .expect("still there while a finalizer holds it");
    assert!(
        marked.metadata.deletion_timestamp.is_some(),
        "marked for deletion"
    );
    let finalizers_cleared = json!({"metadata": {"finalizers": null}});
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(finalizers_cleared),
    )
    .await
    .expect("remove the finalizer");
    eventually(
        "the object to go once its finalizer is gone",
        TIMEOUT,
        || {
            let api = api.clone();
            async move {
                matches!(api.get("held").await, Err(kube::Error::Api(s)) if s.code == 404)
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn watches_carry_bookmarks_when_asked() {
    let ns = cluster().namespace("bookmark").await;
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin().await, ns.name());
    let start = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // Upstream sends a bookmark about 2 s before a watch's timeout, and about every minute.
    // kube asks for bookmarks (allowWatchBookmarks=true) unless told not to.
    let params = WatchParams::default().timeout(10);
    let stream = api.watch(&params, &start).await.expect("watch");
    let bookmark = Box::pin(stream.try_filter_map(|e| async move {
        Ok(if let WatchEvent::Bookmark(b) = e {
            Some(b)
        } else {
            None
        })
    }))
    .next()
    .await
    .expect("a bookmark before the watch ends")
    .expect("a well-formed bookmark");
    let version: u64 = bookmark
        .metadata
        .resource_version
        .parse()
        .expect("bookmarks carry a resourceVersion");
    assert!(
        version >= start.parse::<u64>().unwrap(),
        "a bookmark never goes back in time"
    );
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn bad_requests_get_status_errors_and_the_server_keeps_serving() {
    let ns = cluster().namespace("badinput").await;
    let base = format!("/api/v1/namespaces/{}/configmaps", ns.name());
    Api::<ConfigMap>::namespaced(cluster().admin().await, ns.name())
        .create(&PostParams::default(), &cm("c", json!({})))
        .await
        .unwrap();
    let cases: Vec<(&str, String, &str, Vec<u8>, u16)> = vec![
        (
            "GET",
            format!("{base}?labelSelector=a%20in%20b"),
            "application/json",
            vec![],
            400,
        ),
        (
            "GET",
            format!("{base}?fieldSelector=spec.bogus%3Dx"),
            "application/json",
            vec![],
            400,
        ),
        (
            "GET",
            format!("{base}?watch=true&resourceVersion=abc"),
            "application/json",
            vec![],
            400,
        ),
        (
            "PATCH",
            format!("{base}/c"),
            "application/json-patch+json",
            br#"[{"op":"frobnicate"}]"#.to_vec(),
            400,
        ),
        (
            "PATCH",
            format!("{base}/c"),
            "application/json-patch+json",
            br#"[{"op":"test","path":"/data/k","value":"other"}]"#.to_vec(),
            422,
        ),
        (
            "PATCH",
            format!("{base}/c"),
            "application/merge-patch+json",
            b"[1,2]".to_vec(),
            400,
        ),
        (
            "PUT",
            format!("{base}/c"),
            "application/json",
            br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"other"}}"#.to_vec(),
            400,
        ),
        (
            "POST",
            base.clone(),
            "application/json",
            br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"}}"#.to_vec(),
            400,
        ),
        (
            "POST",
            base.clone(),
            "application/json",
            br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"},"data":"not-a-map"}"#
                .to_vec(),
            400,
        ),
        (
            "DELETE",
            format!("{base}/missing"),
            "application/json",
            vec![],
            404,
        ),
    ];
    for (method, path, content_type, body, want) in cases {
        let (code, status) = raw(method, &path, content_type, body).await;
        assert_eq!(code, want, "{method} {path}: {status}");
        assert_eq!(
            text(&status, "/kind"),
            "Status",
            "{method} {path} answers with a Status: {status}"
        );
    }
    let (code, version) = raw("GET", "/version", "application/json", vec![]).await;
    assert_eq!(code, 200, "the server still serves: {version}");
    let unchanged = Api::<ConfigMap>::namespaced(cluster().admin().await, ns.name())
        .get("c")
        .await
        .unwrap();
    assert_eq!(
        unchanged.data.unwrap()["k"],
        "v",
        "failed patches changed nothing"
    );
}

#[tokio::test]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo test -p tug-tests --test cluster -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn services_created_at_once_get_distinct_addresses_and_keep_them_when_changed() {
    use k8s_openapi::api::core::v1::Service;
    let ns = cluster().namespace("alloc").await;
    let services: Api<Service> = Api::namespaced(cluster().admin().await, ns.name());
    let service = |name: String| -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"type": "NodePort",
            "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}]}}),
        )
        .unwrap()
    };
    // Forty at once, as a controller's workers create them.
    let created: Vec<Service> = futures::future::join_all((0..40).map(|i| {
        let services = services.clone();
        let object = service(format!("s{i}"));
        async move { services.create(&PostParams::default(), &object).await }
    }))
    .await
    .into_iter()
    .collect::<Result<_, _>>()
    .expect("every Service is created");
    let spec = |s: &Service| s.spec.clone().unwrap_or_default();
    let ips: std::collections::BTreeSet<String> =
        created.iter().filter_map(|s| spec(s).cluster_ip).collect();
    assert_eq!(ips.len(), 40, "one ClusterIP each: {ips:?}");
    let ports: std::collections::BTreeSet<i32> = created
        .iter()
        .flat_map(|s| spec(s).ports.unwrap_or_default())
        .filter_map(|p| p.node_port)
        .collect();
    assert_eq!(ports.len(), 80, "one NodePort per port: {ports:?}");

    // A change to a Service keeps what it was given.
    let before = spec(&created[0]);
    let patched = tokio::time::timeout(
        Duration::from_secs(10),
        services.patch(
            "s0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"changed": "yes"}}})),
        ),
    )
    .await
    .expect("a Service patch is answered")
    .expect("the Service is patched");
    assert_eq!(spec(&patched).cluster_ip, before.cluster_ip);
    assert_eq!(spec(&patched).ports, before.ports);

    // An address another Service holds is refused, naming why.
    let mut taken = service("taken".into());
    taken.spec.as_mut().unwrap().cluster_ip = before.cluster_ip.clone();
    match services.create(&PostParams::default(), &taken).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
            assert!(
                status.message.contains("already allocated"),
                "{}",
                status.message
            );
        }
        other => panic!("a taken ClusterIP is refused: {other:?}"),
    }
}
