//! One request's way through the gateway, whatever the client's protocol:
//! **resolve** (route, weighted pick of a workload) → **admit** (declared
//! size, counted for the autoscaler) → **hold** (a Function with no ready
//! endpoint: bounded queue, demand signal, capped body, wait) → **pick** (an
//! endpoint by load) → **attempt** (send the request on a kept or new
//! upstream connection, read the response head) → **relay** (the body,
//! re-framed) → **observe** (metrics).
//!
//! The protocol adapters ([`super::h1`] for HTTP/1 clients, [`super::h2`]
//! for HTTP/2) parse the client's request, call [`resolve`], and hand the
//! rest to [`proxy`] through the [`Downstream`] trait: how to read the
//! request body from the client and how to write the response to it.
//! Upstreams always get HTTP/1.1 from the gateway's own engine and pool.
//!
//! Every wait here has a deadline: the workload's `requestTimeout` from the
//! request's arrival to the response head (cold start included), the
//! response-head timeout from the moment the request was sent, the connect
//! timeout, and the idle timeout on every body read and write in both
//! directions. Every failure is a [`ProxyError`] that knows its origin,
//! whether a retry is safe, its status and its metric label.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Buf;
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};
use tracing::Instrument as _;

use super::balance::{InFlight, pick_weighted};
use super::forwarding::push_header;
use super::h1::body::{self, BodyError, Decoder, Encoder, Framing};
use super::h1::head::{self, Asked, Response, finish_request_head};
use super::h1::pool::{self, Pool, Upstream};
use super::record::{Ending, Record};
use super::state::{Gateway, WorkloadLoad};
use super::table::{CompiledRoute, HeaderLookup, WorkloadKey, WorkloadTarget};

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something we cannot serve, or left.
    Client,
    /// The upstream endpoint failed or was too slow.
    Upstream,
    /// The gateway cannot serve it now (no route, no capacity).
    Gateway,
}

impl Origin {
    /// As in the `x-tandem-error` header and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Upstream => "upstream",
            Origin::Gateway => "gateway",
        }
    }
}

/// What went wrong, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request head that cannot be read one way only.
    Malformed,
    /// A request head over the size or count limit.
    HeadTooLarge,
    /// No route matches.
    NoRoute,
    /// The route has no backend to send to.
    NoBackend,
    /// A request body over the limit.
    BodyTooLarge,
    /// A request body with broken framing.
    BodyMalformed,
    /// The client stopped sending its body.
    BodyTimeout,
    /// The client left (or stopped reading) before its answer.
    ClientGone,
    /// The client stopped taking the response.
    ClientStalled,
    /// The queue of held requests is full.
    QueueFull,
    /// An always-on workload without a ready endpoint.
    NotReady,
    /// A held request's workload did not start in time.
    StartTimeout,
    /// No endpoint accepted a connection.
    ConnectFailed,
    /// The upstream closed the connection before or while answering.
    UpstreamClosed,
    /// The upstream's response cannot be passed on.
    BadResponse,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream stopped sending its response body.
    UpstreamStalled,
    /// The gateway has as many connections as it takes.
    Overloaded,
    /// A feature the gateway does not offer.
    Unsupported,
    /// Not an error: the route answers with a redirect.
    Redirect,
}

impl Kind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Malformed => "malformed",
            Kind::HeadTooLarge => "head_too_large",
            Kind::NoRoute => "no_route",
            Kind::NoBackend => "no_backend",
            Kind::BodyTooLarge => "body_too_large",
            Kind::BodyMalformed => "body_malformed",
            Kind::BodyTimeout => "body_timeout",
            Kind::ClientGone => "client_gone",
            Kind::ClientStalled => "client_stalled",
            Kind::QueueFull => "queue_full",
            Kind::NotReady => "not_ready",
            Kind::StartTimeout => "start_timeout",
            Kind::ConnectFailed => "connect_failed",
            Kind::UpstreamClosed => "upstream_closed",
            Kind::BadResponse => "bad_response",
            Kind::UpstreamTimeout => "upstream_timeout",
            Kind::UpstreamStalled => "upstream_stalled",
            Kind::Overloaded => "overloaded",
            Kind::Unsupported => "unsupported",
            Kind::Redirect => "redirect",
        }
    }
}

/// Why a request gets an error response (or none, once its response has
/// begun), where the error came from, and whether sending the request
/// again would be safe.
#[derive(Debug)]
pub struct ProxyError {
    /// The status answered (when nothing of the response was sent yet).
    pub status: StatusCode,
    /// Client, upstream or gateway.
    pub origin: Origin,
    /// What went wrong.
    pub kind: Kind,
    /// The request never reached an upstream, or is idempotent with a body
    /// that can be sent again.
    pub retry_safe: bool,
    /// A sentence for the response body and the logs.
    pub message: String,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
    /// A redirect's `Location` (the answer is then not an error).
    pub location: Option<String>,
}

/// Status recorded for a request whose client left before its answer (no
/// response is sent; the number is nginx's).
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

impl ProxyError {
    /// An error that is not safe to retry.
    pub fn new(status: StatusCode, origin: Origin, kind: Kind, message: impl Into<String>) -> Self {
        Self {
            status,
            origin,
            kind,
            retry_safe: false,
            message: message.into(),
            retry_after: None,
            location: None,
        }
    }

    /// A redirect to `location` with `status` (a 3xx), which a route's
    /// RequestRedirect filter answers.
    pub fn redirect(status: u16, location: String) -> Self {
        let status = StatusCode::from_u16(status)
            .ok()
            .filter(|s| s.is_redirection())
            .unwrap_or(StatusCode::FOUND);
        Self {
            message: format!("redirected to {location}"),
            location: Some(location),
            retry_safe: false,
            retry_after: None,
            status,
            origin: Origin::Gateway,
            kind: Kind::Redirect,
        }
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    fn safe_to_retry(mut self) -> Self {
        self.retry_safe = true;
        self
    }

    /// The response as HTTP/1.1 bytes, appended to `out`.
    pub fn write_http1(&self, close: bool, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.message.len() + 1,
        );
        match &self.location {
            Some(location) => push_header(out, b"location", location.as_bytes()),
            None => push_header(out, b"x-tandem-error", self.origin.as_str().as_bytes()),
        }
        if let Some(seconds) = self.retry_after {
            let _ = write!(out, "retry-after: {seconds}\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        let _ = write!(out, "\r\n{}\n", self.message);
    }
}

/// The client side of one exchange, as its protocol adapter offers it.
pub(super) trait Downstream {
    /// Sends `100 Continue` to a client that waits for it before its body.
    async fn send_continue(&mut self);
    /// Reads request body data and appends it to `out`, framed by
    /// `encoder`, failing past `limit` data bytes. `Ok(true)`: the whole
    /// body has been read (and its end framed).
    async fn read_body(
        &mut self,
        limit: u64,
        encoder: Encoder,
        out: &mut Vec<u8>,
    ) -> Result<bool, BodyError>;
    /// Completes when the client has gone (while its request is held).
    async fn gone(&mut self);
    /// Takes an informational (1xx) response to pass on; `flush` sends it.
    fn interim(&mut self, response: &Response<'_>);
    /// Takes the final response head; `flush` sends it with the first data.
    fn head(&mut self, response: &Response<'_>);
    /// Takes a piece of response body data.
    fn push(&mut self, data: &[u8]);
    /// Sends what was taken; with `last`, ends the response.
    async fn flush(&mut self, last: bool) -> Result<(), ProxyError>;
    /// Sends what was taken and then `data` (with `last`, the end of the
    /// response): [`Downstream::push`] and [`Downstream::flush`], which an
    /// adapter may do without copying `data`.
    async fn send(&mut self, data: &[u8], last: bool) -> Result<(), ProxyError> {
        self.push(data);
        self.flush(last).await
    }
    /// After a `101`: moves bytes both ways between the client and
    /// `upstream` (which already sent `early`) until either side closes or
    /// both are silent for the tunnel idle timeout.
    async fn tunnel(&mut self, upstream: &mut TcpStream, early: &[u8]);
}

/// Where one request goes: its route, the workload picked by weight, and
/// that workload's counters.
pub(super) struct Resolved {
    pub(super) route: Arc<CompiledRoute>,
    pub(super) target: Arc<WorkloadTarget>,
    pub(super) load: Arc<WorkloadLoad>,
}

/// Where a connection came in: which requests it may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The main listener: requests are routed by host, path and headers.
    Routes,
    /// A workload's gateway port: every request is that workload's.
    Port(u16),
    /// A Gateway API listener at this address: requests are routed by its
    /// listeners' host names and their HTTPRoutes.
    Listener(SocketAddr),
}

/// **Resolve**: the route, workload and counters for a request, or why
/// there is none.
pub(super) fn resolve(
    gateway: &Gateway,
    entry: Entry,
    host: Option<&str>,
    path: &str,
    query: Option<&str>,
    method: &str,
    headers: &(impl HeaderLookup + ?Sized),
) -> Result<Resolved, ProxyError> {
    let table = gateway.tables.borrow();
    let found = match entry {
        Entry::Routes => table.route(host, path, method, headers),
        Entry::Port(port) => table.port_route(port),
        Entry::Listener(local) => table.listener_route(local, host, path, method, headers),
    };
    let Some(route) = found else {
        gateway.metrics.request_without_route();
        let message = match entry {
            Entry::Routes => format!(
                "no route for host {} and path {path}",
                host.unwrap_or("(none)")
            ),
            Entry::Port(port) => format!("no workload has gateway port {port} any more"),
            Entry::Listener(local) => format!(
                "no HTTPRoute on {local} for host {} and path {path}",
                host.unwrap_or("(none)")
            ),
        };
        return Err(ProxyError::new(
            StatusCode::NOT_FOUND,
            Origin::Client,
            Kind::NoRoute,
            message,
        ));
    };
    if let Some(redirect) = route.filters.as_ref().and_then(|f| f.redirect.as_ref()) {
        let (scheme, port) = match entry {
            Entry::Listener(local) if table.listener_tls(local) => ("https", local.port()),
            Entry::Listener(local) => ("http", local.port()),
            // HybridApp routes have no filters; never reached.
            Entry::Routes | Entry::Port(_) => ("http", 80),
        };
        let location = redirect.location(
            &route.path,
            &super::filters::Asked {
                scheme,
                host,
                port,
                path,
                query,
            },
        );
        return Err(ProxyError::redirect(redirect.status, location));
    }
    let Some(key) = pick_weighted(&route.backends, route.rolls.next(route.total_weight)) else {
        return Err(ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Origin::Gateway,
            Kind::NoBackend,
            "the route has no backend with a weight above 0",
        )
        .retry_after(1));
    };
    let Some(target) = table.workload(key).cloned() else {
        if *key == WorkloadKey::unresolved() {
            return Err(ProxyError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Origin::Gateway,
                Kind::NoBackend,
                "this share of the route's traffic goes to a backend that does not resolve",
            ));
        }
        return Err(ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Origin::Gateway,
            Kind::NoBackend,
            format!("workload {key} is not known yet"),
        )
        .retry_after(1));
    };
    let route = route.clone();
    drop(table);
    let load = gateway.load_of(&target.key);
    Ok(Resolved {
        route,
        target,
        load,
    })
}

/// The route a resolved request takes (none for a refused one), and the
/// `traceparent` its upstream gets when it is traced.
pub(super) fn routed(
    (resolved, record): &(Result<Resolved, ProxyError>, Record),
) -> (Option<&CompiledRoute>, Option<&[u8]>) {
    (
        resolved.as_ref().ok().map(|r| &*r.route),
        record.traceparent(),
    )
}

/// A parsed request, ready to be proxied.
pub(super) struct Request<'a> {
    /// Route, workload and counters.
    pub(super) resolved: Resolved,
    /// Request line and headers for the upstream, without framing headers
    /// and the final empty line.
    pub(super) upstream_head: &'a mut Vec<u8>,
    /// A buffer for the head and body on their way upstream (kept from
    /// request to request by the adapter).
    pub(super) scratch: &'a mut Vec<u8>,
    /// How the client delimits its body (`Chunked`: of unknown length).
    pub(super) framing: Framing,
    /// Safe to send twice (RFC 9110 idempotent methods).
    pub(super) idempotent: bool,
    /// What shapes the response.
    pub(super) asked: Asked,
    /// The client waits for `100 Continue` before its body.
    pub(super) expect_continue: bool,
    /// When its head arrived.
    pub(super) started: Instant,
    /// How long it was held for a cold start, if it was.
    pub(super) cold_wait: Option<Duration>,
    /// Its log line and span.
    pub(super) record: Record,
}

/// The rest of the lifecycle after **resolve**: admit, hold, pick, attempt,
/// relay, observe. `Ok`: the status relayed.
pub(super) async fn proxy<D: Downstream>(
    gateway: &Gateway,
    pool: &Pool,
    mut request: Request<'_>,
    down: &mut D,
) -> Result<StatusCode, ProxyError> {
    let record = std::mem::take(&mut request.record);
    let outcome = exchange(gateway, pool, &mut request, down)
        .instrument(record.span())
        .await;
    // Observe.
    let status = match &outcome {
        Ok(status) => *status,
        Err(error) => {
            observe_failure(gateway, error);
            error.status
        }
    };
    let took = request.started.elapsed();
    let resolved = &request.resolved;
    resolved
        .load
        .metrics
        .observe(&resolved.route.name, status, took);
    if resolved.route.measured {
        resolved.load.route_meter(&resolved.route.name).record(
            status.as_u16(),
            took,
            request.cold_wait,
        );
    }
    let request_id = record
        .on()
        .then(|| head::header_value(request.upstream_head, b"x-request-id"))
        .flatten();
    record.end(&Ending {
        status,
        took,
        routed: Some((&resolved.route, &resolved.target)),
        cold_wait: request.cold_wait,
        error: outcome.as_ref().err(),
        request_id,
    });
    outcome
}

/// Counts a failed request in the error metrics.
pub(super) fn observe_failure(gateway: &Gateway, error: &ProxyError) {
    if error.kind == Kind::Redirect {
        return;
    }
    gateway
        .metrics
        .error(error.origin.as_str(), error.kind.as_str());
    tracing::debug!(
        origin = error.origin.as_str(),
        kind = error.kind.as_str(),
        status = error.status.as_u16(),
        "{}",
        error.message
    );
}

/// The request body as it will be sent upstream.
enum Payload {
    /// Read from the client while sending (never sent twice).
    Streamed,
    /// Held in memory (may be sent again).
    Buffered(Vec<u8>),
}

/// An upstream's answer: its head (already given to the downstream), the
/// body still to come.
struct Answer {
    upstream: Upstream,
    endpoint: SocketAddr,
    head: head::ResponseHead,
    /// The endpoint's and the workload's load, until the body is through.
    _load: (InFlight, Serving),
}

async fn exchange<D: Downstream>(
    gateway: &Gateway,
    pool: &Pool,
    request: &mut Request<'_>,
    down: &mut D,
) -> Result<StatusCode, ProxyError> {
    let settings = &gateway.settings;
    let resolved = &request.resolved;
    let deadline = request.started
        + resolved
            .route
            .timeout
            .unwrap_or(resolved.target.request_timeout);

    // Admit: the declared size is checked before the request may take a
    // place in a queue, signal demand or count as a cold start.
    let declared = match request.framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    if declared.is_some_and(|n| n > settings.max_body_bytes as u64) {
        return Err(body_too_large(gateway));
    }
    let cold = resolved.target.endpoints.is_empty();
    if cold
        && resolved.target.mode.function_like()
        && declared.is_some_and(|n| n > settings.max_held_body_bytes as u64)
    {
        return Err(held_body_too_large(gateway, &resolved.target));
    }
    resolved.load.requests.fetch_add(1, Ordering::Relaxed);

    // Hold.
    let (target, payload) = if cold {
        let held = Instant::now();
        let outcome = hold(gateway, request, down, deadline).await;
        request.cold_wait = Some(held.elapsed());
        let (target, body) = outcome?;
        (target, Payload::Buffered(body))
    } else {
        (resolved.target.clone(), Payload::Streamed)
    };
    let framing = match &payload {
        Payload::Buffered(body) if body.is_empty() && request.framing == Framing::Empty => {
            Framing::Empty
        }
        Payload::Buffered(body) => Framing::Length(body.len() as u64),
        Payload::Streamed => request.framing,
    };
    finish_request_head(request.upstream_head, framing);
    let encoder = if framing == Framing::Chunked {
        Encoder::Chunked
    } else {
        Encoder::Raw
    };

    // Pick and attempt, within the request's deadline (checked at each
    // step, and the wait for the response head ends at it).
    let answer = attempts(
        gateway, pool, request, &target, &payload, encoder, deadline, down,
    )
    .await?;

    // Relay.
    let status = StatusCode::from_u16(answer.head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    relay(gateway, pool, answer, down).await?;
    Ok(status)
}

fn body_too_large(gateway: &Gateway) -> ProxyError {
    ProxyError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Origin::Client,
        Kind::BodyTooLarge,
        format!(
            "request body is larger than {} bytes",
            gateway.settings.max_body_bytes
        ),
    )
}

fn held_body_too_large(gateway: &Gateway, target: &WorkloadTarget) -> ProxyError {
    ProxyError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Origin::Client,
        Kind::BodyTooLarge,
        format!(
            "{} is starting and a request held meanwhile may carry at most {} bytes",
            target.key, gateway.settings.max_held_body_bytes
        ),
    )
}

/// A request body the client failed to send.
fn client_body_error(gateway: &Gateway, error: BodyError) -> ProxyError {
    match error {
        BodyError::TooLarge => body_too_large(gateway),
        BodyError::Malformed(what) => ProxyError::new(
            StatusCode::BAD_REQUEST,
            Origin::Client,
            Kind::BodyMalformed,
            format!("request body: {what}"),
        ),
        BodyError::SourceStalled => ProxyError::new(
            StatusCode::REQUEST_TIMEOUT,
            Origin::Client,
            Kind::BodyTimeout,
            format!(
                "the request body stalled for {:?}",
                gateway.settings.idle_timeout
            ),
        ),
        BodyError::Source(error) => ProxyError::new(
            CLIENT_CLOSED_REQUEST,
            Origin::Client,
            Kind::ClientGone,
            format!("the client closed or failed while sending its body: {error}"),
        ),
        BodyError::Sink(error) => ProxyError::new(
            StatusCode::BAD_GATEWAY,
            Origin::Upstream,
            Kind::UpstreamClosed,
            format!("writing the request body upstream: {error}"),
        ),
        BodyError::SinkStalled => ProxyError::new(
            StatusCode::GATEWAY_TIMEOUT,
            Origin::Upstream,
            Kind::UpstreamTimeout,
            "the upstream stopped taking the request body",
        ),
    }
}

/// **Hold**: a request for a workload with no ready endpoint waits in its
/// bounded queue with its body (read whole, capped) while the autoscaler
/// is told, until an endpoint is ready, `deadline` passes, or the client
/// leaves. Returns the workload with its endpoints and the body's data.
async fn hold<D: Downstream>(
    gateway: &Gateway,
    request: &Request<'_>,
    down: &mut D,
    deadline: Instant,
) -> Result<(Arc<WorkloadTarget>, Vec<u8>), ProxyError> {
    let (target, load) = (&request.resolved.target, &request.resolved.load);
    if !target.mode.function_like() {
        return Err(ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Origin::Gateway,
            Kind::NotReady,
            format!("always-on workload {} has no ready endpoint", target.key),
        )
        .retry_after(1));
    }
    let held = Held::enter(load, gateway.settings.max_held_requests as u64).ok_or_else(|| {
        ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Origin::Gateway,
            Kind::QueueFull,
            format!("too many requests waiting for {} to start", target.key),
        )
        .retry_after(1)
    })?;
    if held.first {
        load.metrics.cold_starts.inc();
    }
    gateway.demand.notify_one();
    let mut body = Vec::new();
    if !request.framing.is_empty() {
        if request.expect_continue {
            down.send_continue().await;
        }
        let limit = gateway.settings.max_held_body_bytes as u64;
        let read = async {
            while !down.read_body(limit, Encoder::Raw, &mut body).await? {}
            Ok::<_, BodyError>(())
        };
        match tokio::time::timeout_at(deadline, read).await {
            Err(_) => {
                return Err(ProxyError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    Origin::Client,
                    Kind::BodyTimeout,
                    "the request body did not arrive before the request's deadline",
                ));
            }
            Ok(Err(BodyError::TooLarge)) => return Err(held_body_too_large(gateway, target)),
            Ok(Err(error)) => return Err(client_body_error(gateway, error)),
            Ok(Ok(())) => {}
        }
    }
    let waited = Instant::now();
    let ready = tokio::select! {
        ready = wait_for_endpoint(gateway, target, deadline) => ready.ok_or_else(|| {
            ProxyError::new(
                StatusCode::GATEWAY_TIMEOUT,
                Origin::Upstream,
                Kind::StartTimeout,
                format!("{} did not become ready within {:?}", target.key, target.request_timeout),
            )
        })?,
        () = down.gone() => return Err(ProxyError::new(
            CLIENT_CLOSED_REQUEST,
            Origin::Client,
            Kind::ClientGone,
            "the client went away while the request was held",
        )),
    };
    drop(held);
    load.metrics
        .cold_wait
        .observe(waited.elapsed().as_secs_f64());
    Ok((ready, body))
}

/// Waits until the table lists a ready endpoint for `target`, or `deadline`.
async fn wait_for_endpoint(
    gateway: &Gateway,
    target: &WorkloadTarget,
    deadline: Instant,
) -> Option<Arc<WorkloadTarget>> {
    let mut tables = gateway.tables.clone();
    let wait = async {
        loop {
            let ready = tables
                .borrow_and_update()
                .workload(&target.key)
                .filter(|t| !t.endpoints.is_empty())
                .cloned();
            if ready.is_some() {
                return ready;
            }
            if tables.changed().await.is_err() {
                return None;
            }
        }
    };
    tokio::time::timeout_at(deadline, wait).await.ok().flatten()
}

/// How one attempt on an upstream connection failed.
enum AttemptError {
    /// The connection failed before any response byte: the endpoint may not
    /// have seen the request.
    BeforeResponse(std::io::Error),
    /// Anything else, already decided.
    Failed(ProxyError),
}

/// **Pick** and **attempt**: tries endpoints until one answers. Another
/// endpoint when a connection cannot be made (the request never left), a
/// fresh connection when a kept one turns out to be closed before any
/// response byte, if the request is idempotent and its body can be sent
/// again. Nothing else is retried.
#[allow(clippy::too_many_arguments)]
async fn attempts<D: Downstream>(
    gateway: &Gateway,
    pool: &Pool,
    request: &mut Request<'_>,
    target: &WorkloadTarget,
    payload: &Payload,
    encoder: Encoder,
    deadline: Instant,
    down: &mut D,
) -> Result<Answer, ProxyError> {
    let replayable = matches!(payload, Payload::Buffered(_)) || request.framing.is_empty();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut fresh_only = false;
    let mut last_error = None;
    loop {
        if Instant::now() >= deadline {
            return Err(too_late(target));
        }
        let Some((endpoint, in_flight)) = gateway.loads.pick_untried(&target.endpoints, &tried)
        else {
            return Err(last_error.unwrap_or_else(|| {
                ProxyError::new(
                    StatusCode::BAD_GATEWAY,
                    Origin::Upstream,
                    Kind::ConnectFailed,
                    format!("no endpoint of {} accepted a connection", target.key),
                )
                .safe_to_retry()
            }));
        };
        tried.push(endpoint);
        let kept = if fresh_only {
            None
        } else {
            pool.checkout(endpoint)
        };
        let reused = kept.is_some();
        let upstream = match kept {
            Some(upstream) => upstream,
            None => match pool::connect(
                endpoint,
                gateway
                    .settings
                    .connect_timeout
                    .min(deadline - Instant::now()),
            )
            .await
            {
                Ok(upstream) => upstream,
                Err(error) => {
                    tracing::debug!(%endpoint, %error, "connect failed; trying another endpoint");
                    last_error = Some(
                        ProxyError::new(
                            StatusCode::BAD_GATEWAY,
                            Origin::Upstream,
                            Kind::ConnectFailed,
                            format!("no endpoint of {} accepted a connection (last: {endpoint}: {error})", target.key),
                        )
                        .safe_to_retry(),
                    );
                    continue;
                }
            },
        };
        let serving = Serving::start(&request.resolved.load);
        match attempt(
            gateway, request, upstream, endpoint, payload, encoder, deadline, down,
        )
        .await
        {
            Ok((upstream, head)) => {
                return Ok(Answer {
                    upstream,
                    endpoint,
                    head,
                    _load: (in_flight, serving),
                });
            }
            Err(AttemptError::BeforeResponse(error))
                if reused && replayable && request.idempotent =>
            {
                tracing::debug!(%endpoint, %error, "kept connection was closed; sending again on a new one");
                fresh_only = true;
                tried.pop();
            }
            Err(AttemptError::BeforeResponse(error)) => {
                return Err(ProxyError::new(
                    StatusCode::BAD_GATEWAY,
                    Origin::Upstream,
                    Kind::UpstreamClosed,
                    format!("{endpoint}: connection closed before a response ({error})"),
                ));
            }
            Err(AttemptError::Failed(error)) => return Err(error),
        }
    }
}

/// Most informational responses before the final one.
const MAX_INTERIM: usize = 8;
/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Bytes asked of the kernel per read of a response body.
const RELAY_READ: usize = 64 * 1024;

/// A 504 for a request whose deadline passed before its response head.
fn too_late(target: &WorkloadTarget) -> ProxyError {
    ProxyError::new(
        StatusCode::GATEWAY_TIMEOUT,
        Origin::Upstream,
        Kind::UpstreamTimeout,
        format!(
            "{} did not answer within {:?}",
            target.key, target.request_timeout
        ),
    )
}

/// Sends the request on `upstream` and reads the response head (passing
/// informational ones on), by `deadline` and within the response-head
/// timeout from the moment the request was sent.
#[allow(clippy::too_many_arguments)]
async fn attempt<D: Downstream>(
    gateway: &Gateway,
    request: &mut Request<'_>,
    mut upstream: Upstream,
    endpoint: SocketAddr,
    payload: &Payload,
    encoder: Encoder,
    deadline: Instant,
    down: &mut D,
) -> Result<(Upstream, head::ResponseHead), AttemptError> {
    let idle = gateway.settings.idle_timeout;
    let before = AttemptError::BeforeResponse;
    match payload {
        Payload::Streamed if request.framing.is_empty() => {
            body::write_within(&mut upstream.stream, request.upstream_head, idle)
                .await
                .map_err(before)?;
        }
        Payload::Buffered(body) => {
            body::write_two_within(&mut upstream.stream, request.upstream_head, body, idle)
                .await
                .map_err(before)?;
        }
        Payload::Streamed => {
            if request.expect_continue {
                down.send_continue().await;
            }
            let limit = gateway.settings.max_body_bytes as u64;
            let out = &mut *request.scratch;
            out.clear();
            out.extend_from_slice(request.upstream_head);
            loop {
                let done = down
                    .read_body(limit, encoder, out)
                    .await
                    .map_err(|error| AttemptError::Failed(client_body_error(gateway, error)))?;
                let written = body::write_within(&mut upstream.stream, out, idle).await;
                out.clear();
                if out.capacity() > 256 * 1024 {
                    out.shrink_to(64 * 1024);
                }
                written.map_err(before)?;
                if done {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(AttemptError::Failed(too_late(&request.resolved.target)));
                }
            }
        }
    }

    // The response head, after any informational responses.
    let bad = |message: &str| {
        AttemptError::Failed(ProxyError::new(
            StatusCode::BAD_GATEWAY,
            Origin::Upstream,
            Kind::BadResponse,
            format!("{endpoint}: {message}"),
        ))
    };
    let head_timeout = gateway.settings.response_head_timeout;
    let head_by = Instant::now() + head_timeout;
    let wait_until = head_by.min(deadline);
    let mut interim = 0;
    loop {
        let edits = request
            .resolved
            .route
            .filters
            .as_deref()
            .map(|f| &f.response);
        let parsed = head::parse_response(&upstream.buf, request.asked, edits, |response| {
            match response.head.status {
                // The gateway answered the client's Expect itself.
                100 => {}
                101 | 200.. => down.head(response),
                _ => down.interim(response),
            }
        });
        let response = match parsed {
            Ok(Some((response, ()))) => response,
            Ok(None) if upstream.buf.len() < MAX_RESPONSE_HEAD => {
                let Ok(read) = tokio::time::timeout_at(
                    wait_until,
                    body::fill(&mut upstream.stream, &mut upstream.buf),
                )
                .await
                else {
                    if wait_until == deadline {
                        return Err(AttemptError::Failed(too_late(&request.resolved.target)));
                    }
                    return Err(AttemptError::Failed(ProxyError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        Origin::Upstream,
                        Kind::UpstreamTimeout,
                        format!("{endpoint} sent no response head within {head_timeout:?}"),
                    )));
                };
                match read {
                    Ok(n) if n > 0 => continue,
                    Ok(_) if upstream.buf.is_empty() && interim == 0 => {
                        return Err(before(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                    Err(error) if upstream.buf.is_empty() && interim == 0 => {
                        return Err(before(error));
                    }
                    _ => return Err(bad("response head broke off")),
                }
            }
            Ok(None) => return Err(bad("response head too large")),
            Err(message) => return Err(bad(message)),
        };
        upstream.buf.advance(response.len);
        if response.status >= 200 || response.status == 101 {
            return Ok((upstream, response));
        }
        interim += 1;
        if interim > MAX_INTERIM {
            return Err(bad("too many informational responses"));
        }
        down.flush(false).await.map_err(AttemptError::Failed)?;
    }
}

/// **Relay**: the response body, decoded from the upstream's framing and
/// framed anew by the downstream; the upstream connection goes back to the
/// pool only after a clean exchange.
async fn relay<D: Downstream>(
    gateway: &Gateway,
    pool: &Pool,
    answer: Answer,
    down: &mut D,
) -> Result<(), ProxyError> {
    let Answer {
        mut upstream,
        endpoint,
        head,
        _load,
    } = answer;
    if head.websocket {
        down.flush(false).await?;
        let early = std::mem::take(&mut upstream.buf);
        down.tunnel(&mut upstream.stream, &early).await;
        return Ok(());
    }
    let idle = gateway.settings.idle_timeout;
    let broken = |kind: Kind, message: String| {
        ProxyError::new(
            StatusCode::BAD_GATEWAY,
            Origin::Upstream,
            kind,
            format!("{endpoint}: {message}"),
        )
    };
    let mut decoder = Decoder::new(head.framing, u64::MAX);
    loop {
        // The pieces of one read go out together. The one that ends the
        // body or the buffer is sent from the buffer itself (no copy).
        let mut sent = false;
        while let Some(n) = decoder
            .next(&mut upstream.buf)
            .map_err(|error| broken(Kind::BadResponse, format!("response body: {error:?}")))?
        {
            if decoder.done() || upstream.buf.len() == n {
                down.send(&upstream.buf[..n], decoder.done()).await?;
                upstream.buf.advance(n);
                sent = true;
                break;
            }
            down.push(&upstream.buf[..n]);
            upstream.buf.advance(n);
        }
        if !sent {
            down.flush(decoder.done()).await?;
        }
        if decoder.done() {
            break;
        }
        // Large bodies in large reads: one system call per 64 KiB.
        upstream.buf.reserve(RELAY_READ);
        match body::fill_within(&mut upstream.stream, &mut upstream.buf, idle).await {
            Ok(0) => decoder.closed().map_err(|_| {
                broken(
                    Kind::UpstreamClosed,
                    "closed before the end of the response body".into(),
                )
            })?,
            Ok(_) => {}
            Err(error) if body::is_stall(&error) => {
                return Err(broken(
                    Kind::UpstreamStalled,
                    format!("the response body stalled for {idle:?}"),
                ));
            }
            Err(error) => {
                return Err(broken(
                    Kind::UpstreamClosed,
                    format!("response body: {error}"),
                ));
            }
        }
    }
    if head.reusable && upstream.buf.is_empty() {
        pool.checkin(endpoint, upstream);
    }
    Ok(())
}

/// One request in flight to a workload, until its response body ends.
pub(super) struct Serving(Arc<WorkloadLoad>);

impl Serving {
    pub(super) fn start(load: &Arc<WorkloadLoad>) -> Self {
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        load.metrics.in_flight.inc();
        Self(load.clone())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.in_flight.dec();
    }
}

/// Tracks one held request; the first of a burst is a cold start.
struct Held<'a> {
    load: &'a WorkloadLoad,
    first: bool,
}

impl<'a> Held<'a> {
    fn enter(load: &'a WorkloadLoad, capacity: u64) -> Option<Self> {
        let mut current = load.held.load(Ordering::Relaxed);
        loop {
            if current >= capacity {
                return None;
            }
            match load.held.compare_exchange(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    load.metrics.held.inc();
                    return Some(Self {
                        load,
                        first: current == 0,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.load.held.fetch_sub(1, Ordering::AcqRel);
        self.load.metrics.held.dec();
    }
}

/// Moves bytes both ways between `a` and `b` until either side closes or
/// fails, or neither sends anything for `idle`.
pub(super) async fn splice<A>(a: &mut A, b: &mut TcpStream, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = b.split();
    async fn one_way(
        from: &mut (impl AsyncRead + Unpin),
        to: &mut (impl AsyncWrite + Unpin),
        touch: &(impl Fn() + ?Sized),
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    // A TLS side holds records until flushed.
                    if to.flush().await.is_err() {
                        return;
                    }
                    touch();
                }
            }
        }
    }
    let watchdog = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let quiet_until = base + since + idle;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until).await;
        }
    };
    tokio::select! {
        _ = futures::future::join(
            one_way(&mut a_read, &mut b_write, &touch),
            one_way(&mut b_read, &mut a_write, &touch),
        ) => {}
        () = watchdog => tracing::debug!(?idle, "upgraded connection idle; closed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::metrics::GatewayMetrics;
    use crate::gateway::table::WorkloadKey;

    #[test]
    fn held_requests_are_bounded_and_the_first_is_a_cold_start() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = GatewayMetrics::register(&mut registry);
        let key = WorkloadKey {
            namespace: "n".into(),
            app: "a".into(),
            workload: "w".into(),
        };
        let load = WorkloadLoad {
            metrics: metrics.workload(&key),
            in_flight: AtomicU64::new(0),
            held: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            routes: Default::default(),
        };
        let first = Held::enter(&load, 2).unwrap();
        let second = Held::enter(&load, 2).unwrap();
        assert!(first.first && !second.first);
        assert!(Held::enter(&load, 2).is_none(), "capacity 2");
        assert_eq!(load.metrics.held.get(), 2, "the queue-depth gauge follows");
        drop(first);
        assert!(Held::enter(&load, 2).is_some());
        assert_eq!(load.metrics.held.get(), 1);
    }
}
