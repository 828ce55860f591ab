//! IP address management from the node's pod CIDR: crash-safe and safe across concurrent plugin
//! processes.
//!
//! State lives in `<data_dir>/<network>/`, one file per allocated IP named after it and holding
//! `<container id>\n<ifname>` (the layout of the reference `host-local` plugin, so operators'
//! habits carry over). An exclusive `flock` on `lock` serialises every change, and each address
//! is claimed by creating its file with `O_EXCL`, so the same IP is never handed out twice.
//!
//! Beside them, `attachment-<hash>.<0|1>` is a symlink from an attachment (container ID and
//! interface, per address family) to its IP, so ADD and DEL find an attachment's address without
//! reading every allocation. The symlink is written *before* the address is claimed, so a plugin
//! killed at any point leaves either nothing, a symlink to an address that is not ours (ignored
//! and replaced), or a claimed, still empty file the symlink points at (adopted by the retried
//! ADD, removed by DEL, and, naming no valid attachment, reclaimed by GC). Files are not fsynced:
//! they must survive a process, not the machine (after a power loss no pod survives either, and
//! runtimes re-add every sandbox).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::spec::{Attachment, CniError, code};

/// Per-range record of the last address handed out (`last_reserved_ip.0` for IPv4,
/// `.1` for IPv6), so allocation continues after it instead of reusing a just-freed address.
fn last_reserved_file(range: &ipnet::IpNet) -> &'static str {
    match range {
        ipnet::IpNet::V4(_) => "last_reserved_ip.0",
        ipnet::IpNet::V6(_) => "last_reserved_ip.1",
    }
}
const LOCK: &str = "lock";
const INDEX_PREFIX: &str = "attachment-";

/// Records `ip` as the last address handed out. Only a hint of where to continue, written in
/// place at a fixed width (padded with spaces, which readers trim): truncating and rewriting a
/// file makes ext4 flush it on close, which would cost more than the whole allocation.
fn record_last(path: &Path, ip: IpAddr) -> Result<(), CniError> {
    // The longest IPv6 text is 39 characters.
    let text = format!("{ip:<39}\n");
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .and_then(|file| file.write_all_at(text.as_bytes(), 0))
        .map_err(|e| io_error("record last reserved IP", path, e))
}

/// Who an address file says holds it.
#[derive(Debug, PartialEq, Eq)]
enum Holder {
    /// The attachment asked about.
    Ours,
    /// Nobody yet: claimed by a plugin that was killed before writing the holder.
    Unwritten,
    /// Another attachment, or the file is gone: the index entry is stale.
    Stale,
}

/// The container ID and interface an address file names.
fn holder_of(text: &str) -> (&str, &str) {
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    )
}

/// One network's allocations.
#[derive(Debug)]
pub struct Ipam {
    dir: PathBuf,
    range: ipnet::IpNet,
}

/// An allocation: which attachment holds which IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The address.
    pub ip: IpAddr,
    /// The container it belongs to.
    pub container_id: String,
    /// Its interface in that container.
    pub ifname: String,
}

fn io_error(what: impl std::fmt::Display, path: &Path, e: std::io::Error) -> CniError {
    CniError::new(
        code::IO,
        format!("IPAM {what} failed"),
        format!("{what} {}: {e}", path.display()),
    )
}

impl Ipam {
    /// Opens (creating if needed, mode 0700) the state of network `network` under `data_dir`.
    pub fn open(
        data_dir: &Path,
        network: &str,
        range: impl Into<ipnet::IpNet>,
    ) -> Result<Ipam, CniError> {
        let range = range.into();
        if network.contains('/') || network.starts_with('.') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network configuration",
                format!("network name {network:?} cannot name a directory"),
            ));
        }
        let dir = data_dir.join(network);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io_error("create state directory", &dir, e))?;
        Ok(Ipam { dir, range })
    }

    fn lock(&self) -> Result<Flock<File>, CniError> {
        let path = self.dir.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error("open lock", &path, e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error("lock", &path, errno.into()))
    }

    /// Every allocation on disk.
    pub fn allocations(&self) -> Result<Vec<Allocation>, CniError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_error("list", &self.dir, e))?;
        let mut allocations = Vec::new();
        for entry in entries.flatten() {
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            if !self.range.contains(&ip) {
                continue; // the other family's range shares the directory
            }
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let (container_id, ifname) = holder_of(&text);
            allocations.push(Allocation {
                ip,
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
            });
        }
        allocations.sort_by_key(|a| a.ip);
        Ok(allocations)
    }

    /// The usable addresses of the range as offsets from its network address: the network
    /// address itself is never used, nor the IPv4 broadcast address.
    fn usable(&self) -> (u128, u128) {
        let (prefix, bits) = (
            u32::from(self.range.prefix_len()),
            u32::from(self.range.max_prefix_len()),
        );
        let size = 1u128.checked_shl(bits - prefix).unwrap_or(u128::MAX);
        let last = match self.range {
            ipnet::IpNet::V4(_) if prefix < 31 => size - 2,
            _ => size - 1,
        };
        (1, last.max(1))
    }

    fn at(&self, offset: u128) -> IpAddr {
        match self.range {
            ipnet::IpNet::V4(net) => {
                IpAddr::V4((u32::from(net.network()).wrapping_add(offset as u32)).into())
            }
            ipnet::IpNet::V6(net) => {
                IpAddr::V6((u128::from(net.network()).wrapping_add(offset)).into())
            }
        }
    }

    fn offset(&self, ip: IpAddr) -> Option<u128> {
        match (self.range, ip) {
            (ipnet::IpNet::V4(net), IpAddr::V4(ip)) if net.contains(&ip) => {
                Some(u128::from(u32::from(ip) - u32::from(net.network())))
            }
            (ipnet::IpNet::V6(net), IpAddr::V6(ip)) if net.contains(&ip) => {
                Some(u128::from(ip) - u128::from(net.network()))
            }
            _ => None,
        }
    }

    /// The index entry of `container_id`/`ifname` in this range's family.
    fn index_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        let digest = Sha256::digest(format!("{container_id}/{ifname}"));
        let family = match self.range {
            ipnet::IpNet::V4(_) => 0,
            ipnet::IpNet::V6(_) => 1,
        };
        self.dir.join(format!(
            "{INDEX_PREFIX}{}.{family}",
            &hex::encode(digest)[..32]
        ))
    }

    /// The address the index entry at `index` points at, and who its file says holds it.
    fn indexed(&self, index: &Path, container_id: &str, ifname: &str) -> Option<(IpAddr, Holder)> {
        let target = fs::read_link(index).ok()?;
        let ip: IpAddr = target.to_str()?.parse().ok()?;
        if !self.range.contains(&ip) {
            return None;
        }
        let holder = match fs::read_to_string(self.dir.join(ip.to_string())) {
            Ok(text) if text.is_empty() => Holder::Unwritten,
            Ok(text) if holder_of(&text) == (container_id, ifname) => Holder::Ours,
            _ => Holder::Stale,
        };
        Some((ip, holder))
    }

    /// Points the index entry at `index` to `ip`, replacing what it pointed at.
    fn point(&self, index: &Path, ip: IpAddr) -> Result<(), CniError> {
        match std::os::unix::fs::symlink(ip.to_string(), index) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                self.unindex(index)?;
                std::os::unix::fs::symlink(ip.to_string(), index)
            }
            other => other,
        }
        .map_err(|e| io_error("write index entry", index, e))
    }

    fn unindex(&self, index: &Path) -> Result<(), CniError> {
        match fs::remove_file(index) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove index entry", index, e)),
        }
    }

    /// How many addresses of this range are held (names only; no file is read).
    fn held(&self) -> Result<u128, CniError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_error("list", &self.dir, e))?;
        Ok(entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.parse::<IpAddr>().ok())
                    .is_some_and(|ip| self.range.contains(&ip))
            })
            .count() as u128)
    }

    /// The IP of `container_id`/`ifname`: its existing allocation, or the next free address
    /// after the last one handed out.
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<IpAddr, CniError> {
        let _lock = self.lock()?;
        let index = self.index_path(container_id, ifname);
        let content = format!("{container_id}\n{ifname}");
        match self.indexed(&index, container_id, ifname) {
            Some((ip, Holder::Ours)) => return Ok(ip),
            Some((ip, Holder::Unwritten)) => {
                // Our own claim, cut short by a kill: finish it.
                let path = self.dir.join(ip.to_string());
                fs::write(&path, &content).map_err(|e| io_error("write allocation", &path, e))?;
                return Ok(ip);
            }
            Some((_, Holder::Stale)) | None => {}
        }
        let (first, last) = self.usable();
        let count = last - first + 1;
        let last_file = self.dir.join(last_reserved_file(&self.range));
        let previous = fs::read_to_string(&last_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .and_then(|ip| self.offset(ip));
        let start = previous.map_or(first, |p| if p >= last { first } else { p + 1 });
        // Among held+1 consecutive candidates at least one is free, if any is; counted only
        // once the first candidate turns out to be taken.
        let mut attempts = None;
        let mut step = 0;
        while step < attempts.unwrap_or(1) {
            let ip = self.at(first + (start - first + step) % count);
            let path = self.dir.join(ip.to_string());
            // The index entry first: whatever happens next, it never lets an address of ours
            // go unnoticed.
            self.point(&index, ip)?;
            // O_EXCL claims the address.
            let claimed = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match claimed {
                Ok(mut file) => {
                    file.write_all(content.as_bytes())
                        .map_err(|e| io_error("write allocation", &path, e))?;
                    record_last(&last_file, ip)?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if attempts.is_none() {
                        attempts = Some(count.min(self.held()? + 1));
                    }
                    step += 1;
                }
                Err(e) => {
                    let _ = self.unindex(&index);
                    return Err(io_error("claim address", &path, e));
                }
            }
        }
        self.unindex(&index)?;
        Err(CniError::new(
            code::TRY_AGAIN,
            "no free pod IP",
            format!("all {count} addresses of {} are allocated", self.range),
        ))
    }

    /// Releases the IP of `container_id`/`ifname`; returns it, or `None` when it held none.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Option<IpAddr>, CniError> {
        let _lock = self.lock()?;
        let index = self.index_path(container_id, ifname);
        if let Some((ip, Holder::Ours | Holder::Unwritten)) =
            self.indexed(&index, container_id, ifname)
        {
            self.remove(ip)?;
            self.unindex(&index)?;
            return Ok(Some(ip));
        }
        self.unindex(&index)?;
        // No entry of ours in the index (an allocation written before the index existed, or
        // nothing at all): look through every allocation.
        let mut released = None;
        for allocation in self.allocations()? {
            if allocation.container_id == container_id && allocation.ifname == ifname {
                self.remove(allocation.ip)?;
                released = Some(allocation.ip);
            }
        }
        Ok(released)
    }

    /// Releases every allocation not in `valid`; returns what it released.
    pub fn gc(&self, valid: &[Attachment]) -> Result<Vec<Allocation>, CniError> {
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for allocation in self.allocations()? {
            let in_use = valid.iter().any(|v| {
                v.container_id == allocation.container_id && v.ifname == allocation.ifname
            });
            if !in_use {
                self.remove(allocation.ip)?;
                self.unindex(&self.index_path(&allocation.container_id, &allocation.ifname))?;
                released.push(allocation);
            }
        }
        // Index entries whose address is gone (a kill between indexing and claiming).
        let entries = fs::read_dir(&self.dir).map_err(|e| io_error("list", &self.dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(INDEX_PREFIX) && !fs::exists(self.dir.join(name)).unwrap_or(true) {
                self.unindex(&entry.path())?;
            }
        }
        Ok(released)
    }

    /// How many addresses remain free.
    pub fn free(&self) -> Result<u128, CniError> {
        let (first, last) = self.usable();
        Ok((last - first + 1).saturating_sub(self.allocations()?.len() as u128))
    }

    fn remove(&self, ip: IpAddr) -> Result<(), CniError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("release", &path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(dir: &Path, cidr: &str) -> Ipam {
        Ipam::open(dir, "tug", cidr.parse::<ipnet::IpNet>().unwrap()).unwrap()
    }

    #[test]
    fn allocations_are_unique_persistent_and_idempotent_per_attachment() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.244.1.0/29");
        let a = ipam.allocate("c1", "eth0").unwrap();
        let b = ipam.allocate("c2", "eth0").unwrap();
        assert_ne!(a, b);
        assert_eq!(
            ipam.allocate("c1", "eth0").unwrap(),
            a,
            "the same attachment keeps its IP"
        );
        assert_eq!(
            a,
            "10.244.1.1".parse::<IpAddr>().unwrap(),
            "the network address is never used"
        );
        let reopened = Ipam::open(
            dir.path(),
            "tug",
            "10.244.1.0/29".parse::<ipnet::IpNet>().unwrap(),
        )
        .unwrap();
        assert_eq!(
            reopened.allocations().unwrap().len(),
            2,
            "allocations survive the process"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tug").join(a.to_string())).unwrap(),
            "c1\neth0"
        );
    }

    #[test]
    fn the_pool_is_exhausted_cleanly_and_released_addresses_come_back_later() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.244.1.0/29"); // 6 usable hosts
        let ips: Vec<_> = (0..6)
            .map(|i| ipam.allocate(&format!("c{i}"), "eth0").unwrap())
            .collect();
        assert!(
            !ips.contains(&"10.244.1.7".parse().unwrap()),
            "broadcast is never used"
        );
        let full = ipam.allocate("c6", "eth0").unwrap_err();
        assert_eq!(full.code, code::TRY_AGAIN);
        assert_eq!(ipam.release("c2", "eth0").unwrap(), Some(ips[2]));
        assert_eq!(
            ipam.release("c2", "eth0").unwrap(),
            None,
            "release is idempotent"
        );
        assert_eq!(ipam.allocate("c7", "eth0").unwrap(), ips[2]);
    }

    #[test]
    fn released_addresses_are_not_reused_immediately() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.244.1.0/24");
        let first = ipam.allocate("c1", "eth0").unwrap();
        ipam.release("c1", "eth0").unwrap();
        assert_ne!(
            ipam.allocate("c2", "eth0").unwrap(),
            first,
            "allocation continues after the last reserved IP"
        );
    }

    #[test]
    fn gc_keeps_valid_attachments_only() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.244.1.0/24");
        for c in ["keep", "leak1", "leak2"] {
            ipam.allocate(c, "eth0").unwrap();
        }
        let released = ipam
            .gc(&[Attachment {
                container_id: "keep".into(),
                ifname: "eth0".into(),
            }])
            .unwrap();
        assert_eq!(released.len(), 2);
        let left: Vec<_> = ipam
            .allocations()
            .unwrap()
            .into_iter()
            .map(|a| a.container_id)
            .collect();
        assert_eq!(left, ["keep"]);
    }

    #[test]
    fn ipv6_ranges_allocate_without_enumerating_them_and_share_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let v6 = ipam(dir.path(), "fd00:10:244:1::/64");
        let v4 = ipam(dir.path(), "10.244.1.0/24");
        let a6 = v6.allocate("c1", "eth0").unwrap();
        let a4 = v4.allocate("c1", "eth0").unwrap();
        assert_eq!(a6, "fd00:10:244:1::1".parse::<IpAddr>().unwrap());
        assert_eq!(a4, "10.244.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            v6.allocations().unwrap().len(),
            1,
            "each range sees its own family only"
        );
        assert_ne!(v6.allocate("c2", "eth0").unwrap(), a6);
        assert_eq!(v6.release("c1", "eth0").unwrap(), Some(a6));
        assert_eq!(
            v4.allocations().unwrap().len(),
            1,
            "releasing one family leaves the other"
        );
    }

    #[test]
    fn a_kill_between_indexing_and_claiming_loses_nothing_and_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.244.1.0/24");
        let other = ipam.allocate("other", "eth0").unwrap();
        // Killed after indexing `other`'s address for c1, before its claim failed.
        let index = ipam.index_path("c1", "eth0");
        ipam.point(&index, other).unwrap();
        let ip = ipam.allocate("c1", "eth0").unwrap();
        assert_ne!(
            ip, other,
            "an address held by another attachment is never adopted"
        );
        assert_eq!(ipam.release("c1", "eth0").unwrap(), Some(ip));
        assert_eq!(
            ipam.allocations().unwrap().len(),
            1,
            "only the other attachment's address is left"
        );
        // Killed after indexing an address it never claimed: DEL finds nothing to take.
        ipam.point(&index, "10.244.1.200".parse().unwrap()).unwrap();
        assert_eq!(ipam.release("c1", "eth0").unwrap(), None);
        assert!(!std::fs::exists(&index).unwrap() && std::fs::read_link(&index).is_err());
    }

    #[test]
    fn a_claim_cut_short_is_adopted_by_the_retried_add_and_removed_by_del() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.244.1.0/24");
        let ip: IpAddr = "10.244.1.9".parse().unwrap();
        ipam.point(&ipam.index_path("c1", "eth0"), ip).unwrap();
        std::fs::write(dir.path().join("tug/10.244.1.9"), "").unwrap();
        assert_eq!(
            ipam.allocate("c1", "eth0").unwrap(),
            ip,
            "adopted, not leaked"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tug/10.244.1.9")).unwrap(),
            "c1\neth0"
        );
        ipam.point(
            &ipam.index_path("c2", "eth0"),
            "10.244.1.10".parse().unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("tug/10.244.1.10"), "").unwrap();
        assert_eq!(
            ipam.release("c2", "eth0").unwrap(),
            Some("10.244.1.10".parse().unwrap()),
            "DEL after a killed ADD releases its unwritten claim"
        );
        assert_eq!(ipam.allocations().unwrap().len(), 1);
    }

    #[test]
    fn allocations_from_before_the_index_are_found_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.244.1.0/24");
        std::fs::write(dir.path().join("tug/10.244.1.42"), "old\neth0").unwrap();
        assert_eq!(
            ipam.release("old", "eth0").unwrap(),
            Some("10.244.1.42".parse().unwrap())
        );
        assert!(ipam.allocations().unwrap().is_empty());
    }

    #[test]
    fn gc_also_drops_index_entries_of_released_and_vanished_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = ipam(dir.path(), "10.244.1.0/24");
        ipam.allocate("leak", "eth0").unwrap();
        ipam.point(
            &ipam.index_path("ghost", "eth0"),
            "10.244.1.77".parse().unwrap(),
        )
        .unwrap();
        ipam.gc(&[]).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path().join("tug"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| n.starts_with(INDEX_PREFIX))
            .collect();
        assert!(left.is_empty(), "index entries left: {left:?}");
    }

    #[test]
    fn concurrent_allocations_from_many_threads_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    ipam(&path, "10.244.1.0/24")
                        .allocate(&format!("c{i}"), "eth0")
                        .unwrap()
                })
            })
            .collect();
        let mut ips: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 32);
    }
}
