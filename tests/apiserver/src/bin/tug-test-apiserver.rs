//! Runs the test API server standalone (for kubectl by hand, or a node under test):
//! `tug-test-apiserver [--listen ADDR] [--kubeconfig PATH]` writes an admin kubeconfig and serves
//! until interrupted.

use std::net::SocketAddr;

use tug_test_apiserver::{ServerConfig, TestApiServer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = ServerConfig::default();
    let mut kubeconfig = std::path::PathBuf::from("admin.kubeconfig");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => config.listen = args.next().ok_or("--listen needs ADDR:PORT")?.parse::<SocketAddr>()?,
            "--kubeconfig" => kubeconfig = args.next().ok_or("--kubeconfig needs a path")?.into(),
            other => return Err(format!("unknown argument {other}; usage: tug-test-apiserver [--listen ADDR:PORT] [--kubeconfig PATH]").into()),
        }
    }
    let server = TestApiServer::start(config)?;
    std::fs::write(&kubeconfig, server.admin_kubeconfig())?;
    eprintln!(
        "test API server on {}; admin kubeconfig in {}",
        server.url(),
        kubeconfig.display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(tokio::signal::ctrl_c())?;
    Ok(())
}
