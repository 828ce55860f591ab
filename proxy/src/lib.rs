//! tug's kube-proxy.
//!
//! Owns the translation of Services and EndpointSlices into packet-forwarding rules: a pure model of
//! desired rules and the iptables, nftables and IPVS backends that apply only its difference. See
//! `DESIGN.md` §3 (service flow) and §4 (rule layout).
//!
//! Built so far: the pure model ([`model`]), the iptables and nftables backends
//! ([`iptables`], [`nftables`]), the watch-and-sync loop with health and metrics ([`run`]) and
//! standalone mode without an API server ([`standalone`]). IPVS is not built yet.

pub mod addresses;
pub mod backend;
pub mod config;
pub mod conntrack;
pub mod healthcheck;
pub mod iptables;
pub mod ipvs;
pub mod model;
pub mod nfnetlink;
pub mod nftables;
pub mod run;
pub mod standalone;
