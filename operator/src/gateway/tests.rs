//! The gateway's engine in-process on loopback, between a scripted client
//! and a scripted upstream, each test asserting what both sides saw byte for
//! byte. Deadlines run on tokio's paused clock: time moves only when every
//! task waits, so a test of a 60 s timeout takes no time and cannot be late.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use super::forwarding::Cidr;
use super::metrics::GatewayMetrics;
use super::state::{Gateway, Settings, WorkloadLoad};
use super::table::{RoutingTable, WorkloadKey};
use crate::api::HybridApp;

const LONG: Duration = Duration::from_secs(3600);

// This module runs twice (see `gateway/mod.rs`): as `tests`, the harness's
// requests come in on the main listener; as `tests_via_listener`, on a
// Gateway API listener that serves the same routes, so every held-request,
// limit and framing test also holds for requests through a Gateway.

/// The Gateway API listener of the second run.
const LISTENER: &str = "127.0.10.1:80";

fn via_listener() -> bool {
    module_path!().ends_with("tests_via_listener")
}

/// Where the harness's connections come in.
fn entry() -> super::lifecycle::Entry {
    if via_listener() {
        super::lifecycle::Entry::Listener(LISTENER.parse().unwrap())
    } else {
        super::lifecycle::Entry::Routes
    }
}

/// `table`, its routes also on the listener in the second run.
fn served(table: RoutingTable) -> RoutingTable {
    if via_listener() {
        table.also_on_listener(LISTENER.parse().unwrap())
    } else {
        table
    }
}

fn key(workload: &str) -> WorkloadKey {
    WorkloadKey {
        namespace: "ns".into(),
        app: "shop".into(),
        workload: workload.into(),
    }
}

/// App `shop` with `workloads` (name, mode) and one route to each
/// (`/<name>`), and the last workload also at `/`.
fn app(workloads: &[(&str, &str)], request_timeout: &str) -> HybridApp {
    let specs: Vec<_> = workloads
        .iter()
        .map(|(name, mode)| {
            json!({"name": name, "mode": mode, "port": 8080, "requestTimeout": request_timeout,
                   "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}})
        })
        .collect();
    let mut routes: Vec<_> = workloads
        .iter()
        .map(|(name, _)| {
            json!({"name": format!("to-{name}"), "match": {"pathPrefix": format!("/{name}")},
                   "backends": [{"workload": name}]})
        })
        .collect();
    let last = workloads.last().expect("a workload").0;
    routes.push(
        json!({"name": "root", "match": {"pathPrefix": "/"}, "backends": [{"workload": last}]}),
    );
    let mut app: HybridApp = serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "shop", "namespace": "ns"},
        "spec": {"workloads": specs, "routes": routes},
    }))
    .expect("a HybridApp");
    app.metadata.namespace = Some("ns".into());
    app
}

/// A gateway in this runtime in front of one scripted upstream.
struct Harness {
    gateway: Arc<Gateway>,
    addr: SocketAddr,
    upstream: TcpListener,
    tables: watch::Sender<Arc<RoutingTable>>,
    _stop: watch::Sender<bool>,
}

impl Harness {
    /// One AlwaysOn workload `web` served by the scripted upstream.
    async fn start(settings: Settings) -> Self {
        Self::with(settings, &[("web", "AlwaysOn")], "30s", true).await
    }

    /// One Function `fn` with no ready endpoint (the upstream is its pod
    /// to be, see [`Harness::make_ready`]).
    async fn cold(settings: Settings, request_timeout: &str) -> Self {
        Self::with(settings, &[("fn", "Function")], request_timeout, false).await
    }

    async fn with(
        settings: Settings,
        workloads: &[(&str, &str)],
        request_timeout: &str,
        ready: bool,
    ) -> Self {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoints = if ready {
            workloads
                .iter()
                .map(|(w, _)| (key(w), vec![upstream.local_addr().unwrap()]))
                .collect()
        } else {
            HashMap::new()
        };
        let table = served(RoutingTable::build(
            &[app(workloads, request_timeout)],
            &endpoints,
        ));
        let (tables, receiver) = watch::channel(Arc::new(table));
        let metrics = GatewayMetrics::register(&mut Registry::default());
        let gateway = Arc::new(Gateway::new(settings, receiver, metrics, "test".into()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let (serving, pool) = (gateway.clone(), Arc::new(super::h1::pool::Pool::default()));
        // Connections are served in this runtime (the real acceptor hands
        // them to threads of their own, whose clocks a test cannot pause).
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let (gateway, pool, stop) = (serving.clone(), pool.clone(), stop.clone());
                tokio::spawn(super::connection(
                    gateway,
                    pool,
                    stream,
                    peer,
                    entry(),
                    stop,
                ));
            }
        });
        Harness {
            gateway,
            addr,
            upstream,
            tables,
            _stop: stop_tx,
        }
    }

    /// Gives the cold workload the upstream as its ready endpoint.
    fn make_ready(&self, workloads: &[(&str, &str)], request_timeout: &str) {
        let endpoints = workloads
            .iter()
            .map(|(w, _)| (key(w), vec![self.upstream.local_addr().unwrap()]))
            .collect();
        self.tables
            .send_replace(Arc::new(served(RoutingTable::build(
                &[app(workloads, request_timeout)],
                &endpoints,
            ))));
    }

    async fn client(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// The next connection to the upstream.
    async fn accept(&self) -> TcpStream {
        tokio::time::timeout(LONG, self.upstream.accept())
            .await
            .expect("the gateway connects to the upstream")
            .unwrap()
            .0
    }

    /// Whether the gateway opens no connection to the upstream for a while.
    async fn no_upstream_connection(&self) -> bool {
        tokio::time::timeout(Duration::from_millis(200), self.upstream.accept())
            .await
            .is_err()
    }

    fn load(&self, workload: &str) -> Arc<WorkloadLoad> {
        self.gateway.load_of(&key(workload))
    }
}

/// Reads from `stream` until the peer closes (or 1 hour of paused time).
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(LONG, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => all.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// Reads one HTTP/1 message (head, and a body by `content-length` or
/// chunked up to its last chunk and empty trailer line) from `stream`.
async fn read_message(stream: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    loop {
        if let Some(end) = message_end(buf) {
            let message = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            return message;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(LONG, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => {
                let partial = String::from_utf8_lossy(buf).into_owned();
                panic!("closed before a whole message: {partial:?}");
            }
        }
    }
}

fn message_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let bodiless = head.starts_with("http/1.1 1")
        || head.starts_with("http/1.1 204")
        || head.starts_with("http/1.1 304");
    if bodiless {
        return Some(head_end);
    }
    if head.contains("transfer-encoding: chunked") {
        let rest = &buf[head_end..];
        return rest
            .windows(5)
            .position(|w| w == b"0\r\n\r\n")
            .filter(|p| *p == 0 || rest[p - 2..*p] == *b"\r\n")
            .map(|p| head_end + p + 5);
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
    (buf.len() >= head_end + length).then_some(head_end + length)
}

/// Sends `request` on a new connection; the upstream reads one request and
/// answers `response`. Returns what the upstream saw and what the client
/// got until the gateway closed the connection.
async fn exchange(harness: &Harness, request: &[u8], response: &[u8]) -> (String, String) {
    let mut client = harness.client().await;
    client.write_all(request).await.unwrap();
    let mut upstream = harness.accept().await;
    let mut buf = Vec::new();
    let seen = read_message(&mut upstream, &mut buf).await;
    upstream.write_all(response).await.unwrap();
    let got = read_to_close(&mut client).await;
    (seen, got)
}

fn settings() -> Settings {
    Settings::default()
}

#[tokio::test(start_paused = true)]
async fn chunk_extensions_never_reach_the_upstream_and_bad_chunk_lines_are_refused() {
    let harness = Harness::start(settings()).await;
    let (seen, got) = exchange(
        &harness,
        b"POST /web HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5;name=value;flag\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    assert!(
        seen.ends_with("transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        "{seen:?}"
    );
    assert!(
        got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\nok"),
        "{got:?}"
    );

    for line in ["5;a\rb", "5 xyz", "5;\0", "5 ", "-1", "5;a=\"x"] {
        let mut client = harness.client().await;
        let request = format!(
            "POST /web HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{line}\r\nhello\r\n0\r\n\r\n"
        );
        client.write_all(request.as_bytes()).await.unwrap();
        let got = read_to_close(&mut client).await;
        assert!(
            got.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{line:?}: {got:?}"
        );
        assert!(got.contains("x-tandem-error: client\r\n"), "{got:?}");
        // The upstream may have been connected to, but it got no byte.
        if let Ok(Ok((mut upstream, _))) =
            tokio::time::timeout(Duration::from_millis(100), harness.upstream.accept()).await
        {
            assert_eq!(
                read_to_close(&mut upstream).await,
                "",
                "{line:?} reached the upstream"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn trailers_are_dropped_and_a_trailer_that_is_not_a_field_is_refused() {
    let harness = Harness::start(settings()).await;
    let (seen, _) = exchange(
        &harness,
        b"POST /web HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          3\r\nabc\r\n0\r\nContent-Length: 99\r\nTransfer-Encoding: gzip\r\nHost: evil\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert!(seen.ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{seen:?}");
    assert!(
        !seen.contains("evil")
            && !seen.contains("6.6.6.6")
            && !seen.to_ascii_lowercase().contains("content-length: 99"),
        "{seen:?}"
    );

    let mut client = harness.client().await;
    client
        .write_all(
            b"POST /web HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\nGET /admin HTTP/1.1\r\n\r\n",
        )
        .await
        .unwrap();
    // The whole body arrived at once and failed before anything was sent:
    // the upstream got not one byte.
    let mut upstream = harness.accept().await;
    assert_eq!(read_to_close(&mut upstream).await, "");
    let got = read_to_close(&mut client).await;
    assert!(got.starts_with("HTTP/1.1 400 "), "{got:?}");
    assert!(got.contains("invalid trailer field"), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn host_must_come_once_and_valid_and_connection_cannot_strip_what_the_gateway_writes() {
    let harness = Harness::start(settings()).await;
    for request in [
        &b"GET /web HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET /web HTTP/1.1\r\nHost: \xff\xfe\r\nHost: shop\r\nConnection: close\r\n\r\n",
        b"GET /web HTTP/1.1\r\nHost: a\r\nhost: a\r\nConnection: close\r\n\r\n",
        b"GET /web HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
    ] {
        let mut client = harness.client().await;
        client.write_all(request).await.unwrap();
        let got = read_to_close(&mut client).await;
        assert!(
            got.starts_with("HTTP/1.1 400 "),
            "{:?}: {got:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert!(
        harness.no_upstream_connection().await,
        "a refused request reached the upstream"
    );

    let (seen, _) = exchange(
        &harness,
        b"GET /web HTTP/1.1\r\nHost: shop\r\nX-Request-Id: mine\r\nX-Forwarded-Proto: https\r\n\
          Connection: close, Host, X-Request-Id, X-Forwarded-Proto, X-Forwarded-For\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    )
    .await;
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "GET /web HTTP/1.1");
    assert_eq!(lines[1], "host: shop");
    assert_eq!(seen.matches("x-request-id: ").count(), 1, "{seen:?}");
    assert!(
        !seen.contains("mine") && !seen.contains("https") && !seen.contains("6.6.6.6"),
        "{seen:?}"
    );
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\r\n"), "{seen:?}");
    assert!(seen.contains("x-forwarded-proto: http\r\n"), "{seen:?}");
    assert!(
        !seen.to_ascii_lowercase().contains("connection"),
        "{seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn forwarding_headers_are_believed_only_from_trusted_clients() {
    let forged = b"GET /web HTTP/1.1\r\nHost: shop\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6;proto=https\r\n\
                   X-Forwarded-Host: evil\r\nX-Forwarded-Port: 443\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\n\
                   Connection: close\r\n\r\n";
    let untrusted = Harness::start(settings()).await;
    let (seen, _) = exchange(&untrusted, forged, b"HTTP/1.1 204 No Content\r\n\r\n").await;
    let mut after_host: Vec<&str> = seen.lines().skip(2).filter(|l| !l.is_empty()).collect();
    after_host.retain(|l| !l.starts_with("x-request-id: "));
    assert_eq!(
        after_host,
        [
            "x-forwarded-for: 6.6.6.6, 127.0.0.1",
            "x-forwarded-proto: http"
        ],
        "{seen:?}"
    );

    let trusted = Harness::start(Settings {
        trusted: vec!["127.0.0.0/8".parse::<Cidr>().unwrap()],
        ..settings()
    })
    .await;
    let (seen, _) = exchange(&trusted, forged, b"HTTP/1.1 204 No Content\r\n\r\n").await;
    for kept in [
        "x-forwarded-proto: https\r\n",
        "Forwarded: for=6.6.6.6;proto=https\r\n",
        "X-Forwarded-Host: evil\r\n",
        "X-Real-IP: 6.6.6.6\r\n",
        "x-forwarded-for: 6.6.6.6, 127.0.0.1\r\n",
    ] {
        assert!(seen.contains(kept), "{kept:?} missing: {seen:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn h2c_is_never_offered_to_a_backend_and_a_switch_nobody_asked_for_is_502() {
    let harness = Harness::start(settings()).await;
    let (seen, got) = exchange(
        &harness,
        b"GET /web HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let lower = seen.to_ascii_lowercase();
    assert!(
        !lower.contains("upgrade") && !lower.contains("http2-settings"),
        "{seen:?}"
    );
    assert!(got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{got:?}");
    assert!(got.contains("switched protocols unasked"), "{got:?}");
    assert!(!got.contains("101 Switching"), "{got:?}");

    // A websocket handshake whose 101 names another protocol: 502 too.
    let (seen, got) = exchange(
        &harness,
        b"GET /web HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    assert!(
        seen.contains("connection: upgrade\r\nupgrade: websocket\r\n"),
        "{seen:?}"
    );
    assert!(got.starts_with("HTTP/1.1 502 "), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn responses_with_a_bad_status_or_length_get_502_and_the_connection_stays_in_step() {
    let harness = Harness::start(settings()).await;
    for answer in [
        &b"HTTP/1.1 099 Low\r\ncontent-length: 0\r\n\r\n"[..],
        b"HTTP/1.1 600 High\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ] {
        let mut client = harness.client().await;
        // Two pipelined requests: the first gets the 502, the second its own
        // answer, in order.
        client
            .write_all(b"GET /web/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /web/2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut upstream = harness.accept().await;
        let mut buf = Vec::new();
        let first = read_message(&mut upstream, &mut buf).await;
        assert!(first.starts_with("GET /web/1 "), "{first:?}");
        upstream.write_all(answer).await.unwrap();
        // The bad connection is not used again: the second request comes
        // on a new one.
        let mut second_upstream = harness.accept().await;
        let second = read_message(&mut second_upstream, &mut Vec::new()).await;
        assert!(second.starts_with("GET /web/2 "), "{second:?}");
        second_upstream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond")
            .await
            .unwrap();
        let got = read_to_close(&mut client).await;
        assert!(
            got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
            "{:?}: {got:?}",
            String::from_utf8_lossy(answer)
        );
        assert!(
            got.ends_with(
                "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsecond"
            ),
            "{got:?}"
        );
        assert_eq!(got.matches("HTTP/1.1 ").count(), 2, "{got:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn connection_cannot_unframe_a_response_and_such_a_connection_is_not_kept() {
    let harness = Harness::start(settings()).await;
    let mut client = harness.client().await;
    client
        .write_all(b"GET /web/1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut upstream = harness.accept().await;
    read_message(&mut upstream, &mut Vec::new()).await;
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let got = read_message(&mut client, &mut buf).await;
    assert_eq!(got, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    // The client connection is still in step; the odd upstream connection
    // was dropped, so the next request opens a new one.
    client
        .write_all(b"GET /web/2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_to_close(&mut upstream).await,
        "",
        "the odd connection was closed"
    );
    let mut next = harness.accept().await;
    read_message(&mut next, &mut Vec::new()).await;
    next.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n2")
        .await
        .unwrap();
    assert!(read_to_close(&mut client).await.ends_with("\r\n\r\n2"));
}

#[tokio::test(start_paused = true)]
async fn informational_responses_are_parsed_and_written_anew_and_trailers_of_responses_dropped() {
    let harness = Harness::start(settings()).await;
    let (_, got) = exchange(
        &harness,
        b"GET /web HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\nLink: </a.css>; rel=preload\nConnection: x-hint\nX-Hint: 1\n\n\
          HTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n0\r\nX-Checksum: 1\r\nSet-Cookie: late=1\r\n\r\n",
    )
    .await;
    assert_eq!(
        got,
        "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
         HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n4\r\nwiki\r\n0\r\n\r\n"
    );

    // An HTTP/1.0 client gets no interim response and the data only.
    let (_, got) = exchange(
        &harness,
        b"GET /web HTTP/1.0\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(got, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nwiki");
}

#[tokio::test(start_paused = true)]
async fn a_dripping_response_body_is_cut_after_the_idle_timeout_and_frees_its_counters() {
    let idle = Duration::from_secs(20);
    let harness = Harness::start(Settings {
        idle_timeout: idle,
        ..settings()
    })
    .await;
    let mut client = harness.client().await;
    client
        .write_all(b"GET /web HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut upstream = harness.accept().await;
    read_message(&mut upstream, &mut Vec::new()).await;
    let started = Instant::now();
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
        .await
        .unwrap();
    // Progress within the idle timeout keeps the exchange going...
    tokio::time::sleep(idle / 2).await;
    upstream.write_all(b"cd").await.unwrap();
    assert_eq!(harness.load("web").in_flight.load(Ordering::Relaxed), 1);
    // ...silence for longer does not.
    let got = read_to_close(&mut client).await;
    let cut_at = started.elapsed();
    assert_eq!(got, "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcd");
    assert!(
        cut_at >= idle / 2 + idle && cut_at < idle / 2 + idle + Duration::from_secs(1),
        "{cut_at:?}"
    );
    assert_eq!(
        read_to_close(&mut upstream).await,
        "",
        "the upstream connection is closed too"
    );
    assert_eq!(harness.load("web").in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_close_delimited_body_that_never_ends_is_cut_after_the_idle_timeout() {
    let idle = Duration::from_secs(30);
    let harness = Harness::start(Settings {
        idle_timeout: idle,
        ..settings()
    })
    .await;
    let mut client = harness.client().await;
    client
        .write_all(b"GET /web HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut upstream = harness.accept().await;
    read_message(&mut upstream, &mut Vec::new()).await;
    let started = Instant::now();
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\n\r\nforever")
        .await
        .unwrap();
    let got = read_to_close(&mut client).await;
    // Chunked to the client; the last chunk never comes, so the client can
    // tell the body is incomplete.
    assert_eq!(
        got,
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\nforever\r\n"
    );
    let cut_at = started.elapsed();
    assert!(
        cut_at >= idle && cut_at < idle + Duration::from_secs(1),
        "{cut_at:?}"
    );
    assert_eq!(harness.load("web").in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_a_large_response_is_cut_and_the_upstream_released() {
    let idle = Duration::from_secs(15);
    let harness = Harness::start(Settings {
        idle_timeout: idle,
        ..settings()
    })
    .await;
    let mut client = harness.client().await;
    client
        .write_all(b"GET /web HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut upstream = harness.accept().await;
    read_message(&mut upstream, &mut Vec::new()).await;
    let size = 64 << 20;
    let writer = tokio::spawn(async move {
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
        upstream.write_all(head.as_bytes()).await?;
        upstream.write_all(&vec![b'x'; size]).await
    });
    let started = Instant::now();
    // The client reads nothing. The gateway fills the socket buffers, then
    // gives up on it after the idle timeout and closes the upstream too.
    let written = tokio::time::timeout(LONG, writer).await.unwrap().unwrap();
    assert!(
        written.is_err(),
        "the upstream could write all 64 MiB to a client that reads nothing"
    );
    let gave_up = started.elapsed();
    assert!(
        gave_up >= idle && gave_up < idle + Duration::from_secs(1),
        "{gave_up:?}"
    );
    assert_eq!(harness.load("web").in_flight.load(Ordering::Relaxed), 0);
    let got = read_to_close(&mut client).await;
    assert!(
        got.len() < size,
        "the client got what was buffered, then the close"
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_sends_no_head_gets_504_after_the_response_head_timeout() {
    let head_timeout = Duration::from_secs(5);
    let harness = Harness::start(Settings {
        response_head_timeout: head_timeout,
        ..settings()
    })
    .await;
    let mut client = harness.client().await;
    client
        .write_all(b"GET /web HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut upstream = harness.accept().await;
    read_message(&mut upstream, &mut Vec::new()).await;
    let sent = Instant::now();
    let got = read_to_close(&mut client).await;
    let answered = sent.elapsed();
    assert!(
        got.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"),
        "{got:?}"
    );
    assert!(
        got.contains("x-tandem-error: upstream\r\n") && got.contains("no response head within 5s"),
        "{got:?}"
    );
    assert!(
        answered >= head_timeout && answered < head_timeout + Duration::from_secs(1),
        "{answered:?}"
    );
    assert_eq!(read_to_close(&mut upstream).await, "");

    // The workload's requestTimeout (30 s here) bounds it too, whichever is first.
    let harness = Harness::start(Settings {
        response_head_timeout: Duration::from_secs(600),
        ..settings()
    })
    .await;
    let mut client = harness.client().await;
    let started = Instant::now();
    client
        .write_all(b"GET /web HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let _upstream = harness.accept().await;
    let got = read_to_close(&mut client).await;
    assert!(got.starts_with("HTTP/1.1 504 "), "{got:?}");
    let answered = started.elapsed();
    assert!(
        answered >= Duration::from_secs(30) && answered < Duration::from_secs(31),
        "{answered:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_body_that_stalls_gets_408() {
    let idle = Duration::from_secs(10);
    let harness = Harness::start(Settings {
        idle_timeout: idle,
        ..settings()
    })
    .await;
    let mut client = harness.client().await;
    client
        .write_all(b"POST /web HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    let started = Instant::now();
    let mut upstream = harness.accept().await;
    let got = read_to_close(&mut client).await;
    assert!(
        got.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{got:?}"
    );
    assert!(got.contains("connection: close\r\n"), "{got:?}");
    let answered = started.elapsed();
    assert!(
        answered >= idle && answered < idle + Duration::from_secs(2),
        "{answered:?}"
    );
    // The upstream got the head and the two bytes, then a close: never a
    // complete request.
    let partial = read_to_close(&mut upstream).await;
    assert!(
        partial.ends_with("content-length: 10\r\n\r\nab"),
        "{partial:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_heads_idle_keep_alive_and_silent_new_connections_are_closed_on_time() {
    let harness = Harness::start(Settings {
        header_read_timeout: Duration::from_secs(10),
        keep_alive_timeout: Duration::from_secs(75),
        ..settings()
    })
    .await;
    // A new connection that sends nothing.
    let mut silent = harness.client().await;
    let started = Instant::now();
    assert_eq!(read_to_close(&mut silent).await, "");
    let closed = started.elapsed();
    assert!(
        closed >= Duration::from_secs(10) && closed < Duration::from_secs(11),
        "{closed:?}"
    );

    // A head that never ends.
    let mut slow = harness.client().await;
    slow.write_all(b"GET /web HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(read_to_close(&mut slow).await, "");
    let closed = started.elapsed();
    assert!(
        closed >= Duration::from_secs(10) && closed < Duration::from_secs(11),
        "{closed:?}"
    );

    // An idle keep-alive connection, after one request.
    let mut kept = harness.client().await;
    kept.write_all(b"GET /web HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut upstream = harness.accept().await;
    read_message(&mut upstream, &mut Vec::new()).await;
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_message(&mut kept, &mut buf).await;
    let started = Instant::now();
    assert_eq!(read_to_close(&mut kept).await, "");
    let closed = started.elapsed();
    assert!(
        closed >= Duration::from_secs(75) && closed < Duration::from_secs(76),
        "{closed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_websocket_tunnel_is_closed_after_the_tunnel_idle_timeout() {
    let idle = Duration::from_secs(300);
    let harness = Harness::start(Settings {
        tunnel_idle_timeout: idle,
        ..settings()
    })
    .await;
    let mut client = harness.client().await;
    client
        .write_all(
            b"GET /web HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut upstream = harness.accept().await;
    read_message(&mut upstream, &mut Vec::new()).await;
    upstream
        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = read_message(&mut client, &mut buf).await;
    assert_eq!(
        head,
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    );
    // Bytes go both ways...
    client.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    upstream.read_exact(&mut four).await.unwrap();
    assert_eq!(&four, b"ping");
    let started = Instant::now();
    // ...until both sides are silent for the tunnel's idle timeout.
    let rest = read_to_close(&mut client).await;
    assert_eq!(format!("{}{rest}", String::from_utf8_lossy(&buf)), "hi");
    let closed = started.elapsed();
    assert!(
        closed >= idle && closed < idle + Duration::from_secs(1),
        "{closed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_held_request_waits_until_its_deadline_and_is_released_when_an_endpoint_is_ready() {
    let harness = Harness::cold(settings(), "20s").await;
    let mut client = harness.client().await;
    let started = Instant::now();
    client
        .write_all(b"GET /fn HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut client).await;
    assert!(got.starts_with("HTTP/1.1 504 "), "{got:?}");
    assert!(got.contains("did not become ready within 20s"), "{got:?}");
    let answered = started.elapsed();
    assert!(
        answered >= Duration::from_secs(20) && answered < Duration::from_secs(21),
        "{answered:?}"
    );
    assert_eq!(harness.load("fn").held.load(Ordering::Relaxed), 0);

    let mut client = harness.client().await;
    client
        .write_all(
            b"POST /fn HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(harness.load("fn").held.load(Ordering::Relaxed), 1);
    harness.make_ready(&[("fn", "Function")], "20s");
    let (seen, got) = {
        let mut upstream = harness.accept().await;
        let seen = read_message(&mut upstream, &mut Vec::new()).await;
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nwarm")
            .await
            .unwrap();
        (seen, read_to_close(&mut client).await)
    };
    assert!(seen.ends_with("content-length: 5\r\n\r\nhello"), "{seen:?}");
    assert!(got.ends_with("\r\n\r\nwarm"), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn an_oversized_held_body_gets_413_before_any_demand_queue_place_or_cold_start() {
    let harness = Harness::cold(
        Settings {
            max_held_body_bytes: 100,
            ..settings()
        },
        "30s",
    )
    .await;
    let demand = harness.gateway.demand.notified();
    let mut client = harness.client().await;
    client
        .write_all(b"POST /fn HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut client).await;
    assert!(
        got.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{got:?}"
    );
    let load = harness.load("fn");
    assert_eq!(
        load.requests.load(Ordering::Relaxed),
        0,
        "not counted for the autoscaler"
    );
    assert_eq!(load.metrics.cold_starts.get(), 0, "not a cold start");
    assert_eq!(load.held.load(Ordering::Relaxed), 0);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), demand)
            .await
            .is_err(),
        "no demand was signalled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_answered_503_and_the_others_served() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoints = HashMap::from([(key("web"), vec![upstream.local_addr().unwrap()])]);
    let table = RoutingTable::build(&[app(&[("web", "AlwaysOn")], "30s")], &endpoints);
    let (_tables, receiver) = watch::channel(Arc::new(table));
    let metrics = GatewayMetrics::register(&mut Registry::default());
    let settings = Settings {
        max_connections: 2,
        ..settings()
    };
    let gateway = Arc::new(Gateway::new(settings, receiver, metrics, "test".into()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(super::serve(
        listener,
        gateway.clone(),
        Duration::from_secs(1),
        async {
            let _ = stopped.await;
        },
    ));
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(TcpStream::connect(addr).await.unwrap());
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gateway.metrics.connections().get() < 2 {
        assert!(
            std::time::Instant::now() < until,
            "the two connections were not taken"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /web HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut third).await;
    assert!(
        got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{got:?}"
    );
    assert!(
        got.contains("retry-after: 1\r\n") && got.contains("too many connections"),
        "{got:?}"
    );

    // The connections within the cap are served.
    open[0]
        .write_all(b"GET /web HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (mut backend, _) = upstream.accept().await.unwrap();
    read_message(&mut backend, &mut Vec::new()).await;
    backend
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
    assert!(read_to_close(&mut open[0]).await.ends_with("\r\n\r\nok"));
    let _ = stop.send(());
    drop(open);
    serving.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn churned_endpoints_and_workloads_leave_no_load_entry_or_metric_series_behind() {
    let mut registry = Registry::default();
    let metrics = GatewayMetrics::register(&mut registry);
    let table = |round: usize, endpoints: usize| {
        let workloads: Vec<(String, &str)> = (0..20)
            .map(|w| (format!("w{round}-{w}"), "AlwaysOn"))
            .collect();
        let names: Vec<(&str, &str)> = workloads.iter().map(|(n, m)| (n.as_str(), *m)).collect();
        let endpoints: HashMap<WorkloadKey, Vec<SocketAddr>> = names
            .iter()
            .enumerate()
            .map(|(w, (name, _))| {
                let addresses = (0..endpoints)
                    .map(|e| SocketAddr::from(([10, round as u8, w as u8, e as u8], 8080)))
                    .collect();
                (key(name), addresses)
            })
            .collect();
        RoutingTable::build(&[app(&names, "30s")], &endpoints)
    };
    let (tables, receiver) = watch::channel(Arc::new(table(0, 5)));
    let gateway = Gateway::new(settings(), receiver, metrics, "test".into());
    let text = |registry: &Registry| {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    };
    let baseline_series = {
        // One round of traffic on the first table.
        for w in 0..20 {
            let load = gateway.load_of(&key(&format!("w0-{w}")));
            load.metrics
                .observe("root", http::StatusCode::OK, Duration::ZERO);
        }
        text(&registry)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .count()
    };
    // 2,000 endpoints (100 per round, 20 rounds) and 400 workloads pass
    // through the table, each picked and counted.
    for round in 1..=20 {
        let next = Arc::new(table(round, 5));
        for target in next.workloads() {
            for _ in 0..target.endpoints.len() {
                let picked = gateway.loads.pick(
                    &target.endpoints,
                    (fastrand::usize(..), fastrand::usize(..)),
                );
                drop(picked);
            }
            gateway.load_of(&target.key).metrics.observe(
                "root",
                http::StatusCode::BAD_GATEWAY,
                Duration::ZERO,
            );
        }
        tables.send_replace(next.clone());
        gateway.prune(&next);
        assert!(
            gateway.loads.len() <= 100,
            "round {round}: {} endpoint entries",
            gateway.loads.len()
        );
        assert_eq!(gateway.loads().len(), 20, "round {round}");
    }
    let after_series = text(&registry)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    assert!(
        after_series <= baseline_series + 20,
        "{after_series} series after the churn, {baseline_series} before"
    );
    // A workload with a request in flight is kept until it is idle.
    let busy = gateway.load_of(&key("w20-0"));
    busy.in_flight.fetch_add(1, Ordering::Relaxed);
    let empty = Arc::new(RoutingTable::default());
    gateway.prune(&empty);
    assert_eq!(gateway.loads().len(), 1, "only the busy workload is left");
    busy.in_flight.fetch_sub(1, Ordering::Relaxed);
    gateway.prune(&empty);
    assert!(gateway.loads().is_empty());
    assert!(gateway.loads.is_empty());
}

#[tokio::test]
async fn http2_requests_go_through_the_same_lifecycle_to_http1_upstreams() {
    // On the real clock: hyper's HTTP/2 client and server wake each other
    // in ways tokio's paused clock mistakes for idleness.
    use http_body_util::{BodyExt, Full};
    let harness = Harness::start(settings()).await;
    let stream = harness.client().await;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("http://shop/web/h2?x=1")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("x-forwarded-proto", "https")
        .body(Full::new(bytes::Bytes::from_static(b"hello")))
        .unwrap();
    let answer = tokio::spawn(async move { sender.send_request(request).await });
    let mut upstream = harness.accept().await;
    let seen = read_message(&mut upstream, &mut Vec::new()).await;
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n2\r\nh2\r\n0\r\nX-T: 1\r\n\r\n")
        .await
        .unwrap();
    let response = answer.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("connection").is_none());
    let body = response.into_body().collect().await.unwrap();
    assert!(body.trailers().is_none(), "trailers are not passed on");
    assert_eq!(&body.to_bytes()[..], b"h2");
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "POST /web/h2?x=1 HTTP/1.1", "{seen:?}");
    assert_eq!(lines[1], "host: shop", "{seen:?}");
    assert!(
        seen.contains("cookie: a=1; b=2\r\n"),
        "cookies joined for HTTP/1.1: {seen:?}"
    );
    assert!(
        seen.contains("x-forwarded-proto: http\r\n") && !seen.contains("https"),
        "{seen:?}"
    );
    assert!(seen.ends_with("content-length: 5\r\n\r\nhello"), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn an_http2_connection_without_streams_is_closed_after_the_keep_alive_timeout() {
    let harness = Harness::start(Settings {
        keep_alive_timeout: Duration::from_secs(75),
        ..settings()
    })
    .await;
    let mut client = harness.client().await;
    let started = Instant::now();
    client.write_all(super::HTTP2_PREFACE).await.unwrap();
    // An empty SETTINGS frame, then nothing but answers to pings.
    client
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(LONG, client.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                frames.extend_from_slice(&chunk[..n]);
                // Answer PING frames (type 6) so only idleness closes it.
                while let Some(ping) = find_ping(&frames) {
                    let mut pong = [0u8; 17];
                    pong[..9].copy_from_slice(&[0, 0, 8, 6, 1, 0, 0, 0, 0]);
                    pong[9..].copy_from_slice(&frames[ping + 9..ping + 17]);
                    frames.drain(..ping + 17);
                    client.write_all(&pong).await.unwrap();
                }
            }
        }
    }
    let closed = started.elapsed();
    assert!(
        closed >= Duration::from_secs(75) && closed < Duration::from_secs(76),
        "{closed:?}"
    );
    // A GOAWAY (type 7) told the client before the close.
    assert!(has_frame(&frames, 7), "no GOAWAY");
}

/// The offset of the first PING frame (not an ACK) in `frames`, if complete.
fn find_ping(frames: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at + 9 <= frames.len() {
        let len = (usize::from(frames[at]) << 16)
            | (usize::from(frames[at + 1]) << 8)
            | usize::from(frames[at + 2]);
        if at + 9 + len > frames.len() {
            return None;
        }
        if frames[at + 3] == 6 && frames[at + 4] & 1 == 0 {
            return Some(at);
        }
        at += 9 + len;
    }
    None
}

/// Whether `frames` hold a frame of `kind`.
fn has_frame(frames: &[u8], kind: u8) -> bool {
    let mut at = 0;
    while at + 9 <= frames.len() {
        let len = (usize::from(frames[at]) << 16)
            | (usize::from(frames[at + 1]) << 8)
            | usize::from(frames[at + 2]);
        if frames[at + 3] == kind {
            return true;
        }
        at += 9 + len;
    }
    false
}
