//! containerd tier: the README's main job. `scripts/demo --check` runs this machine as a
//! standalone tug node (netd, shim, kubelet, proxy: the real binary), checks that the ClusterIP
//! and the NodePort reach both web pods, that a crashing container is restarted with back-off,
//! then cleans up. Here it is run as the operator runs it, and the machine is checked clean after.

use std::process::Command;

use tug_tests::cni::tug_binary;
use tug_tests::tier::{Tier, require};

fn output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up && cargo build -p tug && cargo test -p tug-tests --test demo -- --ignored"]
fn the_demo_runs_a_standalone_node_that_serves_its_service_and_cleans_up() {
    require(Tier::Containerd);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo");
    let out = Command::new(&script)
        .arg("--check")
        .env("TUG_BINARY", tug_binary())
        .output()
        .expect("run scripts/demo --check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/demo --check failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for line in [
        "two web pods run and are Ready",
        "the ClusterIP reaches both web pods",
        "the NodePort reaches both web pods",
        "CrashLoopBackOff",
        "tug status reports every service healthy",
    ] {
        assert!(
            stdout.lines().any(|l| l.contains("ok") && l.contains(line)),
            "no passed check {line:?} in:\n{stdout}"
        );
    }
    assert!(stderr.contains("every check passed"), "{stderr}");
    // Nothing of the demo node is left behind.
    assert!(!std::path::Path::new("/run/tug-demo").exists());
    assert!(!std::path::Path::new("/var/lib/tug-demo").exists());
    let nat = output("iptables-save", &["-t", "nat"]);
    assert!(
        !nat.contains("KUBE-SVC-"),
        "proxy rules left behind:\n{nat}"
    );
    let tables = output("nft", &["list", "tables"]);
    assert!(
        !tables.contains("tug-netd"),
        "netd's table left behind: {tables}"
    );
    let routes = output("ip", &["route", "show", "root", "10.244.0.0/24"]);
    assert!(routes.trim().is_empty(), "pod routes left behind: {routes}");
    let processes = output("ps", &["-eo", "args"]);
    assert!(
        !processes.lines().any(|l| l.contains("tug-demo")),
        "demo processes left running:\n{processes}"
    );
}
