//! Running code inside another network namespace.
//!
//! A netlink socket belongs to the namespace it was opened in, so a socket for another namespace
//! is opened on a dedicated OS thread that enters it; the caller's threads never change namespace
//! (STYLE.md §8).

use std::fs::File;
use std::path::Path;

use std::thread::{Scope, ScopedJoinHandle};

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

/// Runs `work` on a fresh thread inside the network namespace at `path` and returns its result:
/// typically it opens a netlink socket, which stays in that namespace after the thread is gone.
pub fn enter<T: Send>(path: &Path, work: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    std::thread::scope(|scope| join(spawn_in(scope, path, work)))
}

/// Like [`enter`], but returns at once, so the caller can get on with other work meanwhile;
/// [`join`] the handle for the result.
pub fn spawn_in<'scope, T: Send + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    path: &'scope Path,
    work: impl FnOnce() -> T + Send + 'scope,
) -> ScopedJoinHandle<'scope, Result<T, NetnsError>> {
    scope.spawn(move || {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: path.display().to_string(),
            source,
        })?;
        Ok(work())
    })
}

/// The result of [`spawn_in`]'s work; a panic there carries on here.
pub fn join<T>(handle: ScopedJoinHandle<'_, Result<T, NetnsError>>) -> Result<T, NetnsError> {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
