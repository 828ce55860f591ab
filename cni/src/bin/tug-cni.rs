//! The `tug-cni` plugin binary a CRI runtime execs for every pod attachment.
//!
//! A plain C `main`: the plugin needs none of what Rust's runtime start-up does for a long-lived
//! program (a stack-overflow guard found by reading `/proc/self/maps`, an alternate signal
//! stack), and a runtime waits on every exec.
#![no_main]

/// The process entry point, called by the C runtime.
#[unsafe(no_mangle)]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    std::ffi::c_int::from(tug_cni::plugin::run())
}
