//! Prometheus metrics of the gateway. Series of a workload are removed when
//! it leaves the routing table (see [`super::state::Gateway::prune`]), so
//! pod and app churn does not grow them without bound.

use std::collections::HashMap;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::table::WorkloadKey;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    namespace: String,
    app: String,
    route: String,
    workload: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadLabels {
    namespace: String,
    app: String,
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    origin: &'static str,
    kind: &'static str,
}

impl From<&WorkloadKey> for WorkloadLabels {
    fn from(key: &WorkloadKey) -> Self {
        Self {
            namespace: key.namespace.clone(),
            app: key.app.clone(),
            workload: key.workload.clone(),
        }
    }
}

fn latency_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// Requests, latency, in-flight, held requests, cold starts, errors and
/// connections.
#[derive(Clone)]
pub struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    unrouted: Counter,
    errors: Family<ErrorLabels, Counter>,
    connections: Gauge,
    refused_connections: Counter,
    latency: Family<WorkloadLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<WorkloadLabels, Gauge>,
    held: Family<WorkloadLabels, Gauge>,
    cold_starts: Family<WorkloadLabels, Counter>,
    cold_wait: Family<WorkloadLabels, Histogram, fn() -> Histogram>,
}

impl GatewayMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            unrouted: Counter::default(),
            errors: Family::default(),
            connections: Gauge::default(),
            refused_connections: Counter::default(),
            latency: Family::new_with_constructor(latency_buckets),
            in_flight: Family::default(),
            held: Family::default(),
            cold_starts: Family::default(),
            cold_wait: Family::new_with_constructor(latency_buckets),
        };
        registry.register(
            "tandem_gateway_requests",
            "Requests by route, workload and status code",
            metrics.requests.clone(),
        );
        registry.register(
            "tandem_gateway_unrouted_requests",
            "Requests that matched no route (404)",
            metrics.unrouted.clone(),
        );
        registry.register(
            "tandem_gateway_errors",
            "Requests the gateway failed or refused, by origin (client, upstream, gateway) and kind",
            metrics.errors.clone(),
        );
        registry.register(
            "tandem_gateway_connections",
            "Open client connections",
            metrics.connections.clone(),
        );
        registry.register(
            "tandem_gateway_refused_connections",
            "Client connections answered 503 because --max-connections were open",
            metrics.refused_connections.clone(),
        );
        registry.register(
            "tandem_gateway_request_duration_seconds",
            "Time to the response head, cold wait included",
            metrics.latency.clone(),
        );
        registry.register(
            "tandem_gateway_in_flight",
            "Requests being served by a workload's endpoints",
            metrics.in_flight.clone(),
        );
        registry.register(
            "tandem_gateway_held",
            "Requests held while a function starts (queue depth)",
            metrics.held.clone(),
        );
        registry.register(
            "tandem_gateway_cold_starts",
            "Bursts of requests that found a function at zero",
            metrics.cold_starts.clone(),
        );
        registry.register(
            "tandem_gateway_cold_wait_seconds",
            "Time a held request waited for an endpoint",
            metrics.cold_wait.clone(),
        );
        metrics
    }

    /// Records a request without a route.
    pub fn request_without_route(&self) {
        self.unrouted.inc();
    }

    /// Counts a failed or refused request.
    pub fn error(&self, origin: &'static str, kind: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { origin, kind })
            .inc();
    }

    /// The gauge of open client connections.
    pub fn connections(&self) -> &Gauge {
        &self.connections
    }

    /// Counts a connection refused for the connection cap.
    pub fn refused_connection(&self) {
        self.refused_connections.inc();
    }

    /// Handles on one workload's metrics, looked up once and then used
    /// without building labels on every request.
    pub fn workload(&self, key: &WorkloadKey) -> WorkloadMetrics {
        let labels: WorkloadLabels = key.into();
        WorkloadMetrics {
            key: key.clone(),
            families: self.clone(),
            by_route: Default::default(),
            latency: self.latency.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            held: self.held.get_or_create(&labels).clone(),
            cold_starts: self.cold_starts.get_or_create(&labels).clone(),
            cold_wait: self.cold_wait.get_or_create(&labels).clone(),
            labels,
        }
    }
}

/// The request counters of one workload by route and code, and whether its
/// series were removed: a request that finishes after its workload left the
/// table must not bring a series back that nothing would remove again.
#[derive(Default)]
struct RouteCounters {
    removed: bool,
    counters: super::table::FastMap<String, HashMap<u16, Counter>>,
}

/// One workload's metrics.
pub struct WorkloadMetrics {
    key: WorkloadKey,
    labels: WorkloadLabels,
    families: GatewayMetrics,
    by_route: std::sync::RwLock<RouteCounters>,
    /// Time to the response head, cold wait included.
    pub latency: Histogram,
    /// Requests in flight to its endpoints.
    pub in_flight: Gauge,
    /// Requests held while it starts.
    pub held: Gauge,
    /// Bursts that found it at zero.
    pub cold_starts: Counter,
    /// Time held requests waited.
    pub cold_wait: Histogram,
}

impl WorkloadMetrics {
    fn request_labels(&self, route: &str, code: u16) -> RequestLabels {
        RequestLabels {
            namespace: self.key.namespace.clone(),
            app: self.key.app.clone(),
            route: route.to_string(),
            workload: self.key.workload.clone(),
            code,
        }
    }

    /// Records a finished request on `route` with `status`.
    pub fn observe(&self, route: &str, status: http::StatusCode, took: Duration) {
        self.latency.observe(took.as_secs_f64());
        let code = status.as_u16();
        if let Some(counter) = self
            .by_route
            .read()
            .expect("metrics lock")
            .counters
            .get(route)
            .and_then(|c| c.get(&code))
        {
            counter.inc();
            return;
        }
        // Created under the write lock that `remove` takes, so a series is
        // either made before the removal (and removed by it) or not at all.
        let mut by_route = self.by_route.write().expect("metrics lock");
        if by_route.removed {
            return;
        }
        let counter = self
            .families
            .requests
            .get_or_create(&self.request_labels(route, code))
            .clone();
        counter.inc();
        by_route
            .counters
            .entry(route.to_string())
            .or_default()
            .insert(code, counter);
    }

    /// Removes the request series of routes that `keep` rejects.
    pub fn retain_routes(&self, keep: impl Fn(&str) -> bool) {
        let mut by_route = self.by_route.write().expect("metrics lock");
        self.retain_locked(&mut by_route, keep);
    }

    fn retain_locked(&self, by_route: &mut RouteCounters, keep: impl Fn(&str) -> bool) {
        by_route.counters.retain(|route, codes| {
            if keep(route) {
                return true;
            }
            for code in codes.keys() {
                self.families
                    .requests
                    .remove(&self.request_labels(route, *code));
            }
            false
        });
    }

    /// Removes every series of this workload.
    pub fn remove(&self) {
        let mut by_route = self.by_route.write().expect("metrics lock");
        by_route.removed = true;
        self.retain_locked(&mut by_route, |_| false);
        drop(by_route);
        let families = &self.families;
        families.latency.remove(&self.labels);
        families.in_flight.remove(&self.labels);
        families.held.remove(&self.labels);
        families.cold_starts.remove(&self.labels);
        families.cold_wait.remove(&self.labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(registry: &Registry) -> Vec<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains("workload=\""))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_request_that_finishes_after_its_workload_left_makes_no_series() {
        let mut registry = Registry::default();
        let metrics = GatewayMetrics::register(&mut registry);
        let key = WorkloadKey {
            namespace: "ns".into(),
            app: "app".into(),
            workload: "web".into(),
        };
        let web = metrics.workload(&key);
        web.observe("r", http::StatusCode::OK, Duration::from_millis(3));
        assert!(series(&registry).iter().any(|l| l.contains("code=\"200\"")));

        web.remove();
        assert_eq!(series(&registry), Vec::<String>::new());
        // The request in flight during the removal finishes now.
        web.observe("r", http::StatusCode::BAD_GATEWAY, Duration::from_millis(3));
        web.observe("r", http::StatusCode::OK, Duration::from_millis(3));
        assert_eq!(series(&registry), Vec::<String>::new());
    }
}
