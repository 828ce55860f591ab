//! netns tier: the shim's pod network plumbing — namespaces pinned without a process, and CNI
//! plugin chains executed per the CNI spec — with tug-cni and with Debian's reference plugins
//! (bridge + host-local, portmap chained for a hostPort).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::json;
use tug_runtime_shim::namespaces;
use tug_runtime_shim::network::{Attachment, Cni, result_ips};
use tug_tests::cni::install_plugin;
use tug_tests::netns::Netns;
use tug_tests::tier::{Tier, require};

fn in_netns(path: &Path, args: &[&str]) -> String {
    let output = Command::new("nsenter")
        .arg(format!("--net={}", path.display()))
        .args(args)
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `f` with a fresh runtime on a thread inside `node`, so plugins it execs run there too.
fn on_node<T: Send>(node: &Netns, f: impl AsyncFnOnce() -> T + Send) -> T {
    node.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

fn attachment(
    id: &str,
    netns: &Path,
    capabilities: BTreeMap<String, serde_json::Value>,
) -> Attachment {
    Attachment {
        container_id: id.into(),
        netns: netns.to_owned(),
        ifname: "eth0".into(),
        args: vec![
            ("K8S_POD_NAMESPACE".into(), "test".into()),
            ("K8S_POD_NAME".into(), id.into()),
        ],
        capabilities,
    }
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test shim_network -- --ignored"]
fn pinned_sandbox_netns_attached_with_tug_cni_and_detached() {
    require(Tier::Netns);
    let node = Netns::new("sn");
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .unwrap();
    let (conf, bin, state, pins) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    install_plugin(bin.path());
    let list = json!({"cniVersion": "1.0.0", "name": "tug", "plugins": [{"type": "tug-cni", "podCIDRs": ["10.244.20.0/24"], "dataDir": state.path()}]});
    std::fs::write(conf.path().join("10-tug.conflist"), list.to_string()).unwrap();
    let cni = Cni {
        conf_dir: conf.path().to_owned(),
        bin_dirs: vec![bin.path().to_owned()],
    };

    let sandbox = namespaces::create(pins.path(), "sandbox-a").expect("pin a new netns");
    assert!(
        in_netns(&sandbox, &["ip", "-o", "link"]).contains("lo:"),
        "a pinned, empty namespace"
    );
    let network = cni.load().expect("the conflist loads");
    let attach = attachment("sandbox-a", &sandbox, BTreeMap::new());
    let result =
        on_node(&node, async || cni.add(&network, &attach).await).expect("ADD through tug-cni");
    let ips = result_ips(&result);
    assert_eq!(ips.len(), 1, "{result}");
    assert!(
        in_netns(&sandbox, &["ip", "-o", "addr", "show", "eth0"]).contains(&ips[0]),
        "the pod address is in the pinned namespace"
    );

    on_node(&node, async || {
        cni.del(&network, &attach, Some(&result)).await
    })
    .expect("DEL");
    assert!(
        !in_netns(&sandbox, &["ip", "-o", "link"]).contains("eth0"),
        "DEL removed the interface"
    );
    namespaces::remove(&sandbox).expect("unpin");
    assert!(!sandbox.exists());
    namespaces::remove(&sandbox).expect("removing again is fine");
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo test -p tug-tests --test shim_network -- --ignored"]
fn reference_plugin_chain_with_portmap_gets_the_port_mapping_capability() {
    require(Tier::Netns);
    let reference = Path::new("/usr/lib/cni");
    assert!(
        reference.join("portmap").is_file(),
        "Debian's containernetworking-plugins are missing (scripts/install-deps installs them)"
    );
    let node = Netns::new("rn");
    let (conf, state, pins) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let list = json!({"cniVersion": "1.0.0", "name": "ref", "plugins": [
        {"type": "bridge", "bridge": "tugbr0", "isGateway": true, "ipMasq": false,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.21.0/24"}]], "dataDir": state.path()}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]});
    std::fs::write(conf.path().join("10-ref.conflist"), list.to_string()).unwrap();
    let cni = Cni {
        conf_dir: conf.path().to_owned(),
        bin_dirs: vec![reference.to_owned()],
    };
    let network = cni.load().unwrap();
    let sandbox = namespaces::create(pins.path(), "sandbox-ref").unwrap();
    let ports = BTreeMap::from([(
        "portMappings".to_owned(),
        json!([{"hostPort": 30181, "containerPort": 8080, "protocol": "tcp"}]),
    )]);
    let attach = attachment("sandbox-ref", &sandbox, ports);

    let result = on_node(&node, async || cni.add(&network, &attach).await)
        .expect("ADD through bridge, host-local and portmap");
    let ips = result_ips(&result);
    assert!(
        ips.first().is_some_and(|ip| ip.starts_with("10.244.21.")),
        "{result}"
    );
    let nat = in_netns(&node.path(), &["iptables-save", "-t", "nat"]);
    assert!(
        nat.contains("30181") && nat.contains(&format!("{}:8080", ips[0])),
        "portmap programmed the hostPort from runtimeConfig: {nat}"
    );

    on_node(&node, async || {
        cni.del(&network, &attach, Some(&result)).await
    })
    .expect("DEL in reverse order");
    let nat = in_netns(&node.path(), &["iptables-save", "-t", "nat"]);
    assert!(
        !nat.contains("30181"),
        "portmap removed the hostPort: {nat}"
    );
    namespaces::remove(&sandbox).unwrap();
}
