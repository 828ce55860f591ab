//! containerd tier with the cluster tier: the kubelet API on its secure port, as the API server
//! (for `kubectl logs`) and monitoring reach it. Anonymous requests are refused (401), a client
//! the cluster does not authorize for the Node's subresource is refused (403), and the cluster
//! admin reads `/pods` and a container's logs with upstream's options.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tug_tests::cluster::cluster;
use tug_tests::kubelet::TugKubelet;
use tug_tests::shim::TugShim;
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

/// A client identity for curl: a certificate and key, or a bearer token.
enum Identity {
    Anonymous,
    Token(String),
    Certificate { cert: String, key: String },
}

/// The identity in a kubeconfig (its first user), with any files written under `dir`.
fn identity(kubeconfig: &str, dir: &Path, label: &str) -> Identity {
    let config: serde_yaml::Value = serde_yaml::from_str(kubeconfig).expect("kubeconfig YAML");
    let user = &config["users"][0]["user"];
    if let Some(token) = user["token"].as_str() {
        return Identity::Token(token.to_owned());
    }
    let decode = |key: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(
                user[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("{key} in the kubeconfig")),
            )
            .expect("base64")
    };
    let (cert, key) = (
        dir.join(format!("{label}.crt")),
        dir.join(format!("{label}.key")),
    );
    std::fs::write(&cert, decode("client-certificate-data")).unwrap();
    std::fs::write(&key, decode("client-key-data")).unwrap();
    Identity::Certificate {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
    }
}

/// One HTTPS GET to the kubelet API: status code and body.
fn get(port: u16, path: &str, who: &Identity) -> (u16, String) {
    let mut args = vec![
        "-sk".to_owned(),
        "--max-time".into(),
        if path.contains("follow=true") {
            "6"
        } else {
            "10"
        }
        .into(),
        "-w".into(),
        "\n%{http_code}".into(),
    ];
    match who {
        Identity::Anonymous => {}
        Identity::Token(token) => {
            args.extend(["-H".into(), format!("Authorization: Bearer {token}")]);
        }
        Identity::Certificate { cert, key } => {
            args.extend(["--cert".into(), cert.clone(), "--key".into(), key.clone()]);
        }
    }
    args.push(format!("https://127.0.0.1:{port}{path}"));
    let out = Command::new("curl").args(&args).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_api -- --ignored"]
async fn the_kubelet_api_serves_only_whom_the_cluster_authorizes() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let shim = TugShim::start("kubelet-api", "10.254.14.0/24").await;
    let kubelet = TugKubelet::start("tug-api", &shim.socket, "192.0.2.24").await;
    let namespace = cluster().namespace("kubelet-api").await;
    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, namespace.name());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "talker"},
        "spec": {
            "nodeName": kubelet.name,
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "talk",
                "image": substrate.registry_image("busybox"),
                "command": ["sh", "-c", "for i in 1 2 3 4; do echo line $i; done; echo last; sleep 3600"],
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let dir = tempfile::tempdir().unwrap();
    let admin = identity(
        &std::fs::read_to_string(cluster().admin_kubeconfig_path()).unwrap(),
        dir.path(),
        "admin",
    );
    let logs = format!("/containerLogs/{}/talker/talk", namespace.name());
    let text = tug_tests::eventually::eventually(
        "the container's logs through the kubelet API",
        Duration::from_secs(60),
        || {
            let (port, logs, admin) = (kubelet.api_port, logs.clone(), &admin);
            async move {
                let (code, body) = get(port, &logs, admin);
                (code == 200 && body.contains("last")).then_some(body)
            }
        },
    )
    .await;
    assert_eq!(text, "line 1\nline 2\nline 3\nline 4\nlast\n");
    let (code, tail) = get(kubelet.api_port, &format!("{logs}?tailLines=2"), &admin);
    assert_eq!((code, tail.as_str()), (200, "line 4\nlast\n"));
    let (code, stamped) = get(
        kubelet.api_port,
        &format!("{logs}?timestamps=true&limitBytes=40"),
        &admin,
    );
    assert_eq!(code, 200);
    let stamp = stamped.split(' ').next().unwrap();
    assert!(stamp.parse::<jiff::Timestamp>().is_ok(), "{stamped:?}");
    let (code, body) = get(kubelet.api_port, &format!("{logs}?tailLines=x"), &admin);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("tailLines"), "{body}");
    let (code, body) = get(
        kubelet.api_port,
        &format!("/containerLogs/{}/talker/nope", namespace.name()),
        &admin,
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("nope"), "{body}");
    let (code, body) = get(kubelet.api_port, "/pods", &admin);
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("a PodList");
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["metadata"]["name"] == "talker"),
        "{body}"
    );
    // exec through the kubelet, over TLS with the admin's certificate, verifying the kubelet's
    // serving certificate for its node name: the path `kubectl exec` takes from the API server.
    let Identity::Certificate { cert, key } = &admin else {
        panic!("the test cluster's admin authenticates with a certificate");
    };
    let serving = kubelet.root_dir.join("pki/kubelet.crt");
    let conn = tug_tests::streaming::tls(
        &format!("127.0.0.1:{}", kubelet.api_port),
        &kubelet.name,
        &std::fs::read(&serving).expect("the kubelet's serving certificate"),
        &std::fs::read(cert).unwrap(),
        &std::fs::read(key).unwrap(),
    )
    .await
    .expect("TLS to the kubelet API, its certificate valid for the node name");
    let exec = format!(
        "/exec/{}/talker/talk?command=sh&command=-c&command=tr%20a-z%20A-Z%3B%20exit%204&stdin=1&stdout=1&stderr=1",
        namespace.name()
    );
    let out = tug_tests::streaming::exec_over(
        conn,
        &kubelet.name,
        &exec,
        Some(b"through the kubelet\n"),
        false,
    )
    .await
    .expect("exec through the kubelet API");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "THROUGH THE KUBELET\n"
    );
    assert_eq!(out.exit, Ok(4));
    // The same exec over WebSocket (v5.channel.k8s.io, what kubectl speaks since 1.30): stdin
    // closed with v5's close signal, stderr on its own channel, the exit code in the status.
    let conn = tug_tests::streaming::tls(
        &format!("127.0.0.1:{}", kubelet.api_port),
        &kubelet.name,
        &std::fs::read(&serving).unwrap(),
        &std::fs::read(cert).unwrap(),
        &std::fs::read(key).unwrap(),
    )
    .await
    .unwrap();
    let exec = format!(
        "/exec/{}/talker/talk?command=sh&command=-c&command=tr%20a-z%20A-Z%3B%20echo%20oops%20%3E%262%3B%20exit%205&stdin=1&stdout=1&stderr=1",
        namespace.name()
    );
    let out =
        tug_tests::streaming::exec_websocket(conn, &kubelet.name, &exec, Some(b"over websocket\n"))
            .await
            .expect("exec over WebSocket through the kubelet API");
    assert_eq!(out.protocol, "v5.channel.k8s.io");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OVER WEBSOCKET\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.exit, Ok(5));
    // follow: what is there, then what the container writes next (here: an exec writing to
    // its main process's stdout), for as long as the request lasts.
    let follow = {
        let (port, path) = (kubelet.api_port, format!("{logs}?follow=true&tailLines=1"));
        let who = match &admin {
            Identity::Certificate { cert, key } => Identity::Certificate {
                cert: cert.clone(),
                key: key.clone(),
            },
            Identity::Token(t) => Identity::Token(t.clone()),
            Identity::Anonymous => Identity::Anonymous,
        };
        tokio::task::spawn_blocking(move || get(port, &path, &who))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let conn = tug_tests::streaming::tls(
        &format!("127.0.0.1:{}", kubelet.api_port),
        &kubelet.name,
        &std::fs::read(&serving).unwrap(),
        &std::fs::read(cert).unwrap(),
        &std::fs::read(key).unwrap(),
    )
    .await
    .unwrap();
    let append = format!(
        "/exec/{}/talker/talk?command=sh&command=-c&command=echo%20appended%20%3E%20%2Fproc%2F1%2Ffd%2F1&stdout=1&stderr=1",
        namespace.name()
    );
    let out = tug_tests::streaming::exec_over(conn, &kubelet.name, &append, None, false)
        .await
        .expect("exec that writes to the container's stdout");
    assert_eq!(out.exit, Ok(0), "{out:?}");
    let (_, followed) = follow.await.unwrap();
    assert_eq!(followed, "last\nappended\n");
    let (code, body) = get(
        kubelet.api_port,
        &format!(
            "/exec/{}/talker/nope?command=true&stdout=1",
            namespace.name()
        ),
        &admin,
    );
    assert_eq!(code, 404, "{body}");
    // No credentials: 401, whatever the path.
    for path in ["/pods", "/healthz", logs.as_str()] {
        let (code, body) = get(kubelet.api_port, path, &Identity::Anonymous);
        assert_eq!(code, 401, "{path}: {body}");
    }
    // A node's own identity is not allowed to proxy into another node's kubelet.
    let other = cluster().node_kubeconfig("tug-api-other-node").await;
    let node = identity(&other, dir.path(), "node");
    let (code, body) = get(kubelet.api_port, &logs, &node);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("Forbidden") && body.contains("proxy"),
        "{body}"
    );
    let _ = pods.delete("talker", &Default::default()).await;
}

/// The value of the first sample of `metric` whose labels include all of `labels`.
fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| {
            let rest = &l[metric.len()..];
            let value = rest.rsplit_once('}').map_or(rest, |(_, v)| v);
            value.split_whitespace().next()?.parse().ok()
        })
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_api -- --ignored"]
async fn the_kubelet_api_reports_stats_and_metrics() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let shim = TugShim::start("kubelet-stats", "10.254.15.0/24").await;
    let kubelet = TugKubelet::start("tug-stats", &shim.socket, "192.0.2.25").await;
    let namespace = cluster().namespace("kubelet-stats").await;
    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, namespace.name());
    // Some CPU time, a MiB in an emptyDir, then idle; probed for readiness every second.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "measured"},
        "spec": {
            "nodeName": kubelet.name,
            "automountServiceAccountToken": false,
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [{
                "name": "work",
                "image": substrate.registry_image("busybox"),
                "command": ["sh", "-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; dd if=/dev/zero of=/scratch/blob bs=1024 count=1024; touch /scratch/done; sleep 3600"],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                "readinessProbe": {"exec": {"command": ["test", "-e", "/scratch/done"]}, "periodSeconds": 1},
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let dir = tempfile::tempdir().unwrap();
    let admin = identity(
        &std::fs::read_to_string(cluster().admin_kubeconfig_path()).unwrap(),
        dir.path(),
        "admin",
    );
    let ns = namespace.name().to_owned();
    // Ready means the CPU was spent and the MiB written.
    tug_tests::eventually::eventually("the pod ready", Duration::from_secs(90), || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("measured").await.ok()?;
            pod.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        }
    })
    .await;
    let summary = |admin: &Identity| {
        let (code, body) = get(kubelet.api_port, "/stats/summary", admin);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("the summary is JSON")
    };
    let first = summary(&admin);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = summary(&admin);
    let node = &second["node"];
    assert_eq!(node["nodeName"], kubelet.name.as_str());
    assert!(
        node["cpu"]["usageCoreNanoSeconds"].as_u64().unwrap()
            > first["node"]["cpu"]["usageCoreNanoSeconds"]
                .as_u64()
                .unwrap(),
        "{node}"
    );
    assert!(
        node["cpu"]["usageNanoCores"].as_u64().is_some(),
        "a rate once there are two samples: {node}"
    );
    let capacity = node["fs"]["capacityBytes"].as_u64().unwrap();
    assert!(
        capacity > 0 && node["fs"]["availableBytes"].as_u64().unwrap() <= capacity,
        "{node}"
    );
    let memory = &node["memory"];
    assert!(memory["workingSetBytes"].as_u64().unwrap() > 0, "{node}");
    assert!(
        node["rlimit"]["maxpid"].as_u64().unwrap() > node["rlimit"]["curproc"].as_u64().unwrap(),
        "{node}"
    );
    let pod = second["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["podRef"]["name"] == "measured" && p["podRef"]["namespace"] == ns.as_str())
        .unwrap_or_else(|| panic!("the pod in the summary: {second}"));
    let work = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "work")
        .unwrap_or_else(|| panic!("the container in the summary: {pod}"));
    let cpu_ns = work["cpu"]["usageCoreNanoSeconds"].as_u64().unwrap();
    assert!(cpu_ns > 10_000_000, "the loop took CPU time: {work}");
    assert!(
        work["memory"]["workingSetBytes"].as_u64().unwrap() > 0,
        "{work}"
    );
    assert!(
        work["startTime"]
            .as_str()
            .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()),
        "{work}"
    );
    let scratch = pod["volume"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "scratch")
        .unwrap_or_else(|| panic!("the emptyDir in the summary: {pod}"));
    assert!(
        scratch["usedBytes"].as_u64().unwrap() >= 1 << 20,
        "{scratch}"
    );
    assert!(
        pod["ephemeral-storage"]["usedBytes"].as_u64().unwrap() >= 1 << 20,
        "{pod}"
    );

    // What metrics-server scrapes.
    let (code, resource) = get(kubelet.api_port, "/metrics/resource", &admin);
    assert_eq!(code, 200, "{resource}");
    let labels = [
        r#"container="work""#,
        &format!(r#"namespace="{ns}""#),
        r#"pod="measured""#,
    ];
    let seconds = sample(&resource, "container_cpu_usage_seconds_total", &labels)
        .unwrap_or_else(|| panic!("the container's CPU in /metrics/resource: {resource}"));
    assert!(seconds >= cpu_ns as f64 / 1e9, "{resource}");
    assert!(
        sample(&resource, "node_memory_working_set_bytes", &[]).unwrap() > 0.0,
        "{resource}"
    );
    assert!(
        sample(&resource, "pod_memory_working_set_bytes", &labels[1..]).unwrap() > 0.0,
        "{resource}"
    );

    // The kubelet's own metrics.
    let (code, metrics) = get(kubelet.api_port, "/metrics", &admin);
    assert_eq!(code, 200, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "kubelet_node_name",
            &[&format!(r#"node="{}""#, kubelet.name)]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "kubelet_running_pods", &[]).unwrap() >= 1.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "kubelet_running_containers",
            &[r#"container_state="running""#]
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "kubelet_runtime_operations_total",
            &[r#"operation_type="run_podsandbox""#]
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "kubelet_started_containers_total",
            &[r#"container_type="container""#]
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "kubelet_pod_start_duration_seconds_count", &[]).unwrap() >= 1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE kubelet_runtime_operations_duration_seconds histogram"),
        "{metrics}"
    );

    // Probe results, by pod and result.
    let (code, probes) = get(kubelet.api_port, "/metrics/probes", &admin);
    assert_eq!(code, 200, "{probes}");
    let probe = [
        r#"probe_type="Readiness""#,
        r#"container="work""#,
        r#"pod="measured""#,
        &format!(r#"namespace="{ns}""#),
    ];
    let passed = [&probe[..], &[r#"result="successful""#]].concat();
    assert!(
        sample(&probes, "prober_probe_total", &passed).unwrap_or(0.0) >= 1.0,
        "{probes}"
    );

    // Stats and metrics are the Node's stats and metrics subresources: no credentials, no data.
    for path in [
        "/stats/summary",
        "/metrics",
        "/metrics/probes",
        "/metrics/resource",
        "/spec",
    ] {
        let (code, body) = get(kubelet.api_port, path, &Identity::Anonymous);
        assert_eq!(code, 401, "{path}: {body}");
    }
    let _ = pods.delete("measured", &Default::default()).await;
}

/// A self-signed serving certificate for `node` (and its test IP) that is about to expire:
/// issued 58 minutes ago, valid for 2 more.
fn expiring_serving_cert(node: &str) -> Vec<(String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![node.to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("192.0.2.27".parse().unwrap()));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(58);
    params.not_after = now + time::Duration::minutes(2);
    let cert = params.self_signed(&key).unwrap();
    let pem = format!("{}{}", cert.pem(), key.serialize_pem());
    vec![
        ("kubelet-server-seed.pem".into(), pem.clone().into_bytes()),
        ("kubelet-server-current.pem".into(), pem.into_bytes()),
    ]
}

/// The serving CSR the kubelet `node` created, once there is one not yet approved.
async fn pending_serving_csr(node: &str) -> String {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    let csrs: Api<CertificateSigningRequest> = Api::all(cluster().admin().await);
    let user = format!("system:node:{node}");
    tug_tests::eventually::eventually("the kubelet's serving CSR", Duration::from_secs(60), || {
        let (csrs, user) = (csrs.clone(), user.clone());
        async move {
            csrs.list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|c| {
                    c.spec.signer_name == "kubernetes.io/kubelet-serving"
                        && c.spec.username.as_deref() == Some(user.as_str())
                        && c.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_none()
                })
                .and_then(|c| c.metadata.name)
        }
    })
    .await
}

/// Approves a CSR as an operator does (`kubectl certificate approve`).
async fn approve(name: &str) {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    let csrs: Api<CertificateSigningRequest> = Api::all(cluster().admin().await);
    csrs.patch_approval(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"status": {"conditions": [{
            "type": "Approved", "status": "True", "reason": "TugTest",
            "message": "approved by the kubelet API test"}]}})),
    )
    .await
    .expect("approve the CSR");
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_api -- --ignored"]
async fn the_serving_certificate_is_issued_by_the_cluster_and_rotated() {
    use tug_tests::kubelet::Options;
    require(Tier::Containerd);
    let shim = TugShim::start("kubelet-serving", "10.254.16.0/24").await;
    let dir = tempfile::tempdir().unwrap();
    let Identity::Certificate { cert, key } = identity(
        &std::fs::read_to_string(cluster().admin_kubeconfig_path()).unwrap(),
        dir.path(),
        "admin",
    ) else {
        panic!("the test cluster's admin authenticates with a certificate");
    };
    let (cert, key) = (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
    let ca = cluster().ca_pem().as_bytes().to_vec();
    let handshake = |port: u16, name: String, trust: Vec<u8>| {
        let (cert, key) = (cert.clone(), key.clone());
        async move {
            tug_tests::streaming::tls(&format!("127.0.0.1:{port}"), &name, &trust, &cert, &key)
                .await
                .map(|_| ())
        }
    };

    // No certificate yet: the API refuses every handshake until the cluster issues one.
    let kubelet = TugKubelet::start_with(
        "tug-serving",
        &shim.socket,
        "192.0.2.26",
        Options {
            config: "serverTLSBootstrap: true\n".into(),
            ..Default::default()
        },
    )
    .await;
    let csr = pending_serving_csr(&kubelet.name).await;
    assert!(
        handshake(kubelet.api_port, kubelet.name.clone(), ca.clone())
            .await
            .is_err(),
        "the kubelet API served before its serving certificate was issued"
    );
    assert!(
        !kubelet.root_dir.join("pki/kubelet.crt").exists(),
        "no self-signed certificate with serverTLSBootstrap"
    );
    approve(&csr).await;
    for server_name in [kubelet.name.clone(), "192.0.2.26".to_owned()] {
        let port = kubelet.api_port;
        let handshake = &handshake;
        let ca = ca.clone();
        tug_tests::eventually::eventually(
            "a handshake verified by the cluster CA for the node's name and IP",
            Duration::from_secs(30),
            || {
                let (server_name, ca) = (server_name.clone(), ca.clone());
                async move { handshake(port, server_name, ca).await.ok() }
            },
        )
        .await;
    }
    let current = kubelet.root_dir.join("pki/kubelet-server-current.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&current).unwrap().permissions().mode() & 0o777,
        0o600,
        "the serving key is private"
    );
    drop(kubelet);

    // A certificate near the end of its life is served until its successor is issued.
    let kubelet = TugKubelet::start_with(
        "tug-rotate",
        &shim.socket,
        "192.0.2.27",
        Options {
            config: "serverTLSBootstrap: true\n".into(),
            pki: Some(expiring_serving_cert),
            ..Default::default()
        },
    )
    .await;
    let seed = std::fs::read(kubelet.root_dir.join("pki/kubelet-server-seed.pem")).unwrap();
    let csr = pending_serving_csr(&kubelet.name).await;
    handshake(kubelet.api_port, kubelet.name.clone(), seed.clone())
        .await
        .expect("the expiring certificate is still served while its successor is pending");
    approve(&csr).await;
    let port = kubelet.api_port;
    let name = kubelet.name.clone();
    tug_tests::eventually::eventually(
        "the rotated certificate, from the cluster CA",
        Duration::from_secs(30),
        || {
            let (handshake, name, ca) = (&handshake, name.clone(), ca.clone());
            async move { handshake(port, name, ca).await.ok() }
        },
    )
    .await;
    assert!(
        handshake(kubelet.api_port, kubelet.name.clone(), seed)
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
    let (code, metrics) = {
        let port = kubelet.api_port;
        let who = identity(
            &std::fs::read_to_string(cluster().admin_kubeconfig_path()).unwrap(),
            dir.path(),
            "admin2",
        );
        tokio::task::spawn_blocking(move || get(port, "/metrics", &who))
            .await
            .unwrap()
    };
    assert_eq!(code, 200, "{metrics}");
    let ttl = sample(
        &metrics,
        "kubelet_certificate_manager_server_ttl_seconds",
        &[],
    );
    assert!(
        ttl.is_some_and(|t| t > 3600.0),
        "the TTL of the issued certificate: {metrics}"
    );
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_api -- --ignored"]
async fn the_client_certificate_is_renewed_before_it_expires_and_the_node_goes_on_with_it() {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    use k8s_openapi::api::coordination::v1::Lease;
    use tug_kubelet::rotation::facts;
    use tug_tests::eventually::eventually;
    use tug_tests::kubelet::Options;
    require(Tier::Containerd);
    let shim = TugShim::start("kubelet-client-rotation", "10.254.18.0/24").await;
    // The node starts with a client certificate of 600 s, the shortest a signer issues, and
    // its clock 570 s ahead of the cluster's: more than 90 % of that certificate's life has
    // passed for the kubelet, so its renewal is due at once.
    let kubelet = TugKubelet::start_with(
        "tug-rotate",
        &shim.socket,
        "192.0.2.27",
        Options {
            config: "rotateCertificates: true\n".into(),
            client_cert_seconds: Some(600),
            faketime: Some("+570"),
            ..Default::default()
        },
    )
    .await;
    let pki = kubelet.root_dir.join("pki");
    let current = pki.join("kubelet-client-current.pem");
    // The pairs in the cert dir, the one expiring first first: the one the node started with,
    // then the renewal.
    let pairs = || {
        let mut pairs: Vec<_> = std::fs::read_dir(&pki)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("kubelet-client-2") && name.ends_with(".pem")
            })
            .filter_map(|p| Some((facts(&std::fs::read(&p).ok()?).ok()?, p)))
            .collect();
        pairs.sort_by_key(|(facts, _)| facts.not_after);
        pairs
    };
    let ((first, first_file), (renewed, renewed_file)) = eventually(
        "the kubelet to renew its client certificate",
        Duration::from_secs(60),
        || {
            let (pairs, current) = (pairs(), current.clone());
            async move {
                let [first, renewed] = <[_; 2]>::try_from(pairs).ok()?;
                (std::fs::read_link(&current).ok()? == renewed.1).then_some((first, renewed))
            }
        },
    )
    .await;
    assert!(
        first.not_after - first.not_before <= 900,
        "the node did not start with the short certificate: {first:?}"
    );
    assert!(
        renewed.not_after > first.not_after + 3600,
        "the renewed certificate is not the signer's full term: {renewed:?}"
    );
    let first_pem = std::fs::read_to_string(&first_file).unwrap();
    let renewed_pem = std::fs::read_to_string(&renewed_file).unwrap();
    let key = |pem: &str| pem[pem.find("-----BEGIN PRIVATE KEY").expect("a key")..].to_owned();
    assert_ne!(
        key(&renewed_pem),
        key(&first_pem),
        "a renewal makes a new key"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&renewed_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the key is readable by root only");

    // The node asked for it with its own identity, and the cluster approved it by itself.
    let admin = cluster().admin().await;
    let csrs: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let user = format!("system:node:{}", kubelet.name);
    let csr = csrs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|c| {
            c.spec.username.as_deref() == Some(user.as_str())
                && c.spec.signer_name == "kubernetes.io/kube-apiserver-client-kubelet"
        })
        .expect("a client CSR made by the node itself");
    let approved = csr
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Approved" && c.status == "True");
    assert!(approved, "the renewal CSR was not auto-approved");

    // The node goes on: its Lease keeps being renewed.
    let leases: Api<Lease> = Api::namespaced(admin, "kube-node-lease");
    let renew_time = |lease: Lease| lease.spec.and_then(|s| s.renew_time).map(|t| t.0);
    let before = renew_time(leases.get(&kubelet.name).await.unwrap());
    eventually(
        "the node's Lease renewed after the rotation",
        Duration::from_secs(40),
        || {
            let (leases, name, before) = (leases.clone(), kubelet.name.clone(), before);
            async move {
                let now = renew_time(leases.get(&name).await.ok()?);
                (now != before).then_some(())
            }
        },
    )
    .await;
}
