//! Preflight checks: what must hold on this machine before it joins, each with a name the
//! operator can pass to `--ignore-preflight-errors`.

#![allow(
    clippy::print_stdout,
    reason = "tug join reports to the operator on stdout"
)]

use std::path::Path;

/// How a check came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Fine.
    Ok,
    /// Worth knowing; does not stop the join.
    Warning(String),
    /// Stops the join unless ignored.
    Error(String),
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Check {
    /// Its name (for `--ignore-preflight-errors`).
    pub name: String,
    /// How it came out.
    pub outcome: Outcome,
}

fn check(name: &str, outcome: Outcome) -> Check {
    Check {
        name: name.to_owned(),
        outcome,
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Runs every check; files tug would write are looked for below `root`.
pub fn run(root: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(check(
        "IsPrivilegedUser",
        if nix::unistd::geteuid().is_root() {
            Outcome::Ok
        } else {
            Outcome::Error(
                "tug join must run as root (it installs units and writes /etc/kubernetes)".into(),
            )
        },
    ));
    let existing: Vec<String> = [super::KUBECONFIG, super::BOOTSTRAP_KUBECONFIG, super::CA]
        .iter()
        .map(|p| root.join(p))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    checks.push(check(
        "FileAvailable",
        if existing.is_empty() {
            Outcome::Ok
        } else {
            Outcome::Error(format!(
                "this machine has joined a cluster already ({} exist): run `tug reset` first",
                existing.join(", ")
            ))
        },
    ));
    let containerd = "/run/containerd/containerd.sock";
    checks.push(check(
        "CRI",
        match std::os::unix::net::UnixStream::connect(containerd) {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::Error(format!(
                "containerd is not reachable at {containerd}: {e} (install it with `apt-get install containerd` and start it)"
            )),
        },
    ));
    for (port, who) in [
        (10250, "the kubelet API"),
        (10256, "the proxy's health check"),
    ] {
        checks.push(check(
            &format!("Port-{port}"),
            match std::net::TcpListener::bind(("0.0.0.0", port)) {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Error(format!(
                    "port {port} ({who}) is in use: {e} (is another kubelet or kube-proxy running?)"
                )),
            },
        ));
    }
    let swaps = read("/proc/swaps").unwrap_or_default();
    checks.push(check(
        "Swap",
        if swaps.lines().count() <= 1 {
            Outcome::Ok
        } else {
            Outcome::Error(
                "swap is on: the kubelet's memory accounting and eviction assume none (`swapoff -a`, and remove it from /etc/fstab)".into(),
            )
        },
    ));
    checks.push(check(
        "FileContent--proc-sys-net-ipv4-ip_forward",
        match read("/proc/sys/net/ipv4/ip_forward").as_deref().map(str::trim) {
            Some("1") => Outcome::Ok,
            _ => Outcome::Error(
                "IPv4 forwarding is off: pods' traffic could not leave the node (`sysctl -w net.ipv4.ip_forward=1`, and set it in /etc/sysctl.d)".into(),
            ),
        },
    ));
    checks.push(check(
        "SystemVerification-cgroups",
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            Outcome::Ok
        } else {
            Outcome::Warning(
                "cgroup v2 is not mounted at /sys/fs/cgroup; tug is tested on cgroup v2".into(),
            )
        },
    ));
    let filesystems = read("/proc/filesystems").unwrap_or_default();
    checks.push(check(
        "SystemVerification-overlay",
        if filesystems.contains("overlay") || Path::new("/sys/module/overlay").exists() {
            Outcome::Ok
        } else {
            Outcome::Warning("the overlay filesystem is not loaded (`modprobe overlay`): containerd's default snapshotter needs it".into())
        },
    ));
    checks.push(check(
        "SystemVerification-netfilter",
        if Path::new("/proc/sys/net/netfilter").exists()
            || Path::new("/sys/module/nf_tables").exists()
        {
            Outcome::Ok
        } else {
            Outcome::Warning(
                "netfilter is not loaded (`modprobe nf_tables nf_conntrack`): Services need it"
                    .into(),
            )
        },
    ));
    checks
}

/// Prints the checks; returns the names of the errors not ignored.
pub fn print_and_judge(checks: &[Check], ignore: &[String]) -> Vec<String> {
    let ignored = |name: &str| {
        ignore
            .iter()
            .any(|i| i.eq_ignore_ascii_case("all") || i.eq_ignore_ascii_case(name))
    };
    let mut failed = Vec::new();
    for check in checks {
        match &check.outcome {
            Outcome::Ok => println!("  ok       {}", check.name),
            Outcome::Warning(why) => println!("  warning  {}: {why}", check.name),
            Outcome::Error(why) if ignored(&check.name) => {
                println!("  ignored  {}: {why}", check.name)
            }
            Outcome::Error(why) => {
                println!("  ERROR    {}: {why}", check.name);
                failed.push(check.name.clone());
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_join_is_an_error_and_ignoring_works_by_name_or_all() {
        let root = tempfile::tempdir().unwrap();
        let ca = root.path().join(super::super::CA);
        std::fs::create_dir_all(ca.parent().unwrap()).unwrap();
        std::fs::write(&ca, "x").unwrap();
        let checks = run(root.path());
        let file = checks.iter().find(|c| c.name == "FileAvailable").unwrap();
        assert!(matches!(&file.outcome, Outcome::Error(why) if why.contains("tug reset")));
        let only_file = vec![file.clone()];
        assert_eq!(print_and_judge(&only_file, &[]), ["FileAvailable"]);
        assert!(print_and_judge(&only_file, &["fileavailable".into()]).is_empty());
        assert!(print_and_judge(&only_file, &["all".into()]).is_empty());
    }
}
