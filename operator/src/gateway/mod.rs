//! `tandem gateway`: the data plane. Routes requests by host and path,
//! splits them by weight, balances across ready endpoints, and holds requests
//! for a Function with no ready endpoint while it starts.

pub mod balance;
pub mod demand;
pub mod h1;
pub mod metrics;
pub mod proxy;
pub mod source;
pub mod table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::admin::{self, AdminState};
use crate::operator::{parse_duration, shutdown_signal};
use crate::telemetry::LogFormat;
use table::RoutingTable;

/// Flags of `tandem gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Address that serves HTTP/1.1 and HTTP/2 (cleartext) traffic.
    #[arg(long, env = "TANDEM_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "TANDEM_ADMIN_ADDRESS", default_value = "0.0.0.0:9091")]
    pub admin_address: SocketAddr,

    /// Log format.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,

    /// Only serve HybridApps of these namespaces (default: all).
    #[arg(long = "namespace", env = "TANDEM_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Read apps and endpoints from this YAML file (reloaded when it
    /// changes) instead of the Kubernetes API.
    #[arg(long, env = "TANDEM_STATIC_CONFIG")]
    pub static_config: Option<PathBuf>,

    /// Autoscaler endpoints of the operator that receive demand and stats
    /// (`http://host:port`).
    #[arg(
        long = "operator-url",
        env = "TANDEM_OPERATOR_URLS",
        value_delimiter = ','
    )]
    pub operator_urls: Vec<String>,

    /// The operator's Service (`NAMESPACE/NAME`): demand and stats go to its
    /// ready endpoints on the port named `autoscaler`, found through its
    /// EndpointSlices (no DNS or cluster IP needed).
    #[arg(
        long,
        env = "TANDEM_OPERATOR_SERVICE",
        conflicts_with = "operator_urls"
    )]
    pub operator_service: Option<String>,

    /// This replica's name in demand and stats messages (default: POD_NAME).
    #[arg(long, env = "TANDEM_GATEWAY_ID")]
    pub id: Option<String>,

    /// Most requests held per cold workload; more get 503 with Retry-After.
    #[arg(long, env = "TANDEM_MAX_HELD_REQUESTS", default_value_t = 1000)]
    pub max_held_requests: usize,

    /// Largest request body a held request may carry (bytes); larger: 413.
    #[arg(long, env = "TANDEM_MAX_HELD_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_held_body_bytes: usize,

    /// Largest request body forwarded (bytes); larger: 413.
    #[arg(long, env = "TANDEM_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    pub max_body_bytes: usize,

    /// Largest request head (request line and headers, bytes); larger: 431.
    #[arg(long, env = "TANDEM_MAX_HEADER_BYTES", default_value_t = 64 << 10)]
    pub max_header_bytes: usize,

    /// Most request headers; more: 431.
    #[arg(long, env = "TANDEM_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,

    /// A client must send its whole request head within this time.
    #[arg(long, env = "TANDEM_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Connecting to an upstream endpoint must succeed within this time.
    #[arg(long, env = "TANDEM_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// On SIGTERM, in-flight requests get this long to finish.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// Runs the gateway until SIGTERM or SIGINT, then drains.
pub async fn run(args: GatewayArgs) -> Result<()> {
    let mut registry = Registry::default();
    let metrics = metrics::GatewayMetrics::register(&mut registry);
    let admin_state = AdminState::new(registry);
    let admin_listener = admin::bind(args.admin_address)
        .await
        .with_context(|| format!("bind the admin address {}", args.admin_address))?;
    tokio::spawn(admin::serve(admin_listener, admin_state.clone()));

    let (tables_tx, tables) = watch::channel(Arc::new(RoutingTable::default()));
    let mut client = None;
    if args.static_config.is_none() || args.operator_service.is_some() {
        client = Some(
            kube::Client::try_default()
                .await
                .context("connect to the Kubernetes API (KUBECONFIG or in-cluster)")?,
        );
    }
    let targets = match (&args.operator_service, &client) {
        (Some(service), Some(client)) => {
            let (namespace, name) = service.split_once('/').with_context(|| {
                format!("--operator-service {service}: expected NAMESPACE/NAME")
            })?;
            Some(demand::service_targets(client.clone(), namespace, name))
        }
        _ if !args.operator_urls.is_empty() => {
            Some(demand::fixed_targets(args.operator_urls.clone()))
        }
        _ => None,
    };
    let ready = admin_state.clone();
    let on_ready = move || ready.set_ready(true, "routing table built");
    match args.static_config.clone() {
        Some(path) => {
            tokio::spawn(source::run_static(path, tables_tx, on_ready));
        }
        None => {
            let client = client
                .clone()
                .expect("a client when there is no static config");
            tokio::spawn(source::run_kubernetes(
                client,
                args.namespaces.clone(),
                tables_tx,
                on_ready,
            ));
        }
    }

    let id = args
        .id
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| format!("gateway-{}", std::process::id()));
    let gateway = Arc::new(proxy::Gateway::new(&args, tables, metrics, id));
    tokio::spawn(demand::run(gateway.clone(), targets));

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    tracing::info!(address = %listener.local_addr()?, admin = %args.admin_address, "gateway listening");
    serve(listener, gateway, &args, shutdown_signal()).await;
    admin_state.set_ready(false, "shutting down");
    Ok(())
}

/// Serves on one thread per core, each with its own single-threaded runtime
/// and upstream connection pool (no cross-thread hand-offs per request, as in
/// nginx's worker model). One acceptor hands each new connection to the
/// thread with the fewest open connections, so the threads share the load
/// evenly (the kernel, waking whichever thread waits on a shared socket,
/// gave one thread two thirds of the connections in a benchmark). On
/// `shutdown` the threads stop taking connections, let in-flight requests
/// finish within the grace period, then close idle connections.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<proxy::Gateway>,
    args: &GatewayArgs,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (stop_tx, stop) = watch::channel(false);
    let mut workers = Vec::new();
    for index in 0..threads {
        let (connections, incoming) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            gateway: Arc::new(gateway.for_thread()),
            args: args.clone(),
            stop: stop.clone(),
            open: open.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("gateway-{index}"))
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("gateway worker runtime")
                    .block_on(worker.run(incoming));
            })
            .expect("start a gateway worker thread");
        workers.push((connections, open, thread));
    }
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let (connections, open, _) = workers
            .iter()
            .min_by_key(|(_, open, _)| open.load(Ordering::Relaxed))
            .expect("at least one worker");
        open.fetch_add(1, Ordering::Relaxed);
        if connections.send((stream, peer)).is_err() {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let threads: Vec<_> = workers.into_iter().map(|(_, _, thread)| thread).collect();
    let _ = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await;
}

/// One serving thread: takes the connections the acceptor hands it.
struct Worker {
    gateway: Arc<proxy::Gateway>,
    args: GatewayArgs,
    stop: watch::Receiver<bool>,
    /// Its open HTTP/1 connections (the acceptor adds, the worker removes).
    open: Arc<AtomicUsize>,
}

impl Worker {
    async fn run(self, mut incoming: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>) {
        let Worker {
            gateway,
            args,
            mut stop,
            open,
        } = self;
        let limits = Arc::new(h1::Limits {
            max_header_bytes: args.max_header_bytes,
            max_headers: args.max_headers,
            header_read_timeout: args.header_read_timeout,
        });
        let pool = Arc::new(h1::pool::Pool::default());
        let sweeper = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(h1::pool::IDLE_TIMEOUT / 4);
                loop {
                    every.tick().await;
                    pool.sweep();
                }
            })
        };
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(args.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        let graceful = GracefulShutdown::new();
        // The connections watch a stop signal of this thread: waiting on the
        // shared one would touch memory of the other threads per request.
        let (stop_here, stopped) = watch::channel(false);
        loop {
            let (stream, peer) = tokio::select! {
                next = incoming.recv() => match next {
                    Some(next) => next,
                    None => break,
                },
                _ = stop.wait_for(|stopped| *stopped) => break,
            };
            let Ok(stream) = TcpStream::from_std(stream) else {
                open.fetch_sub(1, Ordering::Relaxed);
                continue;
            };
            let (gateway, pool, limits, stop, open) = (
                gateway.clone(),
                pool.clone(),
                limits.clone(),
                stopped.clone(),
                open.clone(),
            );
            let (http2, watcher) = (http2.clone(), graceful.watcher());
            tokio::spawn(async move {
                let ended = h1::serve(&gateway, &pool, &limits, stream, peer, stop).await;
                open.fetch_sub(1, Ordering::Relaxed);
                if let h1::Ended::Http2(stream, read) = ended {
                    let service = hyper::service::service_fn(move |request| {
                        let gateway = gateway.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(gateway.handle(request, peer).await)
                        }
                    });
                    let connection =
                        http2.serve_connection(TokioIo::new(Rewind::new(read, stream)), service);
                    let _ = watcher.watch(connection).await;
                }
            });
        }
        let _ = stop_here.send(true);
        // Connections handed over but not yet taken close like those still
        // in the listen backlog.
        incoming.close();
        while incoming.try_recv().is_ok() {
            open.fetch_sub(1, Ordering::Relaxed);
        }
        sweeper.abort();
        tracing::info!(grace = ?args.shutdown_grace, "draining in-flight requests");
        let http1_drained = async {
            while open.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let drained = futures::future::join(graceful.shutdown(), http1_drained);
        if tokio::time::timeout(args.shutdown_grace, drained)
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing the remaining connections");
        }
    }
}

/// A connection whose first bytes were already read: they are read again
/// first.
struct Rewind {
    read: bytes::Bytes,
    stream: tokio::net::TcpStream,
}

impl Rewind {
    fn new(read: bytes::Bytes, stream: tokio::net::TcpStream) -> Self {
        Self { read, stream }
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
