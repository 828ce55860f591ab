//! VM tier: qemu guests booting Debian's own kernel under software emulation.

use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};
use tug_tests::vm::{GuestSpec, PROXY_MODULES, boot, kernel_release};

#[test]
#[ignore = "vm tier (root, qemu): run as root via ./scripts/test, or scripts/vm-assets then cargo test -p tug-tests --test vm -- --ignored"]
fn debian_kernel_boots_in_a_guest_and_provides_ipvs() {
    require(Tier::Vm);
    let mut spec = GuestSpec::new(
        "echo \"release=$(uname -r)\"\n\
         echo \"ipvs=$(head -n 1 /proc/net/ip_vs)\"\n\
         ip link add tug-vip type dummy && ip addr add 10.96.0.1/32 dev tug-vip && echo dummy=ok\n",
    );
    spec.modules = vec!["ip_vs".into(), "ip_vs_rr".into(), "dummy".into()];
    let run = boot(&spec);

    let expected = kernel_release(&Substrate::from_env());
    assert_eq!(
        run.value("release"),
        Some(expected.as_str()),
        "console:\n{}",
        run.console
    );
    assert!(
        run.value("ipvs")
            .is_some_and(|v| v.starts_with("IP Virtual Server version")),
        "IPVS is available in the guest; console:\n{}",
        run.console
    );
    assert_eq!(
        run.value("dummy"),
        Some("ok"),
        "a dummy VIP device can be made; console:\n{}",
        run.console
    );
    assert_eq!(
        run.value("guest-script-status"),
        Some("0"),
        "console:\n{}",
        run.console
    );
    eprintln!("guest booted and ran in {:?}", run.elapsed);
}

/// The Service, in the standalone proxy's manifest directory.
const WEB_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
";

/// Shell functions for the guest's network: `netns NAME`, `in_ns NAME CMD...`, `attach
/// NAME x.y.z` (a namespace on a link of its own, the node x.y.z.1, the namespace x.y.z.2),
/// `attach_pods` and `serve_web NAME...`.
const GUEST_NETWORK: &str = r#"
ip link set lo up
# Namespaces, each routed through the node on a link of its own: two endpoint pods and a client
# pod inside the cluster CIDR, and one client outside it.
netns() {
  unshare -n sleep 100000 &
  p=$!
  eval "pid_$1=$p"
  # The namespace exists once the process has left the node's.
  until [ -e /proc/$p/ns/net ] && [ "$(readlink /proc/$p/ns/net)" != "$(readlink /proc/self/ns/net)" ]; do sleep 0.1; done
}
in_ns() { n=$1; shift; eval "nsenter -t \$pid_$n -n $*"; }
attach() { # name subnet-prefix (x.y.z): the node is x.y.z.1, the namespace x.y.z.2
  netns $1
  eval "p=\$pid_$1"
  # busybox ip names the peer itself (veth0, free again after each rename).
  ip link add v-$1 type veth
  ip link set veth0 name e-$1
  ip link set e-$1 netns $p
  ip addr add $2.1/24 dev v-$1
  ip link set v-$1 up
  nsenter -t $p -n sh -c "ip link set lo up; ip link set e-$1 name eth0; ip addr add $2.2/24 dev eth0; ip link set eth0 up; ip route add default via $2.1"
}
# `attach_pods`: the endpoint pods ep1 (10.244.2.2) and ep2 (10.244.3.2), and a client pod
# (10.244.4.2).
attach_pods() {
  attach ep1 10.244.2
  attach ep2 10.244.3
  attach client 10.244.4
}
# `serve_web NAME...`: each namespace answers HTTP on 8080 with its name.
serve_web() {
  for n in "$@"; do
    mkdir -p /www/$n && echo $n > /www/$n/index.html
    in_ns $n httpd -p 8080 -h /www/$n
  done
}
"#;

/// The kubelet's `/pods` with the web pods at `ips`, all Ready.
fn pods(ips: &[&str]) -> String {
    let items: Vec<serde_json::Value> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            serde_json::json!({
                "metadata": {"name": format!("web-{i}"), "namespace": "default", "uid": format!("u{i}"), "labels": {"app": "web"}},
                "spec": {"nodeName": "guest", "containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                           "conditions": [{"type": "Ready", "status": "True"}]}
            })
        })
        .collect();
    serde_json::json!({"kind": "PodList", "apiVersion": "v1", "items": items}).to_string()
}

/// A guest for `tug proxy`: the modules its modes need (and `extra`), the tug binary, the
/// web Service's manifest, a kubelet `/pods` with both web pods (`/pods-both`) and `/get.sh
/// ADDRESS PORT`, which prints the body of an HTTP GET.
fn proxy_guest(script: &str, extra: &[&str]) -> GuestSpec {
    let mut spec = GuestSpec::new(script);
    spec.memory_mib = 1024;
    spec.timeout = std::time::Duration::from_secs(400);
    spec.modules = PROXY_MODULES
        .iter()
        .chain(extra)
        .map(|m| (*m).to_owned())
        .collect();
    spec.files = vec![(tug_tests::cni::tug_binary(), "/tug".into())];
    spec.texts = vec![
        ("/services/web.yaml".into(), WEB_SERVICE.into()),
        ("/pods-both".into(), pods(&["10.244.2.2", "10.244.3.2"])),
        // busybox's wget crashes in the guest (static glibc's NSS); nc with numbers does not.
        (
            "/get.sh".into(),
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 \"$1\" \"$2\" 2>/dev/null | tail -n 1\n"
                .into(),
        ),
    ];
    spec
}

/// IPVS mode in a guest whose kernel has IPVS: tug proxy (standalone: the Service from a
/// manifest, endpoints from a kubelet `/pods` served by busybox httpd) programs virtual services
/// over generic netlink and the VIP on kube-ipvs0. Real HTTP through the ClusterIP from the node
/// and from a pod reaches both endpoints; a NodePort from an outside namespace works; a port of
/// the VIP that is no Service's is refused; an endpoint that goes away stops getting traffic;
/// `--cleanup` removes the virtual services and the device.
#[test]
#[ignore = "vm tier (root, qemu): run as root via ./scripts/test, or scripts/vm-assets then cargo test -p tug-tests --test vm -- --ignored"]
fn ipvs_mode_balances_a_cluster_ip_and_a_node_port_in_a_guest() {
    require(Tier::Vm);
    let script = GUEST_NETWORK.to_owned()
        + r#"
attach_pods
attach out 192.168.77
serve_web ep1 ep2
mkdir -p /kubelet && cp /pods-both /kubelet/pods
httpd -p 127.0.0.1:10255 -h /kubelet
/tug proxy --proxy-mode ipvs --standalone-services /services --standalone-kubelet 127.0.0.1:10255 \
  --hostname-override guest --cluster-cidr 10.244.0.0/16 \
  --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 > /tmp/proxy.log 2>&1 &
i=0
until [ -n "$(sh /get.sh 10.96.0.10 80)" ]; do
  i=$((i+1)); if [ $i -gt 60 ]; then echo "never served"; cat /tmp/proxy.log; exit 1; fi; sleep 1
done
echo "device=$(ip -o addr show dev kube-ipvs0 | grep -o '10.96.0.10/32')"
echo "vs=$(grep -c '0A60000A:0050' /proc/net/ip_vs)"
seen() { sort | uniq | tr '\n' ' '; }
echo "from-node=$(for i in $(seq 1 30); do sh /get.sh 10.96.0.10 80; done | seen)"
echo "from-pod=$(for i in $(seq 1 30); do in_ns client sh /get.sh 10.96.0.10 80; done | seen)"
echo "nodeport=$(for i in $(seq 1 20); do in_ns out sh /get.sh 192.168.77.1 30080; done | seen)"
if [ -n "$(in_ns client sh /get.sh 10.96.0.10 8080)" ]; then echo "other-port=open"; else echo "other-port=refused"; fi
cp /pods-one /kubelet/pods
i=0
until [ "$(for i in $(seq 1 10); do sh /get.sh 10.96.0.10 80; done | seen)" = "ep1 " ]; do
  i=$((i+1)); if [ $i -gt 30 ]; then break; fi; sleep 1
done
echo "after-removal=$(for i in $(seq 1 20); do sh /get.sh 10.96.0.10 80; done | seen)"
# ep2's finished connections linger in IPVS a while: its destination drains at weight 0.
echo "drained-weight=$(grep -i '0AF40302:1F90' /proc/net/ip_vs | awk '{print $4}' | head -n 1)"
kill %1 2>/dev/null || true
kill $(pidof tug) 2>/dev/null || true
sleep 1
/tug proxy --cleanup --hostname-override guest > /tmp/cleanup.log 2>&1 || cat /tmp/cleanup.log
echo "cleaned-vs=$(grep -c 0050 /proc/net/ip_vs || true)"
if ip link show kube-ipvs0 >/dev/null 2>&1; then echo "cleaned-device=no"; else echo "cleaned-device=yes"; fi
"#;
    let mut spec = proxy_guest(&script, &["bridge"]);
    spec.texts.push(("/pods-one".into(), pods(&["10.244.2.2"])));
    let run = boot(&spec);
    let value = |key: &str| run.value(key).unwrap_or("").trim().to_owned();
    let console = &run.console;
    assert_eq!(value("guest-script-status"), "0", "console:\n{console}");
    assert_eq!(
        value("device"),
        "10.96.0.10/32",
        "the VIP on kube-ipvs0; console:\n{console}"
    );
    assert_eq!(
        value("vs"),
        "1",
        "one virtual service for the ClusterIP; console:\n{console}"
    );
    for key in ["from-node", "from-pod", "nodeport"] {
        assert_eq!(
            value(key),
            "ep1 ep2",
            "{key}: both endpoints answer; console:\n{console}"
        );
    }
    assert_eq!(value("other-port"), "refused", "console:\n{console}");
    assert_eq!(value("after-removal"), "ep1", "console:\n{console}");
    assert_eq!(
        value("drained-weight"),
        "0",
        "a removed endpoint drains at weight 0 rather than cutting connections; console:\n{console}"
    );
    assert_eq!(value("cleaned-vs"), "0", "console:\n{console}");
    assert_eq!(value("cleaned-device"), "yes", "console:\n{console}");
    eprintln!("IPVS guest ran in {:?}", run.elapsed);
}

/// SCTP Services, in nftables and IPVS modes, in a guest running Debian 12's own kernel, which
/// has SCTP (this host's has none): real SCTP associations through the ClusterIP, from a pod and
/// from the node, reach both endpoints in each mode, and so does TCP beside them.
#[test]
#[ignore = "vm tier (root, qemu): run as root via ./scripts/test, or scripts/vm-assets then cargo test -p tug-tests --test vm -- --ignored"]
fn sctp_and_tcp_services_in_nftables_and_ipvs_modes_in_a_guest() {
    require(Tier::Vm);
    let script = GUEST_NETWORK.to_owned()
        + r#"
attach_pods
# A node forwards for its pods (the CNI plugin sees to it on a real node) and has a default
# route, which its own traffic to a ClusterIP takes until DNAT reroutes it.
echo 1 > /proc/sys/net/ipv4/ip_forward
ip route add default dev v-client
for n in ep1 ep2; do in_ns $n /sctp-probe serve 9000 $n & done
serve_web ep1 ep2
mkdir -p /kubelet && cp /pods-both /kubelet/pods
httpd -p 127.0.0.1:10255 -h /kubelet
seen() { sort | uniq | tr '\n' ' '; }
for mode in nftables ipvs; do
  /tug proxy --proxy-mode $mode --standalone-services /services --standalone-kubelet 127.0.0.1:10255 \
    --hostname-override guest --cluster-cidr 10.244.0.0/16 \
    --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 > /tmp/$mode.log 2>&1 &
  i=0
  until [ -n "$(in_ns client /sctp-probe get 10.96.0.20 90)" ]; do
    i=$((i+1)); if [ $i -gt 60 ]; then echo "$mode never served"; cat /tmp/$mode.log; break; fi; sleep 1
  done
  echo "$mode-pod=$(for i in $(seq 1 20); do in_ns client /sctp-probe get 10.96.0.20 90; done | seen)"
  echo "$mode-node=$(for i in $(seq 1 20); do /sctp-probe get 10.96.0.20 90; done | seen)"
  echo "$mode-tcp=$(for i in $(seq 1 10); do in_ns client sh /get.sh 10.96.0.10 80; done | seen)"
  kill $(pidof tug)
  sleep 1
  /tug proxy --cleanup --hostname-override guest > /tmp/cleanup.log 2>&1 || cat /tmp/cleanup.log
done
"#;
    let mut spec = proxy_guest(&script, &["sctp", "nft_nat", "nft_numgen"]);
    spec.files.push((
        env!("CARGO_BIN_EXE_sctp-probe").into(),
        "/sctp-probe".into(),
    ));
    spec.texts.push((
        "/services/echo.yaml".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: web}\n  ports: [{name: echo, port: 90, targetPort: 9000, protocol: SCTP}]\n".into(),
    ));
    let run = boot(&spec);
    let value = |key: &str| run.value(key).unwrap_or("").trim().to_owned();
    let console = &run.console;
    assert_eq!(value("guest-script-status"), "0", "console:\n{console}");
    for mode in ["nftables", "ipvs"] {
        for from in ["pod", "node"] {
            assert_eq!(
                value(&format!("{mode}-{from}")),
                "ep1 ep2",
                "{mode} mode, from the {from}: both endpoints answer over SCTP; console:\n{console}"
            );
        }
        assert_eq!(
            value(&format!("{mode}-tcp")),
            "ep1 ep2",
            "{mode} mode: TCP beside it; console:\n{console}"
        );
    }
    eprintln!("SCTP guest ran in {:?}", run.elapsed);
}

/// IPVS mode following the API, in a guest: `tug proxy` in the guest watches a Service and its
/// EndpointSlice on the cluster (reached over the guest's link to the host, through a relay),
/// programs both endpoints, moves traffic when the EndpointSlice loses one, and removes the
/// virtual services and the VIP when the Service is deleted.
#[test]
#[ignore = "vm tier (root, qemu) with the cluster tier: run as root via ./scripts/test, or scripts/vm-assets then cargo test -p tug-tests --test vm -- --ignored"]
fn ipvs_mode_follows_services_and_endpoint_slices_from_the_api_in_a_guest() {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use serde_json::json;
    use tug_tests::cluster::{cluster, unique_name};
    use tug_tests::lan::{Relay, redirect_kubeconfig};
    use tug_tests::vm::{HOST_ADDRESS, boot_watching};
    require(Tier::Vm);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let admin = runtime.block_on(cluster().admin());
    let ns = runtime.block_on(cluster().namespace("ipvs"));
    let services: Api<Service> = Api::namespaced(admin.clone(), ns.name());
    let slices: Api<EndpointSlice> = Api::namespaced(admin, ns.name());
    let name = unique_name("web");
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let created = runtime
        .block_on(services.create(&PostParams::default(), &service))
        .expect("create the Service")
        .spec
        .expect("a Service spec");
    let cluster_ip: std::net::Ipv4Addr = created
        .cluster_ip
        .expect("a ClusterIP")
        .parse()
        .expect("an IPv4 ClusterIP");
    let node_port = created.ports.expect("ports")[0]
        .node_port
        .expect("a NodePort");
    let slice = |addresses: &[&str]| -> EndpointSlice {
        let addresses: Vec<String> = addresses.iter().map(|a| (*a).to_owned()).collect();
        tug_tests::services::http_endpoint_slice(&name, &addresses)
    };
    runtime
        .block_on(slices.create(
            &PostParams::default(),
            &slice(&["10.244.2.2", "10.244.3.2"]),
        ))
        .expect("create the EndpointSlice");

    // The guest reaches the host's loopback as 10.0.2.2: a relay there leads to the API.
    let server = cluster()
        .server_url()
        .trim_start_matches("https://")
        .to_owned();
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), &server);
    let kubeconfig = redirect_kubeconfig(
        &runtime.block_on(cluster().proxy_kubeconfig()),
        &format!("https://{HOST_ADDRESS}:{}", relay.addr().port()),
        "kubernetes",
    );

    let vip_hex = format!("{:08X}:0050", u32::from(cluster_ip));
    let script = GUEST_NETWORK.to_owned()
        + &format!(
            r#"
attach_pods
attach out 192.168.77
serve_web ep1 ep2
seen() {{ sort | uniq | tr '\n' ' '; }}
from_pod() {{ for i in $(seq 1 $1); do in_ns client sh /get.sh {cluster_ip} 80; done | seen; }}
/tug proxy --proxy-mode ipvs --kubeconfig /kubeconfig \
  --hostname-override guest --cluster-cidr 10.244.0.0/16 \
  --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 > /tmp/proxy.log 2>&1 &
i=0
until [ "$(from_pod 10)" = "ep1 ep2 " ]; do
  i=$((i+1)); if [ $i -gt 90 ]; then echo "never served"; cat /tmp/proxy.log; break; fi; sleep 1
done
echo "both=$(from_pod 30)"
echo "nodeport=$(for i in $(seq 1 20); do in_ns out sh /get.sh 192.168.77.1 {node_port}; done | seen)"
echo "tug-step=endpoints"
i=0
until [ "$(from_pod 10)" = "ep2 " ]; do
  i=$((i+1)); if [ $i -gt 60 ]; then break; fi; sleep 1
done
echo "after-patch=$(from_pod 20)"
echo "tug-step=delete"
i=0
while grep -q '{vip_hex}' /proc/net/ip_vs || ip -o addr show dev kube-ipvs0 | grep -q '{cluster_ip}/32'; do
  i=$((i+1)); if [ $i -gt 60 ]; then break; fi; sleep 1
done
echo "vs-after-delete=$(grep -c '{vip_hex}' /proc/net/ip_vs || true)"
echo "vip-after-delete=$(ip -o addr show dev kube-ipvs0 | grep -c '{cluster_ip}/32' || true)"
grep -i error /tmp/proxy.log | head -n 5 || true
"#
        );
    let mut spec = proxy_guest(&script, &["bridge"]);
    spec.host_link = true;
    spec.texts.push(("/kubeconfig".into(), kubeconfig));
    let mut failure = None;
    let run = boot_watching(&spec, |line| {
        let result = match line.strip_prefix("tug-step=") {
            Some("endpoints") => runtime
                .block_on(slices.patch(
                    &format!("{name}-tug"),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"endpoints": [{"addresses": ["10.244.3.2"], "conditions": {"ready": true}}]})),
                ))
                .map(drop),
            Some("delete") => runtime
                .block_on(services.delete(&name, &DeleteParams::default()))
                .map(drop),
            _ => Ok(()),
        };
        if let Err(e) = result {
            failure.get_or_insert(format!("{line}: {e}"));
        }
    });
    drop(relay);
    assert_eq!(failure, None, "the API calls of each step succeed");
    let value = |key: &str| run.value(key).unwrap_or("").trim().to_owned();
    let console = &run.console;
    assert_eq!(value("guest-script-status"), "0", "console:\n{console}");
    assert_eq!(
        value("both"),
        "ep1 ep2",
        "the ClusterIP from the API reaches both endpoints; console:\n{console}"
    );
    assert_eq!(
        value("nodeport"),
        "ep1 ep2",
        "the NodePort the API allocated answers from outside; console:\n{console}"
    );
    assert_eq!(
        value("after-patch"),
        "ep2",
        "traffic follows the EndpointSlice; console:\n{console}"
    );
    assert_eq!(
        value("vs-after-delete"),
        "0",
        "the deleted Service's virtual service goes; console:\n{console}"
    );
    assert_eq!(
        value("vip-after-delete"),
        "0",
        "the deleted Service's VIP leaves kube-ipvs0; console:\n{console}"
    );
    eprintln!("IPVS-from-the-API guest ran in {:?}", run.elapsed);
}

/// The guest's shell: join, wait for every unit, check the node, reset, and report what is left.
const JOIN_SCRIPT: &str = r#"
sysctl -qw net.ipv4.ip_forward=1
units_report() {
  for unit in tug-shim tug-kubelet tug-proxy tug-netd; do
    systemctl status "$unit" --no-pager || true
    journalctl -u "$unit" --no-pager -o cat | grep -v 'watch\|lease\|Lease' | tail -60
  done
}
/root/tug join "$ENDPOINT" --token "$TOKEN" --discovery-token-ca-cert-hash "$PIN" --node-name "$NODE" \
  || { units_report; exit 1; }
echo tug-step=joined
# A static pod, from an image loaded into containerd (the guest has no registry), with a
# memory-backed volume: a mount, a veth and an IP for reset to take away.
ctr -n k8s.io images import --all-platforms /root/http.tar
image=$(ctr -n k8s.io images ls -q | grep 'tug-test/http' | head -1)
echo "imported=$image"
[ "$image" = docker.io/tug-test/http:latest ] || ctr -n k8s.io images tag "$image" docker.io/tug-test/http:latest >/dev/null
cat >/etc/kubernetes/manifests/web.yaml <<'POD'
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: web
    image: tug-test/http:latest
    imagePullPolicy: Never
    volumeMounts: [{name: scratch, mountPath: /scratch}]
  volumes: [{name: scratch, emptyDir: {medium: Memory}}]
POD
for unit in tug-shim tug-kubelet tug-proxy tug-netd; do
  n=0
  until systemctl is-active --quiet "$unit"; do
    n=$((n + 1))
    if [ "$n" -gt 300 ]; then units_report; exit 1; fi
    sleep 1
  done
  echo "unit-$unit=$(systemctl is-active "$unit") $(systemctl show -p Type --value "$unit")"
done
deadline=$(($(date +%s) + 150))
until tug status >/tmp/status 2>&1 && grep -qE '^default +web-[^ ]+ +Ready +1/1 ' /tmp/status; do
  if [ "$(date +%s)" -gt "$deadline" ]; then
    cat /tmp/status
    ctr -n k8s.io images ls -q
    echo tug-step=pod-stuck
    sleep 5
    units_report
    exit 1
  fi
  sleep 1
done
sed 's/^/status: /' /tmp/status
echo "mounts-before=$(grep -c ' /var/lib/kubelet' /proc/mounts || true)"
echo "veths-before=$(ip -o link show type veth | wc -l)"
echo tug-step=ready
# The host looks at the Node and the mirror pod now.
sleep 15
tug reset --force --delete-node
echo tug-step=reset
left=""
for path in /etc/kubernetes/kubelet.conf /etc/kubernetes/bootstrap-kubelet.conf /etc/kubernetes/pki/ca.crt     /var/lib/kubelet /var/lib/kube-proxy /var/lib/tug /run/tug /etc/cni/net.d/10-tug.conflist /opt/cni/bin/tug-cni     /etc/systemd/system/tug-shim.service /etc/systemd/system/tug-kubelet.service     /etc/systemd/system/tug-proxy.service /etc/systemd/system/tug-netd.service; do
  if [ -e "$path" ] || [ -L "$path" ]; then left="$left $path"; fi
done
echo "leftover-files=$left"
echo "leftover-units=$(systemctl list-units --all --no-legend tug-shim.service tug-kubelet.service tug-proxy.service tug-netd.service | wc -l)"
echo "leftover-processes=$(pgrep -fc '^/usr/local/bin/tug ' || true)"
echo "leftover-iptables=$( (iptables-nft-save; iptables-legacy-save) 2>/dev/null | grep -c 'KUBE-' || true)"
echo "leftover-nft-tables=$(nft list tables | grep -v 'table ip filter\|table ip nat\|table ip mangle\|table ip6' | tr '
' ' ')"
echo "leftover-routes=$(ip route show proto 199 | wc -l)"
echo "leftover-links=$(ip -o link show | grep -c 'tug-vxlan\|kube-ipvs0' || true)"
echo "leftover-mounts=$(grep -c ' /var/lib/kubelet' /proc/mounts || true)"
echo "leftover-veths=$(ip -o link show type veth | wc -l)"
echo "leftover-containers=$(ctr -n k8s.io containers ls -q | wc -l)"
"#;

#[test]
#[ignore = "vm tier with the cluster tier (root, qemu): run as root via ./scripts/test vm, or scripts/vm-assets && cargo build -p tug && cargo test -p tug-tests --test vm -- --ignored"]
fn tug_join_on_a_systemd_guest_starts_every_unit_and_reset_leaves_nothing() {
    use k8s_openapi::api::core::v1::Node;
    use kube::Api;
    use tug_tests::cluster::{cluster, unique_name};
    use tug_tests::cni::tug_binary;
    use tug_tests::vm::{HOST_ADDRESS, boot_watching};
    require(Tier::Vm);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let token = runtime.block_on(cluster().bootstrap_token());
    let node = unique_name("vm-node");
    // The README's one-time step on the control plane: nodes' identities may act as proxies.
    let proxiers = runtime.block_on(tug_tests::node::NodesAsProxiers::bind());
    // The guest reaches the host's loopback at the slirp host address.
    let endpoint = cluster()
        .server_url()
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .replace("127.0.0.1", HOST_ADDRESS)
        .replace("localhost", HOST_ADDRESS);
    let script = format!(
        "ENDPOINT={endpoint}\nTOKEN={}\nNODE={node}\nPIN={}\n{JOIN_SCRIPT}",
        token.token(),
        cluster().ca_pin()
    );
    let mut spec = GuestSpec::systemd(&script);
    spec.files.push((tug_binary(), "/root/tug".into()));
    spec.files.push((
        tug_tests::substrate::Substrate::from_env().image_archive("http"),
        "/root/http.tar".into(),
    ));

    let nodes: Api<Node> = Api::all(runtime.block_on(cluster().admin()));
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(runtime.block_on(cluster().admin()), "default");
    let mirror = format!("web-{node}");
    let mut mirror_phase = None;
    let mut ready_in_api = None;
    let run = boot_watching(&spec, |line| {
        if line == "tug-step=pod-stuck" {
            let pod = runtime.block_on(pods.get_opt(&mirror));
            eprintln!("the mirror pod while the guest waits: {pod:#?}");
        }
        if line == "tug-step=ready" {
            // The kubelet reports the running container within a few seconds.
            for _ in 0..20 {
                mirror_phase = runtime
                    .block_on(pods.get_opt(&mirror))
                    .ok()
                    .flatten()
                    .and_then(|p| p.status?.phase);
                if mirror_phase.as_deref() == Some("Running") {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            // The node as the cluster sees it, while the guest waits for nothing.
            let seen = runtime.block_on(nodes.get_opt(&node)).ok().flatten();
            ready_in_api = Some(seen.map(|n| {
                let status = n.status.unwrap_or_default();
                let ready = status
                    .conditions
                    .unwrap_or_default()
                    .into_iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let internal = status
                    .addresses
                    .unwrap_or_default()
                    .into_iter()
                    .find(|a| a.type_ == "InternalIP")
                    .map(|a| a.address);
                (ready, internal)
            }));
        }
    });
    drop(proxiers);
    let console = &run.console;
    assert_eq!(
        run.value("guest-script-status"),
        Some("0"),
        "the guest's join script failed:\n{console}"
    );
    for unit in ["tug-shim", "tug-kubelet", "tug-proxy", "tug-netd"] {
        assert_eq!(
            run.value(&format!("unit-{unit}")),
            Some("active notify"),
            "{unit} is not an active notify service:\n{console}"
        );
    }
    assert!(
        console.contains("status: NODE  ") && console.contains("Ready=True"),
        "tug status does not show the Node Ready:\n{console}"
    );
    assert_eq!(
        ready_in_api,
        Some(Some((true, Some(tug_tests::vm::GUEST_ADDRESS.to_owned())))),
        "the cluster did not see the guest's Node Ready at its address:\n{console}"
    );
    assert_eq!(
        mirror_phase.as_deref(),
        Some("Running"),
        "the static pod's mirror pod is not Running in the API:\n{console}"
    );
    assert_ne!(
        run.value("mounts-before"),
        Some("0"),
        "the pod's volume was not mounted:\n{console}"
    );
    assert_ne!(
        run.value("veths-before"),
        Some("0"),
        "the pod has no veth:\n{console}"
    );
    assert!(
        runtime.block_on(nodes.get_opt(&node)).unwrap().is_none(),
        "tug reset --delete-node left the Node object"
    );
    for (what, nothing) in [
        ("leftover-files", ""),
        ("leftover-units", "0"),
        ("leftover-processes", "0"),
        ("leftover-iptables", "0"),
        ("leftover-nft-tables", ""),
        ("leftover-routes", "0"),
        ("leftover-links", "0"),
        ("leftover-mounts", "0"),
        ("leftover-veths", "0"),
        ("leftover-containers", "0"),
    ] {
        assert_eq!(
            run.value(what).map(str::trim),
            Some(nothing),
            "tug reset left something behind ({what}):\n{console}"
        );
    }
}
