//! Pulling an image into containerd, client-side (containerd 1.6 has no server-side pull):
//! resolve the manifest, stream every blob into the content store (containerd verifies each
//! digest at commit), record the image, and unpack its layers into snapshots — all under a
//! lease until the image record references everything.

use std::collections::HashMap;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLease, DeleteRequest as DeleteLease,
    GetImageRequest, Image, InfoRequest, UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor as CdDescriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use super::reference::Reference;
use super::registry::{Credentials, Descriptor, Registry, RegistryError};

/// The snapshotter images are unpacked into.
pub const SNAPSHOTTER: &str = "overlayfs";

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry refused or failed; see the inner error for whether to retry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// containerd refused an operation. Usually retryable.
    #[error("{what}: {status}")]
    Containerd {
        /// The operation and its object.
        what: String,
        /// containerd's status.
        status: tonic::Status,
    },
    /// The image content is inconsistent (diff IDs, config). Not retryable.
    #[error("{0}")]
    Invalid(String),
}

/// A pulled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The canonical name it was recorded under.
    pub name: String,
    /// The image ID: its config digest (what the CRI reports as the image ref).
    pub id: String,
    /// Chain ID of the unpacked top layer.
    pub chain_id: String,
}

/// containerd clients for one namespace, and the lease requests carry.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
}

impl Containerd {
    /// Clients on `channel` for `namespace` (`k8s.io` for CRI images).
    pub fn new(channel: Channel, namespace: impl Into<String>) -> Containerd {
        Containerd {
            channel,
            namespace: namespace.into(),
        }
    }

    /// The containerd namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The gRPC channel to containerd.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A request in this namespace, under `lease` when given.
    pub fn request<T>(&self, message: T, lease: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(
            "containerd-namespace",
            self.namespace.parse().expect("namespace is ASCII"),
        );
        if let Some(lease) = lease {
            request.metadata_mut().insert(
                "containerd-lease",
                lease.parse().expect("lease id is ASCII"),
            );
        }
        request
    }
}

fn cd(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> PullError {
    let what = what.into();
    move |status| PullError::Containerd { what, status }
}

fn to_cd(descriptor: &Descriptor) -> CdDescriptor {
    CdDescriptor {
        media_type: descriptor.media_type.clone(),
        digest: descriptor.digest.clone(),
        size: descriptor.size,
        annotations: HashMap::new(),
    }
}

#[derive(Debug, Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// The OCI chain ID of a layer stack.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff_id}")))
            ),
        };
        chain.push(next);
    }
    chain
}

/// Pulls `reference` into containerd and unpacks it.
pub async fn pull(
    containerd: &Containerd,
    registry: &Registry,
    reference: &Reference,
    credentials: &Credentials,
) -> Result<Pulled, PullError> {
    let lease_id = format!("tug-pull-{}", uuid::Uuid::new_v4());
    let expire = (std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut leases = LeasesClient::new(containerd.channel.clone());
    let labels = HashMap::from([("containerd.io/gc.expire".to_owned(), rfc3339(expire))]);
    leases
        .create(containerd.request(
            CreateLease {
                id: lease_id.clone(),
                labels,
            },
            None,
        ))
        .await
        .map_err(cd(format!("create lease {lease_id}")))?;
    let result = pull_leased(containerd, registry, reference, credentials, &lease_id).await;
    // The image record now references everything; the lease only protected the pull.
    let _ = leases
        .delete(containerd.request(
            DeleteLease {
                id: lease_id,
                sync: false,
            },
            None,
        ))
        .await;
    result
}

async fn pull_leased(
    containerd: &Containerd,
    registry: &Registry,
    reference: &Reference,
    credentials: &Credentials,
    lease: &str,
) -> Result<Pulled, PullError> {
    let resolved = registry.resolve(reference, credentials).await?;
    let config = resolved.parsed.config.clone().ok_or_else(|| {
        PullError::Invalid(format!(
            "manifest {} has no config",
            resolved.manifest.0.digest
        ))
    })?;
    let mut content = ContentClient::new(containerd.channel.clone());
    // Layers and config, then the manifest and index labelled with references to them.
    for layer in &resolved.parsed.layers {
        store_blob(
            containerd,
            &mut content,
            registry,
            reference,
            credentials,
            layer,
            lease,
        )
        .await?;
    }
    let config_bytes = fetch_small(registry, reference, credentials, &config).await?;
    let image_config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
        PullError::Invalid(format!(
            "config {} of {}: {e}",
            config.digest,
            reference.name()
        ))
    })?;
    if image_config.rootfs.diff_ids.len() != resolved.parsed.layers.len() {
        return Err(PullError::Invalid(format!(
            "{}: {} layers but {} diff IDs",
            reference.name(),
            resolved.parsed.layers.len(),
            image_config.rootfs.diff_ids.len()
        )));
    }
    let chain = chain_ids(&image_config.rootfs.diff_ids);
    let top = chain
        .last()
        .cloned()
        .ok_or_else(|| PullError::Invalid(format!("{} has no layers", reference.name())))?;
    let config_labels = HashMap::from([(
        format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
        top.clone(),
    )]);
    write_bytes(
        containerd,
        &mut content,
        &config,
        &config_bytes,
        config_labels,
        lease,
    )
    .await?;
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        config.digest.clone(),
    )]);
    for (i, layer) in resolved.parsed.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest.clone(),
        );
    }
    write_bytes(
        containerd,
        &mut content,
        &resolved.manifest.0,
        &resolved.manifest.1,
        manifest_labels,
        lease,
    )
    .await?;
    let target = match &resolved.index {
        Some((index, bytes)) => {
            let labels = HashMap::from([(
                "containerd.io/gc.ref.content.m.0".to_owned(),
                resolved.manifest.0.digest.clone(),
            )]);
            write_bytes(containerd, &mut content, index, bytes, labels, lease).await?;
            index.clone()
        }
        None => resolved.manifest.0.clone(),
    };
    unpack(
        containerd,
        &resolved.parsed.layers,
        &image_config.rootfs.diff_ids,
        &chain,
        lease,
    )
    .await?;
    let name = reference.name();
    let image = Image {
        name: name.clone(),
        labels: HashMap::new(),
        target: Some(to_cd(&target)),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(containerd.channel.clone());
    let exists = images
        .get(containerd.request(GetImageRequest { name: name.clone() }, None))
        .await
        .is_ok();
    if exists {
        images
            .update(containerd.request(
                UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                },
                None,
            ))
            .await
            .map_err(cd(format!("update image {name}")))?;
    } else {
        images
            .create(containerd.request(
                CreateImageRequest {
                    image: Some(image),
                    source_date_epoch: None,
                },
                None,
            ))
            .await
            .map_err(cd(format!("create image {name}")))?;
    }
    Ok(Pulled {
        name,
        id: config.digest,
        chain_id: top,
    })
}

async fn fetch_small(
    registry: &Registry,
    reference: &Reference,
    credentials: &Credentials,
    descriptor: &Descriptor,
) -> Result<Vec<u8>, PullError> {
    let what = format!("blob {} of {}", descriptor.digest, reference.name());
    let bytes = registry
        .blob(reference, descriptor, credentials)
        .await?
        .bytes()
        .await
        .map_err(|source| RegistryError::Transport {
            what: what.clone(),
            source,
        })?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if digest != descriptor.digest {
        return Err(RegistryError::Invalid {
            what,
            detail: format!("content digest is {digest}"),
        }
        .into());
    }
    Ok(bytes.to_vec())
}

async fn exists(
    containerd: &Containerd,
    content: &mut ContentClient<Channel>,
    digest: &str,
) -> bool {
    content
        .info(containerd.request(
            InfoRequest {
                digest: digest.to_owned(),
            },
            None,
        ))
        .await
        .is_ok()
}

/// Streams a blob from the registry into the content store (skipped when already there).
async fn store_blob(
    containerd: &Containerd,
    content: &mut ContentClient<Channel>,
    registry: &Registry,
    reference: &Reference,
    credentials: &Credentials,
    descriptor: &Descriptor,
    lease: &str,
) -> Result<(), PullError> {
    if exists(containerd, content, &descriptor.digest).await {
        return Ok(());
    }
    let mut response = registry.blob(reference, descriptor, credentials).await?;
    let what = format!("blob {} of {}", descriptor.digest, reference.name());
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let write_ref = format!("tug-{}", uuid::Uuid::new_v4());
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut writer = content.clone();
    let request = containerd.request(stream, Some(lease));
    let call = tokio::spawn(async move { writer.write(request).await });
    let mut offset = 0i64;
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|source| RegistryError::Transport {
                what: what.clone(),
                source,
            })?;
        let Some(chunk) = chunk else { break };
        let message = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: write_ref.clone(),
            total: descriptor.size,
            expected: descriptor.digest.clone(),
            offset,
            data: chunk.to_vec(),
            labels: HashMap::new(),
        };
        offset += chunk.len() as i64;
        if tx.send(message).await.is_err() {
            break;
        }
    }
    let commit = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: write_ref,
        total: descriptor.size,
        expected: descriptor.digest.clone(),
        offset,
        data: Vec::new(),
        labels: HashMap::new(),
    };
    let _ = tx.send(commit).await;
    drop(tx);
    finish_write(call, &what).await
}

/// Writes bytes already in memory into the content store (skipped when already there).
async fn write_bytes(
    containerd: &Containerd,
    content: &mut ContentClient<Channel>,
    descriptor: &Descriptor,
    bytes: &[u8],
    labels: HashMap<String, String>,
    lease: &str,
) -> Result<(), PullError> {
    if exists(containerd, content, &descriptor.digest).await {
        return Ok(());
    }
    let write_ref = format!("tug-{}", uuid::Uuid::new_v4());
    let messages = vec![
        WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: write_ref.clone(),
            total: descriptor.size,
            expected: descriptor.digest.clone(),
            offset: 0,
            data: bytes.to_vec(),
            labels: HashMap::new(),
        },
        WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: write_ref,
            total: descriptor.size,
            expected: descriptor.digest.clone(),
            offset: bytes.len() as i64,
            data: Vec::new(),
            labels,
        },
    ];
    let mut writer = content.clone();
    let request = containerd.request(tokio_stream::iter(messages), Some(lease));
    let call = tokio::spawn(async move { writer.write(request).await });
    finish_write(call, &format!("content {}", descriptor.digest)).await
}

type WriteCall = tokio::task::JoinHandle<
    Result<
        tonic::Response<tonic::Streaming<containerd_client::services::v1::WriteContentResponse>>,
        tonic::Status,
    >,
>;

async fn finish_write(call: WriteCall, what: &str) -> Result<(), PullError> {
    let mut responses = call
        .await
        .map_err(|e| PullError::Invalid(format!("write {what}: {e}")))?
        .map_err(cd(format!("write {what}")))?
        .into_inner();
    loop {
        match responses.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(()),
            // containerd verifies the digest at commit: a mismatch fails here.
            Err(status) if status.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(status) => return Err(cd(format!("write {what}"))(status)),
        }
    }
}

/// Applies each layer onto its parent snapshot and commits it under its chain ID.
async fn unpack(
    containerd: &Containerd,
    layers: &[Descriptor],
    diff_ids: &[String],
    chain: &[String],
    lease: &str,
) -> Result<(), PullError> {
    let mut snapshots = SnapshotsClient::new(containerd.channel.clone());
    let mut diff = DiffClient::new(containerd.channel.clone());
    for (i, layer) in layers.iter().enumerate() {
        let chain_id = &chain[i];
        let stat = StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: chain_id.clone(),
        };
        if snapshots.stat(containerd.request(stat, None)).await.is_ok() {
            continue;
        }
        let key = format!("extract-{} {chain_id}", uuid::Uuid::new_v4());
        let parent = if i == 0 {
            String::new()
        } else {
            chain[i - 1].clone()
        };
        let prepare = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.clone(),
            parent,
            labels: HashMap::new(),
        };
        let mounts = snapshots
            .prepare(containerd.request(prepare, Some(lease)))
            .await
            .map_err(cd(format!("prepare snapshot for layer {}", layer.digest)))?
            .into_inner()
            .mounts;
        let applied = diff
            .apply(containerd.request(
                ApplyRequest {
                    diff: Some(to_cd(layer)),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                },
                Some(lease),
            ))
            .await;
        let applied = match applied {
            Ok(response) => response.into_inner().applied,
            Err(status) => {
                let _ = snapshots
                    .remove(containerd.request(
                        RemoveSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key,
                        },
                        None,
                    ))
                    .await;
                return Err(cd(format!("apply layer {}", layer.digest))(status));
            }
        };
        let uncompressed = applied.map(|d| d.digest).unwrap_or_default();
        if uncompressed != diff_ids[i] {
            let _ = snapshots
                .remove(containerd.request(
                    RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key,
                    },
                    None,
                ))
                .await;
            return Err(PullError::Invalid(format!(
                "layer {} unpacks to {uncompressed}, but the config says {}",
                layer.digest, diff_ids[i]
            )));
        }
        let commit = CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            name: chain_id.clone(),
            key,
            labels: HashMap::new(),
        };
        match snapshots
            .commit(containerd.request(commit, Some(lease)))
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::AlreadyExists => {}
            Err(status) => return Err(cd(format!("commit snapshot {chain_id}"))(status)),
        }
    }
    Ok(())
}

fn rfc3339(unix: u64) -> String {
    let days = unix / 86400;
    let secs = unix % 86400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let chain = chain_ids(&["sha256:aa".into(), "sha256:bb".into()]);
        assert_eq!(
            chain,
            [
                "sha256:aa",
                "sha256:b68ad689d6d1ec110ea1c13617437ad6f3766d4b3b309f6a603a222e07a0164f"
            ]
        );
    }

    #[test]
    fn lease_expiry_is_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_600), "2026-11-22T00:00:00Z");
    }
}
