//! The process sandbox: `coffer-agent` under `unshare` in new mount, PID, network, UTS and IPC
//! namespaces, the emulated PSP's channel served to this sandbox alone, and the SOCKS5
//! forwarder on `net.sock` as its only network (`coffer_agent::egress`). The agent mounts a
//! private tmpfs on `state/` for bundles, root filesystems and the runtime's state, so that they
//! vanish with the sandbox's mount namespace.

use std::{os::unix::net::UnixListener, path::Path, process::Stdio, sync::Arc};

use anyhow::{bail, Context};

use crate::{
    cgroup::cgroup_parent,
    egress::forward,
    lifetime::{die_with_keeper, owner_gone},
    KeeperArgs, SandboxDir,
};

/// Runs the process sandbox until the agent exits or the keeper is asked to stop.
pub(crate) async fn serve(a: &KeeperArgs, digest: &[u8]) -> anyhow::Result<()> {
    // The agent binary is opened now and hashed while the agent starts (see below).
    let binary_file = std::fs::File::open(&a.agent)
        .with_context(|| format!("cannot read {}", a.agent.display()))?;

    // The launch the PSP reports, and its channel for this sandbox only. The channel's thread
    // waits for the launch measurement; the agent's first request waits in the socket's backlog
    // until then.
    let mut psp = coffer_psp::EmulatedPsp::load_or_generate(&a.psp_dir)?;
    let mut host_data = [0u8; 32];
    host_data.copy_from_slice(&coffer_wire::binding::fit_report_data(digest, 32));
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
    if let Some(ns) = &a.pod_netns {
        cmd.arg("--pod-netns").arg(ns);
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
