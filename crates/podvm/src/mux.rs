//! The host–guest channel multiplexer. A pod VM has one virtio-serial port for the agent (one
//! byte stream); [yamux](https://github.com/hashicorp/yamux/blob/master/spec.md) carries many
//! connections over it. The host opens a stream per agent API connection (gRPC, HTTP/2); the
//! guest opens a stream per outbound connection, whose first byte says what it is:
//! [`GUEST_EGRESS`] (SOCKS5 follows; the host connects and logs the destination) or
//! [`GUEST_READY`] (the agent serves; nothing follows).

use std::{collections::VecDeque, future::poll_fn, io, task::Poll};

use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// First byte of a guest-opened stream carrying SOCKS5 (the agent's network).
pub const GUEST_EGRESS: u8 = b'S';
/// First byte of the guest-opened stream that says the agent serves its API.
pub const GUEST_READY: u8 = b'R';

/// A multiplexed stream (tokio I/O).
pub type MuxStream = Compat<yamux::Stream>;

/// Which end of the channel this is.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    /// The host (keeper).
    Host,
    /// The guest (agent).
    Guest,
}

type OpenReply = oneshot::Sender<io::Result<yamux::Stream>>;

/// Opens streams to the other side; cheap to clone.
#[derive(Clone)]
pub struct Opener(mpsc::UnboundedSender<OpenReply>);

impl Opener {
    /// Opens a new stream.
    pub async fn open(&self) -> io::Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(tx)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the channel is closed"))?;
        let s = rx
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the channel is closed"))??;
        Ok(s.compat())
    }
}

/// Runs the multiplexer over `io` in a task; returns the opener and the streams the other side
/// opens. Both end when `io` does.
pub fn start<T>(io: T, side: Side) -> (Opener, mpsc::UnboundedReceiver<MuxStream>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (open_tx, mut open_rx) = mpsc::unbounded_channel::<OpenReply>();
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let mode = match side {
        Side::Host => yamux::Mode::Client,
        Side::Guest => yamux::Mode::Server,
    };
    tokio::spawn(async move {
        let mut conn = yamux::Connection::new(io.compat(), yamux::Config::default(), mode);
        let mut waiting: VecDeque<OpenReply> = VecDeque::new();
        let ended = poll_fn(|cx| {
            while let Poll::Ready(Some(tx)) = open_rx.poll_recv(cx) {
                waiting.push_back(tx);
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(s)) => {
                        if let Some(w) = waiting.pop_front() {
                            let _ = w.send(Ok(s));
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        for w in waiting.drain(..) {
                            let _ = w.send(Err(io::Error::other(e.to_string())));
                        }
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(s))) => {
                        let _ = in_tx.send(s.compat());
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(e)),
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        match ended {
            Some(e) => tracing::info!(error = %e, "the host-guest channel failed"),
            None => tracing::debug!("the host-guest channel closed"),
        }
    });
    (Opener(open_tx), in_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn streams_both_ways_over_one_byte_stream() {
        let (a, b) = tokio::io::duplex(4096);
        let (host, mut host_in) = start(a, Side::Host);
        let (guest, mut guest_in) = start(b, Side::Guest);
        // Two host-opened streams at once, served by the guest.
        tokio::spawn(async move {
            while let Some(mut s) = guest_in.recv().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 5];
                    s.read_exact(&mut buf).await.unwrap();
                    buf.reverse();
                    s.write_all(&buf).await.unwrap();
                    s.flush().await.unwrap();
                });
            }
        });
        let mut s1 = host.open().await.unwrap();
        let mut s2 = host.open().await.unwrap();
        s2.write_all(b"world").await.unwrap();
        s1.write_all(b"hello").await.unwrap();
        s1.flush().await.unwrap();
        s2.flush().await.unwrap();
        let mut r = [0u8; 5];
        s1.read_exact(&mut r).await.unwrap();
        assert_eq!(&r, b"olleh");
        s2.read_exact(&mut r).await.unwrap();
        assert_eq!(&r, b"dlrow");
        // A guest-opened stream reaches the host with its tag byte first.
        let mut g = guest.open().await.unwrap();
        g.write_all(&[GUEST_EGRESS, 1, 2]).await.unwrap();
        g.flush().await.unwrap();
        let mut h = host_in.recv().await.unwrap();
        let mut t = [0u8; 3];
        h.read_exact(&mut t).await.unwrap();
        assert_eq!(t, [GUEST_EGRESS, 1, 2]);
    }
}
