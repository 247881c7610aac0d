//! Prometheus metrics of the reconciler.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    namespace: String,
    app: String,
    route: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Reconcile counts, failures by reason, durations and writes by kind, and
/// where each route's migration stands.
#[derive(Clone)]
pub struct ControllerMetrics {
    reconciles: Family<ResultLabel, Counter>,
    failures: Family<ReasonLabel, Counter>,
    duration: Histogram,
    writes: Family<KindLabel, Counter>,
    migration_step: Family<RouteLabels, Gauge>,
    migration_applied: Family<RouteLabels, Gauge>,
    migration_running: Family<RouteLabels, Gauge>,
    analysis_requests: Family<RouteLabels, Gauge>,
    analysis_error_rate: Family<RouteLabels, FloatGauge>,
    analysis_p99_latency: Family<RouteLabels, FloatGauge>,
    analysis_p99_cold_wait: Family<RouteLabels, FloatGauge>,
}

impl ControllerMetrics {
    /// Creates the metrics and registers them with `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            writes: Family::default(),
            migration_step: Family::default(),
            migration_applied: Family::default(),
            migration_running: Family::default(),
            analysis_requests: Family::default(),
            analysis_error_rate: Family::default(),
            analysis_p99_latency: Family::default(),
            analysis_p99_cold_wait: Family::default(),
        };
        registry.register(
            "tandem_reconciles",
            "HybridApp reconciles by result",
            metrics.reconciles.clone(),
        );
        registry.register(
            "tandem_reconcile_failures",
            "Failed reconciles by reason",
            metrics.failures.clone(),
        );
        registry.register(
            "tandem_reconcile_duration_seconds",
            "Time spent in one reconcile",
            metrics.duration.clone(),
        );
        registry.register(
            "tandem_writes",
            "Writes to the API server by object kind",
            metrics.writes.clone(),
        );
        registry.register(
            "tandem_route_migration_step",
            "The step a route's latest migration is at (1-based; 0 while pre-warming for the first)",
            metrics.migration_step.clone(),
        );
        registry.register(
            "tandem_route_migration_applied_percent",
            "Percent of the change of a route's latest migration in traffic now",
            metrics.migration_applied.clone(),
        );
        registry.register(
            "tandem_route_migration_running",
            "1 while a route's migration has not ended (Succeeded, RolledBack, Aborted)",
            metrics.migration_running.clone(),
        );
        registry.register(
            "tandem_route_migration_analysis_requests",
            "Requests measured at the latest judgement of a migration step",
            metrics.analysis_requests.clone(),
        );
        registry.register(
            "tandem_route_migration_analysis_error_rate_percent",
            "Error rate measured at the latest judgement of a migration step",
            metrics.analysis_error_rate.clone(),
        );
        registry.register(
            "tandem_route_migration_analysis_p99_latency_seconds",
            "p99 response time measured at the latest judgement of a migration step",
            metrics.analysis_p99_latency.clone(),
        );
        registry.register(
            "tandem_route_migration_analysis_p99_cold_wait_seconds",
            "p99 cold wait measured at the latest judgement of a migration step",
            metrics.analysis_p99_cold_wait.clone(),
        );
        metrics
    }

    /// Shows where the migration of one route stands; `None` removes its
    /// series (a route without a migration has none).
    pub fn migration(
        &self,
        namespace: &str,
        app: &str,
        route: &str,
        state: Option<&crate::api::MigrationStatus>,
    ) {
        let labels = RouteLabels {
            namespace: namespace.into(),
            app: app.into(),
            route: route.into(),
        };
        let Some(state) = state else {
            self.migration_step.remove(&labels);
            self.migration_applied.remove(&labels);
            self.migration_running.remove(&labels);
            self.analysis_requests.remove(&labels);
            self.analysis_error_rate.remove(&labels);
            self.analysis_p99_latency.remove(&labels);
            self.analysis_p99_cold_wait.remove(&labels);
            return;
        };
        self.migration_step
            .get_or_create(&labels)
            .set(i64::from(state.step));
        self.migration_applied
            .get_or_create(&labels)
            .set(i64::from(state.applied));
        self.migration_running
            .get_or_create(&labels)
            .set(i64::from(crate::migration::running(state.phase)));
        if let Some(analysis) = &state.last_analysis {
            let rate = analysis
                .error_rate
                .trim_end_matches('%')
                .parse()
                .unwrap_or(0.0);
            self.analysis_requests
                .get_or_create(&labels)
                .set(analysis.requests);
            self.analysis_error_rate.get_or_create(&labels).set(rate);
            self.analysis_p99_latency
                .get_or_create(&labels)
                .set(analysis.p99_latency_ms as f64 / 1000.0);
            self.analysis_p99_cold_wait
                .get_or_create(&labels)
                .set(analysis.p99_cold_wait_ms as f64 / 1000.0);
        }
    }

    /// Records one reconcile.
    pub fn reconciled(&self, ok: bool, took: Duration) {
        let result = if ok { "success" } else { "error" };
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Records a failure by reason.
    pub fn failure(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Records a write.
    pub fn write(&self, kind: &'static str) {
        self.writes.get_or_create(&KindLabel { kind }).inc();
    }
}
