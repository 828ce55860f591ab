//! The one shutdown path: the first SIGINT or SIGTERM starts a graceful drain; a second one, or
//! the drain outlasting its deadline, exits at once (STYLE.md §11).

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

/// How long a graceful drain may take before the process exits anyway.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Resolves on the first SIGINT/SIGTERM, and arms the forced exit for a second signal or the
/// drain deadline.
pub async fn signalled() {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down; a second signal exits at once");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = tokio::time::sleep(DRAIN_DEADLINE) => tracing::warn!(?DRAIN_DEADLINE, "drain took too long"),
        }
        std::process::exit(1);
    });
}

/// Logs to stderr (journald picks it up under systemd); `RUST_LOG` filters, default `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: journald stores the escapes verbatim.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
