//! HTTP/2 clients (cleartext, prior knowledge): hyper's HTTP/2 server
//! frames the connection, and every request goes through the same
//! lifecycle as HTTP/1 ([`super::lifecycle`]), to upstreams over the same
//! HTTP/1.1 engine and pool.
//!
//! Limits are set explicitly: concurrent streams, header list size, reset
//! floods (hyper's counters), a keep-alive ping that must be answered in
//! time, and an idle timeout for a connection without streams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Duration, Instant};

use super::forwarding::{self, Peer, RequestLine};
use super::h1::body::{BodyError, Encoder, Framing};
use super::h1::head::{self, Asked, Response};
use super::h1::pool::Pool;
use super::lifecycle::{self, Downstream, Kind, Origin, ProxyError};
use super::record::{Arrival, Ending, Protocol};
use super::state::Gateway;

/// How often an idle HTTP/2 connection is pinged, and how long the answer
/// may take.
const PING_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a client may open and reset at once before the connection is
/// closed (the "rapid reset" flood).
const MAX_PENDING_RESETS: usize = 20;
/// Response body pieces queued for hyper per stream.
const BODY_QUEUE: usize = 4;

/// Body of a response to an HTTP/2 client.
pub enum ResponseBody {
    /// All of it at once (errors, bodiless responses).
    Full(Option<Bytes>),
    /// Relayed as it arrives; an error resets the stream.
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|next| next.map(|piece| piece.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(None))
    }
}

fn error_response(error: &ProxyError) -> http::Response<ResponseBody> {
    let mut response = http::Response::builder()
        .status(error.status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8");
    response = match &error.location {
        Some(location) => match HeaderValue::from_str(location) {
            Ok(location) => response.header(http::header::LOCATION, location),
            Err(_) => response.status(http::StatusCode::INTERNAL_SERVER_ERROR),
        },
        None => response.header("x-tandem-error", error.origin.as_str()),
    };
    if let Some(seconds) = error.retry_after {
        response = response.header(http::header::RETRY_AFTER, seconds);
    }
    response
        .body(ResponseBody::Full(Some(Bytes::from(format!(
            "{}\n",
            error.message
        )))))
        .expect("valid response")
}

/// A connection whose first bytes were already read: they are read again
/// first.
pub struct Rewind {
    read: Bytes,
    stream: TcpStream,
}

impl Rewind {
    /// `stream`, with `read` in front of what it delivers.
    pub fn new(read: Bytes, stream: TcpStream) -> Self {
        Self { read, stream }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Streams open on one connection, and when the last one ended.
struct Activity {
    open: AtomicUsize,
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_since(&self) -> Option<Instant> {
        (self.open.load(Ordering::Relaxed) == 0)
            .then(|| self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

struct Stream<'a>(&'a Activity);

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Serves one HTTP/2 connection until the client closes it, it is idle for
/// the keep-alive timeout, or `stop` turns true (then in-flight streams
/// finish first).
pub async fn serve(
    gateway: Arc<Gateway>,
    pool: Arc<Pool>,
    io: Rewind,
    peer: SocketAddr,
    entry: lifecycle::Entry,
    mut stop: watch::Receiver<bool>,
) {
    let settings = &gateway.settings;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .keep_alive_interval(PING_EVERY)
        .keep_alive_timeout(PING_TIMEOUT);
    let activity = Arc::new(Activity {
        open: AtomicUsize::new(0),
        base: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let service = {
        let (gateway, pool, activity) = (gateway.clone(), pool.clone(), activity.clone());
        hyper::service::service_fn(move |request| {
            let (gateway, pool, activity) = (gateway.clone(), pool.clone(), activity.clone());
            async move {
                activity.open.fetch_add(1, Ordering::Relaxed);
                let _stream = Stream(&activity);
                Ok::<_, Infallible>(handle(gateway, pool, request, peer, entry).await)
            }
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let idle = settings.keep_alive_timeout;
    let mut closing = false;
    loop {
        let idle_check = async {
            loop {
                match activity.idle_since() {
                    Some(since) if Instant::now() >= since + idle => return,
                    Some(since) => tokio::time::sleep_until(since + idle).await,
                    None => tokio::time::sleep(idle).await,
                }
            }
        };
        tokio::select! {
            _ = connection.as_mut() => return,
            () = idle_check, if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = stop.wait_for(|s| *s), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// One request from an HTTP/2 client: checked and resolved here, then
/// proxied by a task of its own, which hands back the response head and
/// relays the body through a bounded queue.
async fn handle(
    gateway: Arc<Gateway>,
    pool: Arc<Pool>,
    request: http::Request<Incoming>,
    peer: SocketAddr,
    entry: lifecycle::Entry,
) -> http::Response<ResponseBody> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let arrival = Arrival {
        method: parts.method.as_str(),
        host: parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok()),
        path: parts.uri.path(),
        client: peer.ip(),
        protocol: Protocol::Http2,
        route: None,
    };
    let refused = |error: ProxyError| {
        lifecycle::observe_failure(&gateway, &error);
        let record = gateway.recording.begin(&arrival, &parts.headers);
        record.end(&Ending::refused(&error, started.elapsed()));
        error_response(&error)
    };
    let refuse = |status, kind, message: &'static str| {
        refused(ProxyError::new(status, Origin::Client, kind, message))
    };
    if parts.method == http::Method::CONNECT {
        return refuse(
            http::StatusCode::NOT_IMPLEMENTED,
            Kind::Unsupported,
            "CONNECT is not supported",
        );
    }
    let host = match parts.uri.authority() {
        Some(authority) => Some(authority.as_str()),
        None => match parts.headers.get(http::header::HOST).map(|h| h.to_str()) {
            Some(Ok(host)) => Some(host),
            // Not text is not a host: refused just below.
            Some(Err(_)) => Some("\u{0}"),
            None => None,
        },
    };
    if host.is_some_and(|h| !head::valid_authority(h)) {
        return refuse(
            http::StatusCode::BAD_REQUEST,
            Kind::Malformed,
            "invalid :authority or Host",
        );
    }
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if !target.starts_with('/') || !head::valid_path_and_query(target) {
        return refuse(
            http::StatusCode::BAD_REQUEST,
            Kind::Malformed,
            "invalid character in the request target",
        );
    }
    let framing = match parts.headers.get(http::header::CONTENT_LENGTH) {
        Some(value) => match head::parse_length(value.as_bytes()) {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => {
                return refuse(
                    http::StatusCode::BAD_REQUEST,
                    Kind::Malformed,
                    "invalid Content-Length",
                );
            }
        },
        None if hyper::body::Body::is_end_stream(&body) => Framing::Empty,
        None => Framing::Chunked,
    };
    let resolved = match lifecycle::resolve(
        &gateway,
        entry,
        host,
        parts.uri.path(),
        parts.uri.query(),
        parts.method.as_str(),
        &parts.headers,
    ) {
        Ok(resolved) => resolved,
        Err(error) => return refused(error),
    };
    let record = gateway.recording.begin(
        &Arrival {
            route: Some(&resolved.route.name),
            ..arrival
        },
        &parts.headers,
    );
    let client_ip = peer.ip().to_string();
    let forwarding = Peer {
        ip: &client_ip,
        trusted: gateway.settings.trusts(peer.ip()),
        scheme: "http",
    };
    let mut upstream_head = Vec::with_capacity(1024);
    // HTTP/2 may split cookies into several fields; HTTP/1.1 wants one
    // (RFC 9113, section 8.2.3).
    let headers = join_cookies(&parts.headers);
    let route = &resolved.route;
    let filters = route.filters.as_deref();
    let rewrite = filters.and_then(|f| f.rewrite.as_ref());
    let rewritten = rewrite.and_then(|r| r.target(&route.path, target));
    let host = rewrite.and_then(|r| r.hostname.as_deref()).or(host);
    forwarding::write_request_head(
        &mut upstream_head,
        &RequestLine {
            method: parts.method.as_str(),
            target: rewritten.as_deref().unwrap_or(target),
            host: host.map(str::as_bytes),
            connection_named: &[],
            websocket: false,
            edits: filters.map(|f| &f.request),
            traceparent: record.traceparent(),
        },
        headers.as_ref().unwrap_or(&parts.headers),
        &forwarding,
    );
    let idempotent = matches!(
        parts.method.as_str(),
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    );
    let asked = Asked {
        head: parts.method == http::Method::HEAD,
        websocket: false,
    };

    let (head_tx, head_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut down = Client {
            body: Some(body),
            head_tx: Some(head_tx),
            data_tx: None,
            pending: BytesMut::new(),
            seen: 0,
            idle: gateway.settings.idle_timeout,
        };
        let mut scratch = Vec::new();
        let request = lifecycle::Request {
            resolved,
            upstream_head: &mut upstream_head,
            scratch: &mut scratch,
            framing,
            idempotent,
            asked,
            expect_continue: false,
            started,
            cold_wait: None,
            record,
        };
        if let Err(error) = lifecycle::proxy(&gateway, &pool, request, &mut down).await {
            match down.head_tx.take() {
                Some(tx) => {
                    let _ = tx.send(error_response(&error));
                }
                // The head went out: reset the stream rather than end it as
                // if the body were complete.
                None => {
                    if let Some(tx) = down.data_tx.take() {
                        let _ = tx.try_send(Err(std::io::Error::other(error.message)));
                    }
                }
            }
        }
    });
    match head_rx.await {
        Ok(response) => response,
        Err(_) => error_response(&ProxyError::new(
            http::StatusCode::BAD_GATEWAY,
            Origin::Gateway,
            Kind::BadResponse,
            "the request ended without a response",
        )),
    }
}

/// The headers with their `cookie` fields joined into one, if there were
/// several.
fn join_cookies(headers: &http::HeaderMap) -> Option<http::HeaderMap> {
    let cookies = headers.get_all(http::header::COOKIE);
    if cookies.iter().count() < 2 {
        return None;
    }
    let joined: Vec<u8> = cookies
        .iter()
        .map(|c| c.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    let mut copy = headers.clone();
    copy.remove(http::header::COOKIE);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        copy.insert(http::header::COOKIE, value);
    }
    Some(copy)
}

/// One request's client side on an HTTP/2 stream.
struct Client {
    body: Option<Incoming>,
    head_tx: Option<oneshot::Sender<http::Response<ResponseBody>>>,
    data_tx: Option<mpsc::Sender<Result<Bytes, std::io::Error>>>,
    pending: BytesMut,
    seen: u64,
    idle: Duration,
}

impl Downstream for Client {
    async fn send_continue(&mut self) {
        // hyper answers `Expect: 100-continue` when the body is first read.
    }

    async fn read_body(
        &mut self,
        limit: u64,
        encoder: Encoder,
        out: &mut Vec<u8>,
    ) -> Result<bool, BodyError> {
        use http_body_util::BodyExt;
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(true);
            };
            let frame = match tokio::time::timeout(self.idle, body.frame()).await {
                Err(_) => return Err(BodyError::SourceStalled),
                Ok(None) => {
                    self.body = None;
                    encoder.finish(out);
                    return Ok(true);
                }
                Ok(Some(Err(error))) => {
                    return Err(BodyError::Source(std::io::Error::other(error)));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            // Trailers are not passed on.
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                self.seen += data.len() as u64;
                if self.seen > limit {
                    return Err(BodyError::TooLarge);
                }
                encoder.push(&data, out);
                return Ok(false);
            }
        }
    }

    async fn gone(&mut self) {
        match self.head_tx.as_mut() {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
    }

    fn interim(&mut self, _response: &Response<'_>) {
        // Informational responses are not relayed to HTTP/2 clients.
    }

    fn head(&mut self, response: &Response<'_>) {
        let head = response.head;
        let mut headers = http::HeaderMap::new();
        response.each_header(|name, value| {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        });
        let length = match head.framing {
            Framing::Length(n) => Some(n),
            Framing::Empty => head.content_length,
            _ => None,
        };
        if let Some(n) = length {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let body = if head.framing == Framing::Empty {
            ResponseBody::Full(None)
        } else {
            let (tx, rx) = mpsc::channel(BODY_QUEUE);
            self.data_tx = Some(tx);
            ResponseBody::Stream(rx)
        };
        let mut built = http::Response::new(body);
        *built.status_mut() =
            http::StatusCode::from_u16(head.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        *built.headers_mut() = headers;
        if let Some(tx) = self.head_tx.take() {
            let _ = tx.send(built);
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    async fn flush(&mut self, last: bool) -> Result<(), ProxyError> {
        if !self.pending.is_empty()
            && let Some(tx) = &self.data_tx
        {
            let piece = self.pending.split().freeze();
            match tx.send_timeout(Ok(piece), self.idle).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    return Err(ProxyError::new(
                        http::StatusCode::GATEWAY_TIMEOUT,
                        Origin::Client,
                        Kind::ClientStalled,
                        format!("the client took nothing for {:?}", self.idle),
                    ));
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                    return Err(ProxyError::new(
                        lifecycle::CLIENT_CLOSED_REQUEST,
                        Origin::Client,
                        Kind::ClientGone,
                        "the client reset the stream",
                    ));
                }
            }
        }
        if last {
            self.data_tx = None;
        }
        Ok(())
    }

    async fn tunnel(&mut self, _upstream: &mut TcpStream, _early: &[u8]) {
        // No upgrade is ever asked for over HTTP/2.
    }
}
