//! VM tier: qemu guests booting Debian's own kernel under software emulation.

use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};
use tug_tests::vm::{GuestSpec, boot, kernel_release};

#[test]
#[ignore = "vm tier (root, qemu): run as root via ./scripts/test, or scripts/vm-assets then cargo test -p tug-tests --test vm -- --ignored"]
fn debian_kernel_boots_in_a_guest_and_provides_ipvs() {
    require(Tier::Vm);
    let mut spec = GuestSpec::new(
        "echo \"release=$(uname -r)\"\n\
         echo \"ipvs=$(head -n 1 /proc/net/ip_vs)\"\n\
         ip link add tug-vip type dummy && ip addr add 10.96.0.1/32 dev tug-vip && echo dummy=ok\n",
    );
    spec.modules = vec!["ip_vs".into(), "ip_vs_rr".into(), "dummy".into()];
    let run = boot(&spec);

    let expected = kernel_release(&Substrate::from_env());
    assert_eq!(
        run.value("release"),
        Some(expected.as_str()),
        "console:\n{}",
        run.console
    );
    assert!(
        run.value("ipvs")
            .is_some_and(|v| v.starts_with("IP Virtual Server version")),
        "IPVS is available in the guest; console:\n{}",
        run.console
    );
    assert_eq!(
        run.value("dummy"),
        Some("ok"),
        "a dummy VIP device can be made; console:\n{}",
        run.console
    );
    assert_eq!(
        run.value("guest-script-status"),
        Some("0"),
        "console:\n{}",
        run.console
    );
    eprintln!("guest booted and ran in {:?}", run.elapsed);
}
