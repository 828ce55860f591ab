//! containerd container records, the store sandboxes and containers share: each is a record
//! labelled with its kind, carrying its CRI config and tug's state as extensions. Getting,
//! listing, creating, updating and deleting them goes through here.

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::{
    Container as CdContainer, CreateContainerRequest, DeleteContainerRequest, GetContainerRequest,
    ListContainersRequest, UpdateContainerRequest,
};
use tonic::Status;

use crate::image::pull::Containerd;

/// "Already gone" is success (teardown is idempotent).
pub(super) fn ignore_not_found(result: Result<(), Status>) -> Result<(), Status> {
    match result {
        Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
        other => other,
    }
}

/// The record `id`, if there is one.
pub(super) async fn get(containerd: &Containerd, id: &str) -> Result<Option<CdContainer>, Status> {
    let mut client =
        ContainersClient::new(containerd.channel()).max_decoding_message_size(MAX_MESSAGE);
    match client
        .get(containerd.request(GetContainerRequest { id: id.to_owned() }, None))
        .await
    {
        Ok(response) => Ok(response.into_inner().container),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
        Err(status) => Err(status),
    }
}

/// The largest message read from containerd: one container record, whose OCI spec carries the
/// container's environment (which thousands of Services in a namespace make large).
const MAX_MESSAGE: usize = 64 << 20;

/// The records matching a containerd `filter` (e.g. `labels."tug.io/kind"==sandbox`), streamed
/// one to a message: together they can exceed any gRPC message limit.
pub(super) async fn list(
    containerd: &Containerd,
    filter: String,
) -> Result<Vec<CdContainer>, Status> {
    let mut client =
        ContainersClient::new(containerd.channel()).max_decoding_message_size(MAX_MESSAGE);
    let mut stream = client
        .list_stream(containerd.request(
            ListContainersRequest {
                filters: vec![filter],
            },
            None,
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await? {
        out.extend(message.container);
    }
    Ok(out)
}

/// Creates `record`.
pub(super) async fn create(containerd: &Containerd, record: CdContainer) -> Result<(), Status> {
    let mut client = ContainersClient::new(containerd.channel());
    client
        .create(containerd.request(
            CreateContainerRequest {
                container: Some(record),
            },
            None,
        ))
        .await
        .map(|_| ())
}

/// Writes the fields named by `paths` of `record`.
pub(super) async fn update(
    containerd: &Containerd,
    record: CdContainer,
    paths: &[&str],
) -> Result<(), Status> {
    let mut client = ContainersClient::new(containerd.channel());
    let update = UpdateContainerRequest {
        container: Some(record),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };
    client
        .update(containerd.request(update, None))
        .await
        .map(|_| ())
}

/// Deletes the record `id`; one that is gone already is fine.
pub(super) async fn delete(containerd: &Containerd, id: &str) -> Result<(), Status> {
    let mut client = ContainersClient::new(containerd.channel());
    ignore_not_found(
        client
            .delete(containerd.request(DeleteContainerRequest { id: id.to_owned() }, None))
            .await
            .map(|_| ()),
    )
}
