//! The pod worker's state machine, as one pure decision: given the pod (spec, deletion), what
//! the runtime has for it ([`Observed`]), the probe verdicts and the restart back-off, what to
//! do next. The worker executes the decision and asks again until nothing is left to do.
//!
//! ```text
//!            deletionTimestamp / terminal phase ──────────────────────────► Terminate
//!  no ready sandbox ─► (pod finished? ─► Terminate(stop only)) ─► kill containers, CreateSandbox
//!  init containers in order:  none ─► Start │ running ─► wait │ exit 0 ─► next
//!                             exit ≠ 0 ─► Never: pod Failed ─► Terminate │ else back-off ─► Start
//!  app containers, each:      none / created-only ─► Start
//!                             running ─► liveness/startup failed or spec changed ─► Kill
//!                             exited ─► restartPolicy says restart? ─► back-off ─► Start
//!  dead instances beyond the newest of each container ─► Remove
//! ```

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Container, Pod};

use super::observed::{Observed, RunState};
use super::translate::container_hash;

/// Container restart back-off (upstream's `flowcontrol.Backoff`): 10 s doubling to 300 s,
/// forgotten after twice the maximum without a new failure.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: i64,
    max: i64,
    entries: HashMap<String, (i64, i64)>,
}

/// Seconds in nanoseconds.
pub const fn secs(s: i64) -> i64 {
    s * 1_000_000_000
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(secs(10), secs(300))
    }
}

impl Backoff {
    /// A back-off from `initial` to `max` (ns).
    pub fn new(initial: i64, max: i64) -> Backoff {
        Backoff {
            initial,
            max,
            entries: HashMap::new(),
        }
    }

    /// When the back-off for `key` that started at `since` ends, if it has not yet at `now`.
    pub fn until(&self, key: &str, since: i64, now: i64) -> Option<i64> {
        let (delay, updated) = *self.entries.get(key)?;
        if now - updated > 2 * self.max {
            return None;
        }
        (now - since < delay).then_some(since + delay)
    }

    /// Records a restart at `now`: the next delay doubles (or starts again at the initial one).
    pub fn next(&mut self, key: &str, now: i64) {
        let entry = self.entries.entry(key.to_owned()).or_insert((0, 0));
        if entry.0 == 0 || now - entry.1 > 2 * self.max {
            entry.0 = self.initial;
        } else {
            entry.0 = (entry.0 * 2).min(self.max);
        }
        entry.1 = now;
    }

    /// When the back-off for `key` that started at its last failure ends, if it has not yet.
    pub fn pending(&self, key: &str, now: i64) -> Option<i64> {
        let (_, updated) = *self.entries.get(key)?;
        self.until(key, updated, now)
    }

    /// The earliest end of a pending back-off among keys starting with `prefix`.
    pub fn next_end(&self, prefix: &str, now: i64) -> Option<i64> {
        self.entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .filter_map(|k| self.pending(k, now))
            .min()
    }

    /// The current delay for `key` (ns), if any.
    pub fn delay(&self, key: &str) -> Option<i64> {
        self.entries.get(key).map(|e| e.0)
    }

    /// Forgets every key starting with `prefix` (a pod that is gone).
    pub fn forget(&mut self, prefix: &str) {
        self.entries.retain(|k, _| !k.starts_with(prefix));
    }
}

/// Why everything of the pod is being stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminate {
    /// The pod is being deleted, with this grace period (s).
    Deleting {
        /// Seconds.
        grace: i64,
    },
    /// The pod has finished (Succeeded or Failed): stop what is left, keep the record.
    Finished,
}

/// A container to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Its name.
    pub name: String,
    /// An init container.
    pub init: bool,
    /// Its restart count.
    pub attempt: u32,
    /// It replaces an instance that exited: the restart arms the back-off.
    pub restart: bool,
}

/// A container instance to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    /// Runtime id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Why (event message).
    pub reason: String,
}

/// A container waiting on back-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// `CrashLoopBackOff`.
    pub reason: String,
    /// `back-off 20s restarting failed container=…`.
    pub message: String,
}

/// What to do next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Stop everything.
    pub terminate: Option<Terminate>,
    /// Create a sandbox with this attempt.
    pub create_sandbox: Option<u32>,
    /// Instances to stop.
    pub kill: Vec<Kill>,
    /// Containers to start, in order.
    pub start: Vec<Start>,
    /// Dead instances to remove.
    pub remove: Vec<String>,
    /// Containers held back by back-off.
    pub waiting: BTreeMap<String, Waiting>,
    /// When to look again (a back-off ends), ns.
    pub wake_at: Option<i64>,
}

impl Decision {
    /// Whether there is anything to do in the runtime.
    pub fn acts(&self) -> bool {
        self.terminate.is_some()
            || self.create_sandbox.is_some()
            || !self.kill.is_empty()
            || !self.start.is_empty()
            || !self.remove.is_empty()
    }
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// Whether a container that exited with `code` is restarted under `policy`.
pub fn restarts(policy: &str, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

fn is_sidecar(container: &Container) -> bool {
    container.restart_policy.as_deref() == Some("Always")
}

/// The pod's back-off key for a container.
pub fn backoff_key(pod: &Pod, container: &str) -> String {
    format!(
        "{}/{container}",
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// Whether the pod is done in the current sandbox: nothing will run again.
pub fn finished(pod: &Pod, observed: &Observed) -> bool {
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return true;
    }
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    let policy = restart_policy(pod);
    if policy == "Always" {
        return false;
    }
    let init_failed = spec.init_containers.iter().flatten().any(|c| {
        !is_sidecar(c)
            && observed
                .latest(&c.name)
                .is_some_and(|i| i.exited() && i.exit_code != 0 && !restarts(policy, i.exit_code))
    });
    if init_failed {
        return true;
    }
    !spec.containers.is_empty()
        && spec.containers.iter().all(|c| {
            observed
                .latest(&c.name)
                .is_some_and(|i| i.exited() && !restarts(policy, i.exit_code))
        })
}

/// Decides the next step for `pod`. `unhealthy` maps running instance ids to why their
/// liveness or startup probe failed; `now` is ns since the epoch.
pub fn decide(
    pod: &Pod,
    observed: &Observed,
    unhealthy: &HashMap<String, String>,
    backoff: &Backoff,
    now: i64,
) -> Decision {
    let mut decision = Decision::default();
    // Keep the newest dead instance of each container (its status and logs are `lastState`
    // and `--previous`); remove older dead ones and never-started leftovers of old sandboxes.
    let mut seen_dead: Vec<&str> = Vec::new();
    for instance in &observed.instances {
        let current = observed
            .current()
            .is_some_and(|s| s.id == instance.sandbox_id);
        match instance.state {
            RunState::Exited => {
                if seen_dead.contains(&instance.name.as_str()) {
                    decision.remove.push(instance.id.clone());
                } else {
                    seen_dead.push(&instance.name);
                }
            }
            RunState::Created if !current => decision.remove.push(instance.id.clone()),
            _ => {}
        }
    }
    if let Some(deleted) = &pod.metadata.deletion_timestamp {
        let _ = deleted;
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or_else(|| super::translate::grace_period(pod));
        decision.terminate = Some(Terminate::Deleting { grace });
        return decision;
    }
    let Some(spec) = pod.spec.as_ref() else {
        decision.terminate = Some(Terminate::Finished);
        return decision;
    };
    if finished(pod, observed) {
        let running = observed.running().next().is_some();
        let sandbox_up = observed.sandboxes.iter().any(|s| s.ready);
        if running || sandbox_up {
            decision.terminate = Some(Terminate::Finished);
        }
        return decision;
    }
    let Some(sandbox) = observed.current().filter(|s| s.ready) else {
        decision.create_sandbox = Some(observed.current().map_or(0, |s| s.attempt + 1));
        decision.kill = observed
            .running()
            .map(|i| Kill {
                id: i.id.clone(),
                name: i.name.clone(),
                reason: "the pod sandbox changed; the container will be restarted".into(),
            })
            .collect();
        return decision;
    };
    let _ = sandbox;
    let policy = restart_policy(pod);
    let restart = |decision: &mut Decision, container: &Container, init: bool| {
        let Some(last) = observed.latest(&container.name) else {
            return;
        };
        let key = backoff_key(pod, &container.name);
        match backoff.until(&key, last.finished_at, now) {
            Some(until) => {
                let delay = backoff.delay(&key).unwrap_or_default() / 1_000_000_000;
                decision.waiting.insert(
                    container.name.clone(),
                    Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: format!(
                            "back-off {}s restarting failed container={} pod={}_{}({})",
                            delay,
                            container.name,
                            pod.metadata.name.as_deref().unwrap_or_default(),
                            pod.metadata.namespace.as_deref().unwrap_or_default(),
                            pod.metadata.uid.as_deref().unwrap_or_default()
                        ),
                    },
                );
                decision.wake_at = Some(decision.wake_at.map_or(until, |w: i64| w.min(until)));
            }
            None => decision.start.push(Start {
                name: container.name.clone(),
                init,
                attempt: observed.next_attempt(&container.name),
                restart: true,
            }),
        }
    };
    // Init containers, in order; a sidecar (restartPolicy Always) counts once it runs.
    for container in spec.init_containers.iter().flatten() {
        let sidecar = is_sidecar(container);
        match observed.latest(&container.name) {
            None => {
                decision.start.push(Start {
                    name: container.name.clone(),
                    init: true,
                    attempt: observed.next_attempt(&container.name),
                    restart: false,
                });
                return decision;
            }
            Some(i) if i.state == RunState::Created => {
                decision.remove.push(i.id.clone());
                decision.start.push(Start {
                    name: container.name.clone(),
                    init: true,
                    attempt: i.attempt,
                    restart: false,
                });
                return decision;
            }
            Some(i) if matches!(i.state, RunState::Running | RunState::Unknown) => {
                if let Some(why) = unhealthy.get(&i.id) {
                    decision.kill.push(Kill {
                        id: i.id.clone(),
                        name: i.name.clone(),
                        reason: why.clone(),
                    });
                    return decision;
                }
                if !sidecar {
                    return decision; // wait for it to finish
                }
            }
            Some(i) => {
                if i.exit_code == 0 && !sidecar {
                    continue;
                }
                if sidecar || restarts(policy, i.exit_code) {
                    restart(&mut decision, container, true);
                    if !sidecar {
                        return decision;
                    }
                } else {
                    // restartPolicy Never and an init container failed: the pod has failed
                    // (`finished` above sees it on the next pass).
                    return decision;
                }
            }
        }
    }
    for container in &spec.containers {
        match observed.latest(&container.name) {
            None => decision.start.push(Start {
                name: container.name.clone(),
                init: false,
                attempt: observed.next_attempt(&container.name),
                restart: false,
            }),
            Some(i) if i.state == RunState::Created => {
                decision.remove.push(i.id.clone());
                decision.start.push(Start {
                    name: container.name.clone(),
                    init: false,
                    attempt: i.attempt,
                    restart: false,
                });
            }
            Some(i) if matches!(i.state, RunState::Running | RunState::Unknown) => {
                if let Some(why) = unhealthy.get(&i.id) {
                    decision.kill.push(Kill {
                        id: i.id.clone(),
                        name: i.name.clone(),
                        reason: why.clone(),
                    });
                } else if !i.hash.is_empty() && i.hash != container_hash(container) {
                    decision.kill.push(Kill {
                        id: i.id.clone(),
                        name: i.name.clone(),
                        reason: format!(
                            "Container {} definition changed, will be restarted",
                            container.name
                        ),
                    });
                }
            }
            Some(i) => {
                if restarts(policy, i.exit_code) {
                    restart(&mut decision, container, false);
                }
            }
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::observed::{Instance, Sandbox};
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u1"}, "spec": spec}),
        )
        .unwrap()
    }

    fn sandbox(id: &str, attempt: u32, ready: bool) -> Sandbox {
        Sandbox {
            id: id.into(),
            attempt,
            ready,
            created_at: attempt as i64,
            ips: vec!["10.0.0.5".into()],
        }
    }

    fn instance(name: &str, attempt: u32, state: RunState, exit_code: i32) -> Instance {
        Instance {
            id: format!("{name}-{attempt}"),
            sandbox_id: "s0".into(),
            name: name.into(),
            attempt,
            state,
            created_at: attempt as i64,
            started_at: 1,
            finished_at: if state == RunState::Exited {
                secs(100)
            } else {
                0
            },
            exit_code,
            reason: String::new(),
            message: String::new(),
            image: "busybox".into(),
            image_ref: "sha256:1".into(),
            hash: String::new(),
            log_path: String::new(),
            grace: None,
        }
    }

    fn observed(instances: Vec<Instance>) -> Observed {
        Observed {
            sandboxes: vec![sandbox("s0", 0, true)],
            instances,
        }
    }

    fn starts(d: &Decision) -> Vec<(&str, bool, u32)> {
        d.start
            .iter()
            .map(|s| (s.name.as_str(), s.init, s.attempt))
            .collect()
    }

    const NOW: i64 = secs(101);

    #[test]
    fn a_new_pod_gets_a_sandbox_then_its_init_containers_in_order_then_its_containers() {
        let p = pod(
            json!({"initContainers": [{"name": "i1"}, {"name": "i2"}], "containers": [{"name": "a"}, {"name": "b"}]}),
        );
        let none = HashMap::new();
        let b = Backoff::default();
        let d = decide(&p, &Observed::default(), &none, &b, NOW);
        assert_eq!(d.create_sandbox, Some(0));
        let d = decide(&p, &observed(vec![]), &none, &b, NOW);
        assert_eq!(starts(&d), [("i1", true, 0)]);
        let d = decide(
            &p,
            &observed(vec![instance("i1", 0, RunState::Running, 0)]),
            &none,
            &b,
            NOW,
        );
        assert!(!d.acts(), "waits for i1: {d:?}");
        let d = decide(
            &p,
            &observed(vec![instance("i1", 0, RunState::Exited, 0)]),
            &none,
            &b,
            NOW,
        );
        assert_eq!(starts(&d), [("i2", true, 0)]);
        let done = vec![
            instance("i1", 0, RunState::Exited, 0),
            instance("i2", 0, RunState::Exited, 0),
        ];
        let d = decide(&p, &observed(done), &none, &b, NOW);
        assert_eq!(starts(&d), [("a", false, 0), ("b", false, 0)]);
    }

    #[test]
    fn restart_policies_decide_what_restarts() {
        let none = HashMap::new();
        let b = Backoff::default();
        for (policy, code, restarted) in [
            ("Always", 0, true),
            ("Always", 1, true),
            ("OnFailure", 0, false),
            ("OnFailure", 1, true),
            ("Never", 1, false),
        ] {
            let p = pod(
                json!({"restartPolicy": policy, "containers": [{"name": "a"}, {"name": "keep"}]}),
            );
            let o = observed(vec![
                instance("a", 0, RunState::Exited, code),
                instance("keep", 0, RunState::Running, 0),
            ]);
            let d = decide(&p, &o, &none, &b, NOW);
            assert_eq!(
                !d.start.is_empty(),
                restarted,
                "{policy} exit {code}: {d:?}"
            );
            if restarted {
                assert_eq!(starts(&d), [("a", false, 1)]);
            }
        }
    }

    #[test]
    fn crash_loops_back_off_doubling_to_five_minutes() {
        let p = pod(json!({"containers": [{"name": "a"}]}));
        let none = HashMap::new();
        let mut b = Backoff::default();
        let key = backoff_key(&p, "a");
        // The first restart is immediate and arms 10 s.
        let o = observed(vec![instance("a", 0, RunState::Exited, 1)]);
        let d = decide(&p, &o, &none, &b, NOW);
        assert_eq!(starts(&d), [("a", false, 1)]);
        assert!(d.start[0].restart, "a restart arms the back-off");
        b.next(&key, NOW);
        // It crashes again at 100 s: held back until 110 s.
        let o = observed(vec![instance("a", 1, RunState::Exited, 1)]);
        let d = decide(&p, &o, &none, &b, secs(105));
        assert!(d.start.is_empty());
        assert_eq!(d.waiting["a"].reason, "CrashLoopBackOff");
        assert!(
            d.waiting["a"]
                .message
                .starts_with("back-off 10s restarting failed container=a pod=p_ns(u1)")
        );
        assert_eq!(d.wake_at, Some(secs(110)));
        assert_eq!(
            starts(&decide(&p, &o, &none, &b, secs(111))),
            [("a", false, 2)]
        );
        let mut delays = Vec::new();
        for _ in 0..7 {
            b.next(&key, secs(111));
            delays.push(b.delay(&key).unwrap() / secs(1));
        }
        assert_eq!(delays, [20, 40, 80, 160, 300, 300, 300]);
        // Ten minutes without a failure forget it.
        b.next(&key, secs(111 + 601));
        assert_eq!(b.delay(&key), Some(secs(10)));
    }

    #[test]
    fn failed_init_container_with_never_fails_the_pod_and_stops_it() {
        let p = pod(
            json!({"restartPolicy": "Never", "initContainers": [{"name": "i"}], "containers": [{"name": "a"}]}),
        );
        let o = observed(vec![instance("i", 0, RunState::Exited, 2)]);
        assert!(finished(&p, &o));
        let d = decide(&p, &o, &HashMap::new(), &Backoff::default(), NOW);
        assert_eq!(d.terminate, Some(Terminate::Finished));
        assert!(d.start.is_empty());
        // With OnFailure it is retried instead.
        let p = pod(
            json!({"restartPolicy": "OnFailure", "initContainers": [{"name": "i"}], "containers": [{"name": "a"}]}),
        );
        let d = decide(&p, &o, &HashMap::new(), &Backoff::default(), NOW);
        assert_eq!(starts(&d), [("i", true, 1)]);
    }

    #[test]
    fn liveness_failure_kills_and_spec_change_restarts() {
        let p = pod(json!({"containers": [{"name": "a", "image": "new"}]}));
        let mut running = instance("a", 0, RunState::Running, 0);
        running.hash = container_hash(&p.spec.as_ref().unwrap().containers[0]);
        let unhealthy = HashMap::from([(running.id.clone(), "Liveness probe failed".to_owned())]);
        let d = decide(
            &p,
            &observed(vec![running.clone()]),
            &unhealthy,
            &Backoff::default(),
            NOW,
        );
        assert_eq!(d.kill.len(), 1);
        assert_eq!(d.kill[0].reason, "Liveness probe failed");
        let d = decide(
            &p,
            &observed(vec![running.clone()]),
            &HashMap::new(),
            &Backoff::default(),
            NOW,
        );
        assert!(!d.acts());
        running.hash = "old".into();
        let d = decide(
            &p,
            &observed(vec![running]),
            &HashMap::new(),
            &Backoff::default(),
            NOW,
        );
        assert!(d.kill[0].reason.contains("definition changed"));
    }

    #[test]
    fn deletion_terminates_with_the_grace_period_and_dead_instances_are_collected() {
        let mut p =
            pod(json!({"terminationGracePeriodSeconds": 30, "containers": [{"name": "a"}]}));
        let o = observed(vec![
            instance("a", 2, RunState::Running, 0),
            instance("a", 1, RunState::Exited, 1),
            instance("a", 0, RunState::Exited, 1),
        ]);
        let d = decide(&p, &o, &HashMap::new(), &Backoff::default(), NOW);
        assert_eq!(d.remove, ["a-0"]);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        ));
        p.metadata.deletion_grace_period_seconds = Some(5);
        let d = decide(&p, &o, &HashMap::new(), &Backoff::default(), NOW);
        assert_eq!(d.terminate, Some(Terminate::Deleting { grace: 5 }));
    }

    #[test]
    fn a_dead_sandbox_is_replaced_unless_the_pod_finished() {
        let p = pod(json!({"containers": [{"name": "a"}]}));
        let o = Observed {
            sandboxes: vec![sandbox("s0", 0, false)],
            instances: vec![instance("a", 0, RunState::Running, 0)],
        };
        let d = decide(&p, &o, &HashMap::new(), &Backoff::default(), NOW);
        assert_eq!(d.create_sandbox, Some(1));
        assert_eq!(d.kill.len(), 1);
        let done = pod(json!({"restartPolicy": "Never", "containers": [{"name": "a"}]}));
        let o = Observed {
            sandboxes: vec![sandbox("s0", 0, false)],
            instances: vec![instance("a", 0, RunState::Exited, 0)],
        };
        let d = decide(&done, &o, &HashMap::new(), &Backoff::default(), NOW);
        assert!(!d.acts(), "{d:?}");
    }
}
