//! The process sandbox's keeper and its directory.
//!
//! `coffer run` starts a keeper (`coffer __sandbox`, in its own process group) per sandbox. The
//! keeper holds an exclusive lock on `<dir>/keeper.lock` for its whole life, serves the emulated
//! PSP's channel to that sandbox alone, and runs `coffer-agent` under `unshare` in new mount,
//! PID, network, UTS and IPC namespaces. It tears the sandbox down — agent and every container process
//! killed with the PID namespace, cgroups under `/coffer/<name>` removed, the directory deleted —
//! when the agent exits (DestroySandbox, a crash, `kill -9`), when it is asked to (SIGTERM,
//! SIGINT), or, for a foreground `coffer run`, when that process goes away (its pipe to the
//! keeper's stdin closes). A sandbox whose keeper was itself killed is reaped by the next
//! `coffer ps`, `coffer rm` or `coffer run` of that name.
//!
//! The agent has its own network namespace; its only way out is `net.sock`, a SOCKS5 forwarder
//! the keeper serves, which connects on the host and logs every destination to `egress.log`
//! (`coffer_agent::egress`).
//!
//! Layout of `<state-dir>/<name>/`: `keeper.lock`, `keeper.pid`, `psp.sock`, `agent.sock`,
//! `net.sock`, `agent.log`, `egress.log`, `audit.jsonl` (the agent's policy decisions) and
//! `state/`, on which the agent
//! mounts a private tmpfs for bundles, root filesystems and the runtime's state, so that they
//! vanish with the sandbox's mount namespace.

use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use rustix::fs::{flock, FlockOperation};

/// `coffer __sandbox` arguments: shared with the shim, which starts keepers too.
pub use coffer_keeper::KeeperArgs;

/// A sandbox directory.
pub struct SandboxDir {
    /// `<state-dir>/<name>`.
    pub dir: PathBuf,
    /// The sandbox's name.
    pub name: String,
}

impl SandboxDir {
    /// The sandbox `name` under `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> anyhow::Result<Self> {
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
    pub fn reap(&self) -> anyhow::Result<()> {
        if self.alive() {
            bail!("sandbox {} is running", self.name);
        }
        self.remove()
    }

    /// Removes the sandbox's cgroups (waiting for their processes to die) and its directory.
    fn remove(&self) -> anyhow::Result<()> {
        remove_cgroups(&self.name)?;
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.dir.display())),
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
        coffer_keeper::failure(&self.dir)
    }

    /// Records why the sandbox failed and removes everything but the record and the logs
    /// (the keeper's, QEMU's and the console): its cgroups, sockets, scratch disk and state.
    fn retire(&self, why: &str) -> anyhow::Result<()> {
        remove_cgroups(&self.name)?;
        let tail = coffer_keeper::console_tail(&self.dir, coffer_keeper::CONSOLE_LINES);
        let mut record = format!("{}\n", why.replace('\n', " "));
        if !tail.is_empty() {
            record.push_str(&format!("the last lines of its console:\n{tail}\n"));
        }
        for e in std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?
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
        coffer_fsutil::write_atomic(
            &self.dir.join(coffer_keeper::FAILED),
            record.as_bytes(),
            0o644,
        )
        .with_context(|| format!("cannot record the failure in {}", self.dir.display()))
    }

    /// The last line the agent wrote to its log (to explain a failed start).
    pub fn agent_error(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        coffer_fsutil::last_line(&log).to_string()
    }
}

/// Checks a sandbox or container name.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if !coffer_agent::container::is_valid_id(name) {
        bail!("name {name:?}: use 1-64 ASCII letters, digits, '-' or '_'");
    }
    Ok(())
}

/// The cgroup (under each mounted hierarchy) that holds a sandbox's containers.
pub fn cgroup_parent(name: &str) -> String {
    format!("/coffer/{name}")
}

/// The mount points of the cgroup hierarchies (v1 controllers and the unified v2 one).
fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| left.split(' ').nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect()
}

/// The cgroup directories a sandbox left (every hierarchy).
pub fn leftover_cgroups(name: &str) -> Vec<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .map(|m| m.join(cgroup_parent(name).trim_start_matches('/')))
        .filter(|p| p.is_dir())
        .collect()
}

/// Removes a sandbox's cgroups, deepest first, waiting up to 5 s for their processes to die.
pub fn remove_cgroups(name: &str) -> anyhow::Result<()> {
    fn rmdir_tree(p: &Path) -> std::io::Result<()> {
        for e in std::fs::read_dir(p)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                rmdir_tree(&e.path())?;
            }
        }
        match std::fs::remove_dir(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let mut last = None;
        for p in leftover_cgroups(name) {
            if let Err(e) = rmdir_tree(&p) {
                last = Some((p, e));
            }
        }
        match last {
            None => return Ok(()),
            Some((p, e)) if Instant::now() > until => {
                bail!("cannot remove cgroup {}: {e}", p.display())
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Waits until the keeper's stdin ends when `watch` (the foreground `coffer run` went away);
/// never otherwise.
pub async fn owner_gone(watch: bool) {
    if !watch {
        return std::future::pending::<()>().await;
    }
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Makes a child die with this keeper (parent-death signal): a keeper killed with SIGKILL
/// takes the sandbox with it.
pub fn die_with_keeper(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and only makes one async-signal-safe
    // system call (prctl).
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}

/// Runs the keeper (`coffer __sandbox`) until the sandbox ends, then tears it down.
pub fn keep(a: KeeperArgs) -> anyhow::Result<()> {
    check_name(&a.name)?;
    let lock = std::fs::File::create(a.dir.join("keeper.lock"))
        .with_context(|| format!("cannot create {}/keeper.lock", a.dir.display()))?;
    flock(&lock, FlockOperation::NonBlockingLockExclusive)
        .context("another keeper holds this sandbox")?;
    std::fs::write(a.dir.join("keeper.pid"), std::process::id().to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(&a));
    // A read of stdin may still be pending on the blocking pool; do not wait for it.
    runtime.shutdown_background();
    // Everything below runs however the sandbox ended. A failed sandbox leaves its reason
    // and logs for `coffer ps`, `coffer logs` and the launcher.
    let sandbox = SandboxDir {
        dir: a.dir.clone(),
        name: a.name.clone(),
    };
    let cleaned = match &result {
        Ok(()) => sandbox.remove(),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the sandbox failed");
            sandbox.retire(&format!("{e:#}"))
        }
    };
    drop(lock);
    result.and(cleaned)
}

async fn serve(a: &KeeperArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.initdata)
        .with_context(|| format!("cannot read {}", a.initdata.display()))?;
    let digest = coffer_wire::initdata::digest(&text)?;
    if let Some(podvm) = &a.podvm {
        return crate::vm::serve(a, podvm, &text, &digest).await;
    }
    // The agent binary is opened now and hashed while the agent starts (see below).
    let binary_file = std::fs::File::open(&a.agent)
        .with_context(|| format!("cannot read {}", a.agent.display()))?;

    // The launch the PSP reports, and its channel for this sandbox only. The channel's thread
    // waits for the launch measurement; the agent's first request waits in the socket's backlog
    // until then.
    let mut psp = coffer_psp::EmulatedPsp::load_or_generate(&a.psp_dir)?;
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(&digest, 32));
    let psp_sock = a.dir.join("psp.sock");
    let listener = UnixListener::bind(&psp_sock)?;
    let (launch_tx, launch_rx) = std::sync::mpsc::channel::<[u8; 48]>();
    std::thread::spawn(move || {
        let Ok(measurement) = launch_rx.recv() else {
            return;
        };
        psp.set_launch(coffer_psp::Launch {
            measurement,
            host_data,
            ..coffer_psp::Launch::default()
        });
        coffer_psp::channel::serve(Arc::new(psp), listener)
    });

    // The sandbox's only network: SOCKS5 over this socket, each destination logged.
    let net_sock = a.dir.join("net.sock");
    let net = tokio::net::UnixListener::bind(&net_sock)
        .with_context(|| format!("cannot listen on {}", net_sock.display()))?;
    let egress_log = a.dir.join("egress.log");
    tokio::spawn(async move {
        loop {
            let conn = match net.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    coffer_agent::egress::after_accept_error(&e).await;
                    continue;
                }
            };
            let log = egress_log.clone();
            tokio::spawn(async move {
                if let Err(e) = forward(conn, &log).await {
                    tracing::info!(error = %e, "a forwarded connection failed");
                }
            });
        }
    });

    let mut cmd = tokio::process::Command::new("unshare");
    for ns in coffer_agent::sandbox::PROCESS_NAMESPACES {
        cmd.arg(format!("--{ns}"));
    }
    // A /proc of the new PID namespace, so that the runtime inside sees its own processes;
    // --kill-child: the agent (PID 1 there, so every container with it) dies with unshare.
    cmd.arg("--mount-proc")
        .arg("--kill-child")
        .arg(&a.agent)
        .arg("--listen")
        .arg(format!("unix:{}", a.dir.join("agent.sock").display()))
        .arg("--initdata")
        .arg(&a.initdata)
        .arg("--psp-socket")
        .arg(&psp_sock)
        .arg("--audit-log")
        .arg(a.dir.join("audit.jsonl"))
        .arg("--state-dir")
        .arg(a.dir.join("state"))
        .arg("--private-state")
        .arg("--cgroup-parent")
        .arg(cgroup_parent(&a.name))
        .arg("--egress")
        .arg(format!("unix:{}", net_sock.display()));
    if a.plain_http {
        cmd.arg("--plain-http");
    }
    if let Some(c) = &a.image_cache {
        cmd.arg("--image-cache").arg(c);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(a.dir.join("agent.log"))?)
        .kill_on_drop(true);
    // unshare, and through --kill-child the whole sandbox, dies with this keeper.
    die_with_keeper(&mut cmd);
    let mut agent = cmd.spawn().context("cannot start the agent with unshare")?;
    // MEASUREMENT: the binary opened above, hashed while the agent starts up; the PSP answers
    // nothing before it is known.
    let psp_dir = a.psp_dir.clone();
    let measured =
        tokio::task::spawn_blocking(move || measure_agent(&binary_file, &psp_dir)).await?;
    match measured {
        Ok(m) => {
            let _ = launch_tx.send(m);
        }
        Err(e) => {
            let _ = agent.start_kill();
            let _ = agent.wait().await;
            bail!("cannot measure {}: {e}", a.agent.display());
        }
    }

    let owner_gone = owner_gone(a.watch_stdin);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        s = agent.wait() => {
            // Its last words, for a launcher that reads this keeper's log.
            let dir = SandboxDir { dir: a.dir.clone(), name: a.name.clone() };
            tracing::info!(status = ?s, last = %dir.agent_error(), "the agent exited");
            return Ok(());
        }
        _ = owner_gone => tracing::info!("the launcher went away"),
        _ = term.recv() => tracing::info!("asked to stop"),
        _ = int.recv() => tracing::info!("interrupted"),
    }
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    Ok(())
}

/// The process sandbox's MEASUREMENT for the agent binary open as `file`. Hashing a release
/// agent takes tens of milliseconds, so results are kept in `<psp-dir>/measurements.json` under
/// the file's identity — device, inode, size, modification and change times (the change time
/// moves with any write and cannot be set back by a user) — and the launch configuration.
/// `coffer measure` always hashes the content, so a stale entry could only make the KBS refuse.
pub fn measure_agent(file: &std::fs::File, psp_dir: &Path) -> std::io::Result<[u8; 48]> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    let config = coffer_agent::sandbox::process_launch_config();
    let key = format!(
        "{}:{}:{}:{}.{}:{}.{}:{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(config.as_bytes())[..8])
    );
    let path = psp_dir.join("measurements.json");
    let mut cache: serde_json::Map<String, serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(hit) = cache
        .get(&key)
        .and_then(|v| v.as_str())
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| <[u8; 48]>::try_from(b).ok())
    {
        return Ok(hit);
    }
    let mut binary = Vec::new();
    std::io::Read::read_to_end(&mut &*file, &mut binary)?;
    let measurement = coffer_agent::sandbox::process_measurement(&binary);
    // Entries of replaced binaries pile up; start over past 16.
    if cache.len() >= 16 {
        cache.clear();
    }
    cache.insert(key, serde_json::Value::String(hex::encode(measurement)));
    let _ = coffer_fsutil::write_atomic(
        &path,
        serde_json::Value::Object(cache).to_string().as_bytes(),
        0o644,
    );
    Ok(measurement)
}

/// Serves one SOCKS5 CONNECT from the sandbox: connects on the host, logs the destination to
/// `log`, and relays until either side closes.
pub async fn forward<S>(conn: S, log: &Path) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use fast_socks5::{
        server::Socks5ServerProtocol, util::target_addr::TargetAddr, ReplyError, Socks5Command,
    };
    let (proto, cmd, target) = Socks5ServerProtocol::accept_no_auth(conn)
        .await?
        .read_command()
        .await?;
    if cmd != Socks5Command::TCPConnect {
        proto.reply_error(&ReplyError::CommandNotSupported).await?;
        bail!("the sandbox asked for {cmd:?}; only CONNECT is forwarded");
    }
    let dest = match &target {
        TargetAddr::Ip(a) => a.to_string(),
        TargetAddr::Domain(h, p) => format!("{h}:{p}"),
    };
    let outcome = tokio::net::TcpStream::connect(&dest).await;
    {
        use std::io::Write;
        let line = serde_json::json!({
            "destination": dest,
            "connected": outcome.is_ok(),
            "time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    let mut out = match outcome {
        Ok(s) => s,
        Err(e) => {
            proto.reply_error(&ReplyError::HostUnreachable).await?;
            bail!("cannot connect to {dest}: {e}");
        }
    };
    let local = out.local_addr()?;
    let mut conn = proto.reply_success(local).await?;
    tokio::io::copy_bidirectional(&mut conn, &mut out).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_are_cached_per_file_identity_and_follow_changes() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"agent v1").unwrap();
        let open = || std::fs::File::open(&agent).unwrap();
        let m1 = measure_agent(&open(), dir.path()).unwrap();
        assert_eq!(m1, coffer_agent::sandbox::process_measurement(b"agent v1"));
        assert!(dir.path().join("measurements.json").exists());
        assert_eq!(measure_agent(&open(), dir.path()).unwrap(), m1);
        // Rewritten in place (same inode, same size): the change time moves, the cache misses.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&agent, b"agent v2").unwrap();
        assert_eq!(
            measure_agent(&open(), dir.path()).unwrap(),
            coffer_agent::sandbox::process_measurement(b"agent v2")
        );
    }
}
