//! tug's runtime shim.
//!
//! Owns the CRI v1 server (RuntimeService and ImageService) on top of containerd's native API:
//! sandboxes with pinned namespaces and CNI, containers built from CRI configs into OCI specs, image
//! pull from OCI registries, logs and streaming. See `DESIGN.md` §3 (pod start) and §4 (CRI facts).
//!
//! Parts: image pull ([`image`]), the CRI services ([`cri`]), OCI specs ([`spec`]), pinned pod
//! namespaces and shm ([`namespaces`]), the init of a shared PID namespace ([`pod_init`]), CNI invocation ([`network`]), the container log writer
//! ([`logger`]), the server ([`server`]), and the streaming server behind Exec, Attach and
//! PortForward (in [`cri`]).

pub mod cri;
pub mod image;
pub mod logger;
pub mod namespaces;
pub mod network;
pub mod pod_init;
pub mod server;
pub mod spec;
