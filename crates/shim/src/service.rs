//! The containerd Task API (runtime v2, `containerd.task.v2.Task`) mapped onto the agent API.
//!
//! One shim process serves one pod: containerd starts the shim for the pod's sandbox container
//! and, through the grouping of [`crate::Shim`]'s `start_shim`, reaches the same process for the
//! pod's other containers.
//!
//! | Task API | what the shim does |
//! |---|---|
//! | `Create` of the sandbox container | launches the sandbox with the pod's initdata; no pause process runs |
//! | `Create` of a container | `CreateContainer` with the image reference: the agent pulls it inside |
//! | `Start` | `StartContainer`; output is copied from the agent to containerd's FIFOs |
//! | `Exec`, `Start` of an exec | recorded, then `ExecProcess` at start (the pod's policy decides); its stdio like a container's |
//! | `Kill` | `SignalProcess`; for the sandbox container, `DestroySandbox` |
//! | `Wait`, `State`, exit events | from `WaitProcess` (or the keeper's end, for the sandbox), for containers and execs |
//! | `Stats` | `StatsContainer`, as cgroup v1 metrics |
//! | `Delete` | `RemoveContainer`; for the sandbox container, the sandbox's teardown |
//! | `Shutdown` | ends the shim once it serves no task |
//!
//! The submodules: tasks (`task`), execs (`exec`), what is followed of each process (`process`),
//! stdio and exits (`io`), events (`events`), stats (`stats`), the bundle's and an exec's specs
//! (`spec`), and errors and times as the two APIs speak them (`rpc`); this module holds the
//! service and answers the Task API.

mod events;
mod exec;
mod io;
mod process;
mod rpc;
mod spec;
mod stats;
mod task;
pub mod volumes;

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use coffer_agent::api::proto::TtyWinResizeRequest;
use containerd_shim::{
    api, protos::types::task::ProcessInfo, publisher::RemotePublisher, ExitSignal, Task,
    TtrpcContext, TtrpcResult,
};
use tokio::sync::Mutex;

use process::TaskEntry;
pub(crate) use rpc::timestamp;
use rpc::{agent_error, rpc};

use crate::{config::ShimConfig, sandbox::Sandbox, ShimError};

/// The task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    config: Result<ShimConfig, ShimError>,
    namespace: String,
    containerd: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    tasks: Mutex<HashMap<String, Arc<TaskEntry>>>,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
}

impl Service {
    /// A service for the pod served at `namespace`, reporting to containerd at `containerd`.
    pub fn new(
        namespace: &str,
        containerd: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config: ShimConfig::load(),
                namespace: namespace.into(),
                containerd: containerd.into(),
                publisher,
                exit,
                tasks: Mutex::new(HashMap::new()),
                sandboxes: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn config(&self) -> Result<&ShimConfig, ShimError> {
        self.inner.config.as_ref().map_err(|e| e.clone())
    }

    async fn task(&self, id: &str) -> Result<Arc<TaskEntry>, ShimError> {
        self.inner
            .tasks
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("task {id}")))
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        match self.create_task(req).await {
            Ok(pid) => Ok(api::CreateTaskResponse {
                pid,
                ..Default::default()
            }),
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "create refused");
                Err(e.into())
            }
        }
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        if let Err(e) = self.add_exec(req).await {
            tracing::warn!(task = %id, exec = %exec_id, error = %e, "exec refused");
            return Err(e.into());
        }
        Ok(api::Empty::new())
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = if req.exec_id.is_empty() {
            self.start_task(&req.id).await?
        } else {
            self.start_exec(&req.id, &req.exec_id).await?
        };
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let t = self.task(&req.id).await?;
        let p = t.process(&req.exec_id)?;
        let exit = p.exited();
        Ok(api::StateResponse {
            id: p.event_id().to_string(),
            bundle: t.bundle.clone(),
            pid: t.sandbox().pid,
            status: p.status().into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or_default(),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let t = self.task(&req.id).await?;
        let mut rx = t.process(&req.exec_id)?.exit.subscribe();
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map(|e| e.expect("waited for"))
            .map_err(|_| {
                rpc(
                    containerd_shim::protos::ttrpc::Code::UNKNOWN,
                    "task dropped",
                )
            })?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.kill_task(req).await?;
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            return Ok(self.delete_exec(&req.id, &req.exec_id).await?);
        }
        Ok(self.delete_task(&req.id).await?)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let t = self.task(&req.id).await?;
        Ok(api::PidsResponse {
            processes: vec![ProcessInfo {
                pid: t.sandbox().pid,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(api::StatsResponse {
            stats: Some(self.stats_of(&req.id).await?).into(),
            ..Default::default()
        })
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let t = self.task(&req.id).await?;
        let mut c = t.sandbox().client.clone();
        c.tty_win_resize(TtyWinResizeRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            rows: req.height,
            columns: req.width,
        })
        .await
        .map_err(|e| agent_error("resizing the terminal", e))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        // stdin ends when containerd closes its FIFO; the copy then closes the container's.
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        // Resources are the sandbox's, fixed at launch.
        Ok(api::Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pid = self
            .task(&req.id)
            .await
            .map(|t| t.sandbox().pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let left = self.inner.tasks.lock().await.len();
        tracing::debug!(task = %req.id, tasks_left = left, "shutdown requested");
        if left == 0 {
            for sb in self.inner.sandboxes.lock().await.values() {
                sb.destroy().await;
            }
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
