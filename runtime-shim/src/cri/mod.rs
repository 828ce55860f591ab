//! The CRI v1 services.

pub mod images;
pub mod runtime;
