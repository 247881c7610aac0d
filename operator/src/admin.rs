//! The admin endpoint of the operator and the gateway: `/healthz`, `/readyz`
//! and `/metrics` (Prometheus text format).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// What the admin endpoint reports.
pub struct AdminState {
    /// Set once the process is ready (watches synced).
    pub ready: AtomicBool,
    /// What `/readyz` says when ready (for example "leading, watches synced").
    pub detail: std::sync::Mutex<&'static str>,
    /// Metrics to expose.
    pub registry: Registry,
}

impl AdminState {
    /// Not ready yet, with these metrics.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            detail: std::sync::Mutex::new("ready"),
            registry,
        })
    }

    /// Marks the process ready or not, with what `/readyz` should say.
    pub fn set_ready(&self, ready: bool, detail: &'static str) {
        *self.detail.lock().expect("detail lock") = detail;
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// Binds the admin endpoint; serve it with [`serve`].
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer<B>(state: &AdminState, request: &Request<B>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if state.ready.load(Ordering::SeqCst) => {
            let detail = *state.detail.lock().expect("detail lock");
            text(StatusCode::OK, format!("ok: {detail}\n"), "text/plain")
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: watches not synced yet\n".into(),
            "text/plain",
        ),
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n".into(),
                    "text/plain",
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}
