//! Processes under the OCI runtime: a container's init (`run`) and its execs (`exec`), each a
//! child of the agent whose output is kept and whose exit is recorded; signals, waits and the
//! runtime's statistics.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
};

use serde_json::{json, Value};
use tokio::sync::watch;

use super::{
    output::{pump, StreamBuf},
    spec::cgroup_path,
    valid_id, ContainerError, Containers, Result,
};

/// One process (a container's init or an exec): its output and exit status.
pub(crate) struct Process {
    pub(super) stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
    /// The master side of the process's terminal (TTY processes), once the runtime handed it
    /// over.
    pub(super) pty: Option<watch::Receiver<Option<Arc<std::fs::File>>>>,
    pub(super) stdout: Mutex<StreamBuf>,
    pub(super) stderr: Mutex<StreamBuf>,
    pub(super) exit: watch::Receiver<Option<i32>>,
    /// The runtime's process id (foreground), or the process's own (detached, once known).
    pub(super) pid: std::sync::OnceLock<u32>,
    /// Set before the exit is reported when the process's cgroup saw the OOM killer.
    pub(super) oom_killed: std::sync::atomic::AtomicBool,
}

/// Resource use of a running container (from the runtime's cgroup statistics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// CPU time used, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Processes in the container.
    pub pids: u32,
}

/// Whether the cgroup `path` (as `cgroupsPath` names it) saw the OOM killer: `oom_kill` in its
/// `memory.events` (cgroup v2) or `memory.oom_control` (v1).
fn saw_oom_kill(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    [
        format!("/sys/fs/cgroup/{rel}/memory.events"),
        format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"),
    ]
    .iter()
    .filter_map(|f| std::fs::read_to_string(f).ok())
    .any(|text| {
        text.lines().any(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    })
}

/// The process id the runtime started detached and the master side of its terminal: both
/// handed over once the runtime has exited successfully.
async fn handed_over(
    dir: &crate::tty::ConsoleDir,
    listener: tokio::net::UnixListener,
) -> std::io::Result<(u32, std::fs::File)> {
    // The runtime connected (and sent the terminal) before it exited: the connection waits in
    // the listener's backlog.
    let master = crate::tty::receive_console(listener, crate::tty::HANDOVER).await?;
    crate::tty::set_size(&master, 24, 80)?;
    Ok((dir.pid()?, master))
}

impl Containers {
    /// The runtime, with its state kept under the agent's root.
    fn runtime_cmd(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.runtime);
        cmd.arg("--root").arg(self.root.join(".runtime"));
        cmd
    }

    /// Runs the runtime's `sub` command (`run` or `exec`) with `rest` after its options, with the
    /// process's stdout and stderr kept (and its stdin open when `stdin`), and a task that
    /// records its exit.
    ///
    /// Without `tty` the runtime runs in the foreground (`run` keeps the container after it
    /// exits, so that its cgroup can be read) with the process's stdio on pipes, and its exit
    /// status is the process's. With `tty` it runs detached with a console socket (see
    /// [`crate::tty`]): the agent holds the master side of the container's own terminal, whose
    /// output is the process's stdout and to which writes are its input; the process is
    /// waited for once the runtime has started it. A runtime that fails reports its own exit
    /// status, its error output in the process's stderr.
    fn spawn(
        &self,
        sub: &str,
        rest: &[&std::ffi::OsStr],
        stdin: bool,
        tty: bool,
        oom_cgroup: Option<String>,
    ) -> Result<Arc<Process>> {
        let runtime_err = |e: std::io::Error| {
            ContainerError::Runtime(format!("cannot run {}: {e}", self.runtime.display()))
        };
        let mut cmd = self.runtime_cmd();
        cmd.arg(sub);
        let console = if tty {
            let dir = crate::tty::ConsoleDir::new()
                .map_err(|e| ContainerError::Runtime(format!("cannot open a terminal: {e}")))?;
            let listener = tokio::net::UnixListener::bind(dir.socket())
                .map_err(|e| ContainerError::Runtime(format!("cannot open a terminal: {e}")))?;
            cmd.arg("--detach")
                .arg("--console-socket")
                .arg(dir.socket())
                .arg("--pid-file")
                .arg(dir.pid_file());
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            Some((dir, listener))
        } else {
            if sub == "run" {
                cmd.arg("--keep");
            }
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        };
        cmd.args(rest);
        let mut child = cmd.kill_on_drop(true).spawn().map_err(runtime_err)?;
        let (tx, rx) = watch::channel(None);
        let (pty_tx, pty_rx) = watch::channel(None);
        let pid = std::sync::OnceLock::new();
        if console.is_none() {
            if let Some(p) = child.id() {
                let _ = pid.set(p);
            }
        }
        let process = Arc::new(Process {
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            pty: console.as_ref().map(|_| pty_rx),
            stdout: Mutex::new(StreamBuf::default()),
            stderr: Mutex::new(StreamBuf::default()),
            exit: rx,
            pid,
            oom_killed: Default::default(),
        });
        let pipes: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as _),
            child.stderr.take().map(|p| Box::new(p) as _),
        ];
        let mut readers = Vec::new();
        for (n, pipe) in pipes.into_iter().enumerate() {
            let Some(pipe) = pipe else { continue };
            let changed = self.changed.clone();
            let process = process.clone();
            readers.push(tokio::spawn(async move {
                let out = if n == 0 {
                    &process.stdout
                } else {
                    &process.stderr
                };
                pump(pipe, out, &changed).await;
            }));
        }
        let changed = self.changed.clone();
        let exited = process.clone();
        tokio::spawn(async move {
            let runtime = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
            let status = match console {
                None => runtime,
                Some((dir, listener)) => {
                    // The runtime's error output is in before its status is looked at.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                        for r in readers.iter_mut() {
                            let _ = r.await;
                        }
                    })
                    .await;
                    readers.clear();
                    if runtime != 0 {
                        runtime
                    } else {
                        match handed_over(&dir, listener).await {
                            Ok((pid, master)) => {
                                let _ = exited.pid.set(pid);
                                let master = Arc::new(master);
                                let _ = pty_tx.send(Some(master.clone()));
                                // Ends with EIO once the process and everything it started
                                // closed the terminal.
                                match master.try_clone() {
                                    Ok(reader) => {
                                        let (changed, process) = (changed.clone(), exited.clone());
                                        readers.push(tokio::spawn(async move {
                                            let reader = tokio::fs::File::from_std(reader);
                                            pump(reader, &process.stdout, &changed).await;
                                        }));
                                    }
                                    Err(e) => tracing::warn!(error = %e, "cannot read a terminal"),
                                }
                                drop(dir);
                                crate::tty::wait_pid(pid).await.unwrap_or_else(|e| {
                                    tracing::warn!(pid, error = %e, "cannot wait for a detached process");
                                    -1
                                })
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "the runtime started a terminal process but did not hand over its terminal");
                                -1
                            }
                        }
                    }
                }
            };
            // The runtime keeps the container (`--keep`, or detached) until it is removed:
            // its cgroup still tells whether the OOM killer ended it.
            if oom_cgroup.as_deref().is_some_and(saw_oom_kill) {
                exited
                    .oom_killed
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            // The exit is reported once all output is in (or a leftover child of an exec
            // still holds the pipes after a grace period).
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                for r in readers {
                    let _ = r.await;
                }
            })
            .await;
            let _ = tx.send(Some(status));
            changed.send_modify(|g| *g += 1);
        });
        Ok(process)
    }

    /// Starts the container's process under the runtime; returns once the runtime has created
    /// it (so that exec and signals reach it), or fails if the runtime gave up.
    pub async fn start(&self, id: &str) -> Result<()> {
        let process = {
            let mut map = self.lock();
            let c = map
                .get_mut(id)
                .ok_or_else(|| ContainerError::NotFound(id.into()))?;
            if c.init.is_some() {
                return Err(ContainerError::Invalid(format!(
                    "container {id} was already started"
                )));
            }
            let p = self.spawn(
                "run",
                &["--bundle".as_ref(), c.bundle.as_os_str(), id.as_ref()],
                c.stdin,
                c.tty,
                Some(cgroup_path(&self.cgroup_parent, id)),
            )?;
            c.init = Some(p.clone());
            p
        };
        let state = self.root.join(".runtime").join(id).join("state.json");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !state.exists() {
            if let Some(status) = *process.exit.borrow() {
                if status == 0 {
                    break;
                }
                // The runtime writes its state before the container's process runs, so this
                // is the runtime failing, not the container: say why.
                let err = process.stderr.lock().unwrap_or_else(|p| p.into_inner());
                let tail: Vec<u8> = err.data.iter().rev().take(400).rev().copied().collect();
                let tail = String::from_utf8_lossy(&tail);
                let tail = tail.trim();
                tracing::warn!(container = id, status, stderr = %tail, "the runtime failed to start the container");
                return Err(ContainerError::Runtime(format!(
                    "failed to start container {id} (exit status {status}): {tail}"
                )));
            }
            if std::time::Instant::now() > deadline {
                return Err(ContainerError::Runtime(format!(
                    "the runtime did not create container {id} within 30 s"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        tracing::info!(container = id, "container started");
        if crate::vm::booted() {
            crate::vm::log_memory("container running");
        }
        Ok(())
    }

    /// Runs `args` (with `env` added) in the running container `id` as exec `exec_id`, under the
    /// container's user, capabilities and other process settings.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
        tty: bool,
    ) -> Result<()> {
        valid_id(exec_id).map_err(|_| {
            ContainerError::Invalid(format!(
                "exec id {exec_id:?}: use 1-64 ASCII letters, digits, '-' or '_'"
            ))
        })?;
        if args.is_empty() {
            return Err(ContainerError::Invalid("exec: no command given".into()));
        }
        let mut map = self.lock();
        let c = map
            .get_mut(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        match &c.init {
            Some(p) if p.exit.borrow().is_none() => {}
            _ => {
                return Err(ContainerError::Invalid(format!(
                    "container {id} is not running"
                )))
            }
        }
        if c.execs.contains_key(exec_id) {
            return Err(ContainerError::Exists(format!("{id} exec {exec_id}")));
        }
        let config: Value = std::fs::read(c.bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| ContainerError::Runtime("cannot read the container's spec".into()))?;
        let mut process = config["process"].clone();
        process["args"] = json!(args);
        process["terminal"] = json!(tty);
        if let Some(e) = process["env"].as_array_mut() {
            e.extend(env.iter().map(|v| json!(v)));
        }
        let file = c.bundle.join(format!("exec-{exec_id}.json"));
        coffer_fsutil::write_atomic(&file, process.to_string().as_bytes(), 0o600)
            .map_err(|e| ContainerError::Runtime(format!("cannot write the exec spec: {e}")))?;
        let p = self.spawn(
            "exec",
            &["--process".as_ref(), file.as_os_str(), id.as_ref()],
            stdin,
            tty,
            None,
        )?;
        c.execs.insert(exec_id.into(), p);
        tracing::info!(container = id, exec = exec_id, "exec started");
        Ok(())
    }

    pub(super) fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let map = self.lock();
        let c = map
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if exec_id.is_empty() {
            c.init
                .clone()
                .ok_or_else(|| ContainerError::Invalid(format!("container {id} was not started")))
        } else {
            c.execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| ContainerError::NotFound(format!("{id} exec {exec_id}")))
        }
    }

    /// Whether the OOM killer ended a container's process (known once it has exited).
    pub fn oom_killed(&self, id: &str, exec_id: &str) -> Result<bool> {
        Ok(self
            .process(id, exec_id)?
            .oom_killed
            .load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Waits for a process (the container's when `exec_id` is empty) to exit; its status.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<i32> {
        let mut rx = self.process(id, exec_id)?.exit.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return Ok(s);
            }
            if rx.changed().await.is_err() {
                return Err(ContainerError::Runtime("the process was lost".into()));
            }
        }
    }

    /// Sends `signal` to a process: the container's through the runtime, an exec's directly
    /// (the runtime's exec forwards it).
    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        let p = self.process(id, exec_id)?;
        if exec_id.is_empty() {
            return self
                .runtime(&["kill", id, &signal.to_string()])
                .await
                .map(drop);
        }
        let sig = i32::try_from(signal)
            .ok()
            .and_then(rustix::process::Signal::from_named_raw)
            .ok_or_else(|| ContainerError::Invalid(format!("signal {signal} is not known")))?;
        let pid = p
            .pid
            .get()
            .and_then(|p| rustix::process::Pid::from_raw(*p as i32))
            .ok_or_else(|| ContainerError::Invalid("the exec has exited".into()))?;
        if p.exit.borrow().is_some() {
            return Err(ContainerError::Invalid("the exec has exited".into()));
        }
        rustix::process::kill_process(pid, sig)
            .map_err(|e| ContainerError::Runtime(format!("cannot signal the exec: {e}")))
    }

    /// Resource use of a running container.
    pub async fn stats(&self, id: &str) -> Result<Stats> {
        self.process(id, "")?;
        let out = self.runtime(&["events", "--stats", id]).await?;
        let v: Value = serde_json::from_slice(&out)
            .map_err(|e| ContainerError::Runtime(format!("runtime statistics: {e}")))?;
        let d = &v["data"];
        Ok(Stats {
            memory_bytes: d["memory"]["usage"]["usage"].as_u64().unwrap_or(0),
            cpu_usage_ns: d["cpu"]["usage"]["total"].as_u64().unwrap_or(0),
            pids: d["pids"]["current"].as_u64().unwrap_or(0) as u32,
        })
    }

    /// Runs the runtime with `args`; its standard output.
    pub(super) async fn runtime(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = self.runtime_cmd().args(args).output().await.map_err(|e| {
            ContainerError::Runtime(format!("cannot run {}: {e}", self.runtime.display()))
        })?;
        if !out.status.success() {
            return Err(ContainerError::Runtime(format!(
                "{} {}: {}",
                self.runtime.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    }
}
