//! `tug proxy`'s loop: watch Services and EndpointSlices into local stores, and after each burst
//! of changes (at most once per `min_sync_period`) and periodically, rebuild the model and let
//! the backend apply the difference. The first sync waits until both watches have listed
//! everything. While the API server is unreachable nothing is touched: the rules stay as they
//! are. Also serves `/healthz` (and `/livez`) and Prometheus `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::{BackendError, RuleBackend};
use crate::iptables::SyncReport;
use crate::model::{Model, NodeContext, ServicePort, object_key};

/// How `tug proxy` runs.
#[derive(Debug)]
pub struct ProxyConfig {
    /// This node's name.
    pub node_name: String,
    /// The NodePort range.
    pub node_port_range: (u16, u16),
    /// The rule backends (one per family), already configured.
    pub backends: Vec<Box<dyn RuleBackend>>,
    /// Shortest time between two syncs (upstream `minSyncPeriod`).
    pub min_sync_period: Duration,
    /// Longest time between two syncs (upstream `syncPeriod`).
    pub sync_period: Duration,
    /// Time between full syncs.
    pub full_sync_period: Duration,
    /// Where `/healthz` is served (upstream port 10256).
    pub healthz_address: Option<SocketAddr>,
    /// Where `/metrics` is served (upstream 127.0.0.1:10249).
    pub metrics_address: Option<SocketAddr>,
}

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A health or metrics address could not be bound. Not retryable.
    #[error("listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Sync figures, shared with the HTTP endpoints.
#[derive(Debug, Default)]
struct Stats {
    last_success: Option<SystemTime>,
    last_attempt_failed: bool,
    syncs: u64,
    full_syncs: u64,
    errors: u64,
    duration_sum: f64,
    last_duration: f64,
    service_chains: usize,
    service_ports: usize,
    skipped: usize,
}

type Shared = Arc<Mutex<Stats>>;

/// Follows one watch, turning its events into changes for the model: each (key, new object or
/// `None` when it is gone). A relist becomes the differences from what the model has, so
/// resuming a watch costs the objects that changed, not all of them.
struct Watched<K> {
    initial: BTreeMap<String, K>,
    synced: bool,
}

impl<K: kube::Resource> Watched<K> {
    fn new() -> Watched<K> {
        Watched {
            initial: BTreeMap::new(),
            synced: false,
        }
    }

    /// Applies one watch event, given the objects as the model has them.
    fn apply(
        &mut self,
        event: Event<K>,
        current: &BTreeMap<String, K>,
    ) -> Vec<(String, Option<K>)> {
        match event {
            Event::Init => {
                self.initial.clear();
                Vec::new()
            }
            Event::InitApply(item) => {
                self.initial.insert(object_key(item.meta()), item);
                Vec::new()
            }
            Event::InitDone => {
                self.synced = true;
                let listed = std::mem::take(&mut self.initial);
                let mut changes: Vec<(String, Option<K>)> = current
                    .keys()
                    .filter(|key| !listed.contains_key(*key))
                    .map(|key| (key.clone(), None))
                    .collect();
                for (key, item) in listed {
                    let version = |o: &K| o.meta().resource_version.clone();
                    let same = current.get(&key).is_some_and(|old| {
                        version(old).is_some() && version(old) == version(&item)
                    });
                    if !same {
                        changes.push((key, Some(item)));
                    }
                }
                changes
            }
            Event::Apply(item) => vec![(object_key(item.meta()), Some(item))],
            Event::Delete(item) => vec![(object_key(item.meta()), None)],
        }
    }
}

fn metrics_text(stats: &Stats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "tug_proxy_syncs_total",
        "counter",
        "Rule syncs applied.",
        stats.syncs.to_string(),
    );
    metric(
        "tug_proxy_full_syncs_total",
        "counter",
        "Full rule syncs applied.",
        stats.full_syncs.to_string(),
    );
    metric(
        "tug_proxy_sync_errors_total",
        "counter",
        "Rule syncs that failed.",
        stats.errors.to_string(),
    );
    metric(
        "tug_proxy_sync_duration_seconds_sum",
        "counter",
        "Total time spent syncing rules.",
        format!("{:.6}", stats.duration_sum),
    );
    metric(
        "tug_proxy_last_sync_duration_seconds",
        "gauge",
        "Duration of the last sync.",
        format!("{:.6}", stats.last_duration),
    );
    metric(
        "tug_proxy_last_sync_timestamp_seconds",
        "gauge",
        "When rules were last synced successfully.",
        stats
            .last_success
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or("0".into(), |d| d.as_secs().to_string()),
    );
    metric(
        "tug_proxy_service_ports",
        "gauge",
        "Service ports programmed.",
        stats.service_ports.to_string(),
    );
    metric(
        "tug_proxy_service_chains",
        "gauge",
        "Per-service chains in place.",
        stats.service_chains.to_string(),
    );
    metric(
        "tug_proxy_skipped_service_ports",
        "gauge",
        "Services or ports left out for invalid input.",
        stats.skipped.to_string(),
    );
    out
}

/// The `/healthz` answer: healthy while the last sync succeeded and is recent.
fn health(stats: &Stats, sync_period: Duration) -> (u16, String) {
    let now = SystemTime::now();
    let fresh = stats.last_success.is_some_and(|t| {
        now.duration_since(t).unwrap_or_default() <= (sync_period * 2).max(Duration::from_secs(60))
    });
    let healthy = fresh && !stats.last_attempt_failed;
    let stamp = |t: SystemTime| {
        jiff::Timestamp::try_from(t)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let body = format!(
        "{{\"lastUpdated\": \"{}\", \"currentTime\": \"{}\", \"nodeEligible\": true}}",
        stats.last_success.map(stamp).unwrap_or_default(),
        stamp(now)
    );
    (if healthy { 200 } else { 503 }, body)
}

async fn serve_http(
    address: SocketAddr,
    stats: Shared,
    sync_period: Duration,
    mode: &'static str,
) -> Result<tokio::task::JoinHandle<()>, ProxyError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| ProxyError::Listen { address, source })?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, kind, body) = {
                    let stats = stats.lock().unwrap_or_else(|p| p.into_inner());
                    match path.as_str() {
                        "/healthz" | "/livez" => {
                            let (status, body) = health(&stats, sync_period);
                            (status, "application/json", body)
                        }
                        "/metrics" => (200, "text/plain; version=0.0.4", metrics_text(&stats)),
                        "/proxyMode" => (200, "text/plain", mode.to_owned()),
                        _ => (404, "text/plain", "404 page not found\n".to_owned()),
                    }
                };
                let reason = match status {
                    200 => "OK",
                    503 => "Service Unavailable",
                    _ => "Not Found",
                };
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    }))
}

/// The ClusterRole that lets a proxy read what it needs (upstream's, bound to kube-proxy's
/// service account by kubeadm).
pub const PROXIER_ROLE: &str = "system:node-proxier";

/// The one command that lets every node's own identity act as a proxy.
pub const BIND_NODES_AS_PROXIERS: &str = "kubectl create clusterrolebinding tug-node-proxier --clusterrole=system:node-proxier --group=system:nodes";

/// Logs a failed list or watch; a refusal names the permission and the fix, since retrying
/// alone never heals it.
fn watch_failed(what: &str, error: &watcher::Error) {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    };
    if status == Some(403) {
        tracing::error!(
            %error,
            "this proxy's identity may not list and watch {what}, so no rules are synced until it can: bind the {PROXIER_ROLE} ClusterRole to it (for node identities, on the control plane: {BIND_NODES_AS_PROXIERS}); retrying with back-off"
        );
    } else {
        tracing::warn!(%error, "watching {what} failed; retrying with back-off, rules stay as they are");
    }
}

/// Where the proxy's Services and EndpointSlices come from.
pub enum Source {
    /// Watches on an API server.
    Cluster(kube::Client),
    /// Local manifests and the local kubelet's pods (no API server).
    Standalone(crate::standalone::Standalone),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Cluster(_) => f.write_str("Cluster"),
            Source::Standalone(s) => f.debug_tuple("Standalone").field(s).finish(),
        }
    }
}

/// Runs the proxy on `source` until `shutdown` resolves. Rules are left in place on exit
/// (as upstream does), so a restart does not interrupt traffic.
pub async fn run(
    config: ProxyConfig,
    source: Source,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let stats: Shared = Arc::default();
    let mut servers = Vec::new();
    for address in [config.healthz_address, config.metrics_address]
        .into_iter()
        .flatten()
    {
        let mode = config.backends.first().map_or("none", |b| b.mode());
        servers.push(serve_http(address, stats.clone(), config.sync_period, mode).await?);
    }
    let (recorder, mut service_events, mut slice_events) = match source {
        Source::Cluster(client) => (
            Some(Recorder::new(
                client.clone(),
                Reporter {
                    controller: "tug-proxy".into(),
                    instance: Some(config.node_name.clone()),
                },
            )),
            watcher::watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .boxed(),
            watcher::watcher(
                Api::<EndpointSlice>::all(client),
                watcher::Config::default(),
            )
            .default_backoff()
            .boxed(),
        ),
        Source::Standalone(standalone) => {
            let (services, slices) = crate::standalone::watch(standalone);
            (None, services, slices)
        }
    };
    let mut services = Watched::<Service>::new();
    let mut slices = Watched::<EndpointSlice>::new();
    let backends = config.backends;
    let backend = Arc::new(Mutex::new(backends));
    let node = NodeContext {
        node_name: config.node_name.clone(),
        node_port_range: config.node_port_range,
    };
    let mut model = Model::new(node.clone());
    let mut dirty = true;
    let mut last_sync = Instant::now() - config.min_sync_period;
    let mut last_full = Instant::now();
    let mut first = true;
    let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
    // The Services changed since the last successful sync, with the ports then programmed.
    let mut pending: BTreeMap<String, Vec<ServicePort>> = BTreeMap::new();
    let mut health_checks = crate::healthcheck::HealthChecks::default();
    let mut periodic = tokio::time::interval(config.sync_period);
    tokio::pin!(shutdown);
    loop {
        let ready = services.synced && slices.synced;
        let wait = (last_sync + config.min_sync_period).saturating_duration_since(Instant::now());
        tokio::select! {
            () = &mut shutdown => break,
            event = service_events.next() => match event {
                Some(Ok(event)) => for (key, service) in services.apply(event, model.services()) {
                    model.set_service(&key, service);
                    dirty = true;
                },
                Some(Err(error)) => watch_failed("Services", &error),
                None => break,
            },
            event = slice_events.next() => match event {
                Some(Ok(event)) => for (key, slice) in slices.apply(event, model.slices()) {
                    model.set_slice(&key, slice);
                    dirty = true;
                },
                Some(Err(error)) => watch_failed("EndpointSlices", &error),
                None => break,
            },
            _ = periodic.tick() => dirty = true,
            () = tokio::time::sleep(wait), if dirty && ready => {
                dirty = false;
                last_sync = Instant::now();
                let full = first || last_full.elapsed() >= config.full_sync_period;
                for (service, before) in model.update() {
                    pending.entry(service).or_insert(before);
                }
                let skipped: Vec<crate::model::Skipped> = model.skipped().cloned().collect();
                for skip in &skipped {
                    if reported.insert((skip.service.clone(), skip.reason.clone())) {
                        tracing::warn!(service = %skip.service, reason = %skip.reason, "service left out; every other service is still programmed");
                        if let Some(recorder) = &recorder {
                            publish_skip(recorder, &model, &skip.service, &skip.reason).await;
                        }
                    }
                }
                reported.retain(|(s, r)| skipped.iter().any(|k| &k.service == s && &k.reason == r));
                let before: Vec<ServicePort> = pending.values().flatten().cloned().collect();
                let after: Vec<ServicePort> = pending
                    .keys()
                    .flat_map(|s| model.ports_of(s))
                    .cloned()
                    .collect();
                let stale = crate::conntrack::stale_udp(&before, &after);
                let changed: BTreeSet<String> = pending.keys().cloned().collect();
                let sync_backend = backend.clone();
                // The blocking sync borrows the model for its duration; no event is applied
                // meanwhile, since this arm awaits it.
                let synced_model = std::mem::replace(&mut model, Model::new(node.clone()));
                let began = Instant::now();
                let (synced_model, result) = tokio::task::spawn_blocking(move || {
                    let mut backends = sync_backend.lock().unwrap_or_else(|p| p.into_inner());
                    let mut total = SyncReport::default();
                    for backend in backends.iter_mut() {
                        let report = match backend.sync(&synced_model, &changed, full) {
                            Ok(report) => report,
                            Err(error) => return (synced_model, Err(error)),
                        };
                        total.full |= report.full;
                        total.written += report.written;
                        total.deleted += report.deleted;
                        total.chains += report.chains;
                    }
                    // Only after the rules no longer send new flows there.
                    match crate::conntrack::clear(&stale) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(entries = n, "cleared UDP conntrack entries of removed endpoints"),
                        Err(error) => tracing::warn!(%error, "clearing stale UDP conntrack entries failed"),
                    }
                    (synced_model, Ok::<_, BackendError>(total))
                })
                .await
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
                model = synced_model;
                let elapsed = began.elapsed().as_secs_f64();
                {
                let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
                stats.last_duration = elapsed;
                stats.duration_sum += elapsed;
                stats.skipped = skipped.len();
                match result {
                    Ok(report) => {
                        first = false;
                        pending.clear();
                        if report.full {
                            last_full = Instant::now();
                            stats.full_syncs += 1;
                        }
                        stats.syncs += 1;
                        stats.last_success = Some(SystemTime::now());
                        stats.last_attempt_failed = false;
                        stats.service_chains = report.chains;
                        stats.service_ports = model.port_count();
                        tracing::debug!(full = report.full, written = report.written, deleted = report.deleted, seconds = elapsed, "rules synced");
                    }
                    Err(error) => {
                        stats.errors += 1;
                        stats.last_attempt_failed = true;
                        dirty = true;
                        tracing::warn!(%error, "syncing rules failed; the next sync is a full one");
                    }
                }
                }
                let checked: Vec<ServicePort> = model
                    .ports()
                    .filter(|p| p.health_check_node_port.is_some())
                    .cloned()
                    .collect();
                health_checks.update(&checked).await;
            }
        }
    }
    for server in servers {
        server.abort();
    }
    Ok(())
}

async fn publish_skip(recorder: &Recorder, model: &Model, service: &str, reason: &str) {
    let id = crate::model::service_of(service);
    let Some(object) = model.services().get(id) else {
        return;
    };
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        name: object.metadata.name.clone(),
        namespace: object.metadata.namespace.clone(),
        uid: object.metadata.uid.clone(),
        ..Default::default()
    };
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "InvalidService".into(),
        note: Some(format!("{service}: {reason}; not programmed on this node")),
        action: "Programming".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &reference).await {
        tracing::debug!(%error, service, "could not record an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_a_recent_successful_sync() {
        let mut stats = Stats::default();
        assert_eq!(
            health(&stats, Duration::from_secs(30)).0,
            503,
            "nothing synced yet"
        );
        stats.last_success = Some(SystemTime::now());
        let (status, body) = health(&stats, Duration::from_secs(30));
        assert_eq!(status, 200);
        assert!(body.contains("\"lastUpdated\": \"20"), "{body}");
        stats.last_attempt_failed = true;
        assert_eq!(health(&stats, Duration::from_secs(30)).0, 503);
        stats.last_attempt_failed = false;
        stats.last_success = Some(SystemTime::now() - Duration::from_secs(3600));
        assert_eq!(health(&stats, Duration::from_secs(30)).0, 503, "stale");
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let stats = Stats {
            syncs: 3,
            errors: 1,
            service_ports: 7,
            ..Default::default()
        };
        let text = metrics_text(&stats);
        assert!(text.contains("# TYPE tug_proxy_syncs_total counter\ntug_proxy_syncs_total 3\n"));
        assert!(text.contains("tug_proxy_sync_errors_total 1\n"));
        assert!(text.contains("tug_proxy_service_ports 7\n"));
    }

    #[test]
    fn a_relist_yields_only_what_differs_from_the_model_once_it_is_complete() {
        let svc = |name: &str, version: &str| Service {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut watched = Watched::<Service>::new();
        let mut model: BTreeMap<String, Service> = BTreeMap::new();
        let apply =
            |watched: &mut Watched<Service>, model: &mut BTreeMap<String, Service>, event| {
                let changes = watched.apply(event, model);
                for (key, item) in &changes {
                    match item {
                        Some(item) => model.insert(key.clone(), item.clone()),
                        None => model.remove(key),
                    };
                }
                changes
                    .into_iter()
                    .map(|(key, item)| (key, item.is_some()))
                    .collect::<Vec<_>>()
            };
        apply(&mut watched, &mut model, Event::Init);
        apply(&mut watched, &mut model, Event::InitApply(svc("kept", "1")));
        apply(&mut watched, &mut model, Event::InitApply(svc("gone", "1")));
        assert!(
            !watched.synced,
            "nothing counts before the list is complete"
        );
        assert!(model.is_empty());
        let first = apply(&mut watched, &mut model, Event::InitDone);
        assert!(watched.synced);
        assert_eq!(first.len(), 2, "{first:?}");
        assert_eq!(
            apply(&mut watched, &mut model, Event::Apply(svc("new", "2"))),
            [("ns/new".to_owned(), true)]
        );
        // The watch broke and relisted: one object changed, one went, one stayed.
        apply(&mut watched, &mut model, Event::Init);
        apply(&mut watched, &mut model, Event::InitApply(svc("kept", "1")));
        apply(&mut watched, &mut model, Event::InitApply(svc("new", "3")));
        let relisted = apply(&mut watched, &mut model, Event::InitDone);
        assert_eq!(
            relisted,
            [("ns/gone".to_owned(), false), ("ns/new".to_owned(), true)],
            "only the differences, not the unchanged object"
        );
        assert_eq!(
            apply(&mut watched, &mut model, Event::Delete(svc("new", "3"))),
            [("ns/new".to_owned(), false)]
        );
        assert_eq!(model.keys().collect::<Vec<_>>(), ["ns/kept"]);
    }
}
