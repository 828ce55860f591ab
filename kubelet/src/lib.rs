//! tug's kubelet.
//!
//! Owns the node's relationship with the API server: Node registration and its Lease, the pod workers
//! that drive each pod bound to this node through a CRI runtime, probes, volumes, pod status, static
//! pods and the kubelet API on :10250. See `DESIGN.md` §3 (pod start) and §4 (node and pod facts).
//!
//! Built so far: the Node and its status ([`node`]), registration, the Lease and the status loop
//! ([`register`]), and runtime health over the CRI ([`runtime`]). Pods are not run yet (issue
//! #7), so `tug kubelet` is not wired up: a Node that reports Ready without running pods would
//! attract pods it never starts.

pub mod node;
pub mod pods;
pub mod register;
pub mod runtime;
