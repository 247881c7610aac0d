//! What the gateway records of a request besides its metrics: a request log
//! line for a sampled share of requests (`--request-log-sample`, off by
//! default), and, with trace export on, a span that continues the caller's
//! W3C trace (`traceparent`) and is passed on to the upstream in its place.
//!
//! With both off a request's [`Record`] is an empty box: nothing is
//! allocated, and the only cost is two flag checks.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::forwarding::Headers;
use super::lifecycle::ProxyError;
use super::table::{CompiledRoute, WorkloadTarget};

/// Length of a version 00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
const TRACEPARENT_LEN: usize = 55;

/// The gateway's recording settings and the log sampler's count.
#[derive(Debug, Default)]
pub struct Recording {
    log_share: f64,
    seen: AtomicU64,
    traces: bool,
}

/// How a client speaks to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2.
    Http2,
}

impl Protocol {
    fn version(self) -> &'static str {
        match self {
            Protocol::Http1 => "1.1",
            Protocol::Http2 => "2",
        }
    }
}

/// What a request says about itself, as it arrives.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// Method.
    pub method: &'a str,
    /// Host, as the client wrote it.
    pub host: Option<&'a str>,
    /// Path without the query (a query may hold secrets: never recorded).
    pub path: &'a str,
    /// The client's address.
    pub client: IpAddr,
    /// HTTP/1 or HTTP/2.
    pub protocol: Protocol,
    /// The route it takes, once resolved (names the span).
    pub route: Option<&'a str>,
}

impl Recording {
    /// Logs `log_share` of requests (0 to 1); with `traces`, makes a span
    /// per request.
    pub fn new(log_share: f64, traces: bool) -> Self {
        Self {
            log_share,
            seen: AtomicU64::new(0),
            traces,
        }
    }

    /// Whether the next request is logged: exactly `log_share` of them,
    /// evenly spread (a count, not a coin, so the share is exact and a
    /// test can rely on it).
    fn log_next(&self) -> bool {
        if self.log_share <= 0.0 {
            return false;
        }
        if self.log_share >= 1.0 {
            return true;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * self.log_share).floor() > (n * self.log_share).floor()
    }

    /// Starts the record of a request.
    pub fn begin(&self, arrival: &Arrival<'_>, headers: &(impl Headers + ?Sized)) -> Record {
        let log = self.log_next();
        if !log && !self.traces {
            return Record(None);
        }
        let span = if self.traces {
            request_span(arrival, headers)
        } else {
            tracing::Span::none()
        };
        let traceparent = (!span.is_none()).then(|| traceparent_of(&span)).flatten();
        Record(Some(Box::new(Recorded {
            log,
            line: Line {
                method: arrival.method.to_string(),
                host: arrival.host.map(str::to_string),
                path: arrival.path.to_string(),
                client: arrival.client,
                protocol: arrival.protocol,
            },
            span,
            traceparent,
        })))
    }

    /// Records a request refused before its head could be read (so with
    /// no method or path).
    pub fn unreadable(&self, client: IpAddr, protocol: Protocol, error: &ProxyError) {
        if self.log_next() {
            tracing::info!(
                target: "tandem::request",
                client = %client,
                protocol = protocol.version(),
                status = error.status.as_u16(),
                error = error.kind.as_str(),
                "request"
            );
        }
    }
}

/// The record of one request under way (empty when nothing is recorded).
#[derive(Debug, Default)]
pub struct Record(Option<Box<Recorded>>);

#[derive(Debug)]
struct Recorded {
    /// Whether the line is logged (else only the span is recorded).
    log: bool,
    line: Line,
    span: tracing::Span,
    traceparent: Option<[u8; TRACEPARENT_LEN]>,
}

#[derive(Debug)]
struct Line {
    method: String,
    host: Option<String>,
    path: String,
    client: IpAddr,
    protocol: Protocol,
}

/// How a request ended, for its record.
#[derive(Debug, Clone, Copy)]
pub struct Ending<'a> {
    /// The status answered.
    pub status: StatusCode,
    /// From its head's arrival to its last byte relayed.
    pub took: Duration,
    /// Its route and the workload picked, when it was routed.
    pub routed: Option<(&'a CompiledRoute, &'a WorkloadTarget)>,
    /// How long it was held for a cold start.
    pub cold_wait: Option<Duration>,
    /// Why it failed, if it did.
    pub error: Option<&'a ProxyError>,
    /// The request id sent upstream.
    pub request_id: Option<&'a [u8]>,
}

impl<'a> Ending<'a> {
    /// A request refused by the gateway before it was routed.
    pub fn refused(error: &'a ProxyError, took: Duration) -> Self {
        Ending {
            status: error.status,
            took,
            routed: None,
            cold_wait: None,
            error: Some(error),
            request_id: None,
        }
    }
}

impl Record {
    /// Whether anything is recorded of this request.
    pub fn on(&self) -> bool {
        self.0.is_some()
    }

    /// The span to run the request in (a disabled one when not traced).
    pub fn span(&self) -> tracing::Span {
        match &self.0 {
            Some(recorded) => recorded.span.clone(),
            None => tracing::Span::none(),
        }
    }

    /// The `traceparent` the upstream gets in place of the client's, when
    /// the request is traced.
    pub fn traceparent(&self) -> Option<&[u8]> {
        self.0.as_ref()?.traceparent.as_ref().map(|t| &t[..])
    }

    /// Ends the record: the span gets the outcome and ends, the log line
    /// is written.
    pub fn end(self, ending: &Ending<'_>) {
        let Some(recorded) = self.0 else {
            return;
        };
        let Recorded {
            log, line, span, ..
        } = *recorded;
        let status = ending.status.as_u16();
        let error = ending.error.map(|e| e.kind.as_str());
        let cold_wait_ms = ending.cold_wait.map(|w| w.as_secs_f64() * 1000.0);
        let request_id = ending
            .request_id
            .and_then(|id| std::str::from_utf8(id).ok());
        let app = ending
            .routed
            .map(|(route, _)| format!("{}/{}", route.namespace, route.app));
        if !span.is_none() {
            span.record("http.response.status_code", status);
            if let (Some((route, target)), Some(app)) = (ending.routed, &app) {
                span.record("tandem.route", route.name.as_str());
                span.record("tandem.app", app.as_str());
                span.record("tandem.workload", target.key.workload.as_str());
                span.record("tandem.mode", target.mode.as_str());
            }
            if let Some(ms) = cold_wait_ms {
                span.record("tandem.cold_wait_ms", ms);
            }
            if let Some(id) = request_id {
                span.record("tandem.request_id", id);
            }
            if let Some(kind) = error {
                span.record("error.type", kind);
            }
            // A server span is an error for 5xx only (OpenTelemetry's HTTP
            // conventions): a 4xx is the client's mistake.
            if ending.status.is_server_error() {
                span.record("otel.status_code", "error");
                if error.is_none() {
                    span.record("error.type", status);
                }
            }
        }
        if !log {
            return;
        }
        let trace_id =
            (!span.is_none()).then(|| span.context().span().span_context().trace_id().to_string());
        let (route, workload, mode) = match ending.routed {
            Some((route, target)) => (
                Some(route.name.as_str()),
                Some(target.key.workload.as_str()),
                Some(target.mode.as_str()),
            ),
            None => (None, None, None),
        };
        tracing::info!(
            target: "tandem::request",
            method = line.method,
            host = line.host,
            path = line.path,
            status,
            duration_ms = ending.took.as_secs_f64() * 1000.0,
            client = %line.client,
            protocol = line.protocol.version(),
            route,
            app,
            workload,
            mode,
            cold_wait_ms,
            request_id,
            error,
            trace_id,
            "request"
        );
        drop(span);
    }
}

/// The span of a request, a child of the caller's trace if its
/// `traceparent` is valid.
fn request_span(arrival: &Arrival<'_>, headers: &(impl Headers + ?Sized)) -> tracing::Span {
    // The span's name is fixed when it starts: "GET route".
    let name = match arrival.route {
        Some(route) => format!("{} {route}", arrival.method),
        None => arrival.method.to_string(),
    };
    let span = tracing::info_span!(
        "request",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = arrival.method,
        url.path = arrival.path,
        server.address = arrival.host.map(host_only),
        client.address = %arrival.client,
        network.protocol.version = arrival.protocol.version(),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        tandem.route = tracing::field::Empty,
        tandem.app = tracing::field::Empty,
        tandem.workload = tracing::field::Empty,
        tandem.mode = tracing::field::Empty,
        tandem.cold_wait_ms = tracing::field::Empty,
        tandem.request_id = tracing::field::Empty,
    );
    if span.is_none() {
        return span;
    }
    let carried = Carried::from_headers(headers);
    if carried.traceparent.is_some() {
        let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract_with_context(&opentelemetry::Context::new(), &carried);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// `host` without a port.
fn host_only(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// The `traceparent` naming `span` as the parent.
fn traceparent_of(span: &tracing::Span) -> Option<[u8; TRACEPARENT_LEN]> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return None;
    }
    let text = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    text.as_bytes().try_into().ok()
}

/// The trace context headers a client sent.
#[derive(Debug, Default)]
struct Carried {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Carried {
    fn from_headers(headers: &(impl Headers + ?Sized)) -> Self {
        let mut carried = Carried::default();
        let mut traceparents = 0;
        headers.each(&mut |name, value| {
            if name.eq_ignore_ascii_case("traceparent") {
                traceparents += 1;
                carried.traceparent = std::str::from_utf8(value).ok().map(str::to_string);
            } else if name.eq_ignore_ascii_case("tracestate") && carried.tracestate.is_none() {
                carried.tracestate = std::str::from_utf8(value).ok().map(str::to_string);
            }
        });
        // Two parents is no parent (W3C Trace Context: restart the trace).
        if traceparents > 1 {
            carried.traceparent = None;
        }
        carried
    }
}

impl Extractor for Carried {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_sample_is_exactly_its_share_evenly_spread() {
        for (share, requests, logged) in [
            (0.0, 1000, 0),
            (1.0, 1000, 1000),
            (0.25, 1000, 250),
            (0.01, 1000, 10),
            (0.3, 10, 3),
        ] {
            let recording = Recording::new(share, false);
            let picks: Vec<bool> = (0..requests).map(|_| recording.log_next()).collect();
            assert_eq!(
                picks.iter().filter(|p| **p).count(),
                logged,
                "share {share}"
            );
            if share > 0.0 && share < 1.0 {
                // No two picks closer than the share allows.
                let at: Vec<usize> = (0..requests).filter(|i| picks[*i]).collect();
                let least = (1.0 / share).floor() as usize;
                assert!(at.windows(2).all(|w| w[1] - w[0] >= least), "{at:?}");
            }
        }
    }

    #[test]
    fn with_nothing_on_a_record_is_empty() {
        let recording = Recording::new(0.0, false);
        let headers: Vec<httparse::Header<'_>> = Vec::new();
        let record = recording.begin(
            &Arrival {
                method: "GET",
                host: Some("shop"),
                path: "/",
                client: [127, 0, 0, 1].into(),
                protocol: Protocol::Http1,
                route: None,
            },
            &headers[..],
        );
        assert!(record.0.is_none());
        assert!(record.traceparent().is_none());
        assert!(record.span().is_none());
    }

    #[test]
    fn a_host_loses_its_port() {
        assert_eq!(host_only("shop.example:8080"), "shop.example");
        assert_eq!(host_only("shop.example"), "shop.example");
        assert_eq!(host_only("[::1]:80"), "::1");
        assert_eq!(host_only("[::1]"), "::1");
    }

    #[test]
    fn two_traceparents_are_none() {
        let headers = [
            httparse::Header {
                name: "traceparent",
                value: b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            },
            httparse::Header {
                name: "TraceParent",
                value: b"00-0af7651916cd43dd8448eb211c80319d-b7ad6b7169203331-01",
            },
            httparse::Header {
                name: "tracestate",
                value: b"vendor=1",
            },
        ];
        let carried = Carried::from_headers(&headers[..]);
        assert_eq!(carried.traceparent, None);
        assert_eq!(carried.tracestate.as_deref(), Some("vendor=1"));
        let one = Carried::from_headers(&headers[..1]);
        assert_eq!(
            one.get("traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
    }
}
