//! Pod status from what the runtime has, the probes and the worker's waiting reasons: phase,
//! conditions, pod and host IPs, start time, QoS class and one status per container (state,
//! last state, restart count, ready, started, image ID, container ID). Pure, as upstream's
//! `generateAPIPodStatus`; [`patch`] turns old and new status into the strategic merge patch
//! that carries only what changed.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Map, Value, json};

use super::observed::{Instance, Observed, RunState};
use super::plan::{Waiting, restarts};
use super::translate::qos;

/// What the probes say about a running instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeView {
    /// The startup probe passed (or there is none).
    pub started: bool,
    /// The readiness probe passes (or there is none) and it has started.
    pub ready: bool,
}

/// Everything the status is made from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The pod as the API has it (its status is the previous one).
    pub pod: &'a Pod,
    /// What the runtime has.
    pub observed: &'a Observed,
    /// Containers that wait, and why (back-off, image pull, config errors).
    pub waiting: &'a BTreeMap<String, Waiting>,
    /// Probe views by instance id.
    pub probes: &'a HashMap<String, ProbeView>,
    /// Termination messages by instance id.
    pub messages: &'a HashMap<String, String>,
    /// The runtime's name for container IDs (`containerd`, `tug`).
    pub runtime_name: &'a str,
    /// The node's IPs.
    pub host_ips: &'a [String],
    /// The sandbox addresses last seen while it was ready: a pod that finishes before its
    /// status carried them still reports them, as upstream's pods keep their IPs.
    pub last_ips: &'a [String],
    /// Now.
    pub now: &'a Time,
}

fn ts(ns: i64) -> Option<Time> {
    (ns > 0).then(|| Time(jiff::Timestamp::from_nanosecond(ns as i128).unwrap_or_default()))
}

fn terminated(instance: &Instance, inputs: &Inputs<'_>) -> ContainerStateTerminated {
    let reason = match instance.reason.as_str() {
        "" if instance.exit_code == 0 => "Completed".to_owned(),
        "" => "Error".to_owned(),
        other => other.to_owned(),
    };
    let message = inputs
        .messages
        .get(&instance.id)
        .cloned()
        .or_else(|| Some(instance.message.clone()))
        .filter(|m| !m.is_empty());
    ContainerStateTerminated {
        exit_code: instance.exit_code,
        reason: Some(reason),
        message,
        started_at: ts(instance.started_at),
        finished_at: ts(instance.finished_at),
        container_id: Some(container_id(instance, inputs)),
        signal: None,
    }
}

fn container_id(instance: &Instance, inputs: &Inputs<'_>) -> String {
    format!("{}://{}", inputs.runtime_name, instance.id)
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message,
        }),
        ..Default::default()
    }
}

fn container_status(
    container: &Container,
    init: bool,
    initialized: bool,
    inputs: &Inputs<'_>,
) -> ContainerStatus {
    let mut all = inputs
        .observed
        .instances
        .iter()
        .filter(|i| i.name == container.name);
    let latest = all.next();
    let previous = all.next();
    let mut status = ContainerStatus {
        name: container.name.clone(),
        image: container.image.clone().unwrap_or_default(),
        restart_count: latest.map_or(0, |i| i.attempt as i32),
        started: Some(false),
        ..Default::default()
    };
    if let Some(latest) = latest {
        status.image_id = latest.image_ref.clone();
        status.container_id = Some(container_id(latest, inputs));
    }
    let terminated_state = |i: &Instance| ContainerState {
        terminated: Some(terminated(i, inputs)),
        ..Default::default()
    };
    if let Some(wait) = inputs.waiting.get(&container.name) {
        status.state = Some(waiting(&wait.reason, Some(wait.message.clone())));
        status.last_state = latest.filter(|i| i.exited()).map(terminated_state);
        return status;
    }
    match latest {
        None => {
            let reason = if init || initialized {
                "ContainerCreating"
            } else {
                "PodInitializing"
            };
            status.state = Some(waiting(reason, None));
        }
        Some(i) if i.state == RunState::Created => {
            status.state = Some(waiting("ContainerCreating", None));
            status.last_state = previous.filter(|p| p.exited()).map(terminated_state);
        }
        Some(i) if i.state == RunState::Running => {
            let view = inputs.probes.get(&i.id).copied().unwrap_or_default();
            status.state = Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: ts(i.started_at),
                }),
                ..Default::default()
            });
            status.started = Some(view.started);
            status.ready = view.ready;
            status.last_state = previous.filter(|p| p.exited()).map(terminated_state);
        }
        Some(i) => {
            status.state = Some(terminated_state(i));
            status.last_state = previous.filter(|p| p.exited()).map(terminated_state);
            // A completed init container counts as ready.
            status.ready = init && i.exit_code == 0;
        }
    }
    status
}

fn condition(
    kind: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    previous: &[PodCondition],
    now: &Time,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let transition = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    PodCondition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.map(str::to_owned),
        message,
        last_transition_time: Some(transition),
        last_probe_time: None,
        observed_generation: None,
    }
}

/// The phase from the container statuses (upstream's `getPhase`); terminal phases stick.
fn phase(
    pod: &Pod,
    init: &[ContainerStatus],
    app: &[ContainerStatus],
    policy: &str,
) -> &'static str {
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => return "Succeeded",
        Some("Failed") => return "Failed",
        _ => {}
    }
    let sidecars: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .map(|c| c.name.as_str())
        .collect();
    let mut pending_init = false;
    for status in init.iter().filter(|s| !sidecars.contains(&s.name.as_str())) {
        let term = status.state.as_ref().and_then(|s| s.terminated.as_ref());
        match term {
            Some(t) if t.exit_code == 0 => {}
            Some(t) if !restarts(policy, t.exit_code) => return "Failed",
            _ => pending_init = true,
        }
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for status in app {
        let state = status.state.clone().unwrap_or_default();
        if state.running.is_some() {
            running += 1;
        } else if let Some(t) = &state.terminated {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if state.waiting.is_some() {
            match status
                .last_state
                .as_ref()
                .and_then(|l| l.terminated.as_ref())
            {
                Some(t) => {
                    stopped += 1;
                    if t.exit_code == 0 {
                        succeeded += 1;
                    }
                }
                None => waiting += 1,
            }
        }
    }
    if pending_init || waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 {
        return match policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "Never" => "Failed",
            _ => "Running",
        };
    }
    "Pending"
}

/// The pod's status now.
pub fn pod_status(inputs: &Inputs<'_>) -> PodStatus {
    let pod = inputs.pod;
    let spec = pod.spec.clone().unwrap_or_default();
    let previous = pod.status.clone().unwrap_or_default();
    let previous_conditions = previous.conditions.clone().unwrap_or_default();
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let init_specs = spec.init_containers.clone().unwrap_or_default();
    let init: Vec<ContainerStatus> = init_specs
        .iter()
        .map(|c| container_status(c, true, false, inputs))
        .collect();
    let incomplete: Vec<&str> = init_specs
        .iter()
        .zip(&init)
        .filter(|(c, s)| {
            if c.restart_policy.as_deref() == Some("Always") {
                s.started != Some(true)
            } else {
                s.state
                    .as_ref()
                    .and_then(|st| st.terminated.as_ref())
                    .is_none_or(|t| t.exit_code != 0)
            }
        })
        .map(|(c, _)| c.name.as_str())
        .collect();
    let app: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| container_status(c, false, incomplete.is_empty(), inputs))
        .collect();
    let phase = phase(pod, &init, &app, policy);
    let now = inputs.now;
    let sandbox_ready = inputs.observed.current().is_some_and(|s| s.ready);
    let unready: Vec<&str> = app
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.name.as_str())
        .collect();
    let completed = phase == "Succeeded";
    let containers_ready = unready.is_empty() && !completed;
    let (ready_reason, ready_message) = if completed {
        (Some("PodCompleted"), None)
    } else if !unready.is_empty() {
        (
            Some("ContainersNotReady"),
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    } else {
        (None, None)
    };
    let mut gates_ready = true;
    let mut gate_message = None;
    for gate in spec.readiness_gates.iter().flatten() {
        let kind = &gate.condition_type;
        match previous_conditions.iter().find(|c| &c.type_ == kind) {
            Some(c) if c.status == "True" => {}
            Some(_) => {
                gates_ready = false;
                gate_message = Some(format!(
                    "the status of pod readiness gate {kind:?} is not \"True\", but False"
                ));
            }
            None => {
                gates_ready = false;
                gate_message = Some(format!(
                    "corresponding condition of pod readiness gate {kind:?} does not exist."
                ));
            }
        }
    }
    let mut conditions = Vec::new();
    match previous_conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled")
    {
        Some(scheduled) => conditions.push(scheduled.clone()),
        None => conditions.push(condition(
            "PodScheduled",
            true,
            None,
            None,
            &previous_conditions,
            now,
        )),
    }
    conditions.push(condition(
        "PodReadyToStartContainers",
        sandbox_ready,
        None,
        None,
        &previous_conditions,
        now,
    ));
    let initialized = incomplete.is_empty();
    conditions.push(condition(
        "Initialized",
        initialized,
        (!initialized).then_some("ContainersNotInitialized"),
        (!initialized).then(|| {
            format!(
                "containers with incomplete status: [{}]",
                incomplete.join(" ")
            )
        }),
        &previous_conditions,
        now,
    ));
    conditions.push(condition(
        "ContainersReady",
        containers_ready,
        ready_reason,
        ready_message.clone(),
        &previous_conditions,
        now,
    ));
    let ready = containers_ready && gates_ready;
    let (reason, message) = if containers_ready && !gates_ready {
        (Some("ReadinessGatesNotReady"), gate_message)
    } else {
        (ready_reason, ready_message)
    };
    conditions.push(condition(
        "Ready",
        ready,
        reason,
        message,
        &previous_conditions,
        now,
    ));
    // Conditions owned by others (readiness gates, DisruptionTarget) stay as they are.
    for other in &previous_conditions {
        if !conditions.iter().any(|c| c.type_ == other.type_) {
            conditions.push(other.clone());
        }
    }
    let host_network = spec.host_network.unwrap_or(false);
    let pod_ips: Vec<String> = if host_network {
        inputs.host_ips.to_vec()
    } else if sandbox_ready {
        inputs
            .observed
            .current()
            .map(|s| s.ips.clone())
            .unwrap_or_default()
    } else {
        let reported: Vec<String> = previous
            .pod_ips
            .iter()
            .flatten()
            .map(|p| p.ip.clone())
            .collect();
        if reported.is_empty() {
            inputs.last_ips.to_vec()
        } else {
            reported
        }
    };
    PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(conditions),
        host_ip: inputs.host_ips.first().cloned(),
        host_ips: Some(
            inputs
                .host_ips
                .iter()
                .map(|ip| HostIP { ip: ip.clone() })
                .collect(),
        )
        .filter(|v: &Vec<HostIP>| !v.is_empty()),
        pod_ip: pod_ips.first().cloned(),
        pod_ips: Some(pod_ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect())
            .filter(|v: &Vec<PodIP>| !v.is_empty()),
        start_time: previous.start_time.clone().or_else(|| Some(now.clone())),
        qos_class: Some(qos(pod).as_str().to_owned()),
        init_container_statuses: Some(init).filter(|v| !v.is_empty()),
        container_statuses: Some(app),
        ephemeral_container_statuses: previous.ephemeral_container_statuses.clone(),
        nominated_node_name: previous.nominated_node_name.clone(),
        message: previous.message.clone(),
        reason: previous.reason.clone(),
        ..Default::default()
    }
}

/// Whether a container's ready flag says it is ready (for events and tests).
pub fn is_ready(status: &PodStatus) -> bool {
    status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The strategic merge patch from `old` to `new` status, or `None` when nothing changed:
/// changed fields only, conditions merged by type (only the changed ones are sent), other lists
/// whole, removed fields as null.
pub fn patch(old: &PodStatus, new: &PodStatus) -> Option<Value> {
    let old = serde_json::to_value(old).unwrap_or_default();
    let new = serde_json::to_value(new).unwrap_or_default();
    let empty = Map::new();
    let old_map = old.as_object().unwrap_or(&empty);
    let new_map = new.as_object().unwrap_or(&empty);
    let mut out = Map::new();
    for (key, value) in new_map {
        if old_map.get(key) == Some(value) {
            continue;
        }
        if key == "conditions" {
            let before = old_map
                .get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let changed: Vec<Value> = value
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| !before.contains(c))
                .cloned()
                .collect();
            if !changed.is_empty() {
                out.insert(key.clone(), Value::Array(changed));
            }
            continue;
        }
        out.insert(key.clone(), value.clone());
    }
    for key in old_map.keys() {
        if !new_map.contains_key(key) && key != "conditions" {
            out.insert(key.clone(), Value::Null);
        }
    }
    (!out.is_empty()).then(|| json!({ "status": out }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::observed::Sandbox;

    fn pod(spec: Value, status: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u1"}, "spec": spec, "status": status}))
            .unwrap()
    }

    fn instance(name: &str, attempt: u32, state: RunState, exit_code: i32) -> Instance {
        Instance {
            id: format!("{name}{attempt}"),
            sandbox_id: "s0".into(),
            name: name.into(),
            attempt,
            state,
            created_at: 1,
            started_at: 1_700_000_000_000_000_000,
            finished_at: if state == RunState::Exited {
                1_700_000_010_000_000_000
            } else {
                0
            },
            exit_code,
            reason: String::new(),
            message: String::new(),
            image: "busybox".into(),
            image_ref: "docker.io/library/busybox@sha256:1".into(),
            hash: String::new(),
            log_path: String::new(),
            grace: None,
        }
    }

    fn observed(instances: Vec<Instance>) -> Observed {
        Observed {
            sandboxes: vec![Sandbox {
                id: "s0".into(),
                attempt: 0,
                ready: true,
                created_at: 1,
                ips: vec!["10.244.1.7".into(), "fd00::7".into()],
            }],
            instances,
        }
    }

    fn status_of(
        p: &Pod,
        o: &Observed,
        probes: &HashMap<String, ProbeView>,
        waiting: &BTreeMap<String, Waiting>,
    ) -> PodStatus {
        let now = Time(jiff::Timestamp::from_second(1_800_000_000).unwrap());
        pod_status(&Inputs {
            pod: p,
            observed: o,
            waiting,
            probes,
            messages: &HashMap::new(),
            runtime_name: "containerd",
            host_ips: &["192.0.2.10".into()],
            last_ips: &["10.244.1.7".into()],
            now: &now,
        })
    }

    fn cond<'a>(s: &'a PodStatus, kind: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == kind)
            .unwrap()
    }

    #[test]
    fn a_running_ready_pod() {
        let p = pod(
            json!({"containers": [{"name": "a", "image": "busybox"}]}),
            json!({"phase": "Pending"}),
        );
        let o = observed(vec![instance("a", 0, RunState::Running, 0)]);
        let probes = HashMap::from([(
            "a0".to_owned(),
            ProbeView {
                started: true,
                ready: true,
            },
        )]);
        let s = status_of(&p, &o, &probes, &BTreeMap::new());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.1.7"));
        assert_eq!(s.pod_ips.as_ref().unwrap().len(), 2);
        assert_eq!(s.host_ip.as_deref(), Some("192.0.2.10"));
        assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));
        for kind in [
            "PodScheduled",
            "PodReadyToStartContainers",
            "Initialized",
            "ContainersReady",
            "Ready",
        ] {
            assert_eq!(cond(&s, kind).status, "True", "{kind}");
        }
        let c = &s.container_statuses.as_ref().unwrap()[0];
        assert!(c.ready);
        assert_eq!(c.started, Some(true));
        assert_eq!(c.container_id.as_deref(), Some("containerd://a0"));
        assert_eq!(c.image_id, "docker.io/library/busybox@sha256:1");
        assert!(c.state.as_ref().unwrap().running.is_some());
    }

    #[test]
    fn crash_loop_shows_waiting_with_the_last_termination() {
        let p = pod(
            json!({"containers": [{"name": "a"}]}),
            json!({"phase": "Running"}),
        );
        let o = observed(vec![
            instance("a", 3, RunState::Exited, 1),
            instance("a", 2, RunState::Exited, 1),
        ]);
        let waiting = BTreeMap::from([(
            "a".to_owned(),
            Waiting {
                reason: "CrashLoopBackOff".into(),
                message: "back-off 40s".into(),
            },
        )]);
        let s = status_of(&p, &o, &HashMap::new(), &waiting);
        let c = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(c.restart_count, 3);
        assert_eq!(
            c.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("CrashLoopBackOff")
        );
        let last = c.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let ready = cond(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("ContainersNotReady"))
        );
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [a]")
        );
    }

    #[test]
    fn phases_for_jobs_and_init_containers() {
        let never = json!({"restartPolicy": "Never", "containers": [{"name": "a"}, {"name": "b"}]});
        let p = pod(never.clone(), json!({}));
        let ok = observed(vec![
            instance("a", 0, RunState::Exited, 0),
            instance("b", 0, RunState::Exited, 0),
        ]);
        let s = status_of(&p, &ok, &HashMap::new(), &BTreeMap::new());
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        assert_eq!(cond(&s, "Ready").reason.as_deref(), Some("PodCompleted"));
        // Finished, sandbox stopped, and no status ever carried the IP: it still shows.
        let mut stopped = ok.clone();
        stopped.sandboxes[0].ready = false;
        stopped.sandboxes[0].ips.clear();
        let s = status_of(&p, &stopped, &HashMap::new(), &BTreeMap::new());
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.1.7"), "the last seen IP");
        let failed = observed(vec![
            instance("a", 0, RunState::Exited, 0),
            instance("b", 0, RunState::Exited, 2),
        ]);
        assert_eq!(
            status_of(&p, &failed, &HashMap::new(), &BTreeMap::new())
                .phase
                .as_deref(),
            Some("Failed")
        );
        let with_init = pod(
            json!({"initContainers": [{"name": "i"}], "containers": [{"name": "a"}]}),
            json!({}),
        );
        let s = status_of(
            &with_init,
            &observed(vec![instance("i", 0, RunState::Running, 0)]),
            &HashMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let init = cond(&s, "Initialized");
        assert_eq!(
            (init.status.as_str(), init.message.as_deref()),
            ("False", Some("containers with incomplete status: [i]"))
        );
        let app = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            app.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("PodInitializing")
        );
        // Terminal phases never go back.
        let done = pod(never, json!({"phase": "Failed"}));
        assert_eq!(
            status_of(&done, &observed(vec![]), &HashMap::new(), &BTreeMap::new())
                .phase
                .as_deref(),
            Some("Failed")
        );
    }

    #[test]
    fn patches_carry_only_what_changed() {
        let p = pod(json!({"containers": [{"name": "a"}]}), json!({}));
        let o = observed(vec![instance("a", 0, RunState::Running, 0)]);
        let unready = status_of(&p, &o, &HashMap::new(), &BTreeMap::new());
        assert!(patch(&unready, &unready).is_none());
        let probes = HashMap::from([(
            "a0".to_owned(),
            ProbeView {
                started: true,
                ready: true,
            },
        )]);
        let ready = status_of(&p, &o, &probes, &BTreeMap::new());
        let diff = patch(&unready, &ready).unwrap();
        let status = diff["status"].as_object().unwrap();
        let keys: Vec<&str> = status.keys().map(String::as_str).collect();
        assert_eq!(keys, ["conditions", "containerStatuses"]);
        let kinds: Vec<&str> = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["ContainersReady", "Ready"]);
        // A condition keeps its transition time while its status holds.
        let mut q = p.clone();
        q.status = Some(ready.clone());
        let again = status_of(&q, &o, &probes, &BTreeMap::new());
        assert_eq!(
            cond(&again, "Ready").last_transition_time,
            cond(&ready, "Ready").last_transition_time
        );
    }
}
