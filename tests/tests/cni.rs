//! netns tier: the tug-cni plugin, exec'd as a runtime does, on "nodes" and "pods" made of real
//! network namespaces.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use tug_tests::cni::{TugCni, tug_binary};
use tug_tests::netns::{Netns, tcp_round_trip};
use tug_tests::tier::{Tier, require};

/// A node namespace with an address of its own (on `lo`: this kernel has no dummy devices) and
/// forwarding on (tug netd enables it).
fn node(label: &str, ip: &str) -> Netns {
    let node = Netns::new(label);
    node.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .expect("enable forwarding in the node");
    node
}

fn ip(text: &str) -> Ipv4Addr {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test cni -- --ignored"]
fn pods_on_a_node_reach_each_other_and_the_node_with_their_own_addresses() {
    require(Tier::Netns);
    let cni = TugCni::new("10.244.7.0/24");
    let node = node("cn", "192.168.200.1");
    let (pod_a, pod_b) = (Netns::new("pa"), Netns::new("pb"));
    let (ip_a, result) = cni.add(&node, "pod-a", &pod_a);
    let (ip_b, _) = cni.add(&node, "pod-b", &pod_b);
    assert_ne!(ip_a, ip_b);
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        pod_a.path().to_str().unwrap()
    );
    assert!(
        result["interfaces"][0]["mac"]
            .as_str()
            .is_some_and(|m| m.len() == 17),
        "{result}"
    );

    let peer = tcp_round_trip(&pod_a, &pod_b, SocketAddr::from((ip(&ip_b), 8080)));
    assert_eq!(
        peer.ip(),
        ip(&ip_a),
        "pod B sees pod A's own address (no NAT)"
    );
    let peer = tcp_round_trip(&node, &pod_a, SocketAddr::from((ip(&ip_a), 8081)));
    assert_eq!(
        peer.ip(),
        ip("192.168.200.1"),
        "a pod sees the node's own address"
    );
    let peer = tcp_round_trip(&pod_b, &node, SocketAddr::from((ip("192.168.200.1"), 8082)));
    assert_eq!(peer.ip(), ip(&ip_b), "the node sees the pod's address");

    // The host veth's MAC is set, not random, so udev's MACAddressPolicy=persistent leaves it
    // (and the pod's neighbour entry for its gateway) alone.
    let host_veth = result["interfaces"][0]["name"].as_str().unwrap().to_owned();
    // (`ip netns exec` mounts a sysfs of the namespace's own.)
    let assign_type = std::process::Command::new("ip")
        .args(["netns", "exec", node.name(), "cat"])
        .arg(format!("/sys/class/net/{host_veth}/addr_assign_type"))
        .output()
        .expect("run ip netns exec");
    assert_eq!(
        String::from_utf8_lossy(&assign_type.stdout).trim(),
        "3",
        "the host veth's MAC is assigned explicitly (NET_ADDR_SET)"
    );
    let mtu = pod_a.ip(&["-j", "link", "show", "eth0"]);
    let link: serde_json::Value = serde_json::from_slice(&mtu.stdout).unwrap();
    assert_eq!(link[0]["mtu"], 1450, "the configured MTU");
    let lo = pod_a.ip(&["-j", "link", "show", "lo"]);
    assert!(
        String::from_utf8_lossy(&lo.stdout).contains("\"UP\""),
        "lo is up in the pod"
    );

    let check = cni.run(
        &node,
        "CHECK",
        "pod-a",
        Some(&pod_a.path()),
        &cni.conf(json!({"prevResult": result})),
    );
    assert!(
        check.success,
        "CHECK passes on an intact attachment: {}",
        check.json
    );
    pod_a.ip(&["route", "del", "default"]);
    let check = cni.run(
        &node,
        "CHECK",
        "pod-a",
        Some(&pod_a.path()),
        &cni.conf(json!({"prevResult": result})),
    );
    assert!(!check.success);
    assert_eq!(check.json["code"], 100, "{}", check.json);
    assert!(
        check.json["details"]
            .as_str()
            .unwrap()
            .contains("default route"),
        "{}",
        check.json
    );
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test cni -- --ignored"]
fn del_is_idempotent_and_releases_everything() {
    require(Tier::Netns);
    let cni = TugCni::new("10.244.8.0/24");
    let node = node("dn", "192.168.201.1");
    let pod = Netns::new("dp");
    let (pod_ip, result) = cni.add(&node, "pod-del", &pod);
    assert_eq!(cni.allocations(), std::slice::from_ref(&pod_ip));
    for attempt in 1..=3 {
        let del = cni.run(
            &node,
            "DEL",
            "pod-del",
            Some(&pod.path()),
            &cni.conf(json!({"prevResult": result})),
        );
        assert!(del.success, "DEL #{attempt} succeeds: {}", del.json);
    }
    assert!(cni.allocations().is_empty(), "the address is released");
    let leftovers: Vec<_> = std::fs::read_dir(cni.ipam_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "IPAM state left behind: {leftovers:?}"
    );
    let host_links = String::from_utf8_lossy(&node.ip(&["-o", "link"]).stdout).into_owned();
    assert!(
        !host_links.contains(result["interfaces"][0]["name"].as_str().unwrap()),
        "the host veth is gone: {host_links}"
    );
    let routes = String::from_utf8_lossy(&node.ip(&["route"]).stdout).into_owned();
    assert!(
        !routes.contains(&pod_ip),
        "the host route is gone: {routes}"
    );
    drop(pod);
    let del = cni.run(&node, "DEL", "pod-del", None, &cni.conf(json!({})));
    assert!(
        del.success,
        "DEL with the netns already gone succeeds: {}",
        del.json
    );
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test cni -- --ignored"]
fn the_tug_binary_run_as_tug_cni_is_the_same_plugin() {
    require(Tier::Netns);
    // Installed as a symlink to `tug` instead of the small `tug-cni` binary.
    let cni = TugCni::new("10.244.13.0/24");
    std::fs::remove_file(cni.plugin()).unwrap();
    std::os::unix::fs::symlink(tug_binary(), cni.plugin()).unwrap();
    let node = node("an", "192.168.206.1");
    let pod = Netns::new("ap");
    let (pod_ip, result) = cni.add(&node, "pod-argv0", &pod);
    assert_eq!(cni.allocations(), [pod_ip]);
    let del = cni.run(
        &node,
        "DEL",
        "pod-argv0",
        Some(&pod.path()),
        &cni.conf(json!({"prevResult": result})),
    );
    assert!(del.success, "{}", del.json);
    assert!(cni.allocations().is_empty());
}

/// What happened to one attachment in the thousand.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Added and kept, with this address.
    Kept(String),
    /// Added, then deleted (twice, at once).
    Deleted,
    /// Killed in the middle of its ADD.
    Killed,
}

/// 1,000 attachments on one node, 64 plugin processes at a time: most are added and kept, a
/// third of the rest deleted again with two DELs racing each other, and every tenth ADD killed
/// in the middle. No two pods ever hold one address, and once a GC has been told which
/// attachments are real, exactly their addresses and host veths are left.
#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test cni -- --ignored"]
fn a_thousand_concurrent_adds_and_dels_with_kills_share_no_address_and_leak_nothing() {
    require(Tier::Netns);
    const PODS: usize = 1000;
    let cni = std::sync::Arc::new(TugCni::new("10.244.16.0/22"));
    let node = std::sync::Arc::new(node("cc", "192.168.202.1"));
    let pods: std::sync::Arc<Vec<Netns>> =
        std::sync::Arc::new((0..PODS).map(|_| Netns::new("cp")).collect());
    let conf = cni.conf(json!({}));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let began = std::time::Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (cni, node, pods, conf, next) = (
                cni.clone(),
                node.clone(),
                pods.clone(),
                conf.clone(),
                next.clone(),
            );
            std::thread::spawn(move || {
                let mut fates = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= PODS {
                        return fates;
                    }
                    let id = format!("ctr-{i}");
                    let pod = pods[i].path();
                    if i % 10 == 0 {
                        let mut child = cni
                            .command(&node, "ADD", &id, Some(&pod))
                            .spawn()
                            .expect("exec tug-cni");
                        std::io::Write::write_all(
                            &mut child.stdin.take().expect("stdin"),
                            conf.to_string().as_bytes(),
                        )
                        .expect("write the configuration");
                        std::thread::sleep(Duration::from_millis((i as u64 / 10) % 12));
                        let _ = child.kill();
                        let _ = child.wait();
                        fates.push((id, Fate::Killed));
                        continue;
                    }
                    let added = cni.run(&node, "ADD", &id, Some(&pod), &conf);
                    assert!(added.success, "ADD {id}: {}", added.json);
                    let address = added.json["ips"][0]["address"]
                        .as_str()
                        .expect("an address")
                        .to_owned();
                    if i % 3 == 0 {
                        let dels: Vec<_> = (0..2)
                            .map(|_| {
                                let (cni, node, conf, id) =
                                    (cni.clone(), node.clone(), conf.clone(), id.clone());
                                std::thread::spawn(move || cni.run(&node, "DEL", &id, None, &conf))
                            })
                            .collect();
                        for del in dels {
                            let del = del.join().expect("a DEL thread");
                            assert!(del.success, "DEL {id}: {}", del.json);
                        }
                        fates.push((id, Fate::Deleted));
                    } else {
                        fates.push((id, Fate::Kept(address)));
                    }
                }
            })
        })
        .collect();
    let fates: Vec<(String, Fate)> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("a worker"))
        .collect();
    let took = began.elapsed();
    assert_eq!(fates.len(), PODS);
    let kept: Vec<(&String, &String)> = fates
        .iter()
        .filter_map(|(id, fate)| match fate {
            Fate::Kept(address) => Some((id, address)),
            _ => None,
        })
        .collect();
    let mut addresses: Vec<&String> = kept.iter().map(|(_, a)| *a).collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(
        addresses.len(),
        kept.len(),
        "two pods were given one address"
    );

    let valid: Vec<serde_json::Value> = kept
        .iter()
        .map(|(id, _)| json!({"containerID": id, "ifname": "eth0"}))
        .collect();
    let gc = cni.run(
        &node,
        "GC",
        "",
        None,
        &cni.conf(json!({"cni.dev/valid-attachments": valid})),
    );
    assert!(gc.success, "GC: {}", gc.json);
    let mut held = cni.allocations();
    held.sort();
    let mut wanted: Vec<String> = kept
        .iter()
        .map(|(_, a)| a.trim_end_matches("/32").to_owned())
        .collect();
    wanted.sort();
    assert_eq!(
        held, wanted,
        "after GC, exactly the kept pods' addresses are held"
    );
    let links = String::from_utf8_lossy(&node.ip(&["-o", "link"]).stdout).into_owned();
    let host_veths = links
        .lines()
        .filter(|l| l.contains(": tug") || l.contains(": tmp"))
        .count();
    assert_eq!(
        host_veths,
        kept.len(),
        "after GC, exactly the kept pods' host veths"
    );
    // The kept pods have their addresses, in their own namespaces.
    for (i, (id, address)) in kept.iter().enumerate().step_by(37) {
        let index: usize = id.trim_start_matches("ctr-").parse().expect("an index");
        let shown =
            String::from_utf8_lossy(&pods[index].ip(&["-4", "-o", "addr", "show", "eth0"]).stdout)
                .into_owned();
        assert!(
            shown.contains(address.as_str()),
            "pod {i} ({id}) lacks {address}: {shown}"
        );
    }
    eprintln!(
        "{PODS} attachments ({} kept, {} deleted twice at once, {} killed mid-ADD) in {took:.1?}",
        kept.len(),
        fates.iter().filter(|(_, f)| *f == Fate::Deleted).count(),
        fates.iter().filter(|(_, f)| *f == Fate::Killed).count()
    );
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test cni -- --ignored"]
fn a_killed_add_leaves_nothing_gc_cannot_reclaim() {
    require(Tier::Netns);
    let cni = TugCni::new("10.244.10.0/24");
    let node = node("kn", "192.168.203.1");
    let keeper = Netns::new("kk");
    cni.add(&node, "keeper", &keeper);
    let conf = cni.conf(json!({})).to_string();
    // Kill ADDs at different moments; some die before, some during, some after their work.
    for (i, delay) in [0u64, 1, 2, 3, 5, 8, 13].iter().enumerate() {
        let pod = Netns::new("kp");
        let mut child = cni
            .command(&node, "ADD", &format!("killed-{i}"), Some(&pod.path()))
            .spawn()
            .expect("exec tug-cni");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), conf.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(*delay));
        let _ = child.kill();
        let _ = child.wait();
    }
    let gc = cni.run(
        &node,
        "GC",
        "",
        None,
        &cni.conf(
            json!({"cni.dev/valid-attachments": [{"containerID": "keeper", "ifname": "eth0"}]}),
        ),
    );
    assert!(gc.success, "GC: {}", gc.json);
    assert_eq!(
        cni.allocations().len(),
        1,
        "only the keeper's address is left: {:?}",
        cni.allocations()
    );
    let links = String::from_utf8_lossy(&node.ip(&["-o", "link"]).stdout).into_owned();
    let tug_links = links
        .lines()
        .filter(|l| l.contains(": tug") || l.contains(": tmp"))
        .count();
    assert_eq!(tug_links, 1, "only the keeper's host veth is left: {links}");
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test cni -- --ignored"]
fn bad_input_gets_spec_error_json_with_the_right_code() {
    require(Tier::Netns);
    let cni = TugCni::new("10.244.11.0/24");
    let node = node("bn", "192.168.204.1");
    let pod = Netns::new("bp");
    let cases = [
        ("bad JSON", "ADD", Some(pod.path()), json!("{not json"), 6),
        (
            "unknown version",
            "ADD",
            Some(pod.path()),
            cni.conf(json!({"cniVersion": "9.9.9"})),
            1,
        ),
        (
            "ipam delegation",
            "ADD",
            Some(pod.path()),
            cni.conf(json!({"ipam": {"type": "host-local"}})),
            2,
        ),
        (
            "bad MTU",
            "ADD",
            Some(pod.path()),
            cni.conf(json!({"mtu": 12})),
            7,
        ),
        ("missing netns", "ADD", None, cni.conf(json!({})), 4),
        (
            "unknown netns",
            "ADD",
            Some("/run/netns/does-not-exist".into()),
            cni.conf(json!({})),
            3,
        ),
        (
            "no pod CIDR yet",
            "STATUS",
            None,
            cni.conf(json!({"podCIDRs": []})),
            50,
        ),
        ("unknown command", "FROB", None, cni.conf(json!({})), 4),
    ];
    for (what, command, netns, conf, want) in cases {
        let mut child = cni
            .command(&node, command, "bad-input", netns.as_deref())
            .spawn()
            .expect("exec tug-cni");
        let stdin = match &conf {
            serde_json::Value::String(raw) => raw.clone(),
            other => other.to_string(),
        };
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            !output.status.success(),
            "{what}: exit status must be non-zero"
        );
        let error: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("{what}: {}", String::from_utf8_lossy(&output.stdout)));
        assert_eq!(error["code"], want, "{what}: {error}");
        assert!(
            error["msg"].as_str().is_some_and(|m| !m.is_empty()) && error["cniVersion"].is_string(),
            "{what}: {error}"
        );
    }
    assert!(
        cni.allocations().is_empty(),
        "failed ADDs leave no allocation"
    );
    let status = cni.run(&node, "STATUS", "", None, &cni.conf(json!({})));
    assert!(
        status.success && status.json.is_null(),
        "STATUS with a pod CIDR is ready: {}",
        status.json
    );
}

#[test]
#[ignore = "netns tier (root): run as root via ./scripts/test, or cargo build -p tug && cargo test -p tug-tests --test cni -- --ignored"]
fn dual_stack_pods_get_both_families_and_talk_over_ipv6() {
    require(Tier::Netns);
    let cni = TugCni::new("10.244.12.0/24").with_ipv6("fd00:10:244:12::/64");
    let node = node("ds", "192.168.205.1");
    node.ip(&["-6", "addr", "add", "fd00:192:168:205::1/128", "dev", "lo"]);
    node.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1"))
        .expect("enable IPv6 forwarding in the node");
    let (pod_a, pod_b) = (Netns::new("d6a"), Netns::new("d6b"));
    let (_, result_a) = cni.add(&node, "dual-a", &pod_a);
    let (_, result_b) = cni.add(&node, "dual-b", &pod_b);
    let v6 = |result: &serde_json::Value| -> std::net::Ipv6Addr {
        let ips = result["ips"].as_array().expect("ips");
        assert_eq!(ips.len(), 2, "one address per family: {result}");
        assert_eq!(ips[1]["gateway"], "fe80::1");
        ips[1]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/128")
            .parse()
            .expect("an IPv6 address")
    };
    let (a6, b6) = (v6(&result_a), v6(&result_b));
    assert!(
        "fd00:10:244:12::/64"
            .parse::<ipnet::Ipv6Net>()
            .unwrap()
            .contains(&a6)
    );
    assert_eq!(
        result_a["routes"][1],
        json!({"dst": "::/0", "gw": "fe80::1"})
    );

    let peer = tcp_round_trip(&pod_a, &pod_b, SocketAddr::from((b6, 8090)));
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V6(a6),
        "pod B sees pod A's own IPv6 address"
    );
    let node6: std::net::Ipv6Addr = "fd00:192:168:205::1".parse().unwrap();
    let peer = tcp_round_trip(&node, &pod_a, SocketAddr::from((a6, 8091)));
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V6(node6),
        "a pod sees the node's own IPv6 address"
    );

    let check = cni.run(
        &node,
        "CHECK",
        "dual-a",
        Some(&pod_a.path()),
        &cni.conf(json!({"prevResult": result_a})),
    );
    assert!(
        check.success,
        "CHECK of a dual-stack attachment: {}",
        check.json
    );
    let del = cni.run(
        &node,
        "DEL",
        "dual-a",
        Some(&pod_a.path()),
        &cni.conf(json!({"prevResult": result_a})),
    );
    assert!(del.success, "{}", del.json);
    assert_eq!(
        cni.allocations().len(),
        2,
        "DEL released both of pod A's addresses; pod B's two stay: {:?}",
        cni.allocations()
    );
}
