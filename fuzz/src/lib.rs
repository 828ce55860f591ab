//! What the fuzz targets share: the runtime shim's pure path from a CreateContainer request to
//! an OCI spec (as `tug shim` runs it, minus containerd), and the properties every spec it
//! builds must have, whatever the request.

use k8s_cri::v1::{CreateContainerRequest, PodSandboxConfig};
use serde_json::Value;
use tug_runtime_shim::image::config::ImageConfig;
use tug_runtime_shim::spec::{self, ProcessUser, SpecError, SpecInput};

/// The image's `/etc/passwd` and `/etc/group` (busybox's, plus one user with a group).
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\nnobody:x:65534:65534:nobody:/home:/bin/false\napp:x:1000:1000::/app:/bin/sh\n";
/// See [`PASSWD`].
pub const GROUP: &str = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\napp:x:1000:\nextra:x:2000:app\n";

/// The OCI spec `tug shim` would give `request`'s container, with the image `image`, and the
/// user it resolved. The sandbox has its own network, IPC and PID namespaces.
pub fn shim_spec(
    request: &CreateContainerRequest,
    image: &ImageConfig,
) -> Result<(Value, ProcessUser), SpecError> {
    let config = request.config.clone().unwrap_or_default();
    let sandbox = request.sandbox_config.clone().unwrap_or_default();
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let security = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let user = spec::resolve_user(&name, security, &image.user, Some(PASSWD), Some(GROUP))?;
    let parent = sandbox
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    let id = "0123456789abcdef";
    let cgroups_path = spec::cgroups_path(&name, &parent, id)?;
    let built = spec::build(&SpecInput {
        id,
        config: &config,
        sandbox: &sandbox,
        netns: Some("/run/tug/netns/fuzz".as_ref()),
        ipc: Some("/run/tug/ipc/fuzz".as_ref()),
        shm: Some("/run/tug/shm/fuzz".as_ref()),
        pid: None,
        resolv_conf: None,
        hostname_file: None,
        image,
        user: user.clone(),
        cgroups_path: &cgroups_path,
    })?;
    assert_spec(&built, request, &user);
    Ok((built, user))
}

fn privileged_sandbox(sandbox: &PodSandboxConfig) -> bool {
    sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged)
}

/// What every spec the shim builds must hold.
fn assert_spec(spec: &Value, request: &CreateContainerRequest, user: &ProcessUser) {
    let config = request.config.clone().unwrap_or_default();
    let security = config.linux.and_then(|l| l.security_context);
    let privileged = security.as_ref().is_some_and(|s| s.privileged);
    serde_json::to_string(spec).expect("the spec serialises");
    assert_eq!(spec["process"]["user"]["uid"], user.uid, "uid");
    assert_eq!(spec["process"]["user"]["gid"], user.gid, "gid");
    assert!(
        !spec["process"]["args"].as_array().expect("args").is_empty(),
        "a spec without a command"
    );
    assert!(
        spec["process"]["cwd"]
            .as_str()
            .is_some_and(|c| c.starts_with('/')),
        "a relative working directory: {}",
        spec["process"]["cwd"]
    );
    for mount in spec["mounts"].as_array().expect("mounts") {
        let destination = mount["destination"].as_str().expect("a destination");
        assert!(
            destination.starts_with('/'),
            "a relative mount destination {destination:?}"
        );
    }
    if privileged {
        assert!(
            privileged_sandbox(
                request
                    .sandbox_config
                    .as_ref()
                    .unwrap_or(&Default::default())
            ),
            "a privileged container in an unprivileged sandbox"
        );
        return;
    }
    // Unprivileged: the device cgroup denies by default, /proc is masked, and the
    // capabilities are the defaults plus what was asked for, never more.
    assert_eq!(
        spec["linux"]["resources"]["devices"][0]["allow"], false,
        "an unprivileged container may use every device"
    );
    assert!(
        spec["linux"]["maskedPaths"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "an unprivileged container without masked paths"
    );
    let asked: Vec<String> = security
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .map(|c| c.add_capabilities.clone())
        .unwrap_or_default();
    let all = asked.iter().any(|a| a.eq_ignore_ascii_case("ALL"));
    if !all {
        for cap in spec["process"]["capabilities"]["bounding"]
            .as_array()
            .expect("bounding capabilities")
        {
            let cap = cap.as_str().expect("a capability name");
            let default = tug_runtime_shim::spec::DEFAULT_CAPABILITIES.contains(&cap);
            let added = asked.iter().any(|a| {
                cap.eq_ignore_ascii_case(a) || cap.eq_ignore_ascii_case(&format!("CAP_{a}"))
            });
            assert!(default || added, "capability {cap} was never asked for");
        }
    }
    let namespaces = spec["linux"]["namespaces"].as_array().expect("namespaces");
    let has = |kind: &str| namespaces.iter().any(|n| n["type"] == kind);
    assert!(
        has("mount"),
        "a container sharing the host's mount namespace"
    );
}
