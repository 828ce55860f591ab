//! Multi-node topologies from network namespaces: an L2 segment is a bridge inside a namespace
//! of its own; nodes, routers and the host attach to it with veth pairs. A [`Relay`] on the
//! host's attachment lets namespaced "nodes" reach the API server the tests use (the in-process
//! one on 127.0.0.1, or a real cluster), with `tls-server-name` keeping TLS verification real.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{Netns, ip};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// An L2 segment: a bridge in a namespace of its own.
#[derive(Debug)]
pub struct Lan {
    ns: Netns,
    host_links: std::sync::Mutex<Vec<String>>,
}

impl Lan {
    /// A new empty segment.
    pub fn new(label: &str) -> Lan {
        let ns = Netns::new(label);
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Lan {
            ns,
            host_links: Default::default(),
        }
    }

    fn veth_names(&self) -> (String, String) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        (
            format!("tl{}p{n}", std::process::id() % 100_000),
            format!("tl{}q{n}", std::process::id() % 100_000),
        )
    }

    /// Plugs `ns` into the segment as interface `ifname` with address `cidr` (e.g. "192.168.5.1/24").
    pub fn attach(&self, ns: &Netns, ifname: &str, cidr: &str) {
        let (port, peer) = self.veth_names();
        ip(&[
            "link",
            "add",
            &port,
            "netns",
            self.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            ns.name(),
        ]);
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&["link", "set", &peer, "name", ifname]);
        ns.ip(&["addr", "add", cidr, "dev", ifname]);
        ns.ip(&["link", "set", ifname, "up"]);
    }

    /// Plugs the host's own namespace into the segment with address `cidr`; returns the link name.
    /// The link goes away with the segment.
    pub fn attach_host(&self, cidr: &str) -> String {
        let (port, host) = self.veth_names();
        ip(&[
            "link",
            "add",
            &port,
            "netns",
            self.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &host,
        ]);
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"]);
        ip(&["addr", "add", cidr, "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        self.host_links
            .lock()
            .expect("host links")
            .push(host.clone());
        host
    }

    /// A tap port on the segment's bridge, for a qemu guest's NIC (qemu opens it from inside
    /// the segment's namespace). The port goes away with the segment.
    pub fn tap(&self) -> LanPort {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tap = format!("tt{}t{n}", std::process::id() % 100_000);
        self.ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
        self.ns.ip(&["link", "set", &tap, "master", "br0", "up"]);
        LanPort {
            netns: self.ns.path(),
            tap,
            mac: format!("52:54:00:7e:{:02x}:{:02x}", (n >> 8) & 0xff, n & 0xff),
        }
    }
}

/// A tap port on a [`Lan`]'s bridge.
#[derive(Debug, Clone)]
pub struct LanPort {
    /// The segment's namespace, where the tap is.
    pub netns: std::path::PathBuf,
    /// The tap's name.
    pub tap: String,
    /// The MAC address the guest's NIC on it gets.
    pub mac: String,
}

impl Drop for Lan {
    fn drop(&mut self) {
        for link in self.host_links.lock().expect("host links").drain(..) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &link])
                .status();
        }
    }
}

/// A TCP relay from a local address to a target (TLS passes through untouched). It can be cut
/// (its port closed and every connection through it reset, as when the target's host is up but
/// its server is down) and restored at the same address, and it counts what it relays back.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<RelayShared>,
}

#[derive(Debug, Default)]
struct RelayShared {
    /// The accept loop's listener while the relay is up (shut down to end the loop).
    listener: std::sync::Mutex<Option<TcpListener>>,
    /// Every connection through the relay, both ends, to cut them.
    conns: std::sync::Mutex<Vec<TcpStream>>,
    /// Bytes relayed from the target back to clients.
    returned: std::sync::atomic::AtomicU64,
    /// Which accept loop is the current one (a cut ends the others).
    generation: AtomicU32,
}

impl Relay {
    /// Listens on `bind` (port 0 picks one) and forwards every connection to `target`.
    pub fn start(bind: SocketAddr, target: &str) -> Relay {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("relay bind {bind}: {e}"));
        Relay::serve(listener, target)
    }

    /// Listens on `bind` inside `ns` and forwards every connection to `target` as the host
    /// reaches it (e.g. a service on the host's loopback, at the same address in the node).
    pub fn start_in(ns: &Netns, bind: SocketAddr, target: &str) -> Relay {
        let listener = ns
            .run(|| TcpListener::bind(bind))
            .unwrap_or_else(|e| panic!("relay bind {bind} in {}: {e}", ns.name()));
        Relay::serve(listener, target)
    }

    fn serve(listener: TcpListener, target: &str) -> Relay {
        let target = target
            .to_socket_addrs()
            .expect("resolve relay target")
            .next()
            .expect("a target address");
        let addr = listener.local_addr().expect("relay address");
        let relay = Relay {
            addr,
            target,
            shared: Arc::new(RelayShared::default()),
        };
        relay.accept(listener);
        relay
    }

    fn accept(&self, listener: TcpListener) {
        *self.shared.listener.lock().expect("relay lock") =
            Some(listener.try_clone().expect("clone the relay's socket"));
        let (shared, target) = (self.shared.clone(), self.target);
        let generation = shared.generation.load(Ordering::Relaxed);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else {
                    // A listener shut down fails every accept from then on.
                    if shared.generation.load(Ordering::Relaxed) != generation {
                        return;
                    }
                    continue;
                };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                {
                    let mut conns = shared.conns.lock().expect("relay lock");
                    conns.retain(|c| c.peer_addr().is_ok());
                    conns.extend(
                        [client.try_clone(), server.try_clone()]
                            .into_iter()
                            .flatten(),
                    );
                }
                for (mut from, mut to, back) in [
                    (client.try_clone(), server.try_clone(), false),
                    (server.try_clone(), client.try_clone(), true),
                ]
                .into_iter()
                .filter_map(|(a, b, back)| Some((a.ok()?, b.ok()?, back)))
                {
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                    if back {
                                        shared.returned.fetch_add(n as u64, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    }

    /// Where the relay listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes relayed from the target back to clients so far.
    pub fn returned(&self) -> u64 {
        self.shared.returned.load(Ordering::Relaxed)
    }

    /// Closes the relay's port (connecting is refused) and resets every connection through it.
    pub fn cut(&self) {
        self.shared.generation.fetch_add(1, Ordering::Relaxed);
        if let Some(listener) = self.shared.listener.lock().expect("relay lock").take() {
            // Wakes the blocked accept (Linux fails it once the listener is shut down); the
            // socket closes when the loop drops its copy.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&listener),
                nix::sys::socket::Shutdown::Both,
            );
        }
        for conn in self.shared.conns.lock().expect("relay lock").drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Opens the port again after [`Relay::cut`] (a relay started in the host's namespace).
    pub fn restore(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                // The old socket closes when its accept loop wakes and drops it.
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("relay bind {} again: {e}", self.addr),
            }
        };
        self.accept(listener);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.generation.fetch_add(1, Ordering::Relaxed);
        if let Some(listener) = self.shared.listener.lock().expect("relay lock").take() {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&listener),
                nix::sys::socket::Shutdown::Both,
            );
        }
    }
}

/// `kubeconfig` with its server replaced by `server` and TLS verified against `tls_server_name`.
pub fn redirect_kubeconfig(kubeconfig: &str, server: &str, tls_server_name: &str) -> String {
    kubeconfig
        .lines()
        .map(|line| match line.trim_start().strip_prefix("server: ") {
            Some(_) => {
                let indent = &line[..line.len() - line.trim_start().len()];
                format!("{indent}server: {server}\n{indent}tls-server-name: {tls_server_name}")
            }
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
