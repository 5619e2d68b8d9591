//! Serving the router over HTTPS (rustls) or, when explicitly asked, plain HTTP, with every
//! client bounded: a TLS handshake timeout, a header read timeout (hyper's), an idle timeout
//! between kept-alive requests, and a bound on open connections at which the longest-idle
//! connection is closed to make room (the body read timeout is the handlers', see
//! `api::read_body`). docs/kbs.md, "Limits and timeouts".

use std::{
    collections::HashMap,
    path::Path,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::Notify,
};
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

/// Pending connections the kernel queues before the KBS accepts them. The default of 128 (what
/// `std` asks for) overflows under a burst of connects, and every dropped SYN costs its client a
/// one-second retransmit; the kernel caps this at `net.core.somaxconn`.
pub const ACCEPT_BACKLOG: u32 = 4096;

/// A listener on `addr` with [`ACCEPT_BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// File descriptors kept for the store, the audit log, the database pool and the verifiers'
/// outbound connections.
const RESERVED_FDS: u64 = 128;

/// Raises this process's open-file limit to its hard limit and lowers `max-connections` to
/// what fits under it, so that connections run out before file descriptors do (an exhausted
/// descriptor table would stop the store and the audit log too).
pub fn fit_file_limit(config: &mut crate::Config) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "cannot raise the open-file limit");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let room = usize::try_from(soft.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(usize::MAX);
    if config.max_connections > room {
        tracing::warn!(
            max_connections = config.max_connections,
            open_file_limit = soft,
            lowered_to = room,
            "max-connections does not fit the open-file limit; lowered (raise the limit with ulimit -n or LimitNOFILE=)"
        );
        config.max_connections = room;
    }
}

/// What bounds each client connection (from [`crate::Config`]).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time to send a request's header (and for a new connection to say anything).
    pub header_read: Duration,
    /// Time to complete the TLS handshake.
    pub tls_handshake: Duration,
    /// Time a kept-alive connection may stay idle between requests.
    pub idle: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

impl Limits {
    /// The limits `config` sets.
    pub fn of(config: &crate::Config) -> Self {
        Self {
            header_read: Duration::from_secs(config.header_read_timeout_secs),
            tls_handshake: Duration::from_secs(config.tls_handshake_timeout_secs),
            idle: Duration::from_secs(config.idle_timeout_secs),
            max_connections: config.max_connections,
        }
    }
}

/// One open connection, as the connection table sees it.
struct ConnState {
    /// When the connection last read or wrote a byte (milliseconds since `epoch`).
    last_active: AtomicU64,
    /// Requests being answered now.
    in_flight: AtomicUsize,
    /// Told when the connection must make room for a new one.
    evict: Notify,
    epoch: Instant,
}

impl ConnState {
    fn touch(&self) {
        self.last_active
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_active.load(Ordering::Relaxed)))
    }
}

/// The open connections, bounded: at the bound the connection idle the longest (no request in
/// flight: a silent client, one stuck in its header, a kept-alive one) is closed to make room.
struct Connections {
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// `kbs_connections_total` by event, resolved once rather than per connection.
    accepted: prometheus::IntCounter,
    evicted: prometheus::IntCounter,
    refused: prometheus::IntCounter,
    gauge: prometheus::IntGauge,
    next: AtomicU64,
    max: usize,
    epoch: Instant,
    /// When the bound was last logged (milliseconds since `epoch`), to log it once a second.
    logged: AtomicU64,
}

/// A connection's place in the table; leaving drops it.
struct Admitted {
    id: u64,
    state: Arc<ConnState>,
    table: Arc<Connections>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(&self.id);
        self.table.gauge.set(open.len() as i64);
    }
}

impl Connections {
    fn new(max: usize, metrics: &crate::metrics::Metrics) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            accepted: metrics.connections.with_label_values(&["accepted"]),
            evicted: metrics.connections.with_label_values(&["evicted"]),
            refused: metrics.connections.with_label_values(&["refused"]),
            gauge: metrics.open_connections.clone(),
            next: AtomicU64::new(0),
            max,
            epoch: Instant::now(),
            logged: AtomicU64::new(0),
        })
    }

    /// A place for a new connection, evicting the longest-idle one at the bound; `None` when
    /// every open connection is answering a request.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= self.max {
            let victim = open
                .iter()
                .filter(|(_, c)| c.in_flight.load(Ordering::Relaxed) == 0)
                .max_by_key(|(_, c)| c.idle_for())
                .map(|(id, c)| (*id, c.clone()));
            self.log_bound(victim.is_some());
            let Some((id, c)) = victim else {
                self.refused.inc();
                return None;
            };
            open.remove(&id);
            c.evict.notify_one();
            self.evicted.inc();
        }
        self.accepted.inc();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            last_active: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            evict: Notify::new(),
            epoch: Instant::now(),
        });
        open.insert(id, state.clone());
        self.gauge.set(open.len() as i64);
        Some(Admitted {
            id,
            state,
            table: self.clone(),
        })
    }

    fn log_bound(&self, evicting: bool) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.logged.load(Ordering::Relaxed);
        if (now >= last + 1000 || last == 0)
            && self
                .logged
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            if evicting {
                tracing::warn!(
                    max_connections = self.max,
                    "connection limit reached: closing the longest-idle connection to admit a new one (raise max-connections if clients are legitimate)"
                );
            } else {
                tracing::warn!(
                    max_connections = self.max,
                    "connection limit reached and every connection is busy: refusing new connections until one ends"
                );
            }
        }
    }
}

/// A connection's byte stream, noting when it last moved.
struct Watched<I> {
    inner: I,
    state: Arc<ConnState>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request in flight for as long as it is alive.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: &Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Serves one connection over HTTP/1.1 until it ends, idles past `limits.idle`, or is evicted.
async fn serve_connection<I>(io: I, app: axum::Router, limits: Limits, place: Admitted)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = place.state.clone();
    state.touch();
    let svc_state = state.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = InFlight::new(&svc_state);
        let app = app.clone();
        async move {
            let r = tower::ServiceExt::oneshot(app, req.map(axum::body::Body::new)).await;
            drop(guard);
            r
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true);
    let conn = builder.serve_connection(
        TokioIo::new(Watched {
            inner: io,
            state: state.clone(),
        }),
        svc,
    );
    tokio::pin!(conn);
    let tick = limits.idle.min(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = state.evict.notified() => break,
            _ = tokio::time::sleep(tick) => {
                if state.in_flight.load(Ordering::Relaxed) == 0 && state.idle_for() >= limits.idle {
                    break;
                }
            }
        }
    }
    drop(place);
}

/// Serves `kbs` on `listener` until the process ends: HTTPS (rustls), or plain HTTP when the
/// configuration says so, each connection bounded by [`Limits`].
pub async fn serve(kbs: Arc<Kbs>, listener: TcpListener) -> anyhow::Result<()> {
    let tls = match (&kbs.config.tls_cert, &kbs.config.tls_key) {
        (Some(c), Some(k)) => Some(TlsAcceptor::from(Arc::new(tls_config(c, k)?))),
        _ => None,
    };
    let limits = Limits::of(&kbs.config);
    let app = api::router(kbs.clone());
    let addr = listener.local_addr()?;
    match &tls {
        None => {
            tracing::warn!(%addr, "serving PLAIN HTTP (--insecure-http): tokens, resources and admin credentials cross the network unprotected")
        }
        Some(_) => tracing::info!(%addr, ?limits, "serving HTTPS"),
    }
    let table = Connections::new(limits.max_connections, &kbs.metrics);
    let tls_timeouts = kbs.metrics.connections.with_label_values(&["tls_timeout"]);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait for connections to end.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(place) = table.admit() else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let tls_timeouts = tls_timeouts.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(tcp, app, limits, place).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.tls_handshake, acceptor.accept(tcp));
                    let evicted = place.state.clone();
                    let tls = tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(t)) => t,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                tls_timeouts.inc();
                                return;
                            }
                        },
                        _ = evicted.evict.notified() => return,
                    };
                    serve_connection(tls, app, limits, place).await
                }
            }
        });
    }
}
