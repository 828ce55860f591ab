//! Node-pressure eviction with hard thresholds (`evictionHard`), as upstream's eviction manager
//! does it: every monitoring period the signals are measured (`memory.available`,
//! `nodefs.available`, `nodefs.inodesFree`, `imagefs.available`, `imagefs.inodesFree`,
//! `pid.available`); a crossed threshold puts the node under MemoryPressure, DiskPressure or
//! PIDPressure (held for `evictionPressureTransitionPeriod` after the last crossing) and evicts
//! one pod per period: first pods using more of the starved resource than they request, then
//! lower priority, then the largest use above the request. Static pods and pods of critical
//! priority are never evicted. An evicted pod is stopped at once and ends `Failed` with reason
//! `Evicted`, a message naming the threshold and what the pod used, and the `DisruptionTarget`
//! condition. While the node is under pressure, new pods are refused the same way
//! (BestEffort pods under memory pressure, every pod under disk or PID pressure).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use crate::pods::quantity;
use crate::pods::worker::Shared;
use crate::stats::Signals;

/// An eviction signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    /// `memory.available`.
    MemoryAvailable,
    /// `nodefs.available`.
    NodeFsAvailable,
    /// `nodefs.inodesFree`.
    NodeFsInodesFree,
    /// `imagefs.available`.
    ImageFsAvailable,
    /// `imagefs.inodesFree`.
    ImageFsInodesFree,
    /// `pid.available`.
    PidAvailable,
}

const SIGNALS: &[(&str, Signal)] = &[
    ("memory.available", Signal::MemoryAvailable),
    ("nodefs.available", Signal::NodeFsAvailable),
    ("nodefs.inodesFree", Signal::NodeFsInodesFree),
    ("imagefs.available", Signal::ImageFsAvailable),
    ("imagefs.inodesFree", Signal::ImageFsInodesFree),
    ("pid.available", Signal::PidAvailable),
];

impl Signal {
    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        SIGNALS
            .iter()
            .find(|(_, s)| *s == self)
            .map_or("", |(n, _)| n)
    }

    /// The resource it starves (`memory`, `ephemeral-storage`, `pids`).
    pub fn resource(self) -> &'static str {
        match self {
            Signal::MemoryAvailable => "memory",
            Signal::PidAvailable => "pids",
            _ => "ephemeral-storage",
        }
    }

    /// The node condition it raises.
    pub fn condition(self) -> Pressure {
        match self {
            Signal::MemoryAvailable => Pressure::Memory,
            Signal::PidAvailable => Pressure::Pid,
            _ => Pressure::Disk,
        }
    }

    /// What is available and the capacity, now.
    pub fn measure(self, s: &Signals) -> Option<(u64, u64)> {
        match self {
            Signal::MemoryAvailable => Some((s.memory.available(), s.memory.capacity)),
            Signal::NodeFsAvailable => Some((s.nodefs.available, s.nodefs.capacity)),
            Signal::NodeFsInodesFree => Some((s.nodefs.inodes_free, s.nodefs.inodes)),
            Signal::ImageFsAvailable => s.imagefs.map(|f| (f.available, f.capacity)),
            Signal::ImageFsInodesFree => s.imagefs.map(|f| (f.inodes_free, f.inodes)),
            Signal::PidAvailable => Some((s.pids.1.saturating_sub(s.pids.0), s.pids.1)),
        }
    }
}

/// A node condition of pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    /// MemoryPressure.
    Memory,
    /// DiskPressure.
    Disk,
    /// PIDPressure.
    Pid,
}

impl Pressure {
    /// The condition's type.
    pub fn condition_type(self) -> &'static str {
        match self {
            Pressure::Memory => "MemoryPressure",
            Pressure::Disk => "DiskPressure",
            Pressure::Pid => "PIDPressure",
        }
    }
}

/// How much must stay available.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// An absolute quantity (bytes, inodes, PIDs).
    Quantity(u64),
    /// A share of the capacity, in percent.
    Percent(f64),
}

/// A hard threshold: `<signal> < <amount>`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// The signal.
    pub signal: Signal,
    /// The amount.
    pub amount: Amount,
}

impl Threshold {
    /// The amount in the signal's units for `capacity`.
    pub fn quantity(&self, capacity: u64) -> u64 {
        match self.amount {
            Amount::Quantity(q) => q,
            Amount::Percent(p) => (capacity as f64 * p / 100.0).round() as u64,
        }
    }

    /// The amount as written (`100Mi` as bytes, or `10%`).
    pub fn describe(&self, capacity: u64) -> String {
        match self.amount {
            Amount::Percent(p) => format!("{p}% ({})", self.quantity(capacity)),
            Amount::Quantity(q) => q.to_string(),
        }
    }
}

/// Upstream's default hard thresholds.
pub fn defaults() -> Vec<Threshold> {
    parse(&BTreeMap::from([
        ("memory.available".to_owned(), "100Mi".to_owned()),
        ("nodefs.available".to_owned(), "10%".to_owned()),
        ("nodefs.inodesFree".to_owned(), "5%".to_owned()),
        ("imagefs.available".to_owned(), "15%".to_owned()),
        ("imagefs.inodesFree".to_owned(), "5%".to_owned()),
    ]))
    .expect("the defaults parse")
}

/// Parses `evictionHard` (signal → `100Mi` or `10%`); an empty value or `0%` disables a signal.
pub fn parse(map: &BTreeMap<String, String>) -> Result<Vec<Threshold>, String> {
    let mut out = Vec::new();
    for (key, value) in map {
        let signal = SIGNALS
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, s)| *s)
            .ok_or_else(|| {
                format!(
                    "unknown signal {key:?} (known: {})",
                    SIGNALS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let value = value.trim();
        let amount = if let Some(percent) = value.strip_suffix('%') {
            let p: f64 = percent
                .parse()
                .map_err(|_| format!("{key}: {value:?} is not a percentage"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("{key}: {value:?} must be between 0% and 100%"));
            }
            Amount::Percent(p)
        } else {
            let q = quantity::bytes(value)
                .filter(|q| *q >= 0)
                .ok_or_else(|| format!("{key}: {value:?} is not a quantity"))?;
            Amount::Quantity(q as u64)
        };
        if matches!(amount, Amount::Percent(p) if p == 0.0) || amount == Amount::Quantity(0) {
            continue;
        }
        out.push(Threshold { signal, amount });
    }
    Ok(out)
}

/// A threshold crossed now: available and the threshold's quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossed {
    /// The threshold.
    pub threshold: Threshold,
    /// What is available.
    pub available: u64,
    /// The capacity.
    pub capacity: u64,
}

/// The thresholds `signals` cross.
pub fn crossed(thresholds: &[Threshold], signals: &Signals) -> Vec<Crossed> {
    thresholds
        .iter()
        .filter_map(|t| {
            let (available, capacity) = t.signal.measure(signals)?;
            (available < t.quantity(capacity)).then_some(Crossed {
                threshold: *t,
                available,
                capacity,
            })
        })
        .collect()
}

/// A pod as eviction ranks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// UID.
    pub uid: String,
    /// Priority (`spec.priority`, 0 when unset).
    pub priority: i32,
    /// Use of the starved resource.
    pub usage: u64,
    /// What its containers request of it.
    pub request: u64,
}

/// Priority at and above which a pod is critical (`system-cluster-critical`).
pub const CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// The pod to evict first: using more than it requests, then lower priority, then the largest
/// use above its request.
pub fn pick(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates.iter().min_by(|a, b| {
        let over = |c: &Candidate| c.usage > c.request;
        over(b)
            .cmp(&over(a))
            .then(a.priority.cmp(&b.priority))
            .then((b.usage as i128 - b.request as i128).cmp(&(a.usage as i128 - a.request as i128)))
    })
}

/// What a pod's containers request of `resource` (bytes; PIDs are not requested).
pub fn requested(pod: &Pod, resource: &str) -> u64 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.resources.as_ref()?.requests.as_ref()?.get(resource))
        .filter_map(|q| quantity::bytes(&q.0))
        .map(|b| b.max(0) as u64)
        .sum()
}

/// Whether a pod is BestEffort (no requests or limits at all).
pub fn best_effort(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .all(|c| {
            c.resources.as_ref().is_none_or(|r| {
                r.requests.as_ref().is_none_or(|m| m.is_empty())
                    && r.limits.as_ref().is_none_or(|m| m.is_empty())
            })
        })
}

/// Why a new pod is refused under `pressures` (critical pods never are).
pub fn refuse(pod: &Pod, pressures: &[Pressure], critical: bool) -> Option<String> {
    if critical {
        return None;
    }
    let applies: Vec<&str> = pressures
        .iter()
        .filter(|p| **p != Pressure::Memory || best_effort(pod))
        .map(|p| p.condition_type())
        .collect();
    (!applies.is_empty()).then(|| format!("The node had condition: [{}]. ", applies.join(", ")))
}

/// An eviction the pod's worker carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The status message.
    pub message: String,
}

/// Marks `pod` evicted in its status: `Failed`, reason `Evicted`, the message, and the
/// `DisruptionTarget` condition.
pub fn apply(pod: &mut Pod, eviction: &Eviction) {
    let status = pod.status.get_or_insert_with(Default::default);
    status.phase = Some("Failed".into());
    status.reason = Some("Evicted".into());
    status.message = Some(eviction.message.clone());
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    if !conditions.iter().any(|c| c.type_ == "DisruptionTarget") {
        conditions.push(k8s_openapi::api::core::v1::PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            reason: Some("TerminationByKubelet".into()),
            message: Some(eviction.message.clone()),
            last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::now(),
            )),
            ..Default::default()
        });
    }
}

/// Whether the pod was evicted (its status says so).
pub fn evicted(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("Evicted")
}

/// The eviction manager's settings.
#[derive(Debug, Clone)]
pub struct EvictionConfig {
    /// Hard thresholds.
    pub thresholds: Vec<Threshold>,
    /// How often signals are measured (10 s).
    pub period: Duration,
    /// How long a pressure condition stays after its threshold was last crossed (5 m).
    pub transition: Duration,
}

/// Measures, reports pressure and evicts until the kubelet stops.
pub async fn run(shared: Arc<Shared>, config: EvictionConfig) {
    let mut last_crossed: BTreeMap<Pressure, Instant> = BTreeMap::new();
    loop {
        tokio::time::sleep(config.period).await;
        let signals = match crate::stats::signals(&shared).await {
            Ok(signals) => signals,
            Err(error) => {
                tracing::warn!(%error, "measuring eviction signals failed");
                continue;
            }
        };
        let crossed = crossed(&config.thresholds, &signals);
        let now = Instant::now();
        for c in &crossed {
            last_crossed.insert(c.threshold.signal.condition(), now);
        }
        let pressures: Vec<Pressure> = last_crossed
            .iter()
            .filter(|(_, at)| now.duration_since(**at) < config.transition)
            .map(|(p, _)| *p)
            .collect();
        let changed = {
            let mut current = shared.pressures.lock().expect("pressures lock");
            let changed = *current != pressures;
            *current = pressures.clone();
            changed
        };
        if changed {
            tracing::warn!(?pressures, "node pressure changed");
        }
        let Some(worst) = crossed.first() else {
            continue;
        };
        if let Err(error) = evict_one(&shared, worst).await {
            tracing::warn!(%error, "eviction failed");
        }
    }
}

/// Whether a pod may never be evicted: a static pod, or critical priority.
pub fn critical(shared: &Shared, pod: &Pod) -> bool {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    pod.spec
        .as_ref()
        .and_then(|s| s.priority)
        .is_some_and(|p| p >= CRITICAL_PRIORITY)
        || shared
            .static_pods
            .lock()
            .expect("static lock")
            .iter()
            .any(|p| p.metadata.uid.as_deref() == Some(uid))
}

async fn evict_one(shared: &Arc<Shared>, crossed: &Crossed) -> Result<(), String> {
    let resource = crossed.threshold.signal.resource();
    let summary = crate::stats::summary(shared).await?;
    let pods = shared.pods_now();
    let already = shared.evictions.lock().expect("evictions lock").clone();
    let mut candidates = Vec::new();
    for pod in &pods {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if already.contains_key(&uid)
            || matches!(phase, Some("Succeeded" | "Failed"))
            || critical(shared, pod)
        {
            continue;
        }
        let Some(stats) = summary["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["podRef"]["uid"] == uid.as_str())
        else {
            continue;
        };
        let usage = match resource {
            "memory" => stats["memory"]["workingSetBytes"].as_u64(),
            "ephemeral-storage" => stats["ephemeral-storage"]["usedBytes"].as_u64(),
            _ => Some(0),
        }
        .unwrap_or(0);
        candidates.push(Candidate {
            uid,
            priority: pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
            usage,
            request: requested(pod, resource),
        });
    }
    let Some(victim) = pick(&candidates) else {
        return Ok(());
    };
    let pod = pods
        .iter()
        .find(|p| p.metadata.uid.as_deref() == Some(victim.uid.as_str()))
        .cloned()
        .unwrap_or_default();
    let signal = crossed.threshold.signal;
    let message = format!(
        "The node was low on resource: {resource}. Threshold quantity: {}, available: {}. Pod was using {}, request is {}.",
        crossed.threshold.describe(crossed.capacity),
        crossed.available,
        victim.usage,
        victim.request,
    );
    tracing::warn!(
        pod = %format!("{}/{}", pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default()),
        signal = signal.name(),
        %message,
        "evicting"
    );
    shared
        .cri
        .metrics()
        .inc("kubelet_evictions", &[("eviction_signal", signal.name())]);
    shared.evict(&victim.uid, Eviction { message });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Fs, Memory};

    #[test]
    fn thresholds_parse_with_quantities_and_percentages() {
        let parsed = parse(&BTreeMap::from([
            ("memory.available".to_owned(), "100Mi".to_owned()),
            ("nodefs.available".to_owned(), "10%".to_owned()),
            ("pid.available".to_owned(), "0%".to_owned()),
        ]))
        .unwrap();
        assert_eq!(
            parsed,
            [
                Threshold {
                    signal: Signal::MemoryAvailable,
                    amount: Amount::Quantity(100 << 20)
                },
                Threshold {
                    signal: Signal::NodeFsAvailable,
                    amount: Amount::Percent(10.0)
                },
            ]
        );
        let unknown = parse(&BTreeMap::from([(
            "memory.free".to_owned(),
            "1Gi".to_owned(),
        )]));
        assert!(unknown.unwrap_err().contains("memory.free"));
        let bad = parse(&BTreeMap::from([(
            "nodefs.available".to_owned(),
            "120%".to_owned(),
        )]));
        assert!(bad.unwrap_err().contains("120%"));
        assert_eq!(defaults().len(), 5);
    }

    #[test]
    fn crossed_thresholds_name_their_pressure() {
        let signals = Signals {
            memory: Memory {
                capacity: 1000 << 20,
                usage: 950 << 20,
                working_set: 950 << 20,
                rss: 0,
            },
            nodefs: Fs {
                capacity: 100,
                available: 50,
                used: 50,
                inodes: 100,
                inodes_free: 90,
            },
            imagefs: None,
            pids: (10, 100),
        };
        let crossed = crossed(&defaults(), &signals);
        assert_eq!(crossed.len(), 1, "{crossed:?}");
        assert_eq!(crossed[0].threshold.signal.condition(), Pressure::Memory);
        assert_eq!(crossed[0].available, 50 << 20);
    }

    #[test]
    fn pods_over_their_requests_go_first_then_low_priority_then_the_largest() {
        let c = |uid: &str, priority, usage, request| Candidate {
            uid: uid.into(),
            priority,
            usage,
            request,
        };
        let within = c("within", 0, 50, 100);
        let over_high = c("over-high", 1000, 200, 100);
        let over_low = c("over-low", 0, 150, 100);
        let over_low_big = c("over-low-big", 0, 500, 100);
        assert_eq!(
            pick(&[within.clone(), over_high.clone()]).unwrap().uid,
            "over-high"
        );
        assert_eq!(
            pick(&[over_high.clone(), over_low.clone()]).unwrap().uid,
            "over-low"
        );
        assert_eq!(
            pick(&[over_low, over_low_big, within]).unwrap().uid,
            "over-low-big"
        );
    }

    #[test]
    fn admission_refuses_best_effort_pods_under_memory_pressure_and_all_under_disk_pressure() {
        let best_effort: Pod =
            serde_json::from_value(serde_json::json!({"spec": {"containers": [{"name": "a"}]}}))
                .unwrap();
        let burstable: Pod = serde_json::from_value(serde_json::json!({"spec": {"containers": [
            {"name": "a", "resources": {"requests": {"memory": "64Mi"}}}]}}))
        .unwrap();
        assert_eq!(
            refuse(&best_effort, &[Pressure::Memory], false).as_deref(),
            Some("The node had condition: [MemoryPressure]. ")
        );
        assert_eq!(refuse(&burstable, &[Pressure::Memory], false), None);
        assert!(refuse(&burstable, &[Pressure::Disk], false).is_some());
        assert_eq!(refuse(&best_effort, &[Pressure::Disk], true), None);
        let mut pod = burstable;
        apply(
            &mut pod,
            &Eviction {
                message: "low".into(),
            },
        );
        assert!(evicted(&pod));
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert!(
            status
                .conditions
                .unwrap()
                .iter()
                .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        );
    }
}
