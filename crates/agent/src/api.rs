//! The agent's gRPC API (`proto/coffer/agent/v1/agent.proto`), every request checked against the
//! agent policy under its message name before anything happens. A denial is `PermissionDenied`
//! naming the request ("denied by policy: ExecProcessRequest").
//!
//! Built so far: the policy gate on every request, `GetGuestDetails`, `SetPolicy`, and the
//! container lifecycle (`CreateContainer`, `StartContainer`, `WaitProcess`, `SignalProcess`,
//! `ReadStream`, `RemoveContainer`, `ListContainers`) on the OCI runtime. Requests the policy
//! allows but that are not built yet answer `Unimplemented`, saying so.

use std::{path::Path, sync::Arc};

use tonic::{Request, Response, Status};

use crate::{
    container::{ContainerError, Containers},
    policy::{AgentPolicy, PolicyError},
};

/// Generated protobuf types and service traits.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("coffer.agent.v1");
}

use proto::{agent_server::Agent, *};

/// The API version this agent speaks.
pub const API_VERSION: &str = "coffer.agent.v1";

/// The agent service.
pub struct AgentService {
    policy: Arc<AgentPolicy>,
    initdata_digest: String,
    containers: Arc<Containers>,
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
        }
    }

    fn check<T: serde::Serialize>(&self, name: &str, req: &T) -> Result<(), Status> {
        let input = serde_json::to_value(req)
            .map_err(|e| Status::internal(format!("cannot encode {name}: {e}")))?;
        self.policy.check(name, &input).map_err(|e| match e {
            PolicyError::Denied(_) => Status::permission_denied(e.to_string()),
            PolicyError::Invalid(_) => Status::internal(e.to_string()),
        })
    }
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
        destroy_sandbox(DestroySandboxRequest) -> Empty;
        exec_process(ExecProcessRequest) -> Empty;
        write_stream(WriteStreamRequest) -> WriteStreamResponse;
        close_stdin(CloseStdinRequest) -> Empty;
        tty_win_resize(TtyWinResizeRequest) -> Empty;
        stats_container(StatsContainerRequest) -> StatsContainerResponse;
    }

    async fn create_container(
        &self,
        r: Request<CreateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("CreateContainerRequest", r.get_ref())?;
        self.containers.create(r.get_ref()).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn start_container(
        &self,
        r: Request<StartContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("StartContainerRequest", r.get_ref())?;
        self.containers.start(&r.get_ref().container_id).map_err(status)?;
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
        if !r.get_ref().exec_id.is_empty() {
            return not_built("WaitProcess for exec processes");
        }
        let status = self.containers.wait(&r.get_ref().container_id).await.map_err(status)?;
        Ok(Response::new(WaitProcessResponse { status }))
    }

    async fn signal_process(
        &self,
        r: Request<SignalProcessRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.check("SignalProcessRequest", r.get_ref())?;
        let req = r.get_ref();
        self.containers.signal(&req.container_id, req.signal).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn read_stream(
        &self,
        r: Request<ReadStreamRequest>,
    ) -> Result<Response<ReadStreamResponse>, Status> {
        self.check("ReadStreamRequest", r.get_ref())?;
        let req = r.get_ref();
        let data = self
            .containers
            .read(&req.container_id, &req.stream, req.len.clamp(1, 1 << 20) as usize)
            .await
            .map_err(status)?;
        Ok(Response::new(ReadStreamResponse { data }))
    }

    async fn list_containers(
        &self,
        r: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        self.check("ListContainersRequest", r.get_ref())?;
        Ok(Response::new(ListContainersResponse {
            container_ids: self.containers.list(),
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

/// Serves `service` on a unix socket at `path` (created; removed first if stale) until the
/// future is dropped.
pub async fn serve_unix(path: &Path, service: AgentService) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    tonic::transport::Server::builder()
        .add_service(agent_server::AgentServer::new(service))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .map_err(std::io::Error::other)
}

/// A client of the agent API on the unix socket at `path` (the host side's connection).
pub async fn connect_unix(
    path: &Path,
) -> Result<agent_client::AgentClient<tonic::transport::Channel>, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by the transport and unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?;
    Ok(agent_client::AgentClient::new(channel))
}
