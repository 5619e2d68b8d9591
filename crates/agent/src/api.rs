//! The agent's gRPC API (`proto/coffer/agent/v1/agent.proto`), every request checked against the
//! agent policy under its message name before anything happens. A denial is `PermissionDenied`
//! naming the request ("denied by policy: ExecProcessRequest").
//!
//! Built: the policy gate on every request, `GetGuestDetails`, `SetPolicy`, the container
//! lifecycle on the OCI runtime (`CreateContainer`, `StartContainer`, `ExecProcess`,
//! `WaitProcess`, `SignalProcess`, `ReadStream`, `StatsContainer`, `RemoveContainer`,
//! `ListContainers`, `DestroySandbox`), owner-signed exec (`IssueExecNonce`, [`crate::owner`])
//! sealed output ([`crate::sealed`]), stdin (`WriteStream`, `CloseStdin`) and terminals
//! (`TtyWinResize`). `CreateSandbox` (the process sandbox is made by its launcher) passes the
//! policy and answers `Unimplemented`, saying so.

use std::{path::Path, sync::Arc};

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::{
    container::{ContainerError, Containers},
    owner::OwnerExec,
    policy::{AgentPolicy, PolicyError},
    sealed::{Recipient, RecordPlace},
};

pub use crate::proto;

use proto::{agent_server::Agent, *};

/// The API version this agent speaks.
pub const API_VERSION: &str = "coffer.agent.v1";

/// The agent service.
pub struct AgentService {
    policy: Arc<AgentPolicy>,
    initdata_digest: String,
    containers: Arc<Containers>,
    owner: OwnerExec,
    log_recipient: Option<Recipient>,
    network: Option<Arc<crate::net::Network>>,
    shutdown: Option<tokio::sync::mpsc::Sender<()>>,
}

fn status(e: ContainerError) -> Status {
    match e {
        ContainerError::Invalid(_) => Status::invalid_argument(e.to_string()),
        ContainerError::NotFound(_) => Status::not_found(e.to_string()),
        ContainerError::Exists(_) => Status::already_exists(e.to_string()),
        ContainerError::Image(_) | ContainerError::Keys(_) => {
            Status::failed_precondition(e.to_string())
        }
        ContainerError::Runtime(_) => Status::internal(e.to_string()),
    }
}

impl AgentService {
    /// A service enforcing `policy`, started with initdata of digest `initdata_digest` (hex),
    /// running `containers`.
    pub fn new(
        policy: Arc<AgentPolicy>,
        initdata_digest: String,
        containers: Arc<Containers>,
    ) -> Self {
        Self {
            policy,
            initdata_digest,
            containers,
            owner: OwnerExec::new(None),
            log_recipient: None,
            network: None,
            shutdown: None,
        }
    }

    /// Allows exec requests signed by the owner key (PEM) from the initdata.
    pub fn with_owner_key(mut self, pem: Option<String>) -> Self {
        self.owner = OwnerExec::new(pem);
        self
    }

    /// Seals all container output to the initdata's log recipient.
    pub fn with_log_recipient(mut self, r: Option<Recipient>) -> Self {
        self.log_recipient = r;
        self
    }

    /// The pod VM's network, which `SetNetwork` configures; without it (a process sandbox,
    /// whose containers join the CNI's namespace directly) `SetNetwork` is refused.
    pub fn with_network(mut self, n: Option<crate::net::Network>) -> Self {
        self.network = n.map(Arc::new);
        self
    }

    /// Where DestroySandbox asks the server to stop, once its containers are removed.
    pub fn with_shutdown(mut self, tx: tokio::sync::mpsc::Sender<()>) -> Self {
        self.shutdown = Some(tx);
        self
    }

    fn check<T: serde::Serialize>(&self, name: &str, req: &T) -> Result<(), Status> {
        self.check_then(name, req, None).map(|_| ())
    }

    /// The policy gate: `req` as the policy's `input`, with what the agent itself knows added
    /// (see [`Self::facts`]); on an allow, the string value of rule `then`.
    fn check_then<T: serde::Serialize>(
        &self,
        name: &str,
        req: &T,
        then: Option<&str>,
    ) -> Result<Option<String>, Status> {
        let mut input = serde_json::to_value(req)
            .map_err(|e| Status::internal(format!("cannot encode {name}: {e}")))?;
        self.facts(name, &mut input);
        self.policy
            .check_then(name, &input, then)
            .map_err(|e| match e {
                PolicyError::Denied(_) => Status::permission_denied(e.to_string()),
                PolicyError::Invalid(_) => Status::internal(e.to_string()),
            })
    }

    /// Adds to a request's policy input what the agent knows rather than what the node
    /// claims: for CreateContainer, the image reference as parsed (`image_ref`: registry,
    /// repository, tag, digest; null when not a registry image); for a request naming an
    /// existing container, that container (`container`: its name in the pod, stdin, tty).
    fn facts(&self, name: &str, input: &mut serde_json::Value) {
        let Some(obj) = input.as_object_mut() else {
            return;
        };
        if name == "CreateContainerRequest" {
            let image_ref = obj
                .get("image")
                .and_then(|i| i.as_str())
                .and_then(|i| coffer_image::reference::ImageRef::parse(i).ok())
                .and_then(|r| match r {
                    coffer_image::reference::ImageRef::Docker(r) => {
                        let p = coffer_image::reference::PolicyParts::of(&r);
                        Some(serde_json::json!({
                            "registry": p.registry,
                            "repository": p.repository,
                            "tag": p.tag,
                            "digest": p.digest,
                        }))
                    }
                    _ => None,
                });
            obj.insert("image_ref".into(), image_ref.unwrap_or_default());
            // The environment as the container gets it: one entry per name, the last value the
            // request gives (containerd 1.6 repeats a name the image config also sets).
            if let Some(env) = obj.get_mut("env").and_then(|e| e.as_array_mut()) {
                effective_env(env);
            }
        } else if let Some(container) = obj
            .get("container_id")
            .and_then(|c| c.as_str())
            .and_then(|id| self.containers.describe(id))
        {
            obj.insert("container".into(), container);
        }
    }
}

/// Keeps one `NAME=value` entry per name: the last value, at the first entry's place (as the
/// container's spec merges them).
fn effective_env(env: &mut Vec<serde_json::Value>) {
    let name = |v: &serde_json::Value| {
        let s = v.as_str().unwrap_or_default();
        s.split_once('=').map(|(n, _)| n).unwrap_or(s).to_string()
    };
    let mut out: Vec<serde_json::Value> = Vec::with_capacity(env.len());
    for v in env.drain(..) {
        match out.iter_mut().find(|o| name(o) == name(&v)) {
            Some(slot) => *slot = v,
            None => out.push(v),
        }
    }
    *env = out;
}

fn not_built<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not built in this agent yet"
    )))
}

/// The `Agent` impl: the RPCs listed first pass the policy gate and are not built yet; the
/// methods after them are written out.
macro_rules! agent_impl {
    (gated_not_built { $($method:ident($req:ident) -> $resp:ident;)* } $($rest:tt)*) => {
        #[tonic::async_trait]
        impl Agent for AgentService {
            $(
                async fn $method(&self, r: Request<$req>) -> Result<Response<$resp>, Status> {
                    self.check(stringify!($req), r.get_ref())?;
                    not_built(stringify!($method))
                }
            )*
            $($rest)*
        }
    };
}

agent_impl! {
    gated_not_built {
        create_sandbox(CreateSandboxRequest) -> Empty;
    }

    async fn tty_win_resize(
        &self,
        r: Request<TtyWinResizeRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("TtyWinResizeRequest", r.get_ref())?;
        let req = r.get_ref();
        let (rows, columns) = match (u16::try_from(req.rows), u16::try_from(req.columns)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => return Err(Status::invalid_argument("rows and columns must fit 16 bits")),
        };
        self.containers
            .resize(&req.container_id, &req.exec_id, rows, columns)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn write_stream(
        &self,
        r: Request<WriteStreamRequest>,
    ) -> Result<Response<WriteStreamResponse>, Status> {
        self.check("WriteStreamRequest", r.get_ref())?;
        let req = r.get_ref();
        let len = self
            .containers
            .write(&req.container_id, &req.exec_id, &req.data)
            .await
            .map_err(status)?;
        Ok(Response::new(WriteStreamResponse { len: len as u32 }))
    }

    async fn close_stdin(&self, r: Request<CloseStdinRequest>) -> Result<Response<Empty>, Status> {
        self.check("CloseStdinRequest", r.get_ref())?;
        let req = r.get_ref();
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn destroy_sandbox(
        &self,
        r: Request<DestroySandboxRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("DestroySandboxRequest", r.get_ref())?;
        let removed = self.containers.remove_all().await;
        self.containers.close_block_volumes().await;
        removed.map_err(status)?;
        if let Some(tx) = &self.shutdown {
            let _ = tx.try_send(());
        }
        Ok(Response::new(Empty {}))
    }

    async fn set_volume(&self, r: Request<SetVolumeRequest>) -> Result<Response<Empty>, Status> {
        let req = r.into_inner();
        // The policy (and the audit log) see each file's path, mode and size: never the
        // content, which may be a Secret's.
        let summary = serde_json::json!({
            "volume": req.volume,
            "kind": req.kind,
            "files": req.files.iter().map(|f| serde_json::json!({
                "path": f.path, "mode": f.mode, "gid": f.gid, "size": f.content.len(),
            })).collect::<Vec<_>>(),
        });
        self.check("SetVolumeRequest", &summary)?;
        self.containers
            .set_volume(req.volume, req.kind, req.files)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn set_network(
        &self,
        r: Request<SetNetworkRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("SetNetworkRequest", r.get_ref())?;
        let Some(net) = self.network.clone() else {
            return Err(Status::failed_precondition(
                "this sandbox takes no network configuration: its containers join the pod's network namespace on the node",
            ));
        };
        let req = r.into_inner();
        let status = |e: crate::net::NetError| match e {
            crate::net::NetError::Invalid(_) => Status::invalid_argument(e.to_string()),
            crate::net::NetError::Unavailable(_) => Status::failed_precondition(e.to_string()),
            crate::net::NetError::Apply(_) => Status::internal(e.to_string()),
        };
        net.tunnels(&req).await.map_err(status)?;
        tokio::task::spawn_blocking(move || net.configure(&req))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn issue_exec_nonce(
        &self,
        r: Request<IssueExecNonceRequest>,
    ) -> Result<Response<ExecNonce>, Status> {
        self.check("IssueExecNonceRequest", r.get_ref())?;
        let nonce = self
            .owner
            .issue(&r.get_ref().container_id)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(ExecNonce {
            nonce: nonce.to_vec(),
        }))
    }

    async fn exec_process(
        &self,
        r: Request<ExecProcessRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = r.get_ref();
        if req.owner_signature.is_empty() {
            self.check("ExecProcessRequest", req)?;
        } else {
            // An owner-signed exec stands on the signature alone; a bad one is never passed on
            // to the policy.
            let verdict = self.owner.check(req);
            self.policy.audit_owner_exec(req, verdict.as_ref().err().map(|e| e.to_string()));
            verdict.map_err(|e| Status::permission_denied(format!("owner-signed exec refused: {e}")))?;
        }
        self.containers
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.args,
                &req.env,
                req.stdin,
                req.tty,
            )
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn stats_container(
        &self,
        r: Request<StatsContainerRequest>,
    ) -> Result<Response<StatsContainerResponse>, Status> {
        self.check("StatsContainerRequest", r.get_ref())?;
        let s = self.containers.stats(&r.get_ref().container_id).await.map_err(status)?;
        Ok(Response::new(StatsContainerResponse {
            memory_bytes: s.memory_bytes,
            cpu_usage_ns: s.cpu_usage_ns,
            pids: s.pids,
        }))
    }

    async fn create_container(
        &self,
        r: Request<CreateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        // The policy may pin the image: the agent then pulls that digest, not what the node named.
        let pinned = self.check_then("CreateContainerRequest", r.get_ref(), Some("pull_image"))?;
        self.containers
            .create_pinned(r.get_ref(), pinned.as_deref())
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn start_container(
        &self,
        r: Request<StartContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("StartContainerRequest", r.get_ref())?;
        self.containers.start(&r.get_ref().container_id).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn remove_container(
        &self,
        r: Request<RemoveContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("RemoveContainerRequest", r.get_ref())?;
        self.containers.remove(&r.get_ref().container_id).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_process(
        &self,
        r: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        self.check("WaitProcessRequest", r.get_ref())?;
        let req = r.get_ref();
        let status = self
            .containers
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(status)?;
        let oom_killed = self
            .containers
            .oom_killed(&req.container_id, &req.exec_id)
            .unwrap_or(false);
        // Output sealed to the owner stays sealed: the termination message, which the node
        // would read in the clear, is then withheld.
        let termination_message = if req.exec_id.is_empty() && self.log_recipient.is_none() {
            self.containers.termination_message(&req.container_id)
        } else {
            Vec::new()
        };
        Ok(Response::new(WaitProcessResponse {
            status,
            oom_killed,
            termination_message,
        }))
    }

    async fn signal_process(
        &self,
        r: Request<SignalProcessRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("SignalProcessRequest", r.get_ref())?;
        let req = r.get_ref();
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn read_stream(
        &self,
        r: Request<ReadStreamRequest>,
    ) -> Result<Response<ReadStreamResponse>, Status> {
        self.check("ReadStreamRequest", r.get_ref())?;
        let req = r.get_ref();
        let chunk = self
            .containers
            .read(
                &req.container_id,
                &req.exec_id,
                &req.stream,
                req.offset,
                req.len.clamp(1, 1 << 20) as usize,
                req.follow,
            )
            .await
            .map_err(status)?;
        let len = chunk.data.len() as u32;
        let (data, sealed) = match &self.log_recipient {
            Some(r) if !chunk.data.is_empty() => {
                let place = RecordPlace {
                    container_id: &req.container_id,
                    exec_id: &req.exec_id,
                    stream: &req.stream.to_ascii_lowercase(),
                    offset: chunk.offset,
                };
                (r.seal(&place, &chunk.data).map_err(|e| Status::internal(e.to_string()))?, true)
            }
            Some(_) => (Vec::new(), true),
            None => (chunk.data, false),
        };
        Ok(Response::new(ReadStreamResponse {
            data,
            offset: chunk.offset,
            eof: chunk.eof,
            sealed,
            len,
        }))
    }

    async fn list_containers(
        &self,
        r: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        self.check("ListContainersRequest", r.get_ref())?;
        let statuses = self.containers.statuses();
        Ok(Response::new(ListContainersResponse {
            container_ids: statuses.iter().map(|s| s.id.clone()).collect(),
            containers: statuses
                .into_iter()
                .map(|s| ContainerStatus {
                    id: s.id,
                    image: s.image,
                    state: s.state.into(),
                    exit_status: s.exit_status.unwrap_or(0),
                    created: s.created,
                })
                .collect(),
        }))
    }

    async fn get_guest_details(
        &self,
        r: Request<GetGuestDetailsRequest>,
    ) -> Result<Response<GuestDetails>, Status> {
        self.check("GetGuestDetailsRequest", r.get_ref())?;
        Ok(Response::new(GuestDetails {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_version: API_VERSION.into(),
            policy_id: self.policy.id(),
            initdata_digest: self.initdata_digest.clone(),
        }))
    }

    async fn set_policy(&self, r: Request<SetPolicyRequest>) -> Result<Response<Empty>, Status> {
        self.policy.set(&r.get_ref().policy).map_err(|e| match e {
            PolicyError::Denied(_) => Status::permission_denied(e.to_string()),
            PolicyError::Invalid(_) => Status::invalid_argument(e.to_string()),
        })?;
        Ok(Response::new(Empty {}))
    }
}

/// Serves `service` on a unix socket at `path` (created; replacing a stale one) until the
/// future is dropped or DestroySandbox was served.
pub async fn serve_unix(path: &Path, service: AgentService) -> std::io::Result<()> {
    // Bound (and listening) under a temporary name, then renamed: the socket appears only once
    // it accepts connections, so a launcher waiting for the path never sees a refusal.
    let tmp = path.with_extension("sock.tmp");
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::rename(&tmp, path)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let service = service.with_shutdown(tx);
    tonic::transport::Server::builder()
        .add_service(agent_server::AgentServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move {
                rx.recv().await;
            },
        )
        .await
        .map_err(std::io::Error::other)
}

/// Serves `service` on the streams the host opens over a pod VM's agent port (see
/// `coffer_podvm::mux`) until DestroySandbox was served or the port closes.
pub async fn serve_streams(
    streams: tokio::sync::mpsc::UnboundedReceiver<coffer_podvm::mux::MuxStream>,
    service: AgentService,
) -> std::io::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let service = service.with_shutdown(tx);
    let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(streams)
        .map(|s| Ok::<_, std::io::Error>(MuxConn(s)));
    tonic::transport::Server::builder()
        .add_service(agent_server::AgentServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            rx.recv().await;
        })
        .await
        .map_err(std::io::Error::other)
}

/// A multiplexed stream as a server connection.
struct MuxConn(coffer_podvm::mux::MuxStream);

impl tonic::transport::server::Connected for MuxConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for MuxConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for MuxConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A client of the agent API on the unix socket at `path` (the host side's connection).
pub async fn connect_unix(
    path: &Path,
) -> Result<agent_client::AgentClient<tonic::transport::Channel>, tonic::transport::Error> {
    Ok(agent_client::AgentClient::new(unix_channel(path).await?))
}

/// A client of the agent API over a pod VM's agent port (the keeper's own connection, before
/// it serves `agent.sock`).
pub async fn connect_mux(
    opener: coffer_podvm::mux::Opener,
) -> Result<agent_client::AgentClient<tonic::transport::Channel>, tonic::transport::Error> {
    let channel = channel_via(move || {
        let opener = opener.clone();
        async move { opener.open().await }
    })
    .await?;
    Ok(agent_client::AgentClient::new(channel))
}

/// A gRPC channel to a server on the unix socket `path` (the agent, containerd).
pub async fn unix_channel(
    path: &Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    channel_via(move || tokio::net::UnixStream::connect(path.clone())).await
}

/// A gRPC channel whose connections `connect` makes (the endpoint's URI is required by the
/// transport and unused).
async fn channel_via<F, Fut, S>(
    connect: F,
) -> Result<tonic::transport::Channel, tonic::transport::Error>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let connect = connect.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(connect().await?)) }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_sees_the_environment_the_container_gets() {
        let mut env: Vec<serde_json::Value> = ["GREETING=hi", "PATH=/bin", "GREETING=hello", "X"]
            .iter()
            .map(|s| serde_json::json!(s))
            .collect();
        effective_env(&mut env);
        assert_eq!(env, ["GREETING=hello", "PATH=/bin", "X"]);
    }
}
