//! The echo backend: the default process of a test pod.
//!
//! It answers every request with its pod name, the path, the request id
//! and the `traceparent` it got,
//! and logs one line per request (`request id=... method=... path=...`) so a
//! test can check that each request reached a backend exactly once.
//!
//! Behaviour is controlled per pod by environment and per request by headers:
//! - `ECHO_STARTUP_DELAY_MS`: wait this long before listening (a slow start).
//! - `ECHO_FAIL_PERCENT`: answer this percent of requests (every one but
//!   `/healthz`, spread evenly: exactly P of every 100) with 500, a faulty
//!   release a pod template can set.
//! - `x-echo-delay-ms`: wait before answering.
//! - `x-echo-status`: answer with this status code.
//! - `x-echo-stream-chunks`: stream the answer as this many chunks, 10 ms apart.
//! - `x-echo-body: 1`: append the request body to the answer.
//! - `x-echo-size: N`: answer with exactly N bytes (up to 16 MiB) instead
//!   (benchmarks of large responses).
//! - `GET /ws` with a websocket upgrade: echo every message back.
//! - `GET /healthz`: `ok`, for readiness probes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Settings of one echo backend.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// Address to listen on (the pod IP and container port).
    pub listen: SocketAddr,
    /// Name reported in answers (the pod name).
    pub name: String,
    /// Delay before the listener opens.
    pub startup_delay: Duration,
    /// Percent of requests answered 500.
    pub fail_percent: u64,
}

impl EchoConfig {
    /// Reads `ECHO_LISTEN` (or `POD_IP` and `PORT`), `POD_NAME` and
    /// `ECHO_STARTUP_DELAY_MS` from the environment.
    pub fn from_env() -> Result<Self> {
        let listen = match std::env::var("ECHO_LISTEN") {
            Ok(addr) => addr.parse().context("ECHO_LISTEN")?,
            Err(_) => {
                let ip = std::env::var("POD_IP").unwrap_or_else(|_| "127.0.0.1".into());
                let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
                format!("{ip}:{port}").parse().context("POD_IP:PORT")?
            }
        };
        let startup_delay = std::env::var("ECHO_STARTUP_DELAY_MS")
            .ok()
            .map(|v| v.parse::<u64>().context("ECHO_STARTUP_DELAY_MS"))
            .transpose()?
            .unwrap_or(0);
        Ok(Self {
            listen,
            name: std::env::var("POD_NAME").unwrap_or_else(|_| "echo".into()),
            startup_delay: Duration::from_millis(startup_delay),
            fail_percent: std::env::var("ECHO_FAIL_PERCENT")
                .ok()
                .map(|v| v.parse::<u64>().context("ECHO_FAIL_PERCENT"))
                .transpose()?
                .unwrap_or(0)
                .min(100),
        })
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// Runs the echo backend until SIGTERM or SIGINT, then finishes in-flight
/// requests and returns.
pub async fn serve(config: EchoConfig) -> Result<()> {
    tokio::time::sleep(config.startup_delay).await;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    println!("listening on {} as {}", config.listen, config.name);
    let faults = Arc::new(Faults::new(config.fail_percent));
    serve_with(listener, config.name, faults, shutdown_signal()).await
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve_on(
    listener: TcpListener,
    name: String,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    serve_with(listener, name, Arc::new(Faults::new(0)), shutdown).await
}

/// Which requests fail: exactly `percent` of every 100, spread evenly.
struct Faults {
    percent: u64,
    seen: std::sync::atomic::AtomicU64,
}

impl Faults {
    fn new(percent: u64) -> Self {
        Self {
            percent,
            seen: Default::default(),
        }
    }

    fn next_fails(&self) -> bool {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (n + 1) * self.percent / 100 > n * self.percent / 100
    }
}

async fn serve_with(
    listener: TcpListener,
    name: String,
    faults: Arc<Faults>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let name: Arc<str> = name.into();
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut shutdown => break,
        };
        let (name, faults) = (name.clone(), faults.clone());
        let service = hyper::service::service_fn(move |request| {
            handle(name.clone(), faults.clone(), request)
        });
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn header<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle(
    name: Arc<str>,
    faults: Arc<Faults>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if request.uri().path() == "/healthz" {
        return Ok(text(StatusCode::OK, "ok\n".into()));
    }
    if faults.next_fails() {
        let mut failed = text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("pod={name} fault\n"),
        );
        failed.headers_mut().insert(
            "x-pod-name",
            name.parse().unwrap_or(http::HeaderValue::from_static("?")),
        );
        return Ok(failed);
    }
    if request.uri().path() == "/ws" && header(&request, "upgrade").is_some() {
        return Ok(websocket(request));
    }
    let id = header(&request, "x-request-id").unwrap_or("-").to_string();
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let delay = header(&request, "x-echo-delay-ms").and_then(|v| v.parse::<u64>().ok());
    let status = header(&request, "x-echo-status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::OK);
    let chunks = header(&request, "x-echo-stream-chunks").and_then(|v| v.parse::<usize>().ok());
    let echo_body = header(&request, "x-echo-body") == Some("1");
    let size = header(&request, "x-echo-size")
        .and_then(|v| v.parse::<usize>().ok())
        .map(|n| n.min(FILL_BYTES));
    let forwarded_for = header(&request, "x-forwarded-for")
        .unwrap_or("-")
        .to_string();
    let traceparent = header(&request, "traceparent").unwrap_or("-").to_string();

    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "body read failed\n".into())),
    };
    // One line per request that reached us, written before answering so a
    // test that got the answer also finds the line.
    let line = format!(
        "request id={id} method={method} path={path} body_bytes={}\n",
        body.len()
    );
    let _ = tokio::io::stdout().write_all(line.as_bytes()).await;
    let _ = tokio::io::stdout().flush().await;

    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut answer = format!(
        "pod={name} method={method} path={path} request-id={id} forwarded-for={forwarded_for} traceparent={traceparent} body-bytes={}\n",
        body.len()
    );
    if echo_body {
        answer.push_str(&String::from_utf8_lossy(&body));
    }
    let mut response = match (chunks, size) {
        (_, Some(n)) => sized(status, n),
        (Some(n), _) if n > 0 => stream(status, answer, n),
        _ => text(status, answer),
    };
    response.headers_mut().insert(
        "x-pod-name",
        name.parse().unwrap_or(http::HeaderValue::from_static("?")),
    );
    Ok(response)
}

/// Largest `x-echo-size`.
const FILL_BYTES: usize = 16 << 20;

/// A body of exactly `n` bytes, from one buffer made once.
fn sized(status: StatusCode, n: usize) -> Response<Body> {
    static FILL: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let fill = FILL.get_or_init(|| Bytes::from(vec![b'x'; FILL_BYTES]));
    Response::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .body(Full::new(fill.slice(..n)).boxed())
        .expect("valid response")
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("valid response")
}

fn stream(status: StatusCode, first: String, chunks: usize) -> Response<Body> {
    let frames = futures::stream::iter(0..chunks).then(move |i| {
        let first = first.clone();
        async move {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let data = if i == 0 {
                first
            } else {
                format!("chunk {i}\n")
            };
            Ok::<_, Infallible>(Frame::data(Bytes::from(data)))
        }
    });
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("valid response")
}

fn websocket(mut request: Request<Incoming>) -> Response<Body> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing Sec-WebSocket-Key\n".into(),
        );
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let (mut sink, mut source) = socket.split();
        while let Some(Ok(message)) = source.next().await {
            if message.is_close() {
                break;
            }
            if (message.is_text() || message.is_binary()) && sink.send(message).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()).boxed())
        .expect("valid response")
}
