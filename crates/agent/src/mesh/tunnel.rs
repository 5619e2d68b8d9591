//! Many of the pod's connections in one mutual-TLS connection per peer: each TCP connection
//! between two mesh pods is an HTTP/2 stream (RFC 9113, `hyper`) of the one TLS connection
//! between their proxies.
//!
//! A stream is a `POST` whose URI's authority is the connection's original destination
//! (`http://10.88.0.9:8080/`); its request body carries what the client's application sends,
//! its response body what the server's application sends, both at once, each ended (`END_STREAM`)
//! when that side shuts its writing down. The server's proxy connects to that port of its pod
//! and answers `200` before the first byte of the response, or refuses with a status: `403` when
//! the peer's certificate expired or its identity is no longer allowed, `400` for a URI without a
//! port, `502` when nothing serves the port. A reset stream resets the application's connection.
//!
//! So a new connection to a peer the proxy already talks to costs no handshake: one `HEADERS`
//! frame each way, and the client's first bytes go with its request, not after the answer.
//! HTTP/2's flow control (per stream and per connection) bounds what each proxy buffers.

use std::{
    net::SocketAddrV4,
    pin::Pin,
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
/// What one stream may have in flight unacknowledged, each way.
const STREAM_WINDOW: u32 = 1 << 20;
/// What all the streams of a connection may have in flight, each way.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// The largest DATA frame.
const FRAME: u32 = 64 << 10;
/// The most streams (connections of the pods) at once in one peer connection; more wait.
pub(super) const STREAMS: u32 = 4096;
/// How often an idle peer connection is checked with a PING, and how long the answer may take:
/// a peer that vanished without closing (a pod VM switched off) is noticed within both.
const PING: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What the application on one end sends, as an HTTP/2 body: ends at its end of stream (no
/// trailers), fails with its read error (which resets the stream).
#[derive(Debug)]
pub(super) struct ReadBody {
    r: Option<OwnedReadHalf>,
    buf: BytesMut,
}

impl ReadBody {
    /// The bytes `r` reads, until its end.
    pub fn new(r: OwnedReadHalf) -> Self {
        Self {
            r: Some(r),
            buf: BytesMut::new(),
        }
    }

    /// No bytes at all (a refusal's body).
    pub fn empty() -> Self {
        Self {
            r: None,
            buf: BytesMut::new(),
        }
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
            Poll::Ready(Ok(_)) => Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze())))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.r.is_none()
    }
}

/// Writes what `body` carries to `w`, then shuts `w`'s writing down (the peer application's end
/// of stream). A reset stream is an error, and `w`'s connection is then reset when dropped.
pub(super) async fn write_body(
    mut body: Incoming,
    mut w: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(std::io::Error::other)?;
        if let Ok(data) = frame.into_data() {
            w.write_all(&data).await?;
        }
    }
    w.shutdown().await
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
    /// The peer connection failed (closed, reset, or gone silent): make a new one.
    #[error("the peer connection failed: {0}")]
    Connection(String),
    /// The peer's proxy refused this stream.
    #[error("the peer's proxy answered {0}")]
    Refused(StatusCode),
}

/// Opens a stream to `dst` in the peer connection `send` for the application connection whose
/// halves are `r` and `w`, and carries the peer's answer to `w` until its end. What `r` reads
/// goes on, in the connection's task, until its own end.
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
        send.ready().await?;
        send.send_request(request).await
    })
    .await
    .map_err(|_| OpenError::Connection("no answer in 10 s".into()))?
    .map_err(|e| OpenError::Connection(e.to_string()))?;
    if response.status() != StatusCode::OK {
        return Err(OpenError::Refused(response.status()));
    }
    let _ = write_body(response.into_body(), w).await;
    Ok(())
}

/// What the server's side does with a stream's destination port: the application connection
/// to carry it to, or the status refusing it.
pub(super) type Opened = Result<tokio::net::TcpStream, StatusCode>;

/// Serves the streams a peer opens in the connection `io` (the TLS connection from its proxy),
/// each carried to the connection `accept` makes for its destination port; returns when the
/// connection closes.
pub(super) async fn serve<IO, F, Fut>(io: IO, accept: F) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(u16) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Opened> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let accept = accept.clone();
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
                    tokio::spawn(write_body(req.into_body(), w));
                    Ok(Response::new(ReadBody::new(r)))
                }
                Err(status) => refuse(status),
            }
        }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME)
        .max_concurrent_streams(STREAMS)
        .keep_alive_interval(PING)
        .keep_alive_timeout(PING_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await
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
        let (c, s) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(s, |port| async move {
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

    /// Many connections at once in one peer connection, each with its own bytes both ways and
    /// its own end of stream; a large one crosses the flow-control windows.
    #[tokio::test]
    async fn connections_are_streams_of_one_peer_connection() {
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

    /// A refused stream carries nothing and names the status; the peer connection goes on.
    #[tokio::test]
    async fn a_refused_stream_names_the_status() {
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
    }
}
