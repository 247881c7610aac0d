//! Prometheus metrics of the reconciler.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

/// Reconcile counts, failures by reason, durations and writes by kind.
#[derive(Clone)]
pub struct ControllerMetrics {
    reconciles: Family<ResultLabel, Counter>,
    failures: Family<ReasonLabel, Counter>,
    duration: Histogram,
    writes: Family<KindLabel, Counter>,
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
        metrics
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
