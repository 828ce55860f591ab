//! Each service's footprint: resident memory and CPU over an idle window, for `tug kubelet`,
//! `tug shim`, `tug proxy` and `tug netd` on a node (in a network namespace, joined to the
//! cluster tier's API) running 20 pods behind a Service among 1,000 other Services, with the
//! timers an installation has. The shim is also measured alone with no pods, next to what
//! containerd's own CRI plugin costs (a containerd with the plugin less one without it, both
//! idle). Targets: kubelet ≤ 30 MiB and ≤ 0.5 % of a core idle. Needs root, the substrate and
//! the cluster tier: `scripts/substrate up && eval "$(scripts/substrate env)" && env
//! $(scripts/build-release) cargo bench -p tug-tests --bench footprint`.

#![allow(
    clippy::print_stdout,
    reason = "a benchmark reports its figures on stdout"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::PostParams;
use tug_tests::cluster::cluster;
use tug_tests::faults::{other_services, proxy_programs_every_service_port};
use tug_tests::measure::{Footprint, footprints};
use tug_tests::node::Segment;
use tug_tests::report::Report;
use tug_tests::shim::TugShim;
use tug_tests::substrate::Substrate;

const PODS: usize = 20;
const OTHER_SERVICES: usize = 1_000;
const WINDOW: Duration = Duration::from_secs(30);

/// A containerd of the benchmark's own, idle, with or without its CRI plugin.
struct Containerd {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start(substrate: &Substrate, cri: bool) -> Containerd {
        let dir = tempfile::tempdir_in(&substrate.state).expect("a containerd dir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let socket = path("containerd.sock");
        // Top-level keys come before the first table in TOML.
        let (top_level, cri_table) = if cri {
            (
                String::new(),
                format!(
                    "[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    conf_dir = \"{}\"\n",
                    path("net.d")
                ),
            )
        } else {
            (
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_owned(),
                String::new(),
            )
        };
        let config = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n{top_level}\n[grpc]\n  address = \"{socket}\"\n[ttrpc]\n  address = \"{socket}.ttrpc\"\n[metrics]\n  address = \"\"\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{}\"\n{cri_table}",
            path("root"),
            path("state"),
            path("opt"),
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("write the config");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("containerd.log")).expect("a log file"))
            .spawn()
            .expect("start containerd");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !Path::new(&socket).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd (cri: {cri}) did not listen in 30 s: {}",
                std::fs::read_to_string(dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Containerd { child, _dir: dir }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 20 pods (`web-<i>`, readiness-probed every 10 s, upstream's default) behind the Service `web`
/// in `ns`, on `node`; returns once every pod is Ready.
async fn pods_behind_a_service(node: &str, ns: &str) {
    let admin = cluster().admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let image = Substrate::from_env().registry_image("http");
    for i in 0..PODS {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("web-{i}"), "labels": {"app": "web"}},
            "spec": {"nodeName": node, "automountServiceAccountToken": false,
                     "containers": [{"name": "web", "image": image,
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]}
        }))
        .expect("pod JSON");
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create a pod");
    }
    let services: Api<Service> = Api::namespaced(admin, ns);
    services
        .create(&PostParams::default(), &tug_tests::e2e::web_service())
        .await
        .expect("create the Service");
    tug_tests::cluster::pods_ready(&pods, PODS, Duration::from_secs(300)).await;
}

fn print(name: &str, footprint: &Footprint) {
    println!(
        "  {name:<34} RSS {:7.1} MiB  PSS {:7.1} MiB  anonymous {:7.1} MiB  CPU {:6.3} % of a core",
        footprint.rss_mib(),
        footprint.pss_mib(),
        footprint.anon_mib(),
        footprint.cpu_percent
    );
}

#[tokio::main]
async fn main() {
    let substrate = Substrate::from_env();
    let memory = Report::new(
        "footprint-memory",
        "Memory of each service",
        &format!(
            "After {}s idle. \"shim alone, no pods\" is tug shim next to what containerd's own \
             CRI plugin adds to containerd (a containerd with the plugin less one without it), \
             all three idle side by side with nothing in them: anonymous memory (what the \
             process allocates itself) and PSS. Most of a lone shim's PSS is pages of tug's \
             binary, which the page cache holds and the other tug services share. The other \
             rows are one node (kubelet, shim, proxy in nftables mode, netd, with an \
             installation's timers) running {PODS} pods behind a Service among \
             {OTHER_SERVICES} other Services, as PSS: the four services are one binary, whose \
             shared pages PSS splits among them, so the rows add up to what the node pays (RSS \
             counts those pages once per process). Upstream's kubelet and kube-proxy cannot be \
             installed on this machine, so they have no reference here.",
            WINDOW.as_secs()
        ),
    );
    let cpu = Report::new(
        "footprint-cpu",
        "Idle CPU of each service",
        &format!(
            "User plus system CPU time over {}s idle, as a percentage of one core; the same \
             processes and states as the memory figures.",
            WINDOW.as_secs()
        ),
    );

    println!("footprint over {}s idle", WINDOW.as_secs());
    let reference_name = "containerd's CRI plugin";
    {
        let without = Containerd::start(&substrate, false);
        let with = Containerd::start(&substrate, true);
        let shim = TugShim::start("fp", "10.254.30.0/24").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pids = [
            without.child.id(),
            with.child.id(),
            shim.pid().expect("the shim runs"),
        ];
        let measured = footprints(&pids, WINDOW).await;
        let (without, with, shim) = (measured[0], measured[1], measured[2]);
        let plugin = Footprint {
            rss_kib: with.rss_kib.saturating_sub(without.rss_kib),
            pss_kib: with.pss_kib.saturating_sub(without.pss_kib),
            anon_kib: with.anon_kib.saturating_sub(without.anon_kib),
            cpu_percent: (with.cpu_percent - without.cpu_percent).max(0.0),
        };
        print("containerd without CRI", &without);
        print("containerd with CRI", &with);
        print("  so its CRI plugin", &plugin);
        print("tug shim, no pods", &shim);
        memory.figure(
            "shim alone, no pods (anonymous)",
            "MiB",
            shim.anon_mib(),
            &[(reference_name, plugin.anon_mib())],
        );
        memory.figure(
            "shim alone, no pods (PSS)",
            "MiB",
            shim.pss_mib(),
            &[(reference_name, plugin.pss_mib())],
        );
        cpu.figure(
            "shim alone, no pods",
            "% of a core",
            shim.cpu_percent,
            &[(reference_name, plugin.cpu_percent)],
        );
    }

    let segment = Segment::new("fpb", "192.168.66.1").await;
    let node = segment.node_as_installed("192.168.66.2", "nftables").await;
    let others = cluster().namespace("footprint-others").await;
    other_services(others.name(), OTHER_SERVICES).await;
    let ns = cluster().namespace("footprint").await;
    pods_behind_a_service(node.name(), ns.name()).await;
    proxy_programs_every_service_port(&node, Duration::from_secs(120)).await;
    // What starting the pods set off (image unpacking, first probes, the proxy's syncs) settles.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let services = node.pids();
    let pids: Vec<u32> = services.iter().map(|(_, pid)| *pid).collect();
    let measured = footprints(&pids, WINDOW).await;
    println!("a node with {PODS} pods and {OTHER_SERVICES} other Services");
    for ((name, _), footprint) in services.iter().zip(&measured) {
        print(name, footprint);
        assert!(
            footprint.rss_kib > 0,
            "{name} exited during the measurement:\n{}",
            node.logs()
        );
        let case = format!("{name}, {PODS} pods");
        memory.figure(&format!("{case} (PSS)"), "MiB", footprint.pss_mib(), &[]);
        cpu.figure(&case, "% of a core", footprint.cpu_percent, &[]);
    }
    let total = |f: fn(&Footprint) -> f64| measured.iter().map(f).sum::<f64>();
    println!(
        "  {:<34} PSS {:7.1} MiB  CPU {:6.3} % of a core",
        "all four",
        total(Footprint::pss_mib),
        total(|f| f.cpu_percent)
    );
    memory.figure("all four (PSS)", "MiB", total(Footprint::pss_mib), &[]);
    cpu.figure("all four", "% of a core", total(|f| f.cpu_percent), &[]);
}
