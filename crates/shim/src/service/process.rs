//! What the shim follows of each task: the container's own process and its execs, whether they
//! started, and how they ended.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use containerd_shim::protos::types::task::Status;
use tokio::sync::watch;

use crate::{sandbox::Sandbox, ShimError};

/// How a container ended.
#[derive(Debug, Clone, Copy)]
pub(super) struct Exit {
    pub(super) status: u32,
    pub(super) at: SystemTime,
}

/// One process the shim follows: a container's own (`exec_id` empty) or an exec in it.
pub(super) struct Process {
    pub(super) container_id: String,
    pub(super) exec_id: String,
    pub(super) sandbox: Arc<Sandbox>,
    /// An exec's command and environment (a container's come with its creation).
    pub(super) args: Vec<String>,
    pub(super) env: Vec<String>,
    pub(super) stdin: String,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) terminal: bool,
    pub(super) started: std::sync::atomic::AtomicBool,
    pub(super) exit: watch::Sender<Option<Exit>>,
    /// The kubelet's termination-log file on the node, for a container's own process whose
    /// spec mounts one: the guest's message is written there at the exit.
    pub(super) termination_log: std::sync::OnceLock<std::path::PathBuf>,
}

impl Process {
    pub(super) fn new(
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
            termination_log: Default::default(),
        }
    }

    pub(super) fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records the exit once; true when this call recorded it.
    pub(super) fn record_exit(&self, status: u32) -> bool {
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

    pub(super) fn is_started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(super) fn mark_started(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn status(&self) -> Status {
        if self.exited().is_some() {
            Status::STOPPED
        } else if self.is_started() {
            Status::RUNNING
        } else {
            Status::CREATED
        }
    }

    /// The id containerd knows this process by in events (the container's, or the exec's).
    pub(super) fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }
}

/// One task (container) the shim serves.
pub(super) struct TaskEntry {
    pub(super) id: String,
    pub(super) bundle: String,
    /// The pod's sandbox container, or a container in a sandbox.
    pub(super) is_sandbox: bool,
    /// A standalone container owns its sandbox and ends it on delete.
    pub(super) owns_sandbox: bool,
    /// The container's own process (which holds the task's sandbox).
    pub(super) init: Arc<Process>,
    /// Execs in the container, by exec id.
    pub(super) execs: std::sync::Mutex<HashMap<String, Arc<Process>>>,
    /// The signal a `Kill` of the sandbox container asked for (0: none), so that the sandbox's
    /// end is reported as that kill rather than a crash.
    pub(super) kill_signal: std::sync::atomic::AtomicU32,
}

impl TaskEntry {
    /// The sandbox the task runs in.
    pub(super) fn sandbox(&self) -> &Arc<Sandbox> {
        &self.init.sandbox
    }

    /// The process `exec_id` (the container's own when empty).
    pub(super) fn process(&self, exec_id: &str) -> Result<Arc<Process>, ShimError> {
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
