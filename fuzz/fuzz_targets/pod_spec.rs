//! A pod, as the API server hands it to the kubelet, through the kubelet's translation to CRI
//! (sandbox and container configs), over the CRI's wire encoding, to the OCI spec the runtime
//! shim builds. A bad pod spec fails that pod or container with a message; it never panics the
//! kubelet or the shim, and what the pod asks for in security is what the container gets.
//!
//! Input: the Pod as JSON.
#![no_main]

use k8s_cri::v1::CreateContainerRequest;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tug_kubelet::pods::translate::{self, CgroupDriver, ContainerInputs, NodeContext, ResolvConf};
use tug_runtime_shim::image::config::ImageConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(pod) = serde_json::from_slice::<Pod>(data) else {
        return;
    };
    let node = NodeContext {
        cluster_dns: vec!["10.96.0.10".into()],
        cluster_domain: "cluster.local".into(),
        host_resolv: ResolvConf::parse(
            "nameserver 192.0.2.53\nsearch example.com\noptions ndots:2\n",
        ),
        pod_logs_dir: "/var/log/pods".into(),
        cgroup_driver: CgroupDriver::Cgroupfs,
        memory_capacity: 8 << 30,
        seccomp_default: true,
        seccomp_root: "/var/lib/kubelet/seccomp".into(),
    };
    let Ok(sandbox) = translate::sandbox_config(&pod, &node, 0) else {
        return;
    };
    // The image runs as root unless the pod says otherwise.
    let image = ImageConfig {
        entrypoint: vec!["/bin/sh".into()],
        cmd: vec!["-c".into(), "sleep 1".into()],
        env: vec!["PATH=/bin".into()],
        working_dir: "/".into(),
        user: String::new(),
        stop_signal: String::new(),
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let pod_security = spec.security_context.clone().unwrap_or_default();
    for container in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let security = container.security_context.clone().unwrap_or_default();
        let non_root = security
            .run_as_non_root
            .or(pod_security.run_as_non_root)
            .unwrap_or(false);
        if non_root && translate::verify_non_root(&pod, container, Some(0), "").is_err() {
            continue;
        }
        let env = container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        let inputs = ContainerInputs {
            image_ref: "sha256:0123".into(),
            env,
            mounts: Vec::new(),
        };
        let Ok(config) = translate::container_config(&pod, container, 0, &node, inputs) else {
            continue;
        };
        // Over the wire, as the kubelet's gRPC client sends it to the shim.
        let request = CreateContainerRequest {
            pod_sandbox_id: "fuzz".into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        };
        let request = CreateContainerRequest::decode(request.encode_to_vec().as_slice())
            .expect("a request the kubelet encodes decodes");
        let Ok((oci, user)) = tug_fuzz::shim_spec(&request, &image) else {
            continue;
        };
        let name = &container.name;
        if non_root {
            assert_ne!(user.uid, 0, "{name}: runAsNonRoot, yet it runs as root");
        }
        if let Some(uid) = security.run_as_user.or(pod_security.run_as_user) {
            assert_eq!(i64::from(user.uid), uid, "{name}: runAsUser not honoured");
        }
        if let Some(gid) = security.run_as_group.or(pod_security.run_as_group) {
            assert_eq!(i64::from(user.gid), gid, "{name}: runAsGroup not honoured");
        }
        if security.allow_privilege_escalation == Some(false) {
            assert_eq!(
                oci["process"]["noNewPrivileges"], true,
                "{name}: allowPrivilegeEscalation false, yet it may escalate"
            );
        }
        if security.read_only_root_filesystem == Some(true) {
            assert_eq!(
                oci["root"]["readonly"], true,
                "{name}: readOnlyRootFilesystem, yet the root is writable"
            );
        }
        if security.privileged != Some(true) {
            assert_eq!(
                oci["linux"]["resources"]["devices"][0]["allow"], false,
                "{name}: unprivileged, yet every device is allowed"
            );
        }
    }
});
