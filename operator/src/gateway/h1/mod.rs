//! HTTP/1.x clients, proxied to HTTP/1.1 upstreams byte for byte: heads are
//! parsed in place and rewritten straight into the bytes sent on, bodies are
//! moved as they arrive, and upstream connections are kept per thread. This
//! is the gateway's hot path; HTTP/2 clients go through hyper
//! ([`super::proxy::Gateway::handle`]).

pub mod body;
pub mod head;
pub mod pool;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use body::{BodyError, BodyReader, Framing};
use head::{RequestHead, ResponseHead};
use pool::{Pool, Upstream};

use super::balance::InFlight;
use super::proxy::{Failure, Gateway, Origin, Resolved, Serving};
use super::table::WorkloadTarget;

/// The first bytes an HTTP/2 client with prior knowledge sends.
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a client connection may wait for its next request.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(75);
/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// After an error response, how long unread request bytes are drained before
/// the connection closes (closing with unread bytes would reset it and could
/// destroy the response before the client reads it).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// Limits of client connections.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Time for a whole request head, from its first byte.
    pub header_read_timeout: Duration,
}

/// How a connection ended.
pub enum Ended {
    /// Closed.
    Closed,
    /// The client speaks HTTP/2: the connection and the bytes read so far.
    Http2(TcpStream, Bytes),
}

/// What happens to the client connection after one exchange.
#[derive(Debug, Clone, Copy)]
enum Next {
    KeepAlive,
    Close,
    /// Close, after draining what the client may still be sending.
    Linger,
}

/// Serves one client connection until it closes, the client or upstream
/// breaks framing, or `stop` turns true (after the request in progress).
pub async fn serve(
    gateway: &Gateway,
    pool: &Pool,
    limits: &Limits,
    mut client: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let client_ip = peer.ip().to_string();
    let mut upstream_head = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        // Read until a whole head is buffered: the head within the header
        // read timeout from its first byte, after at most KEEP_ALIVE_IDLE
        // of waiting for one.
        let mut deadline = tokio::time::Instant::now()
            + if buf.is_empty() {
                KEEP_ALIVE_IDLE
            } else {
                limits.header_read_timeout
            };
        let parsed = loop {
            if first && !buf.is_empty() && maybe_http2(&buf) {
                if buf.len() >= HTTP2_PREFACE.len() {
                    return Ended::Http2(client, buf.freeze());
                }
            } else if !buf.is_empty() {
                let parsed = head::parse_request(
                    &buf,
                    limits.max_headers,
                    &client_ip,
                    &mut upstream_head,
                    |input| gateway.resolve(input.host, input.path, input.method, input.headers),
                );
                match parsed {
                    Ok(Some(parsed)) => break parsed,
                    Ok(None) => {}
                    Err(rejection) => {
                        let failure =
                            Failure::new(rejection.status, Origin::Client, rejection.message);
                        finish(&mut client, &failure, Next::Linger, &mut out).await;
                        return Ended::Closed;
                    }
                }
                if buf.len() >= limits.max_header_bytes {
                    let failure = Failure::new(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        Origin::Client,
                        format!(
                            "request head is larger than {} bytes",
                            limits.max_header_bytes
                        ),
                    );
                    finish(&mut client, &failure, Next::Linger, &mut out).await;
                    return Ended::Closed;
                }
            }
            let idle = buf.is_empty();
            let read = tokio::select! {
                biased;
                read = tokio::time::timeout_at(deadline, body::fill(&mut client, &mut buf)) => read,
                _ = stop.changed(), if idle => return Ended::Closed,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {
                    if idle {
                        deadline = tokio::time::Instant::now() + limits.header_read_timeout;
                    }
                }
                // Closed, failed, or too slow: nothing to answer.
                _ => return Ended::Closed,
            }
        };
        first = false;
        let started = Instant::now();
        let (request, resolved) = parsed;
        buf.advance(request.len);
        let next = match resolved {
            Err(failure) => finish(&mut client, &failure, before_body(&request), &mut out).await,
            Ok(resolved) => {
                let mut exchange = Exchange {
                    gateway,
                    pool,
                    client: &mut client,
                    buf: &mut buf,
                    request: &request,
                    upstream_head: &mut upstream_head,
                    out: &mut out,
                };
                match exchange.run(&resolved, started).await {
                    Ok((status, next)) => {
                        resolved.observe(status, started);
                        next
                    }
                    Err((failure, next)) => {
                        resolved.observe(failure.status, started);
                        finish(&mut client, &failure, next, &mut out).await
                    }
                }
            }
        };
        match next {
            Next::KeepAlive if request.keep_alive && !*stop.borrow() => {}
            _ => return Ended::Closed,
        }
    }
}

/// Whether `buf` starts like the HTTP/2 preface.
fn maybe_http2(buf: &[u8]) -> bool {
    let n = buf.len().min(HTTP2_PREFACE.len());
    buf[..n] == HTTP2_PREFACE[..n]
}

/// Answers `failure` and says what becomes of the connection.
async fn finish(client: &mut TcpStream, failure: &Failure, next: Next, out: &mut Vec<u8>) -> Next {
    out.clear();
    failure.write_http1(!matches!(next, Next::KeepAlive), out);
    if client.write_all(out).await.is_err() {
        return Next::Close;
    }
    if let Next::Linger = next {
        linger(client).await;
    }
    next
}

/// Half-closes and reads what the client still sends, for a while.
async fn linger(client: &mut TcpStream) {
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

/// A failure, and what it leaves of the client connection.
type Failed = (Failure, Next);

/// One request on its way to an upstream and back.
struct Exchange<'a> {
    gateway: &'a Gateway,
    pool: &'a Pool,
    client: &'a mut TcpStream,
    buf: &'a mut BytesMut,
    request: &'a RequestHead,
    upstream_head: &'a mut Vec<u8>,
    out: &'a mut Vec<u8>,
}

/// Where a request's body comes from when it is sent.
enum Payload {
    /// Read from the client while sending (never sent twice).
    Streamed,
    /// Held in memory (may be sent again).
    Buffered(Bytes),
}

/// How one attempt on an upstream connection failed.
enum AttemptError {
    /// The connection failed before any response byte: the endpoint may not
    /// have seen the request.
    BeforeResponse(std::io::Error),
    /// Anything else, already decided.
    Failed(Failed),
}

/// An upstream's answer: its head parsed (still in the connection's buffer,
/// the client's version in `out`), the body still to come.
struct Answer {
    upstream: Upstream,
    endpoint: SocketAddr,
    response: ResponseHead,
    /// The endpoint's and the workload's load, until the body is through.
    _load: (InFlight, Serving),
}

impl Exchange<'_> {
    /// Forwards the request and relays the response. `Ok`: the status sent.
    async fn run(
        &mut self,
        resolved: &Resolved,
        started: Instant,
    ) -> Result<(StatusCode, Next), Failed> {
        let request = self.request;
        let mut after_failure = before_body(request);
        let declared = match request.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        self.gateway
            .admit(resolved, declared)
            .map_err(|f| (f, after_failure))?;
        let deadline = started + resolved.target.request_timeout;
        let (target, payload) = if resolved.target.endpoints.is_empty() {
            let gateway = self.gateway;
            let limit = gateway.max_held_body_bytes as u64;
            let (client, buf) = (&mut *self.client, &mut *self.buf);
            let target = &resolved.target;
            let collect = async move {
                if request.expect_continue {
                    let _ = client.write_all(CONTINUE).await;
                }
                let mut reader = BodyReader::new(request.framing, true, limit);
                let bytes = body::collect(&mut reader, client, buf)
                    .await
                    .map_err(|error| match error {
                        BodyError::TooLarge => gateway.held_body_too_large(target),
                        other => client_body_failure(other),
                    })?;
                Ok((Bytes::from(bytes), gone(client, buf)))
            };
            let (target, bytes) = gateway
                .hold(resolved, declared, deadline, collect)
                .await
                .map_err(|f| (f, after_failure))?;
            after_failure = Next::KeepAlive;
            (target, Payload::Buffered(bytes))
        } else {
            (resolved.target.clone(), Payload::Streamed)
        };
        let framing = match &payload {
            Payload::Buffered(bytes) if bytes.is_empty() && request.framing == Framing::Empty => {
                Framing::Empty
            }
            Payload::Buffered(bytes) => Framing::Length(bytes.len() as u64),
            Payload::Streamed => request.framing,
        };
        head::finish_request_head(self.upstream_head, framing);

        let answer = tokio::time::timeout_at(
            deadline.into(),
            self.attempts(resolved, &target, &payload, after_failure),
        )
        .await
        .map_err(|_| {
            let failure = Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                Origin::Upstream,
                format!(
                    "{} did not answer within {:?}",
                    target.key, target.request_timeout
                ),
            );
            (failure, Next::Linger)
        })??;
        let status =
            StatusCode::from_u16(answer.response.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let next = if answer.response.status == 101 {
            self.upgrade(answer).await
        } else {
            self.relay_response(answer).await
        };
        Ok((status, next))
    }

    /// Tries endpoints until one answers: another endpoint when a connection
    /// cannot be made, and a fresh connection when a kept one turns out to be
    /// closed, if the request may be sent again.
    async fn attempts(
        &mut self,
        resolved: &Resolved,
        target: &WorkloadTarget,
        payload: &Payload,
        after_failure: Next,
    ) -> Result<Answer, Failed> {
        let replayable = matches!(payload, Payload::Buffered(_)) || self.request.framing.is_empty();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut fresh_only = false;
        loop {
            let Some((endpoint, in_flight)) =
                self.gateway.loads.pick_untried(&target.endpoints, &tried)
            else {
                let failure = Failure::new(
                    StatusCode::BAD_GATEWAY,
                    Origin::Upstream,
                    format!("no endpoint of {} accepted a connection", target.key),
                );
                return Err((failure, after_failure));
            };
            tried.push(endpoint);
            let kept = if fresh_only {
                None
            } else {
                self.pool.checkout(endpoint)
            };
            let reused = kept.is_some();
            let upstream = match kept {
                Some(upstream) => upstream,
                None => match pool::connect(endpoint, self.gateway.connect_timeout).await {
                    Ok(upstream) => upstream,
                    Err(error) => {
                        tracing::debug!(%endpoint, %error, "connect failed; trying another endpoint");
                        continue;
                    }
                },
            };
            let serving = Serving::start(&resolved.load);
            match self.attempt(upstream, endpoint, payload).await {
                Ok((upstream, response)) => {
                    return Ok(Answer {
                        upstream,
                        endpoint,
                        response,
                        _load: (in_flight, serving),
                    });
                }
                Err(AttemptError::BeforeResponse(error))
                    if reused && replayable && self.request.idempotent =>
                {
                    tracing::debug!(%endpoint, %error, "kept connection was closed; sending again on a new one");
                    fresh_only = true;
                    tried.pop();
                }
                Err(AttemptError::BeforeResponse(error)) => {
                    let failure = Failure::new(
                        StatusCode::BAD_GATEWAY,
                        Origin::Upstream,
                        format!("{endpoint}: connection closed before a response ({error})"),
                    );
                    return Err((failure, Next::Linger));
                }
                Err(AttemptError::Failed(failed)) => return Err(failed),
            }
        }
    }

    /// Sends the request on `upstream` and reads the response head.
    async fn attempt(
        &mut self,
        mut upstream: Upstream,
        endpoint: SocketAddr,
        payload: &Payload,
    ) -> Result<(Upstream, ResponseHead), AttemptError> {
        let request = self.request;
        let before = AttemptError::BeforeResponse;
        match payload {
            Payload::Buffered(bytes) => {
                self.out.clear();
                self.out.extend_from_slice(self.upstream_head);
                self.out.extend_from_slice(bytes);
                upstream.stream.write_all(self.out).await.map_err(before)?;
            }
            Payload::Streamed => {
                if request.expect_continue {
                    let _ = self.client.write_all(CONTINUE).await;
                }
                let limit = self.gateway.max_body_bytes as u64;
                let mut reader = BodyReader::new(request.framing, false, limit);
                self.out.clear();
                self.out.extend_from_slice(self.upstream_head);
                let sent = body::relay(
                    &mut reader,
                    self.client,
                    self.buf,
                    &mut upstream.stream,
                    self.out,
                )
                .await;
                match sent {
                    Ok(()) => {}
                    Err(BodyError::Sink(error)) => return Err(before(error)),
                    Err(BodyError::TooLarge) => {
                        let failure = self.gateway.body_too_large();
                        return Err(AttemptError::Failed((failure, Next::Linger)));
                    }
                    Err(other) => {
                        let failure = client_body_failure(other);
                        return Err(AttemptError::Failed((failure, Next::Close)));
                    }
                }
            }
        }

        // The response head, after any informational responses.
        loop {
            let parsed =
                head::parse_response(&upstream.buf, request.head, request.http10, self.out);
            let response = match parsed {
                Ok(Some(response)) => response,
                Ok(None) if upstream.buf.len() < MAX_RESPONSE_HEAD => {
                    match body::fill(&mut upstream.stream, &mut upstream.buf).await {
                        Ok(n) if n > 0 => continue,
                        Ok(_) if upstream.buf.is_empty() => {
                            return Err(before(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                        Err(error) if upstream.buf.is_empty() => return Err(before(error)),
                        _ => return Err(bad_upstream(endpoint, "response head broke off")),
                    }
                }
                Ok(None) => return Err(bad_upstream(endpoint, "response head too large")),
                Err(message) => return Err(bad_upstream(endpoint, message)),
            };
            match response.status {
                101 if request.upgrade => return Ok((upstream, response)),
                101 => return Err(bad_upstream(endpoint, "switched protocols unasked")),
                100..=199 => {
                    // 100 Continue, 103 Early Hints: passed on to HTTP/1.1 clients.
                    if !request.http10 {
                        let _ = self.client.write_all(&upstream.buf[..response.len]).await;
                    }
                    upstream.buf.advance(response.len);
                }
                _ => return Ok((upstream, response)),
            }
        }
    }

    /// Sends the response head (in `out`) and body to the client; keeps the
    /// upstream connection if the exchange ended cleanly.
    async fn relay_response(&mut self, answer: Answer) -> Next {
        let Answer {
            mut upstream,
            endpoint,
            response,
            _load,
        } = answer;
        let request = self.request;
        let close = !request.keep_alive
            || response.framing == Framing::UntilClose
            || (request.http10 && response.framing == Framing::Chunked);
        head::finish_response_head(self.out, close, request.http10 && !close);
        upstream.buf.advance(response.len);
        let decode = request.http10 && response.framing == Framing::Chunked;
        let mut reader = BodyReader::new(response.framing, decode, u64::MAX);
        let relayed = body::relay(
            &mut reader,
            &mut upstream.stream,
            &mut upstream.buf,
            self.client,
            self.out,
        )
        .await;
        match relayed {
            Ok(()) => {
                if response.keep_alive && upstream.buf.is_empty() {
                    self.pool.checkin(endpoint, upstream);
                }
                if close { Next::Close } else { Next::KeepAlive }
            }
            // The head is out: all that is left is to close the connection.
            Err(error) => {
                tracing::debug!(%endpoint, ?error, "response body broke off");
                Next::Close
            }
        }
    }

    /// Passes a `101 Switching Protocols` on, then bytes both ways until
    /// either side closes.
    async fn upgrade(&mut self, answer: Answer) -> Next {
        let Answer {
            mut upstream,
            _load,
            ..
        } = answer;
        let copied = async {
            self.client.write_all(&upstream.buf).await?;
            upstream.stream.write_all(self.buf).await?;
            self.buf.clear();
            tokio::io::copy_bidirectional(self.client, &mut upstream.stream).await
        };
        if let Err(error) = copied.await {
            tracing::debug!(%error, "upgraded connection ended");
        }
        Next::Close
    }
}

/// Ends when the client closes its connection (or it fails). Bytes it sends
/// meanwhile (a pipelined request) are kept in `buf`; past a head's worth of
/// them the client is taken to be there.
async fn gone(client: &mut TcpStream, buf: &mut BytesMut) {
    while buf.len() < READ_AHEAD_WHILE_HELD {
        match body::fill(client, buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending().await
}

/// Most bytes read ahead from a client whose request is held.
const READ_AHEAD_WHILE_HELD: usize = 64 * 1024;

/// What a server sends a client waiting to send its body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What a failure leaves of the connection before the request's body was
/// read: usable only if there is no body.
fn before_body(request: &RequestHead) -> Next {
    if request.framing.is_empty() {
        Next::KeepAlive
    } else {
        Next::Linger
    }
}

/// A bad body from the client.
fn client_body_failure(error: BodyError) -> Failure {
    let message = match error {
        BodyError::Malformed(what) => format!("request body: {what}"),
        BodyError::Source(error) => format!("request body: {error}"),
        other => format!("request body: {other:?}"),
    };
    Failure::new(StatusCode::BAD_REQUEST, Origin::Client, message)
}

fn bad_upstream(endpoint: SocketAddr, message: &str) -> AttemptError {
    let failure = Failure::new(
        StatusCode::BAD_GATEWAY,
        Origin::Upstream,
        format!("{endpoint}: {message}"),
    );
    AttemptError::Failed((failure, Next::Close))
}
