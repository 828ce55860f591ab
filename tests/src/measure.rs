//! Latency figures for the benchmarks.

use std::time::Duration;

/// The `p`-quantile (0.0–1.0) of `samples` (sorted in place; nearest rank).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

/// A process's footprint over a window: its resident memory at the end and the share of one
/// core it used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Footprint {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Proportional set size, KiB: shared pages (tug's one binary, mapped by every service)
    /// split among the processes that map them, so the services' figures add up.
    pub pss_kib: u64,
    /// Anonymous memory, KiB: what the process allocated itself (heap, stacks), as opposed to
    /// pages of its binary and libraries, which the page cache holds and can drop.
    pub anon_kib: u64,
    /// CPU time (user + system) over the window, as a percentage of one core.
    pub cpu_percent: f64,
}

impl Footprint {
    /// RSS in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    /// PSS in MiB.
    pub fn pss_mib(&self) -> f64 {
        self.pss_kib as f64 / 1024.0
    }

    /// Anonymous memory in MiB.
    pub fn anon_mib(&self) -> f64 {
        self.anon_kib as f64 / 1024.0
    }
}

/// User plus system CPU time of `pid`, in clock ticks (0 once it is gone).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces and parentheses: fields count from its closing one.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum()
}

/// `pid`'s (RSS, PSS, anonymous memory) in KiB, from one read of `/proc/<pid>/smaps_rollup`
/// (zeros once it is gone).
pub fn memory_kib(pid: u32) -> (u64, u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"), field("Anonymous:"))
}

/// The footprints of `pids` over the same `window`, measured side by side.
pub async fn footprints(pids: &[u32], window: Duration) -> Vec<Footprint> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let before: Vec<u64> = pids.iter().map(|pid| cpu_ticks(*pid)).collect();
    tokio::time::sleep(window).await;
    pids.iter()
        .zip(before)
        .map(|(pid, before)| {
            let (rss_kib, pss_kib, anon_kib) = memory_kib(*pid);
            Footprint {
                rss_kib,
                pss_kib,
                anon_kib,
                cpu_percent: cpu_ticks(*pid).saturating_sub(before) as f64
                    / ticks
                    / window.as_secs_f64()
                    * 100.0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut samples, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&mut samples, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&mut samples, 0.0), Duration::from_millis(1));
    }

    /// A process that spins shows up as using a core; one that sleeps does not. (Processes of
    /// their own: this test binary's other tests run beside it.)
    #[tokio::test]
    async fn footprint_counts_a_process_cpu_and_memory() {
        let spawn = |script: &str| {
            std::process::Command::new("sh")
                .args(["-c", script])
                .spawn()
                .expect("run sh")
        };
        let mut busy = spawn("while :; do :; done");
        let mut idle = spawn("sleep 30");
        let measured = footprints(&[busy.id(), idle.id()], Duration::from_millis(500)).await;
        let _ = (busy.kill(), idle.kill(), busy.wait(), idle.wait());
        let (busy, idle) = (measured[0], measured[1]);
        assert!(busy.cpu_percent > 30.0, "{busy:?}");
        assert!(idle.cpu_percent < 10.0, "{idle:?}");
        for footprint in [busy, idle] {
            assert!(footprint.rss_kib > 0, "{footprint:?}");
            assert!(
                footprint.anon_kib > 0
                    && footprint.anon_kib <= footprint.rss_kib
                    && footprint.pss_kib <= footprint.rss_kib,
                "{footprint:?}"
            );
        }
        let gone = footprints(&[u32::MAX], Duration::from_millis(10)).await[0];
        assert_eq!((gone.rss_kib, gone.pss_kib, gone.cpu_percent), (0, 0, 0.0));
    }
}
