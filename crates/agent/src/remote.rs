//! A peer pod's agent channel: the agent listens on TCP ([`AGENT_TCP_PORT`]) and takes the first
//! connection whose mutual TLS handshake shows the keeper's pinned certificate
//! (`coffer_podvm::remote`); the host–guest multiplexer then runs over it. Connections that fail
//! the handshake are logged and closed, and the agent goes on waiting. When the one connection
//! ends, the agent's service ends and the VM powers off: a peer pod whose node lost it does not
//! run on unattended.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use coffer_podvm::remote::{server_config, RemoteAgent, AGENT_TCP_PORT};

/// Waits for the keeper's connection; returns it once its handshake passed.
pub async fn accept(
    remote: &RemoteAgent,
) -> anyhow::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(remote)?);
    // On the VM's own address where the provider gave one: never on the pod's addresses.
    let ip = remote
        .interface
        .as_ref()
        .and_then(|i| i.address.split('/').next()?.parse::<Ipv4Addr>().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let addr = SocketAddr::from((ip, AGENT_TCP_PORT));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "waiting for the keeper (mutual TLS)");
    // Each handshake runs on its own: connections that never finish theirs cannot hold the
    // keeper's back.
    let (done, mut first) = tokio::sync::mpsc::channel(1);
    loop {
        let (tcp, from) = tokio::select! {
            tls = first.recv() => match tls {
                Some(tls) => return Ok(tls),
                None => unreachable!("the sender lives in this function"),
            },
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    crate::egress::after_accept_error(&e).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, done) = (acceptor.clone(), done.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    tracing::info!(%from, "the keeper connected");
                    let _ = done.try_send(tls);
                }
                Ok(Err(e)) => {
                    tracing::warn!(%from, error = %e, "refused a connection to the agent (TLS)")
                }
                Err(_) => {
                    tracing::warn!(%from, "refused a connection to the agent (no handshake in 10 s)")
                }
            }
        });
    }
}
