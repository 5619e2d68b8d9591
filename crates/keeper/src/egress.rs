//! The sandbox's only way out: each connection the sandbox opens is a SOCKS5 CONNECT that the
//! keeper makes on the host, logging every destination (`egress.log`, one JSON line each).

use std::path::Path;

use anyhow::bail;

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
