//! tug's runtime shim.
//!
//! Owns the CRI v1 server (RuntimeService and ImageService) on top of containerd's native API:
//! sandboxes with pinned namespaces and CNI, containers built from CRI configs into OCI specs, image
//! pull from OCI registries, logs and streaming. See `DESIGN.md` §3 (pod start) and §4 (CRI facts).
//!
//! Built so far: image pull ([`image`]), the CRI ImageService ([`cri::images`]), pinned pod
//! network namespaces ([`netns`]) and CNI invocation ([`network`]). The RuntimeService and the
//! `tug shim` server are tracked by issue #5.

pub mod cri;
pub mod image;
pub mod netns;
pub mod network;
pub mod spec;
