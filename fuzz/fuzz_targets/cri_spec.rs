//! The runtime shim's CreateContainer: a CRI request, as the kubelet (or crictl, or anything on
//! the CRI socket) sends it over gRPC, to the OCI spec runc runs. A bad request must fail that
//! container with an error, never panic the shim, and never yield a spec weaker than asked for
//! (see `tug_fuzz::shim_spec`).
//!
//! Input: the image's `User` (one line), then the request's protobuf encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tug_runtime_shim::image::config::ImageConfig;

fuzz_target!(|data: &[u8]| {
    let (user, wire) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => return,
    };
    let Ok(request) = k8s_cri::v1::CreateContainerRequest::decode(wire) else {
        return;
    };
    let image = ImageConfig {
        entrypoint: vec!["/bin/sh".into()],
        cmd: vec!["-c".into(), "sleep 1".into()],
        env: vec!["PATH=/bin".into(), "IMAGE=1".into()],
        working_dir: "/".into(),
        user: String::from_utf8_lossy(user).into_owned(),
        stop_signal: "SIGTERM".into(),
    };
    let _ = tug_fuzz::shim_spec(&request, &image);
});
