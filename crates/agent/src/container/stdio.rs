//! A process's input and output through the agent: reading what it wrote (from an offset,
//! following while it runs), writing its stdin or terminal, closing it, resizing the terminal.

use std::sync::Arc;

use super::{runtime::Process, ContainerError, Containers, Result};

/// A chunk of output read by [`Containers::read`].
#[derive(Debug, Default, PartialEq)]
pub struct Chunk {
    /// The bytes.
    pub data: Vec<u8>,
    /// Offset of `data[0]` in the stream.
    pub offset: u64,
    /// The process exited and nothing follows.
    pub eof: bool,
}

impl Containers {
    /// Reads up to `len` bytes of a process's `stream` ("stdout" or "stderr") from `offset`;
    /// with `follow`, waits for output while the process runs. Output older than the last
    /// 4 MiB is gone: the chunk then starts later than asked.
    pub async fn read(
        &self,
        id: &str,
        exec_id: &str,
        stream: &str,
        offset: u64,
        len: usize,
        follow: bool,
    ) -> Result<Chunk> {
        let p = self.process(id, exec_id)?;
        let out = match stream.to_ascii_lowercase().as_str() {
            "stdout" => &p.stdout,
            "stderr" => &p.stderr,
            other => {
                return Err(ContainerError::Invalid(format!(
                    "stream {other:?}: use stdout or stderr"
                )))
            }
        };
        let mut changed = self.changed.subscribe();
        loop {
            // Exit is published after all output is buffered, so read it first.
            let exited = p.exit.borrow().is_some();
            {
                let b = out.lock().unwrap_or_else(|p| p.into_inner());
                let end = b.start + b.data.len() as u64;
                if offset > end {
                    return Err(ContainerError::Invalid(format!(
                        "offset {offset} is past the end of {stream} ({end})"
                    )));
                }
                let from = offset.max(b.start);
                if from < end {
                    let skip = (from - b.start) as usize;
                    let n = ((end - from) as usize).min(len.max(1));
                    let data: Vec<u8> = b.data.range(skip..skip + n).copied().collect();
                    return Ok(Chunk {
                        data,
                        offset: from,
                        eof: false,
                    });
                }
                if exited || !follow {
                    return Ok(Chunk {
                        data: Vec::new(),
                        offset: from,
                        eof: exited,
                    });
                }
            }
            if changed.changed().await.is_err() {
                return Ok(Chunk {
                    offset,
                    ..Chunk::default()
                });
            }
        }
    }

    /// A TTY process's terminal (master side), waiting for the runtime to hand it over.
    async fn pty(p: &Process) -> Result<Arc<std::fs::File>> {
        let mut rx = p
            .pty
            .clone()
            .ok_or_else(|| ContainerError::Invalid("the process has no terminal".into()))?;
        let mut exit = p.exit.clone();
        tokio::select! {
            r = rx.wait_for(|t| t.is_some()) => match r {
                Ok(t) => Ok(t.clone().expect("a terminal")),
                Err(_) => Err(ContainerError::Invalid("the process's terminal is gone".into())),
            },
            _ = exit.wait_for(|s| s.is_some()) => {
                Err(ContainerError::Invalid("the process has exited".into()))
            }
        }
    }

    /// Writes `data` to a process's stdin (its terminal, for a TTY process); the bytes written.
    pub async fn write(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let p = self.process(id, exec_id)?;
        if p.pty.is_some() {
            let pty = Self::pty(&p).await?;
            let data = data.to_vec();
            let len = data.len();
            return tokio::task::spawn_blocking(move || {
                std::io::Write::write_all(&mut &*pty, &data)
            })
            .await
            .map_err(|e| ContainerError::Runtime(e.to_string()))?
            .map(|()| len)
            .map_err(|e| ContainerError::Invalid(format!("cannot write to the terminal: {e}")));
        }
        let mut stdin = p.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or_else(|| {
            ContainerError::Invalid("the process's stdin is not open (ask for stdin)".into())
        })?;
        tokio::io::AsyncWriteExt::write_all(pipe, data)
            .await
            .map_err(|e| ContainerError::Invalid(format!("cannot write to stdin: {e}")))?;
        Ok(data.len())
    }

    /// Closes a process's stdin (end of input; on a terminal, the end-of-file character).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.process(id, exec_id)?;
        if p.pty.is_some() {
            return self.write(id, exec_id, &[0x04]).await.map(drop);
        }
        p.stdin.lock().await.take();
        Ok(())
    }

    /// Sets the window size of a TTY process's terminal (the kernel sends SIGWINCH to its
    /// foreground process group).
    pub async fn resize(&self, id: &str, exec_id: &str, rows: u16, columns: u16) -> Result<()> {
        let p = self.process(id, exec_id)?;
        let pty = Self::pty(&p).await?;
        crate::tty::set_size(&pty, rows, columns)
            .map_err(|e| ContainerError::Runtime(format!("cannot resize the terminal: {e}")))
    }
}
