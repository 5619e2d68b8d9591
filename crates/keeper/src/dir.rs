//! A sandbox's directory under the state directory: whether a keeper holds it, its failure
//! record, reaping what a killed keeper left, and stopping a running sandbox through its agent.
//!
//! Layout of `<state-dir>/<name>/`: `keeper.lock` (held exclusively by the keeper for its whole
//! life), `keeper.pid`, `keeper.log`, `agent.sock` (once the agent serves), `agent.log` (the
//! agent's log, or a pod VM's console), `egress.log`, `audit.jsonl` (the agent's policy
//! decisions), and per kind: `psp.sock`, `net.sock` and `state/` (a process sandbox), or
//! `psp-chan.sock`, `agent-chan.sock`, `qmp.sock`, `scratch.img`, `launch.json` and `qemu.log` (a
//! pod VM);
//! `cni.json` while the sandbox is attached to a CNI network ([`crate::cni`]), `host.netns`
//! (the host's network namespace, bound) with `--network host`; `failed` when the sandbox
//! failed (see [`crate::FAILED`]).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use coffer_agent::api::proto::{
    agent_client::AgentClient, DestroySandboxRequest, ListContainersRequest,
};
use rustix::fs::{flock, FlockOperation};
use tonic::transport::Channel;

use crate::{cgroup::remove_cgroups, SandboxError};

/// Where sandboxes live unless a launcher is told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/coffer/sandboxes";

/// A pod VM's QEMU monitor (QMP), through which block volumes are hot-plugged
/// ([`crate::hotplug`]).
pub const QMP_SOCK: &str = "qmp.sock";

/// Where `--network host` binds the keeper's network namespace for the agent.
pub(crate) const HOST_NETNS: &str = "host.netns";

/// How long [`SandboxDir::stop`] waits for the keeper's teardown.
pub const STOP_WAIT: Duration = Duration::from_secs(15);

/// A sandbox directory.
pub struct SandboxDir {
    /// `<state-dir>/<name>`.
    pub dir: PathBuf,
    /// The sandbox's name.
    pub name: String,
}

impl SandboxDir {
    /// The sandbox `name` under `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> Result<Self, SandboxError> {
        check_name(name)?;
        Ok(Self {
            dir: state_dir.join(name),
            name: name.to_string(),
        })
    }

    /// The agent's API socket.
    pub fn agent_sock(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Whether a keeper holds the sandbox.
    pub fn alive(&self) -> bool {
        let Ok(f) = std::fs::File::open(self.dir.join("keeper.lock")) else {
            return false;
        };
        match flock(&f, FlockOperation::NonBlockingLockShared) {
            Ok(()) => false,
            Err(e) => e == rustix::io::Errno::WOULDBLOCK,
        }
    }

    /// The keeper's process id.
    pub fn keeper_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("keeper.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Removes what a sandbox without a keeper left: its cgroups and directory. Refuses a live
    /// sandbox.
    pub fn reap(&self) -> Result<(), SandboxError> {
        if self.alive() {
            return Err(SandboxError::Running(self.name.clone()));
        }
        self.remove()
    }

    /// Gives back the sandbox's network: its CNI attachment, or the host namespace's bind.
    fn release_network(&self) {
        crate::cni::release(&self.dir);
        let host = self.dir.join(HOST_NETNS);
        if host.exists() {
            let _ = rustix::mount::unmount(&host, rustix::mount::UnmountFlags::DETACH);
        }
    }

    /// Removes the sandbox's cgroups (waiting for their processes to die) and its directory.
    pub(crate) fn remove(&self) -> Result<(), SandboxError> {
        remove_cgroups(&self.name)?;
        self.release_network();
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SandboxError::Io {
                what: format!("cannot remove {}", self.dir.display()),
                source,
            }),
        }
    }

    /// Waits up to `timeout` for the keeper to finish its teardown.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if !self.dir.exists() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !self.dir.exists()
    }

    /// Why the sandbox failed, when its keeper recorded it (and is gone).
    pub fn failure(&self) -> Option<String> {
        if self.alive() {
            return None;
        }
        crate::failure(&self.dir)
    }

    /// Records why the sandbox failed and removes everything but the record and the logs
    /// (the keeper's, QEMU's and the console): its cgroups, sockets, scratch disk and state.
    pub(crate) fn retire(&self, why: &str) -> Result<(), SandboxError> {
        remove_cgroups(&self.name)?;
        self.release_network();
        let tail = crate::console_tail(&self.dir, crate::CONSOLE_LINES);
        let mut record = format!("{}\n", why.replace('\n', " "));
        if !tail.is_empty() {
            record.push_str(&format!("the last lines of its console:\n{tail}\n"));
        }
        for e in std::fs::read_dir(&self.dir)
            .map_err(|source| SandboxError::Io {
                what: format!("cannot list {}", self.dir.display()),
                source,
            })?
            .flatten()
        {
            let keep = matches!(
                e.file_name().to_str(),
                Some("agent.log" | "qemu.log" | "keeper.log" | "keeper.lock")
            );
            if keep {
                continue;
            }
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        coffer_fsutil::write_atomic(&self.dir.join(crate::FAILED), record.as_bytes(), 0o644)
            .map_err(|source| SandboxError::Io {
                what: format!("cannot record the failure in {}", self.dir.display()),
                source,
            })
    }

    /// The agent of this running sandbox; a sandbox that failed is named as such with its
    /// keeper's record.
    pub async fn connect(&self) -> Result<AgentClient<Channel>, SandboxError> {
        if !self.dir.exists() {
            return Err(SandboxError::NotFound(self.name.clone()));
        }
        if let Some(record) = self.failure() {
            return Err(SandboxError::Failed {
                name: self.name.clone(),
                record: record.trim_end().to_string(),
            });
        }
        coffer_agent::api::connect_unix(&self.agent_sock())
            .await
            .map_err(|source| SandboxError::Unreachable {
                name: self.name.clone(),
                source,
            })
    }

    /// Tears the sandbox down and waits up to [`STOP_WAIT`] until its keeper is done: asks the
    /// agent to destroy the sandbox (refused while a container runs, unless `force`), or, when
    /// the agent cannot be reached and `force` is set, sends the keeper SIGTERM. A sandbox
    /// without a keeper is reaped; a failed one is removed with its record.
    pub async fn stop(&self, force: bool) -> Result<(), SandboxError> {
        if !self.dir.exists() {
            return Err(SandboxError::NotFound(self.name.clone()));
        }
        if !self.alive() {
            return self.reap();
        }
        let agent_err = |what, status| SandboxError::Agent {
            name: self.name.clone(),
            what,
            status: Box::new(status),
        };
        let listed = match self.connect().await {
            Ok(mut c) => c
                .list_containers(ListContainersRequest {})
                .await
                .map(|r| (c, r.into_inner().containers))
                .map_err(|e| agent_err("list containers", e)),
            Err(e) => Err(e),
        };
        match listed {
            Ok((mut c, list)) => {
                if !force && list.iter().any(|s| s.state == "running") {
                    return Err(SandboxError::ContainerRunning(self.name.clone()));
                }
                c.destroy_sandbox(DestroySandboxRequest {})
                    .await
                    .map_err(|e| agent_err("destroy the sandbox", e))?;
            }
            Err(e) if !force => return Err(e),
            // An unreachable agent: the keeper tears the sandbox down on SIGTERM.
            Err(_) => {
                if let Some(pid) = self.keeper_pid().and_then(rustix::process::Pid::from_raw) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
        }
        if !self.wait_gone(STOP_WAIT).await {
            return Err(SandboxError::Stuck {
                name: self.name.clone(),
                wait: STOP_WAIT,
                pid: self.keeper_pid(),
            });
        }
        Ok(())
    }

    /// The last line the agent wrote to its log (to explain a failed start).
    pub fn agent_error(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        coffer_fsutil::last_line(&log).to_string()
    }
}

/// Checks a sandbox or container name.
pub fn check_name(name: &str) -> Result<(), SandboxError> {
    if !coffer_agent::container::is_valid_id(name) {
        return Err(SandboxError::InvalidName(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_state_directory_are_refused() {
        let state = Path::new("/run/coffer/sandboxes");
        for bad in ["", "..", "a/b", "a b", &"x".repeat(65)] {
            let err = SandboxDir::new(state, bad).err().expect(bad);
            assert!(matches!(err, SandboxError::InvalidName(_)), "{bad}: {err}");
        }
        assert_eq!(
            SandboxDir::new(state, "web-1").unwrap().dir,
            state.join("web-1")
        );
    }

    #[tokio::test]
    async fn a_failed_sandbox_is_named_with_its_record_and_removed_by_stop() {
        let state = tempfile::tempdir().unwrap();
        let s = SandboxDir::new(state.path(), "app").unwrap();
        let err = s.connect().await.err().unwrap();
        assert_eq!(err.to_string(), "no sandbox named app (see coffer ps)");
        std::fs::create_dir(&s.dir).unwrap();
        std::fs::write(s.dir.join("agent.log"), "booting\n").unwrap();
        s.retire("the agent did not become ready within 3s")
            .unwrap();
        assert!(!s.alive());
        let err = s.connect().await.err().unwrap().to_string();
        assert!(
            err.starts_with("sandbox app failed: the agent did not become ready within 3s\n")
                && err.contains("booting")
                && err.ends_with("(`coffer rm app` removes it)"),
            "{err}"
        );
        // Only the record and the logs are left; stop (`coffer rm`) removes them.
        let mut left: Vec<String> = std::fs::read_dir(&s.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["agent.log", "failed"]);
        s.stop(false).await.unwrap();
        assert!(!s.dir.exists());
    }

    #[tokio::test]
    async fn a_sandbox_held_by_a_keeper_is_not_reaped() {
        let state = tempfile::tempdir().unwrap();
        let s = SandboxDir::new(state.path(), "held").unwrap();
        std::fs::create_dir(&s.dir).unwrap();
        let lock = std::fs::File::create(s.dir.join("keeper.lock")).unwrap();
        flock(&lock, FlockOperation::NonBlockingLockExclusive).unwrap();
        assert!(s.alive());
        assert!(matches!(s.reap(), Err(SandboxError::Running(_))));
        // Its agent does not answer: without force, stop says so and leaves it.
        let err = s.stop(false).await.err().unwrap();
        assert!(matches!(err, SandboxError::Unreachable { .. }), "{err}");
        assert!(s.dir.exists());
        drop(lock);
        assert!(!s.alive());
        s.stop(false).await.unwrap();
        assert!(!s.dir.exists());
    }
}
