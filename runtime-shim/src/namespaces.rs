//! The pod-wide namespaces and mounts the shim owns, so a sandbox needs no pause container and no
//! image: network and IPC namespaces created and pinned with a bind mount (as `ip netns add`
//! does), and the pod's shared `/dev/shm`; each removed by unmounting. A shared PID namespace
//! cannot outlive its PID 1, so it is held by `tug pod-init` (see [`crate::pod_init`]).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

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

/// Creates the empty file `dir/name` a namespace is pinned on.
fn mount_point(dir: &Path, name: &str) -> Result<PathBuf, NamespaceError> {
    let path = dir.join(name);
    std::fs::create_dir_all(dir).map_err(io("create namespace directory", dir))?;
    std::fs::File::create(&path).map_err(io("create namespace mount point", &path))?;
    Ok(path)
}

/// Pins the namespace file `source` (under `/proc`) at `target`.
fn bind(source: &str, target: &Path) -> nix::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
}

fn pin_new(
    dir: &Path,
    name: &str,
    kind: CloneFlags,
    proc_name: &str,
) -> Result<PathBuf, NamespaceError> {
    let path = mount_point(dir, name)?;
    let target = path.clone();
    let source = format!("/proc/thread-self/ns/{proc_name}");
    // A thread of its own enters the new namespace and dies with it pinned; the shim's other
    // threads never change namespace.
    let pinned = std::thread::spawn(move || -> Result<(), std::io::Error> {
        unshare(kind)?;
        bind(&source, &target)?;
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

/// A pod's shared PID namespace: pinned at `path`, held by its PID 1 (`init`, a host PID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidNamespace {
    /// Where the namespace is pinned; containers join it by this path.
    pub path: PathBuf,
    /// The host PID of the namespace's init (`tug pod-init`).
    pub init: i32,
}

/// Creates a new PID namespace whose PID 1 is `init_program init_args..` (tug's `pod-init`),
/// pinned at `dir/name`. The init runs in a process group of its own and outlives the shim.
pub fn create_pid(
    dir: &Path,
    name: &str,
    init_program: &Path,
    init_args: &[&str],
) -> Result<PidNamespace, NamespaceError> {
    let path = mount_point(dir, name)?;
    let mut command = Command::new(init_program);
    command
        .args(init_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    // A thread of its own moves its future children into a new PID namespace; the init it
    // spawns is PID 1 there. The shim's other threads keep theirs.
    let spawned = std::thread::spawn(move || -> Result<std::process::Child, std::io::Error> {
        unshare(CloneFlags::CLONE_NEWPID)?;
        command.spawn()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let child = match spawned {
        Ok(child) => child,
        Err(source) => {
            let _ = std::fs::remove_file(&path);
            return Err(NamespaceError::Io {
                what: "start the pod's PID namespace init",
                path,
                source,
            });
        }
    };
    let namespace = PidNamespace {
        path: path.clone(),
        init: i32::try_from(child.id()).unwrap_or(i32::MAX),
    };
    // The Child is dropped unreaped on purpose: `stop_pid` reaps it (or the host's init does,
    // after a shim restart).
    drop(child);
    spawned_inits().insert(namespace.init);
    let source = format!("/proc/{}/ns/pid", namespace.init);
    if let Err(errno) = bind(&source, &path) {
        let _ = stop_pid(&namespace);
        let _ = std::fs::remove_file(&path);
        return Err(NamespaceError::Io {
            what: "pin the pod's PID namespace",
            path,
            source: errno.into(),
        });
    }
    Ok(namespace)
}

/// The inits this process started and has not reaped.
fn spawned_inits() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<i32>> {
    static INITS: std::sync::Mutex<std::collections::BTreeSet<i32>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    INITS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the namespace's init still runs (and is the same process: its namespace is the
/// pinned one, so a reused PID does not count).
pub fn pid_alive(namespace: &PidNamespace) -> bool {
    let pid = Pid::from_raw(namespace.init);
    // An init this process started is reaped as soon as it is seen to have exited.
    let mut ours = spawned_inits();
    if ours.contains(&namespace.init) {
        match waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {}
            _ => {
                ours.remove(&namespace.init);
                return false;
            }
        }
    }
    drop(ours);
    let inode = |path: &Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let running = inode(Path::new(&format!("/proc/{}/ns/pid", namespace.init)));
    // A zombie still shows its namespace.
    let zombie = std::fs::read_to_string(format!("/proc/{}/stat", namespace.init))
        .ok()
        .and_then(|stat| {
            let (_, after_comm) = stat.rsplit_once(')')?;
            after_comm
                .split_whitespace()
                .next()
                .map(|state| state == "Z")
        })
        .unwrap_or(true);
    !zombie && running.is_some() && running == inode(&namespace.path)
}

/// Ends the namespace: kills its init, and with it (by the kernel) every process left in it,
/// then waits for it. Already gone is fine; the pin stays until [`remove`].
pub fn stop_pid(namespace: &PidNamespace) -> Result<(), NamespaceError> {
    let pid = Pid::from_raw(namespace.init);
    if pid_alive(namespace) {
        kill(pid, Signal::SIGKILL).map_err(|errno| NamespaceError::Io {
            what: "kill the pod's PID namespace init",
            path: namespace.path.clone(),
            source: errno.into(),
        })?;
    }
    // Reaped here when this process started it (only then: after a shim restart its PID may
    // belong to another child of ours); otherwise the host's init reaps it.
    if spawned_inits().remove(&namespace.init) {
        let _ = waitpid(pid, None);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(namespace) {
        if Instant::now() > deadline {
            return Err(NamespaceError::Io {
                what: "wait for the pod's PID namespace init to exit",
                path: namespace.path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
