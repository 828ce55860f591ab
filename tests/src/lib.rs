//! tug's test harness (dev-only, never shipped).
//!
//! Owns the test tiers of `DESIGN.md` §5 and the fixtures they run on: network namespaces, the
//! test-owned containerd and its images, qemu guests. The tier suites live in `tests/tests/<tier>.rs`,
//! one test binary per tier, so one tier runs alone with `cargo test -p tug-tests --test <tier>`.
//!
//! Gating: every test of a root tier is `#[ignore]` with a reason naming how to run it, so a plain
//! `cargo test` skips it visibly. Running ignored tests is the explicit request; from then on a
//! missing prerequisite fails the test through [`tier::require`] instead of skipping it.

pub mod cluster;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod e2e;
pub mod eventually;
pub mod faults;
pub mod http;
pub mod kubelet;
pub mod lan;
pub mod measure;
pub mod netns;
pub mod node;
pub mod report;
pub mod services;
pub mod shim;
pub mod streaming;
pub mod substrate;
pub mod tier;
pub mod vm;
pub mod vm_node;
