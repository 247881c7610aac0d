//! `tandem gateway`: the data plane. Routes requests by host and path,
//! splits them by weight, balances across ready endpoints, and holds requests
//! for a Function with no ready endpoint while it starts.
//!
//! Layout: [`lifecycle`] is what every request goes through; [`h1`] (the
//! HTTP/1 wire format, the upstream pool, the HTTP/1 client adapter) and
//! [`h2`] (HTTP/2 clients through hyper) are adapters under it;
//! [`forwarding`] is the one policy for the headers the gateway owns. This
//! module accepts connections (at most `--max-connections`), finds each
//! one's protocol from its first bytes, and runs one serving thread per core.

pub mod balance;
pub mod demand;
pub mod filters;
pub mod forwarding;
pub mod h1;
pub mod h2;
pub mod lifecycle;
pub mod metrics;
pub mod record;
pub mod route_meter;
pub mod source;
pub mod state;
pub mod table;
#[cfg(test)]
mod tests;
// The same tests, every request through a Gateway API listener (loaded
// twice on purpose: the module reads its own path to know which run it is).
#[cfg(test)]
#[allow(clippy::duplicate_mod)]
#[path = "tests.rs"]
mod tests_via_listener;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::BytesMut;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::admin::{self, AdminState};
use crate::operator::{parse_duration, shutdown_signal};
use crate::telemetry::LogFormat;
use forwarding::Cidr;
pub use lifecycle::Entry;
use state::{Gateway, Settings};
use table::RoutingTable;

/// The first bytes an HTTP/2 client with prior knowledge sends.
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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

    /// Log one line per request (method, host, path, status, duration,
    /// route, workload, request id) for this share of requests, 0 to 1
    /// (`0.01`: one in a hundred, evenly spread). Off by default.
    #[arg(long, env = "TANDEM_REQUEST_LOG_SAMPLE", default_value_t = 0.0, value_parser = crate::telemetry::parse_ratio)]
    pub request_log_sample: f64,

    /// Trace export (a span per proxied request).
    #[command(flatten)]
    pub traces: crate::telemetry::TraceArgs,

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

    /// A client must send its whole request head within this time (and a
    /// new connection its first bytes).
    #[arg(long, env = "TANDEM_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// An idle client connection (HTTP/1 between requests, HTTP/2 without
    /// streams) is closed after this time.
    #[arg(long, env = "TANDEM_KEEP_ALIVE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub keep_alive_timeout: Duration,

    /// Longest wait for the next bytes of a request or response body, and
    /// for a client or upstream to take what the gateway writes; past it
    /// the exchange is cut (408 while the request body is read).
    #[arg(long, env = "TANDEM_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Longest wait for an upstream's response head once the request is
    /// sent (504); the workload's `requestTimeout`, which counts from the
    /// request's arrival and includes a cold start, applies as well.
    #[arg(long, env = "TANDEM_RESPONSE_HEAD_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub response_head_timeout: Duration,

    /// Connecting to an upstream endpoint must succeed within this time.
    #[arg(long, env = "TANDEM_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// An upgraded (websocket) connection silent both ways this long is
    /// closed.
    #[arg(long, env = "TANDEM_TUNNEL_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub tunnel_idle_timeout: Duration,

    /// Most open client connections; a new one beyond it is answered 503
    /// with Retry-After and closed.
    #[arg(long, env = "TANDEM_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Most concurrent streams per HTTP/2 connection.
    #[arg(
        long,
        env = "TANDEM_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 100
    )]
    pub http2_max_concurrent_streams: u32,

    /// Clients (a load balancer in front of the gateway) whose
    /// `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Forwarded-Port`,
    /// `Forwarded` and `X-Real-IP` are passed on; from anyone else they are
    /// removed. CIDR ranges or addresses, comma-separated.
    #[arg(long, env = "TANDEM_TRUST_FORWARDED_FROM", value_delimiter = ',')]
    pub trust_forwarded_from: Vec<Cidr>,

    /// This replica's address for workload ports (default: POD_IP): it is
    /// told to the operator, which lists it in the EndpointSlices of public
    /// Services that point at the gateways, and the gateway serves each such
    /// workload on its own port of this address. Without it, the gateway
    /// serves routes only.
    #[arg(long, env = "TANDEM_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<std::net::IpAddr>,

    /// The cluster's DNS domain, for the host names of public Services
    /// (`name.namespace.svc.<domain>`).
    #[arg(long, env = "TANDEM_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Serve Gateways of GatewayClasses with this `controllerName` (the
    /// Gateway API implementation is on only with this flag and
    /// `--gateway-addresses`).
    #[arg(long, env = "TANDEM_GATEWAY_CONTROLLER_NAME")]
    pub gateway_controller_name: Option<String>,

    /// Addresses Tandem's Gateways are given, one per Gateway, in order
    /// (addresses and IPv4 ranges, comma-separated: `10.0.40.0/24`). The
    /// gateway binds each Gateway's listeners on its address.
    #[arg(long, env = "TANDEM_GATEWAY_ADDRESSES", value_parser = crate::gatewayapi::parse_addresses)]
    pub gateway_addresses: Option<crate::gatewayapi::AddressPool>,

    /// The Lease whose holder writes Gateway API status
    /// (`NAMESPACE/NAME`; namespace default: POD_NAMESPACE, else default).
    #[arg(
        long,
        env = "TANDEM_GATEWAY_STATUS_LEASE",
        default_value = "tandem-gateway-status"
    )]
    pub gateway_status_lease: String,

    /// On SIGTERM, in-flight requests get this long to finish.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

impl GatewayArgs {
    /// The limits and deadlines these flags set.
    pub fn settings(&self) -> Settings {
        Settings {
            max_held_requests: self.max_held_requests,
            max_held_body_bytes: self.max_held_body_bytes,
            max_body_bytes: self.max_body_bytes,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            header_read_timeout: self.header_read_timeout,
            keep_alive_timeout: self.keep_alive_timeout,
            idle_timeout: self.idle_timeout,
            response_head_timeout: self.response_head_timeout,
            connect_timeout: self.connect_timeout,
            tunnel_idle_timeout: self.tunnel_idle_timeout,
            max_connections: self.max_connections,
            http2_max_concurrent_streams: self.http2_max_concurrent_streams,
            trusted: self.trust_forwarded_from.clone(),
        }
    }
}

/// Runs the gateway until SIGTERM or SIGINT, then drains.
pub async fn run(args: GatewayArgs) -> Result<()> {
    let mut registry = Registry::default();
    let metrics = metrics::GatewayMetrics::register(&mut registry);
    // The held-queue bound, so an alert can compare the queue with it.
    let max_held = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    max_held.set(args.max_held_requests.min(i64::MAX as usize) as i64);
    registry.register(
        "tandem_gateway_max_held_requests",
        "Most requests held per cold workload (--max-held-requests)",
        max_held,
    );
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
            let gateway_api = match (&args.gateway_controller_name, &args.gateway_addresses) {
                (Some(controller), Some(addresses)) => {
                    let (views_tx, views) = watch::channel(None);
                    let (namespace, name) = match args.gateway_status_lease.split_once('/') {
                        Some((namespace, name)) => (namespace.to_string(), name.to_string()),
                        None => (
                            std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into()),
                            args.gateway_status_lease.clone(),
                        ),
                    };
                    let identity = args
                        .id
                        .clone()
                        .or_else(|| std::env::var("POD_NAME").ok())
                        .unwrap_or_else(|| format!("gateway-{}", std::process::id()));
                    let lease = crate::leader::LeaseConfig::new(
                        namespace,
                        name,
                        identity,
                        Duration::from_secs(15),
                    );
                    tokio::spawn(crate::gatewayapi::status::run(
                        client.clone(),
                        lease,
                        controller.clone(),
                        views,
                    ));
                    tracing::info!(controller = %controller, addresses = addresses.0.len(), "serving Gateway API");
                    Some((
                        source::GatewayApiConfig {
                            controller: controller.clone(),
                            addresses: addresses.0.clone(),
                        },
                        views_tx,
                    ))
                }
                (None, None) => None,
                _ => anyhow::bail!("--gateway-controller-name and --gateway-addresses go together"),
            };
            tokio::spawn(source::run_kubernetes(
                client,
                args.namespaces.clone(),
                args.cluster_domain.clone(),
                tables_tx,
                on_ready,
                gateway_api,
            ));
        }
    }

    let id = args
        .id
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| format!("gateway-{}", std::process::id()));
    let mut gateway = Gateway::new(args.settings(), tables, metrics, id);
    gateway.recording =
        record::Recording::new(args.request_log_sample, args.traces.otlp_endpoint.is_some());
    gateway.advertise = args
        .advertise_address
        .or_else(|| std::env::var("POD_IP").ok().and_then(|ip| ip.parse().ok()));
    let gateway = Arc::new(gateway);
    tokio::spawn(demand::run(gateway.clone(), targets));
    tokio::spawn(gateway.clone().prune_on_change());

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    tracing::info!(address = %listener.local_addr()?, admin = %args.admin_address, workload_ports_on = ?gateway.advertise, "gateway listening");
    let draining = gateway.clone();
    let shutdown = async move {
        shutdown_signal().await;
        draining.drain();
    };
    serve(listener, gateway, args.shutdown_grace, shutdown).await;
    admin_state.set_ready(false, "shutting down");
    Ok(())
}

/// Serves on one thread per core, each with its own single-threaded runtime
/// and upstream connection pool (no cross-thread hand-offs per request, as in
/// nginx's worker model). One acceptor hands each new connection to the
/// thread with the fewest open connections, so the threads share the load
/// evenly (the kernel, waking whichever thread waits on a shared socket,
/// gave one thread two thirds of the connections in a benchmark). Beyond
/// `max_connections` open ones, a new connection is answered 503 at once.
/// On `shutdown` the threads stop taking connections, let in-flight requests
/// finish within `grace`, then close idle connections.
///
/// With an advertised address, the workload ports of the routing table are
/// served too (see [`port_listeners`]).
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    grace: Duration,
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
            gateway: gateway.clone(),
            grace,
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
    // Refusals are written by a bounded number of tasks; beyond that a
    // connection is closed without an answer.
    let refusing = Arc::new(Semaphore::new(256));
    let (ports_tx, mut ports_rx) = mpsc::channel(1024);
    let ports = Some(tokio::spawn(port_listeners(
        gateway.advertise,
        gateway.tables.clone(),
        ports_tx,
    )));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer, entry) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer, Entry::Routes),
                Err(error) => {
                    tracing::warn!(%error, "accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            Some(accepted) = ports_rx.recv() => accepted,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let open_now: usize = workers
            .iter()
            .map(|(_, open, _)| open.load(Ordering::Relaxed))
            .sum();
        if open_now >= gateway.settings.max_connections {
            gateway.metrics.refused_connection();
            if let Ok(permit) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream).await;
                    drop(permit);
                });
            }
            continue;
        }
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let (connections, open, _) = workers
            .iter()
            .min_by_key(|(_, open, _)| open.load(Ordering::Relaxed))
            .expect("at least one worker");
        open.fetch_add(1, Ordering::Relaxed);
        gateway.metrics.connections().inc();
        if connections.send((stream, peer, entry)).is_err() {
            open.fetch_sub(1, Ordering::Relaxed);
            gateway.metrics.connections().dec();
        }
    }
    drop(listener);
    if let Some(ports) = ports {
        ports.abort();
    }
    let _ = stop_tx.send(true);
    let threads: Vec<_> = workers.into_iter().map(|(_, _, thread)| thread).collect();
    let _ = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await;
}

/// Answers a connection over the cap with 503 without reading its request,
/// then closes it (after draining briefly, so the client reads the answer).
async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    const MESSAGE: &str = "the gateway has too many connections\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         x-tandem-error: gateway\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{MESSAGE}",
        MESSAGE.len()
    );
    let written =
        tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
    if matches!(written, Ok(Ok(()))) {
        let _ = stream.shutdown().await;
        let mut scratch = BytesMut::new();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(n) = h1::body::fill(&mut stream, &mut scratch).await {
                if n == 0 || scratch.len() > 64 * 1024 {
                    return;
                }
            }
        })
        .await;
    }
}

/// A connection the acceptor hands a serving thread.
type Handed = (std::net::TcpStream, SocketAddr, Entry);

/// Keeps a listener on `address` for each workload port of the routing
/// table, and one for each Gateway API listener address (binding new ones
/// as they appear, closing those that left), and hands their connections
/// to `accepted`. An address that cannot be bound is retried every second.
/// Ends when the acceptor is gone (or is aborted).
async fn port_listeners(
    address: Option<std::net::IpAddr>,
    mut tables: watch::Receiver<Arc<RoutingTable>>,
    accepted: mpsc::Sender<(TcpStream, SocketAddr, Entry)>,
) {
    let mut open: std::collections::BTreeMap<SocketAddr, tokio::task::JoinHandle<()>> =
        Default::default();
    let mut refused = std::collections::BTreeSet::new();
    loop {
        let wanted: std::collections::BTreeMap<SocketAddr, Entry> = {
            let table = tables.borrow_and_update();
            let ports = address.into_iter().flat_map(|address| {
                table
                    .ports()
                    .into_iter()
                    .map(move |port| (SocketAddr::new(address, port), Entry::Port(port)))
            });
            let listeners = table
                .listener_addresses()
                .into_iter()
                .map(|at| (at, Entry::Listener(at)));
            // A Gateway listener's address wins over a workload port.
            ports.chain(listeners).collect()
        };
        open.retain(|at, task| {
            let keep = wanted.contains_key(at);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut failing = false;
        for (at, entry) in wanted {
            if open.contains_key(&at) {
                continue;
            }
            match TcpListener::bind(at).await {
                Ok(listener) => {
                    refused.remove(&at);
                    tracing::info!(address = %at, ?entry, "serving");
                    let accepted = accepted.clone();
                    open.insert(
                        at,
                        tokio::spawn(async move {
                            loop {
                                match listener.accept().await {
                                    Ok((stream, peer)) => {
                                        if accepted.send((stream, peer, entry)).await.is_err() {
                                            return;
                                        }
                                    }
                                    Err(error) => {
                                        tracing::warn!(%error, address = %at, "accept");
                                        tokio::time::sleep(Duration::from_millis(10)).await;
                                    }
                                }
                            }
                        }),
                    );
                }
                Err(error) => {
                    failing = true;
                    if refused.insert(at) {
                        tracing::warn!(address = %at, %error, "cannot listen; retrying every second");
                    }
                }
            }
        }
        tokio::select! {
            changed = tables.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(Duration::from_secs(1)), if failing => {}
            _ = accepted.closed() => break,
        }
    }
    for (_, task) in open {
        task.abort();
    }
}

/// One serving thread: takes the connections the acceptor hands it.
struct Worker {
    gateway: Arc<Gateway>,
    grace: Duration,
    stop: watch::Receiver<bool>,
    /// Its open connections (the acceptor adds, the worker removes).
    open: Arc<AtomicUsize>,
}

impl Worker {
    async fn run(self, mut incoming: mpsc::UnboundedReceiver<Handed>) {
        let Worker {
            gateway,
            grace,
            mut stop,
            open,
        } = self;
        let pool = Arc::new(h1::pool::Pool::default());
        let sweeper = tokio::spawn(sweep(pool.clone(), gateway.tables.clone()));
        // The connections watch a stop signal of this thread: waiting on the
        // shared one would touch memory of the other threads per request.
        let (stop_here, stopped) = watch::channel(false);
        loop {
            let (stream, peer, entry) = tokio::select! {
                next = incoming.recv() => match next {
                    Some(next) => next,
                    None => break,
                },
                _ = stop.wait_for(|stopped| *stopped) => break,
            };
            let (gateway, pool, stop, open) =
                (gateway.clone(), pool.clone(), stopped.clone(), open.clone());
            tokio::spawn(async move {
                if let Ok(stream) = TcpStream::from_std(stream) {
                    connection(gateway.clone(), pool, stream, peer, entry, stop).await;
                }
                open.fetch_sub(1, Ordering::Relaxed);
                gateway.metrics.connections().dec();
            });
        }
        let _ = stop_here.send(true);
        // Connections handed over but not yet taken close like those still
        // in the listen backlog.
        incoming.close();
        while incoming.try_recv().is_ok() {
            open.fetch_sub(1, Ordering::Relaxed);
            gateway.metrics.connections().dec();
        }
        sweeper.abort();
        tracing::info!(?grace, "draining in-flight requests");
        let drained = async {
            while open.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("grace period over; closing the remaining connections");
        }
    }
}

/// Closes a thread's idle upstream connections after their idle timeout,
/// and those to endpoints that left the routing table at once.
async fn sweep(pool: Arc<h1::pool::Pool>, mut tables: watch::Receiver<Arc<RoutingTable>>) {
    let mut every = tokio::time::interval(h1::pool::IDLE_TIMEOUT / 4);
    loop {
        tokio::select! {
            _ = every.tick() => pool.sweep(),
            changed = tables.changed() => {
                if changed.is_err() {
                    return;
                }
                let live = tables
                    .borrow_and_update()
                    .workloads()
                    .flat_map(|w| w.endpoints.iter().copied())
                    .collect();
                pool.retain(&live);
            }
        }
    }
}

/// Serves one client connection: its first bytes say whether it speaks
/// HTTP/2 (the prior-knowledge preface) or HTTP/1; they must arrive within
/// the header read timeout.
pub async fn connection(
    gateway: Arc<Gateway>,
    pool: Arc<h1::pool::Pool>,
    mut stream: TcpStream,
    peer: SocketAddr,
    entry: Entry,
    stop: watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + gateway.settings.header_read_timeout;
    if let Entry::Listener(at) = entry
        && gateway.tables.borrow().listener_tls(at)
    {
        // HTTPS: the handshake, too, within the header read timeout.
        let acceptor = tokio_rustls::TlsAcceptor::from(gateway.tls_config(at));
        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                h1::serve(&gateway, &pool, tls, BytesMut::new(), peer, entry, stop).await
            }
            Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
        return;
    }
    let mut buf = BytesMut::with_capacity(8 * 1024);
    while buf.len() < HTTP2_PREFACE.len() && HTTP2_PREFACE.starts_with(&buf) {
        match tokio::time::timeout_at(deadline, h1::body::fill(&mut stream, &mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
    if buf.starts_with(HTTP2_PREFACE) {
        h2::serve(
            gateway,
            pool,
            h2::Rewind::new(buf.freeze(), stream),
            peer,
            entry,
            stop,
        )
        .await;
    } else {
        h1::serve(&gateway, &pool, stream, buf, peer, entry, stop).await;
    }
}
