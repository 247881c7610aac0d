//! The routing table: an immutable snapshot built from HybridApps and
//! EndpointSlices, swapped atomically as a whole, so a request never sees half
//! an update.
//!
//! Matching: host first (an app listing the host beats an app that takes any
//! host), then an exact path before the longest path prefix (segment-aware:
//! `/api` matches `/api` and `/api/x`, never `/apiary`), then routes with more
//! header conditions, then routes that restrict methods. The first route in
//! that order whose methods and headers match wins.
//!
//! Besides its routes, every workload whose public Service points at the
//! gateways is reachable as itself: by that Service's in-cluster host names
//! (`name.ns`, `name.ns.svc`, `name.ns.svc.<cluster domain>`, and the bare
//! `name` where no other namespace has it), which come after the hosts that
//! apps list and before apps that take any host; and by its gateway port,
//! where every request is that workload's whatever its host (see
//! [`RoutingTable::port_route`]).

use std::collections::{BTreeMap, HashMap};

/// A hash map with a fast, non-cryptographic hasher, for per-request lookups
/// of keys the gateway built itself.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{HybridApp, Method, Mode};

/// Identifies a workload across the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey {
    /// Namespace of the HybridApp.
    pub namespace: String,
    /// HybridApp name.
    pub app: String,
    /// Workload name.
    pub workload: String,
}

impl WorkloadKey {
    /// A plain Service port that an HTTPRoute names (no HybridApp: the app
    /// is empty, the workload is `name:port`).
    pub fn service(namespace: &str, name: &str, port: i32) -> Self {
        Self {
            namespace: namespace.into(),
            app: String::new(),
            workload: format!("{name}:{port}"),
        }
    }

    /// The backend of an HTTPRoute's share that does not resolve: its
    /// requests are answered 500, as Gateway API asks.
    pub fn unresolved() -> Self {
        Self {
            namespace: String::new(),
            app: String::new(),
            workload: String::new(),
        }
    }
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.app, self.workload)
    }
}

/// Where and how one workload is served.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadTarget {
    /// Which workload.
    pub key: WorkloadKey,
    /// Function (may be cold) or AlwaysOn.
    pub mode: Mode,
    /// Deadline of one request, cold start included.
    pub request_timeout: Duration,
    /// Ready endpoints (pod IP and port), sorted.
    pub endpoints: Vec<SocketAddr>,
}

/// How a route matches the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// Exactly this path.
    Exact(String),
    /// This prefix, segment by segment (stored without a trailing `/`,
    /// except for the root prefix `/`).
    Prefix(String),
}

impl PathMatch {
    /// Whether `path` (without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) if prefix == "/" => true,
            PathMatch::Prefix(prefix) => {
                path.starts_with(prefix.as_str())
                    && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
            }
        }
    }
}

/// One route, compiled for matching.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRoute {
    /// Namespace of its HybridApp.
    pub namespace: String,
    /// Its HybridApp.
    pub app: String,
    /// Route name.
    pub name: String,
    /// Whether its app lists hosts (more specific than any-host apps).
    pub host_specific: bool,
    /// Path condition.
    pub path: PathMatch,
    /// Allowed methods (empty: any).
    pub methods: Vec<Method>,
    /// Required headers: lowercase name and exact value.
    pub headers: Vec<(String, String)>,
    /// Backends with their weights (weight 0 backends are dropped).
    pub backends: Vec<(WorkloadKey, u32)>,
    /// Sum of the weights.
    pub total_weight: u32,
    /// It has a migration: its requests are counted per backend for the
    /// operator's gates.
    pub measured: bool,
    /// Where its weighted picks stand.
    pub rolls: super::balance::Rolls,
    /// Breaks ties between equally specific routes before their names
    /// (HTTPRoutes: the route's age rank and the rule's position).
    pub tie: u32,
    /// Header edits, redirect and rewrite (HTTPRoute filters).
    pub filters: Option<Arc<super::filters::Filters>>,
    /// The route's own deadline for a request, in place of its workload's
    /// (HTTPRoute timeouts).
    pub timeout: Option<Duration>,
}

impl CompiledRoute {
    /// Sort key: more specific first.
    fn specificity(&self) -> impl Ord + use<> {
        let (exact, prefix_len) = match &self.path {
            PathMatch::Exact(p) => (true, p.len()),
            PathMatch::Prefix(p) => (false, if p == "/" { 0 } else { p.len() }),
        };
        (
            std::cmp::Reverse(self.host_specific),
            std::cmp::Reverse(exact),
            std::cmp::Reverse(prefix_len),
            std::cmp::Reverse(self.headers.len()),
            std::cmp::Reverse(!self.methods.is_empty()),
            self.tie,
            self.namespace.clone(),
            self.app.clone(),
            self.name.clone(),
        )
    }

    /// Whether the request's method and headers satisfy this route.
    pub fn accepts(&self, method: &str, headers: &(impl HeaderLookup + ?Sized)) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| method_name(*m) == method))
            && self
                .headers
                .iter()
                .all(|(name, value)| headers.has(name, value.as_bytes()))
    }
}

/// The request headers a route's conditions look at, however the request
/// was parsed.
pub trait HeaderLookup {
    /// Whether a header `name` (lowercase) has exactly `value`.
    fn has(&self, name: &str, value: &[u8]) -> bool;
}

impl HeaderLookup for http::HeaderMap {
    fn has(&self, name: &str, value: &[u8]) -> bool {
        self.get_all(name).iter().any(|v| v.as_bytes() == value)
    }
}

impl HeaderLookup for [httparse::Header<'_>] {
    fn has(&self, name: &str, value: &[u8]) -> bool {
        self.iter()
            .any(|h| h.name.eq_ignore_ascii_case(name) && h.value == value)
    }
}

/// The HTTP name of a method.
pub fn method_name(method: Method) -> &'static str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Patch => "PATCH",
        Method::Delete => "DELETE",
        Method::Options => "OPTIONS",
        Method::Connect => "CONNECT",
        Method::Trace => "TRACE",
    }
}

/// Immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RoutingTable {
    by_host: FastMap<String, Vec<Arc<CompiledRoute>>>,
    any_host: Vec<Arc<CompiledRoute>>,
    workloads: FastMap<WorkloadKey, Arc<WorkloadTarget>>,
    /// A workload's own route, by the host names of its public Service.
    by_service_host: FastMap<String, Arc<CompiledRoute>>,
    /// A workload's own route, by its gateway port.
    by_port: FastMap<u16, Arc<CompiledRoute>>,
    /// The apps in the table and their generations, sorted.
    programmed: Vec<crate::protocol::Programmed>,
    /// Gateway API listeners, by the address and port they serve.
    listeners: FastMap<SocketAddr, Arc<ListenerSet>>,
}

/// The routes of one Gateway API listener, by host name: a request takes
/// the most specific name that matches its host (exact, then the longest
/// wildcard, then the routes for any host) and only that name's routes,
/// as a virtual host.
#[derive(Debug, Default)]
pub struct VirtualHosts {
    /// Exact names.
    pub exact: FastMap<String, Vec<Arc<CompiledRoute>>>,
    /// Wildcards, by suffix (`.example.com`), longest first.
    pub wildcard: Vec<(String, Vec<Arc<CompiledRoute>>)>,
    /// Routes for any host.
    pub any: Vec<Arc<CompiledRoute>>,
}

impl VirtualHosts {
    /// Sorts every list by specificity, and the wildcards longest first.
    pub fn seal(&mut self) {
        for routes in self.exact.values_mut() {
            routes.sort_by_key(|r| r.specificity());
        }
        for (_, routes) in &mut self.wildcard {
            routes.sort_by_key(|r| r.specificity());
        }
        self.wildcard
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        self.any.sort_by_key(|r| r.specificity());
    }

    fn candidates(&self, host: &str) -> &[Arc<CompiledRoute>] {
        if let Some(routes) = self.exact.get(host) {
            return routes;
        }
        for (suffix, routes) in &self.wildcard {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return routes;
            }
        }
        &self.any
    }
}

/// The listeners of one address and port: a request takes the listener
/// whose host name matches its host most specifically.
#[derive(Debug, Default)]
pub struct ListenerSet {
    /// Listeners by host name (none: any), most specific first.
    pub listeners: Vec<(Option<String>, VirtualHosts)>,
    /// HTTPS: connections are TLS, terminated here.
    pub tls: bool,
    /// Certificates of the HTTPS listeners by host name (none: any), most
    /// specific first.
    pub certificates: Vec<(Option<String>, Arc<rustls::sign::CertifiedKey>)>,
}

impl ListenerSet {
    /// Adds the certificate of an HTTPS listener.
    pub fn push_certificate(
        &mut self,
        hostname: Option<String>,
        certificate: Arc<rustls::sign::CertifiedKey>,
    ) {
        self.tls = true;
        self.certificates.push((hostname, certificate));
        self.certificates.sort_by_key(|(name, _)| match name {
            Some(name) => (false, crate::gatewayapi::hostname::specificity(name)),
            None => (true, (true, 0)),
        });
    }

    /// The certificate for a TLS client that asked for `server_name` (SNI):
    /// the most specific listener whose host name matches it; without SNI,
    /// or with a name no listener has, the listener without host name, if
    /// there is one.
    pub fn certificate(
        &self,
        server_name: Option<&str>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = server_name.map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        self.certificates
            .iter()
            .find(|(listener, _)| match (listener, &name) {
                (None, _) => true,
                (Some(listener), Some(name)) => {
                    crate::gatewayapi::hostname::matches(listener, name)
                }
                (Some(_), None) => false,
            })
            .map(|(_, certificate)| certificate.clone())
    }

    /// Adds a listener's routes.
    pub fn push(&mut self, hostname: Option<String>, hosts: VirtualHosts) {
        self.listeners.push((hostname, hosts));
        self.listeners.sort_by_key(|(name, _)| match name {
            Some(name) => (false, crate::gatewayapi::hostname::specificity(name)),
            None => (true, (true, 0)),
        });
    }

    fn route(
        &self,
        host: &str,
        path: &str,
        method: &str,
        headers: &(impl HeaderLookup + ?Sized),
    ) -> Option<&Arc<CompiledRoute>> {
        let (_, hosts) = self.listeners.iter().find(|(name, _)| {
            name.as_deref()
                .is_none_or(|n| crate::gatewayapi::hostname::matches(n, host))
        })?;
        hosts
            .candidates(host)
            .iter()
            .find(|r| r.path.matches(path) && r.accepts(method, headers))
    }
}

/// How workloads are reached as themselves (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct ServiceAccess {
    /// The cluster's DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// The gateway port of each workload whose public Service points at
    /// the gateways, from its EndpointSlices.
    pub ports: HashMap<WorkloadKey, u16>,
}

/// Route name of a workload reached as itself through its Service.
pub fn service_route_name(service: &str) -> String {
    format!("service:{service}")
}

impl RoutingTable {
    /// Builds a table from apps and the ready endpoints of each workload.
    pub fn build(apps: &[HybridApp], endpoints: &HashMap<WorkloadKey, Vec<SocketAddr>>) -> Self {
        Self::build_with(apps, endpoints, &ServiceAccess::default())
    }

    /// Builds a table from apps, the ready endpoints of each workload, and
    /// how workloads are reached through their Services.
    pub fn build_with(
        apps: &[HybridApp],
        endpoints: &HashMap<WorkloadKey, Vec<SocketAddr>>,
        access: &ServiceAccess,
    ) -> Self {
        let mut table = RoutingTable::default();
        let mut service_hosts: BTreeMap<String, Vec<Arc<CompiledRoute>>> = BTreeMap::new();
        let mut ports: BTreeMap<u16, Vec<(WorkloadKey, Arc<CompiledRoute>)>> = BTreeMap::new();
        let mut any_host = Vec::new();
        let mut by_host: BTreeMap<String, Vec<Arc<CompiledRoute>>> = BTreeMap::new();
        for app in apps {
            let (Some(namespace), Some(name)) =
                (app.metadata.namespace.clone(), app.metadata.name.clone())
            else {
                continue;
            };
            // Programmed (and so, for the operator, routable) only once every
            // AlwaysOn workload has an endpoint here: until then its
            // requests would get 503.
            let routable = app.spec.workloads.iter().all(|w| {
                w.mode != Mode::AlwaysOn
                    || endpoints
                        .get(&WorkloadKey {
                            namespace: namespace.clone(),
                            app: name.clone(),
                            workload: w.name.clone(),
                        })
                        .is_some_and(|e| !e.is_empty())
            });
            if routable {
                table.programmed.push(crate::protocol::Programmed {
                    namespace: namespace.clone(),
                    app: name.clone(),
                    generation: app.metadata.generation.unwrap_or_default(),
                });
            }
            for workload in &app.spec.workloads {
                let key = WorkloadKey {
                    namespace: namespace.clone(),
                    app: name.clone(),
                    workload: workload.name.clone(),
                };
                let mut ready = endpoints.get(&key).cloned().unwrap_or_default();
                ready.sort();
                ready.dedup();
                let port = access.ports.get(&key).copied();
                table.workloads.insert(
                    key.clone(),
                    Arc::new(WorkloadTarget {
                        key: key.clone(),
                        mode: workload.mode,
                        request_timeout: workload.request_timeout(),
                        endpoints: ready,
                    }),
                );
                if !workload.through_gateway() && port.is_none() {
                    continue;
                }
                let service = crate::api::contract::child_name(&name, &workload.name);
                let own = Arc::new(CompiledRoute {
                    namespace: namespace.clone(),
                    app: name.clone(),
                    name: service_route_name(&service),
                    host_specific: true,
                    path: PathMatch::Prefix("/".into()),
                    methods: Vec::new(),
                    headers: Vec::new(),
                    backends: vec![(key.clone(), 1)],
                    total_weight: 1,
                    measured: false,
                    rolls: Default::default(),
                    tie: 0,
                    filters: None,
                    timeout: None,
                });
                if workload.through_gateway() {
                    let qualified = format!("{service}.{namespace}");
                    let mut names = vec![
                        service.clone(),
                        qualified.clone(),
                        format!("{qualified}.svc"),
                    ];
                    if !access.cluster_domain.is_empty() {
                        names.push(format!(
                            "{qualified}.svc.{}",
                            access.cluster_domain.to_ascii_lowercase()
                        ));
                    }
                    for host in names {
                        service_hosts.entry(host).or_default().push(own.clone());
                    }
                }
                if let Some(port) = port {
                    ports.entry(port).or_default().push((key, own));
                }
            }
            let host_specific = !app.spec.hosts.is_empty();
            for route in &app.spec.routes {
                let path = match (&route.matches.path, &route.matches.path_prefix) {
                    (Some(exact), _) => PathMatch::Exact(exact.clone()),
                    (None, Some(prefix)) => {
                        let trimmed = prefix.trim_end_matches('/');
                        PathMatch::Prefix(if trimmed.is_empty() {
                            "/".into()
                        } else {
                            trimmed.into()
                        })
                    }
                    (None, None) => PathMatch::Prefix("/".into()),
                };
                // The effective weights: the spec's, or a migration's.
                let backends: Vec<(WorkloadKey, u32)> =
                    crate::migration::gateway_weights(app, route)
                        .into_iter()
                        .filter(|(_, weight)| *weight > 0)
                        .map(|(workload, weight)| {
                            (
                                WorkloadKey {
                                    namespace: namespace.clone(),
                                    app: name.clone(),
                                    workload,
                                },
                                weight,
                            )
                        })
                        .collect();
                let compiled = Arc::new(CompiledRoute {
                    namespace: namespace.clone(),
                    app: name.clone(),
                    name: route.name.clone(),
                    host_specific,
                    path,
                    methods: route.matches.methods.clone(),
                    headers: route
                        .matches
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                        .collect(),
                    total_weight: backends.iter().map(|(_, w)| w).sum(),
                    backends,
                    measured: route.migration.is_some(),
                    rolls: Default::default(),
                    tie: 0,
                    filters: None,
                    timeout: None,
                });
                if host_specific {
                    for host in &app.spec.hosts {
                        by_host
                            .entry(host.to_ascii_lowercase())
                            .or_default()
                            .push(compiled.clone());
                    }
                } else {
                    any_host.push(compiled);
                }
            }
        }
        // A host's list also holds the any-host routes, after its own.
        any_host.sort_by_key(|r| r.specificity());
        for (host, mut routes) in by_host {
            routes.extend(any_host.iter().cloned());
            routes.sort_by_key(|r| r.specificity());
            table.by_host.insert(host, routes);
        }
        table.any_host = any_host;
        table.programmed.sort();
        // A bare Service name in two namespaces names neither.
        table.by_service_host = service_hosts
            .into_iter()
            .filter(|(_, routes)| routes.len() == 1)
            .filter_map(|(host, mut routes)| Some((host, routes.pop()?)))
            .collect();
        // Two workloads claiming one port (never from the operator, which
        // hands each its own): the first by name keeps it.
        for (port, mut claims) in ports {
            claims.sort_by(|a, b| a.0.cmp(&b.0));
            if claims.len() > 1 {
                tracing::warn!(port, workloads = ?claims.iter().map(|c| c.0.to_string()).collect::<Vec<_>>(), "several workloads claim one gateway port; the first keeps it");
            }
            if let Some((_, route)) = claims.into_iter().next() {
                table.by_port.insert(port, route);
            }
        }
        table
    }

    /// Adds Gateway API listeners and the targets of their backends.
    pub fn with_listeners(
        mut self,
        listeners: FastMap<SocketAddr, Arc<ListenerSet>>,
        targets: Vec<WorkloadTarget>,
    ) -> Self {
        self.listeners = listeners;
        for target in targets {
            self.workloads
                .entry(target.key.clone())
                .or_insert_with(|| Arc::new(target));
        }
        self
    }

    /// The same routes served again by the Gateway API listener `at` (for
    /// any host): the gateway's own tests run through a listener with it.
    #[cfg(test)]
    pub fn also_on_listener(mut self, at: SocketAddr) -> Self {
        let mut hosts = VirtualHosts::default();
        for (host, routes) in &self.by_host {
            let mut all = routes.clone();
            all.extend(self.any_host.iter().cloned());
            hosts.exact.insert(host.clone(), all);
        }
        hosts.any = self.any_host.clone();
        hosts.seal();
        let mut set = ListenerSet::default();
        set.push(None, hosts);
        self.listeners.insert(at, Arc::new(set));
        self
    }

    /// The addresses of the Gateway API listeners, sorted.
    pub fn listener_addresses(&self) -> Vec<SocketAddr> {
        let mut addresses: Vec<SocketAddr> = self.listeners.keys().copied().collect();
        addresses.sort_unstable();
        addresses
    }

    /// The Gateway API listeners at `local` serve HTTPS.
    pub fn listener_tls(&self, local: SocketAddr) -> bool {
        self.listeners.get(&local).is_some_and(|set| set.tls)
    }

    /// The certificate the listeners at `local` show a TLS client that asked
    /// for `server_name`.
    pub fn listener_certificate(
        &self,
        local: SocketAddr,
        server_name: Option<&str>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.listeners.get(&local)?.certificate(server_name)
    }

    /// The best route for a request that came in on the Gateway API
    /// listener at `local`.
    pub fn listener_route(
        &self,
        local: SocketAddr,
        host: Option<&str>,
        path: &str,
        method: &str,
        headers: &(impl HeaderLookup + ?Sized),
    ) -> Option<&Arc<CompiledRoute>> {
        let host = host.map(normalize_host).unwrap_or_default();
        self.listeners
            .get(&local)?
            .route(&host, path, method, headers)
    }

    /// The apps this table serves, with their generations, sorted.
    pub fn programmed(&self) -> &[crate::protocol::Programmed] {
        &self.programmed
    }

    /// The route of the workload whose gateway port is `port`.
    pub fn port_route(&self, port: u16) -> Option<&Arc<CompiledRoute>> {
        self.by_port.get(&port)
    }

    /// The gateway ports of the workloads, sorted.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.sort_unstable();
        ports
    }

    /// The best route for a request, if any.
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        method: &str,
        headers: &(impl HeaderLookup + ?Sized),
    ) -> Option<&Arc<CompiledRoute>> {
        let host = host.map(normalize_host);
        let candidates = match host.as_deref() {
            Some(h) => match self.by_host.get(h) {
                Some(routes) => routes,
                None => match self.by_service_host.get(h) {
                    Some(own) => return Some(own),
                    None => &self.any_host,
                },
            },
            None => &self.any_host,
        };
        candidates
            .iter()
            .find(|r| r.path.matches(path) && r.accepts(method, headers))
    }

    /// A workload's target.
    pub fn workload(&self, key: &WorkloadKey) -> Option<&Arc<WorkloadTarget>> {
        self.workloads.get(key)
    }

    /// Every workload in the table.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<WorkloadTarget>> {
        self.workloads.values()
    }

    /// The names of the routes that send requests to each workload.
    pub fn routes_by_workload(&self) -> HashMap<WorkloadKey, std::collections::HashSet<String>> {
        let mut seen = std::collections::HashSet::new();
        let mut by_workload: HashMap<WorkloadKey, std::collections::HashSet<String>> =
            HashMap::new();
        for route in self.by_host.values().flatten().chain(self.any_host.iter()) {
            if !seen.insert(Arc::as_ptr(route)) {
                continue;
            }
            for (key, _) in &route.backends {
                by_workload
                    .entry(key.clone())
                    .or_default()
                    .insert(route.name.clone());
            }
        }
        by_workload
    }

    /// Number of distinct routes.
    pub fn route_count(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        self.by_host
            .values()
            .flatten()
            .chain(self.any_host.iter())
            .filter(|r| seen.insert(Arc::as_ptr(r)))
            .count()
    }
}

/// Lowercase host without port (`Shop.Example.com:8080` → `shop.example.com`).
/// IPv6 literals are left as they are: no route names one.
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let name = match host.rsplit_once(':') {
        Some((name, port))
            if !host.starts_with('[') && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            name
        }
        _ => host,
    };
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn app(namespace: &str, name: &str, hosts: &[&str], routes: serde_json::Value) -> HybridApp {
        let mut app: HybridApp = serde_json::from_value(json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "hosts": hosts,
                "workloads": [
                    {"name": "a", "mode": "AlwaysOn", "port": 80, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
                    {"name": "b", "mode": "Function", "port": 80, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}
                ],
                "routes": routes
            }
        }))
        .unwrap();
        app.metadata.namespace = Some(namespace.into());
        app
    }

    fn route<'a>(
        table: &'a RoutingTable,
        host: Option<&str>,
        path: &str,
        method: &str,
        headers: &[(&str, &str)],
    ) -> Option<&'a str> {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        table
            .route(host, path, method, &map)
            .map(|r| r.name.as_str())
    }

    fn shop() -> RoutingTable {
        let routes = json!([
            {"name": "root", "match": {"pathPrefix": "/"}, "backends": [{"workload": "a"}]},
            {"name": "api", "match": {"pathPrefix": "/api/"}, "backends": [{"workload": "a"}]},
            {"name": "api-v2", "match": {"pathPrefix": "/api/v2"}, "backends": [{"workload": "b"}]},
            {"name": "login", "match": {"path": "/api/login"}, "backends": [{"workload": "b"}]},
            {"name": "upload", "match": {"pathPrefix": "/api", "methods": ["POST", "PUT"]}, "backends": [{"workload": "b"}]},
            {"name": "beta", "match": {"pathPrefix": "/api", "headers": [{"name": "X-Beta", "value": "on"}]}, "backends": [{"workload": "b"}]}
        ]);
        let other = json!([{"name": "other", "match": {"pathPrefix": "/api"}, "backends": [{"workload": "a"}]}]);
        RoutingTable::build(
            &[
                app("ns", "shop", &["shop.example.com"], routes),
                app("ns", "any", &[], other),
            ],
            &HashMap::new(),
        )
    }

    #[test]
    fn workloads_are_reached_by_their_service_names_and_gateway_ports() {
        let routes = json!([{"name": "api", "match": {"pathPrefix": "/api"}, "backends": [{"workload": "a"}]}]);
        let key = |namespace: &str| WorkloadKey {
            namespace: namespace.into(),
            app: "shop".into(),
            workload: "b".into(),
        };
        let access = ServiceAccess {
            cluster_domain: "Cluster.Local".into(),
            ports: [(key("ns"), 20001), (key("gone"), 20002)].into(),
        };
        let t = RoutingTable::build_with(
            &[
                app("ns", "shop", &["shop.example.com"], routes.clone()),
                app("prod", "shop", &[], routes),
            ],
            &HashMap::new(),
            &access,
        );
        for host in [
            "shop-b.ns",
            "shop-b.ns.svc",
            "SHOP-B.ns.svc.cluster.local:80",
        ] {
            assert_eq!(
                route(&t, Some(host), "/anything", "DELETE", &[]),
                Some("service:shop-b"),
                "{host}"
            );
        }
        // The bare name is in two namespaces: it names neither, and the
        // any-host app of prod takes the request like any unknown host.
        assert_eq!(route(&t, Some("shop-b"), "/x", "GET", &[]), None);
        assert_eq!(route(&t, Some("shop-b"), "/api", "GET", &[]), Some("api"));
        assert_eq!(
            route(&t, Some("shop-b.prod"), "/api", "GET", &[]),
            Some("service:shop-b")
        );
        // A listed host keeps its routes.
        assert_eq!(route(&t, Some("shop.example.com"), "/x", "GET", &[]), None);

        // The gateway port: that workload, whatever the request; a port of
        // a workload the table does not have is not served.
        let own = t.port_route(20001).expect("port 20001");
        assert_eq!(own.backends, vec![(key("ns"), 1)]);
        assert!(own.path.matches("/whatever"));
        assert!(t.port_route(20002).is_none());
        assert_eq!(t.ports(), vec![20001]);
    }

    #[test]
    fn exact_path_beats_any_prefix_and_longer_prefixes_win() {
        let t = shop();
        let host = Some("shop.example.com");
        assert_eq!(route(&t, host, "/api/login", "GET", &[]), Some("login"));
        assert_eq!(route(&t, host, "/api/login/x", "GET", &[]), Some("api"));
        assert_eq!(route(&t, host, "/api/v2/items", "GET", &[]), Some("api-v2"));
        assert_eq!(route(&t, host, "/api/v2", "GET", &[]), Some("api-v2"));
        assert_eq!(
            route(&t, host, "/api", "GET", &[]),
            Some("api"),
            "a trailing / in a prefix is not required"
        );
        assert_eq!(route(&t, host, "/", "GET", &[]), Some("root"));
    }

    #[test]
    fn prefixes_match_whole_segments_only() {
        let t = shop();
        let host = Some("shop.example.com");
        assert_eq!(route(&t, host, "/apiary", "GET", &[]), Some("root"));
        assert_eq!(route(&t, host, "/api/v20", "GET", &[]), Some("api"));
    }

    #[test]
    fn methods_and_headers_refine_a_match() {
        let t = shop();
        let host = Some("shop.example.com");
        assert_eq!(route(&t, host, "/api/x", "POST", &[]), Some("upload"));
        assert_eq!(
            route(&t, host, "/api/x", "GET", &[("x-beta", "on")]),
            Some("beta")
        );
        assert_eq!(
            route(&t, host, "/api/x", "GET", &[("x-beta", "off")]),
            Some("api")
        );
        assert_eq!(
            route(&t, host, "/api/x", "POST", &[("x-beta", "on")]),
            Some("beta"),
            "more header conditions first"
        );
    }

    #[test]
    fn headers_parsed_in_place_match_like_a_header_map() {
        let t = shop();
        let parsed = [
            httparse::Header {
                name: "X-Beta",
                value: b"on",
            },
            httparse::Header {
                name: "accept",
                value: b"*/*",
            },
        ];
        let chosen = t.route(Some("shop.example.com"), "/api/x", "GET", &parsed[..]);
        assert_eq!(chosen.map(|r| r.name.as_str()), Some("beta"));
        let other = [httparse::Header {
            name: "x-beta",
            value: b"ON",
        }];
        let chosen = t.route(Some("shop.example.com"), "/api/x", "GET", &other[..]);
        assert_eq!(
            chosen.map(|r| r.name.as_str()),
            Some("api"),
            "names ignore case, values do not"
        );
    }

    #[test]
    fn hosts_match_exactly_and_apps_without_hosts_take_the_rest() {
        let t = shop();
        assert_eq!(
            route(&t, Some("SHOP.example.com:8080"), "/api/login", "GET", &[]),
            Some("login")
        );
        assert_eq!(
            route(&t, Some("other.example.com"), "/api/login", "GET", &[]),
            Some("other")
        );
        assert_eq!(route(&t, None, "/api", "GET", &[]), Some("other"));
        assert_eq!(
            route(&t, Some("other.example.com"), "/nothing", "GET", &[]),
            None,
            "no match: 404"
        );
        assert_eq!(t.route_count(), 7);
    }

    /// An app is reported programmed only once its AlwaysOn workload has an
    /// endpoint (a Function at zero does not hold it back).
    #[test]
    fn apps_are_programmed_once_their_always_on_workloads_have_endpoints() {
        let routes =
            json!([{"name": "r", "match": {"pathPrefix": "/"}, "backends": [{"workload": "a"}]}]);
        let apps = [app("ns", "shop", &[], routes)];
        let without = RoutingTable::build(&apps, &HashMap::new());
        assert!(without.programmed().is_empty());
        let a = WorkloadKey {
            namespace: "ns".into(),
            app: "shop".into(),
            workload: "a".into(),
        };
        let with = RoutingTable::build(
            &apps,
            &HashMap::from([(a, vec!["10.0.0.1:80".parse().unwrap()])]),
        );
        assert_eq!(with.programmed().len(), 1);
        assert_eq!(with.programmed()[0].app, "shop");
    }

    #[test]
    fn workloads_carry_mode_timeout_and_sorted_endpoints() {
        let key = WorkloadKey {
            namespace: "ns".into(),
            app: "shop".into(),
            workload: "b".into(),
        };
        let endpoints = HashMap::from([(
            key.clone(),
            vec![
                "10.0.0.2:80".parse().unwrap(),
                "10.0.0.1:80".parse().unwrap(),
            ],
        )]);
        let t = RoutingTable::build(
            &[app(
                "ns",
                "shop",
                &[],
                json!([{"name": "r", "match": {"pathPrefix": "/"}, "backends": [{"workload": "b"}]}]),
            )],
            &endpoints,
        );
        let target = t.workload(&key).unwrap();
        assert_eq!(target.mode, Mode::Function);
        assert_eq!(target.request_timeout, Duration::from_secs(30));
        assert_eq!(
            target.endpoints,
            [
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.2:80".parse::<SocketAddr>().unwrap()
            ]
        );
    }

    const SEGMENTS: &[&str] = &["a", "ab", "b", "api", "v1"];

    fn arb_path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(SEGMENTS), 0..4)
            .prop_map(|s| format!("/{}", s.join("/")))
    }

    fn arb_route() -> impl Strategy<Value = serde_json::Value> {
        (
            arb_path(),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec!["GET", "POST"])),
            any::<bool>(),
        )
            .prop_map(|(path, exact, method, header)| {
                let mut m = if exact {
                    json!({"path": path})
                } else {
                    json!({"pathPrefix": path})
                };
                if let Some(method) = method {
                    m["methods"] = json!([method]);
                }
                if header {
                    m["headers"] = json!([{"name": "x-h", "value": "1"}]);
                }
                m
            })
    }

    proptest! {
        #[test]
        fn a_prefix_matches_exactly_the_paths_that_start_with_its_segments(prefix in arb_path(), path in arb_path()) {
            let segments = |p: &str| p.split('/').filter(|s| !s.is_empty()).map(String::from).collect::<Vec<_>>();
            let (p, q) = (segments(&prefix), segments(&path));
            let expected = q.len() >= p.len() && q[..p.len()] == p[..];
            let trimmed = prefix.trim_end_matches('/');
            let matcher = PathMatch::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() });
            prop_assert_eq!(matcher.matches(&path), expected, "{} vs {}", prefix, path);
        }

        #[test]
        fn never_matches_a_less_specific_route_than_the_best(
            matches in prop::collection::vec(arb_route(), 1..12),
            path in arb_path(),
            post in any::<bool>(),
            header in any::<bool>(),
        ) {
            let routes: Vec<_> = matches.iter().enumerate()
                .map(|(i, m)| json!({"name": format!("r{i}"), "match": m, "backends": [{"workload": "a"}]}))
                .collect();
            let t = RoutingTable::build(&[app("ns", "x", &[], json!(routes))], &HashMap::new());
            let method = if post { "POST" } else { "GET" };
            let mut headers = http::HeaderMap::new();
            if header {
                headers.insert("x-h", "1".parse().unwrap());
            }
            // Brute force: every route that matches, and the best specificity among them.
            let all: Vec<&Arc<CompiledRoute>> = t.any_host.iter().filter(|r| r.path.matches(&path) && r.accepts(method, &headers)).collect();
            let chosen = t.route(Some("h"), &path, method, &headers);
            match (all.iter().map(|r| r.specificity()).min(), chosen) {
                (None, None) => {}
                (Some(best), Some(chosen)) => {
                    prop_assert!(chosen.path.matches(&path) && chosen.accepts(method, &headers));
                    prop_assert!(chosen.specificity() == best, "chose {} over a more specific route", chosen.name);
                }
                (best, chosen) => prop_assert!(false, "best {:?}, chosen {:?}", best.is_some(), chosen.map(|c| &c.name)),
            }
        }
    }
}
