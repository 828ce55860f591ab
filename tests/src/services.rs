//! A node with pods and an off-cluster client, for testing Service rules with real traffic:
//! `client` (192.168.50.2) — `node` (192.168.50.1, forwarding, the rules under test) — pods
//! (10.180.0.N/32, ptp-style veths whose node end is 169.254.1.1). IPv6 alongside: client
//! fd00:50::2, node fd00:50::1, pods fd00:180::N/128 via fd00:ffff::1. Each pod answers TCP and
//! UDP (both families) with its own name, so a test counts which endpoint served each connection.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::netns::{Netns, veth_pair};

/// The address of the node on the client's link.
pub const NODE_IP: &str = "192.168.50.1";
/// The node's IPv6 address on the client's link.
pub const NODE_IP6: &str = "fd00:50::1";
/// The pods' (cluster) CIDR.
pub const CLUSTER_CIDR: &str = "10.180.0.0/16";

/// The topology; servers stop and namespaces go on drop.
#[derive(Debug)]
pub struct ServiceLab {
    /// The node, where the rules go.
    pub node: Netns,
    /// An off-cluster client.
    pub client: Netns,
    /// The pods, `pod-1`… at 10.180.0.1….
    pub pods: Vec<Netns>,
    stop: Arc<AtomicBool>,
    servers: Vec<std::thread::JoinHandle<()>>,
}

impl ServiceLab {
    /// A node with `pods` pods, each serving TCP on `tcp_port` and UDP on `udp_port`.
    pub fn new(pods: usize, tcp_port: u16, udp_port: u16) -> ServiceLab {
        let node = Netns::new("node");
        let client = Netns::new("cli");
        veth_pair(&client, "eth0", &node, "c0");
        client.ip(&["addr", "add", "192.168.50.2/24", "dev", "eth0"]);
        client.ip(&["route", "add", "default", "via", NODE_IP]);
        client.ip(&["-6", "addr", "add", "fd00:50::2/64", "dev", "eth0", "nodad"]);
        client.ip(&["-6", "route", "add", "default", "via", NODE_IP6]);
        node.ip(&["addr", "add", "192.168.50.1/24", "dev", "c0"]);
        node.ip(&["route", "add", "default", "via", "192.168.50.2"]);
        node.ip(&["-6", "addr", "add", "fd00:50::1/64", "dev", "c0", "nodad"]);
        node.ip(&["-6", "route", "add", "default", "via", "fd00:50::2"]);
        node.run(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
            // This kernel starts a new peer's ICMP token bucket empty, so the first REJECTs to
            // a client would be rate-limited away; tests assert the rule, not the rate limit.
            std::fs::write("/proc/sys/net/ipv4/icmp_ratelimit", "0").expect("icmp_ratelimit");
            std::fs::write("/proc/sys/net/ipv6/icmp/ratelimit", "0").expect("icmpv6 ratelimit");
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("IPv6 forwarding");
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut lab = ServiceLab {
            node,
            client,
            pods: Vec::new(),
            stop,
            servers: Vec::new(),
        };
        for i in 1..=pods {
            let pod = Netns::new("pod");
            let host_if = format!("p{i}");
            veth_pair(&pod, "eth0", &lab.node, &host_if);
            let ip = format!("10.180.0.{i}");
            pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            pod.ip(&[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ]);
            pod.ip(&[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ]);
            lab.node
                .ip(&["addr", "add", "169.254.1.1/32", "dev", &host_if]);
            lab.node
                .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if]);
            let ip6 = format!("fd00:180::{i}");
            pod.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ]);
            lab.node.ip(&[
                "-6",
                "addr",
                "add",
                "fd00:ffff::1/128",
                "dev",
                &host_if,
                "nodad",
            ]);
            pod.ip(&["-6", "route", "add", "fd00:ffff::1", "dev", "eth0"]);
            pod.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:ffff::1",
                "dev",
                "eth0",
            ]);
            lab.node
                .ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if]);
            let name = format!("pod-{i}");
            let (tcp, udp) = pod.run(|| {
                // Dual-stack sockets: IPv4 clients arrive as ::ffff:a.b.c.d.
                let tcp = TcpListener::bind(("::", tcp_port)).expect("bind TCP");
                tcp.set_nonblocking(true).expect("nonblocking");
                let udp = UdpSocket::bind(("::", udp_port)).expect("bind UDP");
                udp.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                (tcp, udp)
            });
            let stop = lab.stop.clone();
            let tcp_name = name.clone();
            lab.servers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut conn, peer)) => {
                            let _ = conn.write_all(format!("{tcp_name} {peer}").as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
            let stop = lab.stop.clone();
            lab.servers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(format!("{name} {peer}").as_bytes(), peer);
                    }
                }
            }));
            lab.pods.push(pod);
        }
        lab
    }

    /// One TCP connection from `from` to `addr`: the answering pod's name and the source
    /// address it saw, or the error.
    pub fn tcp_once(from: &Netns, addr: SocketAddr) -> Result<(String, String), String> {
        from.run(|| {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut reply = String::new();
            conn.read_to_string(&mut reply)
                .map_err(|e| format!("read from {addr}: {e}"))?;
            let (pod, peer) = reply
                .split_once(' ')
                .ok_or(format!("odd reply {reply:?}"))?;
            Ok((pod.to_owned(), peer.to_owned()))
        })
    }

    /// `count` TCP connections from `from` to `addr`: how many each pod served.
    pub fn tcp_hits(from: &Netns, addr: SocketAddr, count: usize) -> BTreeMap<String, usize> {
        let mut hits = BTreeMap::new();
        for _ in 0..count {
            let (pod, _) = Self::tcp_once(from, addr).unwrap_or_else(|e| panic!("{e}"));
            *hits.entry(pod).or_default() += 1;
        }
        hits
    }

    /// `count` UDP requests from fresh sockets in `from` to `addr`: how many each pod answered.
    pub fn udp_hits(from: &Netns, addr: SocketAddr, count: usize) -> BTreeMap<String, usize> {
        from.run(|| {
            let mut hits = BTreeMap::new();
            for _ in 0..count {
                let local = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = UdpSocket::bind(local).expect("bind");
                socket.set_read_timeout(Some(Duration::from_secs(2))).ok();
                socket.send_to(b"hi", addr).expect("send");
                let mut buf = [0u8; 64];
                let (n, _) = socket
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("no UDP answer from {addr}: {e}"));
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                let pod = reply.split(' ').next().unwrap_or_default().to_owned();
                *hits.entry(pod).or_default() += 1;
            }
            hits
        })
    }
}

impl Drop for ServiceLab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
    }
}

/// The EndpointSlice `<service>-tug` of Service `service`: one ready endpoint per address, port
/// `http`/TCP/8080 (what a test creates in place of the EndpointSlice controller).
pub fn http_endpoint_slice(
    service: &str,
    addresses: &[String],
) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{service}-tug"), "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "tug-test"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
    }))
    .expect("EndpointSlice JSON")
}
