//! A tug node that is a qemu guest with a kernel of its own: the Debian systemd guest of
//! [`GuestSpec::systemd`] plugged into a test [`Segment`] through a tap, joined to the cluster
//! with `tug join` as an operator would (the API server reached at `kubernetes:<port>`, which its
//! `/etc/hosts` points at the segment's relay, so TLS verifies the name the API server's
//! certificate carries), pulling images through a registry mirror on the segment. It leaves as
//! an operator decommissions a machine: `tug reset --force --delete-node`, then power-off.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cluster::cluster;
use crate::cni::tug_binary;
use crate::e2e::Member;
use crate::node::Segment;
use crate::vm::{GuestRun, GuestSpec, boot_watching};

/// A running guest node.
#[derive(Debug)]
pub struct GuestNode {
    /// The Node's name.
    pub name: String,
    /// Its address on the segment.
    pub ip: String,
    mode: String,
    host: String,
    stop_port: u16,
    console: Arc<Mutex<String>>,
    guest: Option<JoinHandle<GuestRun>>,
}

/// The guest's shell: join, say so, wait to be told to leave, leave.
const SCRIPT: &str = r#"
sysctl -qw net.ipv4.ip_forward=1
/root/tug join "kubernetes:$API_PORT" --token "$TOKEN" --discovery-token-ca-cert-hash "$PIN" \
  --node-name "$NODE" --proxy-mode "$MODE" || {
  for unit in tug-shim tug-kubelet tug-proxy tug-netd; do journalctl -u "$unit" --no-pager -o cat | tail -30; done
  exit 1
}
echo tug-step=joined
until bash -c "echo > /dev/tcp/$HOST/$STOP_PORT" 2>/dev/null; do sleep 2; done
echo tug-step=leaving
tug reset --force --delete-node
"#;

/// What the tug units log goes to the console too (the test's window into the guest).
const CONSOLE_DROP_IN: &str =
    "[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n";

impl GuestNode {
    /// Boots a guest at `ip` (a /24 on `segment`) with its proxy in `proxy_mode`; images come
    /// through `registry`, a relay on the segment to the test registry. Returns once the guest
    /// is booting; [`GuestNode::joined`] waits for the join.
    pub fn start(
        segment: &Segment,
        ip: &str,
        proxy_mode: &str,
        registry: SocketAddr,
        token: &str,
    ) -> GuestNode {
        let name = crate::cluster::unique_name("guest");
        let stop_port = TcpListener::bind(format!("{}:0", segment.host()))
            .and_then(|l| l.local_addr())
            .expect("a free port on the segment")
            .port();
        let script = format!(
            "API_PORT={}\nTOKEN={token}\nPIN={}\nNODE={name}\nMODE={proxy_mode}\nHOST={}\nSTOP_PORT={stop_port}\n{SCRIPT}",
            segment.api().port(),
            cluster().ca_pin(),
            segment.host(),
        );
        let mut spec = GuestSpec::systemd(&script);
        spec.host_link = false;
        let port = segment.tap();
        spec.texts.extend([
            (
                "/etc/systemd/network/05-segment.network".to_owned(),
                format!(
                    "[Match]\nMACAddress={}\n\n[Network]\nAddress={ip}/24\nGateway={}\n",
                    port.mac,
                    segment.host()
                ),
            ),
            (
                "/etc/hosts".to_owned(),
                format!("127.0.0.1 localhost\n{} kubernetes\n", segment.host()),
            ),
            (
                "/etc/systemd/system/tug-shim.service.d/10-registry.conf".to_owned(),
                format!(
                    "[Service]\nExecStart=\nExecStart=/usr/local/bin/tug shim --registry-mirror {}=http://{registry}\n",
                    crate::substrate::Substrate::from_env().registry
                ),
            ),
            (
                "/etc/systemd/system/tug-proxy.service.d/10-console.conf".to_owned(),
                CONSOLE_DROP_IN.to_owned(),
            ),
            (
                "/etc/systemd/system/tug-netd.service.d/10-console.conf".to_owned(),
                CONSOLE_DROP_IN.to_owned(),
            ),
        ]);
        spec.lan = Some(port);
        spec.files.push((tug_binary(), "/root/tug".into()));
        let console = Arc::new(Mutex::new(String::new()));
        let lines = console.clone();
        let guest = std::thread::spawn(move || {
            boot_watching(&spec, |line| {
                let mut console = lines.lock().expect("console");
                console.push_str(line);
                console.push('\n');
            })
        });
        GuestNode {
            name,
            ip: ip.to_owned(),
            mode: proxy_mode.to_owned(),
            host: segment.host().to_owned(),
            stop_port,
            console,
            guest: Some(guest),
        }
    }

    /// Waits up to `timeout` for `tug join` to have finished in the guest.
    pub async fn joined(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console.lock().expect("console").clone();
            if console.contains("tug-step=joined") {
                return;
            }
            let ended = self.guest.as_ref().is_none_or(JoinHandle::is_finished);
            assert!(
                !ended && Instant::now() < deadline,
                "guest {} did not join ({}):\n{console}",
                self.name,
                if ended { "it powered off" } else { "timed out" }
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The console's last lines, for failure messages.
    pub fn log_reader(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let (console, name) = (self.console.clone(), self.name.clone());
        move || {
            let console = console.lock().expect("console");
            format!(
                "--- guest {name} console:\n{}",
                crate::node::last_lines(&console, 60)
            )
        }
    }

    /// The node as the end-to-end scenario sees it.
    pub fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            ip: self.ip.clone(),
            mode: self.mode.clone(),
            kubelet: format!("{}:10250", self.ip),
            logs: Box::new(self.log_reader()),
        }
    }

    /// Tells the guest to leave (`tug reset --force --delete-node`, power-off) and waits until
    /// it has; returns its console.
    pub fn leave(mut self) -> GuestRun {
        let listener = self.stop_listener();
        let guest = self.guest.take().expect("the guest runs until it leaves");
        let run = guest.join();
        drop(listener);
        run.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// What the guest waits for: a listener on the host's stop port.
    fn stop_listener(&self) -> Option<TcpListener> {
        TcpListener::bind((self.host.as_str(), self.stop_port))
            .inspect_err(|e| eprintln!("listen on {}:{}: {e}", self.host, self.stop_port))
            .ok()
    }
}

impl Drop for GuestNode {
    fn drop(&mut self) {
        if let Some(guest) = self.guest.take() {
            // The guest leaves as asked (or its boot's time limit ends qemu).
            let listener = self.stop_listener();
            let _ = guest.join();
            drop(listener);
        }
    }
}
