//! The pod worker: one task per pod that executes the decisions of [`super::plan`] through the
//! CRI — sandbox, image pull (with its back-off), init containers, containers, postStart and
//! preStop hooks, kills with the grace period, garbage collection of dead instances — keeps one
//! prober per running instance, and writes the pod's status (only what changed). A deleted pod
//! is confirmed to the API (delete with grace 0, UID precondition) only once its containers and
//! sandbox are gone.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    CreateContainerRequest, ImageSpec, ImageStatusRequest, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ObjectReference, Pod, PodStatus, Secret, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::{Notify, mpsc, watch};

use super::env::{self, Facts, Sources};
use super::observed::{Instance, Observed, RunState, observe};
use super::plan::{Backoff, Decision, Start, Terminate, Waiting, decide};
use super::probe::{self, Failure, Target, Verdict, Verdicts};
use super::status::{self, ProbeView};
use super::translate::{self, ContainerInputs, NodeContext, find_container};
use super::volumes;
use crate::runtime::{Cri, CriError};

/// A service-account token: its bytes, when it was issued and when it expires (s).
pub type Token = (Vec<u8>, i64, i64);

/// What every pod worker shares.
pub struct Shared {
    /// The container runtime.
    pub cri: Cri,
    /// Node facts for translation.
    pub node: NodeContext,
    /// This node's name.
    pub node_name: String,
    /// This node's IPs.
    pub host_ips: Vec<String>,
    /// The kubelet's root dir (`/var/lib/kubelet`): pods live in `pods/<uid>`.
    pub root_dir: PathBuf,
    /// The API (None when standalone).
    pub client: Option<kube::Client>,
    /// Events.
    pub recorder: Option<Recorder>,
    /// The runtime's name for container IDs.
    pub runtime_name: tokio::sync::OnceCell<String>,
    /// Allocatable CPU (millicores) and memory (bytes), for resourceFieldRef without limits.
    pub allocatable: (i64, i64),
    /// The latest status of every pod (what the kubelet API and standalone mode show).
    pub statuses: std::sync::Mutex<HashMap<String, Pod>>,
    /// Mirror pods in the API, by the hash (UID) of the static pod they stand for.
    pub mirrors: std::sync::Mutex<HashMap<String, Pod>>,
    /// The static pods now.
    pub static_pods: std::sync::Mutex<Vec<Pod>>,
    /// Service-account tokens by pod UID, audience and lifetime: the token, when it was
    /// issued and when it expires (s since the epoch).
    pub tokens: std::sync::Mutex<HashMap<String, Token>>,
    /// The periodic sync (volume refresh) period.
    pub sync_frequency: Duration,
    /// The previous samples of CPU counters (for the stats summary's rates).
    pub rates: crate::stats::Rates,
    /// The node's pressure conditions now (from the eviction manager).
    pub pressures: Arc<std::sync::Mutex<Vec<crate::eviction::Pressure>>>,
    /// Pods to evict (or refused at admission), by UID: their workers stop them.
    pub evictions: std::sync::Mutex<HashMap<String, crate::eviction::Eviction>>,
    /// Each worker's wake-up, by pod UID.
    pub wakes: std::sync::Mutex<HashMap<String, Arc<Notify>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node_name", &self.node_name)
            .field("cri", &self.cri)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The pod `namespace`/`name` this kubelet runs, with its latest status.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.statuses
            .lock()
            .expect("statuses lock")
            .values()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(namespace)
                    && p.metadata.name.as_deref() == Some(name)
            })
            .cloned()
    }

    /// Every pod this kubelet runs, with its latest status.
    pub fn pods_now(&self) -> Vec<Pod> {
        self.statuses
            .lock()
            .expect("statuses lock")
            .values()
            .cloned()
            .collect()
    }

    /// Has the pod's worker evict it.
    pub fn evict(&self, uid: &str, eviction: crate::eviction::Eviction) {
        self.evictions
            .lock()
            .expect("evictions lock")
            .insert(uid.to_owned(), eviction);
        if let Some(wake) = self.wakes.lock().expect("wakes lock").get(uid) {
            wake.notify_one();
        }
    }

    /// The pod's directory.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root_dir.join("pods").join(uid)
    }
}

fn now_ns() -> i64 {
    jiff::Timestamp::now().as_nanosecond() as i64
}

fn reference(pod: &Pod) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    }
}

/// What the sync loop tells the run loop.
enum Flow {
    /// Look again by then (or on the next change).
    Again(Option<Duration>),
    /// The pod is gone for good.
    Done,
}

/// One pod's worker.
pub struct Worker {
    shared: Arc<Shared>,
    uid: String,
    backoff: Backoff,
    image_backoff: Backoff,
    start_errors: BTreeMap<String, Waiting>,
    backoff_waits: BTreeMap<String, Waiting>,
    verdicts: Verdicts,
    probers: HashMap<String, tokio::task::JoinHandle<()>>,
    wake: Arc<Notify>,
    failures_tx: mpsc::UnboundedSender<Failure>,
    failures: mpsc::UnboundedReceiver<Failure>,
    written: Option<(String, PodStatus)>,
    /// Status writes that failed in a row since the last one that went through.
    status_failures: u32,
    volumes_refreshed: Option<Instant>,
    /// When the worker first saw the pod, until it runs (`kubelet_pod_start_duration_seconds`);
    /// `None` once recorded, or for a pod that was running before this kubelet started.
    first_seen: Option<Instant>,
    syncs: u64,
    /// The status in the API while the worker shows the pod evicted and the API does not yet.
    api_status: Option<PodStatus>,
    /// The sandbox's addresses, as last seen while it was ready.
    sandbox_ips: Vec<String>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("uid", &self.uid).finish()
    }
}

impl Worker {
    /// A worker for the pod with `uid`; `wake` is notified when its containers change.
    pub fn new(shared: Arc<Shared>, uid: String, wake: Arc<Notify>) -> Worker {
        let (failures_tx, failures) = mpsc::unbounded_channel();
        Worker {
            shared,
            uid,
            backoff: Backoff::default(),
            image_backoff: Backoff::default(),
            start_errors: BTreeMap::new(),
            backoff_waits: BTreeMap::new(),
            verdicts: Verdicts::default(),
            probers: HashMap::new(),
            wake,
            first_seen: Some(Instant::now()),
            syncs: 0,
            api_status: None,
            sandbox_ips: Vec::new(),
            failures_tx,
            failures,
            written: None,
            status_failures: 0,
            volumes_refreshed: None,
        }
    }

    /// Runs until the pod is gone: `updates` carries the pod as the API has it, `None` once it
    /// was deleted there.
    pub async fn run(mut self, mut updates: watch::Receiver<Option<Pod>>) {
        let mut last: Option<Pod> = None;
        loop {
            let current = updates.borrow_and_update().clone();
            let flow = match current {
                Some(pod) => {
                    last = Some(pod.clone());
                    Box::pin(self.sync(&pod)).await
                }
                None => {
                    self.cleanup(last.as_ref()).await;
                    Flow::Done
                }
            };
            let wait = match flow {
                Flow::Done => {
                    for (_, prober) in self.probers.drain() {
                        prober.abort();
                    }
                    return;
                }
                Flow::Again(wait) => wait
                    .unwrap_or(self.shared.sync_frequency)
                    .min(self.shared.sync_frequency),
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() {
                            // The manager is gone (the kubelet stops): leave the pod running.
                            for (_, prober) in self.probers.drain() {
                                prober.abort();
                            }
                            return;
                        }
                        break;
                    }
                    () = self.wake.notified() => break,
                    () = tokio::time::sleep_until(deadline) => break,
                    Some(failure) = self.failures.recv() => {
                        if let Some(pod) = &last {
                            self.event(pod, EventType::Warning, "Unhealthy", failure.message, Some(&failure.container));
                        }
                    }
                }
            }
        }
    }

    fn event(
        &self,
        pod: &Pod,
        kind: EventType,
        reason: &str,
        note: String,
        container: Option<&str>,
    ) {
        let Some(recorder) = self.shared.recorder.clone() else {
            return;
        };
        let mut object = reference(pod);
        if let Some(name) = container {
            object.field_path = Some(format!("spec.containers{{{name}}}"));
        }
        let event = Event {
            type_: kind,
            reason: reason.to_owned(),
            note: Some(note),
            action: reason.to_owned(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &object).await {
                tracing::debug!(%error, "could not record an Event");
            }
        });
    }

    fn unhealthy(&self) -> HashMap<String, String> {
        self.verdicts
            .lock()
            .expect("verdicts lock")
            .iter()
            .filter_map(|(id, v)| v.unhealthy.clone().map(|why| (id.clone(), why)))
            .collect()
    }

    async fn sync(&mut self, pod: &Pod) -> Flow {
        // A pod new to this node is admitted only if the node's pressures allow it.
        if self.syncs == 0
            && self.written.is_none()
            && !crate::eviction::evicted(pod)
            && !matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Running" | "Succeeded" | "Failed")
            )
        {
            let pressures = self
                .shared
                .pressures
                .lock()
                .expect("pressures lock")
                .clone();
            let critical = crate::eviction::critical(&self.shared, pod);
            if let Some(message) = crate::eviction::refuse(pod, &pressures, critical) {
                self.shared
                    .evictions
                    .lock()
                    .expect("evictions lock")
                    .insert(self.uid.clone(), crate::eviction::Eviction { message });
            }
        }
        let eviction = self
            .shared
            .evictions
            .lock()
            .expect("evictions lock")
            .get(&self.uid)
            .cloned();
        let mut evicted_pod;
        self.api_status = None;
        let pod = match eviction {
            Some(eviction) if !crate::eviction::evicted(pod) => {
                self.api_status = Some(pod.status.clone().unwrap_or_default());
                evicted_pod = pod.clone();
                crate::eviction::apply(&mut evicted_pod, &eviction);
                self.event(pod, EventType::Warning, "Evicted", eviction.message, None);
                &evicted_pod
            }
            _ => pod,
        };
        let began = Instant::now();
        let operation = match self.syncs {
            0 => "create",
            _ if self.written.is_some() => "update",
            _ => "sync",
        };
        let flow = self.sync_once(pod).await;
        self.syncs += 1;
        let metrics = self.shared.cri.metrics();
        metrics.observe(
            "kubelet_pod_worker_duration_seconds",
            &[("operation_type", operation)],
            began.elapsed().as_secs_f64(),
        );
        let phase = self.written.as_ref().and_then(|(_, s)| s.phase.as_deref());
        if phase == Some("Running")
            && let Some(first_seen) = self.first_seen.take()
        {
            metrics.observe(
                "kubelet_pod_start_duration_seconds",
                &[],
                first_seen.elapsed().as_secs_f64(),
            );
        }
        flow
    }

    async fn sync_once(&mut self, pod: &Pod) -> Flow {
        let mut observed;
        let mut wake_at: Option<i64>;
        let mut rounds = 0;
        loop {
            observed = match observe(&self.shared.cri, &self.uid).await {
                Ok(observed) => observed,
                Err(error) => {
                    tracing::warn!(pod = %self.uid, %error, "reading the pod's containers from the runtime failed; retrying");
                    return Flow::Again(Some(Duration::from_secs(2)));
                }
            };
            // The runtime's name makes container IDs, which the probers' seeds are matched by.
            if self.shared.runtime_name.get().is_none()
                && let Ok(name) = self.shared.cri.runtime_name().await
            {
                let _ = self.shared.runtime_name.set(name);
            }
            if self.syncs == 0 && rounds == 0 && observed.current().is_some() {
                self.first_seen = None; // adopted from an earlier kubelet: started long ago
            }
            self.sync_probers(pod, &observed);
            let decision = decide(pod, &observed, &self.unhealthy(), &self.backoff, now_ns());
            wake_at = decision.wake_at;
            for name in decision
                .waiting
                .keys()
                .chain(decision.start.iter().map(|s| &s.name))
            {
                self.start_errors.remove(name);
            }
            for instance in observed.running() {
                self.start_errors.remove(&instance.name);
            }
            self.backoff_waits = decision.waiting.clone();
            if !decision.acts() || rounds >= 6 {
                break;
            }
            rounds += 1;
            match Box::pin(self.execute(pod, &observed, &decision)).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(Gone) => return Flow::Done,
            }
        }
        self.refresh_volumes(pod, &observed).await;
        // A status that did not reach the API is tried again soon (200 ms, doubling to 5 s), not
        // a whole sync period later (upstream's status manager retries every 10 s).
        let status_retry = (!self.write_status(pod, &observed).await).then(|| {
            let wait = crate::register::retry_after(self.status_failures, Duration::from_secs(5));
            now_ns() + wait.as_nanos() as i64
        });
        let image_wake = self.image_backoff_wake();
        // A pull that just failed shows ErrImagePull now and ImagePullBackOff shortly after,
        // while its back-off runs.
        let pull_failed = self
            .start_errors
            .values()
            .any(|w| w.reason == "ErrImagePull")
            .then(|| now_ns() + 2_000_000_000);
        let next = [wake_at, image_wake, pull_failed, status_retry]
            .into_iter()
            .flatten()
            .min();
        Flow::Again(next.map(|at| Duration::from_nanos((at - now_ns()).max(0) as u64 + 50_000_000)))
    }

    fn image_backoff_wake(&self) -> Option<i64> {
        self.image_backoff.next_end(&self.uid, now_ns())
    }

    /// Executes one decision; `Ok(true)` to decide again at once, `Ok(false)` to wait.
    async fn execute(
        &mut self,
        pod: &Pod,
        observed: &Observed,
        decision: &Decision,
    ) -> Result<bool, Gone> {
        for id in &decision.remove {
            self.remove_container(id).await;
        }
        if let Some(how) = &decision.terminate {
            let grace = match how {
                Terminate::Deleting { grace } => *grace,
                // Hard eviction stops at once (upstream's immediate grace period).
                Terminate::Finished if crate::eviction::evicted(pod) => 1,
                Terminate::Finished => translate::grace_period(pod),
            };
            self.stop_everything(Some(pod), observed, grace).await;
            if matches!(how, Terminate::Deleting { .. }) {
                self.remove_everything(pod).await;
                return Err(Gone);
            }
            return Ok(true);
        }
        let grace = translate::grace_period(pod);
        let kills = decision.kill.iter().filter_map(|kill| {
            let instance = observed.instances.iter().find(|i| i.id == kill.id)?;
            Some(self.kill(Some(pod), instance, grace, &kill.reason))
        });
        futures::future::join_all(kills).await;
        if let Some(attempt) = decision.create_sandbox {
            return Ok(self.create_sandbox(pod, attempt).await);
        }
        let mut progressed = !decision.kill.is_empty() || !decision.remove.is_empty();
        for start in &decision.start {
            if start.restart {
                self.backoff
                    .next(&super::plan::backoff_key(pod, &start.name), now_ns());
            }
            match Box::pin(self.start(pod, observed, start)).await {
                Ok(()) => progressed = true,
                Err(waiting) => {
                    self.start_errors.insert(start.name.clone(), waiting);
                    if start.init {
                        break;
                    }
                }
            }
        }
        Ok(progressed)
    }

    async fn create_sandbox(&mut self, pod: &Pod, attempt: u32) -> bool {
        let config = match translate::sandbox_config(pod, &self.shared.node, attempt) {
            Ok(config) => config,
            Err(error) => {
                self.event(
                    pod,
                    EventType::Warning,
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {error}"),
                    None,
                );
                return false;
            }
        };
        let pod_dir = self.shared.pod_dir(&self.uid);
        let log_dir = PathBuf::from(&config.log_directory);
        for dir in [&pod_dir, &log_dir] {
            if let Err(error) = std::fs::create_dir_all(dir) {
                self.event(
                    pod,
                    EventType::Warning,
                    "FailedCreatePodSandBox",
                    format!("create {}: {error}", dir.display()),
                    None,
                );
                return false;
            }
        }
        let result = async {
            let mut runtime = self.shared.cri.runtime().await?;
            runtime
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.runtime_class_name.clone())
                        .unwrap_or_default(),
                })
                .await
                .map_err(|e| CriError::call("RunPodSandbox", e))
        }
        .await;
        let metrics = self.shared.cri.metrics();
        metrics.inc("kubelet_started_pods_total", &[]);
        match result {
            Ok(_) => true,
            Err(error) => {
                metrics.inc("kubelet_started_pods_errors_total", &[]);
                tracing::warn!(pod = %self.uid, %error, "creating the pod sandbox failed");
                self.event(
                    pod,
                    EventType::Warning,
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {}", error.message),
                    None,
                );
                false
            }
        }
    }

    async fn remove_container(&self, id: &str) {
        if let Ok(mut runtime) = self.shared.cri.runtime().await
            && let Err(status) = runtime
                .remove_container(RemoveContainerRequest {
                    container_id: id.to_owned(),
                })
                .await
            && status.code() != tonic::Code::NotFound
        {
            tracing::warn!(
                container = id,
                error = status.message(),
                "removing a dead container failed"
            );
        }
    }

    fn target(&self, pod: Option<&Pod>, instance: &Instance, ips: &[String]) -> Target {
        let container = pod
            .and_then(|p| find_container(p, &instance.name))
            .cloned()
            .unwrap_or_default();
        let host_network = pod
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let pod_ip = if host_network {
            self.shared.host_ips.first()
        } else {
            ips.first()
        };
        let meta = pod.map(|p| p.metadata.clone()).unwrap_or_default();
        Target {
            cri: self.shared.cri.clone(),
            container_id: instance.id.clone(),
            container,
            pod_ip: pod_ip.cloned().unwrap_or_else(|| "127.0.0.1".into()),
            pod: [meta.namespace, meta.name, meta.uid].map(Option::unwrap_or_default),
        }
    }

    /// Stops one instance: preStop hook (if any) within the grace period, then StopContainer
    /// with what is left of it (at least 2 s, as upstream).
    async fn kill(&self, pod: Option<&Pod>, instance: &Instance, grace: i64, reason: &str) {
        let grace = grace.max(2);
        if let Some(pod) = pod {
            self.event(
                pod,
                EventType::Normal,
                "Killing",
                format!("Stopping container {}: {reason}", instance.name),
                Some(&instance.name),
            );
        }
        let started = Instant::now();
        let hook = pod
            .and_then(|p| find_container(p, &instance.name))
            .and_then(|c| c.lifecycle.as_ref())
            .and_then(|l| l.pre_stop.clone());
        if let (Some(hook), Some(pod), RunState::Running) = (hook, pod, instance.state) {
            let ips = self.ips(pod);
            let target = self.target(Some(pod), instance, &ips);
            if let probe::Outcome::Failure(why) =
                probe::run_hook(&target, &hook, Duration::from_secs(grace as u64)).await
            {
                self.event(
                    pod,
                    EventType::Warning,
                    "FailedPreStopHook",
                    format!("PreStopHook failed: {why}"),
                    Some(&instance.name),
                );
            }
        }
        let left = (grace - started.elapsed().as_secs() as i64).max(2);
        if let Ok(mut runtime) = self.shared.cri.runtime().await
            && let Err(status) = runtime
                .stop_container(StopContainerRequest {
                    container_id: instance.id.clone(),
                    timeout: left,
                })
                .await
            && status.code() != tonic::Code::NotFound
        {
            tracing::warn!(container = %instance.id, error = status.message(), "stopping a container failed");
        }
    }

    fn ips(&self, pod: &Pod) -> Vec<String> {
        pod.status
            .as_ref()
            .and_then(|s| s.pod_ips.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|ip| ip.ip)
            .collect()
    }

    async fn stop_everything(&mut self, pod: Option<&Pod>, observed: &Observed, grace: i64) {
        let running: Vec<&Instance> = observed.running().collect();
        futures::future::join_all(running.iter().map(|instance| {
            let grace = if pod.is_some() {
                grace
            } else {
                // An orphan: the grace period its containers were started with.
                grace.min(instance_grace(instance).unwrap_or(grace))
            };
            self.kill(pod, instance, grace, "the pod is terminating")
        }))
        .await;
        if let Ok(mut runtime) = self.shared.cri.runtime().await {
            for sandbox in observed.sandboxes.iter().filter(|s| s.ready) {
                if let Err(status) = runtime
                    .stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: sandbox.id.clone(),
                    })
                    .await
                    && status.code() != tonic::Code::NotFound
                {
                    tracing::warn!(sandbox = %sandbox.id, error = status.message(), "stopping the pod sandbox failed");
                }
            }
        }
    }

    /// Removes every container and sandbox of the pod and its directory, writes the final
    /// status and confirms the deletion to the API.
    async fn remove_everything(&mut self, pod: &Pod) {
        let observed = observe(&self.shared.cri, &self.uid)
            .await
            .unwrap_or_default();
        self.write_status(pod, &observed).await;
        self.purge(&observed).await;
        if let Some(client) = &self.shared.client {
            let api: Api<Pod> = Api::namespaced(
                client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or("default"),
            );
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api
                .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
                .await
            {
                Ok(_) => tracing::info!(pod = %self.uid, "pod deleted"),
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
                Err(error) => {
                    tracing::warn!(pod = %self.uid, %error, "confirming the pod's deletion failed")
                }
            }
        }
        self.shared
            .statuses
            .lock()
            .expect("statuses lock")
            .remove(&self.uid);
    }

    async fn purge(&mut self, observed: &Observed) {
        for (_, prober) in self.probers.drain() {
            prober.abort();
        }
        for instance in &observed.instances {
            self.remove_container(&instance.id).await;
        }
        if let Ok(mut runtime) = self.shared.cri.runtime().await {
            for sandbox in &observed.sandboxes {
                if let Err(status) = runtime
                    .remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: sandbox.id.clone(),
                    })
                    .await
                    && status.code() != tonic::Code::NotFound
                {
                    tracing::warn!(sandbox = %sandbox.id, error = status.message(), "removing the pod sandbox failed");
                }
            }
        }
        volumes::teardown(&self.shared.pod_dir(&self.uid)).await;
        let prefix = format!("{}/", self.uid);
        self.shared
            .tokens
            .lock()
            .expect("tokens lock")
            .retain(|key, _| !key.starts_with(&prefix));
    }

    /// The pod is gone from the API (or was never known: an orphan): stop and remove all of it.
    async fn cleanup(&mut self, last: Option<&Pod>) {
        let observed = match observe(&self.shared.cri, &self.uid).await {
            Ok(observed) => observed,
            Err(error) => {
                tracing::warn!(pod = %self.uid, %error, "reading an orphaned pod's containers failed");
                return;
            }
        };
        let grace = last.map(translate::grace_period).unwrap_or(30);
        self.stop_everything(last, &observed, grace).await;
        self.purge(&observed).await;
        self.shared
            .statuses
            .lock()
            .expect("statuses lock")
            .remove(&self.uid);
        tracing::info!(pod = %self.uid, "removed the containers of a pod that is gone");
    }

    fn sync_probers(&mut self, pod: &Pod, observed: &Observed) {
        let running: Vec<&Instance> = observed
            .instances
            .iter()
            .filter(|i| i.state == RunState::Running)
            .collect();
        let keep: Vec<&str> = running.iter().map(|i| i.id.as_str()).collect();
        self.probers.retain(|id, prober| {
            let alive = keep.contains(&id.as_str());
            if !alive {
                prober.abort();
            }
            alive
        });
        self.verdicts
            .lock()
            .expect("verdicts lock")
            .retain(|id, _| keep.contains(&id.as_str()));
        let runtime_name = self.shared.runtime_name.get().cloned().unwrap_or_default();
        let ips: Vec<String> = observed
            .current()
            .map(|s| s.ips.clone())
            .unwrap_or_default();
        for instance in running {
            if self.probers.contains_key(&instance.id) {
                continue;
            }
            let Some(container) = find_container(pod, &instance.name) else {
                continue;
            };
            // What the previous kubelet reported for this very instance.
            let container_id = format!("{runtime_name}://{}", instance.id);
            let seed = pod
                .status
                .iter()
                .flat_map(|s| {
                    s.container_statuses
                        .iter()
                        .flatten()
                        .chain(s.init_container_statuses.iter().flatten())
                })
                .find(|s| s.container_id.as_deref() == Some(container_id.as_str()))
                .map(|s| Verdict {
                    started: s.started.unwrap_or(false),
                    ready: s.ready,
                    unhealthy: None,
                });
            let target = Target {
                container: container.clone(),
                ..self.target(Some(pod), instance, &ips)
            };
            let handle = probe::spawn(
                target,
                instance.started_at,
                seed,
                self.verdicts.clone(),
                self.wake.clone(),
                self.failures_tx.clone(),
            );
            self.probers.insert(instance.id.clone(), handle);
        }
    }

    async fn ensure_image(
        &mut self,
        pod: &Pod,
        container: &Container,
        sandbox_attempt: u32,
    ) -> Result<String, Waiting> {
        let image = container.image.clone().unwrap_or_default();
        let wait = |reason: &str, message: String| Waiting {
            reason: reason.into(),
            message,
        };
        if image.is_empty() {
            return Err(wait(
                "InvalidImageName",
                "the container has no image".into(),
            ));
        }
        let policy = container
            .image_pull_policy
            .clone()
            .unwrap_or_else(|| default_pull_policy(&image).into());
        let spec = ImageSpec {
            image: image.clone(),
            ..Default::default()
        };
        let mut images = self
            .shared
            .cri
            .images()
            .await
            .map_err(|e| wait("ErrImagePull", e.to_string()))?;
        let present = images
            .image_status(ImageStatusRequest {
                image: Some(spec.clone()),
                verbose: false,
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().image)
            .map(|i| i.id);
        match (policy.as_str(), present) {
            ("Always", _) => {}
            (_, Some(id)) => return Ok(id),
            ("Never", None) => {
                let message =
                    format!("Container image {image:?} is not present with pull policy of Never");
                self.event(
                    pod,
                    EventType::Warning,
                    "ErrImageNeverPull",
                    message.clone(),
                    Some(&container.name),
                );
                return Err(wait("ErrImageNeverPull", message));
            }
            _ => {}
        }
        let key = format!("{}/image/{image}", self.uid);
        if self.image_backoff.pending(&key, now_ns()).is_some() {
            let message = format!("Back-off pulling image {image:?}");
            self.event(
                pod,
                EventType::Normal,
                "BackOff",
                message.clone(),
                Some(&container.name),
            );
            return Err(wait("ImagePullBackOff", message));
        }
        self.event(
            pod,
            EventType::Normal,
            "Pulling",
            format!("Pulling image {image:?}"),
            Some(&container.name),
        );
        let started = Instant::now();
        let sandbox_config =
            translate::sandbox_config(pod, &self.shared.node, sandbox_attempt).ok();
        match images
            .pull_image(PullImageRequest {
                image: Some(spec),
                auth: None,
                sandbox_config,
            })
            .await
        {
            Ok(reply) => {
                self.event(
                    pod,
                    EventType::Normal,
                    "Pulled",
                    format!(
                        "Successfully pulled image {image:?} in {:.3}s",
                        started.elapsed().as_secs_f64()
                    ),
                    Some(&container.name),
                );
                Ok(reply.into_inner().image_ref)
            }
            Err(status) => {
                self.image_backoff.next(&key, now_ns());
                let message = format!("Failed to pull image {image:?}: {}", status.message());
                self.event(
                    pod,
                    EventType::Warning,
                    "Failed",
                    message.clone(),
                    Some(&container.name),
                );
                Err(wait("ErrImagePull", message))
            }
        }
    }

    async fn environment(
        &self,
        pod: &Pod,
        container: &Container,
        pod_ips: &[String],
    ) -> Result<Vec<(String, String)>, String> {
        let (maps, secrets) = env::referenced(container);
        let mut sources = Sources::default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        for name in maps {
            let found = volumes::fetch::<ConfigMap>(&self.shared, &namespace, &name).await?;
            sources.config_maps.insert(name, found);
        }
        for name in secrets {
            let found = volumes::fetch::<Secret>(&self.shared, &namespace, &name).await?;
            sources.secrets.insert(name, found);
        }
        sources.services = self.linked_services(pod, &namespace).await?;
        let facts = Facts {
            pod_ips: if pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false)
            {
                self.shared.host_ips.clone()
            } else {
                pod_ips.to_vec()
            },
            host_ips: self.shared.host_ips.clone(),
            allocatable_millicpu: self.shared.allocatable.0,
            allocatable_memory: self.shared.allocatable.1,
        };
        env::resolve(pod, container, &sources, &facts)
    }

    /// The Services whose variables the pod's containers get (none in standalone mode).
    async fn linked_services(&self, pod: &Pod, namespace: &str) -> Result<Vec<Service>, String> {
        let Some(client) = &self.shared.client else {
            return Ok(Vec::new());
        };
        let links = pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let in_namespace = if links {
            kube::Api::<Service>::namespaced(client.clone(), namespace)
                .list(&Default::default())
                .await
                .map_err(|e| {
                    format!("list the Services of namespace {namespace} for service links: {e}")
                })?
                .items
        } else {
            Vec::new()
        };
        let master = volumes::fetch::<Service>(&self.shared, "default", "kubernetes").await?;
        Ok(env::linked_services(pod, in_namespace, master))
    }

    /// A container that could not start: a Warning event and the waiting reason it shows.
    fn failed(&self, pod: &Pod, container: &str, reason: &str, message: &str) -> Waiting {
        self.event(
            pod,
            EventType::Warning,
            "Failed",
            format!("Error: {message}"),
            Some(container),
        );
        Waiting {
            reason: reason.into(),
            message: message.to_owned(),
        }
    }

    async fn start(
        &mut self,
        pod: &Pod,
        observed: &Observed,
        start: &Start,
    ) -> Result<(), Waiting> {
        let config_error = |message: String| Waiting {
            reason: CONFIG_ERROR.into(),
            message,
        };
        let Some(container) = find_container(pod, &start.name).cloned() else {
            return Ok(());
        };
        let Some(sandbox) = observed.current().filter(|s| s.ready).cloned() else {
            return Ok(());
        };
        let image_ref = self.ensure_image(pod, &container, sandbox.attempt).await?;
        let wants_non_root = container
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root)
            .or(pod
                .spec
                .as_ref()
                .and_then(|s| s.security_context.as_ref())
                .and_then(|s| s.run_as_non_root))
            .unwrap_or(false);
        if wants_non_root {
            let image = async {
                let mut images = self.shared.cri.images().await.ok()?;
                images
                    .image_status(ImageStatusRequest {
                        image: Some(ImageSpec {
                            image: image_ref.clone(),
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .image
            }
            .await;
            let uid = image.as_ref().and_then(|i| i.uid.map(|u| u.value));
            let user = image.map(|i| i.username).unwrap_or_default();
            if let Err(error) = translate::verify_non_root(pod, &container, uid, &user) {
                return Err(self.failed(pod, &container.name, CONFIG_ERROR, &error.0));
            }
        }
        let env = match self.environment(pod, &container, &sandbox.ips).await {
            Ok(env) => env,
            Err(message) => return Err(self.failed(pod, &container.name, CONFIG_ERROR, &message)),
        };
        let pod_dir = self.shared.pod_dir(&self.uid);
        let mounts =
            match volumes::mounts(&self.shared, pod, &container, start.attempt, &sandbox.ips).await
            {
                Ok(mounts) => mounts,
                Err(message) => {
                    self.event(
                        pod,
                        EventType::Warning,
                        "FailedMount",
                        message.clone(),
                        Some(&container.name),
                    );
                    return Err(config_error(message));
                }
            };
        let _ = pod_dir;
        let config = translate::container_config(
            pod,
            &container,
            start.attempt,
            &self.shared.node,
            ContainerInputs {
                image_ref,
                env,
                mounts,
            },
        )
        .map_err(|e| config_error(e.0))?;
        let sandbox_config = translate::sandbox_config(pod, &self.shared.node, sandbox.attempt)
            .map_err(|e| config_error(e.0))?;
        let mut runtime = self.shared.cri.runtime().await.map_err(|e| Waiting {
            reason: "CreateContainerError".into(),
            message: e.to_string(),
        })?;
        let created = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await;
        let id = match created {
            Ok(reply) => reply.into_inner().container_id,
            Err(status) => {
                return Err(self.failed(
                    pod,
                    &container.name,
                    "CreateContainerError",
                    status.message(),
                ));
            }
        };
        self.event(
            pod,
            EventType::Normal,
            "Created",
            format!("Created container: {}", container.name),
            Some(&container.name),
        );
        let container_type = if pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|init| init.iter().any(|c| c.name == container.name))
        {
            "init_container"
        } else {
            "container"
        };
        let metrics = self.shared.cri.metrics();
        metrics.inc(
            "kubelet_started_containers_total",
            &[("container_type", container_type)],
        );
        if let Err(status) = runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
        {
            metrics.inc(
                "kubelet_started_containers_errors_total",
                &[
                    ("code", &format!("{:?}", status.code())),
                    ("container_type", container_type),
                ],
            );
            return Err(self.failed(pod, &container.name, "RunContainerError", status.message()));
        }
        self.event(
            pod,
            EventType::Normal,
            "Started",
            format!("Started container {}", container.name),
            Some(&container.name),
        );
        if let Some(hook) = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.clone())
        {
            let instance = Instance {
                id: id.clone(),
                sandbox_id: sandbox.id.clone(),
                name: container.name.clone(),
                attempt: start.attempt,
                state: RunState::Running,
                created_at: now_ns(),
                started_at: now_ns(),
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
                message: String::new(),
                image: String::new(),
                image_ref: String::new(),
                hash: String::new(),
                log_path: String::new(),
                grace: None,
            };
            let target = self.target(Some(pod), &instance, &sandbox.ips);
            let grace = translate::grace_period(pod);
            if let probe::Outcome::Failure(why) =
                probe::run_hook(&target, &hook, Duration::from_secs(grace.max(2) as u64)).await
            {
                self.event(
                    pod,
                    EventType::Warning,
                    "FailedPostStartHook",
                    format!("PostStartHook failed: {why}"),
                    Some(&container.name),
                );
                self.kill(Some(pod), &instance, grace, "FailedPostStartHook")
                    .await;
            }
        }
        Ok(())
    }

    /// Brings ConfigMap, Secret, projected and downward API volume contents of a running pod up
    /// to date (atomically; unchanged content is not rewritten), once per sync period.
    async fn refresh_volumes(&mut self, pod: &Pod, observed: &Observed) {
        if observed.running().next().is_none() {
            return;
        }
        let due = self
            .volumes_refreshed
            .is_none_or(|at| at.elapsed() >= self.shared.sync_frequency);
        if !due {
            return;
        }
        self.volumes_refreshed = Some(Instant::now());
        if let Err(error) = volumes::refresh(&self.shared, pod).await {
            self.event(pod, EventType::Warning, "FailedMount", error, None);
        }
    }

    /// Shows the pod's status and writes it to the API if it changed; `false` if that write
    /// failed (and is still to be done).
    async fn write_status(&mut self, pod: &Pod, observed: &Observed) -> bool {
        let runtime_name = match self
            .shared
            .runtime_name
            .get_or_try_init(|| self.shared.cri.runtime_name())
            .await
        {
            Ok(name) => name.clone(),
            Err(_) => "unknown".into(),
        };
        let probes: HashMap<String, ProbeView> = self
            .verdicts
            .lock()
            .expect("verdicts lock")
            .iter()
            .map(|(id, v)| {
                (
                    id.clone(),
                    ProbeView {
                        started: v.started,
                        ready: v.ready && v.unhealthy.is_none(),
                    },
                )
            })
            .collect();
        let mut waiting = self.start_errors.clone();
        waiting.extend(self.backoff_waits.clone());
        let messages = volumes::termination_messages(&self.shared, pod, observed);
        let now = Time(jiff::Timestamp::now());
        if let Some(sandbox) = observed.current().filter(|s| s.ready && !s.ips.is_empty()) {
            self.sandbox_ips = sandbox.ips.clone();
        }
        let new = status::pod_status(&status::Inputs {
            pod,
            observed,
            waiting: &waiting,
            probes: &probes,
            messages: &messages,
            runtime_name: &runtime_name,
            host_ips: &self.shared.host_ips,
            last_ips: &self.sandbox_ips,
            now: &now,
        });
        let mut shown = pod.clone();
        shown.status = Some(new.clone());
        self.shared
            .statuses
            .lock()
            .expect("statuses lock")
            .insert(self.uid.clone(), shown);
        let Some(client) = &self.shared.client else {
            return true;
        };
        // A static pod's status goes to its mirror pod, once there is one.
        let (target_uid, old) = if super::static_pods::is_static(pod) {
            let mirrors = self.shared.mirrors.lock().expect("mirrors lock");
            let Some(mirror) = mirrors.get(&self.uid) else {
                return true;
            };
            (
                mirror.metadata.uid.clone().unwrap_or_default(),
                mirror.status.clone().unwrap_or_default(),
            )
        } else {
            let old = self.api_status.clone();
            (
                self.uid.clone(),
                old.unwrap_or_else(|| pod.status.clone().unwrap_or_default()),
            )
        };
        let written = Some((target_uid.clone(), new.clone()));
        if self.written == written {
            return true;
        }
        let Some(mut patch) = status::patch(&old, &new) else {
            self.written = written;
            return true;
        };
        patch["metadata"] = serde_json::json!({ "uid": target_uid });
        let api: Api<Pod> = Api::namespaced(
            client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        match crate::register::bounded(api.patch_status(
            pod.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        ))
        .await
        {
            Ok(_) => {
                self.written = written;
                self.status_failures = 0;
                true
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => true,
            Err(error) => {
                self.status_failures += 1;
                tracing::warn!(pod = %self.uid, %error, "writing the pod status failed; retrying");
                false
            }
        }
    }
}

/// The waiting reason of a container whose configuration cannot be made.
const CONFIG_ERROR: &str = "CreateContainerConfigError";

/// Ends the sync loop: the pod is gone.
struct Gone;

fn instance_grace(instance: &Instance) -> Option<i64> {
    instance.grace
}

/// `Always` for `:latest` or untagged images, else `IfNotPresent` (the apiserver's default).
pub fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}
