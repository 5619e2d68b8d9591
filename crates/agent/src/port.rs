//! A virtio-serial port (`/dev/vportNpM`) as tokio I/O. Two threads do blocking reads and
//! writes on the character device (the port's poll readiness does not reliably report
//! writability again once its queue filled, so non-blocking I/O could stall) and relay them to
//! an in-memory duplex stream that the async side uses.

use std::{
    io::{Read, Write},
    path::Path,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Opens the port at `path`; the returned stream is the port. Must run inside a tokio runtime.
pub fn open(path: &Path) -> std::io::Result<DuplexStream> {
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut from_port = port.try_clone()?;
    let mut to_port = port;
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut rd, mut wr) = tokio::io::split(theirs);
    let handle = tokio::runtime::Handle::current();
    let h = handle.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_port.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if h.block_on(wr.write_all(&buf[..n])).is_err() {
                break;
            }
        }
        tracing::debug!("the port's host side closed");
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match handle.block_on(rd.read(&mut buf)) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to_port.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    Ok(ours)
}
