//! Running the pods bound to this node.
//!
//! The manager watches the pods with `spec.nodeName=<node>` and gives each its own
//! [`worker::Worker`], which drives the state machine of [`plan`] (sandbox → images → init
//! containers in order → containers; restarts with back-off; termination with preStop and the
//! grace period; deletion confirmed only when everything is gone) and writes the status of
//! [`status`]. Changes in the runtime reach the workers through a relist of the runtime's
//! sandboxes and containers (the PLEG), and through the runtime's container event stream when
//! it has one, so a relist is only the safety net. After the first complete pod list, anything
//! in the runtime that belongs to no pod is stopped and removed.
//!
//! Everything a worker knows about its containers it reads back from the runtime, so a
//! restarted kubelet adopts running pods as they are: nothing is restarted or started twice,
//! and readiness resumes from the status the previous kubelet wrote.

pub mod env;
pub mod logs;
pub mod observed;
pub mod plan;
pub mod probe;
pub mod quantity;
pub mod static_pods;
pub mod status;
pub mod translate;
pub mod volumes;
pub mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_cri::v1::{GetEventsRequest, ListContainersRequest, ListPodSandboxRequest};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use tokio::sync::{Notify, watch};

use crate::runtime::Cri;
use translate::{NodeContext, POD_UID};
use worker::{Shared, Worker};

/// What the pod manager needs.
#[derive(Debug, Clone)]
pub struct PodManagerConfig {
    /// This node's name.
    pub node_name: String,
    /// This node's IPs (status.hostIPs).
    pub host_ips: Vec<String>,
    /// Node facts for translation (DNS, logs, cgroups, seccomp).
    pub node: NodeContext,
    /// The kubelet's root dir (`/var/lib/kubelet`).
    pub root_dir: PathBuf,
    /// Allocatable CPU (millicores) and memory (bytes).
    pub allocatable: (i64, i64),
    /// How often the runtime is relisted when it streams no events (1 s, upstream's PLEG);
    /// with events, ten times that.
    pub relist: Duration,
    /// The static pod manifest directory, if any.
    pub static_pod_path: Option<PathBuf>,
    /// How often every pod is synced even without a change (`syncFrequency`, 1 m): volume
    /// contents are refreshed then.
    pub sync_frequency: Duration,
}

struct Handle {
    updates: watch::Sender<Option<Pod>>,
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// The pods the kubelet runs, as it last reported them (for the kubelet API).
pub type Statuses = Arc<Shared>;

struct Manager {
    shared: Arc<Shared>,
    workers: HashMap<String, Handle>,
    statics: HashSet<String>,
}

impl Manager {
    fn apply(&mut self, pod: Pod) {
        if static_pods::is_mirror(&pod) {
            let hash = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(static_pods::CONFIG_MIRROR))
                .cloned()
                .unwrap_or_default();
            let new = self
                .shared
                .mirrors
                .lock()
                .expect("mirrors lock")
                .insert(hash.clone(), pod.clone())
                .is_none_or(|old| old.metadata.uid != pod.metadata.uid);
            if new {
                // A new mirror pod needs the static pod's status.
                self.wake(&hash);
            }
            return;
        }
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if let Some(handle) = self.workers.get(&uid)
            && !handle.task.is_finished()
        {
            // A change of status only (most often the kubelet's own write coming back) does
            // not wake the worker; it reads the new status at its next sync.
            handle.updates.send_if_modified(|current| {
                let wake = current.as_ref().is_none_or(|old| wakes(old, &pod));
                *current = Some(pod);
                wake
            });
            return;
        }
        // A pod already confirmed deleted may still show up (a late event): nothing to run.
        if pod.metadata.deletion_timestamp.is_some() && self.workers.contains_key(&uid) {
            return;
        }
        self.spawn(uid, Some(pod));
    }

    fn spawn(&mut self, uid: String, pod: Option<Pod>) {
        let (updates, receiver) = watch::channel(pod);
        let wake = Arc::new(Notify::new());
        let worker = Worker::new(self.shared.clone(), uid.clone(), wake.clone());
        self.shared
            .wakes
            .lock()
            .expect("wakes lock")
            .insert(uid.clone(), wake.clone());
        let task = tokio::spawn(worker.run(receiver));
        self.workers.insert(
            uid,
            Handle {
                updates,
                wake,
                task,
            },
        );
    }

    fn delete(&mut self, pod: &Pod) {
        if static_pods::is_mirror(pod) {
            let mut mirrors = self.shared.mirrors.lock().expect("mirrors lock");
            mirrors.retain(|_, m| m.metadata.uid != pod.metadata.uid);
            return;
        }
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        if let Some(handle) = self.workers.get(uid) {
            handle.updates.send_replace(None);
        }
    }

    fn wake(&self, uid: &str) {
        if let Some(handle) = self.workers.get(uid) {
            handle.wake.notify_one();
        }
    }

    /// Pods in the runtime that no worker owns: stop and remove them.
    fn adopt_orphans(&mut self, uids: &HashSet<String>) {
        for uid in uids {
            if !self.workers.contains_key(uid) {
                tracing::info!(pod = %uid, "the runtime has containers of a pod that is not bound to this node; removing them");
                self.spawn(uid.clone(), None);
            }
        }
    }

    /// Brings the static pods in line with the manifest directory.
    fn sync_static(&mut self, dir: &std::path::Path, reported: &mut HashSet<String>) {
        let (pods, errors) = static_pods::load_dir(dir, &self.shared.node_name);
        for (path, error) in errors {
            if reported.insert(format!("{}:{error}", path.display())) {
                tracing::warn!(file = %path.display(), %error, "ignoring a static pod manifest");
            }
        }
        let wanted: HashSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let stale: Vec<String> = self
            .statics
            .iter()
            .filter(|uid| !wanted.contains(*uid))
            .cloned()
            .collect();
        for uid in stale {
            tracing::info!(pod = %uid, "static pod manifest removed or changed; stopping its pod");
            if let Some(handle) = self.workers.get(&uid) {
                handle.updates.send_replace(None);
            }
            self.statics.remove(&uid);
        }
        for pod in pods {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if self.statics.insert(uid.clone()) {
                tracing::info!(pod = ?pod.metadata.name, %uid, "static pod from its manifest");
                self.spawn(uid, Some(pod));
            }
        }
        *self.shared.static_pods.lock().expect("static lock") = self
            .workers
            .iter()
            .filter(|(uid, _)| self.statics.contains(*uid))
            .filter_map(|(_, h)| h.updates.borrow().clone())
            .collect();
    }

    fn reap(&mut self) {
        let metrics = self.shared.cri.metrics().clone();
        self.workers.retain(|uid, h| {
            let running = !h.task.is_finished();
            if !running {
                metrics.forget("pod_uid", uid);
                self.shared.wakes.lock().expect("wakes lock").remove(uid);
                self.shared
                    .evictions
                    .lock()
                    .expect("evictions lock")
                    .remove(uid);
            }
            running
        });
    }
}

/// Keeps one mirror pod per static pod in the API, and none for static pods that are gone.
async fn sync_mirrors(shared: &Shared, client: &kube::Client) {
    let statics: Vec<Pod> = shared.static_pods.lock().expect("static lock").clone();
    let mirrors: Vec<Pod> = shared
        .mirrors
        .lock()
        .expect("mirrors lock")
        .values()
        .cloned()
        .collect();
    let node_uid = async {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        nodes
            .get_opt(&shared.node_name)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.metadata.uid)
    };
    let mut node_uid_cache = None;
    let mut node_uid = Some(node_uid);
    for mirror in &mirrors {
        let hash = mirror
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(static_pods::CONFIG_MIRROR));
        let current = statics.iter().any(|p| {
            static_pods::hash(p) == hash.map(String::as_str)
                && p.metadata.name == mirror.metadata.name
        });
        if !current {
            let api: Api<Pod> = Api::namespaced(
                client.clone(),
                mirror.metadata.namespace.as_deref().unwrap_or("default"),
            );
            let params = kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(kube::api::Preconditions {
                    uid: mirror.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            if let Err(error) = api
                .delete(mirror.metadata.name.as_deref().unwrap_or_default(), &params)
                .await
            {
                tracing::debug!(%error, "deleting a stale mirror pod failed");
            }
        }
    }
    for pod in &statics {
        let hash = static_pods::hash(pod).unwrap_or_default();
        if mirrors.iter().any(|m| {
            m.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(static_pods::CONFIG_MIRROR))
                .map(String::as_str)
                == Some(hash)
        }) {
            continue;
        }
        if node_uid_cache.is_none()
            && let Some(lookup) = node_uid.take()
        {
            node_uid_cache = Some(lookup.await);
        }
        let mirror = static_pods::mirror(
            pod,
            &shared.node_name,
            node_uid_cache.clone().flatten().as_deref(),
        );
        let api: Api<Pod> = Api::namespaced(
            client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        match api.create(&kube::api::PostParams::default(), &mirror).await {
            Ok(_) => tracing::info!(pod = ?pod.metadata.name, "created the mirror pod"),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => {
                tracing::warn!(pod = ?pod.metadata.name, %error, "creating the mirror pod failed; retrying")
            }
        }
    }
}

/// Whether an update of a pod is one its worker must act on: anything but its status.
fn wakes(old: &Pod, new: &Pod) -> bool {
    let (a, b) = (&old.metadata, &new.metadata);
    old.spec != new.spec
        || a.labels != b.labels
        || a.annotations != b.annotations
        || a.deletion_timestamp != b.deletion_timestamp
        || a.deletion_grace_period_seconds != b.deletion_grace_period_seconds
}

/// How the pod watch retries while the API server is unreachable: after 200 ms, doubling, at
/// most 5 s (as the Lease is retried), and from 200 ms again once anything comes through. So
/// pods bound meanwhile are seen within moments of its return, with no more than one attempt
/// every 5 s while it is gone.
#[derive(Debug, Default)]
struct WatchBackoff(u32);

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.0 = self.0.saturating_add(1);
        Some(crate::register::retry_after(self.0, Duration::from_secs(5)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// A fingerprint per pod UID of what the runtime runs: container ids and states, sandbox ids
/// and states.
async fn relist(cri: &Cri) -> Option<BTreeMap<String, Vec<(String, i32)>>> {
    let mut runtime = cri.runtime().await.ok()?;
    let sandboxes = runtime
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .ok()?
        .into_inner()
        .items;
    let containers = runtime
        .list_containers(ListContainersRequest { filter: None })
        .await
        .ok()?
        .into_inner()
        .containers;
    let mut out: BTreeMap<String, Vec<(String, i32)>> = BTreeMap::new();
    for sandbox in sandboxes {
        if let Some(uid) = sandbox.labels.get(POD_UID) {
            out.entry(uid.clone())
                .or_default()
                .push((sandbox.id, sandbox.state));
        }
    }
    for container in containers {
        if let Some(uid) = container.labels.get(POD_UID) {
            out.entry(uid.clone())
                .or_default()
                .push((container.id, container.state));
        }
    }
    for entries in out.values_mut() {
        entries.sort();
    }
    Some(out)
}

/// What the workers share, from the configuration, the API client (none when standalone) and
/// the runtime.
pub fn shared(config: &PodManagerConfig, client: Option<kube::Client>, cri: Cri) -> Arc<Shared> {
    let recorder = client.clone().map(|c| {
        Recorder::new(
            c,
            Reporter {
                controller: "kubelet".into(),
                instance: Some(config.node_name.clone()),
            },
        )
    });
    Arc::new(Shared {
        cri,
        node: config.node.clone(),
        node_name: config.node_name.clone(),
        host_ips: config.host_ips.clone(),
        root_dir: config.root_dir.clone(),
        client,
        recorder,
        runtime_name: tokio::sync::OnceCell::new(),
        allocatable: config.allocatable,
        statuses: Default::default(),
        mirrors: Default::default(),
        static_pods: Default::default(),
        tokens: Default::default(),
        sync_frequency: config.sync_frequency,
        rates: Default::default(),
        pressures: Default::default(),
        evictions: Default::default(),
        wakes: Default::default(),
    })
}

/// Runs the pods bound to this node until `shutdown`. Pods keep running when it returns.
pub async fn run(
    config: PodManagerConfig,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) {
    let client = shared.client.clone();
    let cri = shared.cri.clone();
    let mut manager = Manager {
        shared: shared.clone(),
        workers: HashMap::new(),
        statics: HashSet::new(),
    };
    let mut reported = HashSet::new();
    if let Some(dir) = &config.static_pod_path {
        manager.sync_static(dir, &mut reported);
    }
    let mut static_tick = tokio::time::interval(Duration::from_secs(2));
    tokio::pin!(shutdown);

    // Pods from the API.
    let mut pods = match &client {
        Some(client) => {
            let api: Api<Pod> = Api::all(client.clone());
            let selector = format!("spec.nodeName={}", config.node_name);
            watcher(api, watcher::Config::default().fields(&selector))
                .backoff(WatchBackoff::default())
                .boxed()
        }
        None => futures::stream::pending().boxed(),
    };
    // Runtime events, when the runtime streams them.
    let (events_tx, mut events) = tokio::sync::mpsc::channel::<String>(256);
    let streaming = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let cri = cri.clone();
        let streaming = streaming.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(mut runtime) = cri.runtime().await
                    && let Ok(stream) = runtime.get_container_events(GetEventsRequest {}).await
                {
                    let mut stream = stream.into_inner();
                    streaming.store(true, std::sync::atomic::Ordering::Relaxed);
                    while let Some(Ok(event)) = stream.next().await {
                        let uid = event
                            .pod_sandbox_status
                            .and_then(|s| s.metadata)
                            .map(|m| m.uid);
                        if let Some(uid) = uid
                            && events_tx.send(uid).await.is_err()
                        {
                            return;
                        }
                    }
                    streaming.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
    let mut listed = client.is_none();
    let mut initial: Vec<Pod> = Vec::new();
    let mut previous: BTreeMap<String, Vec<(String, i32)>> = BTreeMap::new();
    let mut next_relist = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = pods.next() => match event {
                Some(Ok(watcher::Event::Apply(pod))) => manager.apply(pod),
                Some(Ok(watcher::Event::Delete(pod))) => manager.delete(&pod),
                Some(Ok(watcher::Event::Init)) => initial.clear(),
                Some(Ok(watcher::Event::InitApply(pod))) => initial.push(pod),
                Some(Ok(watcher::Event::InitDone)) => {
                    let present: HashSet<String> = initial.iter().filter_map(|p| p.metadata.uid.clone()).collect();
                    // Pods deleted while the watch was down.
                    let gone: Vec<String> = manager
                        .workers
                        .keys()
                        .filter(|uid| !present.contains(*uid) && !manager.statics.contains(*uid))
                        .cloned()
                        .collect();
                    shared.mirrors.lock().expect("mirrors lock").clear();
                    for uid in gone {
                        if let Some(handle) = manager.workers.get(&uid) {
                            handle.updates.send_replace(None);
                        }
                    }
                    for pod in std::mem::take(&mut initial) {
                        manager.apply(pod);
                    }
                    if !listed {
                        listed = true;
                        next_relist = tokio::time::Instant::now();
                    }
                }
                // The stream waits out its backoff itself, so runtime events, static pods and
                // the relist go on meanwhile.
                Some(Err(error)) => {
                    tracing::warn!(%error, "watching this node's pods failed; retrying");
                }
                None => break,
            },
            Some(uid) = events.recv() => manager.wake(&uid),
            _ = static_tick.tick(), if config.static_pod_path.is_some() => {
                if let Some(dir) = &config.static_pod_path {
                    manager.sync_static(dir, &mut reported);
                }
                if listed && let Some(client) = &client {
                    sync_mirrors(&shared, client).await;
                }
            }
            () = tokio::time::sleep_until(next_relist) => {
                let period = if streaming.load(std::sync::atomic::Ordering::Relaxed) { config.relist * 10 } else { config.relist };
                next_relist = tokio::time::Instant::now() + period;
                manager.reap();
                let Some(current) = relist(&cri).await else { continue };
                for (uid, entries) in &current {
                    if previous.get(uid) != Some(entries) {
                        manager.wake(uid);
                    }
                }
                if listed {
                    let uids: HashSet<String> = current.keys().cloned().collect();
                    manager.adopt_orphans(&uids);
                }
                previous = current;
            }
        }
    }
    for (_, handle) in manager.workers.drain() {
        handle.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn the_pod_watch_backs_off_to_5_s_and_starts_over_once_something_comes_through() {
        let mut backoff = WatchBackoff::default();
        let waits: Vec<u128> = backoff.by_ref().take(7).map(|d| d.as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(200)));
    }
}
