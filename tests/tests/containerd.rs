//! containerd tier: containers from the local registry and from OCI archives, run through
//! containerd's native gRPC API on the test-owned containerd.

use std::time::Duration;

use tug_tests::containerd::{ContainerdNs, RunSpec};
use tug_tests::eventually::eventually;
use tug_tests::netns::Netns;
use tug_tests::tier::{Tier, require};

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up then cargo test -p tug-tests --test containerd -- --ignored"]
async fn image_pulled_from_the_local_registry_runs_and_reports_its_exit_code() {
    require(Tier::Containerd);
    let ns = ContainerdNs::connect("exit").await;
    let reference = ns.pull_from_registry("exit");

    let run = RunSpec {
        args: Some(vec!["7".into()]),
        ..Default::default()
    };
    let exited = ns.run_to_exit("exits-7", &reference, run).await;
    assert_eq!(
        exited.status, 7,
        "exit code of the container; output: {}",
        exited.output
    );
    assert!(
        exited.output.contains("exiting with code 7"),
        "stdout captured: {:?}",
        exited.output
    );

    let exited = ns
        .run_to_exit("exits-default", &reference, RunSpec::default())
        .await;
    assert_eq!(
        exited.status, 3,
        "the image's own CMD (3) applies when no args are given"
    );
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up then cargo test -p tug-tests --test containerd -- --ignored"]
async fn imported_http_image_serves_inside_a_given_network_namespace() {
    require(Tier::Containerd);
    let ns = ContainerdNs::connect("http").await;
    let reference = ns.import_archive("http");
    let pod_net = Netns::new("http");

    let run = RunSpec {
        netns: Some(pod_net.path()),
        ..Default::default()
    };
    ns.start("web", &reference, run).await;

    let body = eventually(
        "the http image to answer on :8080",
        Duration::from_secs(20),
        || {
            let reply = pod_net.run(|| tug_tests::http::get("127.0.0.1:8080", "/").ok());
            async move { reply }
        },
    )
    .await;
    assert!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "status line: {body}"
    );
    assert!(body.ends_with("tug-test http\n"), "body: {body}");

    let hostname = pod_net
        .run(|| tug_tests::http::get("127.0.0.1:8080", "/cgi-bin/hostname"))
        .expect("cgi");
    assert!(
        hostname.ends_with("web\n"),
        "the CGI reports the container's hostname: {hostname}"
    );

    ns.kill("web", 9).await;
    let exited = ns.wait("web", Duration::from_secs(10)).await;
    assert_eq!(
        exited.status,
        128 + 9,
        "a SIGKILLed container reports 128+9"
    );
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up then cargo test -p tug-tests --test containerd -- --ignored"]
async fn tugs_own_pull_fetches_unpacks_and_the_image_runs() {
    use tug_runtime_shim::image::pull::{Containerd, PullError, pull};
    use tug_runtime_shim::image::reference::Reference;
    use tug_runtime_shim::image::registry::{Credentials, Registry, RegistryConfig, RegistryError};
    use tug_tests::substrate::Substrate;

    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let ns = ContainerdNs::connect("pull").await;
    let channel = containerd_client::connect(&substrate.containerd_sock)
        .await
        .expect("connect to containerd");
    let containerd = Containerd::new(channel, ns.namespace());
    let registry = Registry::new(RegistryConfig {
        insecure: vec![substrate.registry.clone()],
        ..Default::default()
    });
    let reference = Reference::parse(&substrate.registry_image("exit")).unwrap();

    let pulled = pull(&containerd, &registry, &reference, &Credentials::default())
        .await
        .expect("pull from the local registry");
    assert_eq!(pulled.name, substrate.registry_image("exit"));
    assert!(
        pulled.id.starts_with("sha256:") && pulled.id.len() == 71,
        "{pulled:?}"
    );
    let again = pull(&containerd, &registry, &reference, &Credentials::default())
        .await
        .expect("pulling again is a no-op");
    assert_eq!(again, pulled);

    // The container runs from the snapshots this pull unpacked.
    let run = RunSpec {
        args: Some(vec!["7".into()]),
        ..Default::default()
    };
    let exited = ns.run_to_exit("pulled-7", &pulled.name, run).await;
    assert_eq!(exited.status, 7, "output: {}", exited.output);

    let missing = Reference::parse(&substrate.registry_image("does-not-exist")).unwrap();
    let error = pull(&containerd, &registry, &missing, &Credentials::default())
        .await
        .expect_err("a missing image");
    assert!(
        matches!(error, PullError::Registry(RegistryError::NotFound { .. })),
        "{error}"
    );
    assert!(
        error.to_string().contains("does-not-exist"),
        "the error names the image: {error}"
    );
    let unreachable = Registry::new(RegistryConfig {
        insecure: vec!["127.0.0.1:1".into()],
        ..Default::default()
    });
    let error = pull(
        &containerd,
        &unreachable,
        &Reference::parse("127.0.0.1:1/x/y:1").unwrap(),
        &Credentials::default(),
    )
    .await
    .expect_err("an unreachable registry");
    assert!(
        matches!(error, PullError::Registry(RegistryError::Transport { .. })),
        "{error}"
    );
}
