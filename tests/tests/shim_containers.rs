//! containerd tier: the container lifecycle through the CRI as the kubelet drives it — create,
//! start, logs in the CRI format, exit codes, OOMKilled, ExecSync with its timeout, stop with
//! SIGKILL after the grace period, stats, removal, bad input — the same suite against tug shim
//! and against containerd's own CRI; then what only tug shim promises: events and surviving a
//! SIGKILL of the shim itself.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use tug_tests::cluster::unique_name;
use tug_tests::cri::{Cri, install_tug_cni};
use tug_tests::eventually::eventually;
use tug_tests::shim::TugShim;
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

fn image(substrate: &Substrate) -> ImageSpec {
    ImageSpec {
        image: substrate.registry_image("busybox"),
        ..Default::default()
    }
}

async fn ready(cri: &Cri) {
    eventually(
        "RuntimeReady and NetworkReady",
        Duration::from_secs(30),
        || {
            let mut cri = cri.clone();
            async move {
                (cri.condition("RuntimeReady").await && cri.condition("NetworkReady").await)
                    .then_some(())
            }
        },
    )
    .await;
}

async fn pull(cri: &mut Cri, substrate: &Substrate) {
    cri.images
        .pull_image(PullImageRequest {
            image: Some(image(substrate)),
            auth: None,
            sandbox_config: None,
        })
        .await
        .expect("PullImage busybox from the local registry");
}

fn sandbox_config(name: &str, logs: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "tug-test".into(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: logs.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["tug-test.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/tug-test/pod-{name}"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_sandbox(cri: &mut Cri, config: &PodSandboxConfig) -> String {
    cri.runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
}

fn container(substrate: &Substrate, name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(image(substrate)),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("io.kubernetes.container.name".to_owned(), name.to_owned())]),
        // What the kubelet sends for a pod without shareProcessNamespace.
        linux: Some(LinuxContainerConfig {
            resources: None,
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

fn create<'a>(
    cri: &'a mut Cri,
    sandbox: &'a str,
    sandbox_config: &'a PodSandboxConfig,
    config: ContainerConfig,
) -> futures::future::BoxFuture<'a, String> {
    Box::pin(async move {
        cri.runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id
    })
}

async fn start(cri: &mut Cri, id: &str) {
    cri.runtime
        .start_container(StartContainerRequest {
            container_id: id.to_owned(),
        })
        .await
        .expect("StartContainer");
}

async fn status(cri: &mut Cri, id: &str) -> ContainerStatus {
    cri.runtime
        .container_status(ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("a status")
}

async fn exited(cri: &Cri, id: &str, within: Duration) -> ContainerStatus {
    eventually(&format!("container {id} to exit"), within, || {
        let mut cri = cri.clone();
        let id = id.to_owned();
        async move {
            let status = status(&mut cri, &id).await;
            (status.state == ContainerState::ContainerExited as i32).then_some(status)
        }
    })
    .await
}

async fn exec(
    cri: &mut Cri,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<ExecSyncResponse, tonic::Status> {
    cri.runtime
        .exec_sync(ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout,
        })
        .await
        .map(|r| r.into_inner())
}

/// Exec (with stdin, without and with a TTY) and port-forward through the runtime's streaming
/// server, as `kubectl exec` and `kubectl port-forward` reach it through the kubelet.
async fn streaming(cri: &mut Cri, sandbox: &str, sleeper: &str) {
    let url = |r: Result<String, tonic::Status>| r.expect("a streaming URL");
    let exec_url = |cmd: &[&str], stdin: bool, tty: bool| ExecRequest {
        container_id: sleeper.to_owned(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    };
    let request = exec_url(
        &["sh", "-c", "tr a-z A-Z; echo done >&2; exit 5"],
        true,
        false,
    );
    let target = url(cri.runtime.exec(request).await.map(|r| r.into_inner().url));
    let out = tug_tests::streaming::exec(&target, Some(b"hello stream\n"), false)
        .await
        .expect("exec over SPDY");
    assert_eq!(out.protocol, "v4.channel.k8s.io");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO STREAM\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "done\n");
    assert_eq!(out.exit, Ok(5));
    // Only stdout asked for: stderr output is dropped, not an error.
    let request = ExecRequest {
        stderr: false,
        ..exec_url(
            &["sh", "-c", "echo only-out; echo dropped >&2"],
            false,
            false,
        )
    };
    let only = url(cri.runtime.exec(request).await.map(|r| r.into_inner().url));
    let out = tug_tests::streaming::exec_streams(&only, None, false, false)
        .await
        .expect("exec with stdout only");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "only-out\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.exit, Ok(0));
    // A URL is good for one session only.
    assert!(
        tug_tests::streaming::exec(&target, None, false)
            .await
            .is_err()
    );
    // With a TTY: output through the terminal, whose size the resize stream set.
    let request = exec_url(
        &[
            "sh",
            "-c",
            "sleep 1; stty size 2>&1; stty -a 2>&1 | head -2; tty",
        ],
        true,
        true,
    );
    let target = url(cri.runtime.exec(request).await.map(|r| r.into_inner().url));
    let out = tug_tests::streaming::exec(&target, Some(b""), true)
        .await
        .expect("exec with a TTY");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("30 100"),
        "the terminal has the size sent: {text:?}"
    );
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert_eq!(out.exit, Ok(0));
    // Port-forward: a web server in the pod, reached through the sandbox's port-forward URL,
    // twice on one session; a closed port is reported on the error stream.
    let started = exec(
        cri,
        sleeper,
        &["sh", "-c", "mkdir -p /tmp/www && echo forwarded > /tmp/www/index.html && httpd -p 8081 -h /tmp/www"],
        10,
    )
    .await
    .expect("start a web server in the pod");
    assert_eq!(started.exit_code, 0, "{started:?}");
    let target = url(cri
        .runtime
        .port_forward(PortForwardRequest {
            pod_sandbox_id: sandbox.to_owned(),
            port: vec![8081],
        })
        .await
        .map(|r| r.into_inner().url));
    let forward = tug_tests::streaming::PortForward::open(&target)
        .await
        .expect("port-forward over SPDY");
    for _ in 0..2 {
        let answer = forward
            .exchange(8081, b"GET / HTTP/1.0\r\n\r\n")
            .await
            .expect("an answer through the forwarded port");
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.") && text.ends_with("forwarded\n"),
            "{text}"
        );
    }
    let refused = forward.exchange(8099, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(refused.is_err(), "a closed port: {refused:?}");
    drop(forward);
    // Unknown containers are NotFound at the CRI call.
    let missing = cri
        .runtime
        .exec(ExecRequest {
            container_id: "no-such-container".into(),
            ..exec_url(&["true"], false, false)
        })
        .await
        .expect_err("Exec of an unknown container");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
}

async fn remove_all(cri: &mut Cri, sandbox: &str, containers: &[&str]) {
    for id in containers {
        for _ in 0..2 {
            cri.runtime
                .remove_container(RemoveContainerRequest {
                    container_id: (*id).to_owned(),
                })
                .await
                .expect("RemoveContainer, twice");
        }
    }
    cri.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox.to_owned(),
        })
        .await
        .expect("StopPodSandbox");
    cri.runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sandbox.to_owned(),
        })
        .await
        .expect("RemovePodSandbox");
}

/// Lists the processes a container sees: `(pid, state and parent, command line)` from its own
/// `/proc`.
async fn processes_seen_by(cri: &mut Cri, id: &str) -> Vec<(u32, String, String)> {
    let script = "for d in /proc/[0-9]*; do echo \"${d#/proc/} $(cut -d' ' -f3,4 $d/stat 2>/dev/null | tr ' ' /) $(tr '\\0' ' ' < $d/cmdline 2>/dev/null)\"; done";
    let output = exec(cri, id, &["sh", "-c", script], 10)
        .await
        .expect("ExecSync: list /proc");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let pid = parts.next()?.parse().ok()?;
            let state = parts.next()?.to_owned();
            Some((pid, state, parts.next().unwrap_or("").trim().to_owned()))
        })
        .collect()
}

/// The host PID of PID 1 in the PID namespace `ns` (`pid:[inode]`).
fn host_pid_of_init(ns: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(entry.path().join("ns/pid")).ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            (link.display().to_string() == ns && nspid.split_whitespace().last() == Some("1"))
                .then_some(pid)
        })
}

/// A pod with `shareProcessNamespace: true`: its containers see each other's processes, PID 1 is
/// the pod's (neither container's) and reaps orphans, and stopping the sandbox ends them all.
/// `strict`: the sandbox turns NotReady when that PID 1 dies (tug shim's pod-init; containerd's
/// pause is not found from here).
async fn shared_process_namespace(cri: &mut Cri, substrate: &Substrate, strict: bool) {
    let logs = tempfile::tempdir().unwrap();
    let mut config = sandbox_config(&unique_name("pidns"), logs.path());
    let shared = NamespaceOption {
        pid: NamespaceMode::Pod as i32,
        ..Default::default()
    };
    config.linux.as_mut().unwrap().security_context = Some(LinuxSandboxSecurityContext {
        namespace_options: Some(shared.clone()),
        ..Default::default()
    });
    let sandbox = run_sandbox(cri, &config).await;
    let in_pod = |name: &str, command: &[&str]| {
        let mut c = container(substrate, name, command);
        let security = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
        security.namespace_options = Some(shared.clone());
        c
    };
    let first = create(cri, &sandbox, &config, in_pod("first", &["sleep", "3601"])).await;
    let second = create(cri, &sandbox, &config, in_pod("second", &["sleep", "3602"])).await;
    start(cri, &first).await;
    start(cri, &second).await;
    let seen = processes_seen_by(cri, &second).await;
    let commands: Vec<&str> = seen.iter().map(|(_, _, c)| c.as_str()).collect();
    assert!(
        commands.contains(&"sleep 3601"),
        "second sees first: {seen:?}"
    );
    assert!(commands.contains(&"sleep 3602"), "{seen:?}");
    let init = seen.iter().find(|(pid, _, _)| *pid == 1).expect("a PID 1");
    assert!(!init.2.starts_with("sleep"), "PID 1 is the pod's: {seen:?}");
    let seen_by_first = processes_seen_by(cri, &first).await;
    assert!(
        seen_by_first.iter().any(|(_, _, c)| c == "sleep 3602"),
        "first sees second: {seen_by_first:?}"
    );
    if strict {
        // An orphan is re-parented to PID 1, which reaps it: no zombie of PID 1 is left. (The
        // test substrate's pause image for containerd is `sleep`, which reaps nothing.)
        let orphan = exec(cri, &first, &["sh", "-c", "sleep 0.2 & exit 0"], 10)
            .await
            .expect("ExecSync leaving an orphan");
        assert_eq!(orphan.exit_code, 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = processes_seen_by(cri, &first).await;
        assert!(
            after.iter().all(|(_, state, _)| state != "Z/1"),
            "orphans are reaped: {after:?}"
        );

        let ns = exec(cri, &first, &["readlink", "/proc/self/ns/pid"], 10)
            .await
            .expect("ExecSync readlink");
        let ns = String::from_utf8_lossy(&ns.stdout).trim().to_owned();
        let init = host_pid_of_init(&ns).expect("the pod's PID 1 on the host");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(init as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the pod's PID 1");
        let _ = exited(cri, &first, Duration::from_secs(20)).await;
        let status = cri
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: false,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .expect("a status");
        assert_eq!(
            status.state,
            PodSandboxState::SandboxNotready as i32,
            "a sandbox whose PID 1 died is not ready"
        );
        let refused = cri
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(in_pod("late", &["true"])),
                sandbox_config: Some(config.clone()),
            })
            .await
            .expect_err("a container for a dead PID namespace");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    } else {
        cri.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await
            .expect("StopPodSandbox");
    }
    for id in [&first, &second] {
        let status = exited(cri, id, Duration::from_secs(20)).await;
        assert_eq!(
            status.exit_code, 137,
            "killed with the namespace: {status:?}"
        );
    }
    remove_all(cri, &sandbox, &[&first, &second]).await;
}

/// The container behaviour the kubelet relies on. `strict` adds the error codes and fields tug
/// shim promises beyond what containerd 1.6 answers.
async fn exercise_containers(mut cri: Cri, substrate: &Substrate, strict: bool) {
    ready(&cri).await;
    pull(&mut cri, substrate).await;
    let name = unique_name("ctr");
    let logs = tempfile::tempdir().unwrap();
    let sandbox_config = sandbox_config(&name, logs.path());
    let sandbox = run_sandbox(&mut cri, &sandbox_config).await;

    // A container that writes to both streams and exits 3.
    let exiter = create(
        &mut cri,
        &sandbox,
        &sandbox_config,
        container(
            substrate,
            "exiter",
            &[
                "sh",
                "-c",
                "echo out-line; echo err-line >&2; cat /etc/resolv.conf; printf partial; exit 3",
            ],
        ),
    )
    .await;
    let created = status(&mut cri, &exiter).await;
    assert_eq!(created.state, ContainerState::ContainerCreated as i32);
    assert_eq!(
        created.metadata.as_ref().map(|m| m.name.as_str()),
        Some("exiter")
    );
    start(&mut cri, &exiter).await;
    let done = exited(&cri, &exiter, Duration::from_secs(30)).await;
    assert_eq!(done.exit_code, 3, "the exit code is recorded");
    assert_eq!(done.reason, "Error");
    // containerd's CRI stamps started_at after its start call returns, so for a container
    // that exits at once its finished_at can come out earlier by a fraction of a millisecond;
    // tug shim takes both from the task and keeps them in order.
    let slack = if strict { 0 } else { 10_000_000 };
    assert!(
        done.started_at > 0 && done.finished_at + slack >= done.started_at,
        "{done:?}"
    );
    assert!(
        done.image_ref.contains("sha256:"),
        "image_ref {}",
        done.image_ref
    );
    let log_file = logs.path().join("exiter/0.log");
    assert_eq!(done.log_path, log_file.display().to_string());
    let log = eventually(
        "the log to hold the last line",
        Duration::from_secs(10),
        || {
            let path = log_file.clone();
            async move {
                let text = std::fs::read_to_string(&path).ok()?;
                text.contains("partial").then_some(text)
            }
        },
    )
    .await;
    let records: Vec<(&str, &str, &str)> = log
        .lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let stamp = parts.next().unwrap();
            assert!(
                stamp.parse::<jiff::Timestamp>().is_ok(),
                "RFC 3339 timestamp in {line:?}"
            );
            (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap_or(""),
            )
        })
        .collect();
    assert!(records.contains(&("stdout", "F", "out-line")), "{log}");
    assert!(records.contains(&("stderr", "F", "err-line")), "{log}");
    assert!(
        records.contains(&("stdout", "F", "nameserver 10.96.0.10")),
        "the sandbox's DNS config is the container's resolv.conf: {log}"
    );
    assert!(
        records.contains(&("stdout", "F", "search tug-test.svc.cluster.local")),
        "{log}"
    );
    assert!(
        records.contains(&("stdout", "P", "partial")),
        "an unterminated line is partial: {log}"
    );

    // A long-running container: exec, stats, listing, stop with SIGKILL after the grace period.
    let sleeper = create(
        &mut cri,
        &sandbox,
        &sandbox_config,
        container(substrate, "sleeper", &["sleep", "3600"]),
    )
    .await;
    start(&mut cri, &sleeper).await;
    assert_eq!(
        status(&mut cri, &sleeper).await.state,
        ContainerState::ContainerRunning as i32
    );
    let output = exec(
        &mut cri,
        &sleeper,
        &["sh", "-c", "echo hi; echo oops >&2; hostname; exit 7"],
        10,
    )
    .await
    .expect("ExecSync");
    assert_eq!(output.exit_code, 7);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("hi\n{name}\n")
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr), "oops\n");
    streaming(&mut cri, &sandbox, &sleeper).await;
    // The pod's containers share one IPC namespace and one /dev/shm (not the node's).
    let peer = create(
        &mut cri,
        &sandbox,
        &sandbox_config,
        container(substrate, "peer", &["sleep", "3600"]),
    )
    .await;
    start(&mut cri, &peer).await;
    let ipc_of = |id: String| {
        let mut cri = cri.clone();
        async move {
            let output = exec(&mut cri, &id, &["readlink", "/proc/self/ns/ipc"], 10)
                .await
                .expect("ExecSync readlink");
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
    };
    let (ipc_a, ipc_b) = (ipc_of(sleeper.clone()).await, ipc_of(peer.clone()).await);
    assert!(ipc_a.starts_with("ipc:["), "{ipc_a:?}");
    assert_eq!(ipc_a, ipc_b, "one IPC namespace per pod");
    assert_ne!(
        ipc_a,
        std::fs::read_link("/proc/self/ns/ipc")
            .unwrap()
            .display()
            .to_string(),
        "not the node's"
    );
    let wrote = exec(
        &mut cri,
        &sleeper,
        &["sh", "-c", "echo shared > /dev/shm/probe"],
        10,
    )
    .await
    .expect("ExecSync write to /dev/shm");
    assert_eq!(wrote.exit_code, 0, "{wrote:?}");
    let read = exec(&mut cri, &peer, &["cat", "/dev/shm/probe"], 10)
        .await
        .expect("ExecSync read /dev/shm");
    assert_eq!(String::from_utf8_lossy(&read.stdout), "shared\n");
    assert!(
        !Path::new("/dev/shm/probe").exists(),
        "the pod's /dev/shm is not the node's"
    );
    cri.runtime
        .stop_container(StopContainerRequest {
            container_id: peer.clone(),
            timeout: 0,
        })
        .await
        .expect("StopContainer");
    // Attach: the output of a running container, until it exits.
    let ticker = create(
        &mut cri,
        &sandbox,
        &sandbox_config,
        container(
            substrate,
            "ticker",
            &[
                "sh",
                "-c",
                "sleep 2; for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.3; done",
            ],
        ),
    )
    .await;
    start(&mut cri, &ticker).await;
    let target = cri
        .runtime
        .attach(AttachRequest {
            container_id: ticker.clone(),
            stdin: false,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let attached = tokio::time::timeout(
        Duration::from_secs(30),
        tug_tests::streaming::exec(&target, None, false),
    )
    .await
    .expect("the attach session ends when the container exits")
    .expect("attach over SPDY");
    let text = String::from_utf8_lossy(&attached.stdout);
    assert!(
        text.contains("tick 1\n") && text.ends_with("tick 6\n"),
        "{text:?}"
    );
    // Attach with stdin to a container created with stdin (`kubectl attach -i`): stdin_once
    // closes its stdin when the session's stdin ends.
    let mut config = container(
        substrate,
        "reader",
        &[
            "sh",
            "-c",
            "while read line; do echo \"got $line\"; done; echo bye",
        ],
    );
    config.stdin = true;
    config.stdin_once = true;
    let reader = create(&mut cri, &sandbox, &sandbox_config, config).await;
    start(&mut cri, &reader).await;
    let target = cri
        .runtime
        .attach(AttachRequest {
            container_id: reader.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("Attach with stdin")
        .into_inner()
        .url;
    let attached = tokio::time::timeout(
        Duration::from_secs(30),
        tug_tests::streaming::exec(&target, Some(b"hello\nworld\n"), false),
    )
    .await
    .expect("the attach session ends when the container exits")
    .expect("attach with stdin over SPDY");
    assert_eq!(
        String::from_utf8_lossy(&attached.stdout),
        "got hello\ngot world\nbye\n"
    );
    assert_eq!(
        exited(&cri, &reader, Duration::from_secs(10))
            .await
            .exit_code,
        0,
        "the end of stdin ended the container"
    );
    if strict {
        // (containerd's CRI hands out a URL and fails the session instead.)
        let refused = cri
            .runtime
            .attach(AttachRequest {
                container_id: sleeper.clone(),
                stdin: true,
                tty: false,
                stdout: true,
                stderr: true,
            })
            .await
            .expect_err("stdin of a container created without it");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    }
    let began = Instant::now();
    let timed_out = exec(&mut cri, &sleeper, &["sleep", "30"], 1).await;
    assert!(
        timed_out.is_err(),
        "ExecSync past its timeout fails: {timed_out:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "the timeout is enforced ({:?})",
        began.elapsed()
    );
    if strict {
        assert_eq!(timed_out.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    }
    let running = ContainerFilter {
        pod_sandbox_id: sandbox.clone(),
        state: Some(ContainerStateValue {
            state: ContainerState::ContainerRunning as i32,
        }),
        ..Default::default()
    };
    let listed = cri
        .runtime
        .list_containers(ListContainersRequest {
            filter: Some(running),
        })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert_eq!(
        listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [sleeper.as_str()]
    );
    let by_label = ContainerFilter {
        label_selector: HashMap::from([(
            "io.kubernetes.container.name".to_owned(),
            "exiter".to_owned(),
        )]),
        pod_sandbox_id: sandbox.clone(),
        ..Default::default()
    };
    let labelled = cri
        .runtime
        .list_containers(ListContainersRequest {
            filter: Some(by_label),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(
        labelled.len() == 1 && labelled[0].id == exiter,
        "{labelled:?}"
    );
    let stats = cri
        .runtime
        .container_stats(ContainerStatsRequest {
            container_id: sleeper.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    assert!(
        stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .is_some_and(|v| v.value > 0),
        "a running container reports its memory working set"
    );
    assert!(
        stats
            .cpu
            .is_some_and(|c| c.usage_core_nano_seconds.is_some())
    );

    // sleep as PID 1 ignores SIGTERM: StopContainer waits the timeout, then SIGKILLs.
    let began = Instant::now();
    cri.runtime
        .stop_container(StopContainerRequest {
            container_id: sleeper.clone(),
            timeout: 2,
        })
        .await
        .expect("StopContainer");
    let stopped = status(&mut cri, &sleeper).await;
    assert_eq!(stopped.state, ContainerState::ContainerExited as i32);
    assert_eq!(stopped.exit_code, 137, "SIGKILLed after the grace period");
    assert!(
        began.elapsed() >= Duration::from_millis(1500),
        "the grace period was given ({:?})",
        began.elapsed()
    );
    cri.runtime
        .stop_container(StopContainerRequest {
            container_id: sleeper.clone(),
            timeout: 2,
        })
        .await
        .expect("StopContainer of an exited container succeeds");

    // Over its memory limit, a container is OOM-killed and says so.
    let mut hog = container(
        substrate,
        "hog",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
    );
    hog.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        memory_limit_in_bytes: 32 << 20,
        ..Default::default()
    });
    let hog = create(&mut cri, &sandbox, &sandbox_config, hog).await;
    start(&mut cri, &hog).await;
    let killed = exited(&cri, &hog, Duration::from_secs(30)).await;
    assert_eq!(killed.reason, "OOMKilled", "{killed:?}");
    assert_eq!(killed.exit_code, 137);

    // Bad input: errors that name the object; nothing else disturbed.
    let missing_sandbox = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: "0123456789abcdef-no-such-sandbox".into(),
            config: Some(container(substrate, "x", &["true"])),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .expect_err("CreateContainer in an unknown sandbox");
    assert_eq!(
        missing_sandbox.code(),
        tonic::Code::NotFound,
        "{missing_sandbox}"
    );
    let mut absent_image = container(substrate, "absent", &["true"]);
    absent_image.image = Some(ImageSpec {
        image: format!("{}/tug-test/never-pushed:latest", substrate.registry),
        ..Default::default()
    });
    let no_image = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(absent_image),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .expect_err("CreateContainer from an image that is not present");
    let unknown = cri
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: "feedfacefeedface0000".into(),
            verbose: false,
        })
        .await
        .expect_err("ContainerStatus of an unknown container");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");
    if strict {
        assert_eq!(no_image.code(), tonic::Code::NotFound, "{no_image}");
        assert!(no_image.message().contains("never-pushed"), "{no_image}");
        let mut bad_mount = container(substrate, "badmount", &["true"]);
        bad_mount.mounts = vec![Mount {
            container_path: "relative/path".into(),
            host_path: "/tmp".into(),
            ..Default::default()
        }];
        let invalid = cri
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(bad_mount),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .expect_err("a relative mount path");
        assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid}");
        assert!(invalid.message().contains("relative/path"), "{invalid}");
    }
    assert_eq!(
        status(&mut cri, &exiter).await.exit_code,
        3,
        "earlier containers are untouched"
    );

    remove_all(
        &mut cri,
        &sandbox,
        &[&exiter, &sleeper, &hog, &ticker, &peer, &reader],
    )
    .await;
    let gone = cri
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: exiter.clone(),
            verbose: false,
        })
        .await
        .expect_err("a removed container has no status");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    Box::pin(shared_process_namespace(&mut cri, substrate, strict)).await;
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test shim_containers -- --ignored"]
async fn container_lifecycle_on_tug_shim() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let shim = TugShim::start("containers", "10.254.3.0/24").await;
    Box::pin(exercise_containers(shim.cri().await, &substrate, true)).await;
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test shim_containers -- --ignored"]
async fn the_same_container_suite_passes_against_containerds_own_cri() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let _cni = install_tug_cni(&substrate, "10.254.4.0/24");
    Box::pin(exercise_containers(
        Cri::connect(&substrate.containerd_sock).await,
        &substrate,
        false,
    ))
    .await;
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test shim_containers -- --ignored"]
async fn tug_shim_streams_container_events() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let shim = TugShim::start("events", "10.254.5.0/24").await;
    let mut cri = shim.cri().await;
    ready(&cri).await;
    pull(&mut cri, &substrate).await;
    let mut events = cri
        .runtime
        .get_container_events(GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner();
    let logs = tempfile::tempdir().unwrap();
    let config = sandbox_config(&unique_name("events"), logs.path());
    let sandbox = run_sandbox(&mut cri, &config).await;
    let id = create(
        &mut cri,
        &sandbox,
        &config,
        container(&substrate, "brief", &["true"]),
    )
    .await;
    start(&mut cri, &id).await;
    exited(&cri, &id, Duration::from_secs(30)).await;
    remove_all(&mut cri, &sandbox, &[&id]).await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("an event within 10 s")
            .expect("the event stream")
            .expect("an event");
        if event.container_id == id {
            seen.push(ContainerEventType::try_from(event.container_event_type).unwrap());
        }
    }
    assert_eq!(
        seen,
        [
            ContainerEventType::ContainerCreatedEvent,
            ContainerEventType::ContainerStartedEvent,
            ContainerEventType::ContainerStoppedEvent,
            ContainerEventType::ContainerDeletedEvent
        ]
    );
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test shim_containers -- --ignored"]
async fn a_sigkilled_shim_restarts_with_every_sandbox_and_container() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let mut shim = TugShim::start("restart", "10.254.6.0/24").await;
    let mut cri = shim.cri().await;
    ready(&cri).await;
    pull(&mut cri, &substrate).await;
    let logs = tempfile::tempdir().unwrap();
    let config = sandbox_config(&unique_name("restart"), logs.path());
    let sandbox = run_sandbox(&mut cri, &config).await;
    let long = create(
        &mut cri,
        &sandbox,
        &config,
        container(&substrate, "long", &["sh", "-c", "echo before; sleep 3600"]),
    )
    .await;
    let short = create(
        &mut cri,
        &sandbox,
        &config,
        container(
            &substrate,
            "short",
            &["sh", "-c", "sleep 2; echo after; exit 4"],
        ),
    )
    .await;
    let mut listener_config = container(
        &substrate,
        "listener",
        &["sh", "-c", "while read line; do echo \"heard $line\"; done"],
    );
    listener_config.stdin = true;
    listener_config.stdin_once = true;
    let listener = create(&mut cri, &sandbox, &config, listener_config).await;
    start(&mut cri, &long).await;
    start(&mut cri, &short).await;
    start(&mut cri, &listener).await;

    shim.kill9();
    // The short container exits while nobody watches.
    tokio::time::sleep(Duration::from_secs(4)).await;
    shim.restart().await;
    let mut cri = shim.cri().await;
    ready(&cri).await;

    let sandboxes = cri
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(
        sandboxes
            .iter()
            .any(|s| s.id == sandbox && s.state == PodSandboxState::SandboxReady as i32),
        "the sandbox is still listed and ready: {sandboxes:?}"
    );
    assert_eq!(
        status(&mut cri, &long).await.state,
        ContainerState::ContainerRunning as i32
    );
    let output = exec(&mut cri, &long, &["echo", "still here"], 10)
        .await
        .expect("ExecSync after restart");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "still here\n");
    let short_status = exited(&cri, &short, Duration::from_secs(20)).await;
    assert_eq!(
        short_status.exit_code, 4,
        "an exit during the outage is recorded: {short_status:?}"
    );
    let log = std::fs::read_to_string(logs.path().join("short/0.log")).unwrap_or_default();
    assert!(
        log.contains("stdout F after"),
        "logs kept flowing while the shim was down: {log}"
    );
    // A container's stdin stays open through the outage and can be attached to afterwards.
    assert_eq!(
        status(&mut cri, &listener).await.state,
        ContainerState::ContainerRunning as i32,
        "the shim's restart did not end the container's stdin"
    );
    let target = cri
        .runtime
        .attach(AttachRequest {
            container_id: listener.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("Attach after restart")
        .into_inner()
        .url;
    let attached = tokio::time::timeout(
        Duration::from_secs(30),
        tug_tests::streaming::exec(&target, Some(b"ping\n"), false),
    )
    .await
    .expect("the attach session ends when the container exits")
    .expect("attach over SPDY");
    assert_eq!(String::from_utf8_lossy(&attached.stdout), "heard ping\n");
    remove_all(&mut cri, &sandbox, &[&long, &short, &listener]).await;
}
