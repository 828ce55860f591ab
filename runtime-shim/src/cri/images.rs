//! The CRI ImageService over containerd: images are containerd image records in the CRI
//! namespace; an image's ID is its config digest (what `ImageStatus` and `PullImage` report and
//! what containers refer to). Errors become gRPC statuses here, in one place.

use std::collections::BTreeMap;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, UsageRequest};
use containerd_client::services::v1::{
    DeleteImageRequest, ListImagesRequest as CdListImages, ReadContentRequest,
};
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    FilesystemIdentifier, FilesystemUsage, Image, ImageFsInfoRequest, ImageFsInfoResponse,
    ImageSpec, ImageStatusRequest, ImageStatusResponse, ListImagesRequest, ListImagesResponse,
    PullImageRequest, PullImageResponse, RemoveImageRequest, RemoveImageResponse, UInt64Value,
};
use tonic::{Request, Response, Status};

use crate::image::config::{self as image_config, ImageConfig};
use crate::image::pull::{Containerd, PullError, SNAPSHOTTER, chain_ids, pull};
use crate::image::reference::Reference;
use crate::image::registry::{Credentials, Manifest, Registry, RegistryError, host_platform};

/// The ImageService.
#[derive(Debug, Clone)]
pub struct Images {
    containerd: Containerd,
    registry: Registry,
    /// Where the snapshotter keeps image layers (reported by ImageFsInfo).
    snapshotter_root: String,
}

/// One image as the CRI sees it: every name of one config digest.
#[derive(Debug, Clone, Default)]
struct Entry {
    id: String,
    names: Vec<String>,
    target_digests: Vec<String>,
    size: u64,
}

fn status_of(error: &PullError) -> Status {
    match error {
        PullError::Registry(RegistryError::NotFound { .. }) => Status::not_found(error.to_string()),
        PullError::Registry(RegistryError::Denied { .. }) => {
            Status::permission_denied(error.to_string())
        }
        PullError::Registry(RegistryError::Invalid { .. }) | PullError::Invalid(_) => {
            Status::invalid_argument(error.to_string())
        }
        PullError::Registry(RegistryError::Transport { .. } | RegistryError::Status { .. }) => {
            Status::unavailable(error.to_string())
        }
        PullError::Containerd { status, .. } => Status::new(status.code(), error.to_string()),
    }
}

impl Images {
    /// An ImageService storing images in `containerd`'s namespace.
    pub fn new(
        containerd: Containerd,
        registry: Registry,
        snapshotter_root: impl Into<String>,
    ) -> Images {
        Images {
            containerd,
            registry,
            snapshotter_root: snapshotter_root.into(),
        }
    }

    async fn read(&self, digest: &str) -> Result<Vec<u8>, Status> {
        let mut content = ContentClient::new(self.containerd.channel());
        let mut stream = content
            .read(self.containerd.request(
                ReadContentRequest {
                    digest: digest.to_owned(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            bytes.extend(chunk.data);
        }
        Ok(bytes)
    }

    /// Every image, grouped by config digest.
    async fn entries(&self) -> Result<Vec<Entry>, Status> {
        let mut client = ImagesClient::new(self.containerd.channel());
        let records = client
            .list(self.containerd.request(
                CdListImages {
                    filters: Vec::new(),
                },
                None,
            ))
            .await?
            .into_inner()
            .images;
        let mut by_id: BTreeMap<String, Entry> = BTreeMap::new();
        for record in records {
            let Some(target) = record.target else {
                continue;
            };
            let Ok(mut manifest) = self
                .read(&target.digest)
                .await
                .map(|b| serde_json::from_slice::<Manifest>(&b))
            else {
                continue;
            };
            if let Ok(index) = &manifest
                && let Some(entries) = &index.manifests
            {
                let platform = host_platform();
                let Some(entry) = entries.iter().find(|e| {
                    e.platform.as_ref().is_some_and(|p| {
                        p.os == platform.os && p.architecture == platform.architecture
                    })
                }) else {
                    continue;
                };
                manifest = self
                    .read(&entry.digest)
                    .await
                    .map(|b| serde_json::from_slice::<Manifest>(&b))?;
            }
            let Ok(manifest) = manifest else { continue };
            let Some(config) = manifest.config else {
                continue;
            };
            let entry = by_id.entry(config.digest.clone()).or_insert_with(|| Entry {
                id: config.digest.clone(),
                ..Default::default()
            });
            entry.size =
                (config.size + manifest.layers.iter().map(|l| l.size).sum::<i64>()).max(0) as u64;
            entry.names.push(record.name);
            entry.target_digests.push(target.digest);
        }
        Ok(by_id.into_values().collect())
    }

    /// The entry `spec` names: a reference (normalised) or an image ID.
    async fn find(&self, spec: &str) -> Result<Option<Entry>, Status> {
        let entries = self.entries().await?;
        if spec.starts_with("sha256:") {
            return Ok(entries.into_iter().find(|e| e.id == spec));
        }
        let name = Reference::parse(spec)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .name();
        Ok(entries.into_iter().find(|e| e.names.contains(&name)))
    }
}

/// An image as a container is created from it.
#[derive(Debug, Clone)]
pub struct ContainerImage {
    /// The image ID (config digest).
    pub id: String,
    /// A `repository@digest` name for it, when it was pulled by one (what statuses report).
    pub repo_digest: Option<String>,
    /// The chain ID of its top layer: the parent of a container's snapshot.
    pub chain_id: String,
    /// Its run configuration.
    pub config: ImageConfig,
}

impl Images {
    /// Where the snapshotter keeps layers and container root filesystems.
    pub fn snapshotter_root(&self) -> &str {
        &self.snapshotter_root
    }

    /// The image `spec` names (a reference or an image ID), ready to create a container from;
    /// `None` when it is not present.
    pub async fn for_container(&self, spec: &str) -> Result<Option<ContainerImage>, Status> {
        let Some(entry) = self.find(spec).await? else {
            return Ok(None);
        };
        let blob = self.read(&entry.id).await?;
        let invalid =
            |detail: String| Status::internal(format!("image {spec} ({}): {detail}", entry.id));
        let config = image_config::parse(&blob).map_err(|e| invalid(format!("config: {e}")))?;
        let document: serde_json::Value =
            serde_json::from_slice(&blob).map_err(|e| invalid(format!("config: {e}")))?;
        let diff_ids: Vec<String> = document["rootfs"]["diff_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(str::to_owned))
            .collect();
        let chain_id = chain_ids(&diff_ids)
            .pop()
            .ok_or_else(|| invalid("no layers".into()))?;
        Ok(Some(ContainerImage {
            repo_digest: cri_image(&entry).repo_digests.into_iter().next(),
            id: entry.id,
            chain_id,
            config,
        }))
    }
}

fn cri_image(entry: &Entry) -> Image {
    let repo_tags = entry
        .names
        .iter()
        .filter(|n| !n.contains('@'))
        .cloned()
        .collect();
    let repo_digests = entry
        .names
        .iter()
        .zip(&entry.target_digests)
        .map(|(name, digest)| {
            let repository = name.split('@').next().unwrap_or(name);
            let repository = match repository.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => repo,
                _ => repository,
            };
            format!("{repository}@{digest}")
        })
        .collect();
    Image {
        id: entry.id.clone(),
        repo_tags,
        repo_digests,
        size: entry.size,
        uid: None,
        username: String::new(),
        spec: Some(ImageSpec {
            image: entry.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

fn image_name(spec: Option<&ImageSpec>) -> Result<&str, Status> {
    spec.map(|s| s.image.as_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Status::invalid_argument("image spec with a non-empty image is required"))
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|i| !i.is_empty());
        let mut images: Vec<Image> = self.entries().await?.iter().map(cri_image).collect();
        if let Some(filter) = filter {
            let wanted = match self.find(&filter).await? {
                Some(entry) => entry.id,
                None => return Ok(Response::new(ListImagesResponse { images: Vec::new() })),
            };
            images.retain(|i| i.id == wanted);
        }
        Ok(Response::new(ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        // Not present is an empty status, not an error (the kubelet pulls on that).
        let image = self.find(name).await?.map(|e| cri_image(&e));
        Ok(Response::new(ImageStatusResponse {
            image,
            info: Default::default(),
        }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        let reference =
            Reference::parse(name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let credentials = request.auth.map(|auth| {
            let (mut username, mut password) = (auth.username, auth.password);
            if !auth.auth.is_empty()
                && let Ok(decoded) =
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &auth.auth)
                && let Some((u, p)) = String::from_utf8_lossy(&decoded).split_once(':')
            {
                (username, password) = (u.to_owned(), p.to_owned());
            }
            let token = if auth.registry_token.is_empty() {
                auth.identity_token
            } else {
                auth.registry_token
            };
            Credentials {
                username,
                password,
                token,
            }
        });
        let pulled = pull(
            &self.containerd,
            &self.registry,
            &reference,
            &credentials.unwrap_or_default(),
        )
        .await
        .map_err(|e| status_of(&e))?;
        tracing::info!(image = %pulled.name, id = %pulled.id, "pulled image");
        Ok(Response::new(PullImageResponse {
            image_ref: pulled.id,
        }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        // Idempotent: an image that is not there is removed already.
        if let Some(entry) = self.find(name).await? {
            let mut client = ImagesClient::new(self.containerd.channel());
            for name in entry.names {
                match client
                    .delete(self.containerd.request(
                        DeleteImageRequest {
                            name: name.clone(),
                            sync: false,
                            target: None,
                        },
                        None,
                    ))
                    .await
                {
                    Ok(_) => {}
                    Err(status) if status.code() == tonic::Code::NotFound => {}
                    Err(status) => {
                        return Err(Status::new(
                            status.code(),
                            format!("remove image {name}: {}", status.message()),
                        ));
                    }
                }
            }
        }
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let mut snapshots = SnapshotsClient::new(self.containerd.channel());
        let mut list = snapshots
            .list(self.containerd.request(
                ListSnapshotsRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    filters: Vec::new(),
                },
                None,
            ))
            .await?
            .into_inner();
        let (mut bytes, mut inodes) = (0u64, 0u64);
        while let Some(page) = list.message().await? {
            for info in page.info {
                if let Ok(usage) = snapshots
                    .usage(self.containerd.request(
                        UsageRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: info.name,
                        },
                        None,
                    ))
                    .await
                {
                    let usage = usage.into_inner();
                    bytes += usage.size.max(0) as u64;
                    inodes += usage.inodes.max(0) as u64;
                }
            }
        }
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let usage = FilesystemUsage {
            timestamp,
            fs_id: Some(FilesystemIdentifier {
                mountpoint: self.snapshotter_root.clone(),
            }),
            used_bytes: Some(UInt64Value { value: bytes }),
            inodes_used: Some(UInt64Value { value: inodes }),
        };
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![usage],
            container_filesystems: Vec::new(),
        }))
    }
}
