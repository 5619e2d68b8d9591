//! Many of the pod's connections in one mutual-TLS connection per peer: each TCP connection
//! between two mesh pods is an HTTP/2 stream (RFC 9113, `hyper`) of the one TLS connection
//! between their proxies.
//!
//! A stream is a `POST` whose URI's authority is the connection's original destination
//! (`http://10.88.0.9:8080/`); its request body carries what the client's application sends,
//! its response body what the server's application sends, both at once, each ended (`END_STREAM`)
//! when that side shuts its writing down. The server's proxy connects to that port of its pod
//! and answers `200` before the first byte of the response, or refuses with a status (`403`,
//! `400`, `405`, `502`: see `mesh::admit` and [`serve`]). A refused stream, a reset one or the end
//! of the peer connection mid-stream resets the application's connection (`RST`), so a cut-off
//! transfer never looks complete to it.
//!
//! So a new connection to a peer the proxy already talks to costs no handshake: one `HEADERS`
//! frame each way, and the client's first bytes go with its request, not after the answer.
//! HTTP/2's flow control bounds what each proxy buffers per stream; the connection's window is
//! as large as all its streams' windows together, so streams whose application stops reading
//! never hold up the others.

use std::{
    net::SocketAddrV4,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::{
    body::{Body, Frame, Incoming},
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
};

/// The most bytes one read of an application's connection takes (one DATA frame's worth).
const CHUNK: usize = 64 << 10;
/// What one stream may have in flight unacknowledged, each way (what a proxy buffers at most for
/// an application that does not read).
const STREAM_WINDOW: u32 = 1 << 20;
/// What all the streams of a connection may have in flight, each way: every stream's window, so
/// that no stream waits for another's application to read.
const CONNECTION_WINDOW: u32 = STREAMS * STREAM_WINDOW;
/// The largest DATA frame: a TLS record's worth, so the receiving proxy passes bytes on as each
/// record arrives (64 KiB frames made a single stream about 10 % slower).
const FRAME: u32 = 16 << 10;
/// The most streams (connections of the pods) at once in one peer connection; the client's side
/// opens another connection to the peer beyond.
pub(super) const STREAMS: u32 = 256;
/// How often an idle peer connection is checked with a PING, and how long the answer may take:
/// a peer that vanished without closing (a pod VM switched off) is noticed within both.
const PING: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a peer connection that carries no stream stays open before the serving side
/// closes it (`GOAWAY`): between this and twice this after its last stream ended.
pub(super) const IDLE: Duration = Duration::from_secs(300);

/// Counts one stream in `count` while it lives: the serving side's streams in flight, the
/// client side's streams of a peer connection.
#[derive(Debug)]
pub(super) struct Counted(Arc<AtomicUsize>);

impl Counted {
    /// One more in `count`, until dropped.
    pub(super) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the application on one end sends, as an HTTP/2 body: ends at its end of stream (no
/// trailers), fails with its read error (which resets the stream).
#[derive(Debug)]
pub(super) struct ReadBody {
    r: Option<OwnedReadHalf>,
    buf: BytesMut,
    /// The served stream this body is a direction of.
    _stream: Option<Arc<Counted>>,
}

impl ReadBody {
    /// The bytes `r` reads, until its end.
    pub fn new(r: OwnedReadHalf) -> Self {
        Self {
            r: Some(r),
            buf: BytesMut::new(),
            _stream: None,
        }
    }

    /// No bytes at all (a refusal's body).
    pub fn empty() -> Self {
        Self {
            r: None,
            buf: BytesMut::new(),
            _stream: None,
        }
    }

    /// Recovers the application's reading half from a request that was never sent.
    fn into_reader(self) -> Option<OwnedReadHalf> {
        self.r
    }
}

impl Body for ReadBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let Some(r) = this.r.as_mut() else {
            return Poll::Ready(None);
        };
        if this.buf.capacity() < CHUNK {
            this.buf.reserve(CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(r), cx, &mut this.buf) {
            Poll::Ready(Ok(0)) => {
                this.r = None;
                Poll::Ready(None)
            }
            Poll::Ready(Ok(n)) => {
                // A short read is copied out, so that it does not hold a whole chunk's
                // allocation while it waits to be sent; a long one is handed over as it is.
                let data = if n < CHUNK / 16 {
                    let d = Bytes::copy_from_slice(&this.buf);
                    this.buf.clear();
                    d
                } else {
                    this.buf.split().freeze()
                };
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.r.is_none()
    }
}

/// Writes what `body` carries to `w`, then shuts `w`'s writing down (the peer application's end
/// of stream). When the stream is reset or the peer connection ends first, `w`'s connection is
/// reset instead.
pub(super) async fn write_body(body: Incoming, mut w: OwnedWriteHalf) {
    async fn copy(mut body: Incoming, w: &mut OwnedWriteHalf) -> std::io::Result<()> {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(std::io::Error::other)?;
            if let Ok(data) = frame.into_data() {
                w.write_all(&data).await?;
            }
        }
        w.shutdown().await
    }
    if copy(body, &mut w).await.is_err() {
        reset(w);
    }
}

/// Resets the connection `w` is half of (`RST` instead of `FIN`), once its reading half is
/// dropped too: what an application would see of a TCP connection cut off.
pub(super) fn reset(w: OwnedWriteHalf) {
    let _ = socket2::SockRef::from(w.as_ref()).set_linger(Some(Duration::ZERO));
    // Dropping the half would shut its writing down (a FIN) first.
    w.forget();
}

/// The client's side of a peer connection: opens streams in it, from any task.
pub(super) type Sender = hyper::client::conn::http2::SendRequest<ReadBody>;

/// Starts the client's side of a peer connection on `io` (the TLS connection to the peer's
/// proxy); the connection runs in a task of its own until it closes.
pub(super) async fn client<IO>(io: IO) -> Result<Sender, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME)
        .keep_alive_interval(PING)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "mesh: a peer connection ended");
        }
    });
    Ok(send)
}

/// Why a stream did not open.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// The peer connection would take no new stream (it closed, or its peer said `GOAWAY`)
    /// before this one was sent: the application's connection is handed back, untouched, for
    /// another peer connection.
    #[error("the peer connection takes no new stream: {error}")]
    Unsent {
        /// Why.
        error: String,
        /// The application's connection, as it came.
        app: Box<(OwnedReadHalf, OwnedWriteHalf)>,
    },
    /// The peer connection failed (closed, reset, gone silent, or no stream free in time): make a
    /// new one.
    #[error("the peer connection failed: {0}")]
    Connection(String),
    /// The peer's proxy refused this stream.
    #[error("the peer's proxy answered {0}")]
    Refused(StatusCode),
}

/// Opens a stream to `dst` in the peer connection `send` for the application connection whose
/// halves are `r` and `w`, and carries the peer's answer to `w` until its end. What `r` reads
/// goes on, in the connection's task, until its own end. A stream that does not open resets the
/// application's connection.
pub(super) async fn open(
    send: &Sender,
    dst: SocketAddrV4,
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
) -> Result<(), OpenError> {
    let request = Request::post(format!("http://{dst}/"))
        .body(ReadBody::new(r))
        .map_err(|e| OpenError::Connection(e.to_string()))?;
    let mut send = send.clone();
    let response = tokio::time::timeout(Duration::from_secs(10), async move {
        if let Err(e) = send.ready().await {
            // Not sent: the request comes back with the application's reading half.
            return Err((e.to_string(), Some(request)));
        }
        send.try_send_request(request)
            .await
            .map_err(|mut e| (e.error().to_string(), e.take_message()))
    })
    .await;
    let response = match response {
        Ok(Ok(r)) if r.status() == StatusCode::OK => r,
        Ok(Ok(r)) => {
            reset(w);
            return Err(OpenError::Refused(r.status()));
        }
        Ok(Err((error, unsent))) => {
            if let Some(r) = unsent.and_then(|req| req.into_body().into_reader()) {
                return Err(OpenError::Unsent {
                    error,
                    app: Box::new((r, w)),
                });
            }
            reset(w);
            return Err(OpenError::Connection(error));
        }
        Err(_) => {
            reset(w);
            return Err(OpenError::Connection("no answer in 10 s".into()));
        }
    };
    write_body(response.into_body(), w).await;
    Ok(())
}

/// What the server's side does with a stream's destination port: the application connection
/// to carry it to, or the status refusing it.
pub(super) type Opened = Result<tokio::net::TcpStream, StatusCode>;

/// Serves the streams a peer opens in the connection `io` (the TLS connection from its proxy),
/// each carried to the connection `accept` makes for its destination port or refused with the
/// status it answers (`405` for a method but `POST`, `400` for a URI without a port); returns
/// when the connection closes.
///
/// The connection is closed gracefully (`GOAWAY`: streams under way go on to their end, new ones
/// go to another connection) at `close_at` (when the peer's certificate is no longer valid), or
/// once no stream was carried for `idle` (between `idle` and twice `idle`).
pub(super) async fn serve<IO, F, Fut>(
    io: IO,
    close_at: tokio::time::Instant,
    idle: Duration,
    accept: F,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(u16) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Opened> + Send + 'static,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicU64::new(0));
    let (count, streams) = (in_flight.clone(), opened.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (accept, count) = (accept.clone(), count.clone());
        streams.fetch_add(1, Ordering::Relaxed);
        async move {
            let refuse = |status| {
                let mut r = Response::new(ReadBody::empty());
                *r.status_mut() = status;
                Ok::<_, std::convert::Infallible>(r)
            };
            if req.method() != hyper::Method::POST {
                return refuse(StatusCode::METHOD_NOT_ALLOWED);
            }
            let Some(port) = req.uri().port_u16() else {
                return refuse(StatusCode::BAD_REQUEST);
            };
            match accept(port).await {
                Ok(app) => {
                    let (r, w) = app.into_split();
                    // Counted while either direction is carried.
                    let stream = Arc::new(Counted::new(&count));
                    let held = stream.clone();
                    tokio::spawn(async move {
                        write_body(req.into_body(), w).await;
                        drop(held);
                    });
                    let mut body = ReadBody::new(r);
                    body._stream = Some(stream);
                    Ok(Response::new(body))
                }
                Err(status) => refuse(status),
            }
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME)
        .max_concurrent_streams(STREAMS)
        .keep_alive_interval(PING)
        .keep_alive_timeout(PING_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
    let mut seen = 0;
    let mut closing = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => return done,
            _ = tokio::time::sleep_until(close_at), if !closing => {
                tracing::info!("mesh: the peer's certificate expired; closing its connection (streams under way go on)");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = checks.tick(), if !closing => {
                let now = opened.load(Ordering::Relaxed);
                if in_flight.load(Ordering::Relaxed) == 0 && now == seen {
                    tracing::debug!("mesh: closing an idle peer connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                seen = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// An "application" on loopback that answers each connection with what it read, upper-cased,
    /// after the client's end of stream.
    async fn app() -> u16 {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    s.write_all(&got.to_ascii_uppercase()).await.unwrap();
                });
            }
        });
        port
    }

    /// A proxy pair over an in-memory connection: the server's side refuses port 1 as the
    /// mesh refuses an expired peer, connects the others on loopback. Returns the client's
    /// side.
    async fn pair() -> Sender {
        pair_closing(
            tokio::time::Instant::now() + Duration::from_secs(3600),
            IDLE,
        )
        .await
    }

    /// [`pair`] whose serving side closes the connection at `close_at` or after `idle`.
    async fn pair_closing(close_at: tokio::time::Instant, idle: Duration) -> Sender {
        let (c, s) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(s, close_at, idle, |port| async move {
            if port == 1 {
                return Err(StatusCode::FORBIDDEN);
            }
            TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .map_err(|_| StatusCode::BAD_GATEWAY)
        }));
        client(c).await.unwrap()
    }

    /// An application connection carried through `send` to `port`: writes `msg`, shuts its
    /// writing down, reads the answer to its end.
    async fn through(send: &Sender, port: u16, msg: Vec<u8>) -> Result<Vec<u8>, OpenError> {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let at = l.local_addr().unwrap();
        let user = tokio::spawn(async move {
            let mut s = TcpStream::connect(at).await.unwrap();
            s.write_all(&msg).await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            got
        });
        let (app, _) = l.accept().await.unwrap();
        let (r, w) = app.into_split();
        open(send, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), r, w).await?;
        Ok(user.await.unwrap())
    }

    /// Fails a test that takes longer than a minute instead of hanging it.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("the test took more than a minute")
    }

    /// Many connections at once in one peer connection, each with its own bytes both ways and
    /// its own end of stream; a large one crosses the flow-control windows.
    #[tokio::test]
    async fn connections_are_streams_of_one_peer_connection() {
        within(streams()).await
    }

    async fn streams() {
        let port = app().await;
        let send = pair().await;
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let send = send.clone();
            tasks.push(tokio::spawn(async move {
                let msg = vec![b'a' + i; 1000 * (i as usize + 1)];
                let got = through(&send, port, msg.clone()).await.unwrap();
                assert_eq!(got, msg.to_ascii_uppercase());
            }));
        }
        let big: Vec<u8> = (0..(24u32 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
        let got = through(&send, port, big.clone()).await.unwrap();
        assert!(got == big.to_ascii_uppercase(), "the 24 MiB stream changed");
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// A refused stream carries nothing and names the status, and the application's connection
    /// is reset, not ended; the peer connection goes on.
    #[tokio::test]
    async fn a_refused_stream_names_the_status() {
        within(refused()).await
    }

    async fn refused() {
        let port = app().await;
        let send = pair().await;
        match through(&send, 1, b"x".to_vec()).await {
            Err(OpenError::Refused(s)) => assert_eq!(s, StatusCode::FORBIDDEN),
            other => panic!("{other:?}"),
        }
        let closed = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            l.local_addr().unwrap().port()
        };
        match through(&send, closed, b"x".to_vec()).await {
            Err(OpenError::Refused(s)) => assert_eq!(s, StatusCode::BAD_GATEWAY),
            other => panic!("{other:?}"),
        }
        assert_eq!(through(&send, port, b"ok".to_vec()).await.unwrap(), b"OK");
        // What the application sees of a refused stream: a reset.
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let at = l.local_addr().unwrap();
        let user = tokio::spawn(async move {
            let mut s = TcpStream::connect(at).await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await
        });
        let (app, _) = l.accept().await.unwrap();
        let (r, w) = app.into_split();
        let refused = open(&send, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1), r, w).await;
        assert!(matches!(refused, Err(OpenError::Refused(_))));
        let seen = user.await.unwrap();
        assert_eq!(
            seen.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }

    /// Streams whose application never reads (more of them than the connection's window would
    /// hold if it were not as large as all the streams' windows) do not hold up another stream.
    #[tokio::test]
    async fn streams_whose_application_stops_reading_do_not_hold_up_the_others() {
        within(stalled()).await
    }

    async fn stalled() {
        let port = app().await;
        // An application that accepts and never reads.
        let sink = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let sink_port = sink.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = sink.accept().await.unwrap();
                held.push(s);
            }
        });
        let send = pair().await;
        for _ in 0..8 {
            let send = send.clone();
            tokio::spawn(async move {
                let _ = through(&send, sink_port, vec![b'z'; 16 << 20]).await;
            });
        }
        // Let the stalled streams fill what they may.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let msg = vec![b'q'; 2 << 20];
        let got = tokio::time::timeout(Duration::from_secs(20), through(&send, port, msg.clone()))
            .await
            .expect("a stream was held up by the stalled ones")
            .unwrap();
        assert!(got == msg.to_ascii_uppercase());
    }

    /// The serving side closes a peer connection when the peer's certificate expires: a stream
    /// under way goes on to its end, and a stream opened after comes back unsent, with its
    /// application's connection, for a new peer connection.
    #[tokio::test]
    async fn a_closing_peer_connection_finishes_its_streams_and_hands_new_ones_back() {
        within(closing()).await
    }

    async fn closing() {
        let port = app().await;
        let send = pair_closing(tokio::time::Instant::now() + Duration::from_secs(1), IDLE).await;
        // An application that sends half, waits past the close, then sends the rest.
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let at = l.local_addr().unwrap();
        let user = tokio::spawn(async move {
            let mut s = TcpStream::connect(at).await.unwrap();
            s.write_all(b"before the close, ").await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            s.write_all(b"after it").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let (app, _) = l.accept().await.unwrap();
        let (r, w) = app.into_split();
        let under_way = {
            let send = send.clone();
            tokio::spawn(async move {
                open(&send, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), r, w).await
            })
        };
        under_way.await.unwrap().unwrap();
        assert_eq!(user.await.unwrap(), b"BEFORE THE CLOSE, AFTER IT");
        // The connection is gone once its last stream ended: a new stream is handed back.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !send.is_closed() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the connection stayed open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match through(&send, port, b"x".to_vec()).await {
            Err(OpenError::Unsent { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// A peer connection that carries nothing for the idle time is closed by its serving side;
    /// one that carries streams is not.
    #[tokio::test]
    async fn an_idle_peer_connection_is_closed() {
        within(idle()).await
    }

    async fn idle() {
        let port = app().await;
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let send = pair_closing(far, Duration::from_millis(500)).await;
        // Busy for two seconds (a stream every 100 ms): still open.
        for _ in 0..20 {
            assert_eq!(through(&send, port, b"a".to_vec()).await.unwrap(), b"A");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!send.is_closed(), "a busy connection was closed");
        // Then idle: closed within twice the idle time (and a little).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(send.is_closed(), "an idle connection stayed open");
    }
}
