//! The `tug` binary's commands, as a library: the binary (`main.rs`) parses the command line and
//! dispatches here, and the fuzz targets (`fuzz/`) reach the parsers `tug join` runs on what a
//! cluster hands it (bootstrap tokens, CA pins, cluster-info's kubeconfig and signature).

pub mod join;
pub mod kubeconfig;
pub mod kubelet;
pub mod netd;
pub mod notify;
pub mod proxy;
pub mod reset;
pub mod shim;
pub mod shutdown;
pub mod status;
pub mod units;
