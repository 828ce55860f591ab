//! The `tug` binary: one executable for every node component (k3s-style).
//!
//! `main` only parses the command line and dispatches; each component is a library crate with its own
//! `run`. When the binary is exec'd under the name `tug-cni` (as a CNI runtime does, via a link in the
//! CNI plugin directory) it acts as the CNI plugin, per `DESIGN.md` §1.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tug::{join, kubelet, netd, proxy, reset, shim, shutdown, status};

#[derive(Debug, Parser)]
#[command(
    name = "tug",
    version,
    about = "tug: a Kubernetes worker node — kubelet, CRI runtime shim, kube-proxy and CNI in one binary",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the kubelet: register the node, run the pods bound to it, probe them, report status.
    Kubelet(kubelet::KubeletArgs),
    /// Run the CRI v1 runtime shim on containerd (serves /run/tug/cri.sock).
    Shim(shim::ShimArgs),
    /// Write a container's output as a CRI log (run by containerd's shim, not by hand).
    #[command(hide = true)]
    ShimLogger {
        /// The log file.
        path: std::path::PathBuf,
        /// Read the container's stdout from this FIFO (instead of containerd's fd 3).
        #[arg(long)]
        stdout_fifo: Option<std::path::PathBuf>,
        /// Read the container's stderr from this FIFO (with --stdout-fifo; none with a TTY).
        #[arg(long, requires = "stdout_fifo")]
        stderr_fifo: Option<std::path::PathBuf>,
        /// Hold the container's stdin FIFO open until SIGUSR2 (with --stdout-fifo).
        #[arg(long, requires = "stdout_fifo")]
        stdin_fifo: Option<std::path::PathBuf>,
    },
    /// PID 1 of a pod's shared PID namespace (started by tug shim, not by hand).
    #[command(hide = true)]
    PodInit,
    /// Run kube-proxy: program Services and EndpointSlices as iptables, nftables or IPVS rules.
    Proxy(proxy::ProxyArgs),
    /// Run the node network agent: CNI config for this node's pod CIDR, routes to other nodes.
    Netd(netd::NetdArgs),
    /// Act as the CNI plugin (what `tug-cni` runs when a CRI runtime execs it).
    Cni,
    /// Join an existing cluster with a bootstrap token and install tug's systemd units.
    Join(join::JoinArgs),
    /// Undo `tug join`: stop the units, remove rules, routes, config and certificates.
    Reset(reset::ResetArgs),
    /// One screen on this node: its services, its Node's Ready condition, pods, rules, routes.
    Status(status::StatusArgs),
}

/// Rewrites `tug-cni <args>` into `tug cni <args>` so one binary serves both names.
fn normalise_args(mut args: Vec<OsString>) -> Vec<OsString> {
    let invoked_as_cni = args
        .first()
        .and_then(|argv0| Path::new(argv0).file_name())
        .is_some_and(|name| name == "tug-cni");
    if invoked_as_cni {
        args.splice(0..1, [OsString::from("tug"), OsString::from("cni")]);
    }
    args
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalise_args(std::env::args_os().collect()));
    let command = cli.command;
    match command {
        // The CNI protocol is environment + stdin + stdout; see tug_cni::plugin.
        Command::Cni => ExitCode::from(tug_cni::plugin::run()),
        Command::Netd(args) => run_async(SERVICE_LOG, netd::run(args)),
        Command::Kubelet(args) => run_async(SERVICE_LOG, kubelet::run(args)),
        Command::Shim(args) => run_async(SERVICE_LOG, shim::run(args)),
        Command::Proxy(args) => run_async(SERVICE_LOG, proxy::run(args)),
        Command::Join(args) => run_async(COMMAND_LOG, join::run(args)),
        Command::Reset(args) => run_async(COMMAND_LOG, reset::run(args)),
        Command::Status(args) => run_async(COMMAND_LOG, status::run(args)),
        Command::PodInit => ExitCode::from(tug_runtime_shim::pod_init::run()),
        Command::ShimLogger {
            path,
            stdout_fifo,
            stderr_fifo,
            stdin_fifo,
        } => {
            let inputs = match stdout_fifo {
                Some(stdout) => tug_runtime_shim::logger::Inputs::Fifos {
                    stdout,
                    stderr: stderr_fifo,
                    stdin: stdin_fifo,
                },
                None => tug_runtime_shim::logger::Inputs::Fds,
            };
            ExitCode::from(tug_runtime_shim::logger::run(&path, inputs))
        }
    }
}

/// The services log what they do (`RUST_LOG` overrides).
const SERVICE_LOG: &str = "info";
/// The operator's commands (join, reset, status) report on stdout themselves and log only
/// problems, without the API client's notice that join's first, unverified read skips
/// certificate checks (join verifies that read with the token's signature and the CA pin).
const COMMAND_LOG: &str = "warn,kube_client::client::tls=error";

/// Runs a component or command on a multi-threaded runtime with logging (`log` is the default
/// filter); errors print their whole chain and exit 1.
fn run_async(
    log: &str,
    component: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    shutdown::init_logging(log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tug: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(component) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tug: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let args = args.iter().map(OsString::from).collect();
        Cli::try_parse_from(normalise_args(args)).expect("command line parses")
    }

    #[test]
    fn invoked_as_tug_cni_dispatches_to_the_cni_plugin() {
        assert!(matches!(
            parse(&["/opt/cni/bin/tug-cni"]).command,
            Command::Cni
        ));
    }

    #[test]
    fn subcommands_dispatch_by_name() {
        assert!(matches!(
            parse(&["tug", "kubelet"]).command,
            Command::Kubelet(_)
        ));
        assert!(matches!(
            parse(&["/usr/bin/tug", "proxy"]).command,
            Command::Proxy(_)
        ));
    }

    #[test]
    fn the_log_writer_command_line_containerd_builds_parses() {
        // containerd's shim turns `binary:///usr/local/bin/tug?shim-logger=<path>` into this.
        let cli = parse(&[
            "/usr/local/bin/tug",
            "shim-logger",
            "/var/log/pods/a_b_c/app/0.log",
        ]);
        assert!(
            matches!(cli.command, Command::ShimLogger { path, stdout_fifo: None, stderr_fifo: None, stdin_fifo: None } if path == Path::new("/var/log/pods/a_b_c/app/0.log"))
        );
        // tug shim's own form, for containers with stdin.
        let cli = parse(&[
            "tug",
            "shim-logger",
            "/l/0.log",
            "--stdout-fifo",
            "/io/stdout",
            "--stderr-fifo",
            "/io/stderr",
        ]);
        assert!(matches!(
            cli.command,
            Command::ShimLogger { stdout_fifo: Some(o), stderr_fifo: Some(e), .. }
                if o == Path::new("/io/stdout") && e == Path::new("/io/stderr")
        ));
    }

    #[test]
    fn unknown_subcommand_is_a_usage_error() {
        let args = ["tug", "scheduler"]
            .iter()
            .map(OsString::from)
            .collect::<Vec<_>>();
        let err = Cli::try_parse_from(normalise_args(args)).expect_err("unknown subcommand");
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidSubcommand);
    }
}
