//! The test tiers and their prerequisites.
//!
//! A tier test calls [`require`] first. By then the tier was explicitly requested (its tests are
//! `#[ignore]` otherwise), so every missing prerequisite is a failure with a message that says what
//! is missing and how to provide it — never a silent pass.

use std::path::Path;

use crate::substrate::Substrate;

/// The tiers of `DESIGN.md` §5 that need more than a compiler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Real veth pairs, routes and netfilter inside throwaway network namespaces. Needs root.
    Netns,
    /// The test-owned containerd with runc, the local registry and the test images. Needs root.
    Containerd,
    /// qemu guests booting Debian's kernel (IPVS, several kernels, systemd units). Needs root.
    Vm,
}

impl Tier {
    /// The name used by `scripts/test` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Netns => "netns",
            Tier::Containerd => "containerd",
            Tier::Vm => "vm",
        }
    }
}

/// Checks the prerequisites of `tier` and panics with a clear message naming each missing one.
pub fn require(tier: Tier) {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root (run the tier as root, e.g. via sudo ./scripts/test)".to_owned());
    }
    let substrate = Substrate::from_env();
    match tier {
        Tier::Netns => {
            require_program("ip", "iproute2", &mut missing);
            if !Path::new("/proc/self/ns/net").exists() {
                missing.push("network namespaces (/proc/self/ns/net is absent)".to_owned());
            }
        }
        Tier::Containerd => {
            require_program("ip", "iproute2", &mut missing);
            require_program("ctr", "containerd", &mut missing);
            if !substrate.containerd_sock.exists() {
                missing.push(format!(
                    "the test containerd (no socket at {}; start it with scripts/substrate up)",
                    substrate.containerd_sock.display()
                ));
            }
            let archive = substrate.image_archive("busybox");
            if !archive.exists() {
                missing.push(format!(
                    "the test images ({} is absent; build them with scripts/build-images)",
                    archive.display()
                ));
            }
        }
        Tier::Vm => {
            require_program("qemu-system-x86_64", "qemu-system-x86", &mut missing);
            require_program("cpio", "cpio", &mut missing);
            if !substrate.vm_kernel().exists() {
                missing.push(format!(
                    "Debian's guest kernel ({} is absent; fetch it with scripts/vm-assets)",
                    substrate.vm_kernel().display()
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the {} tier was requested but its prerequisites are missing:\n  - {}",
        tier.name(),
        missing.join("\n  - ")
    );
}

fn require_program(program: &str, package: &str, missing: &mut Vec<String>) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if !found {
        missing.push(format!(
            "{program} (apt package {package}; scripts/install-deps installs it)"
        ));
    }
}
