//! kube-proxy rule programming, iptables mode: programming 1k/10k/30k Services × 2 endpoints
//! from scratch and applying one changed Service at 30k, through tug's backend, next to
//! `iptables-restore` loading the very same ruleset (the floor any iptables proxy pays), each in
//! a fresh network namespace. Needs root: `cargo bench -p tug-tests --bench proxy`.

#![allow(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tug_proxy::iptables::{Iptables, IptablesConfig, render, restore_input};
use tug_proxy::model::{Endpoint, Protocol, ServicePort};
use tug_tests::netns::Netns;
use tug_tests::report::Report;

fn services(count: usize) -> Vec<ServicePort> {
    (0..count)
        .map(|i| {
            let i = i as u32;
            let endpoint = |n: u32| Endpoint {
                ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 2 + n)),
                port: 8080,
                local: false,
            };
            let endpoints = vec![endpoint(0), endpoint(1)];
            ServicePort {
                name: format!("ns{}/svc{i}:http", i % 100),
                protocol: Protocol::Tcp,
                cluster_ips: vec![IpAddr::V4(Ipv4Addr::from(0xac10_0000 + i))],
                port: 80,
                node_port: None,
                external_ips: vec![],
                load_balancer_ips: vec![],
                affinity_timeout: None,
                cluster_endpoints: endpoints.clone(),
                external_endpoints: endpoints,
                health_check_node_port: None,
                external_policy_local: false,
            }
        })
        .collect()
}

fn config() -> IptablesConfig {
    IptablesConfig {
        cluster_cidr: Some("10.0.0.0/8".into()),
        ..Default::default()
    }
}

fn raw_restore(ns: &Netns, program: &str, input: &str) -> Duration {
    ns.run(|| timed(program, &["-w", "5", "--noflush"], input))
}

fn nft_load(ns: &Netns, text: &str) -> Duration {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    ns.run(|| {
        let began = Instant::now();
        let output = Command::new("nft")
            .arg("-f")
            .arg(file.path())
            .output()
            .expect("run nft");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        began.elapsed()
    })
}

/// `nft -f` text of the ruleset upstream kube-proxy's nftables mode writes for `ports` (a chain
/// per service and per endpoint, `numgen` verdict maps between them, `service-ips` pointing at
/// the service chains), the shape tug's table had before its flat path.
fn upstream_ruleset(ports: &[ServicePort]) -> String {
    let mut text = String::from(
        "table ip kube-proxy {\n\tchain mark-for-masquerade {\n\t\tmeta mark set meta mark or 0x4000\n\t}\n",
    );
    let mut elements = Vec::new();
    for port in ports {
        let service = port.service_chain().replace("KUBE-SVC", "service");
        let mut vmap = Vec::new();
        for (slot, endpoint) in port.cluster_endpoints.iter().enumerate() {
            let chain = port
                .endpoint_chain(endpoint)
                .replace("KUBE-SEP", "endpoint");
            text.push_str(&format!(
                "\tchain {chain} {{\n\t\tip saddr {ip} jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to {ip}:{p}\n\t}}\n",
                ip = endpoint.ip,
                p = endpoint.port
            ));
            vmap.push(format!("{slot} : goto {chain}"));
        }
        text.push_str(&format!(
            "\tchain {service} {{\n\t\tip daddr {ip} ip saddr != 10.0.0.0/8 jump mark-for-masquerade\n\t\tnumgen random mod {n} vmap {{ {vmap} }}\n\t}}\n",
            ip = port.cluster_ips[0],
            n = vmap.len(),
            vmap = vmap.join(", ")
        ));
        elements.push(format!(
            "{} . tcp . {} : goto {service}",
            port.cluster_ips[0], port.port
        ));
    }
    text.push_str(&format!(
        "\tmap service-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\telements = {{ {} }}\n\t}}\n",
        elements.join(",\n\t\t\t")
    ));
    text.push_str(
        "\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n}\n",
    );
    text
}

/// `nft list` prints the slot of tug's endpoint maps as a `mark`, which `nft -f` will not take
/// from a `numgen` expression; declaring the maps by `typeof` instead loads the same objects.
fn loadable(listing: &str) -> String {
    let mut map = String::new();
    listing
        .lines()
        .map(|line| {
            if let Some(name) = line.trim().strip_prefix("map ") {
                map = name.trim_end_matches(" {").to_owned();
            }
            let count = map.rsplit('-').next().unwrap_or("1");
            let line_type = line.trim();
            if line_type == "type ipv4_addr . inet_proto . inet_service . mark : ipv4_addr . inet_service" {
                format!(
                    "\t\ttypeof ip daddr . meta l4proto . th dport . numgen random mod {count} : ip daddr . th dport"
                )
            } else if line_type == "type inet_proto . inet_service . mark : ipv4_addr . inet_service" {
                format!(
                    "\t\ttypeof meta l4proto . th dport . numgen random mod {count} : ip daddr . th dport"
                )
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn nftables_mode() {
    use tug_proxy::nftables::{NftConfig, Nftables};
    println!();
    println!("nftables mode: Services x 2 endpoints");
    println!(
        "{:<24} {:>10} {:>18} {:>8} {:>20} {:>8}",
        "case", "tug", "nft -f (same)", "speedup", "nft -f (upstream)", "speedup"
    );
    let config = NftConfig {
        cluster_cidr: Some("10.0.0.0/8".into()),
        ..Default::default()
    };
    let report = Report::new(
        "proxy-nftables",
        "kube-proxy, nftables mode: programming Services × 2 endpoints",
        "Each in a fresh network namespace. tug programs its table over netlink; the references \
         are `nft -f` loading tug's own ruleset as `nft list` prints it (the same kernel \
         objects), and `nft -f` loading the ruleset upstream kube-proxy's nftables mode writes \
         for the same Services (a chain per Service and per endpoint, numgen verdict maps), not \
         run at 30,000, where nft takes minutes. \"One change\" moves one endpoint of one \
         Service; \"as the loop does it\" starts from the API objects in the proxy's model.",
    );
    let same_name = "nft -f (same ruleset)";
    let upstream_name = "nft -f (upstream's ruleset)";
    for count in [1_000, 10_000, 30_000] {
        let ports = services(count);
        let ns = Netns::new("nfb");
        let mut backend = Nftables::new(config.clone());
        let began = Instant::now();
        ns.run(|| backend.sync(&ports, true))
            .expect("nftables sync");
        let tug = began.elapsed();
        let text = ns.run(|| {
            let out = Command::new("nft")
                .args(["list", "table", "ip", "tug-proxy"])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        });
        let mut changed = ports.clone();
        changed[count / 2].cluster_endpoints[1].ip = IpAddr::V4(Ipv4Addr::new(11, 0, 0, 1));
        changed[count / 2].external_endpoints = changed[count / 2].cluster_endpoints.clone();
        // As the proxy's loop does it: the model names the one Service that changed.
        let service = tug_proxy::model::service_of(&changed[count / 2].name);
        let began = Instant::now();
        ns.run(|| backend.sync_services([(service, &changed[count / 2..=count / 2])]))
            .expect("a previous sync")
            .expect("nftables change");
        let tug_change = began.elapsed();
        // Without being told what changed: every port compared with what was programmed.
        changed[count / 2].cluster_endpoints[1].port = 8081;
        changed[count / 2].external_endpoints = changed[count / 2].cluster_endpoints.clone();
        let began = Instant::now();
        ns.run(|| backend.sync(&changed, false))
            .expect("nftables change, compared");
        let compared = began.elapsed();
        let began = Instant::now();
        ns.run(|| backend.sync(&changed, false))
            .expect("nftables no-op");
        let no_op = began.elapsed();
        drop(ns);
        let same = nft_load(&Netns::new("nfr"), &loadable(&text));
        // nft takes minutes for upstream's shape at 30k (an anonymous verdict map per Service).
        let upstream_time =
            (count <= 10_000).then(|| nft_load(&Netns::new("nfu"), &upstream_ruleset(&ports)));
        let upstream = match upstream_time {
            Some(upstream) => format!(
                "{:>20.1?} {:>7.1}x",
                upstream,
                upstream.as_secs_f64() / tug.as_secs_f64()
            ),
            None => format!("{:>20} {:>8}", "(not run)", ""),
        };
        let mut references = vec![(same_name, same)];
        references.extend(upstream_time.map(|u| (upstream_name, u)));
        report.millis(&format!("{count} from scratch"), tug, &references);
        println!(
            "{:<24} {:>10.1?} {:>18.1?} {:>7.1}x {upstream}",
            format!("{count} from scratch"),
            tug,
            same,
            same.as_secs_f64() / tug.as_secs_f64(),
        );
        if count == 30_000 {
            println!("{:<24} {:>10.1?}", "one change at 30000", tug_change);
            let as_the_loop = loop_change(&config);
            println!("{:<24} {:>10.1?}", "  found by comparing all", compared);
            println!("{:<24} {:>10.1?}", "  a sync with no change", no_op);
            report.millis("one change at 30000", tug_change, &[]);
            report.millis("one change, as the loop does it", as_the_loop, &[]);
            report.millis("a sync with no change at 30000", no_op, &[]);
        }
        let began = Instant::now();
        let (bytes, _) = tug_proxy::nftables::render(&ports, &config)
            .replace(2)
            .finish();
        println!(
            "{:<24} {:>10.1?} ({} KiB of netlink)",
            "  of which encoding",
            began.elapsed(),
            bytes.len() / 1024
        );
    }
}

/// The proxy's loop at 30,000 Services, each with an EndpointSlice of 2 endpoints: the model
/// built from the API objects and programmed, then one slice changes and the loop's work for
/// it (the model's update and the backend's sync of what changed) is timed.
fn loop_change(config: &tug_proxy::nftables::NftConfig) -> Duration {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use tug_proxy::backend::RuleBackend;
    use tug_proxy::model::{Model, object_key};
    use tug_proxy::nftables::Nftables;
    let count = 30_000u32;
    let slice = |i: u32, first: u32| -> EndpointSlice {
        let ip = |n: u32| Ipv4Addr::from(0x0a00_0000 + first * 2 + n).to_string();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("svc{i}-abc"), "namespace": format!("ns{}", i % 100),
                         "labels": {"kubernetes.io/service-name": format!("svc{i}")}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip(0)]}, {"addresses": [ip(1)]}],
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
        }))
        .unwrap()
    };
    let mut model = Model::new(Default::default());
    for i in 0..count {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("svc{i}"), "namespace": format!("ns{}", i % 100)},
            "spec": {"clusterIP": Ipv4Addr::from(0xac10_0000 + i).to_string(),
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80}]}
        }))
        .unwrap();
        model.set_service(&object_key(&service.metadata), Some(service));
        let slice = slice(i, i);
        model.set_slice(&object_key(&slice.metadata), Some(slice));
    }
    let ns = Netns::new("nfl");
    let mut backend = Nftables::new(config.clone());
    let all: BTreeSet<String> = model.update().into_keys().collect();
    ns.run(|| RuleBackend::sync(&mut backend, &model, &all, true))
        .expect("program 30,000 Services");
    let moved = slice(count / 2, count + 7);
    let began = Instant::now();
    model.set_slice(&object_key(&moved.metadata), Some(moved));
    let changed: BTreeSet<String> = model.update().into_keys().collect();
    ns.run(|| RuleBackend::sync(&mut backend, &model, &changed, false))
        .expect("one change");
    let took = began.elapsed();
    assert_eq!(changed.len(), 1, "{changed:?}");
    println!("{:<24} {:>10.1?}", "  as the loop does it", took);
    took
}

/// Median TCP connect time from the lab's client to `vip` over `count` connections.
fn connect_p50(
    lab: &tug_tests::services::ServiceLab,
    vip: std::net::SocketAddr,
    count: usize,
) -> Duration {
    let mut samples: Vec<Duration> = lab.client.run(|| {
        (0..count)
            .map(|_| {
                let began = Instant::now();
                let stream =
                    std::net::TcpStream::connect(vip).expect("connect through the ClusterIP");
                let elapsed = began.elapsed();
                drop(stream);
                elapsed
            })
            .collect()
    });
    tug_tests::measure::percentile(&mut samples, 0.5)
}

/// Builds a fresh backend.
/// A backend programming everything at once.
trait Program: Send {
    fn program(&mut self, ports: &[ServicePort]);
}

impl Program for tug_proxy::nftables::Nftables {
    fn program(&mut self, ports: &[ServicePort]) {
        self.sync(ports, true).expect("program the rules");
    }
}

impl Program for Iptables {
    fn program(&mut self, ports: &[ServicePort]) {
        self.sync(ports, true).expect("program the rules");
    }
}

type MakeBackend = Box<dyn Fn() -> Box<dyn Program>>;

/// First-packet cost: connect latency through one ClusterIP with 0, 1,000, 10,000 and 30,000
/// other Services programmed, per mode, next to upstream's nftables ruleset for the same.
fn first_packet() {
    use tug_proxy::nftables::{NftConfig, Nftables};
    let probe = {
        let endpoint = |n: u8| Endpoint {
            ip: IpAddr::V4(Ipv4Addr::new(10, 180, 0, n)),
            port: 8080,
            local: false,
        };
        let endpoints = vec![endpoint(1), endpoint(2)];
        ServicePort {
            name: "bench/probe:http".into(),
            protocol: Protocol::Tcp,
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(172, 30, 0, 41))],
            port: 80,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            affinity_timeout: None,
            cluster_endpoints: endpoints.clone(),
            external_endpoints: endpoints,
            health_check_node_port: None,
            external_policy_local: false,
        }
    };
    let vip: std::net::SocketAddr = "172.30.0.41:80".parse().unwrap();
    const CONNECTIONS: usize = 2000;
    let sizes = [0, 1_000, 10_000, 30_000];
    println!("first packet: TCP connect p50 through one ClusterIP ({CONNECTIONS} connections)");
    println!(
        "{:<22} {:>14} {:>12} {:>24}",
        "mode", "other Services", "tug", "upstream's ruleset (nft)"
    );
    let modes: Vec<(&str, &str, MakeBackend)> = vec![
        (
            "nftables",
            "nftables",
            Box::new(|| {
                Box::new(Nftables::new(NftConfig {
                    cluster_cidr: Some("10.0.0.0/8".into()),
                    ..Default::default()
                }))
            }),
        ),
        (
            "iptables-legacy",
            "iptables (legacy)",
            Box::new(|| Box::new(Iptables::new("iptables-legacy", config()))),
        ),
    ];
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    for (key, mode, make) in modes {
        let report = Report::new(
            &format!("first-packet-{key}"),
            &format!("kube-proxy, {mode} mode: first-packet latency against Service count"),
            &format!(
                "TCP connect time (p50 of {CONNECTIONS}, after 50 to warm up) from a client \
                 namespace through one ClusterIP to two endpoint namespaces across a node \
                 namespace holding the rules for that Service and N others. Every connection is \
                 new, so every one is a first packet through the NAT rules.{}",
                if key == "nftables" {
                    " The reference is what of upstream kube-proxy's nftables ruleset a \
                     ClusterIP connection goes through, for the same Services (its service-ips \
                     map, a chain per Service and per endpoint), loaded with `nft -f`; not its \
                     filter and masquerade chains, which tug's figure does include, so the \
                     comparison flatters upstream a little. Not run at 30,000, where nft takes \
                     minutes to load it."
                } else {
                    " tug writes upstream kube-proxy's iptables layout rule for rule, so there \
                     is no other ruleset to compare with: the figures show how the linear \
                     `KUBE-SERVICES` chain costs the first packet as Services grow."
                }
            ),
        );
        for others in sizes {
            let mut ports = services(others);
            ports.push(probe.clone());
            let measure = |program: &dyn Fn(&Netns)| {
                let lab = tug_tests::services::ServiceLab::new(2, 8080, 8053);
                program(&lab.node);
                connect_p50(&lab, vip, 50); // warm up
                connect_p50(&lab, vip, CONNECTIONS)
            };
            let tug = measure(&|node| {
                let mut backend = make();
                node.run(|| backend.program(&ports));
            });
            let upstream = (key == "nftables" && others <= 10_000).then(|| {
                measure(&|node| {
                    nft_load(node, &upstream_ruleset(&ports));
                })
            });
            println!(
                "{:<22} {:>14} {:>12.1?} {:>24}",
                mode,
                others,
                tug,
                upstream.map_or_else(String::new, |u| format!("{u:.1?}"))
            );
            let references: Vec<(&str, f64)> = upstream
                .map(|u| ("upstream's ruleset (nft -f)", micros(u)))
                .into_iter()
                .collect();
            report.figure(
                &format!("{others} other Services"),
                "µs",
                micros(tug),
                &references,
            );
        }
    }
}

/// Runs `program` with `input` on its stdin (or `args` alone) and returns how long it took.
fn timed(program: &str, args: &[&str], input: &str) -> Duration {
    let began = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    began.elapsed()
}

/// IPVS mode needs a kernel with IPVS, which this machine's lacks: the benchmark runs itself
/// (`TUG_BENCH_MODE=ipvs-guest`) in a qemu guest on Debian's kernel, with `ipvsadm`, iproute2's
/// `ip` and `nft` beside it, and prints what the guest measured.
fn ipvs_mode() {
    use tug_tests::vm::{GuestSpec, PROXY_MODULES, boot_watching};
    // TUG_BENCH_SIZES (e.g. "30000") picks the sizes; a guest under emulation takes minutes.
    let sizes = std::env::var("TUG_BENCH_SIZES").unwrap_or_else(|_| "1000,10000,30000".into());
    let mut spec = GuestSpec::new(&format!(
        "TUG_BENCH_MODE=ipvs-guest TUG_BENCH_SIZES={sizes} /bench\n"
    ));
    spec.modules = PROXY_MODULES.iter().map(|m| (*m).to_owned()).collect();
    spec.memory_mib = 3072;
    spec.timeout = Duration::from_secs(3600);
    spec.files = vec![
        (
            std::env::current_exe().expect("the bench binary"),
            "/bench".into(),
        ),
        ("/usr/sbin/ipvsadm".into(), "/tools/ipvsadm".into()),
        ("/usr/bin/ip".into(), "/tools/ip".into()),
        ("/usr/sbin/nft".into(), "/tools/nft".into()),
    ];
    let figures = std::env::var_os("TUG_BENCH_REPORT").filter(|p| !p.is_empty());
    let run = boot_watching(&spec, |line| {
        if let Some(figures) = line.strip_prefix("bench| ") {
            println!("{figures}");
        } else if let (Some(record), Some(path)) = (line.strip_prefix(RECORD), &figures) {
            tug_tests::report::append_line(std::path::Path::new(path), record.trim_end());
        }
    });
    assert_eq!(
        run.value("guest-script-status"),
        Some("0"),
        "console:\n{}",
        run.console
    );
}

/// What the guest prints before each of its report records, for the host to append.
const RECORD: &str = "bench-record| ";

/// The guest's half of [`ipvs_mode`]: tug's IPVS backend against the same virtual services
/// through `ipvsadm -R`, the same VIPs through `ip -batch` and the same rules through `nft -f`.
fn ipvs_guest() {
    use tug_proxy::ipvs::{IpvsBackend, IpvsConfig};
    let say = |line: String| println!("bench| {line}");
    say(String::new());
    say(
        "IPVS mode (in a guest on Debian's kernel, software emulation): Services x 2 endpoints"
            .into(),
    );
    say(format!(
        "{:<22} {:>10} {:>12} {:>10} {:>10} {:>12} {:>8}",
        "case", "tug", "ipvsadm -R", "ip -batch", "nft -f", "tools' sum", "speedup"
    ));
    let config = IpvsConfig {
        cluster_cidrs: vec!["10.0.0.0/8".into()],
        ..Default::default()
    };
    let ipvsadm = |input: &str| timed("/tools/ipvsadm", &["-R"], input);
    let report = Report::on_console(
        "proxy-ipvs",
        "kube-proxy, IPVS mode: programming Services × 2 endpoints (in a qemu guest)",
        "In a qemu guest on Debian's kernel under software emulation (this machine's kernel has \
         no IPVS), so every figure is 10–50× a native one: read the ratios. tug programs the \
         virtual services, the VIPs on kube-ipvs0 and its nftables half; the reference is the \
         sum of the tools programming the same state: `ipvsadm -R` the virtual services, \
         `ip -batch` the VIPs and `nft -f` tug's table as `nft list` prints it. One change \
         moves one endpoint; its reference is `ipvsadm -R` with the two lines for it.",
        RECORD,
    );
    let tools = "ipvsadm -R + ip -batch + nft -f";
    let sizes: Vec<usize> = std::env::var("TUG_BENCH_SIZES")
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    for count in sizes {
        let ports = services(count);
        let mut backend = IpvsBackend::new(config.clone());
        let began = Instant::now();
        backend.sync(&ports, true).expect("IPVS sync");
        let tug = began.elapsed();
        let rules = Command::new("/tools/nft")
            .args(["list", "table", "ip", "tug-proxy"])
            .output()
            .expect("list tug's rules");
        let rules = String::from_utf8(rules.stdout).unwrap();
        let mut changed = ports.clone();
        let moved = &mut changed[count / 2];
        let old = moved.cluster_endpoints[1].clone();
        moved.cluster_endpoints[1].ip = IpAddr::V4(Ipv4Addr::new(11, 0, 0, 1));
        moved.external_endpoints = moved.cluster_endpoints.clone();
        // As the proxy's loop does it: the model names the one Service that changed.
        let service = tug_proxy::model::service_of(&changed[count / 2].name);
        let began = Instant::now();
        backend
            .sync_services([(service, &changed[count / 2..=count / 2])])
            .expect("a previous sync")
            .expect("IPVS change");
        let tug_change = began.elapsed();
        // Without being told what changed: every Service compared with what was programmed.
        let began = Instant::now();
        backend.sync(&ports, false).expect("IPVS change back");
        let compared = began.elapsed();
        backend.cleanup().expect("IPVS cleanup");

        // The same state through the reference tools.
        let mut virtual_services = String::new();
        let mut addresses = String::from("link add kube-ipvs0 type dummy\n");
        for port in &ports {
            let vip = format!("{}:{}", port.cluster_ips[0], port.port);
            virtual_services.push_str(&format!("-A -t {vip} -s rr\n"));
            for endpoint in &port.cluster_endpoints {
                virtual_services.push_str(&format!(
                    "-a -t {vip} -r {}:{} -m -w 1\n",
                    endpoint.ip, endpoint.port
                ));
            }
            addresses.push_str(&format!(
                "addr add {}/32 dev kube-ipvs0\n",
                port.cluster_ips[0]
            ));
        }
        let ipvsadm_time = ipvsadm(&virtual_services);
        let ip_time = timed("/tools/ip", &["-batch", "-"], &addresses);
        let nft_time = timed("/tools/nft", &["-f", "-"], &rules);
        let sum = ipvsadm_time + ip_time + nft_time;
        report.millis(&format!("{count} from scratch"), tug, &[(tools, sum)]);
        say(format!(
            "{:<22} {:>10.1?} {:>12.1?} {:>10.1?} {:>10.1?} {:>12.1?} {:>7.1}x",
            format!("{count} from scratch"),
            tug,
            ipvsadm_time,
            ip_time,
            nft_time,
            sum,
            sum.as_secs_f64() / tug.as_secs_f64()
        ));
        if count == 30_000 {
            let vip = format!(
                "{}:{}",
                ports[count / 2].cluster_ips[0],
                ports[count / 2].port
            );
            let change = format!(
                "-d -t {vip} -r {}:{}\n-a -t {vip} -r 11.0.0.1:{} -m -w 1\n",
                old.ip, old.port, old.port
            );
            let ipvsadm_change = ipvsadm(&change);
            report.millis(
                "one change at 30000",
                tug_change,
                &[(tools, ipvsadm_change)],
            );
            say(format!(
                "{:<22} {:>10.1?} {:>12.1?} {:>10} {:>10} {:>12.1?} {:>7.1}x",
                "one change at 30000",
                tug_change,
                ipvsadm_change,
                "",
                "",
                ipvsadm_change,
                ipvsadm_change.as_secs_f64() / tug_change.as_secs_f64()
            ));
            say(format!(
                "{:<22} {:>10.1?}",
                "  found by comparing all", compared
            ));
        }
        timed("/tools/ipvsadm", &["-C"], "");
        timed("/tools/ip", &["link", "del", "kube-ipvs0"], "");
        timed("/tools/nft", &["delete", "table", "ip", "tug-proxy"], "");
    }
}

fn main() {
    match std::env::var("TUG_BENCH_MODE").as_deref() {
        Ok("ipvs") => return ipvs_mode(),
        Ok("ipvs-guest") => return ipvs_guest(),
        Ok("nftables") => return nftables_mode(),
        Ok("first-packet") => return first_packet(),
        _ => {}
    }
    let base = std::env::var("TUG_BENCH_IPTABLES").unwrap_or_else(|_| "iptables-nft".into());
    println!("iptables mode ({base}): Services x 2 endpoints");
    let restore = format!("{base}-restore");
    let report = Report::new(
        &format!("proxy-{base}"),
        &format!("kube-proxy, iptables mode ({base}): programming Services × 2 endpoints"),
        &format!(
            "tug renders upstream kube-proxy's iptables layout and loads it with one \
             `{restore} --noflush`; the reference is `{restore}` alone loading the very same \
             ruleset in a fresh namespace, the floor any iptables proxy pays. A ratio near 1× \
             means tug's own work (rendering, diffing) is small next to the kernel's."
        ),
    );
    println!(
        "{:<28} {:>12} {:>18} {:>8}",
        "case", "tug", "iptables-restore", "ratio"
    );
    for count in [1_000, 10_000, 30_000] {
        let ports = services(count);
        // tug from scratch.
        let ns = Netns::new("pxb");
        let mut backend = Iptables::new(&base, config());
        let began = Instant::now();
        ns.run(|| backend.sync(&ports, true)).expect("sync");
        let tug = began.elapsed();
        // One Service changes (an endpoint moves).
        let mut changed = ports.clone();
        changed[count / 2].cluster_endpoints[1].ip = IpAddr::V4(Ipv4Addr::new(11, 0, 0, 1));
        changed[count / 2].external_endpoints = changed[count / 2].cluster_endpoints.clone();
        let began = Instant::now();
        ns.run(|| backend.sync(&changed, false))
            .expect("partial sync");
        let tug_change = began.elapsed();
        drop(ns);
        // The same ruleset through iptables-restore alone, in a fresh namespace.
        let full = restore_input(
            &render(&ports, &config()),
            &BTreeMap::new(),
            &BTreeSet::new(),
        );
        let ns = Netns::new("pxr");
        let raw = raw_restore(&ns, &restore, &full.input);
        report.millis(
            &format!("{count} from scratch"),
            tug,
            &[(restore.as_str(), raw)],
        );
        println!(
            "{:<28} {:>12.1?} {:>18.1?} {:>7.2}x",
            format!("{count} from scratch"),
            tug,
            raw,
            tug.as_secs_f64() / raw.as_secs_f64()
        );
        if count == 30_000 {
            let one = restore_input(&render(&changed, &config()), &full.chains, &BTreeSet::new());
            let raw_change = raw_restore(&ns, &restore, &one.input);
            report.millis(
                "one change at 30000",
                tug_change,
                &[(restore.as_str(), raw_change)],
            );
            println!(
                "{:<28} {:>12.1?} {:>18.1?} {:>7.2}x",
                "one change at 30000",
                tug_change,
                raw_change,
                tug_change.as_secs_f64() / raw_change.as_secs_f64()
            );
        }
    }
}
