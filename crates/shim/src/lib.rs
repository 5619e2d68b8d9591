//! `containerd-shim-coffer-v2`: the containerd runtime v2 shim that runs every pod in a Coffer
//! sandbox (a pod VM, or the process sandbox for development).
//!
//! containerd starts the shim binary for a pod's sandbox container (`start` action); the shim
//! starts its server process, grouped by the pod's sandbox id so that every container of the pod
//! reaches the same process ([`Shim`]'s `start_shim`). The server maps the Task API onto the agent
//! API ([`service`]); the sandbox itself is the `coffer __sandbox` keeper ([`sandbox`]). Images
//! are pulled inside the sandbox only: the shim hands the agent the image reference, never
//! layers (see the `coffer-snapshotter` crate for the node side). The shim is untrusted: the
//! agent believes nothing it says unless the attested initdata's policy allows it.

#![deny(unsafe_code)]

pub mod annotations;
pub mod config;
pub mod containerd;
pub mod sandbox;
pub mod service;

/// The Kubernetes CRI v1 API (a subset, `proto/cri/api.proto`), as a client: the tests and the
/// benchmark drive containerd through it as the kubelet does.
pub mod cri {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("runtime.v1");
}

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::{
    api::DeleteResponse, publisher::RemotePublisher, spawn, Config, ExitSignal, Flags, StartOpts,
};

/// The runtime's name in containerd (`--runtime io.containerd.coffer.v2`).
pub const RUNTIME_ID: &str = "io.containerd.coffer.v2";

/// The shim's errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShimError {
    /// The node's shim configuration is missing or wrong.
    #[error("shim configuration: {0}")]
    Config(String),
    /// A request or its bundle is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Refused for security: the reason says what to change.
    #[error("refused: {0}")]
    Refused(String),
    /// No such task or sandbox.
    #[error("not found: {0}")]
    NotFound(String),
    /// The sandbox could not be started or reached.
    #[error("{0}")]
    Sandbox(String),
    /// The agent failed a request.
    #[error("agent: {0}")]
    Agent(String),
    /// containerd could not answer.
    #[error("containerd: {0}")]
    Containerd(String),
}

/// The shim's process-level part: `start`, `delete` and the server's life.
pub struct Shim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    address: String,
    /// The ttrpc socket this server listens on (`unix://PATH`; empty for `start`/`delete`).
    socket: String,
}

/// The pod (sandbox id) a bundle's container belongs to, or the container itself.
fn grouping(id: &str) -> String {
    let spec = std::fs::read("config.json").unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&spec)
        .ok()
        .and_then(|v| {
            v["annotations"][annotations::SANDBOX_ID]
                .as_str()
                .map(String::from)
        })
        .unwrap_or_else(|| id.to_string())
}

/// The path of the ttrpc socket the shim of a pod (or standalone container) `grouping` serves,
/// for containerd at `address` in `namespace`.
pub fn socket_path(address: &str, namespace: &str, grouping: &str) -> std::path::PathBuf {
    containerd_shim::socket_address(address, namespace, grouping)
        .trim_start_matches("unix://")
        .into()
}

/// Removes a shim socket file nobody serves any more.
fn remove_dead_socket(address: &str) {
    let path = address.trim_start_matches("unix://");
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// The configuration the shim crate runs the shim with: no implicit reaping of children (the
/// shim waits for its keepers itself) and no subreaper.
pub fn shim_config() -> Config {
    Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

#[async_trait]
impl containerd_shim::Shim for Shim {
    type T = service::Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            socket: args.socket.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // All containers of a pod go to the shim of the pod's sandbox.
        let grouping = grouping(&opts.id);
        // The daemon is this program again (its resolved path, not the handler's link name): it is
        // told which configuration this handler reads.
        let config = config::config_path();
        let config = config.to_string_lossy().into_owned();
        let address = spawn(opts, &grouping, vec![(config::CONFIG_ENV, config.as_str())]).await?;
        std::fs::write("address", &address)
            .map_err(|e| containerd_shim::Error::Other(format!("writing address: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim of this task is gone (killed, or exited): remove what its sandbox left.
        if let Ok(config) = config::ShimConfig::load() {
            sandbox::reap(&config, &sandbox::name_for(&self.id)).await;
        }
        remove_dead_socket(&containerd_shim::socket_address(
            &self.address,
            &self.namespace,
            &grouping(&self.id),
        ));
        let mut resp = DeleteResponse::new();
        // 128 + SIGKILL, as for a runc task whose shim died.
        resp.exit_status = 137;
        resp.exited_at = Some(service::timestamp(std::time::SystemTime::now())).into();
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // The bundle holding the `address` file may be gone already: remove the socket here.
        let _ = std::fs::remove_file(self.socket.trim_start_matches("unix://"));
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(&self.namespace, &self.address, publisher, self.exit.clone())
    }
}
