//! Pod network namespaces the shim owns: created and pinned with a bind mount (as `ip netns add`
//! does), so a sandbox needs no pause process and no image; removed by unmounting.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Creating the mount point or the namespace failed. Retryable if it was a transient error.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The namespace path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Creates a new network namespace pinned at `dir/name`; returns its path.
pub fn create(dir: &Path, name: &str) -> Result<PathBuf, NetnsError> {
    let path = dir.join(name);
    std::fs::create_dir_all(dir).map_err(io("create netns directory", dir))?;
    std::fs::File::create(&path).map_err(io("create netns mount point", &path))?;
    let target = path.clone();
    // A thread of its own enters the new namespace and dies with it pinned; the shim's other
    // threads never change namespace.
    let pinned = std::thread::spawn(move || -> Result<(), std::io::Error> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    if let Err(source) = pinned {
        let _ = std::fs::remove_file(&path);
        return Err(NetnsError::Io {
            what: "create and pin netns",
            path,
            source,
        });
    }
    Ok(path)
}

/// Unpins and removes the namespace at `path`. Already gone is fine.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
        Err(errno) => {
            return Err(NetnsError::Io {
                what: "unmount netns",
                path: path.to_owned(),
                source: errno.into(),
            });
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Io {
            what: "remove netns mount point",
            path: path.to_owned(),
            source,
        }),
    }
}
