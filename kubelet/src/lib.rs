//! tug's kubelet.
//!
//! Owns the node's relationship with the API server: Node registration and its Lease, the pod workers
//! that drive each pod bound to this node through a CRI runtime, probes, volumes, pod status, static
//! pods and the kubelet API on :10250. See `DESIGN.md` §3 (pod start) and §4 (node and pod facts).
//!
//! Not built yet: the work is tracked by issues #7 (core) and #8 (volumes and kubelet API).
