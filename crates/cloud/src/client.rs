//! The API's client, for the node's sandbox keepers.

use std::path::Path;

use crate::api::cloud_client::CloudClient;

/// A client of the daemon on its unix socket.
pub type Client = CloudClient<tonic::transport::Channel>;

/// Connects to the daemon at `socket`.
pub async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://coffer-cloud.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(CloudClient::new(channel))
}
