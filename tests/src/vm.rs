//! qemu guests booting Debian's own kernel, for what this machine's kernel cannot show (IPVS) and for
//! nodes with kernels of their own.
//!
//! A guest boots under software emulation (TCG; there is no KVM here) with a small initramfs built
//! per boot: busybox-static, the kernel modules the test names (with their dependencies, inserted in
//! order), and the test's shell script. The script's console output comes back as a string; the
//! guest powers off when the script ends.
//!
//! A [`GuestSpec::systemd`] guest boots further: the initramfs mounts the Debian root disk that
//! `scripts/vm-assets` builds (opened as a snapshot, so every boot starts from the same disk),
//! copies the test's files onto it, and hands over to systemd as PID 1. The test's script then
//! runs as a oneshot service once the network is online, as an operator's shell would.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::substrate::Substrate;

/// What to run in a guest.
#[derive(Debug)]
pub struct GuestSpec {
    /// Module names (`ip_vs`, `dummy`, ...) to insert, with their dependencies, before the script.
    pub modules: Vec<String>,
    /// A busybox `sh` script run as the guest's workload.
    pub script: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// How long the whole boot may take before the guest is killed.
    pub timeout: Duration,
    /// Files to put in the guest: (host path, guest path). An executable comes with the shared
    /// libraries it links (at their host paths) and without its debug symbols.
    pub files: Vec<(PathBuf, String)>,
    /// Text files to write in the guest: (guest path, content).
    pub texts: Vec<(String, String)>,
    /// A network link to the host (qemu user networking): the guest's `eth0` is
    /// [`GUEST_ADDRESS`], and [`HOST_ADDRESS`] reaches the host's loopback, so a server the
    /// test runs on `127.0.0.1` is at `10.0.2.2` from inside the guest.
    pub host_link: bool,
    /// Boot the Debian root disk with systemd as PID 1, and run the script (POSIX `sh`) as a
    /// service once the network is online.
    pub systemd: bool,
    /// Virtual CPUs.
    pub cpus: u32,
    /// A NIC on a test segment (a tap on its bridge), so the guest is a machine on the same L2
    /// network as namespaced nodes and the host's attachment there. The guest configures it
    /// itself (a systemd guest: with a `.network` file matching its MAC).
    pub lan: Option<crate::lan::LanPort>,
}

/// The kernel modules `tug proxy` needs in a guest, in every mode (IPVS, its nftables half, and
/// nftables mode's NAT).
pub const PROXY_MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "dummy",
    "veth",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_fib_ipv4",
    "nft_reject_ipv4",
    "nft_ct",
    "nf_conntrack",
    "nf_nat",
];

/// The host's loopback as the guest sees it over [`GuestSpec::host_link`].
pub const HOST_ADDRESS: &str = "10.0.2.2";
/// The guest's own address on [`GuestSpec::host_link`].
pub const GUEST_ADDRESS: &str = "10.0.2.15";

impl GuestSpec {
    /// A guest that runs `script` with 256 MiB and a generous timeout for software emulation.
    pub fn new(script: &str) -> GuestSpec {
        GuestSpec {
            modules: Vec::new(),
            script: script.to_owned(),
            memory_mib: 256,
            timeout: Duration::from_secs(180),
            files: Vec::new(),
            texts: Vec::new(),
            host_link: false,
            systemd: false,
            cpus: 1,
            lan: None,
        }
    }

    /// A guest that boots Debian with systemd (1.5 GiB, two CPUs, 15 minutes) and runs `script`
    /// as a service on it.
    pub fn systemd(script: &str) -> GuestSpec {
        GuestSpec {
            memory_mib: 1536,
            cpus: 2,
            timeout: Duration::from_secs(900),
            systemd: true,
            host_link: true,
            ..GuestSpec::new(script)
        }
    }
}

/// What a finished guest printed.
#[derive(Debug)]
pub struct GuestRun {
    /// Everything on the serial console: kernel messages and the script's output.
    pub console: String,
    /// How long the guest took from qemu start to power-off.
    pub elapsed: Duration,
}

impl GuestRun {
    /// The value of the first console line `key=value` the script printed.
    pub fn value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.console
            .lines()
            .find_map(|line| line.trim_end_matches('\r').strip_prefix(&prefix))
    }
}

/// The Debian kernel release unpacked by `scripts/vm-assets`.
pub fn kernel_release(substrate: &Substrate) -> String {
    let path = substrate.vm_dir().join("kernel-release");
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e} (run scripts/vm-assets)", path.display()))
        .trim()
        .to_owned()
}

/// Boots a guest, runs `spec.script` in it, and returns its console once it powers off.
pub fn boot(spec: &GuestSpec) -> GuestRun {
    boot_watching(spec, |_| {})
}

/// [`boot`], handing each console line to `on_line` as the guest prints it, so a test can act on
/// the host side (change the API, say) when the script announces it is ready for the next step.
pub fn boot_watching(spec: &GuestSpec, mut on_line: impl FnMut(&str)) -> GuestRun {
    let substrate = Substrate::from_env();
    let release = kernel_release(&substrate);
    let modules_root = substrate.vm_dir().join("root/lib/modules").join(&release);
    let work = TempDir::new("tug-vm");
    let initramfs = build_initramfs(&work.0, &modules_root, spec);

    let started = Instant::now();
    // On a segment, qemu runs in the segment's namespace, where its tap is.
    let mut qemu = crate::netns::command_in(
        spec.lan.as_ref().map(|port| port.netns.as_path()),
        Path::new("qemu-system-x86_64"),
    );
    if let Some(port) = &spec.lan {
        qemu.args([
            "-netdev",
            &format!("tap,id=lan,ifname={},script=no,downscript=no", port.tap),
            "-device",
            &format!("virtio-net-pci,netdev=lan,mac={}", port.mac),
        ]);
    }
    qemu.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max"])
        .args(["-smp", &spec.cpus.to_string()])
        .args(["-m", &spec.memory_mib.to_string()])
        .arg("-kernel")
        .arg(substrate.vm_kernel())
        .arg("-initrd")
        .arg(&initramfs);
    if spec.systemd {
        let disk = substrate.vm_dir().join("systemd-root.img");
        assert!(
            disk.exists(),
            "{} is missing (run scripts/vm-assets)",
            disk.display()
        );
        qemu.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            disk.display()
        ));
        qemu.args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 systemd.show_status=false",
        ]);
    } else {
        qemu.args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"]);
    }
    let mut child = qemu
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .args([
            "-nic",
            if spec.host_link {
                "user,model=e1000e"
            } else {
                "none"
            },
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");

    // Read the console on a thread, line by line, so a chatty guest never blocks on a full pipe.
    let stdout = child.stdout.take().expect("qemu stdout is piped");
    let (lines, console_lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut stdout = std::io::BufReader::new(stdout);
        let mut line = Vec::new();
        while std::io::BufRead::read_until(&mut stdout, b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            if lines.send(text).is_err() {
                break;
            }
            line.clear();
        }
    });
    let mut console = String::new();
    let mut take = |line: String, console: &mut String| {
        on_line(&line);
        console.push_str(&line);
        console.push('\n');
    };
    loop {
        match console_lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => take(line, &mut console),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait for qemu");
                let _ = reader.join();
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                assert!(
                    status.success(),
                    "qemu exited with {status}; console:\n{console}\nstderr: {stderr}"
                );
                return GuestRun {
                    console,
                    elapsed: started.elapsed(),
                };
            }
        }
        if started.elapsed() > spec.timeout {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            while let Ok(line) = console_lines.try_recv() {
                take(line, &mut console);
            }
            panic!(
                "guest did not power off within {:?}; console:\n{console}",
                spec.timeout
            );
        }
    }
}

const MARKER_DONE: &str = "TUG-GUEST-DONE";

/// The systemd guest's test service: the script's output goes to the serial console.
const TEST_UNIT: &str = "[Unit]\nDescription=tug VM test script\nAfter=network-online.target containerd.service\nWants=network-online.target\n\n[Service]\nType=oneshot\nExecStart=/bin/sh /usr/local/sbin/tug-vm-test\nStandardOutput=tty\nStandardError=tty\nTTYPath=/dev/ttyS0\nTimeoutStartSec=infinity\n";

fn build_initramfs(work: &Path, modules_root: &Path, spec: &GuestSpec) -> PathBuf {
    let root = work.join("root");
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "lib/modules"] {
        fs::create_dir_all(root.join(dir)).expect("create initramfs dirs");
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy /bin/busybox (busybox-static)");

    // A systemd guest's files go onto its root disk: they wait in /payload until it is mounted.
    let files_root = if spec.systemd {
        root.join("payload")
    } else {
        root.clone()
    };
    for (host, guest) in &spec.files {
        // The Debian root disk has the host's libraries already (the same release).
        add_file(&files_root, host, guest, !spec.systemd);
    }
    let mut texts = spec.texts.clone();
    if spec.systemd {
        texts.push((
            "/usr/local/sbin/tug-vm-test".into(),
            wrap_script(&spec.script, "systemctl --force --force poweroff"),
        ));
        texts.push((
            "/etc/systemd/system/tug-vm-test.service".into(),
            TEST_UNIT.into(),
        ));
    }
    for (guest, text) in &texts {
        let path = files_root.join(guest.trim_start_matches('/'));
        fs::create_dir_all(path.parent().expect("a parent")).expect("create text file dir");
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    if spec.systemd {
        let wants = files_root.join("etc/systemd/system/multi-user.target.wants");
        fs::create_dir_all(&wants).expect("create the target's wants");
        std::os::unix::fs::symlink(
            "/etc/systemd/system/tug-vm-test.service",
            wants.join("tug-vm-test.service"),
        )
        .expect("enable the test service");
    }

    let mut names = spec.modules.clone();
    if spec.host_link {
        names.push("e1000e".into());
    }
    if spec.systemd {
        names.extend(["virtio_pci", "virtio_blk", "ext4"].map(String::from));
    }
    let modules = module_load_order(modules_root, &names);
    let mut inserts = String::new();
    for (i, module) in modules.iter().enumerate() {
        let file = format!(
            "{i:03}-{}",
            module.file_name().expect("module file").to_string_lossy()
        );
        fs::copy(
            modules_root.join(module),
            root.join("lib/modules").join(&file),
        )
        .unwrap_or_else(|e| panic!("copy module {}: {e}", module.display()));
        inserts.push_str(&format!(
            "insmod /lib/modules/{file} || echo \"insmod {file} failed\"\n"
        ));
    }

    // Both kinds of guest start the same way: busybox, the kernel's file systems, the modules.
    let start = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         {inserts}"
    );
    let init = if spec.systemd {
        format!(
            "{start}\
             mkdir -p /newroot\n\
             mount -t ext4 /dev/vda /newroot || {{ echo \"cannot mount the root disk\"; poweroff -f; }}\n\
             cp -a /payload/. /newroot/\n\
             umount /proc /sys /dev\n\
             exec switch_root /newroot /lib/systemd/systemd\n"
        )
    } else {
        format!(
            "{start}\
             mount -t tmpfs tmpfs /run\n\
             {link}\
             {script}",
            link = if spec.host_link {
                format!(
                    "ip link set eth0 up && ip addr add {GUEST_ADDRESS}/24 dev eth0 || echo \"host link failed\"\n"
                )
            } else {
                String::new()
            },
            script = wrap_script(&spec.script, "poweroff -f"),
        )
    };
    let init_path = root.join("init");
    fs::write(&init_path, init).expect("write /init");
    fs::set_permissions(
        &init_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod /init");

    let image = work.join("initramfs.cpio");
    let files = Command::new("find")
        .arg(".")
        .current_dir(&root)
        .output()
        .expect("list initramfs files");
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&image).expect("create initramfs"))
        .spawn()
        .expect("run cpio");
    cpio.stdin
        .take()
        .expect("cpio stdin")
        .write_all(&files.stdout)
        .expect("feed cpio");
    assert!(
        cpio.wait().expect("cpio").success(),
        "cpio failed to build the initramfs"
    );
    image
}

/// The test's script in a subshell that stops at the first failure, between the console
/// markers, with its exit status, then `poweroff`.
fn wrap_script(script: &str, poweroff: &str) -> String {
    format!(
        "echo TUG-GUEST-START\n( set -e\n{script}\n)\necho \"guest-script-status=$?\"\necho {MARKER_DONE}\n{poweroff}\n"
    )
}

/// Copies `host` to `guest` under `root`; an executable is stripped of debug symbols and, with
/// `libraries`, brings the shared libraries `ldd` names.
fn add_file(root: &Path, host: &Path, guest: &str, libraries: bool) {
    let target = root.join(guest.trim_start_matches('/'));
    fs::create_dir_all(target.parent().expect("a parent")).expect("create guest dir");
    fs::copy(host, &target).unwrap_or_else(|e| panic!("copy {}: {e}", host.display()));
    let executable = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(host).expect("stat guest file").permissions(),
    ) & 0o111
        != 0;
    if !executable {
        return;
    }
    let _ = Command::new("strip")
        .arg("--strip-debug")
        .arg(&target)
        .status();
    if !libraries {
        return;
    }
    let Ok(ldd) = Command::new("ldd").arg(host).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let library = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|path| path.starts_with('/'));
        if let Some(library) = library {
            let into = root.join(library.trim_start_matches('/'));
            fs::create_dir_all(into.parent().expect("a parent")).expect("create lib dir");
            // Through symlinks: the guest gets the file itself.
            fs::copy(library, &into).unwrap_or_else(|e| panic!("copy {library}: {e}"));
        }
    }
}

/// Resolves module names to their files, dependencies first: hard dependencies from `modules.dep`,
/// then soft `pre:` dependencies from `modules.softdep` (e.g. `libcrc32c` needs a `crc32c`
/// implementation), with names resolved through `modules.alias`.
fn module_load_order(modules_root: &Path, names: &[String]) -> Vec<PathBuf> {
    if names.is_empty() {
        return Vec::new();
    }
    let read = |file: &str| {
        let path = modules_root.join(file);
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e} (run scripts/vm-assets)", path.display()))
    };
    let index = ModuleIndex {
        deps: parse_modules_dep(&read("modules.dep")),
        softdeps: parse_softdeps(&read("modules.softdep")),
        aliases: parse_aliases(&read("modules.alias")),
    };
    let mut order = Vec::new();
    for name in names {
        let path = index
            .resolve(name)
            .unwrap_or_else(|| panic!("kernel module {name} is not in {}", modules_root.display()));
        index.visit(&path, &mut order);
    }
    order
}

struct ModuleIndex {
    /// Module path → hard dependency paths.
    deps: HashMap<String, Vec<String>>,
    /// Module name → names to load before it.
    softdeps: HashMap<String, Vec<String>>,
    /// Alias → module names providing it.
    aliases: HashMap<String, Vec<String>>,
}

impl ModuleIndex {
    /// The path of the module called (or aliased as) `name`; a `_generic` provider wins among
    /// several, as it runs on any CPU.
    fn resolve(&self, name: &str) -> Option<String> {
        let by_name = |name: &str| {
            let name = name.replace('-', "_");
            self.deps
                .keys()
                .find(|path| module_name(path) == name)
                .cloned()
        };
        by_name(name).or_else(|| {
            let mut providers = self.aliases.get(name)?.clone();
            providers.sort_by_key(|p| !p.ends_with("_generic"));
            providers.iter().find_map(|p| by_name(p))
        })
    }

    fn visit(&self, path: &str, order: &mut Vec<PathBuf>) {
        if order.iter().any(|p| p == Path::new(path)) {
            return;
        }
        for soft in self.softdeps.get(&module_name(path)).into_iter().flatten() {
            if let Some(soft_path) = self.resolve(soft) {
                self.visit(&soft_path, order);
            }
        }
        for dep in self.deps.get(path).into_iter().flatten() {
            self.visit(dep, order);
        }
        order.push(PathBuf::from(path));
    }
}

/// Parses `modules.softdep` lines (`softdep <module> pre: a b post: c`) into module → `pre:` names.
fn parse_softdeps(text: &str) -> HashMap<String, Vec<String>> {
    let mut softdeps = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("softdep"), Some(module)) = (words.next(), words.next()) else {
            continue;
        };
        let pre = words
            .skip_while(|w| *w != "pre:")
            .skip(1)
            .take_while(|w| *w != "post:")
            .map(str::to_owned)
            .collect();
        softdeps.insert(module.replace('-', "_"), pre);
    }
    softdeps
}

/// Parses `modules.alias` lines (`alias <alias> <module>`) into alias → modules.
fn parse_aliases(text: &str) -> HashMap<String, Vec<String>> {
    let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("alias"), Some(alias), Some(module)) =
            (words.next(), words.next(), words.next())
        {
            aliases
                .entry(alias.to_owned())
                .or_default()
                .push(module.to_owned());
        }
    }
    aliases
}

/// Parses `modules.dep` (`path: dep dep ...` per line) into path → dependency paths.
fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| {
            (
                module.trim().to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect()
}

/// `kernel/net/netfilter/ipvs/ip_vs_rr.ko` → `ip_vs_rr` (dashes and underscores are one to the kernel).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A temporary directory removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_dep_lines_parse_into_paths_and_dependencies() {
        let deps = parse_modules_dep(
            "kernel/a/ip_vs.ko: kernel/b/nf_conntrack.ko kernel/lib/libcrc32c.ko\nkernel/lib/libcrc32c.ko:\n",
        );
        assert_eq!(
            deps["kernel/a/ip_vs.ko"],
            ["kernel/b/nf_conntrack.ko", "kernel/lib/libcrc32c.ko"]
        );
        assert!(deps["kernel/lib/libcrc32c.ko"].is_empty());
    }

    #[test]
    fn module_names_fold_dashes_and_drop_the_suffix() {
        assert_eq!(module_name("kernel/drivers/net/ip-vs.ko"), "ip_vs");
        assert_eq!(module_name("kernel/x/nf_nat.ko.xz"), "nf_nat");
    }

    #[test]
    fn dependencies_load_before_the_modules_that_need_them() {
        let dir = TempDir::new("tug-vm-dep-test");
        let dep = "k/ip_vs.ko: k/nf_conntrack.ko k/libcrc32c.ko\n\
                   k/nf_conntrack.ko: k/libcrc32c.ko\n\
                   k/libcrc32c.ko:\nk/dummy.ko:\nk/crc32c-intel.ko:\nk/crc32c_generic.ko:\n";
        fs::write(dir.0.join("modules.dep"), dep).unwrap();
        fs::write(
            dir.0.join("modules.softdep"),
            "softdep libcrc32c pre: crc32c\n",
        )
        .unwrap();
        let aliases = "alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n";
        fs::write(dir.0.join("modules.alias"), aliases).unwrap();

        let order = module_load_order(&dir.0, &["ip_vs".into(), "nf_conntrack".into()]);
        let expected = [
            "k/crc32c_generic.ko",
            "k/libcrc32c.ko",
            "k/nf_conntrack.ko",
            "k/ip_vs.ko",
        ];
        assert_eq!(order, expected.map(PathBuf::from));
    }
}
