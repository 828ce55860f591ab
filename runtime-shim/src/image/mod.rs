//! Images: references, the registry client, and client-side pull into containerd.

pub mod config;
pub mod pull;
pub mod reference;
pub mod registry;
