//! `tug netd`, the node network agent: watches the Node objects, writes the CNI configuration for
//! this node's pod CIDRs, and keeps a route to every other node's pod CIDRs (direct on a shared
//! subnet, VXLAN otherwise), forwarding on, and masquerading for traffic leaving the cluster CIDR.
//! Level-triggered: every change and a periodic resync recompute the whole desired state
//! ([`desired`]) and apply only the difference ([`apply`]).

pub mod apply;
pub mod desired;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

/// netd's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name.
    pub node_name: String,
    /// Dataplane settings.
    pub dataplane: apply::Dataplane,
    /// MTU for pod interfaces.
    pub mtu: u32,
    /// tug-cni's IPAM directory (written into the CNI configuration).
    pub ipam_dir: PathBuf,
    /// Interval of full resyncs, independent of changes.
    pub resync: Duration,
}

/// Why netd stopped.
#[derive(Debug, thiserror::Error)]
pub enum NetdError {
    /// The netlink socket could not be opened. Not retryable.
    #[error("open rtnetlink socket: {0}")]
    Netlink(#[source] std::io::Error),
}

/// Runs netd with `client` until `shutdown` resolves.
pub async fn run(
    config: Config,
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NetdError> {
    let (handle, settings) = start(&config)?;
    let nodes_api: Api<Node> = Api::all(client);
    let mut events = watcher::watcher(nodes_api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut initial: BTreeMap<String, Node> = BTreeMap::new();
    let mut synced = false;
    let mut ticker = tokio::time::interval(config.resync);
    tokio::pin!(shutdown);
    loop {
        let changed = tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = ticker.tick() => synced,
            event = events.next() => match event {
                Some(Ok(Event::Init)) => { initial.clear(); false }
                Some(Ok(Event::InitApply(node))) => { initial.insert(node.metadata.name.clone().unwrap_or_default(), node); false }
                Some(Ok(Event::InitDone)) => { nodes = std::mem::take(&mut initial); synced = true; true }
                Some(Ok(Event::Apply(node))) => { nodes.insert(node.metadata.name.clone().unwrap_or_default(), node); synced }
                Some(Ok(Event::Delete(node))) => { nodes.remove(node.metadata.name.as_deref().unwrap_or_default()); synced }
                Some(Err(error)) => { tracing::warn!(%error, "watching nodes failed; retrying with back-off, the dataplane stays as it is"); false }
                None => return Ok(()),
            },
        };
        if changed {
            sync(&handle, &config, &settings, &nodes).await;
        }
    }
}

/// The netlink handle (its connection spawned) and the settings the desired state needs.
fn start(config: &Config) -> Result<(rtnetlink::Handle, desired::Settings), NetdError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetdError::Netlink)?;
    tokio::spawn(connection);
    let settings = desired::Settings {
        node_name: config.node_name.clone(),
        mtu: config.mtu,
        ipam_dir: config.ipam_dir.display().to_string(),
    };
    Ok((handle, settings))
}

/// Computes the whole desired state from `nodes` and applies its difference.
async fn sync(
    handle: &rtnetlink::Handle,
    config: &Config,
    settings: &desired::Settings,
    nodes: &BTreeMap<String, Node>,
) {
    let subnets = match apply::local_subnets(handle).await {
        Ok(subnets) => subnets,
        Err(error) => {
            tracing::warn!(%error, "cannot read local addresses; retrying at the next sync");
            return;
        }
    };
    let want = desired::desired(settings, nodes, &subnets);
    for (node, why) in &want.skipped {
        tracing::debug!(node, why, "peer not routed yet");
    }
    match apply::apply(handle, &config.dataplane, &want).await {
        Ok(changes) => {
            for change in changes {
                tracing::info!(change, "pod network updated");
            }
        }
        Err(error) => {
            tracing::warn!(%error, "applying the pod network failed; retrying at the next sync")
        }
    }
}

/// Runs netd without an API server until `shutdown` resolves: this node alone, with the pod
/// CIDRs given (tug's standalone node). The same dataplane as in a cluster, with no peers.
pub async fn run_standalone(
    config: Config,
    pod_cidrs: Vec<ipnet::IpNet>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NetdError> {
    let (handle, settings) = start(&config)?;
    let node = Node {
        metadata: kube::api::ObjectMeta {
            name: Some(config.node_name.clone()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: pod_cidrs.first().map(ToString::to_string),
            pod_cidrs: Some(pod_cidrs.iter().map(ToString::to_string).collect()),
            ..Default::default()
        }),
        status: None,
    };
    let nodes = BTreeMap::from([(config.node_name.clone(), node)]);
    let mut ticker = tokio::time::interval(config.resync);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = ticker.tick() => sync(&handle, &config, &settings, &nodes).await,
        }
    }
}
