//! containerd tier: tug shim's CRI ImageService, served over gRPC on a Unix socket and driven by
//! a CRI client as the kubelet drives it, storing images in containerd.

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::{
    ImageFilter, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest,
    PullImageRequest, RemoveImageRequest,
};
use tug_runtime_shim::cri::images::Images;
use tug_runtime_shim::image::pull::Containerd;
use tug_runtime_shim::image::registry::{Registry, RegistryConfig};
use tug_tests::containerd::ContainerdNs;
use tug_tests::cri::Cri;
use tug_tests::substrate::Substrate;
use tug_tests::tier::{Tier, require};

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up then cargo test -p tug-tests --test shim_images -- --ignored"]
async fn image_service_pulls_lists_reports_and_removes_images() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let ns = ContainerdNs::connect("imgsvc").await;
    let channel = containerd_client::connect(&substrate.containerd_sock)
        .await
        .expect("connect to containerd");
    let registry = Registry::new(RegistryConfig {
        insecure: vec![substrate.registry.clone()],
        ..Default::default()
    });
    let snapshotter_root = substrate
        .state
        .join("containerd/root/io.containerd.snapshotter.v1.overlayfs");
    let service = Images::new(
        Containerd::new(channel, ns.namespace()),
        registry,
        snapshotter_root.display().to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cri.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ImageServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let cri = Cri::connect(&socket).await;
    exercise_image_service(cri, &substrate, true).await;
    server.abort();
}

#[tokio::test]
#[ignore = "containerd tier (root): run as root via ./scripts/test, or scripts/substrate up then cargo test -p tug-tests --test shim_images -- --ignored"]
async fn the_same_image_suite_passes_against_containerds_own_cri() {
    require(Tier::Containerd);
    let substrate = Substrate::from_env();
    let cri = Cri::connect(&substrate.containerd_sock).await;
    exercise_image_service(cri, &substrate, false).await;
}

/// The ImageService behaviour the kubelet relies on, for any CRI runtime. `strict` adds tug's
/// own promises beyond the CRI (error codes that say what went wrong).
async fn exercise_image_service(mut cri: Cri, substrate: &Substrate, strict: bool) {
    let name = substrate.registry_image("busybox");
    // Start from absent (a run that failed may have left the image); removing an absent image
    // must succeed anyway.
    cri.images
        .remove_image(RemoveImageRequest { image: spec(&name) })
        .await
        .expect("RemoveImage of an absent or present image");

    let absent = cri
        .images
        .image_status(ImageStatusRequest {
            image: spec(&name),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(
        absent.image.is_none(),
        "an absent image is an empty status, not an error"
    );

    let image_ref = cri
        .images
        .pull_image(PullImageRequest {
            image: spec(&name),
            ..Default::default()
        })
        .await
        .expect("PullImage")
        .into_inner()
        .image_ref;
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    let status = cri
        .images
        .image_status(ImageStatusRequest {
            image: spec(&name),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .expect("present after the pull");
    assert_eq!(status.id, image_ref);
    assert_eq!(status.repo_tags, std::slice::from_ref(&name));
    assert!(
        status.repo_digests.len() == 1
            && status.repo_digests[0]
                .starts_with(&format!("{}/tug-test/busybox@sha256:", substrate.registry)),
        "{:?}",
        status.repo_digests
    );
    assert!(status.size > 0);
    let by_id = cri
        .images
        .image_status(ImageStatusRequest {
            image: spec(&image_ref),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image;
    assert_eq!(
        by_id.map(|i| i.id),
        Some(image_ref.clone()),
        "images are found by ID too"
    );

    let all = cri
        .images
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(all.iter().any(|i| i.id == image_ref));
    let filtered = cri
        .images
        .list_images(ListImagesRequest {
            filter: Some(ImageFilter { image: spec(&name) }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    // containerd 1.6's CRI ignores ListImages filters (the kubelet never sends one); tug honours them.
    if strict {
        assert_eq!(filtered.len(), 1);
    }
    assert!(filtered.iter().any(|i| i.id == image_ref));
    let fs = cri
        .images
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        fs.image_filesystems[0]
            .used_bytes
            .as_ref()
            .is_some_and(|u| u.value > 0),
        "{fs:?}"
    );

    cri.images
        .remove_image(RemoveImageRequest { image: spec(&name) })
        .await
        .expect("RemoveImage");
    let gone = cri
        .images
        .image_status(ImageStatusRequest {
            image: spec(&name),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.image.is_none());
    cri.images
        .remove_image(RemoveImageRequest { image: spec(&name) })
        .await
        .expect("RemoveImage is idempotent");

    let missing = cri
        .images
        .pull_image(PullImageRequest {
            image: spec(&substrate.registry_image("does-not-exist")),
            ..Default::default()
        })
        .await
        .expect_err("a missing image");
    if strict {
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
    }
    assert!(
        missing.message().contains("does-not-exist"),
        "the error names the image: {missing}"
    );
    let bad = cri
        .images
        .pull_image(PullImageRequest {
            image: spec("Bad Name"),
            ..Default::default()
        })
        .await
        .expect_err("a malformed reference");
    assert!(!bad.message().is_empty());
    if strict {
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    }
}
