//! The one question the shim asks containerd: from which image was a container created (for
//! containers outside a pod, which carry no CRI image annotation). The answer is only a name;
//! the agent pulls, verifies and decrypts the image itself.

use std::path::PathBuf;

use crate::ShimError;

/// containerd's containers API (a subset, `proto/containerd/containers.proto`).
pub mod api {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("containerd.services.containers.v1");
}

/// The image reference of container `id` in `namespace`, asked of containerd at `address`
/// (its gRPC socket).
pub async fn image_of(address: &str, namespace: &str, id: &str) -> Result<String, ShimError> {
    let path = PathBuf::from(address.trim_start_matches("unix://"));
    let failed = |e: String| ShimError::Containerd(format!("container {id}: {e}"));
    let channel = coffer_agent::api::unix_channel(&path)
        .await
        .map_err(|e| failed(format!("cannot reach containerd at {address}: {e}")))?;
    let mut request = tonic::Request::new(api::GetContainerRequest { id: id.into() });
    request.metadata_mut().insert(
        "containerd-namespace",
        namespace
            .parse()
            .map_err(|_| failed(format!("namespace {namespace:?} is not a header value")))?,
    );
    let container = api::containers_client::ContainersClient::new(channel)
        .get(request)
        .await
        .map_err(|e| failed(e.message().to_string()))?
        .into_inner()
        .container
        .ok_or_else(|| failed("containerd returned no container".into()))?;
    if container.image.is_empty() {
        return Err(failed(
            "it names no image; Coffer pulls every container's image inside its sandbox".into(),
        ));
    }
    Ok(container.image)
}
