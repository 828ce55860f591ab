//! tug's kube-proxy.
//!
//! Owns the translation of Services and EndpointSlices into packet-forwarding rules: a pure model of
//! desired rules and the iptables, nftables and IPVS backends that apply only its difference. See
//! `DESIGN.md` §3 (service flow) and §4 (rule layout).
//!
//! Built so far: the pure model ([`model`]). The backends are tracked by issue #6.

pub mod iptables;
pub mod model;
