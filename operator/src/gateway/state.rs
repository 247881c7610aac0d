//! What the serving threads of a gateway share: the routing table, the load
//! of every workload and endpoint, the settings, and the metrics; and the
//! pruning that keeps all of it as small as the table.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, watch};
use tokio::time::Duration;

use super::balance::EndpointLoads;
use super::forwarding::Cidr;
use super::metrics::{GatewayMetrics, WorkloadMetrics};
use super::route_meter::RouteMeter;
use super::table::{FastMap, RoutingTable, WorkloadKey};

/// Limits and deadlines of a gateway (from its flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most requests held per cold workload.
    pub max_held_requests: usize,
    /// Largest body of a held request.
    pub max_held_body_bytes: usize,
    /// Largest body forwarded.
    pub max_body_bytes: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Time for a whole request head, from its first byte.
    pub header_read_timeout: Duration,
    /// How long a client connection may wait for its next request.
    pub keep_alive_timeout: Duration,
    /// Longest wait for the next bytes of a body, or for a peer to take
    /// the bytes written to it, in either direction.
    pub idle_timeout: Duration,
    /// Longest wait for an upstream's response head once the request is
    /// sent (the workload's `requestTimeout` also applies).
    pub response_head_timeout: Duration,
    /// Connecting to an upstream endpoint must succeed within this time.
    pub connect_timeout: Duration,
    /// Longest silence in both directions of an upgraded (websocket)
    /// connection.
    pub tunnel_idle_timeout: Duration,
    /// Most open client connections; more are answered 503.
    pub max_connections: usize,
    /// Most concurrent streams of one HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// Clients whose forwarding headers are believed.
    pub trusted: Vec<Cidr>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_held_requests: 1000,
            max_held_body_bytes: 1 << 20,
            max_body_bytes: 64 << 20,
            max_header_bytes: 64 << 10,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(75),
            idle_timeout: Duration::from_secs(60),
            response_head_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            tunnel_idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            http2_max_concurrent_streams: 100,
            trusted: Vec::new(),
        }
    }
}

impl Settings {
    /// Whether forwarding headers from `ip` are believed.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted.iter().any(|range| range.contains(ip))
    }
}

/// Per-workload counters reported to the autoscaler, and its metrics.
pub struct WorkloadLoad {
    /// Prometheus handles of this workload.
    pub metrics: WorkloadMetrics,
    /// Requests being served by endpoints now.
    pub in_flight: AtomicU64,
    /// Requests held waiting for an endpoint now.
    pub held: AtomicU64,
    /// Requests started since the last stats report.
    pub requests: AtomicU64,
    /// Counters per route that has a migration, by route name.
    pub routes: RwLock<FastMap<String, Arc<RouteMeter>>>,
}

impl WorkloadLoad {
    /// The meter of `route` (made on first use).
    pub fn route_meter(&self, route: &str) -> Arc<RouteMeter> {
        shared_entry(&self.routes, route, Default::default)
    }
}

/// The entry of `key` in `map`, made by `make` if absent: a read lock on
/// the common path, the write lock only to insert.
fn shared_entry<K, Q, V>(
    map: &RwLock<FastMap<K, Arc<V>>>,
    key: &Q,
    make: impl FnOnce() -> V,
) -> Arc<V>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: ToOwned<Owned = K> + std::hash::Hash + Eq + ?Sized,
{
    if let Some(value) = map.read().expect("map lock").get(key) {
        return value.clone();
    }
    map.write()
        .expect("map lock")
        .entry(key.to_owned())
        .or_insert_with(|| Arc::new(make()))
        .clone()
}

impl WorkloadLoad {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.held.load(Ordering::Relaxed) == 0
    }
}

/// Shared state of the gateway.
pub struct Gateway {
    pub(super) tables: watch::Receiver<Arc<RoutingTable>>,
    pub(super) loads: Arc<EndpointLoads>,
    workloads: RwLock<FastMap<WorkloadKey, Arc<WorkloadLoad>>>,
    /// Wakes the demand sender when a workload gets its first held request.
    pub demand: Notify,
    pub(super) metrics: GatewayMetrics,
    /// Limits and deadlines.
    pub settings: Settings,
    /// Request log lines and spans.
    pub recording: super::record::Recording,
    /// This replica's name in protocol messages.
    pub id: String,
    /// Where this replica serves workload ports (told to the operator).
    pub advertise: Option<std::net::IpAddr>,
    /// Set on shutdown; told to the operator, which takes this replica out
    /// of the public Services' endpoints.
    pub draining: std::sync::atomic::AtomicBool,
    /// TLS settings of each HTTPS listener address (made on first use; the
    /// certificate is looked up in the table in force at each handshake).
    tls: std::sync::Mutex<FastMap<SocketAddr, Arc<rustls::ServerConfig>>>,
}

/// Picks an HTTPS listener's certificate by SNI from the routing table in
/// force when the client says hello: a rotated Secret serves new
/// connections at once, and connections already up keep theirs.
#[derive(Debug)]
struct ListenerCertificates {
    tables: watch::Receiver<Arc<RoutingTable>>,
    at: SocketAddr,
}

impl rustls::server::ResolvesServerCert for ListenerCertificates {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.tables
            .borrow()
            .listener_certificate(self.at, hello.server_name())
    }
}

impl Gateway {
    /// The gateway for `tables`.
    pub fn new(
        settings: Settings,
        tables: watch::Receiver<Arc<RoutingTable>>,
        metrics: GatewayMetrics,
        id: String,
    ) -> Self {
        Self {
            tables,
            loads: Arc::default(),
            workloads: RwLock::default(),
            demand: Notify::new(),
            metrics,
            settings,
            recording: Default::default(),
            id,
            advertise: None,
            draining: Default::default(),
            tls: Default::default(),
        }
    }

    /// The TLS settings of the HTTPS listeners at `at`: HTTP/1.1 (ALPN),
    /// TLS 1.2 and 1.3, the certificate chosen by SNI at each handshake.
    pub fn tls_config(&self, at: SocketAddr) -> Arc<rustls::ServerConfig> {
        let mut configs = self.tls.lock().expect("tls lock");
        configs
            .entry(at)
            .or_insert_with(|| {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(ListenerCertificates {
                        tables: self.tables.clone(),
                        at,
                    }));
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(config)
            })
            .clone()
    }

    /// Marks this replica as shutting down and has the operator told now.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.demand.notify_one();
    }

    /// The routing table in force.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.tables.borrow().clone()
    }

    /// Counters of one workload.
    pub fn load_of(&self, key: &WorkloadKey) -> Arc<WorkloadLoad> {
        shared_entry(&self.workloads, key, || WorkloadLoad {
            metrics: self.metrics.workload(key),
            in_flight: AtomicU64::new(0),
            held: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            routes: Default::default(),
        })
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

    /// Forgets what belongs to workloads, routes and endpoints that left
    /// `table` and carry no request now: their counters, their metric
    /// series, and the load entries of their endpoints. A workload whose
    /// requests are still in flight is forgotten at a later pruning.
    pub fn prune(&self, table: &RoutingTable) {
        let live: HashSet<SocketAddr> = table
            .workloads()
            .flat_map(|w| w.endpoints.iter().copied())
            .collect();
        self.loads.retain(&live);
        let routes = table.routes_by_workload();
        let mut workloads = self.workloads.write().expect("workloads lock");
        workloads.retain(|key, load| {
            let keep = table.workload(key).is_some() || !load.idle();
            if keep {
                let kept = |route: &str| routes.get(key).is_some_and(|r| r.contains(route));
                load.metrics.retain_routes(kept);
                load.routes
                    .write()
                    .expect("routes lock")
                    .retain(|route, _| kept(route));
            } else {
                load.metrics.remove();
            }
            keep
        });
    }

    /// Prunes after every change of the routing table, until it is dropped.
    pub async fn prune_on_change(self: Arc<Self>) {
        let mut tables = self.tables.clone();
        while tables.changed().await.is_ok() {
            let table = tables.borrow_and_update().clone();
            self.prune(&table);
        }
    }
}

/// A new request id: 32 random hex digits, without going through a formatter.
pub fn request_id() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let bits = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> (4 * i)) & 0xf) as usize];
    }
    id
}
