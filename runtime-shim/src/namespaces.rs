//! The pod-wide namespaces and mounts the shim owns, so a sandbox needs no pause process and no
//! image: network and IPC namespaces created and pinned with a bind mount (as `ip netns add`
//! does), and the pod's shared `/dev/shm`; each removed by unmounting.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
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

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> NamespaceError + 'a {
    move |source| NamespaceError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Creates a new network namespace pinned at `dir/name`; returns its path.
pub fn create(dir: &Path, name: &str) -> Result<PathBuf, NamespaceError> {
    pin_new(dir, name, CloneFlags::CLONE_NEWNET, "net")
}

/// Creates a new IPC namespace pinned at `dir/name`, for a pod's containers to share (System V
/// IPC and POSIX message queues); returns its path.
pub fn create_ipc(dir: &Path, name: &str) -> Result<PathBuf, NamespaceError> {
    pin_new(dir, name, CloneFlags::CLONE_NEWIPC, "ipc")
}

fn pin_new(
    dir: &Path,
    name: &str,
    kind: CloneFlags,
    proc_name: &str,
) -> Result<PathBuf, NamespaceError> {
    let path = dir.join(name);
    std::fs::create_dir_all(dir).map_err(io("create namespace directory", dir))?;
    std::fs::File::create(&path).map_err(io("create namespace mount point", &path))?;
    let target = path.clone();
    let source = format!("/proc/thread-self/ns/{proc_name}");
    // A thread of its own enters the new namespace and dies with it pinned; the shim's other
    // threads never change namespace.
    let pinned = std::thread::spawn(move || -> Result<(), std::io::Error> {
        unshare(kind)?;
        mount(
            Some(source.as_str()),
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
        return Err(NamespaceError::Io {
            what: "create and pin namespace",
            path,
            source,
        });
    }
    Ok(path)
}

/// Mounts the pod's shared `/dev/shm`: a tmpfs of `size_kib` at `path` (created if missing),
/// mode 1777, no devices, setuid or exec, as containerd's CRI makes it.
pub fn mount_shm(path: &Path, size_kib: u64) -> Result<(), NamespaceError> {
    std::fs::create_dir_all(path).map_err(io("create shm mount point", path))?;
    mount(
        Some("shm"),
        path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,size={size_kib}k").as_str()),
    )
    .map_err(|errno| NamespaceError::Io {
        what: "mount the pod's shm",
        path: path.to_owned(),
        source: errno.into(),
    })
}

/// Unmounts what [`mount_shm`] mounted. Already gone is fine; the directory stays.
pub fn unmount_shm(path: &Path) -> Result<(), NamespaceError> {
    unmount(path, "unmount the pod's shm")
}

fn unmount(path: &Path, what: &'static str) -> Result<(), NamespaceError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL | nix::Error::ENOENT) => Ok(()),
        Err(errno) => Err(NamespaceError::Io {
            what,
            path: path.to_owned(),
            source: errno.into(),
        }),
    }
}

/// Unpins and removes the namespace at `path`. Already gone is fine.
pub fn remove(path: &Path) -> Result<(), NamespaceError> {
    unmount(path, "unmount namespace")?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NamespaceError::Io {
            what: "remove namespace mount point",
            path: path.to_owned(),
            source,
        }),
    }
}
