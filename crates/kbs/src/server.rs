//! Serving the router over HTTPS (rustls) or, when explicitly asked, plain HTTP.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{api, Kbs};

/// Loads a rustls server configuration from PEM files.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM in {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read TLS private key {}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Writes a self-signed development certificate and key (mode 0600) for `names`.
pub fn generate_self_signed(names: Vec<String>, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let ck = rcgen::generate_simple_self_signed(names).context("certificate generation")?;
    std::fs::write(cert, ck.cert.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    write_private(key, ck.signing_key.serialize_pem().as_bytes())
}

/// Writes a private file atomically and durably with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    coffer_fsutil::write_atomic(path, bytes, 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Serves `kbs` on `listener` until the process ends.
pub async fn serve(kbs: Arc<Kbs>, listener: TcpListener) -> anyhow::Result<()> {
    let tls = match (&kbs.config.tls_cert, &kbs.config.tls_key) {
        (Some(c), Some(k)) => Some(TlsAcceptor::from(Arc::new(tls_config(c, k)?))),
        _ => None,
    };
    let app = api::router(kbs.clone());
    let addr = listener.local_addr()?;
    match tls {
        None => {
            tracing::warn!(%addr, "serving PLAIN HTTP (--insecure-http): tokens, resources and admin credentials cross the network unprotected");
            axum::serve(listener, app).await?;
        }
        Some(acceptor) => {
            tracing::info!(%addr, "serving HTTPS");
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let svc = TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    };
                    if let Err(e) = Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await
                    {
                        tracing::debug!(%peer, error = %e, "connection error");
                    }
                });
            }
        }
    }
    Ok(())
}
