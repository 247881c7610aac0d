//! What every request goes through, whatever its protocol: route, pick a
//! workload by weight, hold it if the workload is cold, count it; and the
//! forwarding of HTTP/2 requests (through hyper; HTTP/1 has its own engine
//! in [`super::h1`]).
//!
//! Every error says where it came from (the client, the upstream, or the
//! gateway itself) in the `x-tandem-error` header and the body, and maps to a
//! precise status: 400 malformed, 404 no route, 413 body too large, 431 head
//! too large, 502 upstream failed, 503 with Retry-After when no endpoint can
//! take the request, 504 when the deadline passes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{Notify, watch};

use super::GatewayArgs;
use super::balance::{EndpointLoads, pick_weighted};
use super::metrics::GatewayMetrics;
use super::table::{CompiledRoute, HeaderLookup, RoutingTable, WorkloadKey, WorkloadTarget};
use crate::api::Mode;

/// Error type of bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of requests and responses passing through.
pub type Body = BoxBody<Bytes, BoxError>;

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something we cannot serve.
    Client,
    /// The upstream endpoint failed or was too slow.
    Upstream,
    /// The gateway cannot serve it now (no route, no capacity).
    Gateway,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Upstream => "upstream",
            Origin::Gateway => "gateway",
        }
    }
}

/// Per-workload counters reported to the autoscaler, and its metrics.
pub struct WorkloadLoad {
    /// Prometheus handles of this workload.
    pub metrics: super::metrics::WorkloadMetrics,
    /// Requests being served by endpoints now.
    pub in_flight: AtomicU64,
    /// Requests held waiting for an endpoint now.
    pub held: AtomicU64,
    /// Requests started since the last stats report.
    pub requests: AtomicU64,
}

/// Shared state of the gateway.
pub struct Gateway {
    tables: watch::Receiver<Arc<RoutingTable>>,
    pub(super) loads: Arc<EndpointLoads>,
    client: Client<HttpConnector, Body>,
    pub(super) connect_timeout: Duration,
    workloads: Arc<RwLock<super::table::FastMap<WorkloadKey, Arc<WorkloadLoad>>>>,
    /// Wakes the demand sender when a workload gets its first held request.
    pub demand: Arc<Notify>,
    metrics: GatewayMetrics,
    max_held_requests: u64,
    pub(super) max_held_body_bytes: usize,
    pub(super) max_body_bytes: usize,
    /// This replica's name in protocol messages.
    pub id: String,
}

/// Why a request gets an error response, and where the error came from.
pub(super) struct Failure {
    pub(super) status: StatusCode,
    origin: Origin,
    message: String,
    retry_after: Option<u64>,
}

/// Status recorded for a request whose client left before its answer (no
/// response is sent; the number is nginx's).
pub(super) const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

/// Where one request goes: its route, the workload picked by weight, and
/// that workload's counters.
pub(super) struct Resolved {
    pub(super) route: Arc<CompiledRoute>,
    pub(super) target: Arc<WorkloadTarget>,
    pub(super) load: Arc<WorkloadLoad>,
}

impl Resolved {
    /// Counts the answer in the workload's metrics.
    pub(super) fn observe(&self, status: StatusCode, started: Instant) {
        self.load
            .metrics
            .observe(&self.route.name, status, started.elapsed());
    }
}

impl Failure {
    pub(super) fn new(status: StatusCode, origin: Origin, message: impl Into<String>) -> Self {
        Self {
            status,
            origin,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(super) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The response as HTTP/1.1 bytes, appended to `out`.
    pub(super) fn write_http1(&self, close: bool, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\nx-tandem-error: {}\r\ncontent-length: {}\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.origin.as_str(),
            self.message.len() + 1,
        );
        if let Some(seconds) = self.retry_after {
            let _ = write!(out, "retry-after: {seconds}\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        let _ = write!(out, "\r\n{}\n", self.message);
    }

    fn response(self) -> Response<Body> {
        let mut response = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header("x-tandem-error", self.origin.as_str());
        if let Some(seconds) = self.retry_after {
            response = response.header(header::RETRY_AFTER, seconds);
        }
        response
            .body(full(format!("{}\n", self.message)))
            .expect("valid response")
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

// Header names as constants: a `&str` name is parsed and hashed again on
// every lookup, which showed up in profiles of the request path.
pub(super) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];
pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes the hop-by-hop headers, looking them up only when one is there.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

impl Gateway {
    /// The gateway for `tables`, with limits from `args`.
    pub fn new(
        args: &GatewayArgs,
        tables: watch::Receiver<Arc<RoutingTable>>,
        metrics: GatewayMetrics,
        id: String,
    ) -> Self {
        Self {
            tables,
            loads: Arc::default(),
            client: upstream_client(args.connect_timeout),
            connect_timeout: args.connect_timeout,
            workloads: Arc::default(),
            demand: Arc::default(),
            metrics,
            max_held_requests: args.max_held_requests as u64,
            max_held_body_bytes: args.max_held_body_bytes,
            max_body_bytes: args.max_body_bytes,
            id,
        }
    }

    /// The same gateway with a connection pool of its own, for one serving
    /// thread: connections stay on the thread that uses them.
    pub fn for_thread(&self) -> Gateway {
        Gateway {
            tables: self.tables.clone(),
            loads: self.loads.clone(),
            client: upstream_client(self.connect_timeout),
            connect_timeout: self.connect_timeout,
            workloads: self.workloads.clone(),
            demand: self.demand.clone(),
            metrics: self.metrics.clone(),
            max_held_requests: self.max_held_requests,
            max_held_body_bytes: self.max_held_body_bytes,
            max_body_bytes: self.max_body_bytes,
            id: self.id.clone(),
        }
    }

    /// Counters of one workload.
    pub fn load_of(&self, key: &WorkloadKey) -> Arc<WorkloadLoad> {
        if let Some(load) = self.workloads.read().expect("workloads lock").get(key) {
            return load.clone();
        }
        self.workloads
            .write()
            .expect("workloads lock")
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(WorkloadLoad {
                    metrics: self.metrics.workload(key),
                    in_flight: AtomicU64::new(0),
                    held: AtomicU64::new(0),
                    requests: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Every workload's counters.
    pub fn loads(&self) -> Vec<(WorkloadKey, Arc<WorkloadLoad>)> {
        self.workloads
            .read()
            .expect("workloads lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The route, workload and counters for a request, or why there is none.
    pub(super) fn resolve(
        &self,
        host: Option<&str>,
        path: &str,
        method: &str,
        headers: &(impl HeaderLookup + ?Sized),
    ) -> Result<Resolved, Failure> {
        let table = self.tables.borrow();
        let Some(route) = table.route(host, path, method, headers) else {
            self.metrics.request_without_route();
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                Origin::Client,
                format!(
                    "no route for host {} and path {path}",
                    host.unwrap_or("(none)")
                ),
            ));
        };
        let Some(key) = pick_weighted(&route.backends, fastrand::u32(0..route.total_weight.max(1)))
        else {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Origin::Gateway,
                "the route has no backend with a weight above 0",
            )
            .retry_after(1));
        };
        let Some(target) = table.workload(key).cloned() else {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Origin::Gateway,
                format!("workload {key} is not known yet"),
            )
            .retry_after(1));
        };
        let route = route.clone();
        drop(table);
        let load = self.load_of(&target.key);
        Ok(Resolved {
            route,
            target,
            load,
        })
    }

    /// Serves one request; never fails (errors become responses).
    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        let resolved = match self.resolve(
            host,
            request.uri().path(),
            request.method().as_str(),
            request.headers(),
        ) {
            Ok(resolved) => resolved,
            Err(failure) => return failure.response(),
        };
        let response = match self.serve(request, peer, &resolved, started).await {
            Ok(response) => response,
            Err(failure) => failure.response(),
        };
        resolved.observe(response.status(), started);
        response
    }

    async fn serve(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        resolved: &Resolved,
        started: Instant,
    ) -> Result<Response<Body>, Failure> {
        let deadline = started + resolved.target.request_timeout;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        self.admit(resolved, declared)?;
        let (parts, body) = request.into_parts();
        let (target, body) = if resolved.target.endpoints.is_empty() {
            let limit = self.max_held_body_bytes;
            // hyper drops this future when the client goes away.
            let collect = async move {
                Limited::new(body, limit)
                    .collect()
                    .await
                    .map(|c| (c.to_bytes(), std::future::pending()))
                    .map_err(|_| self.held_body_too_large(&resolved.target))
            };
            let (target, bytes) = self.hold(resolved, declared, deadline, collect).await?;
            (target, Forward::Buffered(bytes))
        } else {
            (resolved.target.clone(), Forward::Streaming(body))
        };
        self.forward(parts, body, peer, &target, &resolved.load, deadline)
            .await
    }

    /// Checks a request's declared body size and counts it for the autoscaler.
    pub(super) fn admit(&self, resolved: &Resolved, declared: Option<u64>) -> Result<(), Failure> {
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(self.body_too_large());
        }
        resolved.load.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn body_too_large(&self) -> Failure {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Origin::Client,
            format!("request body is larger than {} bytes", self.max_body_bytes),
        )
    }

    pub(super) fn held_body_too_large(&self, target: &WorkloadTarget) -> Failure {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Origin::Client,
            format!(
                "{} is starting and a request held meanwhile may carry at most {} bytes",
                target.key, self.max_held_body_bytes
            ),
        )
    }

    /// The cold path: a request for a workload with no ready endpoint waits
    /// in its bounded queue with its body (read by `body`, capped) while the
    /// autoscaler is told, until an endpoint is ready or `deadline` passes.
    /// Besides the body, `body` gives a future that ends if the client goes
    /// away meanwhile: the request then leaves the queue. Returns the
    /// workload with its endpoints and the body.
    pub(super) async fn hold<Gone: Future<Output = ()>>(
        &self,
        resolved: &Resolved,
        declared: Option<u64>,
        deadline: Instant,
        body: impl Future<Output = Result<(Bytes, Gone), Failure>>,
    ) -> Result<(Arc<WorkloadTarget>, Bytes), Failure> {
        let (target, load) = (&resolved.target, &resolved.load);
        if target.mode != Mode::Function {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Origin::Gateway,
                format!("always-on workload {} has no ready endpoint", target.key),
            )
            .retry_after(1));
        }
        let held = Held::enter(load, self.max_held_requests).ok_or_else(|| {
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Origin::Gateway,
                format!("too many requests waiting for {} to start", target.key),
            )
            .retry_after(1)
        })?;
        if held.first {
            load.metrics.cold_starts.inc();
        }
        self.demand.notify_one();
        if declared.is_some_and(|n| n > self.max_held_body_bytes as u64) {
            return Err(self.held_body_too_large(target));
        }
        let (bytes, gone) = tokio::time::timeout_at(deadline.into(), body)
            .await
            .map_err(|_| {
                Failure::new(
                    StatusCode::REQUEST_TIMEOUT,
                    Origin::Client,
                    "the request body did not arrive before the request's deadline",
                )
            })??;
        let waited = Instant::now();
        let ready = tokio::select! {
            ready = self.wait_for_endpoint(&target.key, deadline) => {
                ready.ok_or_else(|| self.not_ready_in_time(target))?
            }
            () = gone => return Err(Failure::new(
                CLIENT_CLOSED_REQUEST,
                Origin::Client,
                "the client went away while the request was held",
            )),
        };
        drop(held);
        load.metrics
            .cold_wait
            .observe(waited.elapsed().as_secs_f64());
        Ok((ready, bytes))
    }

    fn not_ready_in_time(&self, target: &WorkloadTarget) -> Failure {
        Failure::new(
            StatusCode::GATEWAY_TIMEOUT,
            Origin::Upstream,
            format!(
                "{} did not become ready within {:?}",
                target.key, target.request_timeout
            ),
        )
    }

    /// Waits until the table lists a ready endpoint for `key`, or `deadline`.
    async fn wait_for_endpoint(
        &self,
        key: &WorkloadKey,
        deadline: Instant,
    ) -> Option<Arc<WorkloadTarget>> {
        let mut tables = self.tables.clone();
        let wait = async {
            loop {
                let ready = tables
                    .borrow_and_update()
                    .workload(key)
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
        tokio::time::timeout_at(deadline.into(), wait)
            .await
            .ok()
            .flatten()
    }

    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Forward,
        peer: SocketAddr,
        target: &WorkloadTarget,
        load: &Arc<WorkloadLoad>,
        deadline: Instant,
    ) -> Result<Response<Body>, Failure> {
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        prepare_headers(&mut parts.headers, peer, upgrade.as_ref());
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.version = http::Version::HTTP_11;

        // Only a request that never reached an endpoint (connect failed) is
        // tried again, on another endpoint, and only if its body can be
        // replayed: buffered or empty. A streamed body is never retried.
        let body = match body {
            Forward::Streaming(incoming) if hyper::body::Body::is_end_stream(&incoming) => {
                Forward::Buffered(Bytes::new())
            }
            other => other,
        };
        let mut body = Some(body);
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let Some((endpoint, in_flight)) = self.loads.pick_untried(&target.endpoints, &tried)
            else {
                return Err(Failure::new(
                    StatusCode::BAD_GATEWAY,
                    Origin::Upstream,
                    format!("no endpoint of {} accepted a connection", target.key),
                ));
            };
            tried.push(endpoint);
            let uri = Uri::builder()
                .scheme(http::uri::Scheme::HTTP)
                .authority(in_flight.authority())
                .path_and_query(path.clone())
                .build()
                .map_err(|_| {
                    Failure::new(
                        StatusCode::BAD_REQUEST,
                        Origin::Client,
                        "request target cannot be forwarded",
                    )
                })?;
            let request_body = match body.take().expect("body present") {
                Forward::Buffered(bytes) => {
                    body = Some(Forward::Buffered(bytes.clone()));
                    full(bytes)
                }
                Forward::Streaming(incoming) => Limited::new(incoming, self.max_body_bytes)
                    .map_err(BoxError::from)
                    .boxed(),
            };
            // Keep a copy of the head only while another attempt is possible.
            let last_attempt = body.is_none() || tried.len() == target.endpoints.len();
            let head = if last_attempt {
                let (mut head, _) = Request::new(()).into_parts();
                std::mem::swap(&mut head, &mut parts);
                head.uri = uri;
                head.version = http::Version::HTTP_11;
                head.extensions = http::Extensions::new();
                head
            } else {
                clone_parts(&parts, uri)
            };
            let mut upstream = Request::from_parts(head, request_body);
            *upstream.version_mut() = http::Version::HTTP_11;
            let serving = Serving::start(load);
            let result =
                tokio::time::timeout_at(deadline.into(), self.client.request(upstream)).await;
            let response = match result {
                Err(_) => {
                    return Err(Failure::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        Origin::Upstream,
                        format!(
                            "{} did not answer within {:?}",
                            target.key, target.request_timeout
                        ),
                    ));
                }
                Ok(Err(error)) if error.is_connect() && body.is_some() => {
                    tracing::debug!(%endpoint, %error, "connect failed; trying another endpoint");
                    continue;
                }
                Ok(Err(error)) => {
                    let limit = std::error::Error::source(&error)
                        .and_then(|s| s.downcast_ref::<http_body_util::LengthLimitError>())
                        .is_some();
                    if limit {
                        return Err(self.body_too_large());
                    }
                    return Err(Failure::new(
                        StatusCode::BAD_GATEWAY,
                        Origin::Upstream,
                        format!("{endpoint}: {error}"),
                    ));
                }
                Ok(Ok(response)) => response,
            };
            return Ok(self.answer(response, (in_flight, serving), client_upgrade));
        }
    }

    fn answer(
        &self,
        mut response: Response<Incoming>,
        in_flight: (super::balance::InFlight, Serving),
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                let _in_flight = in_flight;
                if let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, full(Bytes::new()));
        }
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        // The endpoint's load lasts until the body is fully sent.
        let body = body
            .map_err(BoxError::from)
            .map_frame(move |frame| {
                let _keep = &in_flight;
                frame
            })
            .boxed();
        Response::from_parts(parts, body)
    }
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

fn upstream_client(connect_timeout: Duration) -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector)
}

enum Forward {
    Buffered(Bytes),
    Streaming(Incoming),
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

fn clone_parts(parts: &http::request::Parts, uri: Uri) -> http::request::Parts {
    let (mut copy, _) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = uri;
    copy.version = http::Version::HTTP_11;
    copy.headers = parts.headers.clone();
    copy
}

/// A new request id: 32 random hex digits, without going through a formatter.
pub(super) fn request_id() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let bits = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> (4 * i)) & 0xf) as usize];
    }
    id
}

/// Removes hop-by-hop headers (keeping an upgrade), and adds the forwarding
/// headers and a request id.
pub fn prepare_headers(headers: &mut HeaderMap, peer: SocketAddr, upgrade: Option<&HeaderValue>) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    remove_hop_by_hop(headers);
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade.clone());
    }
    let client_ip = peer.ip().to_string();
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(
            X_REQUEST_ID,
            HeaderValue::from_bytes(&request_id()).expect("hex digits are a valid header value"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_are_added_and_hop_by_hop_ones_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        headers.insert("x-request-id", "abc".parse().unwrap());
        prepare_headers(&mut headers, "127.0.0.7:5000".parse().unwrap(), None);
        assert!(!headers.contains_key("x-secret"), "named in Connection");
        assert!(!headers.contains_key("keep-alive"));
        assert!(!headers.contains_key(header::CONNECTION));
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-request-id"], "abc", "an existing id is kept");

        let mut fresh = HeaderMap::new();
        prepare_headers(
            &mut fresh,
            "127.0.0.1:1".parse().unwrap(),
            Some(&"websocket".parse().unwrap()),
        );
        assert_eq!(fresh["x-request-id"].len(), 32);
        assert_eq!(fresh[header::UPGRADE], "websocket");
        assert_eq!(fresh[header::CONNECTION], "upgrade");
    }

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
