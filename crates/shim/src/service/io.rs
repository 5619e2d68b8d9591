//! A running process's stdio between containerd's FIFOs and the agent, and its exit once its
//! output has ended.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use coffer_agent::api::proto::{
    CloseStdinRequest, ReadStreamRequest, WaitProcessRequest, WriteStreamRequest,
};
use containerd_shim::protos::{events::task::TaskOOM, topics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{process::Process, Service};

impl Service {
    /// Copies a running process's stdio between containerd's FIFOs and the agent, then
    /// records and publishes its exit (after an OOM event when the OOM killer ended the
    /// container).
    pub(super) async fn follow(&self, p: Arc<Process>) {
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
                if let Some(log) = p.termination_log.get() {
                    write_termination_log(log, &r.termination_message);
                }
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
}

/// Hands the guest's termination message to the kubelet: its file on the node, rewritten in
/// place (the kubelet reads it when the container has exited). At most 4096 bytes, as the
/// kubelet reads.
fn write_termination_log(path: &Path, message: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let message = &message[..message.len().min(4096)];
    // The kubelet made the file: it is written in place, never through a link, never created.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .and_then(|mut f| f.write_all(message));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the termination message");
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
