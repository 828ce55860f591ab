//! containerd tier with the cluster tier: `tug kubelet` running pods bound to its node, against
//! the API (the test API server, or a real cluster with `TUG_TEST_KUBECONFIG`). One suite, run
//! with tug shim and with containerd's own CRI as the runtime: a pod goes Pending → Running →
//! Ready with a pod IP from tug-cni; a crashing container backs off with growing delays; a
//! failing liveness probe restarts; readiness flips Ready; init containers run in order; a Job
//! pod ends Succeeded or Failed; a bad image reports ErrImagePull then ImagePullBackOff; a bad
//! spec fails only its pod; deletion runs preStop and is confirmed; a SIGKILLed kubelet comes
//! back without restarting anything.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use tug_tests::cluster::cluster;
use tug_tests::cri::install_tug_cni;
use tug_tests::eventually::eventually;
use tug_tests::kubelet::{Options, TugKubelet};
use tug_tests::shim::TugShim;
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

fn image(name: &str) -> String {
    Substrate::from_env().registry_image(name)
}

fn pod(name: &str, node: &str, spec: serde_json::Value) -> Pod {
    let mut spec = spec;
    spec["nodeName"] = json!(node);
    spec["automountServiceAccountToken"] = spec
        .get("automountServiceAccountToken")
        .cloned()
        .unwrap_or(json!(false));
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod JSON")
}

async fn wait_pod<T>(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Pod) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(Some(pod)) = pods.get_opt(name).await {
            if let Some(value) = check(&pod) {
                return value;
            }
            last = pod.status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for pod {name}: {what}; its last status: {}",
            serde_json::to_string_pretty(&last).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a ContainerStatus> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
}

fn terminated(pod: &Pod, name: &str) -> ContainerStateTerminated {
    container(pod, name)
        .and_then(|c| c.state.clone()?.terminated)
        .unwrap_or_else(|| panic!("container {name} has not terminated"))
}

async fn wait_phase(pods: &Api<Pod>, name: &str, phase_wanted: &str) -> Pod {
    wait_pod(pods, name, phase_wanted, Duration::from_secs(60), |p| {
        (phase(p) == Some(phase_wanted)).then(|| p.clone())
    })
    .await
}

/// Creates pod `late` on `node` and waits for the kubelet to refuse it, as it refuses new pods
/// while the node is under `pressure`, without ever running it.
async fn refused_under(pods: &Api<Pod>, node: &str, pressure: &str) {
    pods.create(
        &PostParams::default(),
        &pod("late", node, json!({"containers": [{"name": "app", "image": image("busybox"), "command": ["sleep", "3600"]}]})),
    )
    .await
    .unwrap();
    let late = wait_phase(pods, "late", "Failed").await;
    let status = late.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("Evicted"));
    assert_eq!(
        status.message.as_deref(),
        Some(format!("The node had condition: [{pressure}]. ").as_str())
    );
    assert!(
        status
            .container_statuses
            .iter()
            .flatten()
            .all(|c| c.state.as_ref().is_none_or(|s| s.running.is_none())),
        "a refused pod never runs"
    );
}

fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

fn waiting_reason(pod: &Pod, name: &str) -> Option<String> {
    container(pod, name)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

async fn suite(kubelet: &mut TugKubelet, cidr_prefix: &str, runtime_name: &str) {
    let namespace = cluster().namespace("kubelet-pods").await;
    let admin = cluster().admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace.name());
    let node = kubelet.name.clone();
    let create = |pod: Pod| {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &pod)
                .await
                .expect("create pod")
        }
    };
    let host_dir = tempfile::tempdir().expect("host dir");

    // A Service the pods get link variables for.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(admin.clone(), namespace.name());
    let links_db = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "links-db"},
                "spec": {"ports": [{"name": "sql", "port": 5432, "targetPort": 5432}]}}))
            .unwrap(),
        )
        .await
        .expect("create Service links-db");
    let links_db_ip = links_db
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a cluster IP for links-db");

    // Content volumes: a ConfigMap the test changes later, a Secret with a restrictive mode.
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(admin.clone(), namespace.name());
    maps.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "greeting"}, "data": {"greeting": "v1"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(admin.clone(), namespace.name());
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    create(pod("config", &node, json!({"terminationGracePeriodSeconds": 1,
        "volumes": [{"name": "config", "configMap": {"name": "greeting"}}],
        "containers": [{"name": "app", "image": image("busybox"), "command": ["sleep", "3600"],
            "volumeMounts": [{"name": "config", "mountPath": "/config"}],
            "readinessProbe": {"exec": {"command": ["grep", "-q", "v2", "/config/greeting"]}, "periodSeconds": 1}}]}))).await;
    create(pod("secret-mode", &node, json!({"restartPolicy": "Never",
        "volumes": [{"name": "creds", "secret": {"secretName": "creds", "defaultMode": 256}}],
        "containers": [{"name": "app", "image": image("busybox"),
            "command": ["sh", "-c", "stat -L -c %a /creds/password > /dev/termination-log; grep ' /creds ' /proc/mounts | cut -d' ' -f3 >> /dev/termination-log; cat /creds/password >> /dev/termination-log"],
            "volumeMounts": [{"name": "creds", "mountPath": "/creds", "readOnly": true}]}]}))).await;

    // A PersistentVolume on a host directory, bound to the claim "data" (pre-bound, as an
    // operator binds a local volume; the claim's status says Bound as the PV controller
    // would write it), a read-only use of it, and a claim that is bound to nothing.
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(admin.clone(), namespace.name());
    let volumes: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(admin.clone());
    let volume_name = format!("{}-data", namespace.name());
    let volume_dir = tempfile::tempdir().expect("volume dir");
    std::fs::write(volume_dir.path().join("seed"), "from the volume").unwrap();
    let claim = claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": volume_name,
                "resources": {"requests": {"storage": "1Gi"}}}}))
            .unwrap(),
        )
        .await
        .expect("create PVC data");
    volumes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": volume_name}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "", "capacity": {"storage": "1Gi"},
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": volume_dir.path(), "type": "Directory"},
                "claimRef": {"namespace": namespace.name(), "name": "data", "uid": claim.metadata.uid}}}))
            .unwrap(),
        )
        .await
        .expect("create PV");
    if claim.status.and_then(|s| s.phase).as_deref() != Some("Bound") {
        let _ = claims
            .patch_status(
                "data",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"status": {"phase": "Bound",
                    "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"}}})),
            )
            .await;
    }
    claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "loose"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                "resources": {"requests": {"storage": "1Gi"}}}}))
            .unwrap(),
        )
        .await
        .expect("create PVC loose");
    create(pod("claim", &node, json!({"restartPolicy": "Never",
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        "containers": [{"name": "app", "image": image("busybox"),
            "command": ["sh", "-c", "cat /data/seed > /dev/termination-log; echo written-by-pod > /data/out"],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}))).await;
    create(pod("claim-ro", &node, json!({"restartPolicy": "Never",
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": true}}],
        "containers": [{"name": "app", "image": image("busybox"),
            "command": ["sh", "-c", "cat /data/seed; touch /data/forbidden"],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}))).await;
    create(pod(
        "claim-unbound",
        &node,
        json!({
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "loose"}}],
        "containers": [{"name": "app", "image": image("busybox"), "command": ["sleep", "3600"],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}),
    ))
    .await;

    // A web server with probes, a crash loop, a liveness failure, a readiness flip, init
    // containers feeding the app through an emptyDir, two Job-style pods, a bad image, a bad
    // spec, and one with a preStop hook — all at once, as a node gets them.
    create(pod(
        "web",
        &node,
        json!({"containers": [{"name": "web", "image": image("http"),
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
        "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 2}}]}),
    ))
    .await;
    create(pod(
        "crash",
        &node,
        json!({"containers": [{"name": "crash", "image": image("exit"), "args": ["1"]}]}),
    ))
    .await;
    create(pod("liveness", &node, json!({"containers": [{"name": "app", "image": image("busybox"),
        "command": ["sleep", "3600"],
        "livenessProbe": {"exec": {"command": ["cat", "/tmp/alive"]}, "periodSeconds": 1, "failureThreshold": 2}}],
        "terminationGracePeriodSeconds": 2}))).await;
    create(pod("readiness", &node, json!({"containers": [{"name": "app", "image": image("busybox"),
        "command": ["sleep", "3600"],
        "volumeMounts": [{"name": "host", "mountPath": "/host"}],
        "readinessProbe": {"exec": {"command": ["test", "-f", "/host/ready"]}, "periodSeconds": 1}}],
        "volumes": [{"name": "host", "hostPath": {"path": host_dir.path()}}],
        "terminationGracePeriodSeconds": 1}))).await;
    create(pod("init", &node, json!({"restartPolicy": "Never", "automountServiceAccountToken": true,
        "volumes": [{"name": "work", "emptyDir": {}}],
        "initContainers": [
            {"name": "first", "image": image("busybox"), "command": ["sh", "-c", "printf 1 >> /work/order"], "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
            {"name": "second", "image": image("busybox"), "command": ["sh", "-c", "printf 2 >> /work/order"], "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
        "containers": [{"name": "app", "image": image("busybox"),
            "command": ["sh", "-c", "cat /work/order > /dev/termination-log; echo \"$MY_POD_IP\" >> /dev/termination-log; cat /var/run/secrets/kubernetes.io/serviceaccount/namespace >> /dev/termination-log; test -s /var/run/secrets/kubernetes.io/serviceaccount/token && echo token >> /dev/termination-log; echo \"$LINKS_DB_SERVICE_HOST:$LINKS_DB_SERVICE_PORT_SQL $LINKS_DB_PORT\" >> /dev/termination-log"],
            "env": [{"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}]}]}))).await;
    create(pod("job-fails", &node, json!({"restartPolicy": "Never", "containers": [{"name": "job", "image": image("exit"), "args": ["3"]}]}))).await;
    create(pod(
        "bad-image",
        &node,
        json!({"containers": [{"name": "app", "image": image("does-not-exist")}]}),
    ))
    .await;
    create(pod("bad-spec", &node, json!({"containers": [{"name": "app", "image": image("busybox"), "command": ["sleep", "3600"],
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "missing-config", "key": "k"}}}]}]}))).await;
    create(pod("prestop", &node, json!({"terminationGracePeriodSeconds": 10,
        "volumes": [{"name": "host", "hostPath": {"path": host_dir.path(), "type": "Directory"}}],
        "containers": [{"name": "app", "image": image("busybox"), "command": ["sleep", "3600"],
            "volumeMounts": [{"name": "host", "mountPath": "/host"}],
            "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo stopped-gracefully > /host/prestop"]}},
                          "postStart": {"exec": {"command": ["sh", "-c", "echo started > /host/poststart"]}}}}]}))).await;

    // Pending → Running → Ready, with a pod IP from the runtime's network.
    let web = wait_pod(
        &pods,
        "web",
        "Running and Ready",
        Duration::from_secs(90),
        |p| {
            (phase(p) == Some("Running") && condition(p, "Ready").as_deref() == Some("True"))
                .then(|| p.clone())
        },
    )
    .await;
    let status = web.status.clone().unwrap();
    let ip = status.pod_ip.clone().unwrap();
    assert!(
        ip.starts_with(cidr_prefix),
        "pod IP {ip} is not from {cidr_prefix}*"
    );
    assert_eq!(status.host_ip.as_deref(), Some(kubelet.node_ip.as_str()));
    assert!(status.start_time.is_some());
    assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));
    for kind in [
        "PodScheduled",
        "PodReadyToStartContainers",
        "Initialized",
        "ContainersReady",
        "Ready",
    ] {
        assert_eq!(condition(&web, kind).as_deref(), Some("True"), "{kind}");
    }
    let c = container(&web, "web").unwrap();
    assert!(c.ready && c.started == Some(true) && c.restart_count == 0);
    assert!(
        c.container_id
            .as_deref()
            .unwrap()
            .starts_with(&format!("{runtime_name}://")),
        "{:?}",
        c.container_id
    );
    assert!(!c.image_id.is_empty());
    let body = tug_tests::http::get(&format!("{ip}:8080"), "/").expect("the pod answers on its IP");
    assert!(body.contains("tug-test http"), "{body}");
    let web_container = c.container_id.clone();

    // A container that exits 1 crash-loops with growing back-off.
    let first = wait_pod(
        &pods,
        "crash",
        "CrashLoopBackOff",
        Duration::from_secs(60),
        |p| {
            let c = container(p, "crash")?;
            let message = c.state.as_ref()?.waiting.as_ref()?.message.clone()?;
            (waiting_reason(p, "crash").as_deref() == Some("CrashLoopBackOff"))
                .then(|| (message, c.clone()))
        },
    )
    .await;
    assert!(
        first
            .0
            .starts_with("back-off 10s restarting failed container=crash"),
        "{}",
        first.0
    );
    let last = first
        .1
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
    let first_finished = last.finished_at.clone().expect("finishedAt").0;
    let second = wait_pod(
        &pods,
        "crash",
        "a longer back-off",
        Duration::from_secs(60),
        |p| {
            let c = container(p, "crash")?;
            let message = c.state.as_ref()?.waiting.as_ref()?.message.clone()?;
            message.starts_with("back-off 20s").then(|| c.clone())
        },
    )
    .await;
    // The restart after the 10 s back-off started (by the runtime's clock) no sooner than 10 s
    // after the crash before it (timestamps have whole seconds).
    let restarted = second
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap()
        .started_at
        .clone()
        .expect("startedAt")
        .0;
    let gap = restarted.duration_since(first_finished);
    assert!(
        gap >= jiff::SignedDuration::from_secs(9),
        "the second restart came {gap:?} after the crash before it"
    );
    assert!(second.restart_count >= 2);
    assert_eq!(
        wait_pod(&pods, "crash", "phase", Duration::from_secs(5), |p| phase(
            p
        )
        .map(str::to_owned))
        .await,
        "Running"
    );

    // A failing liveness probe restarts the container.
    let restarted = wait_pod(
        &pods,
        "liveness",
        "restarted by its liveness probe",
        Duration::from_secs(60),
        |p| {
            let c = container(p, "app")?;
            (c.restart_count >= 1).then(|| c.clone())
        },
    )
    .await;
    let killed = restarted.last_state.unwrap().terminated.unwrap();
    assert_ne!(killed.exit_code, 0);

    // Readiness flips Ready on, then off, as the probe's file comes and goes.
    wait_pod(
        &pods,
        "readiness",
        "Running but not Ready",
        Duration::from_secs(60),
        |p| {
            (phase(p) == Some("Running") && condition(p, "Ready").as_deref() == Some("False"))
                .then_some(())
        },
    )
    .await;
    std::fs::write(host_dir.path().join("ready"), "").unwrap();
    wait_pod(&pods, "readiness", "Ready", Duration::from_secs(30), |p| {
        (condition(p, "Ready").as_deref() == Some("True")).then_some(())
    })
    .await;
    std::fs::remove_file(host_dir.path().join("ready")).unwrap();
    wait_pod(
        &pods,
        "readiness",
        "not Ready once the probe fails",
        Duration::from_secs(30),
        |p| {
            (condition(p, "Ready").as_deref() == Some("False") && phase(p) == Some("Running"))
                .then_some(())
        },
    )
    .await;
    let readiness = pods.get("readiness").await.unwrap();
    assert_eq!(
        container(&readiness, "app").unwrap().restart_count,
        0,
        "readiness never restarts"
    );

    // Init containers ran in order; the app saw their work and its own pod IP; Succeeded.
    let init = wait_phase(&pods, "init", "Succeeded").await;
    let done = terminated(&init, "app");
    let message = done.message.unwrap_or_default();
    let init_ip = init
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .clone()
        .unwrap_or_default();
    // Init order, the downward env, the projected service-account volume (namespace file
    // and a TokenRequest token), and the Service's link variables.
    assert_eq!(
        message.trim(),
        format!(
            "12{init_ip}\n{}token\n{links_db_ip}:5432 tcp://{links_db_ip}:5432",
            namespace.name()
        ),
        "termination message"
    );
    assert_eq!(done.reason.as_deref(), Some("Completed"));
    for name in ["first", "second"] {
        let t = terminated(&init, name);
        assert_eq!(t.exit_code, 0, "{name}");
    }
    assert_eq!(condition(&init, "Initialized").as_deref(), Some("True"));

    // A Job-style pod that fails ends Failed, and is never restarted.
    let failed = wait_phase(&pods, "job-fails", "Failed").await;
    let t = terminated(&failed, "job");
    assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
    assert_eq!(container(&failed, "job").unwrap().restart_count, 0);

    // A bad image: ErrImagePull, then ImagePullBackOff.
    wait_pod(
        &pods,
        "bad-image",
        "ErrImagePull",
        Duration::from_secs(60),
        |p| (waiting_reason(p, "app").as_deref() == Some("ErrImagePull")).then_some(()),
    )
    .await;
    wait_pod(
        &pods,
        "bad-image",
        "ImagePullBackOff",
        Duration::from_secs(30),
        |p| (waiting_reason(p, "app").as_deref() == Some("ImagePullBackOff")).then_some(()),
    )
    .await;

    // A bad spec fails only that pod, with a message naming what is missing.
    let bad = wait_pod(
        &pods,
        "bad-spec",
        "CreateContainerConfigError",
        Duration::from_secs(60),
        |p| {
            (waiting_reason(p, "app").as_deref() == Some("CreateContainerConfigError"))
                .then(|| p.clone())
        },
    )
    .await;
    let message = container(&bad, "app")
        .unwrap()
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap_or_default();
    assert!(message.contains("missing-config"), "{message}");
    assert_eq!(phase(&bad), Some("Pending"));

    // A Secret is mounted on tmpfs with the requested mode (0400).
    let secret = wait_phase(&pods, "secret-mode", "Succeeded").await;
    let message = terminated(&secret, "app").message.unwrap_or_default();
    assert_eq!(
        message.split_whitespace().collect::<Vec<_>>(),
        ["400", "tmpfs", "hunter2"],
        "secret volume: {message}"
    );

    // The claimed volume: read and written through the claim, read-only where it says so,
    // and a claim bound to nothing fails only its own pod, naming the claim.
    let claimed = wait_phase(&pods, "claim", "Succeeded").await;
    assert_eq!(
        terminated(&claimed, "app").message.as_deref(),
        Some("from the volume")
    );
    assert_eq!(
        std::fs::read_to_string(volume_dir.path().join("out")).unwrap(),
        "written-by-pod\n"
    );
    let read_only = wait_phase(&pods, "claim-ro", "Failed").await;
    assert_ne!(terminated(&read_only, "app").exit_code, 0);
    assert!(!volume_dir.path().join("forbidden").exists());
    let unbound = wait_pod(
        &pods,
        "claim-unbound",
        "waiting on its unbound claim",
        Duration::from_secs(60),
        |p| {
            let waiting = container(p, "app")?.state.clone()?.waiting?;
            waiting
                .message
                .filter(|m| m.contains("loose") && m.contains("non-bound"))
                .map(|m| (waiting.reason, m))
        },
    )
    .await;
    assert_eq!(
        unbound.0.as_deref(),
        Some("CreateContainerConfigError"),
        "{unbound:?}"
    );

    // A ConfigMap update reaches the running pod (its readiness probe waits for the new value).
    wait_pod(
        &pods,
        "config",
        "Running, not yet Ready",
        Duration::from_secs(60),
        |p| {
            (phase(p) == Some("Running") && condition(p, "Ready").as_deref() == Some("False"))
                .then_some(())
        },
    )
    .await;
    let mut map = maps.get("greeting").await.unwrap();
    map.data = Some([("greeting".to_owned(), "v2".to_owned())].into());
    maps.replace("greeting", &PostParams::default(), &map)
        .await
        .unwrap();
    wait_pod(
        &pods,
        "config",
        "Ready after the ConfigMap changed",
        Duration::from_secs(30),
        |p| (condition(p, "Ready").as_deref() == Some("True")).then_some(()),
    )
    .await;
    assert_eq!(
        container(&pods.get("config").await.unwrap(), "app")
            .unwrap()
            .restart_count,
        0
    );

    // postStart ran; deletion runs preStop, and the pod leaves the API only when it is gone.
    wait_pod(&pods, "prestop", "Running", Duration::from_secs(60), |p| {
        (phase(p) == Some("Running")).then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(host_dir.path().join("poststart"))
            .unwrap_or_default()
            .trim(),
        "started"
    );
    pods.delete(
        "prestop",
        &DeleteParams {
            grace_period_seconds: Some(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually(
        "the deleted pod to be confirmed gone",
        Duration::from_secs(40),
        || {
            let pods = pods.clone();
            async move { pods.get_opt("prestop").await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(host_dir.path().join("prestop"))
            .unwrap_or_default()
            .trim(),
        "stopped-gracefully"
    );

    // SIGKILL the kubelet and start it again: nothing restarts, statuses stay.
    kubelet.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    kubelet.restart().await;
    // For a while after the restart, the web pod stays exactly as it was: same container, no
    // restart, and Ready throughout (not only once its first probe after the restart ran).
    let watch_until = Instant::now() + Duration::from_secs(8);
    let mut web = pods.get("web").await.unwrap();
    while Instant::now() < watch_until {
        web = pods.get("web").await.unwrap();
        let c = container(&web, "web").unwrap();
        assert_eq!(
            c.container_id, web_container,
            "the web container was replaced after a kubelet restart"
        );
        assert_eq!(c.restart_count, 0);
        assert!(
            c.ready,
            "the web container went unready across a kubelet restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(condition(&web, "Ready").as_deref(), Some("True"));

    // Cleanup through the kubelet: every pod deleted and confirmed.
    pods.delete_collection(
        &DeleteParams {
            grace_period_seconds: Some(1),
            ..Default::default()
        },
        &Default::default(),
    )
    .await
    .unwrap();
    eventually(
        "every pod of the suite to be gone",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                pods.list(&Default::default())
                    .await
                    .ok()?
                    .items
                    .is_empty()
                    .then_some(())
            }
        },
    )
    .await;
    // The volume's data outlives the pods; the PV is the test's to delete.
    assert!(volume_dir.path().join("out").exists());
    let _ = volumes.delete(&volume_name, &DeleteParams::default()).await;
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_pods -- --ignored"]
async fn pods_run_on_tug_shim() {
    require(Tier::Containerd);
    let shim = TugShim::start("kubelet-pods", "10.254.10.0/24").await;
    let mut kubelet = TugKubelet::start("tug-pods", &shim.socket, "192.0.2.21").await;
    Box::pin(suite(&mut kubelet, "10.254.10.", "tug")).await;
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_pods -- --ignored"]
async fn the_same_pods_run_on_containerds_own_cri() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let _cni = install_tug_cni(&substrate, "10.254.11.0/24");
    let mut kubelet = TugKubelet::start(
        "cri-pods",
        Path::new(&substrate.containerd_sock),
        "192.0.2.22",
    )
    .await;
    Box::pin(suite(&mut kubelet, "10.254.11.", "containerd")).await;
}

fn manifest(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: kube-system\nspec:\n  containers:\n  - name: web\n    image: {}\n    readinessProbe:\n      httpGet: {{path: /healthz, port: 8080}}\n      periodSeconds: 1\n",
        image("http")
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The read-only port's `/pods`, as JSON.
fn local_pods(port: u16) -> Option<serde_json::Value> {
    let response = tug_tests::http::get(&format!("127.0.0.1:{port}"), "/pods").ok()?;
    let body = response.split("\r\n\r\n").nth(1)?;
    serde_json::from_str(body).ok()
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_pods -- --ignored"]
async fn standalone_static_pods_run_and_show_on_the_read_only_port() {
    require(Tier::Containerd);
    let shim = TugShim::start("kubelet-static", "10.254.12.0/24").await;
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(manifests.path().join("web.yaml"), manifest("web")).unwrap();
    std::fs::write(
        manifests.path().join("broken.yaml"),
        "kind: Pod\nspec: {}\n",
    )
    .unwrap();
    let port = free_port();
    let options = Options {
        standalone: true,
        manifests: Some(manifests.path().to_owned()),
        read_only_port: Some(port),
        ..Default::default()
    };
    let kubelet = TugKubelet::start_with("standalone", &shim.socket, "192.0.2.23", options).await;
    let name = format!("web-{}", kubelet.name);
    let pod = eventually(
        "the static pod to run and be ready",
        Duration::from_secs(60),
        || {
            let name = name.clone();
            async move {
                let list = local_pods(port)?;
                let pod = list["items"]
                    .as_array()?
                    .iter()
                    .find(|p| p["metadata"]["name"] == name.as_str())?
                    .clone();
                (pod["status"]["phase"] == "Running"
                    && pod["status"]["conditions"]
                        .as_array()?
                        .iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True"))
                .then_some(pod)
            }
        },
    )
    .await;
    assert_eq!(pod["metadata"]["namespace"], "kube-system");
    assert_eq!(
        pod["metadata"]["annotations"]["kubernetes.io/config.source"],
        "file"
    );
    let ip = pod["status"]["podIP"].as_str().unwrap().to_owned();
    assert!(ip.starts_with("10.254.12."), "{ip}");
    let body = tug_tests::http::get(&format!("{ip}:8080"), "/").expect("the static pod answers");
    assert!(body.contains("tug-test http"));
    // The broken manifest is skipped, nothing else is affected; removing a manifest stops its pod.
    assert_eq!(
        local_pods(port).unwrap()["items"].as_array().unwrap().len(),
        1
    );
    std::fs::remove_file(manifests.path().join("web.yaml")).unwrap();
    eventually(
        "the static pod to be gone",
        Duration::from_secs(60),
        || async move {
            local_pods(port)?["items"]
                .as_array()?
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let mut cri = shim.cri().await;
    let sandboxes = cri
        .runtime
        .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(
        sandboxes.is_empty(),
        "the static pod's sandbox is still in the runtime: {sandboxes:?}"
    );
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_pods -- --ignored"]
async fn static_pods_get_mirror_pods_in_the_api() {
    require(Tier::Containerd);
    let shim = TugShim::start("kubelet-mirror", "10.254.13.0/24").await;
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(manifests.path().join("web.yaml"), manifest("mirrored")).unwrap();
    let options = Options {
        manifests: Some(manifests.path().to_owned()),
        ..Default::default()
    };
    let kubelet = TugKubelet::start_with("mirror", &shim.socket, "192.0.2.24", options).await;
    let pods: Api<Pod> = Api::namespaced(cluster().admin().await, "kube-system");
    let name = format!("mirrored-{}", kubelet.name);
    let mirror = wait_pod(
        &pods,
        &name,
        "a Ready mirror pod",
        Duration::from_secs(60),
        |p| (condition(p, "Ready").as_deref() == Some("True")).then(|| p.clone()),
    )
    .await;
    let annotations = mirror.metadata.annotations.clone().unwrap_or_default();
    assert!(
        annotations.contains_key("kubernetes.io/config.mirror"),
        "{annotations:?}"
    );
    let owner = mirror.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.first().map(|o| o.kind.as_str()), Some("Node"));
    let container_id = container(&mirror, "web").unwrap().container_id.clone();
    // Deleting the mirror does not touch the static pod; the kubelet puts the mirror back.
    pods.delete(
        &name,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let again = wait_pod(
        &pods,
        &name,
        "a new mirror pod",
        Duration::from_secs(60),
        |p| {
            (p.metadata.uid != mirror.metadata.uid
                && condition(p, "Ready").as_deref() == Some("True"))
            .then(|| p.clone())
        },
    )
    .await;
    assert_eq!(
        container(&again, "web").unwrap().container_id,
        container_id,
        "the static pod's container was restarted"
    );
    // Removing the manifest removes the pod and its mirror.
    std::fs::remove_file(manifests.path().join("web.yaml")).unwrap();
    eventually(
        "the mirror pod to be deleted",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            let name = name.clone();
            async move { pods.get_opt(&name).await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_pods -- --ignored"]
async fn pods_are_evicted_under_node_pressure() {
    require(Tier::Containerd);
    let shim = TugShim::start("kubelet-evict", "10.254.17.0/24").await;
    // A threshold every node crosses: less than all of its memory available.
    let options = Options {
        config:
            "evictionHard:\n  memory.available: \"100%\"\nevictionPressureTransitionPeriod: 1m\n"
                .into(),
        ..Default::default()
    };
    let kubelet = TugKubelet::start_with("tug-evict", &shim.socket, "192.0.2.28", options).await;
    let namespace = cluster().namespace("kubelet-evict").await;
    let admin = cluster().admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace.name());
    let node = kubelet.name.clone();
    // Admitted before the first measurement (10 s after start): one BestEffort pod, using
    // more memory than it requests (none), and one Guaranteed pod well within its request.
    for (name, resources) in [
        ("hog", json!({})),
        (
            "modest",
            json!({"requests": {"memory": "64Mi", "cpu": "100m"}, "limits": {"memory": "64Mi", "cpu": "100m"}}),
        ),
    ] {
        pods.create(
            &PostParams::default(),
            &pod(name, &node, json!({"terminationGracePeriodSeconds": 30,
                "containers": [{"name": "app", "image": image("busybox"), "command": ["sleep", "3600"],
                    "resources": resources}]})),
        )
        .await
        .expect("create pod");
    }
    wait_phase(&pods, "modest", "Running").await;
    let hog = wait_pod(&pods, "hog", "evicted", Duration::from_secs(60), |p| {
        (phase(p) == Some("Failed")).then(|| p.clone())
    })
    .await;
    let status = hog.status.clone().unwrap();
    assert_eq!(status.reason.as_deref(), Some("Evicted"), "{status:?}");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("low on resource: memory") && message.contains("request is 0"),
        "{message}"
    );
    assert_eq!(condition(&hog, "DisruptionTarget").as_deref(), Some("True"));
    let modest = pods.get("modest").await.unwrap();
    assert_eq!(
        phase(&modest),
        Some("Running"),
        "the pod within its request is evicted after the one over it"
    );
    // Stopped at once, not after its 30 s grace period.
    wait_pod(
        &pods,
        "hog",
        "its container stopped",
        Duration::from_secs(20),
        |p| {
            container(p, "app")?
                .state
                .as_ref()?
                .terminated
                .as_ref()
                .map(|_| ())
        },
    )
    .await;
    // The node reports the pressure, and refuses new BestEffort pods while it lasts.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin);
    eventually(
        "MemoryPressure on the node",
        Duration::from_secs(30),
        || {
            let (nodes, node) = (nodes.clone(), node.clone());
            async move {
                let n = nodes.get(&node).await.ok()?;
                n.status?
                    .conditions?
                    .iter()
                    .any(|c| {
                        c.type_ == "MemoryPressure"
                            && c.status == "True"
                            && c.reason.as_deref() == Some("KubeletHasInsufficientMemory")
                    })
                    .then_some(())
            }
        },
    )
    .await;
    refused_under(&pods, &node, "MemoryPressure").await;
    let _ = pods
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
}

/// How many times an Event with `reason` was recorded on Node `node` (each Event object once,
/// or its series' count).
async fn node_events(node: &str, reason: &str) -> i32 {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster().admin().await, "default");
    events
        .list(&Default::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|e| {
                    let regarding = e.regarding.as_ref();
                    regarding.and_then(|r| r.kind.as_deref()) == Some("Node")
                        && regarding.and_then(|r| r.name.as_deref()) == Some(node)
                        && e.reason.as_deref() == Some(reason)
                })
                .map(|e| e.series.as_ref().map_or(1, |s| s.count))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
#[ignore = "containerd tier (root) with the cluster tier: run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test kubelet_pods -- --ignored"]
async fn a_full_root_disk_is_reported_refuses_pods_and_corrupts_nothing() {
    require(Tier::Containerd);
    let shim = TugShim::start("kubelet-disk", "10.254.19.0/24").await;
    let options = Options {
        config:
            "evictionHard:\n  nodefs.available: \"10%\"\nevictionPressureTransitionPeriod: 5s\n"
                .into(),
        root_tmpfs: Some("64m"),
        ..Default::default()
    };
    let mut kubelet = TugKubelet::start_with("tug-disk", &shim.socket, "192.0.2.29", options).await;
    let namespace = cluster().namespace("kubelet-disk").await;
    let admin = cluster().admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace.name());
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin);
    let node = kubelet.name.clone();
    let disk_pressure = |wanted: &'static str| {
        let (nodes, node) = (nodes.clone(), node.clone());
        async move {
            let n = nodes.get(&node).await.ok()?;
            let conditions = n.status?.conditions?;
            let ready = conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let disk = conditions
                .iter()
                .find(|c| c.type_ == "DiskPressure")?
                .clone();
            (ready && disk.status == wanted).then_some(disk)
        }
    };
    eventually("no DiskPressure at first", Duration::from_secs(30), || {
        disk_pressure("False")
    })
    .await;
    let no_pressure = eventually(
        "the Event NodeHasNoDiskPressure on the first status",
        Duration::from_secs(30),
        || {
            let node = node.clone();
            async move {
                let n = node_events(&node, "NodeHasNoDiskPressure").await;
                (n > 0).then_some(n)
            }
        },
    )
    .await;

    // Fill the root dir's disk to 2 MiB short of full.
    let stat = nix::sys::statvfs::statvfs(&kubelet.root_dir).expect("statvfs the root dir");
    let available = stat.blocks_available() * stat.fragment_size();
    let filler = kubelet.root_dir.join("filler");
    {
        let mut file = std::fs::File::create(&filler).expect("create the filler");
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..(available >> 20).saturating_sub(2) {
            std::io::Write::write_all(&mut file, &chunk).expect("fill the disk");
        }
    }
    let pressure = eventually("DiskPressure on the node", Duration::from_secs(60), || {
        disk_pressure("True")
    })
    .await;
    assert_eq!(
        pressure.reason.as_deref(),
        Some("KubeletHasDiskPressure"),
        "{pressure:?}"
    );
    eventually(
        "the Event NodeHasDiskPressure",
        Duration::from_secs(30),
        || {
            let node = node.clone();
            async move { (node_events(&node, "NodeHasDiskPressure").await > 0).then_some(()) }
        },
    )
    .await;
    // New pods are refused while it lasts.
    refused_under(&pods, &node, "DiskPressure").await;

    // Restarted on the full disk, the kubelet comes back with its identity intact.
    kubelet.restart().await;
    assert!(
        tug_kubelet::bootstrap::usable(&kubelet.kubeconfig),
        "the node's kubeconfig and client certificate survive a restart on a full disk"
    );
    eventually(
        "DiskPressure still reported after the restart",
        Duration::from_secs(60),
        || disk_pressure("True"),
    )
    .await;

    // Room again: the pressure ends, and says so.
    std::fs::remove_file(&filler).expect("remove the filler");
    eventually(
        "DiskPressure gone once there is room",
        Duration::from_secs(60),
        || disk_pressure("False"),
    )
    .await;
    eventually(
        "the Event NodeHasNoDiskPressure again",
        Duration::from_secs(30),
        || {
            let node = node.clone();
            async move {
                (node_events(&node, "NodeHasNoDiskPressure").await > no_pressure).then_some(())
            }
        },
    )
    .await;
    let _ = pods
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
}
