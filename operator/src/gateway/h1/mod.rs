//! HTTP/1.x: the wire format ([`head`], [`body`]), the upstream connection
//! pool ([`pool`]), and the adapter that serves HTTP/1 client connections
//! through the request lifecycle ([`super::lifecycle`]).
//!
//! The adapter reads request heads (keep-alive, pipelining), hands each
//! request to the lifecycle as a [`Downstream`], and decides what becomes of
//! the connection afterwards. Heads are parsed in place and rewritten
//! straight into the bytes sent on; bodies are moved as they arrive. This is
//! the gateway's hot path.

#[cfg(test)]
mod against_hyper;
pub mod body;
pub mod head;
pub mod pool;

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use body::{BodyError, Decoder, Encoder, Framing};
use head::{Asked, RequestHead, Response};

use super::forwarding::{Peer, push_header};
use super::lifecycle::{self, Downstream, Kind, Origin, ProxyError};
use super::record::{Arrival, Ending, Protocol};
use super::state::Gateway;
use pool::Pool;

/// After an error response, how long unread request bytes are drained before
/// the connection closes (closing with unread bytes would reset it and could
/// destroy the response before the client reads it).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;
/// Most bytes read ahead from a client whose request is held.
const READ_AHEAD_WHILE_HELD: usize = 64 * 1024;
/// Response data up to this size is copied behind the head and written
/// with it; larger pieces are written from where they are.
const COPY_BELOW: usize = 4 * 1024;
/// What a server sends a client waiting to send its body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What happens to the client connection after one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    /// Close, after draining what the client may still be sending.
    Linger,
}

/// Serves one HTTP/1 client connection (whose first bytes, if any were
/// read while finding its protocol, are in `buf`) until it closes, the
/// client breaks framing, or `stop` turns true (after the request in
/// progress).
pub async fn serve<S: body::ClientStream>(
    gateway: &Gateway,
    pool: &Pool,
    mut client: S,
    mut buf: BytesMut,
    peer: SocketAddr,
    entry: lifecycle::Entry,
    mut stop: watch::Receiver<bool>,
) {
    let settings = &gateway.settings;
    let client_ip = peer.ip().to_string();
    let forwarding = Peer {
        ip: &client_ip,
        trusted: settings.trusts(peer.ip()),
        scheme: S::SCHEME,
    };
    let mut upstream_head = Vec::with_capacity(1024);
    let mut scratch = Vec::new();
    let mut out = Vec::with_capacity(1024);
    loop {
        // Read until a whole head is buffered: the head within the header
        // read timeout from its first byte, after at most the keep-alive
        // timeout of waiting for one.
        let mut deadline = Instant::now()
            + if buf.is_empty() {
                settings.keep_alive_timeout
            } else {
                settings.header_read_timeout
            };
        let parsed = loop {
            if !buf.is_empty() {
                let parsed = head::parse_routed_request(
                    &buf,
                    settings.max_headers,
                    &forwarding,
                    &mut upstream_head,
                    |input| {
                        let resolved = lifecycle::resolve(
                            gateway,
                            entry,
                            input.host,
                            input.path,
                            input.query,
                            input.method,
                            input.headers,
                        );
                        let record = gateway.recording.begin(
                            &Arrival {
                                method: input.method,
                                host: input.host,
                                path: input.path,
                                client: peer.ip(),
                                protocol: Protocol::Http1,
                                route: resolved.as_ref().ok().map(|r| r.route.name.as_str()),
                            },
                            input.headers,
                        );
                        (resolved, record)
                    },
                    lifecycle::routed,
                );
                let refused = match parsed {
                    Ok(Some(parsed)) => break parsed,
                    Ok(None) if buf.len() >= settings.max_header_bytes => Some(ProxyError::new(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        Origin::Client,
                        Kind::HeadTooLarge,
                        format!(
                            "request head is larger than {} bytes",
                            settings.max_header_bytes
                        ),
                    )),
                    Ok(None) => None,
                    Err(rejection) => {
                        let kind =
                            if rejection.status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
                                Kind::HeadTooLarge
                            } else if rejection.status == StatusCode::NOT_IMPLEMENTED {
                                Kind::Unsupported
                            } else {
                                Kind::Malformed
                            };
                        Some(ProxyError::new(
                            rejection.status,
                            Origin::Client,
                            kind,
                            rejection.message,
                        ))
                    }
                };
                if let Some(error) = refused {
                    lifecycle::observe_failure(gateway, &error);
                    gateway
                        .recording
                        .unreadable(peer.ip(), Protocol::Http1, &error);
                    finish(
                        &mut client,
                        &error,
                        Next::Linger,
                        &mut out,
                        settings.idle_timeout,
                    )
                    .await;
                    return;
                }
            }
            let idle = buf.is_empty();
            let read = tokio::select! {
                biased;
                read = tokio::time::timeout_at(deadline, body::fill(&mut client, &mut buf)) => read,
                _ = stop.changed(), if idle => return,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {
                    if idle {
                        deadline = Instant::now() + settings.header_read_timeout;
                    }
                }
                // Closed, failed, or too slow: nothing to answer.
                _ => return,
            }
        };
        let started = Instant::now();
        let (request, (resolved, record)) = parsed;
        buf.advance(request.len);
        let next = match resolved {
            Err(error) => {
                lifecycle::observe_failure(gateway, &error);
                record.end(&Ending::refused(&error, started.elapsed()));
                let next = before_body(&request);
                finish(&mut client, &error, next, &mut out, settings.idle_timeout).await
            }
            Ok(resolved) => {
                let mut down = Client {
                    stream: &mut client,
                    buf: &mut buf,
                    out: &mut out,
                    request: &request,
                    decoder: None,
                    encoder: Encoder::Raw,
                    head_sent: false,
                    close: false,
                    continued: false,
                    idle: settings.idle_timeout,
                    tunnel_idle: settings.tunnel_idle_timeout,
                };
                let proxied = lifecycle::Request {
                    resolved,
                    upstream_head: &mut upstream_head,
                    scratch: &mut scratch,
                    framing: request.framing,
                    idempotent: request.idempotent,
                    asked: Asked {
                        head: request.head,
                        websocket: request.upgrade,
                    },
                    expect_continue: request.expect_continue,
                    started,
                    cold_wait: None,
                    record,
                };
                match lifecycle::proxy(gateway, pool, proxied, &mut down).await {
                    Ok(_) if down.close => Next::Close,
                    Ok(_) => Next::KeepAlive,
                    Err(error) => {
                        let next = down.after_failure(&error);
                        if down.head_sent
                            || matches!(error.kind, Kind::ClientGone | Kind::ClientStalled)
                        {
                            Next::Close
                        } else {
                            finish(&mut client, &error, next, &mut out, settings.idle_timeout).await
                        }
                    }
                }
            }
        };
        match next {
            Next::KeepAlive if request.keep_alive && !*stop.borrow() => {}
            _ => return,
        }
    }
}

/// Answers `error` and says what becomes of the connection.
async fn finish<S: body::ClientStream>(
    client: &mut S,
    error: &ProxyError,
    next: Next,
    out: &mut Vec<u8>,
    idle: Duration,
) -> Next {
    out.clear();
    error.write_http1(next != Next::KeepAlive, out);
    if client.write_all_within(out, idle).await.is_err() {
        return Next::Close;
    }
    out.clear();
    if next == Next::Linger {
        linger(client).await;
    }
    next
}

/// Half-closes and reads what the client still sends, for a while.
async fn linger<S: body::ClientStream>(client: &mut S) {
    let _ = client.shutdown().await;
    let mut drained = 0;
    let mut scratch = BytesMut::new();
    let _ = tokio::time::timeout(LINGER, async {
        while drained < LINGER_BYTES {
            scratch.clear();
            match body::fill(client, &mut scratch).await {
                Ok(n) if n > 0 => drained += n,
                _ => return,
            }
        }
    })
    .await;
}

/// What a failure leaves of the connection before the request's body was
/// read: usable only if there is no body.
fn before_body(request: &RequestHead) -> Next {
    if request.framing.is_empty() {
        Next::KeepAlive
    } else {
        Next::Linger
    }
}

/// One request's client side on an HTTP/1 connection.
struct Client<'a, S> {
    stream: &'a mut S,
    buf: &'a mut BytesMut,
    out: &'a mut Vec<u8>,
    request: &'a RequestHead,
    /// The request body, once reading it began.
    decoder: Option<Decoder>,
    /// How the response body is framed for this client.
    encoder: Encoder,
    /// Bytes of the final response went out: an error can only close.
    head_sent: bool,
    /// The response is delimited by closing the connection.
    close: bool,
    continued: bool,
    idle: Duration,
    tunnel_idle: Duration,
}

impl<S: body::ClientStream> Client<'_, S> {
    /// What becomes of the connection after `error`, if nothing of the
    /// response went out yet.
    fn after_failure(&self, error: &ProxyError) -> Next {
        match error.kind {
            Kind::ClientGone | Kind::ClientStalled => return Next::Close,
            Kind::BodyTimeout | Kind::BodyMalformed | Kind::BodyTooLarge => return Next::Linger,
            _ => {}
        }
        let body_read =
            self.request.framing.is_empty() || self.decoder.as_ref().is_some_and(Decoder::done);
        if body_read {
            Next::KeepAlive
        } else {
            Next::Linger
        }
    }
}

impl<S: body::ClientStream> Downstream for Client<'_, S> {
    async fn send_continue(&mut self) {
        if self.request.expect_continue && !self.continued {
            self.continued = true;
            let _ = self.stream.write_all_within(CONTINUE, self.idle).await;
        }
    }

    async fn read_body(
        &mut self,
        limit: u64,
        encoder: Encoder,
        out: &mut Vec<u8>,
    ) -> Result<bool, BodyError> {
        let decoder = self
            .decoder
            .get_or_insert_with(|| Decoder::new(self.request.framing, limit));
        loop {
            let before = out.len();
            while let Some(n) = decoder.next(self.buf)? {
                encoder.push(&self.buf[..n], out);
                self.buf.advance(n);
            }
            if decoder.done() {
                encoder.finish(out);
                return Ok(true);
            }
            if out.len() > before {
                return Ok(false);
            }
            match body::fill_within(self.stream, self.buf, self.idle).await {
                Ok(0) => decoder.closed()?,
                Ok(_) => {}
                Err(error) if body::is_stall(&error) => return Err(BodyError::SourceStalled),
                Err(error) => return Err(BodyError::Source(error)),
            }
        }
    }

    async fn gone(&mut self) {
        // Bytes the client sends meanwhile (a pipelined request) stay in
        // `buf`; past a head's worth of them the client is taken to be there.
        while self.buf.len() < READ_AHEAD_WHILE_HELD {
            match body::fill(self.stream, self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        std::future::pending().await
    }

    fn interim(&mut self, response: &Response<'_>) {
        if self.request.http10 {
            return;
        }
        response.write_head(self.out);
        self.out.extend_from_slice(b"\r\n");
    }

    fn head(&mut self, response: &Response<'_>) {
        let head = response.head;
        response.write_head(self.out);
        let http10 = self.request.http10;
        match head.framing {
            Framing::Empty => {
                if let Some(n) = head.content_length {
                    self.out.extend_from_slice(b"content-length: ");
                    head::push_decimal(n, self.out);
                    self.out.extend_from_slice(b"\r\n");
                }
            }
            Framing::Length(n) => {
                self.out.extend_from_slice(b"content-length: ");
                head::push_decimal(n, self.out);
                self.out.extend_from_slice(b"\r\n");
            }
            // Re-framed in chunks for HTTP/1.1, so the connection can stay.
            Framing::Chunked | Framing::UntilClose if !http10 => {
                self.out
                    .extend_from_slice(b"transfer-encoding: chunked\r\n");
                self.encoder = Encoder::Chunked;
            }
            Framing::Chunked | Framing::UntilClose => self.close = true,
        }
        if head.websocket {
            // The connection is the tunnel's from now on.
            self.close = true;
            push_header(self.out, b"connection", b"upgrade");
            push_header(self.out, b"upgrade", b"websocket");
        } else if self.close || !self.request.keep_alive {
            self.close = true;
            self.out.extend_from_slice(b"connection: close\r\n");
        } else if http10 {
            self.out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
    }

    fn push(&mut self, data: &[u8]) {
        self.encoder.push(data, self.out);
    }

    async fn flush(&mut self, last: bool) -> Result<(), ProxyError> {
        self.send(&[], last).await
    }

    async fn send(&mut self, data: &[u8], last: bool) -> Result<(), ProxyError> {
        let written = if self.encoder == Encoder::Raw && data.len() > COPY_BELOW {
            // A large piece goes out as it is, after what is buffered: one
            // vectored write, no copy.
            self.stream
                .write_two_within(self.out, data, self.idle)
                .await
        } else if self.encoder == Encoder::Raw {
            // A small one is cheaper to copy than to write from two places.
            self.out.extend_from_slice(data);
            if self.out.is_empty() {
                return Ok(());
            }
            self.stream.write_all_within(self.out, self.idle).await
        } else {
            self.encoder.push(data, self.out);
            if last {
                self.encoder.finish(self.out);
            }
            if self.out.is_empty() {
                return Ok(());
            }
            self.stream.write_all_within(self.out, self.idle).await
        };
        self.head_sent = true;
        self.out.clear();
        if self.out.capacity() > 256 * 1024 {
            self.out.shrink_to(64 * 1024);
        }
        written.map_err(|error| {
            if body::is_stall(&error) {
                ProxyError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    Origin::Client,
                    Kind::ClientStalled,
                    format!("the client took nothing for {:?}", self.idle),
                )
            } else {
                ProxyError::new(
                    lifecycle::CLIENT_CLOSED_REQUEST,
                    Origin::Client,
                    Kind::ClientGone,
                    format!("writing the response: {error}"),
                )
            }
        })
    }

    async fn tunnel(&mut self, upstream: &mut TcpStream, early: &[u8]) {
        let idle = self.tunnel_idle;
        let started = async {
            self.stream.write_all_within(early, idle).await?;
            body::write_within(upstream, self.buf, idle).await?;
            self.buf.clear();
            Ok::<_, std::io::Error>(())
        };
        if started.await.is_ok() {
            lifecycle::splice(self.stream, upstream, idle).await;
        }
    }
}
