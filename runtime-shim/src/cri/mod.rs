//! The CRI v1 services.

pub mod containers;
pub mod exec;
pub mod images;
mod records;
pub mod runtime;
pub mod stats;
pub mod streaming;
