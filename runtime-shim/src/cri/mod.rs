//! The CRI v1 services.

pub mod images;
