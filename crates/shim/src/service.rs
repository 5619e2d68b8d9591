//! The containerd Task API (runtime v2, `containerd.task.v2.Task`) mapped onto the agent API.
//!
//! One shim process serves one pod: containerd starts the shim for the pod's sandbox container
//! and, through the grouping of [`crate::Shim::start_shim`], reaches the same process for the
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

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use async_trait::async_trait;
use coffer_agent::api::proto::{
    CloseStdinRequest, CreateContainerRequest, ExecProcessRequest, ReadStreamRequest,
    RemoveContainerRequest, SignalProcessRequest, StartContainerRequest, StatsContainerRequest,
    TtyWinResizeRequest, WaitProcessRequest, WriteStreamRequest,
};
use containerd_shim::{
    api,
    protos::{
        cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat},
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
        },
        protobuf::{
            well_known_types::{any::Any, timestamp::Timestamp},
            Message, MessageDyn,
        },
        topics,
        types::task::{ProcessInfo, Status},
    },
    publisher::RemotePublisher,
    Context, ExitSignal, Task, TtrpcContext, TtrpcResult,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{watch, Mutex},
};

use crate::{
    annotations::{self, Role},
    config::ShimConfig,
    sandbox::{self, Sandbox},
    ShimError,
};

/// How a container ended.
#[derive(Debug, Clone, Copy)]
struct Exit {
    status: u32,
    at: SystemTime,
}

/// One process the shim follows: a container's own (`exec_id` empty) or an exec in it.
struct Process {
    container_id: String,
    exec_id: String,
    sandbox: Arc<Sandbox>,
    /// An exec's command and environment (a container's come with its creation).
    args: Vec<String>,
    env: Vec<String>,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    started: std::sync::atomic::AtomicBool,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    fn new(
        container_id: &str,
        exec_id: &str,
        sandbox: Arc<Sandbox>,
        args: Vec<String>,
        env: Vec<String>,
        stdio: [&str; 3],
        terminal: bool,
    ) -> Self {
        Self {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            sandbox,
            args,
            env,
            stdin: stdio[0].into(),
            stdout: stdio[1].into(),
            stderr: stdio[2].into(),
            terminal,
            started: Default::default(),
            exit: watch::channel(None).0,
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records the exit once; true when this call recorded it.
    fn record_exit(&self, status: u32) -> bool {
        self.exit.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some(Exit {
                status,
                at: SystemTime::now(),
            });
            true
        })
    }

    fn is_started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn mark_started(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn status(&self) -> Status {
        if self.exited().is_some() {
            Status::STOPPED
        } else if self.is_started() {
            Status::RUNNING
        } else {
            Status::CREATED
        }
    }

    /// The id containerd knows this process by in events (the container's, or the exec's).
    fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }
}

/// One task (container) the shim serves.
struct TaskEntry {
    id: String,
    bundle: String,
    /// The pod's sandbox container, or a container in a sandbox.
    is_sandbox: bool,
    /// A standalone container owns its sandbox and ends it on delete.
    owns_sandbox: bool,
    /// The container's own process (which holds the task's sandbox).
    init: Arc<Process>,
    /// Execs in the container, by exec id.
    execs: std::sync::Mutex<HashMap<String, Arc<Process>>>,
    /// The signal a `Kill` of the sandbox container asked for (0: none), so that the sandbox's
    /// end is reported as that kill rather than a crash.
    kill_signal: std::sync::atomic::AtomicU32,
}

impl TaskEntry {
    /// The sandbox the task runs in.
    fn sandbox(&self) -> &Arc<Sandbox> {
        &self.init.sandbox
    }

    /// The process `exec_id` (the container's own when empty).
    fn process(&self, exec_id: &str) -> Result<Arc<Process>, ShimError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} in task {}", self.id)))
    }
}

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

/// A ttrpc error with a gRPC code containerd understands.
fn rpc(code: containerd_shim::protos::ttrpc::Code, msg: impl Into<String>) -> TtrpcError {
    containerd_shim::protos::ttrpc::Error::RpcStatus(containerd_shim::protos::ttrpc::get_status(
        code,
        msg.into(),
    ))
}

type TtrpcError = containerd_shim::protos::ttrpc::Error;

impl From<ShimError> for TtrpcError {
    fn from(e: ShimError) -> Self {
        use containerd_shim::protos::ttrpc::Code;
        let code = match &e {
            ShimError::Invalid(_) | ShimError::Config(_) => Code::INVALID_ARGUMENT,
            ShimError::Refused(_) => Code::PERMISSION_DENIED,
            ShimError::NotFound(_) => Code::NOT_FOUND,
            _ => Code::UNKNOWN,
        };
        rpc(code, e.to_string())
    }
}

/// `t` as a protobuf timestamp.
pub(crate) fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

fn agent_error(what: &str, e: tonic::Status) -> ShimError {
    match e.code() {
        tonic::Code::PermissionDenied => {
            ShimError::Refused(format!("{what}: the agent refused: {}", e.message()))
        }
        tonic::Code::NotFound => ShimError::NotFound(format!("{what}: {}", e.message())),
        _ => ShimError::Agent(format!("{what}: {}", e.message())),
    }
}

/// The image reference as the agent takes it.
fn agent_image(reference: &str) -> String {
    if reference.contains("://") {
        reference.to_string()
    } else {
        format!("docker://{reference}")
    }
}

/// The parts of the bundle's OCI spec the shim uses.
struct Spec {
    annotations: BTreeMap<String, String>,
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    readonly_rootfs: bool,
    /// `linux.resources.memory.limit` (0: none).
    memory_limit: u64,
}

fn read_spec(bundle: &Path) -> Result<Spec, ShimError> {
    let path = bundle.join("config.json");
    let bad = |why: String| ShimError::Invalid(format!("{}: {why}", path.display()));
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let annotations = v["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Spec {
        annotations,
        args: strings(&v["process"]["args"]),
        env: strings(&v["process"]["env"]),
        cwd: v["process"]["cwd"].as_str().unwrap_or_default().to_string(),
        readonly_rootfs: v["root"]["readonly"].as_bool().unwrap_or(false),
        memory_limit: v["linux"]["resources"]["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .unwrap_or(0) as u64,
    })
}

/// What the shim takes of an exec's process spec (runtime-spec `Process`, as JSON).
struct ExecSpec {
    args: Vec<String>,
    env: Vec<String>,
}

/// Parses an exec's process spec; the error says what is wrong with it. Its working directory
/// and user are the container's: the agent runs execs as the container's process runs.
fn exec_spec(json: &[u8]) -> Result<ExecSpec, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("is not JSON: {e}"))?;
    let strings = |key: &str| -> Result<Vec<String>, String> {
        match &v[key] {
            serde_json::Value::Null => Ok(Vec::new()),
            serde_json::Value::Array(a) => a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(String::from)
                        .ok_or_else(|| format!("has a non-string in {key}"))
                })
                .collect(),
            _ => Err(format!("has {key} that is not a list")),
        }
    };
    let args = strings("args")?;
    if args.is_empty() {
        return Err("has no args".into());
    }
    Ok(ExecSpec {
        args,
        env: strings("env")?,
    })
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

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .inner
            .publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "cannot publish the event");
        }
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

    /// The initdata of a sandbox: the annotation's, else the configured default.
    fn initdata(&self, spec: &Spec) -> Result<String, ShimError> {
        if let Some(text) = annotations::initdata(&spec.annotations)? {
            return Ok(text);
        }
        match &self.config()?.default_initdata {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ShimError::Config(format!("default_initdata {}: {e}", p.display()))),
            None => Err(ShimError::Refused(format!(
                "the pod has no initdata ({}) and the node sets no default_initdata",
                annotations::INITDATA
            ))),
        }
    }

    async fn create_task(&self, req: api::CreateTaskRequest) -> Result<u32, ShimError> {
        let config = self.config()?.clone();
        if self.inner.tasks.lock().await.contains_key(&req.id) {
            return Err(ShimError::Invalid(format!("task {} exists", req.id)));
        }
        let spec = read_spec(Path::new(&req.bundle))?;
        annotations::refuse_overrides(&spec.annotations)?;
        let role = annotations::role(&spec.annotations)?;
        let (sandbox, image, is_sandbox, owns_sandbox) = match role {
            Role::Sandbox => {
                let initdata = self.initdata(&spec)?;
                let name = sandbox::name_for(&req.id);
                let sb = Arc::new(Sandbox::launch(&config, &name, &initdata).await?);
                self.inner
                    .sandboxes
                    .lock()
                    .await
                    .insert(req.id.clone(), sb.clone());
                (sb, None, true, false)
            }
            Role::PodContainer { sandbox_id, image } => {
                let sb = self
                    .inner
                    .sandboxes
                    .lock()
                    .await
                    .get(&sandbox_id)
                    .cloned()
                    .ok_or_else(|| {
                        ShimError::NotFound(format!(
                            "pod sandbox {sandbox_id} is not served by this shim"
                        ))
                    })?;
                (sb, Some(image), false, false)
            }
            Role::Standalone => {
                let image = crate::containerd::image_of(
                    &self.inner.containerd,
                    &self.inner.namespace,
                    &req.id,
                )
                .await?;
                let initdata = self.initdata(&spec)?;
                let name = sandbox::name_for(&req.id);
                let sb = Arc::new(Sandbox::launch(&config, &name, &initdata).await?);
                (sb, Some(image), false, true)
            }
        };
        if let Some(image) = &image {
            let mut c = sandbox.client.clone();
            let created = c
                .create_container(CreateContainerRequest {
                    container_id: req.id.clone(),
                    image: agent_image(image),
                    args: spec.args.clone(),
                    env: spec.env.clone(),
                    working_dir: spec.cwd.clone(),
                    read_only_rootfs: spec.readonly_rootfs,
                    tty: req.terminal,
                    stdin: !req.stdin.is_empty(),
                    memory_limit_bytes: spec.memory_limit,
                })
                .await
                .map_err(|e| agent_error(&format!("creating container {}", req.id), e));
            if let Err(e) = created {
                if owns_sandbox {
                    sandbox.destroy().await;
                }
                return Err(e);
            }
        }
        let entry = Arc::new(TaskEntry {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            is_sandbox,
            owns_sandbox,
            init: Arc::new(Process::new(
                &req.id,
                "",
                sandbox.clone(),
                Vec::new(),
                Vec::new(),
                [&req.stdin, &req.stdout, &req.stderr],
                req.terminal,
            )),
            execs: Default::default(),
            kill_signal: Default::default(),
        });
        self.inner
            .tasks
            .lock()
            .await
            .insert(req.id.clone(), entry.clone());
        // Every task ends when its sandbox does; unasked, that is a crash (VM or agent gone).
        let me = self.clone();
        tokio::spawn(async move {
            entry.sandbox().wait_gone().await;
            let asked = entry.kill_signal.load(std::sync::atomic::Ordering::SeqCst);
            let status = if asked > 0 { 128 + asked } else { 255 };
            if entry.init.record_exit(status) {
                if asked == 0 {
                    tracing::warn!(task = %entry.id, sandbox = %entry.sandbox().name, "the sandbox ended");
                }
                me.publish_exit(&entry.init).await;
            }
        });
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                pid: sandbox.pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(sandbox.pid)
    }

    async fn publish_exit(&self, p: &Process) {
        let Some(exit) = p.exited() else { return };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: p.container_id.clone(),
                id: p.event_id().to_string(),
                pid: p.sandbox.pid,
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            }),
        )
        .await;
    }

    async fn start_task(&self, id: &str) -> Result<u32, ShimError> {
        let t = self.task(id).await?;
        if t.is_sandbox {
            t.init.mark_started();
        } else {
            let mut c = t.sandbox().client.clone();
            c.start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map_err(|e| agent_error(&format!("starting container {id}"), e))?;
            t.init.mark_started();
            let me = self.clone();
            let t2 = t.clone();
            tokio::spawn(async move { me.follow(t2.init.clone()).await });
        }
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: id.into(),
                pid: t.sandbox().pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(t.sandbox().pid)
    }

    /// Copies a running process's stdio between containerd's FIFOs and the agent, then
    /// records and publishes its exit (after an OOM event when the OOM killer ended the
    /// container).
    async fn follow(&self, p: Arc<Process>) {
        if !p.stdin.is_empty() {
            tokio::spawn(pump_stdin(p.clone()));
        }
        let out = pump_output(p.clone(), "stdout", p.stdout.clone());
        let err = pump_output(p.clone(), "stderr", p.stderr.clone());
        let (a, b) = tokio::join!(out, err);
        for (stream, r) in [("stdout", a), ("stderr", b)] {
            if let Err(e) = r {
                tracing::warn!(container = %p.container_id, exec = %p.exec_id, stream, error = %e, "output copy ended");
            }
        }
        let mut c = p.sandbox.client.clone();
        let waited = c
            .wait_process(WaitProcessRequest {
                container_id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
            })
            .await;
        let (status, oom) = match waited {
            Ok(r) => {
                let r = r.into_inner();
                (r.status.max(0) as u32, r.oom_killed)
            }
            Err(e) => {
                tracing::warn!(container = %p.container_id, exec = %p.exec_id, error = %e.message(), "waiting for the process");
                (255, false)
            }
        };
        if oom && p.exec_id.is_empty() {
            // Before the exit, as runc's shim does: the kubelet then reports OOMKilled.
            self.publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: p.container_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        }
        if p.record_exit(status) {
            self.publish_exit(&p).await;
        }
    }

    /// containerd's `Exec`: records the exec; the agent runs it at `Start`, if its policy
    /// allows (the default policy does not).
    async fn add_exec(&self, req: api::ExecProcessRequest) -> Result<(), ShimError> {
        let t = self.task(&req.id).await?;
        if t.is_sandbox {
            return Err(ShimError::Invalid(format!(
                "task {} is the pod's sandbox, which runs no processes to exec into",
                req.id
            )));
        }
        if t.init.exited().is_some() || !t.init.is_started() {
            return Err(ShimError::Invalid(format!(
                "container {} is not running",
                req.id
            )));
        }
        let spec = exec_spec(&req.spec.value).map_err(|why| {
            ShimError::Invalid(format!("exec {}: its process spec {why}", req.exec_id))
        })?;
        let p = Arc::new(Process::new(
            &req.id,
            &req.exec_id,
            t.sandbox().clone(),
            spec.args,
            spec.env,
            [&req.stdin, &req.stdout, &req.stderr],
            req.terminal,
        ));
        {
            let mut execs = t.execs.lock().unwrap_or_else(|p| p.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(ShimError::Invalid(format!(
                    "exec {} exists in task {}",
                    req.exec_id, req.id
                )));
            }
            execs.insert(req.exec_id.clone(), p);
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    /// `Start` of an exec: `ExecProcess` (the agent's policy decides), then its stdio is
    /// followed like a container's.
    async fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let t = self.task(id).await?;
        let p = t.process(exec_id)?;
        if p.is_started() {
            return Err(ShimError::Invalid(format!(
                "exec {exec_id} was already started"
            )));
        }
        let mut c = p.sandbox.client.clone();
        c.exec_process(ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            args: p.args.clone(),
            env: p.env.clone(),
            tty: p.terminal,
            stdin: !p.stdin.is_empty(),
            ..Default::default()
        })
        .await
        .map_err(|e| agent_error(&format!("exec {exec_id} in container {id}"), e))?;
        p.mark_started();
        let me = self.clone();
        let p2 = p.clone();
        tokio::spawn(async move { me.follow(p2).await });
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: id.into(),
                exec_id: exec_id.into(),
                pid: p.sandbox.pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(p.sandbox.pid)
    }

    /// `Delete` of an exec: forgets a finished (or never started) exec.
    async fn delete_exec(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse, ShimError> {
        let t = self.task(id).await?;
        let p = t.process(exec_id)?;
        if p.is_started() && p.exited().is_none() {
            return Err(ShimError::Invalid(format!(
                "exec {exec_id} in container {id} is still running"
            )));
        }
        t.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(exec_id);
        p.record_exit(255);
        let exit = p.exited().expect("recorded above");
        Ok(api::DeleteResponse {
            pid: p.sandbox.pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn kill_task(&self, req: api::KillRequest) -> Result<(), ShimError> {
        let t = self.task(&req.id).await?;
        let p = t.process(&req.exec_id)?;
        tracing::debug!(task = %req.id, exec = %req.exec_id, signal = req.signal, sandbox = t.is_sandbox, "kill");
        if p.exited().is_some() {
            return Err(ShimError::NotFound(format!(
                "task {}: process already finished",
                p.event_id()
            )));
        }
        if t.is_sandbox {
            // The sandbox's "process" is the sandbox: any signal ends it. This answers once the
            // teardown has begun, as a runc shim answers once the signal is sent; the exit is
            // recorded and published when the keeper is gone (the watcher in `create_task`,
            // with this signal). containerd deletes the task and shuts the shim down as soon as
            // it sees that exit, so publishing it before this answer could cut the answer off.
            t.kill_signal
                .store(req.signal.max(1), std::sync::atomic::Ordering::SeqCst);
            t.sandbox().stop().await;
            return Ok(());
        }
        if !p.is_started() {
            // Never started: nothing runs; it ends here.
            if p.record_exit(128 + req.signal) {
                self.publish_exit(&p).await;
            }
            return Ok(());
        }
        let mut c = t.sandbox().client.clone();
        c.signal_process(SignalProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal,
        })
        .await
        .map_err(|e| agent_error(&format!("signalling {}", p.event_id()), e))?;
        Ok(())
    }

    async fn delete_task(&self, id: &str) -> Result<api::DeleteResponse, ShimError> {
        let t = self.task(id).await?;
        tracing::debug!(task = %id, sandbox = t.is_sandbox, "delete");
        if t.is_sandbox {
            t.sandbox().destroy().await;
            self.inner.sandboxes.lock().await.remove(id);
        } else {
            if t.sandbox().alive() {
                let mut c = t.sandbox().client.clone();
                let _ = c
                    .remove_container(RemoveContainerRequest {
                        container_id: id.into(),
                    })
                    .await;
            }
            if t.owns_sandbox {
                t.sandbox().destroy().await;
            }
        }
        t.init.record_exit(255);
        self.inner.tasks.lock().await.remove(id);
        let exit = t.init.exited().expect("recorded above");
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.into(),
                id: id.into(),
                pid: t.sandbox().pid,
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse {
            pid: t.sandbox().pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn stats_of(&self, id: &str) -> Result<Any, ShimError> {
        let t = self.task(id).await?;
        let mut metrics = Metrics::new();
        if !t.is_sandbox {
            let mut c = t.sandbox().client.clone();
            let s = c
                .stats_container(StatsContainerRequest {
                    container_id: id.into(),
                })
                .await
                .map_err(|e| agent_error(&format!("stats of container {id}"), e))?
                .into_inner();
            metrics.memory = Some(MemoryStat {
                usage: Some(MemoryEntry {
                    usage: s.memory_bytes,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into();
            metrics.cpu = Some(CPUStat {
                usage: Some(CPUUsage {
                    total: s.cpu_usage_ns,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into();
            metrics.pids = Some(PidsStat {
                current: s.pids.into(),
                ..Default::default()
            })
            .into();
        }
        let mut any = Any::new();
        // containerd resolves the type by its protobuf name.
        any.type_url = "io.containerd.cgroups.v1.Metrics".into();
        any.value = metrics
            .write_to_bytes()
            .map_err(|e| ShimError::Agent(e.to_string()))?;
        Ok(any)
    }
}

/// Copies one output stream of a container from the agent into containerd's FIFO (or drops it
/// when containerd gave none), until the stream ends. Output the policy seals stays sealed: it
/// is written as the JSON lines `coffer logs --sealed` opens with the owner's key.
async fn pump_output(p: Arc<Process>, stream: &'static str, fifo: String) -> anyhow::Result<()> {
    let mut out = if fifo.is_empty() || (stream == "stderr" && p.terminal) {
        None
    } else {
        Some(open_fifo_for_write(Path::new(&fifo)).await?)
    };
    let mut c = p.sandbox.client.clone();
    let mut offset = 0u64;
    loop {
        let r = c
            .read_stream(ReadStreamRequest {
                container_id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
                stream: stream.into(),
                len: 64 << 10,
                offset,
                follow: true,
            })
            .await;
        let r = match r {
            Ok(r) => r.into_inner(),
            Err(e) if e.code() == tonic::Code::PermissionDenied => {
                // The policy keeps this output inside the sandbox.
                tracing::info!(container = %p.container_id, exec = %p.exec_id, stream, "the agent policy denies reading the output");
                return Ok(());
            }
            Err(e) => anyhow::bail!("reading {stream}: {}", e.message()),
        };
        if r.len == 0 && r.data.is_empty() {
            if r.eof {
                return Ok(());
            }
            continue;
        }
        let bytes = if r.sealed {
            let mut line = serde_json::to_vec(&coffer_wire::sealed::SealedLine {
                container_id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
                stream: stream.into(),
                offset: r.offset,
                record: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &r.data),
            })?;
            line.push(b'\n');
            line
        } else {
            r.data
        };
        offset = r.offset + u64::from(r.len);
        if let Some(out) = out.as_mut() {
            if out.write_all(&bytes).await.is_err() {
                // The reader went away (containerd restarted): keep draining.
                tracing::info!(container = %p.container_id, exec = %p.exec_id, stream, "the output's reader is gone");
                return Ok(());
            }
        }
    }
}

/// Copies containerd's stdin FIFO into the container, then closes its stdin.
async fn pump_stdin(p: Arc<Process>) {
    let mut c = p.sandbox.client.clone();
    if let Ok(mut fifo) = tokio::fs::File::open(&p.stdin).await {
        let mut buf = vec![0u8; 32 << 10];
        while let Ok(n) = fifo.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let sent = c
                .write_stream(WriteStreamRequest {
                    container_id: p.container_id.clone(),
                    exec_id: p.exec_id.clone(),
                    data: buf[..n].to_vec(),
                })
                .await;
            if sent.is_err() {
                break;
            }
        }
    }
    let _ = c
        .close_stdin(CloseStdinRequest {
            container_id: p.container_id.clone(),
            exec_id: p.exec_id.clone(),
        })
        .await;
}

/// Opens a FIFO containerd reads for writing (containerd opens its end first).
async fn open_fifo_for_write(path: &Path) -> anyhow::Result<tokio::fs::File> {
    let path: PathBuf = path.to_path_buf();
    let f = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))
    })
    .await??;
    Ok(tokio::fs::File::from_std(f))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_spec_gives_the_agent_its_request() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            serde_json::json!({
                "process": {"args": ["/bin/sh", "-c", "echo hi"], "env": ["A=1"], "cwd": "/srv"},
                "root": {"path": "rootfs", "readonly": true},
                "linux": {"resources": {"memory": {"limit": 33554432}}},
                "annotations": {annotations::CONTAINER_TYPE: "container", "n": "v"},
            })
            .to_string(),
        )
        .unwrap();
        let s = read_spec(d.path()).unwrap();
        assert_eq!(s.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            (s.env.as_slice(), s.cwd.as_str()),
            (&["A=1".to_string()][..], "/srv")
        );
        assert!(s.readonly_rootfs);
        assert_eq!(s.memory_limit, 32 << 20);
        assert_eq!(s.annotations["n"], "v");

        std::fs::write(d.path().join("config.json"), "{").unwrap();
        let e = read_spec(d.path()).err().unwrap().to_string();
        assert!(e.contains("config.json"), "{e}");
    }

    #[test]
    fn an_exec_takes_args_and_env_from_its_process_spec_and_bad_specs_are_named() {
        let spec = exec_spec(
            br#"{"args":["/bin/sh","-c","id"],"env":["A=1"],"cwd":"/","terminal":false}"#,
        )
        .unwrap();
        assert_eq!(spec.args, ["/bin/sh", "-c", "id"]);
        assert_eq!(spec.env, ["A=1"]);
        assert_eq!(
            exec_spec(br#"{"args":["ls"]}"#).unwrap().env,
            Vec::<String>::new()
        );
        for (bad, why) in [
            (&b"not json"[..], "is not JSON"),
            (br#"{"env":["A=1"]}"#, "has no args"),
            (br#"{"args":[]}"#, "has no args"),
            (br#"{"args":"ls"}"#, "has args that is not a list"),
            (br#"{"args":["ls",1]}"#, "has a non-string in args"),
            (
                br#"{"args":["ls"],"env":[null]}"#,
                "has a non-string in env",
            ),
        ] {
            let err = exec_spec(bad).err().unwrap();
            assert!(err.starts_with(why), "{err}");
        }
    }

    #[test]
    fn image_references_get_the_registry_transport() {
        assert_eq!(
            agent_image("r.example:5000/app:v1"),
            "docker://r.example:5000/app:v1"
        );
        assert_eq!(agent_image("docker://r/app:v1"), "docker://r/app:v1");
    }
}
