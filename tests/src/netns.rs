//! Throwaway network namespaces for tests.
//!
//! A [`Netns`] is a named namespace (`/run/netns/<name>`, the `ip netns` convention that CNI runtimes
//! and operators use) removed on drop. Code runs inside it through [`Netns::run`], which enters the
//! namespace on a dedicated OS thread: sockets opened there belong to the namespace for their whole
//! life, and no tokio worker thread ever changes namespace (STYLE.md §8).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `tt-<label>-<pid>-<n>` with its loopback up.
    ///
    /// Names stay within 15 characters' worth of uniqueness per process so that interface names
    /// derived from them by tests remain valid.
    pub fn new(label: &str) -> Netns {
        let name = format!(
            "tt-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// The namespace's name under `/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind-mounted path, as given to runtimes (`CNI_NETNS`, OCI `linux.namespaces`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip <args>` inside the namespace and panics with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace, and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = File::open(&path)
                        .unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()));
                    setns(&ns, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("enter netns {}: {e}", path.display()));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}: {status:?}", self.name);
        }
    }
}

/// Connects two namespaces with a veth pair named `a_if` (in `a`) and `b_if` (in `b`).
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    ip(&[
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A command running `program`, inside the network namespace at `netns` when one is given
/// (through `nsenter`, so the process and its children live there from the start).
pub fn command_in(netns: Option<&Path>, program: &Path) -> std::process::Command {
    match netns {
        Some(netns) => {
            let mut command = std::process::Command::new("nsenter");
            command
                .arg(format!("--net={}", netns.display()))
                .arg(program);
            command
        }
        None => std::process::Command::new(program),
    }
}

/// Runs `ip <args>` in the caller's namespace and panics with its stderr if it fails.
pub fn ip(args: &[&str]) -> Output {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {}: {e}", args.join(" ")));
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    output
}

/// Sends a TCP payload from `client` to a listener in `server` at `addr`, echoed back upper-cased;
/// returns the address the server saw the connection come from.
pub fn tcp_round_trip(
    client: &Netns,
    server: &Netns,
    addr: std::net::SocketAddr,
) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = server.run(|| {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", server.name()))
    });
    let echo = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().expect("accept");
        let mut request = [0u8; 5];
        conn.read_exact(&mut request).expect("read request");
        conn.write_all(&request.map(|b| b.to_ascii_uppercase()))
            .expect("write reply");
        peer
    });
    let reply = client.run(|| {
        let mut conn = TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect from {} to {addr}: {e}", client.name()));
        conn.write_all(b"hello").expect("write request");
        let mut reply = [0u8; 5];
        conn.read_exact(&mut reply).expect("read reply");
        reply
    });
    assert_eq!(
        &reply,
        b"HELLO",
        "the payload round-trips from {} to {addr}",
        client.name()
    );
    echo.join().expect("echo thread")
}
