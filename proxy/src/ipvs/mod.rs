//! The IPVS backend (in progress): virtual services over generic netlink ([`genl`]).

pub mod genl;
