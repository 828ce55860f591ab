//! cluster tier: `tug join` against the test API server, or a real cluster with
//! `TUG_TEST_KUBECONFIG`: token discovery, the TLS bootstrap and the node's identity, each
//! failure's own message, and a rejoin after `tug reset`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tug_tests::cluster::{client_from_kubeconfig, cluster, unique_name};
use tug_tests::cni::tug_binary;

/// `host:port` of the API server.
fn endpoint() -> String {
    cluster()
        .server_url()
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned()
}

/// Preflight checks that depend on this test machine rather than on the join: the test
/// containerd's socket, ports other tests' kubelets hold, swap and forwarding.
const MACHINE_CHECKS: &str =
    "CRI,Port-10250,Port-10256,Swap,FileContent--proc-sys-net-ipv4-ip_forward";

fn join(root: &Path, args: &[&str]) -> Output {
    Command::new(tug_binary())
        .arg("join")
        .args(args)
        .arg("--root")
        .arg(root)
        .args(["--no-start", "--ignore-preflight-errors", MACHINE_CHECKS])
        .output()
        .expect("run tug join")
}

fn report(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo build -p tug && cargo test -p tug-tests --test join -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn join_discovers_the_cluster_bootstraps_an_identity_and_rejoins_after_reset() {
    let token = cluster().bootstrap_token().await;
    let node = unique_name("joined");
    let root = tempfile::tempdir().unwrap();
    let args = [
        endpoint(),
        "--token".into(),
        token.token(),
        "--discovery-token-ca-cert-hash".into(),
        cluster().ca_pin(),
        "--node-name".into(),
        node.clone(),
        "--discovery-timeout".into(),
        "60s".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = tokio::task::block_in_place(|| join(root.path(), &args));
    assert!(output.status.success(), "{}", report(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("cluster CA verified"), "{stdout}");

    // Whether the node's identity may feed its proxy decides whether join warns, with the fix.
    let admin = cluster().admin().await;
    let review: k8s_openapi::api::authorization::v1::SubjectAccessReview =
        serde_json::from_value(json!({"spec": {
            "user": format!("system:node:{node}"),
            "groups": ["system:nodes", "system:authenticated"],
            "resourceAttributes": {"group": "discovery.k8s.io", "resource": "endpointslices", "verb": "list"}
        }}))
        .unwrap();
    let allowed = Api::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .is_some_and(|s| s.allowed);
    let warned = stdout.contains("[proxy] WARNING: this node's identity may not")
        && stdout.contains("list endpointslices")
        && stdout.contains("kubectl create clusterrolebinding tug-node-proxier");
    assert_eq!(
        warned, !allowed,
        "join must warn exactly when nodes may not list EndpointSlices (allowed: {allowed}):\n{stdout}"
    );

    // Files where kubeadm puts them, secrets readable by root only.
    let at = |p: &str| root.path().join(p);
    for (path, expected) in [
        ("etc/kubernetes/bootstrap-kubelet.conf", 0o600),
        ("etc/kubernetes/kubelet.conf", 0o600),
        ("etc/kubernetes/pki/ca.crt", 0o644),
        ("var/lib/kubelet/config.yaml", 0o644),
        ("etc/systemd/system/tug-kubelet.service", 0o644),
    ] {
        assert_eq!(mode(&at(path)), expected, "{path}");
    }
    // The binary in place, and the CNI plugin a CRI runtime execs by name linked to it.
    assert!(at("usr/local/bin/tug").is_file());
    assert_eq!(
        std::fs::read_link(at("opt/cni/bin/tug-cni")).unwrap(),
        Path::new("/usr/local/bin/tug")
    );
    let pem = at("var/lib/kubelet/pki/kubelet-client-current.pem");
    assert_eq!(mode(&std::fs::canonicalize(&pem).unwrap()), 0o600);
    assert_eq!(
        std::fs::read_to_string(at("etc/kubernetes/pki/ca.crt")).unwrap(),
        cluster().ca_pem()
    );
    // The cluster's shared KubeletConfiguration, when it has one.
    let shared = Api::<ConfigMap>::namespaced(admin.clone(), "kube-system")
        .get_opt("kubelet-config")
        .await
        .unwrap()
        .and_then(|c| c.data)
        .and_then(|mut d| d.remove("kubelet"));
    // (tug shim drives cgroupfs: a systemd driver in the cluster's copy is the one change.)
    if let Some(shared) = shared {
        let expected = shared.replace("cgroupDriver: systemd", "cgroupDriver: cgroupfs");
        assert_eq!(
            std::fs::read_to_string(at("var/lib/kubelet/config.yaml")).unwrap(),
            expected
        );
        assert_eq!(
            stdout.contains("this node's copy says cgroupDriver: cgroupfs"),
            expected != shared,
            "{stdout}"
        );
    }

    // The cluster's kube-proxy configuration, for the proxy to run with, as kubeadm's DaemonSet
    // would mount it.
    let proxy_shared = Api::<ConfigMap>::namespaced(admin.clone(), "kube-system")
        .get_opt("kube-proxy")
        .await
        .unwrap()
        .and_then(|c| c.data)
        .and_then(|mut d| d.remove("config.conf"));
    let proxy_unit = std::fs::read_to_string(at("etc/systemd/system/tug-proxy.service")).unwrap();
    if let Some(shared) = proxy_shared {
        assert_eq!(
            std::fs::read_to_string(at("var/lib/kube-proxy/config.conf")).unwrap(),
            shared
        );
        assert_eq!(mode(&at("var/lib/kube-proxy/config.conf")), 0o644);
        assert!(
            proxy_unit.contains(" --config /var/lib/kube-proxy/config.conf"),
            "{proxy_unit}"
        );
        assert!(
            stdout.contains("using the cluster's KubeProxyConfiguration"),
            "{stdout}"
        );
    }
    assert!(!proxy_unit.contains("--proxy-mode"), "{proxy_unit}");

    // The units pass systemd's own checks (with ExecStart pointing at this build's binary,
    // as the host has none at /usr/local/bin).
    let checked = tempfile::tempdir().unwrap();
    let units: Vec<std::path::PathBuf> = ["tug-shim", "tug-kubelet", "tug-proxy", "tug-netd"]
        .iter()
        .map(|unit| {
            let text = std::fs::read_to_string(at(&format!("etc/systemd/system/{unit}.service")))
                .unwrap()
                .replace("/usr/local/bin/tug", &tug_binary().display().to_string());
            let path = checked.path().join(format!("{unit}.service"));
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect();
    let verify = tokio::task::block_in_place(|| {
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&units)
            .output()
            .expect("run systemd-analyze verify")
    });
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        report(&verify)
    );

    // The issued identity is the node's: it may register its own Node.
    let text = std::fs::read_to_string(at("etc/kubernetes/kubelet.conf")).unwrap();
    let identity = client_from_kubeconfig(&text).await;
    let nodes: Api<Node> = Api::all(identity);
    let object: Node = serde_json::from_value(json!({"metadata": {"name": node}})).unwrap();
    nodes
        .create(&PostParams::default(), &object)
        .await
        .expect("the joined identity registers its Node");
    let admin_nodes: Api<Node> = Api::all(admin);
    let _ = admin_nodes.delete(&node, &DeleteParams::default()).await;

    // Joining again over a joined machine is refused, naming the way out.
    let again = tokio::task::block_in_place(|| join(root.path(), &args));
    assert!(!again.status.success(), "{}", report(&again));
    let text = report(&again);
    assert!(
        text.contains("FileAvailable") && text.contains("tug reset"),
        "{text}"
    );

    // After `tug reset` (in a network namespace of its own: it clears rules and routes), the
    // same machine joins again.
    let reset = tokio::task::block_in_place(|| {
        Command::new("unshare")
            .arg("-n")
            .arg(tug_binary())
            .args(["reset", "--force", "--root"])
            .arg(root.path())
            .output()
            .expect("run tug reset")
    });
    assert!(reset.status.success(), "{}", report(&reset));
    for gone in [
        "etc/kubernetes/kubelet.conf",
        "etc/kubernetes/bootstrap-kubelet.conf",
        "var/lib/kubelet/pki",
        "etc/systemd/system/tug-kubelet.service",
    ] {
        assert!(!at(gone).exists(), "{gone} is removed by tug reset");
    }
    assert!(
        !at("var/lib/kube-proxy").exists(),
        "tug reset removes the proxy's configuration"
    );
    // Joining again, this node with a proxy mode of its own.
    let mut args = args.clone();
    args.extend(["--proxy-mode", "nftables"]);
    let rejoin = tokio::task::block_in_place(|| join(root.path(), &args));
    assert!(rejoin.status.success(), "{}", report(&rejoin));
    let proxy_unit = std::fs::read_to_string(at("etc/systemd/system/tug-proxy.service")).unwrap();
    assert!(
        proxy_unit.contains(" --proxy-mode nftables\n"),
        "{proxy_unit}"
    );
}

/// Runs a join that must fail, and returns its stderr.
fn refused(args: &[&str]) -> String {
    let root = tempfile::tempdir().unwrap();
    let output = join(root.path(), args);
    assert!(!output.status.success(), "{}", report(&output));
    assert!(
        !root.path().join("etc/kubernetes").exists(),
        "a failed join writes nothing: {}",
        report(&output)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "cluster tier: run via ./scripts/test cluster, or cargo build -p tug && cargo test -p tug-tests --test join -- --ignored (TUG_TEST_KUBECONFIG=<admin kubeconfig> for a real cluster)"]
async fn each_join_failure_has_its_own_message() {
    let token = cluster().bootstrap_token().await;
    let pin = cluster().ca_pin();
    let endpoint = endpoint();
    let quick = ["--discovery-timeout", "4s"];
    let case = |token: &str, pin: Option<&str>, endpoint: &str| -> String {
        let mut args = vec![endpoint, "--token", token];
        if let Some(pin) = pin {
            args.extend(["--discovery-token-ca-cert-hash", pin]);
        }
        args.extend(quick);
        tokio::task::block_in_place(|| refused(&args))
    };
    let real = token.token();
    let (id, secret) = real.split_once('.').unwrap();

    let malformed = case("abc.def", Some(&pin), &endpoint);
    assert!(
        malformed.contains("malformed bootstrap token"),
        "{malformed}"
    );

    let no_pin = case(&real, None, &endpoint);
    assert!(
        no_pin.contains("refusing to join without verifying the cluster CA"),
        "{no_pin}"
    );

    let unknown = case("zzzzzz.0123456789abcdef", Some(&pin), &endpoint);
    assert!(
        unknown.contains("no signature for token id \"zzzzzz\"")
            && unknown.contains("unknown to the cluster or has expired"),
        "{unknown}"
    );

    let wrong_secret = format!("{id}.{}", secret.chars().rev().collect::<String>());
    let mismatch = case(&wrong_secret, Some(&pin), &endpoint);
    assert!(
        mismatch.contains("does not match this token's secret"),
        "{mismatch}"
    );

    let other_pin = format!("sha256:{}", "00".repeat(32));
    let pinned = case(&real, Some(&other_pin), &endpoint);
    assert!(
        pinned.contains("matches none of the --discovery-token-ca-cert-hash")
            && pinned.contains(&pin),
        "{pinned}"
    );

    let unreachable = case(&real, Some(&pin), "127.0.0.1:1");
    assert!(
        unreachable.contains("cannot reach the API server at 127.0.0.1:1"),
        "{unreachable}"
    );

    // A token the bootstrap signer vouches for but the API does not accept for authentication:
    // discovery passes and the API's 401 gets its own message.
    let admin = cluster().admin().await;
    let secrets: Api<Secret> = Api::namespaced(admin, "kube-system");
    let signing_id: String = (0..6)
        .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
        .collect();
    let object: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("bootstrap-token-{signing_id}")},
        "type": "bootstrap.kubernetes.io/token",
        "stringData": {"token-id": signing_id, "token-secret": "0123456789abcdef",
            "usage-bootstrap-signing": "true", "usage-bootstrap-authentication": "false"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &object)
        .await
        .expect("create a signing-only token");
    let rejected = case(
        &format!("{signing_id}.0123456789abcdef"),
        Some(&pin),
        &endpoint,
    );
    let _ = secrets
        .delete(
            &format!("bootstrap-token-{signing_id}"),
            &DeleteParams::default(),
        )
        .await;
    assert!(
        rejected.contains("refused bootstrap token") && rejected.contains("401"),
        "{rejected}"
    );

    // A clock two hours ahead of the API server's.
    let skewed = tokio::task::block_in_place(|| {
        let root = tempfile::tempdir().unwrap();
        Command::new("faketime")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .args(["-f", "+2h"])
            .arg(tug_binary())
            .args([
                "join",
                &endpoint,
                "--token",
                &real,
                "--discovery-token-ca-cert-hash",
                &pin,
            ])
            .args(quick)
            .arg("--root")
            .arg(root.path())
            .args(["--no-start", "--ignore-preflight-errors", MACHINE_CHECKS])
            .output()
            .expect("run tug join under faketime")
    });
    let text = report(&skewed);
    assert!(!skewed.status.success(), "{text}");
    assert!(
        text.contains("ahead of the API server's") && text.contains("time synchronisation"),
        "{text}"
    );
}
