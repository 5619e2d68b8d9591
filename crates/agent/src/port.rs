//! A virtio-serial port (`/dev/vportNpM`) as tokio I/O: the character device opened
//! non-blocking, one descriptor registered for reading and a duplicate for writing, so that
//! reads and writes proceed independently on readiness.

use std::{
    os::unix::fs::OpenOptionsExt,
    path::Path,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::unix::pipe,
};

/// An open port.
pub struct Port {
    rx: pipe::Receiver,
    tx: pipe::Sender,
}

impl Port {
    /// Opens the port at `path`. Must run inside a tokio runtime.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)?;
        let w = f.try_clone()?;
        Ok(Self {
            rx: pipe::Receiver::from_file_unchecked(f)?,
            tx: pipe::Sender::from_file_unchecked(w)?,
        })
    }
}

impl AsyncRead for Port {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.rx).poll_read(cx, buf)
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tx).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tx).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
