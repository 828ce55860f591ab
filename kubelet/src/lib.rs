//! tug's kubelet.
//!
//! Owns the node's relationship with the API server: Node registration and its Lease, the pod workers
//! that drive each pod bound to this node through a CRI runtime, probes, volumes, pod status, static
//! pods and the kubelet API on :10250. See `DESIGN.md` §3 (pod start) and §4 (node and pod facts).
//!
//! Parts: the Node and its status ([`node`]), registration, the Lease and the status loop
//! ([`register`]), the CRI client ([`runtime`]), the pods ([`pods`]: workers, translation to the
//! CRI, status, probes, volumes), the configuration file ([`config`]) and the assembly of all of
//! it ([`run`]).

pub mod api;
pub mod bootstrap;
pub mod config;
pub mod eviction;
pub mod metrics;
pub mod node;
pub mod pods;
pub mod register;
pub mod rotation;
pub mod run;
pub mod runtime;
pub mod serving;
pub mod stats;
