//! systemd's notify protocol (`sd_notify`): `READY=1` once the component serves, and `WATCHDOG=1`
//! pings at half the unit's `WatchdogSec`. Outside systemd (`NOTIFY_SOCKET` unset) it is silent.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Sends `state` to systemd; `Ok(false)` when not running under a notify-aware manager.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = socket.to_string_lossy().into_owned();
    let datagram = UnixDatagram::unbound()?;
    if let Some(abstract_name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?;
        datagram.send_to_addr(state.as_bytes(), &address)?;
    } else {
        datagram.send_to(state.as_bytes(), &socket)?;
    }
    Ok(true)
}

/// What tells that a component serves.
#[derive(Debug, Clone)]
pub enum Probe {
    /// A Unix socket accepts connections (the shim's CRI socket).
    Unix(PathBuf),
    /// `GET <path>` on a local HTTP address answers 200 (the kubelet's and the proxy's healthz).
    Http(std::net::SocketAddr, &'static str),
    /// A file exists (netd's CNI conflist).
    File(PathBuf),
    /// Nothing to wait for.
    Now,
}

impl Probe {
    async fn passes(&self) -> bool {
        match self {
            Probe::Unix(path) => tokio::net::UnixStream::connect(path).await.is_ok(),
            Probe::Http(address, path) => http_ok(*address, path).await,
            Probe::File(path) => path.exists(),
            Probe::Now => true,
        }
    }
}

async fn http_ok(address: std::net::SocketAddr, path: &str) -> bool {
    matches!(http_get(address, path).await, Ok((200, _)))
}

/// `GET <path>` on a local HTTP address (2 s at most): the status code and the body.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer from {address}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::other(format!("{address} did not answer within 2 s")))?
}

pub fn spawn(probe: Probe) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tokio::spawn(async move {
        while !probe.passes().await {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        match notify("READY=1") {
            Ok(_) => tracing::info!("told systemd the service is ready"),
            Err(error) => tracing::warn!(%error, "could not tell systemd the service is ready"),
        }
    });
    let period = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|usec| usec.parse::<u64>().ok())
        .filter(|_| {
            std::env::var("WATCHDOG_PID")
                .map(|pid| pid == std::process::id().to_string())
                .unwrap_or(true)
        });
    if let Some(usec) = period {
        let every = Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(error) = notify("WATCHDOG=1") {
                    tracing::warn!(%error, "watchdog ping failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn readiness_and_watchdog_reach_the_notify_socket_once_the_probe_passes() {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&socket_path).unwrap();
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let ready_file = dir.path().join("ready");
        // SAFETY: this test is the only one in the binary that touches these variables.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", &socket_path);
            std::env::set_var("WATCHDOG_USEC", "200000");
            std::env::remove_var("WATCHDOG_PID");
        }
        spawn(Probe::File(ready_file.clone()));
        let mut buffer = [0u8; 64];
        let received = |buffer: &mut [u8]| {
            let n = systemd.recv(buffer).unwrap();
            String::from_utf8_lossy(&buffer[..n]).into_owned()
        };
        // Watchdog pings come at once; READY=1 only after the probe passes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        systemd.set_nonblocking(true).unwrap();
        let mut early = Vec::new();
        while let Ok(n) = systemd.recv(&mut buffer) {
            early.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
        }
        assert!(
            early.iter().all(|m| m == "WATCHDOG=1") && !early.is_empty(),
            "{early:?}"
        );
        systemd.set_nonblocking(false).unwrap();
        std::fs::write(&ready_file, "").unwrap();
        let mut later = Vec::new();
        for _ in 0..10 {
            let message = tokio::task::block_in_place(|| received(&mut buffer));
            if message == "READY=1" {
                break;
            }
            later.push(message);
        }
        assert!(later.len() < 10, "READY=1 never came: {later:?}");
    }
}
