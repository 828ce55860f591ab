//! Registering the Node and keeping it alive: create the Node (or adopt the existing one), renew
//! the node Lease in `kube-node-lease` every 10 s (duration 40 s, owned by the Node), and
//! recompute the status every 10 s, writing it when it changed or every 5 minutes (upstream's
//! `nodeStatusUpdateFrequency`/`nodeStatusReportFrequency`). While the API is unreachable the
//! loop keeps trying; nothing on the node is affected.
//!
//! Each of these requests is given up after [`API_TIMEOUT`]. A renewal that fails closes every
//! connection of the kubelet's client (upstream's kubelet does the same): an API server that
//! stopped answering without a reset leaves requests and watches waiting on connections that
//! will never answer, and closing them makes them start over. The first renewal that succeeds
//! after failures closes them once more, so nothing still waiting on a connect from the outage
//! lags behind the Lease.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::node::{self, NodeIdentity};
use crate::runtime::Cri;

/// Lease duration (upstream's `nodeLeaseDurationSeconds`).
pub const LEASE_SECONDS: i32 = 40;
/// How often the Lease is renewed and the status recomputed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often the status is written even when unchanged.
pub const REPORT: Duration = Duration::from_secs(300);

/// How long a request to the API server may take before it is given up (upstream's kubelet
/// gives its heartbeat client the status update period, 10 s).
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes every connection of the kubelet's API client, so that what waits on one fails now
/// and starts over on a fresh one.
#[derive(Clone)]
pub struct CloseConnections(pub std::sync::Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for CloseConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CloseConnections")
    }
}

/// `request`, or a timeout error after [`API_TIMEOUT`].
pub async fn bounded<T>(
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(API_TIMEOUT, request).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(
            format!("no answer from the API server in {API_TIMEOUT:?}").into(),
        )),
    }
}

/// What the node agent needs.
#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
    /// How the node presents itself.
    pub identity: NodeIdentity,
    /// The kubelet's root dir (its filesystem is the node's ephemeral storage).
    pub root_dir: PathBuf,
    /// How often to renew and recompute (10 s; shorter in tests).
    pub heartbeat: Duration,
    /// The node's pressures, as the eviction manager finds them.
    pub pressures: std::sync::Arc<std::sync::Mutex<Vec<crate::eviction::Pressure>>>,
    /// Closes the API client's connections when a renewal fails (and once it succeeds again).
    pub close_connections: Option<CloseConnections>,
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

/// Creates the Node, or adopts the one that exists (as upstream's `tryRegisterWithAPIServer`):
/// its labels are brought up to date.
pub async fn register(nodes: &Api<Node>, desired: &Node) -> Result<Node, kube::Error> {
    match nodes.create(&PostParams::default(), desired).await {
        Ok(node) => Ok(node),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let name = desired.metadata.name.clone().unwrap_or_default();
            let labels = serde_json::json!({"metadata": {"labels": desired.metadata.labels}});
            nodes
                .patch(&name, &PatchParams::default(), &Patch::Merge(labels))
                .await
        }
        Err(error) => Err(error),
    }
}

/// Renews (or creates) the node's Lease.
pub async fn renew_lease(leases: &Api<Lease>, node: &Node) -> Result<(), kube::Error> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let spec = LeaseSpec {
        holder_identity: Some(name.clone()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        renew_time: Some(MicroTime(now())),
        ..Default::default()
    };
    match leases.get_opt(&name).await? {
        Some(mut lease) => {
            lease.spec = Some(spec);
            leases
                .replace(&name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some("kube-node-lease".into()),
                    owner_references: node.metadata.uid.clone().map(|uid| {
                        vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: name.clone(),
                            uid,
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
    }
}

/// The reasons of the Events upstream's kubelet records on its Node when a condition changes
/// status: for each condition type, (when True, when False).
const CONDITION_EVENTS: [(&str, &str, &str); 4] = [
    ("Ready", "NodeReady", "NodeNotReady"),
    (
        "MemoryPressure",
        "NodeHasInsufficientMemory",
        "NodeHasSufficientMemory",
    ),
    (
        "DiskPressure",
        "NodeHasDiskPressure",
        "NodeHasNoDiskPressure",
    ),
    (
        "PIDPressure",
        "NodeHasInsufficientPID",
        "NodeHasSufficientPID",
    ),
];

/// The Events to record for the move from conditions `before` to `after` (each condition whose
/// status changed, or appeared): (reason, message), as upstream words them.
pub fn condition_events(
    node: &str,
    before: &[NodeCondition],
    after: &[NodeCondition],
) -> Vec<(&'static str, String)> {
    let mut events = Vec::new();
    for (kind, when_true, when_false) in CONDITION_EVENTS {
        let status = |list: &[NodeCondition]| {
            list.iter()
                .find(|c| c.type_ == kind)
                .map(|c| c.status.clone())
        };
        let now = status(after);
        if now.is_none() || status(before) == now {
            continue;
        }
        let reason = if now.as_deref() == Some("True") {
            when_true
        } else {
            when_false
        };
        events.push((reason, format!("Node {node} status is now: {reason}")));
    }
    events
}

/// Whether two condition lists differ in anything but heartbeat times.
fn conditions_changed(a: &[NodeCondition], b: &[NodeCondition]) -> bool {
    let key = |c: &NodeCondition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
        )
    };
    a.len() != b.len() || a.iter().zip(b).any(|(x, y)| key(x) != key(y))
}

fn close_connections(config: &NodeAgentConfig) {
    if let Some(close) = &config.close_connections {
        (close.0)();
    }
}

/// How long to wait after the `failures`-th failure in a row: 200 ms, doubling, at most 5 s
/// (upstream's lease controller backs off from 200 ms to 7 s) and never past a heartbeat.
pub fn retry_after(failures: u32, heartbeat: Duration) -> Duration {
    let backoff =
        Duration::from_millis(200).saturating_mul(1 << failures.saturating_sub(1).min(10));
    backoff.min(Duration::from_secs(5)).min(heartbeat)
}

/// Registers the node and keeps its Lease and status up to date until `shutdown`.
pub async fn run(
    config: NodeAgentConfig,
    client: kube::Client,
    cri: Cri,
    shutdown: impl Future<Output = ()>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let name = config.identity.name.clone();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "kubelet".into(),
            instance: Some(name.clone()),
        },
    );
    // Upstream's kubelet names its Node in Events with the node's name as the UID.
    let node_ref = ObjectReference {
        kind: Some("Node".into()),
        api_version: Some("v1".into()),
        name: Some(name.clone()),
        uid: Some(name.clone()),
        ..Default::default()
    };
    tokio::pin!(shutdown);
    let mut registered: Option<Node> = None;
    let mut reported: Option<(Instant, serde_json::Value)> = None;
    let mut conditions: Vec<NodeCondition> = Vec::new();
    // Every heartbeat; after a failure sooner, as upstream's lease controller retries, so the
    // Lease is renewed within moments of the API server coming back, not a heartbeat later.
    let mut failures: u32 = 0;
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = config.heartbeat;
        let host = node::read_host(&config.root_dir);
        let node = match &registered {
            Some(node) => node.clone(),
            None => {
                match bounded(register(&nodes, &node::desired(&config.identity, &host))).await {
                    Ok(node) => {
                        tracing::info!(node = %name, "node registered");
                        registered = Some(node.clone());
                        node
                    }
                    Err(error) => {
                        tracing::warn!(node = %name, %error, "registering the node failed; retrying");
                        failures += 1;
                        wait = retry_after(failures, config.heartbeat);
                        continue;
                    }
                }
            }
        };
        match bounded(renew_lease(&leases, &node)).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(node = %name, failures, "the node lease is renewed again");
                    close_connections(&config);
                }
                failures = 0;
            }
            Err(error) => {
                failures += 1;
                wait = retry_after(failures, config.heartbeat);
                tracing::warn!(node = %name, %error, retry_in = ?wait, "renewing the node lease failed; closing the API connections");
                close_connections(&config);
            }
        }
        let health = cri.health().await;
        let pressures = config.pressures.lock().expect("pressures lock").clone();
        let next = node::conditions(&pressures, &health, &conditions, &Time(now()));
        let status = node::status(&config.identity, &host, &health, next.clone());
        let mut comparable = serde_json::to_value(&status).unwrap_or_default();
        if let Some(list) = comparable.get_mut("conditions") {
            *list = serde_json::Value::Null;
        }
        let due = match &reported {
            None => true,
            Some((at, last)) => {
                at.elapsed() >= REPORT
                    || *last != comparable
                    || conditions_changed(&conditions, &next)
            }
        };
        if !due {
            continue;
        }
        let patch = serde_json::json!({"status": status});
        match bounded(nodes.patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch)))
            .await
        {
            Ok(_) => {
                if conditions_changed(&conditions, &next) {
                    let ready = next.iter().find(|c| c.type_ == "Ready");
                    tracing::info!(node = %name, ready = ?ready.map(|c| &c.status), reason = ?ready.and_then(|c| c.message.clone()), "node status changed");
                }
                for (reason, note) in condition_events(&name, &conditions, &next) {
                    let event = Event {
                        type_: EventType::Normal,
                        reason: reason.into(),
                        note: Some(note),
                        action: "NodeStatusUpdate".into(),
                        secondary: None,
                    };
                    if let Err(error) = recorder.publish(&event, &node_ref).await {
                        tracing::debug!(%error, "could not record an Event");
                    }
                }
                conditions = next;
                reported = Some((Instant::now(), comparable));
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                tracing::warn!(node = %name, "the Node was deleted; registering again");
                registered = None;
                reported = None;
            }
            Err(error) => {
                tracing::warn!(node = %name, %error, "writing the node status failed; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(kind: &str, status: &str) -> NodeCondition {
        NodeCondition {
            type_: kind.into(),
            status: status.into(),
            ..Default::default()
        }
    }

    #[test]
    fn node_events_name_each_condition_that_changed_as_upstream_does() {
        let healthy = [
            condition("Ready", "True"),
            condition("MemoryPressure", "False"),
            condition("DiskPressure", "False"),
            condition("PIDPressure", "False"),
        ];
        let first: Vec<&str> = condition_events("n1", &[], &healthy)
            .into_iter()
            .map(|(reason, _)| reason)
            .collect();
        assert_eq!(
            first,
            [
                "NodeReady",
                "NodeHasSufficientMemory",
                "NodeHasNoDiskPressure",
                "NodeHasSufficientPID"
            ]
        );
        let mut full = healthy.clone();
        full[2] = condition("DiskPressure", "True");
        assert_eq!(
            condition_events("n1", &healthy, &full),
            [(
                "NodeHasDiskPressure",
                "Node n1 status is now: NodeHasDiskPressure".to_owned()
            )]
        );
        assert_eq!(
            condition_events("n1", &full, &healthy)[0].0,
            "NodeHasNoDiskPressure"
        );
        assert!(condition_events("n1", &healthy, &healthy).is_empty());
    }

    #[test]
    fn failed_heartbeats_are_retried_sooner_backing_off_to_5_s() {
        let heartbeat = HEARTBEAT;
        let waits: Vec<u64> = (1..=7)
            .map(|n| retry_after(n, heartbeat).as_millis() as u64)
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(retry_after(40, heartbeat), Duration::from_secs(5));
        assert_eq!(
            retry_after(9, Duration::from_secs(1)),
            Duration::from_secs(1),
            "never longer than a heartbeat"
        );
    }

    #[test]
    fn heartbeats_alone_are_not_a_change() {
        let make = |status: &str, beat: &str| NodeCondition {
            type_: "Ready".into(),
            status: status.into(),
            reason: Some("KubeletReady".into()),
            message: Some("ok".into()),
            last_heartbeat_time: Some(Time(beat.parse().unwrap())),
            last_transition_time: None,
        };
        let a = [make("True", "2026-01-01T00:00:00Z")];
        assert!(!conditions_changed(
            &a,
            &[make("True", "2026-01-01T00:00:10Z")]
        ));
        assert!(conditions_changed(
            &a,
            &[make("False", "2026-01-01T00:00:10Z")]
        ));
    }
}
