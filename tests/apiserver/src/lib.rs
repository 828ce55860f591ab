//! A dev-only, in-process Kubernetes API server (never shipped).
pub mod patch;
pub mod pki;
pub mod resources;
pub mod selectors;
pub mod status;
pub mod store;
