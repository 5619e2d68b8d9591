//! The process sandbox's only way out: the agent runs in its own network namespace, where it
//! brings up the loopback interface and listens on `127.0.0.1` (a port the kernel picks). Each
//! connection there is spliced, byte for byte, onto a new connection to the launcher's
//! forwarding socket (a unix socket in the sandbox directory), which speaks SOCKS5 and makes the
//! outbound connection on the host (`coffer run` logs each destination). The agent's KBS client
//! and registry client use `socks5h://127.0.0.1:<port>` as their proxy, so names are resolved
//! on the host, as a VM's host would route them. Containers do not share this namespace: a
//! pod's containers share one of their own, with only a loopback interface
//! ([`crate::container`]).

use std::{net::SocketAddr, path::PathBuf};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, UnixStream},
};

/// Brings up `lo` in the calling thread's network namespace with `ip(8)` (iproute2's, or
/// busybox's where there is no other, as in a pod VM).
pub fn loopback_up() -> Result<(), String> {
    let args = ["link", "set", "lo", "up"];
    let out = match std::process::Command::new("ip").args(args).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::process::Command::new("/bin/busybox")
                .arg("ip")
                .args(args)
                .output()
        }
        other => other,
    }
    .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot bring up the loopback interface: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Where outbound connections go.
#[derive(Clone)]
pub enum Channel {
    /// The process sandbox's forwarding socket.
    Unix(PathBuf),
    /// A pod VM's agent port: a new stream per connection, tagged
    /// [`coffer_podvm::mux::GUEST_EGRESS`].
    Mux(coffer_podvm::mux::Opener),
}

impl Channel {
    async fn splice(&self, inside: &mut tokio::net::TcpStream) -> std::io::Result<()> {
        match self {
            Channel::Unix(path) => {
                let mut out = UnixStream::connect(path).await?;
                tokio::io::copy_bidirectional(inside, &mut out).await?;
            }
            Channel::Mux(opener) => {
                let mut out = opener.open().await?;
                out.write_all(&[coffer_podvm::mux::GUEST_EGRESS]).await?;
                tokio::io::copy_bidirectional(inside, &mut out).await?;
            }
        }
        Ok(())
    }
}

/// What an accept loop does after a failed accept: says so and pauses, so that a lasting
/// error (out of file descriptors) does not spin a core.
pub async fn after_accept_error(e: &std::io::Error) {
    tracing::warn!(error = %e, "cannot accept a connection; retrying in 100 ms");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Listens on loopback and splices every connection onto `channel`; returns the proxy URL to
/// give the HTTP clients. Must run inside a tokio runtime.
pub async fn start(channel: Channel) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let mut inside = match listener.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    after_accept_error(&e).await;
                    continue;
                }
            };
            let channel = channel.clone();
            tokio::spawn(async move {
                if let Err(e) = channel.splice(&mut inside).await {
                    tracing::debug!(error = %e, "a forwarded connection ended");
                }
            });
        }
    });
    Ok(format!("socks5h://{addr}"))
}
