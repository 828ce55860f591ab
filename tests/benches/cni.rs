//! CNI ADD and DEL latency: tug-cni against Debian's reference `bridge` + `host-local` pair,
//! measured in the same run on the same kind of namespaces. Prints p50/p99 and the ratios.
//! Needs root: `env $(scripts/build-release) cargo bench -p tug-tests --bench cni` measures the
//! statically linked tug-cni an installation gets.

#![allow(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tug_tests::cni::install_plugin;
use tug_tests::measure::percentile;
use tug_tests::netns::Netns;
use tug_tests::report::Report;

const ITERATIONS: usize = 200;

fn invoke(
    node: &Netns,
    plugin: &Path,
    cni_path: &Path,
    command: &str,
    id: &str,
    pod: &Path,
    conf: &Value,
) -> Duration {
    let conf = conf.to_string();
    node.run(|| {
        let started = Instant::now();
        let mut child = Command::new(plugin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", pod)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("exec plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let elapsed = started.elapsed();
        assert!(
            output.status.success(),
            "{} {command} failed: {}",
            plugin.display(),
            String::from_utf8_lossy(&output.stdout)
        );
        elapsed
    })
}

/// The cost of exec'ing a plugin at all: VERSION does no work.
fn exec_floor(plugin: &Path) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..ITERATIONS)
        .map(|_| {
            let started = Instant::now();
            let mut child = Command::new(plugin)
                .env_clear()
                .env("CNI_COMMAND", "VERSION")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("exec plugin");
            // The reference plugin may answer VERSION without reading stdin: a closed pipe here
            // is not a failure.
            let _ = child
                .stdin
                .take()
                .unwrap()
                .write_all(br#"{"cniVersion":"1.0.0"}"#);
            assert!(child.wait_with_output().unwrap().status.success());
            started.elapsed()
        })
        .collect();
    (
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

struct Figures {
    add: (Duration, Duration),
    del: (Duration, Duration),
}

fn measure(label: &str, plugin: &Path, cni_path: &Path, conf: &Value) -> Figures {
    let node = Netns::new("bn");
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .unwrap();
    let pods: Vec<Netns> = (0..ITERATIONS).map(|_| Netns::new("bp")).collect();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for (i, pod) in pods.iter().enumerate() {
        adds.push(invoke(
            &node,
            plugin,
            cni_path,
            "ADD",
            &format!("{label}-{i}"),
            &pod.path(),
            conf,
        ));
    }
    for (i, pod) in pods.iter().enumerate() {
        dels.push(invoke(
            &node,
            plugin,
            cni_path,
            "DEL",
            &format!("{label}-{i}"),
            &pod.path(),
            conf,
        ));
    }
    Figures {
        add: (percentile(&mut adds, 0.5), percentile(&mut adds, 0.99)),
        del: (percentile(&mut dels, 0.5), percentile(&mut dels, 0.99)),
    }
}

fn main() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the CNI benchmark needs root (network namespaces)"
    );
    let reference_dir = Path::new("/usr/lib/cni");
    assert!(
        reference_dir.join("bridge").is_file(),
        "Debian's containernetworking-plugins are missing (scripts/install-deps installs them)"
    );
    let state = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let plugin = install_plugin(bin.path());

    let tug_conf = json!({"cniVersion": "1.0.0", "name": "tug", "type": "tug-cni", "podCIDRs": ["10.251.0.0/16"], "mtu": 1450, "dataDir": state.path().join("tug")});
    let ref_conf = json!({"cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "tugbench0", "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.252.0.0/16"}]], "dataDir": state.path().join("host-local")}});

    let tug_floor = exec_floor(&bin.path().join("tug-cni"));
    let ref_floor = exec_floor(&reference_dir.join("bridge"));
    let tug = measure("tug", &bin.path().join("tug-cni"), bin.path(), &tug_conf);
    let reference = measure(
        "ref",
        &reference_dir.join("bridge"),
        reference_dir,
        &ref_conf,
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let ratio = |reference: Duration, tug: Duration| reference.as_secs_f64() / tug.as_secs_f64();
    println!("CNI latency over {ITERATIONS} pods (each a process exec, as a runtime does)");
    println!(
        "tug-cni: {}",
        std::fs::canonicalize(&plugin).unwrap_or(plugin).display()
    );
    println!("{:<28} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "tug-cni ADD",
        ms(tug.add.0),
        ms(tug.add.1)
    );
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "bridge+host-local ADD",
        ms(reference.add.0),
        ms(reference.add.1)
    );
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "tug-cni DEL",
        ms(tug.del.0),
        ms(tug.del.1)
    );
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "bridge+host-local DEL",
        ms(reference.del.0),
        ms(reference.del.1)
    );
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "tug-cni VERSION (exec floor)",
        ms(tug_floor.0),
        ms(tug_floor.1)
    );
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "bridge VERSION (exec floor)",
        ms(ref_floor.0),
        ms(ref_floor.1)
    );
    println!(
        "ADD: tug-cni is {:.1}x faster at p50, {:.1}x at p99",
        ratio(reference.add.0, tug.add.0),
        ratio(reference.add.1, tug.add.1)
    );
    println!(
        "DEL: tug-cni is {:.1}x faster at p50, {:.1}x at p99",
        ratio(reference.del.0, tug.del.0),
        ratio(reference.del.1, tug.del.1)
    );
    let report = Report::new(
        "cni",
        "CNI plugin: ADD and DEL, tug-cni against bridge + host-local",
        &format!(
            "{ITERATIONS} pods one after another, each call a process exec with the config on \
             stdin as a runtime does it, in network namespaces of the same kind. The reference \
             is Debian's containernetworking-plugins `bridge` with `host-local` IPAM. VERSION \
             does no work: it is the cost of exec'ing each binary at all."
        ),
    );
    let reference_name = "bridge + host-local";
    for (case, tug, reference) in [
        ("ADD p50", tug.add.0, reference.add.0),
        ("ADD p99", tug.add.1, reference.add.1),
        ("DEL p50", tug.del.0, reference.del.0),
        ("DEL p99", tug.del.1, reference.del.1),
        ("VERSION p50", tug_floor.0, ref_floor.0),
    ] {
        report.millis(case, tug, &[(reference_name, reference)]);
    }
}
