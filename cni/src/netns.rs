//! Running code inside another network namespace.
//!
//! A netlink socket belongs to the namespace it was opened in, so work for a namespace runs on a
//! dedicated OS thread that enters it, with a runtime and netlink connection of its own; the
//! caller's threads never change namespace (STYLE.md §8).

use std::fs::File;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// Why entering a namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file cannot be opened: usually it is gone. Not retryable.
    #[error("open netns {path}: {source}")]
    Open {
        /// The namespace path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `setns` refused (missing CAP_SYS_ADMIN, or not a network namespace). Not retryable.
    #[error("enter netns {path}: {source}")]
    Enter {
        /// The namespace path.
        path: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

/// Runs `work` on a fresh thread inside the network namespace at `path`, with a current-thread
/// tokio runtime for netlink, and returns its result.
pub fn run_in<T, F, Fut>(path: &Path, work: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = T>,
{
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.display().to_string(),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: path.display().to_string(),
                    source,
                })?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime builds");
                Ok(runtime.block_on(work()))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
