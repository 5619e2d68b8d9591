//! What can go wrong with a sandbox's directory, its cgroups, or stopping it.

use std::{path::PathBuf, time::Duration};

/// Errors of sandbox management (not of a keeper's start: see [`crate::KeeperError`]).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The name cannot name a sandbox.
    #[error("name {0:?}: use 1-64 ASCII letters, digits, '-' or '_'")]
    InvalidName(String),
    /// No sandbox of that name exists.
    #[error("no sandbox named {0} (see coffer ps)")]
    NotFound(String),
    /// The sandbox's keeper still holds it.
    #[error("sandbox {0} is running")]
    Running(String),
    /// A container in the sandbox runs and the stop was not forced.
    #[error("container {0} is running: stop it first or use `coffer rm -f {0}`")]
    ContainerRunning(String),
    /// The sandbox failed; its keeper left this record.
    #[error("sandbox {name} failed: {record}\n(`coffer rm {name}` removes it)")]
    Failed {
        /// The sandbox.
        name: String,
        /// Why, with the last console lines.
        record: String,
    },
    /// The agent's socket does not answer.
    #[error("cannot reach the agent of sandbox {name}: {source}")]
    Unreachable {
        /// The sandbox.
        name: String,
        /// The connection error.
        source: tonic::transport::Error,
    },
    /// The agent answered a request with an error.
    #[error("sandbox {name}: {what}: {}", describe(.status))]
    Agent {
        /// The sandbox.
        name: String,
        /// What was asked.
        what: &'static str,
        /// The agent's answer.
        status: Box<tonic::Status>,
    },
    /// The keeper did not finish its teardown in time.
    #[error("sandbox {name} did not stop within {} s (keeper pid {pid:?})", wait.as_secs())]
    Stuck {
        /// The sandbox.
        name: String,
        /// How long was waited.
        wait: Duration,
        /// The keeper's process id, when known.
        pid: Option<i32>,
    },
    /// A cgroup could not be removed (its processes did not die).
    #[error("cannot remove cgroup {}: {source}", path.display())]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file or directory operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The sandbox ended with an error (the keeper's reason, as recorded).
    #[error("{0}")]
    Ended(String),
}

/// An agent's error in one phrase: a policy refusal, a gone agent, or its message.
fn describe(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::PermissionDenied => format!("the agent refused: {}", s.message()),
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            format!("the sandbox's agent is gone ({})", s.message())
        }
        _ => s.message().to_string(),
    }
}
