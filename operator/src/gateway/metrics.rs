//! Prometheus metrics of the gateway.

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

/// Requests, latency, in-flight, held requests and cold starts.
#[derive(Clone)]
pub struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    unrouted: Counter,
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

    /// Records a finished request.
    pub fn observe(
        &self,
        route: &str,
        key: &WorkloadKey,
        status: http::StatusCode,
        took: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                namespace: key.namespace.clone(),
                app: key.app.clone(),
                route: route.to_string(),
                workload: key.workload.clone(),
                code: status.as_u16(),
            })
            .inc();
        self.latency
            .get_or_create(&key.into())
            .observe(took.as_secs_f64());
    }

    /// Records a request without a route.
    pub fn request_without_route(&self) {
        self.unrouted.inc();
    }

    /// Sets the in-flight gauge.
    pub fn in_flight(&self, key: &WorkloadKey, value: u64) {
        self.in_flight.get_or_create(&key.into()).set(value as i64);
    }

    /// Sets the held gauge.
    pub fn held(&self, key: &WorkloadKey, value: u64) {
        self.held.get_or_create(&key.into()).set(value as i64);
    }

    /// Counts a cold start.
    pub fn cold_start(&self, key: &WorkloadKey) {
        self.cold_starts.get_or_create(&key.into()).inc();
    }

    /// Records how long a held request waited.
    pub fn cold_wait(&self, key: &WorkloadKey, waited: Duration) {
        self.cold_wait
            .get_or_create(&key.into())
            .observe(waited.as_secs_f64());
    }
}
