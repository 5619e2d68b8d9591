//! The attested mesh in the sandbox: every TCP connection between Coffer pods is mutual TLS 1.3
//! between the pods' sandboxes, with certificates only an attested sandbox obtains
//! ([`coffer_wire::mesh`]; docs/mesh.md).
//!
//! When the initdata carries `mesh.toml`, before the pod's first container is created the agent
//!
//! 1. makes an ECDSA P-256 key (it never leaves the sandbox) and a certificate request, and has
//!    the KBS's mesh CA sign it after attestation: the certificate names the identity of the
//!    attested `mesh.toml`; it is renewed (new key, new certificate) at two thirds of its life,
//!    and new handshakes take the new one while established connections go on;
//! 2. listens in the pod's network namespace: on [`MESH_PORT`] for mutual TLS from peer
//!    sandboxes, on [`OUTBOUND_PORT`] for the containers' redirected connections, and on
//!    [`REFUSE_PORT`] for redirected plaintext from outside the mesh, which is logged and
//!    closed;
//! 3. redirects in that namespace (iptables `nat`): the containers' TCP to the mesh's networks
//!    (`cidrs`) to the outbound listener, every inbound TCP but the mesh port and the open ports
//!    (`open_ports`) to the refusing listener. The proxy's own connections carry the firewall
//!    mark [`MARK`], which the rules pass.
//!
//! An outbound connection: its original destination (`SO_ORIGINAL_DST`) is dialled on the mesh
//! port, the TLS handshake proves both sides (the peer's certificate chains to the mesh CA, is
//! valid now, and names an identity `peers` allows), and the connection is a stream to the
//! original destination in it. Inbound, the peer's identity is checked the same way and each
//! stream goes to its port of the pod's own address (the one the peer dialled) in the pod's
//! namespace.
//!
//! **Resumption.** A peer's later connections resume the TLS session of its full handshake
//! (TLS 1.3 PSK with a fresh ECDHE; the sessions live in each proxy's memory): no certificate
//! signatures or chain checks, a new connection costs less. Both sides still check, on every
//! connection, that the peer's certificate (the one the session was made with) names an allowed
//! identity and is valid now. A session is resumed only while both certificates of its full
//! handshake are valid (less 5 s); after that the next connection makes a full handshake with
//! the current ones. So a workload whose certificate is not renewed (revoked in the KBS) is
//! refused once it expires, resumed or not.
//!
//! **One TLS connection per peer** (`mesh::tunnel`). The pod's connections to a peer are HTTP/2
//! streams of one TLS connection between the two proxies, kept while both certificates of its
//! handshake are valid: a new connection costs no handshake. Each stream is checked as a new
//! connection would be: the client's side uses the connection only while the peer's identity is
//! allowed and both certificates are valid, and the server's side refuses a stream once the
//! peer's certificate expired or its identity stopped being allowed. Established streams go on.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use coffer_wire::mesh::{peer_matches, CertificateResponse, MeshConfig, MESH_PORT};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};

/// Where the containers' redirected outbound connections arrive.
pub const OUTBOUND_PORT: u16 = 15001;
/// Where redirected inbound plaintext arrives, to be logged and closed.
pub const REFUSE_PORT: u16 = 15006;
/// The firewall mark of the proxy's own connections (passed by the redirect rules).
pub const MARK: u32 = 0xc0ff;
/// TLS sessions a proxy keeps for resumption, each side (the oldest go first).
const SESSIONS: usize = 1024;
/// The most peers whose connections the outbound side keeps without looking for closed ones.
const PEERS: usize = 256;
/// Marked sockets each namespace keeps made ahead for the proxy's next connections.
const SPARES: usize = 16;

mod tunnel;

/// A mesh failure.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The KBS issued no certificate.
    #[error("mesh certificate: {0}")]
    Certificate(String),
    /// The pod's namespace could not be set up.
    #[error("mesh: {0}")]
    Setup(String),
}

/// A certificate on its way from a [`CertificateSource`].
pub type CertificateFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<CertificateResponse, String>> + Send + 'a>,
>;

/// What the mesh needs of the KBS: a certificate for a request.
pub trait CertificateSource: Send + Sync + 'static {
    /// Sends `csr_pem` to the KBS's mesh CA.
    fn certificate(&self, csr_pem: String) -> CertificateFuture<'_>;
}

impl CertificateSource for coffer_kbs_client::KbsClient {
    fn certificate(&self, csr_pem: String) -> CertificateFuture<'_> {
        Box::pin(async move {
            self.mesh_certificate(&csr_pem)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The current credentials: replaced whole at each renewal.
struct Credentials {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    peers: Vec<String>,
    not_after: u64,
}

/// The sandbox's mesh identity, renewed in place.
pub struct Identity {
    config: MeshConfig,
    current: RwLock<Arc<Credentials>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("identity", &self.config.identity)
            .finish()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A new key and a certificate for it from `source`.
async fn obtain(source: &dyn CertificateSource) -> Result<Credentials, MeshError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| MeshError::Certificate(format!("cannot make a key: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| MeshError::Certificate(format!("cannot make the request: {e}")))?;
    let resp = source
        .certificate(csr)
        .await
        .map_err(MeshError::Certificate)?;
    let certs: Vec<CertificateDer<'static>> = pem_certs(&resp.certificate)?;
    let mut roots = RootCertStore::empty();
    for c in pem_certs(&resp.ca)? {
        roots
            .add(c)
            .map_err(|e| MeshError::Certificate(format!("the mesh CA: {e}")))?;
    }
    let der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| MeshError::Certificate(e.to_string()))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der)
        .map_err(|e| MeshError::Certificate(format!("the key: {e}")))?;
    Ok(Credentials {
        key: Arc::new(CertifiedKey::new(certs, signing)),
        roots: Arc::new(roots),
        peers: resp.peers,
        not_after: resp.not_after,
    })
}

fn pem_certs(text: &str) -> Result<Vec<CertificateDer<'static>>, MeshError> {
    let certs: Vec<CertificateDer<'static>> = ::pem::parse_many(text)
        .map_err(|e| MeshError::Certificate(format!("not PEM: {e}")))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(MeshError::Certificate(
            "no certificate in the answer".into(),
        ));
    }
    Ok(certs)
}

/// The identity URI a certificate names (its one URI subject alternative name).
/// The identity a peer's certificate names, if the certificate is valid at `now` (seconds since
/// the epoch). Checked on every connection: a resumed TLS session does not run the chain check
/// again, so a peer whose certificate expired (a revoked workload, not renewed) is refused here.
/// Also returns when the certificate expires.
fn current_identity_of(cert: &CertificateDer<'_>, now: u64) -> Option<(String, u64)> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let v = c.validity();
    let (from, to) = (v.not_before.timestamp(), v.not_after.timestamp());
    let now = i64::try_from(now).ok()?;
    if now < from || now > to {
        return None;
    }
    Some((identity_of(cert)?, u64::try_from(to).ok()?))
}

/// How long before either certificate of a session expires the client stops resuming it and
/// makes a full handshake with the certificates of then.
const RESUME_MARGIN_SECS: u64 = 5;

/// The outbound side's TLS sessions, each resumed only while both certificates of the full
/// handshake that made it are valid (this proxy's and the peer's, less a margin): a resumed
/// session carries them on, and the peer would refuse an expired one. Past that, the next
/// connection makes a full handshake with the current certificates. Delegates to rustls's
/// in-memory cache.
#[derive(Debug)]
struct MeshSessions {
    inner: rustls::client::ClientSessionMemoryCache,
    /// Per peer address: until when its sessions may be resumed (seconds since the epoch).
    until: Mutex<std::collections::HashMap<ServerName<'static>, u64>>,
}

impl MeshSessions {
    fn new() -> Self {
        Self {
            inner: rustls::client::ClientSessionMemoryCache::new(SESSIONS),
            until: Mutex::new(Default::default()),
        }
    }

    /// After a full handshake with `peer`: its sessions may be resumed until `until`.
    fn full_handshake(&self, peer: ServerName<'static>, until: u64) {
        let mut m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= SESSIONS && !m.contains_key(&peer) {
            m.clear();
        }
        m.insert(peer, until.saturating_sub(RESUME_MARGIN_SECS));
    }

    /// Until when a session resumed with `peer` may be used: its full handshake's bound (the
    /// certificates of that handshake, not the current ones, are the ones it carries).
    fn bound(&self, peer: &ServerName<'_>) -> u64 {
        self.until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .copied()
            .unwrap_or(0)
    }
}

impl rustls::client::ClientSessionStore for MeshSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
        // TLS 1.3 only.
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        if now_secs() >= self.bound(server_name) {
            return None;
        }
        self.inner.take_tls13_ticket(server_name)
    }
}

/// The one SPIFFE URI a mesh certificate names.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = c.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    let first = uris.next()?;
    uris.next().is_none().then_some(first)
}

impl Identity {
    /// Obtains the first certificate.
    pub async fn new(
        config: MeshConfig,
        source: &dyn CertificateSource,
    ) -> Result<Arc<Self>, MeshError> {
        let creds = obtain(source).await?;
        tracing::info!(identity = %config.identity, not_after = creds.not_after, "mesh certificate obtained");
        Ok(Arc::new(Self {
            config,
            current: RwLock::new(Arc::new(creds)),
        }))
    }

    fn current(&self) -> Arc<Credentials> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// When the current certificate expires (seconds since the epoch).
    pub fn not_after(&self) -> u64 {
        self.current().not_after
    }

    /// Renews at two thirds of each certificate's remaining life, for ever; a failed renewal
    /// is retried every 5 s (logged) until the certificate expires, after which handshakes
    /// fail.
    pub async fn renew_forever(self: Arc<Self>, source: Arc<dyn CertificateSource>) {
        loop {
            let left = self.not_after().saturating_sub(now_secs());
            tokio::time::sleep(Duration::from_secs((left * 2 / 3).max(1))).await;
            loop {
                match obtain(source.as_ref()).await {
                    Ok(c) => {
                        tracing::info!(identity = %self.config.identity, not_after = c.not_after, "mesh certificate renewed");
                        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mesh certificate renewal failed; retrying in 5 s");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        }
    }

    /// Whether `id` is a peer this workload may talk to, as the KBS answered.
    fn allows(&self, id: &str) -> bool {
        self.current().peers.iter().any(|p| peer_matches(p, id))
    }

    fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, MeshError> {
        let roots = self.current().roots.clone();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .map_err(|e| MeshError::Setup(e.to_string()))?;
        let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| MeshError::Setup(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(self.clone())));
        // Resumption (a session ticket per handshake, the session kept in this proxy's memory):
        // a peer's next connection skips the certificate signatures and chain checks, and each
        // connection still checks the identity and validity of the certificate the session was
        // made with (serve_inbound), so an expired one is refused as on a full handshake.
        c.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSIONS);
        c.send_tls13_tickets = 1;
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(c))
    }

    fn client_config(
        self: &Arc<Self>,
    ) -> Result<(Arc<rustls::ClientConfig>, Arc<MeshSessions>), MeshError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| MeshError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier {
                identity: self.clone(),
                provider,
            }))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        // Sessions resumed per peer address while both certificates are valid (MeshSessions);
        // Dialer::dial checks the peer's certificate on every connection, resumed or not.
        let sessions = Arc::new(MeshSessions::new());
        c.resumption = rustls::client::Resumption::store(sessions.clone());
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok((Arc::new(c), sessions))
    }
}

/// Hands out the current certificate (both sides).
#[derive(Debug)]
struct Resolver(Arc<Identity>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The client side's check of a peer: its chain to the mesh CA, valid now, for server
/// authentication (no host name: peers are dialled by address), naming an allowed identity.
#[derive(Debug)]
struct PeerVerifier {
    identity: Arc<Identity>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.identity.current().roots.clone();
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = identity_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        if !self.identity.allows(&id) {
            return Err(rustls::Error::General(format!(
                "peer {id} is not one this workload may talk to"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Makes sockets inside the pod's network namespace (a socket stays in the namespace it was
/// made in): one thread that entered the namespace serves every request, and keeps a few
/// marked sockets made ahead so that a connection does not wait for that thread.
#[derive(Clone)]
pub struct NetnsSockets {
    tx: std::sync::mpsc::Sender<Request>,
    /// Marked sockets made ahead, not yet connected.
    spares: Arc<Mutex<Vec<socket2::Socket>>>,
    /// Whether the thread was asked for more spares and has not made them yet.
    refilling: Arc<std::sync::atomic::AtomicBool>,
}

/// What kind of socket to make.
enum SocketKind {
    /// A listener on this address.
    Listener(SocketAddr),
    /// A marked TCP socket to connect from.
    Dialer,
}

/// A request to the namespace's thread.
enum Request {
    /// One socket, sent back.
    Make(
        SocketKind,
        std::sync::mpsc::Sender<std::io::Result<socket2::Socket>>,
    ),
    /// Marked sockets until there are [`SPARES`].
    Spares,
}

impl NetnsSockets {
    /// Starts the thread for the namespace bound at `netns`.
    pub fn new(netns: PathBuf) -> Result<Self, MeshError> {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let spares = Arc::new(Mutex::new(Vec::new()));
        let refilling = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (made, flag) = (spares.clone(), refilling.clone());
        std::thread::Builder::new()
            .name("mesh-netns".into())
            .spawn(move || {
                let entered = std::fs::File::open(&netns).and_then(|f| {
                    rustix::thread::move_into_link_name_space(
                        std::os::fd::AsFd::as_fd(&f),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .map_err(std::io::Error::from)
                });
                let failed = entered.is_err();
                let _ = ready_tx.send(entered.map_err(|e| format!("{}: {e}", netns.display())));
                if failed {
                    return;
                }
                for request in rx {
                    match request {
                        Request::Make(kind, reply) => {
                            let _ = reply.send(make_socket(kind));
                        }
                        Request::Spares => {
                            let have = made.lock().unwrap_or_else(|p| p.into_inner()).len();
                            let new: Vec<_> = (have..SPARES)
                                .map_while(|_| make_socket(SocketKind::Dialer).ok())
                                .collect();
                            made.lock().unwrap_or_else(|p| p.into_inner()).extend(new);
                            flag.store(false, std::sync::atomic::Ordering::Release);
                        }
                    }
                }
            })
            .map_err(|e| MeshError::Setup(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|e| MeshError::Setup(e.to_string()))?
            .map_err(|e| {
                MeshError::Setup(format!("cannot enter the pod's network namespace {e}"))
            })?;
        Ok(Self {
            tx,
            spares,
            refilling,
        })
    }

    fn make(&self, kind: SocketKind) -> std::io::Result<socket2::Socket> {
        if let SocketKind::Dialer = kind {
            let (spare, left) = {
                let mut v = self.spares.lock().unwrap_or_else(|p| p.into_inner());
                (v.pop(), v.len())
            };
            if left < SPARES / 2
                && !self
                    .refilling
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                let _ = self.tx.send(Request::Spares);
            }
            if let Some(s) = spare {
                return Ok(s);
            }
        }
        let (reply, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Request::Make(kind, reply))
            .map_err(|_| std::io::Error::other("the namespace thread is gone"))?;
        rx.recv()
            .map_err(|_| std::io::Error::other("the namespace thread is gone"))?
    }

    /// A listener in the namespace.
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let s = self.make(SocketKind::Listener(addr))?;
        TcpListener::from_std(s.into())
    }

    /// A marked connection from the namespace to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let s = self.make(SocketKind::Dialer)?;
        let socket = tokio::net::TcpSocket::from_std_stream(s.into());
        tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

fn make_socket(kind: SocketKind) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    match kind {
        SocketKind::Listener(addr) => {
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
        }
        SocketKind::Dialer => {
            s.set_mark(MARK)?;
            // The proxy writes what it has as soon as it has it: no Nagle delay behind the
            // peer's delayed acknowledgement (HTTP/2 frames are small writes).
            s.set_tcp_nodelay(true)?;
        }
    }
    Ok(s)
}

/// The iptables commands that redirect the pod's TCP through the proxy (run in the pod's
/// namespace, `nat` table). With `containers` (a cgroup), only the outbound connections of
/// processes in it are redirected: a pod VM's agent shares the guest's namespace with the
/// containers, and its own connections (the KBS, the registry) stay its own.
pub fn redirect_rules(config: &MeshConfig, containers: Option<&str>) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mark = format!("{MARK:#x}");
    let mut out = vec![
        s(&["-t", "nat", "-N", "COFFER_MESH_OUT"]),
        s(&["-t", "nat", "-N", "COFFER_MESH_IN"]),
        s(&[
            "-t",
            "nat",
            "-A",
            "COFFER_MESH_OUT",
            "-m",
            "mark",
            "--mark",
            &mark,
            "-j",
            "RETURN",
        ]),
    ];
    for cidr in &config.cidrs {
        let mut rule = s(&[
            "-t",
            "nat",
            "-A",
            "COFFER_MESH_OUT",
            "-p",
            "tcp",
            "-d",
            cidr,
        ]);
        if let Some(cg) = containers {
            rule.extend(s(&["-m", "cgroup", "--path", cg]));
        }
        rule.extend(s(&[
            "-j",
            "REDIRECT",
            "--to-ports",
            &OUTBOUND_PORT.to_string(),
        ]));
        out.push(rule);
    }
    out.push(s(&[
        "-t",
        "nat",
        "-A",
        "COFFER_MESH_IN",
        "-p",
        "tcp",
        "--dport",
        &MESH_PORT.to_string(),
        "-j",
        "RETURN",
    ]));
    for p in &config.open_ports {
        out.push(s(&[
            "-t",
            "nat",
            "-A",
            "COFFER_MESH_IN",
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    out.push(s(&[
        "-t",
        "nat",
        "-A",
        "COFFER_MESH_IN",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &REFUSE_PORT.to_string(),
    ]));
    out.push(s(&[
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "COFFER_MESH_OUT",
    ]));
    out.push(s(&[
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "-j",
        "COFFER_MESH_IN",
    ]));
    out
}

/// Runs the proxy in the namespace `sockets` serves: listeners first, then the redirect rules
/// (`iptables` in that namespace, through `nsenter`); returns once both are in place.
pub async fn start(
    identity: Arc<Identity>,
    sockets: NetnsSockets,
    netns: &std::path::Path,
    containers_cgroup: &str,
) -> Result<(), MeshError> {
    let any = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    let listen = |port| {
        sockets
            .listen(any(port))
            .map_err(|e| MeshError::Setup(format!("cannot listen on port {port}: {e}")))
    };
    let inbound = listen(MESH_PORT)?;
    let outbound = listen(OUTBOUND_PORT)?;
    let refuse = listen(REFUSE_PORT)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config()?);
    let (client, sessions) = identity.client_config()?;
    let dialer = Arc::new(Dialer {
        connector: tokio_rustls::TlsConnector::from(client),
        sockets: sockets.clone(),
        identity: identity.clone(),
        sessions,
        peers: Mutex::new(std::collections::HashMap::new()),
    });
    tokio::spawn(serve_inbound(
        inbound,
        acceptor,
        identity.clone(),
        sockets.clone(),
    ));
    tokio::spawn(serve_outbound(outbound, dialer));
    tokio::spawn(serve_refused(refuse));
    // The node's iptables for a process sandbox; in a pod VM, the image's (busybox's nsenter,
    // iptables-nft through its multi-call binary).
    // The netfilter modules load after the agent serves; wait for them.
    crate::vm::later_modules()
        .await
        .map_err(|e| MeshError::Setup(format!("the kernel's netfilter modules: {e}")))?;
    let (nsenter, iptables): (&[&str], &[&str]) = if crate::vm::booted() {
        (
            &["/bin/busybox", "nsenter"],
            &["/usr/sbin/xtables-nft-multi", "iptables"],
        )
    } else {
        (&["nsenter"], &["iptables"])
    };
    let containers = crate::vm::booted().then_some(containers_cgroup);
    if let Some(cg) = containers {
        // The cgroup match resolves its path when the rule is added: the containers' parent
        // cgroup must exist by then (runc would make it with the first container).
        let dir = format!("/sys/fs/cgroup/{}", cg.trim_start_matches('/'));
        std::fs::create_dir_all(&dir)
            .map_err(|e| MeshError::Setup(format!("cannot make the cgroup {dir}: {e}")))?;
    }
    for rule in redirect_rules(&identity.config, containers) {
        let out = tokio::process::Command::new(nsenter[0])
            .args(&nsenter[1..])
            .arg(format!("--net={}", netns.display()))
            .args(iptables)
            .args(&rule)
            .output()
            .await
            .map_err(|e| MeshError::Setup(format!("cannot run iptables: {e}")))?;
        if !out.status.success() {
            return Err(MeshError::Setup(format!(
                "iptables {}: {}",
                rule.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    tracing::info!(identity = %identity.config.identity, cidrs = ?identity.config.cidrs, open_ports = ?identity.config.open_ports, "mesh proxy up: the pod's TCP goes through mutual TLS");
    Ok(())
}

async fn serve_inbound(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    identity: Arc<Identity>,
    sockets: NetnsSockets,
) {
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, identity, sockets) = (acceptor.clone(), identity.clone(), sockets.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::warn!(%from, error = %e, "mesh: refused a connection (TLS)");
                        return;
                    }
                    Err(_) => return,
                };
            let (peer, peer_until) = match checked_peer(tls.get_ref().1, &identity) {
                Ok(p) => p,
                Err(why) => {
                    tracing::warn!(%from, "mesh: refused a peer: {why}");
                    return;
                }
            };
            // The pod's own address the peer dialled (the connection's local end), so that a
            // server bound to it, or to every address, is reached as without the mesh.
            let ip = tls
                .get_ref()
                .0
                .local_addr()
                .map(|a| a.ip())
                .unwrap_or(Ipv4Addr::LOCALHOST.into());
            let accept = move |port: u16| {
                let (identity, sockets, peer) = (identity.clone(), sockets.clone(), peer.clone());
                async move {
                    if let Err((status, why)) =
                        admit(now_secs(), peer_until, identity.allows(&peer), port)
                    {
                        tracing::warn!(%from, %peer, port, "mesh: refused a connection: {why}");
                        return Err(status);
                    }
                    match sockets.connect(SocketAddr::new(ip, port)).await {
                        Ok(app) => {
                            tracing::debug!(%from, %peer, port, "mesh: inbound");
                            Ok(app)
                        }
                        Err(e) => {
                            tracing::info!(%peer, port, error = %e, "mesh: nothing serves the port");
                            Err(hyper::StatusCode::BAD_GATEWAY)
                        }
                    }
                }
            };
            // A little after the peer's certificate expires (its streams are refused from then
            // on, and its own proxy stops opening them), the connection goes.
            let close_at = tokio::time::Instant::now()
                + Duration::from_secs(peer_until.saturating_sub(now_secs()) + 2);
            if let Err(e) = tunnel::serve(tls, close_at, tunnel::IDLE, accept).await {
                tracing::debug!(%from, error = %e, "mesh: a peer connection ended");
            }
        });
    }
}

/// The peer of a finished handshake, either side, as both sides check it on every connection (a
/// resumed session skipped the certificate verifier): the identity its certificate names and
/// when that certificate expires, if the certificate is valid now, the identity one this
/// workload may talk to, and the peer agreed on HTTP/2. Otherwise, why not.
fn checked_peer(
    conn: &rustls::CommonState,
    identity: &Identity,
) -> Result<(String, u64), &'static str> {
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| current_identity_of(c, now_secs()));
    let Some((id, until)) = peer.filter(|(p, _)| identity.allows(p)) else {
        return Err("its identity is not one this workload may talk to, or its certificate is not valid now");
    };
    if conn.alpn_protocol() != Some(b"h2") {
        return Err("it does not speak HTTP/2 (ALPN h2): a proxy of another version?");
    }
    Ok((id, until))
}

/// Whether the inbound side carries a stream to `port` from a peer whose certificate is valid
/// until `peer_until` and whose identity is `allowed`, at `now`; if not, the status and why. The
/// proxy's own ports are refused: a stream to them would loop back into the proxy.
fn admit(
    now: u64,
    peer_until: u64,
    allowed: bool,
    port: u16,
) -> Result<(), (hyper::StatusCode, &'static str)> {
    if now > peer_until {
        return Err((
            hyper::StatusCode::FORBIDDEN,
            "the peer's certificate expired",
        ));
    }
    if !allowed {
        return Err((
            hyper::StatusCode::FORBIDDEN,
            "the peer's identity is no longer allowed",
        ));
    }
    if [MESH_PORT, OUTBOUND_PORT, REFUSE_PORT].contains(&port) {
        return Err((hyper::StatusCode::FORBIDDEN, "a port of the mesh proxy"));
    }
    Ok(())
}

/// A mesh TLS connection to a peer's proxy.
type PeerConn = tokio_rustls::client::TlsStream<TcpStream>;

/// The connection to one peer's proxy that the pod's connections to it are streams of.
#[derive(Clone)]
struct Peer {
    send: tunnel::Sender,
    /// The identity its certificate names.
    id: String,
    /// Until when both certificates of its handshake are valid (seconds since the epoch).
    until: u64,
    /// How many of the pod's connections are streams of it now.
    streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl Peer {
    /// Opens a stream in it for the application connection `r`/`w` to `dst`, counted among its
    /// streams while it is open (see [`tunnel::open`]).
    async fn open(
        &self,
        dst: SocketAddrV4,
        r: tokio::net::tcp::OwnedReadHalf,
        w: tokio::net::tcp::OwnedWriteHalf,
    ) -> Result<(), tunnel::OpenError> {
        let _stream = tunnel::Counted::new(&self.streams);
        tunnel::open(&self.send, dst, r, w).await
    }

    /// Whether a new stream may go in it at `now`.
    fn usable(&self, now: u64, identity: &Identity) -> bool {
        !self.send.is_closed()
            && self.until > now
            && identity.allows(&self.id)
            && self.streams.load(std::sync::atomic::Ordering::Relaxed) < tunnel::STREAMS as usize
    }
}

/// What the outbound side knows of one peer.
#[derive(Default)]
enum Slot {
    /// Nothing yet, or its connection was dropped.
    #[default]
    Empty,
    /// The connection new streams go in.
    Kept(Peer),
    /// The last attempt to connect failed, when and why: the connections of the next second
    /// fail at once with the same reason instead of each trying in turn.
    Failed(std::time::Instant, String),
}

/// How long a failure to connect to a peer is the answer for that peer.
const FAILED_FOR: Duration = Duration::from_secs(1);

/// What the outbound side needs to make connections to peers.
struct Dialer {
    connector: tokio_rustls::TlsConnector,
    sockets: NetnsSockets,
    identity: Arc<Identity>,
    sessions: Arc<MeshSessions>,
    /// Per peer address, what is known of it (one task at a time connects, the others wait).
    peers: Mutex<std::collections::HashMap<Ipv4Addr, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl Dialer {
    /// A checked TLS connection to the proxy of the pod at `ip`: dialled on the mesh port, the
    /// handshake done, the peer's certificate naming an identity this workload may talk to and
    /// valid now (a resumed session skipped the verifier: it is checked here). Returns it with
    /// that identity and until when both certificates are valid; on failure, what went wrong.
    async fn dial(&self, ip: Ipv4Addr) -> Result<(PeerConn, String, u64), String> {
        let tcp = self
            .sockets
            .connect(SocketAddr::V4(SocketAddrV4::new(ip, MESH_PORT)))
            .await
            .map_err(|e| format!("the peer's sandbox does not answer on the mesh port: {e}"))?;
        let name = ServerName::IpAddress(ip.into());
        let tls = match tokio::time::timeout(
            Duration::from_secs(10),
            self.connector.connect(name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(format!("refused to talk to the peer: {e}")),
            Err(_) => return Err("the peer's handshake timed out".into()),
        };
        let conn = tls.get_ref().1;
        let (id, peer_until) = checked_peer(conn, &self.identity)
            .map_err(|why| format!("refused to talk to the peer: {why}"))?;
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        // A resumed session carries the certificates of its full handshake: its bound is theirs.
        let until = if resumed {
            peer_until.min(self.sessions.bound(&name))
        } else {
            let until = peer_until.min(self.identity.not_after());
            self.sessions.full_handshake(name, until);
            until
        };
        tracing::debug!(%ip, peer = %id, resumed, "mesh: connected to a peer's proxy");
        Ok((tls, id, until))
    }

    /// The slot of the peer at `ip`. Past [`PEERS`] peers, those without a connection that new
    /// streams may go in are forgotten first.
    fn slot(&self, ip: Ipv4Addr) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() >= PEERS && !peers.contains_key(&ip) {
            let now = now_secs();
            peers.retain(|_, slot| match slot.try_lock() {
                Ok(s) => matches!(&*s, Slot::Kept(p) if p.usable(now, &self.identity)),
                Err(_) => true,
            });
        }
        peers.entry(ip).or_default().clone()
    }

    /// The connection to the peer at `ip` for a new stream: the one kept while it is open, has
    /// room, its peer is still allowed and both certificates are still valid; otherwise a new
    /// one (the one it replaces goes on for its streams).
    async fn peer(&self, ip: Ipv4Addr) -> Result<Peer, String> {
        let slot = self.slot(ip);
        let mut slot = slot.lock().await;
        match &*slot {
            Slot::Kept(p) if p.usable(now_secs(), &self.identity) => return Ok(p.clone()),
            Slot::Failed(at, why) if at.elapsed() < FAILED_FOR => return Err(why.clone()),
            _ => {}
        }
        let made = async {
            let (tls, id, until) = self.dial(ip).await?;
            let send = tunnel::client(tls)
                .await
                .map_err(|e| format!("HTTP/2 with the peer's proxy: {e}"))?;
            Ok::<_, String>(Peer {
                send,
                id,
                until,
                streams: Default::default(),
            })
        }
        .await;
        *slot = match &made {
            Ok(p) => Slot::Kept(p.clone()),
            Err(why) => Slot::Failed(std::time::Instant::now(), why.clone()),
        };
        made
    }

    /// Drops the connection `p` from the peer at `ip`'s slot, if it is still the one kept.
    async fn drop_kept(&self, ip: Ipv4Addr, p: &Peer) {
        let slot = self.slot(ip);
        let mut slot = slot.lock().await;
        if matches!(&*slot, Slot::Kept(k) if Arc::ptr_eq(&k.streams, &p.streams)) {
            *slot = Slot::Empty;
        }
    }
}

async fn serve_outbound(listener: TcpListener, dialer: Arc<Dialer>) {
    loop {
        let Ok((app, _)) = listener.accept().await else {
            continue;
        };
        let _ = app.set_nodelay(true);
        let dialer = dialer.clone();
        tokio::spawn(async move {
            let dst = match rustix::net::sockopt::ip_original_dst(&app) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh: no original destination");
                    return;
                }
            };
            let peer = match dialer.peer(*dst.ip()).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%dst, error = %e, "mesh: no connection to the peer");
                    return;
                }
            };
            tracing::debug!(%dst, peer = %peer.id, "mesh: outbound");
            let (r, w) = app.into_split();
            let mut opened = peer.open(dst, r, w).await;
            let mut peer = peer;
            // A connection the peer closed (idle, or its certificate expired) before this stream
            // went out: once more, in a new one.
            if let Err(tunnel::OpenError::Unsent { error, app }) = opened {
                tracing::debug!(%dst, peer = %peer.id, %error, "mesh: the peer connection closed; opening the stream in a new one");
                dialer.drop_kept(*dst.ip(), &peer).await;
                let (r, w) = *app;
                peer = match dialer.peer(*dst.ip()).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(%dst, error = %e, "mesh: no connection to the peer");
                        tunnel::reset(w);
                        return;
                    }
                };
                opened = peer.open(dst, r, w).await;
            }
            match opened {
                Ok(()) => {}
                Err(e @ tunnel::OpenError::Refused(hyper::StatusCode::FORBIDDEN)) => {
                    tracing::warn!(%dst, peer = %peer.id, error = %e, "mesh: the peer refused the connection; the next connection makes a new peer connection");
                    dialer.drop_kept(*dst.ip(), &peer).await;
                }
                Err(e @ tunnel::OpenError::Refused(_)) => {
                    tracing::warn!(%dst, peer = %peer.id, error = %e, "mesh: the peer refused the connection")
                }
                Err(tunnel::OpenError::Unsent { error, app }) => {
                    tracing::info!(%dst, peer = %peer.id, %error, "mesh: the new peer connection closed too");
                    tunnel::reset(app.1);
                    dialer.drop_kept(*dst.ip(), &peer).await;
                }
                Err(e) => {
                    tracing::info!(%dst, peer = %peer.id, error = %e, "mesh: the peer connection failed; the next connection makes a new one");
                    dialer.drop_kept(*dst.ip(), &peer).await;
                }
            }
        });
    }
}

async fn serve_refused(listener: TcpListener) {
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            continue;
        };
        let port = rustix::net::sockopt::ip_original_dst(&tcp)
            .map(|d| d.port())
            .unwrap_or_default();
        tracing::warn!(%from, port, "mesh: refused plaintext from outside the mesh");
        drop(tcp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A mesh CA of the test's own, issuing as the KBS does: the CSR's key, one SPIFFE URI.
    struct TestCa {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pem: String,
        identity: String,
    }

    impl CertificateSource for TestCa {
        fn certificate(&self, csr_pem: String) -> CertificateFuture<'_> {
            Box::pin(async move {
                let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem)
                    .map_err(|e| e.to_string())?;
                let mut p = rcgen::CertificateParams::default();
                p.subject_alt_names = vec![rcgen::SanType::URI(
                    self.identity
                        .clone()
                        .try_into()
                        .map_err(|e: rcgen::Error| e.to_string())?,
                )];
                p.extended_key_usages = vec![
                    rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                    rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                ];
                csr.params = p;
                let cert = csr.signed_by(&self.issuer).map_err(|e| e.to_string())?;
                Ok(CertificateResponse {
                    certificate: cert.pem(),
                    ca: self.pem.clone(),
                    identity: self.identity.clone(),
                    peers: vec!["spiffe://t/*".into()],
                    not_after: now_secs() + 3600,
                })
            })
        }
    }

    fn ca_for(identity: &str) -> TestCa {
        static CA: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
        let (key_pem, pem) = CA.get_or_init(|| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
            let cert = p.self_signed(&key).unwrap();
            (key.serialize_pem(), cert.pem())
        });
        let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
        TestCa {
            issuer: rcgen::Issuer::from_ca_cert_pem(pem, key).unwrap(),
            pem: pem.clone(),
            identity: identity.into(),
        }
    }

    async fn identity(id: &str) -> Arc<Identity> {
        let config = MeshConfig::parse(&format!(
            "identity = \"{id}\"\npeers = [\"spiffe://t/*\"]\n"
        ))
        .unwrap();
        Identity::new(config, &ca_for(id)).await.unwrap()
    }

    /// One connection from `client` to the server as `serve_outbound` makes it: the handshake,
    /// the peer check, the resumption bound after a full handshake; returns the handshake's kind
    /// and the identity the server saw.
    async fn connect(
        client: &Arc<Identity>,
        connector: &tokio_rustls::TlsConnector,
        sessions: &MeshSessions,
        acceptor: &tokio_rustls::TlsAcceptor,
    ) -> (rustls::HandshakeKind, String) {
        let (c, s) = tokio::io::duplex(1 << 16);
        let acceptor = acceptor.clone();
        let server = tokio::spawn(async move {
            let mut t = acceptor.accept(s).await.unwrap();
            let seen = t
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| current_identity_of(c, now_secs()))
                .unwrap()
                .0;
            t.write_all(b"x").await.unwrap();
            t.flush().await.unwrap();
            let mut b = [0u8; 1];
            t.read_exact(&mut b).await.unwrap();
            seen
        });
        let name = ServerName::IpAddress(Ipv4Addr::new(10, 88, 0, 9).into());
        let mut t = connector.connect(name.clone(), c).await.unwrap();
        let conn = t.get_ref().1;
        let kind = conn.handshake_kind().unwrap();
        let (id, until) = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| current_identity_of(c, now_secs()))
            .unwrap();
        assert!(client.allows(&id));
        if kind != rustls::HandshakeKind::Resumed {
            sessions.full_handshake(name, until.min(client.not_after()));
        }
        // The server's session ticket comes before its first byte.
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await.unwrap();
        t.write_all(b"y").await.unwrap();
        t.flush().await.unwrap();
        (kind, server.await.unwrap())
    }

    /// A peer's second connection resumes the session of its first (no certificates sent),
    /// and the server still knows the client's identity from it; once the session's
    /// certificates are past their bound, the next connection makes a full handshake.
    #[tokio::test]
    async fn later_connections_resume_until_the_sessions_certificates_expire() {
        let (a, b) = (
            identity("spiffe://t/a").await,
            identity("spiffe://t/b").await,
        );
        let (client, sessions) = a.client_config().unwrap();
        let connector = tokio_rustls::TlsConnector::from(client);
        let acceptor = tokio_rustls::TlsAcceptor::from(b.server_config().unwrap());
        let first = connect(&a, &connector, &sessions, &acceptor).await;
        assert_eq!(first, (rustls::HandshakeKind::Full, "spiffe://t/a".into()));
        let second = connect(&a, &connector, &sessions, &acceptor).await;
        assert_eq!(
            second,
            (rustls::HandshakeKind::Resumed, "spiffe://t/a".into())
        );
        // The session's certificates expire (as a bound of now): a full handshake follows.
        let name = ServerName::IpAddress(Ipv4Addr::new(10, 88, 0, 9).into());
        sessions.full_handshake(name, now_secs());
        let third = connect(&a, &connector, &sessions, &acceptor).await;
        assert_eq!(third.0, rustls::HandshakeKind::Full);
        let fourth = connect(&a, &connector, &sessions, &acceptor).await;
        assert_eq!(fourth.0, rustls::HandshakeKind::Resumed);
    }

    /// A stream is refused once its peer's certificate expired or its identity stopped being
    /// allowed, and to the proxy's own ports; carried otherwise.
    #[test]
    fn a_stream_is_admitted_only_for_a_current_allowed_peer_and_an_application_port() {
        assert_eq!(admit(100, 100, true, 8080), Ok(()));
        for (now, until, allowed, port) in [
            (101, 100, true, 8080),
            (100, 100, false, 8080),
            (100, 100, true, MESH_PORT),
            (100, 100, true, OUTBOUND_PORT),
            (100, 100, true, REFUSE_PORT),
        ] {
            let refused = admit(now, until, allowed, port).unwrap_err();
            assert_eq!(refused.0, hyper::StatusCode::FORBIDDEN, "{refused:?}");
        }
    }

    /// An expired certificate names no identity, whatever the session says.
    #[test]
    fn an_expired_certificate_names_no_current_identity() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI("spiffe://t/a".try_into().unwrap())];
        let cert = p.self_signed(&key).unwrap();
        let der = cert.der().clone();
        let (id, until) = current_identity_of(&der, now_secs()).unwrap();
        assert_eq!(id, "spiffe://t/a");
        assert!(current_identity_of(&der, until + 1).is_none());
    }

    #[test]
    fn the_rules_pass_the_mesh_port_the_open_ports_and_the_proxys_own_connections() {
        let c = MeshConfig::parse(
            "identity = \"spiffe://c/ns/a/sa/web\"\ncidrs = [\"10.88.0.0/16\"]\nopen_ports = [8081]\n",
        )
        .unwrap();
        let rules: Vec<String> = redirect_rules(&c, None)
            .iter()
            .map(|r| r.join(" "))
            .collect();
        let at = |needle: &str| {
            rules
                .iter()
                .position(|r| r.contains(needle))
                .unwrap_or_else(|| panic!("{needle} in {rules:#?}"))
        };
        assert!(at("--mark 0xc0ff -j RETURN") < at("-d 10.88.0.0/16 -j REDIRECT --to-ports 15001"));
        assert!(at("--dport 15443 -j RETURN") < at("-j REDIRECT --to-ports 15006"));
        assert!(at("--dport 8081 -j RETURN") < at("-j REDIRECT --to-ports 15006"));
        // The chains are filled before traffic is sent through them.
        assert!(at("-A OUTPUT") > at("-d 10.88.0.0/16"));
        assert!(at("-A PREROUTING") > at("--to-ports 15006"));
        // In a pod VM only the containers' connections are redirected, not the agent's.
        let vm: Vec<String> = redirect_rules(&c, Some("/coffer"))
            .iter()
            .map(|r| r.join(" "))
            .collect();
        assert!(
            vm.iter()
                .any(|r| r.contains("-d 10.88.0.0/16 -m cgroup --path /coffer -j REDIRECT")),
            "{vm:#?}"
        );
    }
}
