//! What a process writes to one stream, kept for ReadStream: the last 4 MiB, pumped in from a
//! pipe or a terminal.

use std::sync::Mutex;

use tokio::{io::AsyncReadExt, sync::watch};

/// Output kept per stream (older bytes are dropped beyond this).
const MAX_BUFFER: usize = 4 << 20;

/// What a process wrote to one stream: the last [`MAX_BUFFER`] bytes and where they start.
#[derive(Default)]
pub(super) struct StreamBuf {
    pub(super) data: std::collections::VecDeque<u8>,
    /// Offset of `data[0]` in everything the process wrote.
    pub(super) start: u64,
}

/// Appends what `from` yields to `to` (keeping the last [`MAX_BUFFER`] bytes) until its end or
/// an error, waking readers after each chunk.
pub(super) async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    to: &Mutex<StreamBuf>,
    changed: &watch::Sender<u64>,
) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(k) = from.read(&mut buf).await {
        if k == 0 {
            break;
        }
        {
            let mut b = to.lock().unwrap_or_else(|p| p.into_inner());
            b.data.extend(&buf[..k]);
            if b.data.len() > MAX_BUFFER {
                let excess = b.data.len() - MAX_BUFFER;
                b.data.drain(..excess);
                b.start += excess as u64;
            }
        }
        changed.send_modify(|g| *g += 1);
    }
}
