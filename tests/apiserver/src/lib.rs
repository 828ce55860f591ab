//! A dev-only, in-process Kubernetes API server (never shipped).
pub mod admission;
pub mod api;
pub mod auth;
pub mod authz;
pub mod controllers;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod resources;
pub mod selectors;
pub mod server;
pub mod status;
pub mod store;

pub use server::{ServerConfig, TestApiServer};
