//! `tug pod-init`: PID 1 of a pod's shared PID namespace (`shareProcessNamespace: true`), the part
//! of a pause container such a pod needs, without an image. tug shim starts it in a new PID
//! namespace (see [`crate::namespaces::create_pid`]); the pod's containers join that namespace.
//!
//! As PID 1 it inherits every orphaned process in the pod and reaps it, so no zombies pile up. It
//! exits on SIGTERM or SIGINT (as the pause container does), which ends the namespace: the kernel
//! kills everything left in it. It holds no privilege: it runs as uid/gid 65535 (the pause
//! image's user), with no capabilities and `no_new_privs`.

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid, chdir, getpid, setgid, setgroups, setuid};

/// The uid and gid pod-init runs as, as the pause image's user.
const NOBODY: u32 = 65535;

/// Runs pod-init until SIGTERM or SIGINT; returns the process exit code.
pub fn run() -> u8 {
    if getpid() != Pid::from_raw(1) {
        eprintln!(
            "tug pod-init: must run as PID 1 of a new PID namespace (tug shim starts it for pods with shareProcessNamespace)"
        );
        return 2;
    }
    if let Err(error) = drop_privileges() {
        eprintln!("tug pod-init: drop privileges: {error}");
        return 1;
    }
    // Signals are taken synchronously: blocked signals are queued even for PID 1, which the
    // kernel would otherwise not deliver without a handler.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(signal);
    }
    if let Err(error) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None) {
        eprintln!("tug pod-init: block signals: {error}");
        return 1;
    }
    loop {
        reap();
        if let Ok(Signal::SIGTERM | Signal::SIGINT) = signals.wait() {
            return 0;
        }
    }
}

/// Reaps every exited child (orphans re-parented to PID 1 included).
fn reap() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

fn drop_privileges() -> nix::Result<()> {
    chdir("/")?;
    setgroups(&[])?;
    setgid(Gid::from_raw(NOBODY))?;
    // Leaving uid 0 clears every capability set (no SECBIT_KEEP_CAPS).
    setuid(Uid::from_raw(NOBODY))?;
    nix::sys::prctl::set_no_new_privs()
}
