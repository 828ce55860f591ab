//! tug's pod network.
//!
//! Owns the `tug-cni` plugin (CNI spec 1.1: ADD, DEL, CHECK, STATUS, GC, VERSION), its crash-safe
//! IPAM, and `tug netd`, the node agent that writes the CNI config and routes to other nodes' pod
//! CIDRs. See `DESIGN.md` §3 (pod network) and §4 (CNI facts).

pub mod dataplane;
pub mod ipam;
pub mod netd;
pub mod netlink;
pub mod netns;
pub mod plugin;
pub mod spec;
