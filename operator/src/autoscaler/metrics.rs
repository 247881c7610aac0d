//! The autoscaler's gauges: each workload's replicas (what it asks for and
//! what is ready, labelled with its mode), its cost figures per window, and
//! the workloads held at their scale for want of a signal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::costs::{Costs, Span};
use crate::protocol::WorkloadRef;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    namespace: String,
    app: String,
    workload: String,
    window: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    namespace: String,
    app: String,
    workload: String,
    mode: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// One workload's replicas as the autoscaler sees them at a tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replicas {
    /// The workload.
    pub workload: WorkloadRef,
    /// Its mode as the spec says (`Function`, `AlwaysOn`, `Auto`).
    pub mode: &'static str,
    /// The Deployment's `spec.replicas`: what Tandem (or the HPA) asks for.
    pub desired: u32,
    /// Its ready replicas.
    pub ready: u32,
}

/// The gauges. Clones share the series.
#[derive(Clone, Default)]
pub struct AutoscalerMetrics {
    /// Workloads whose gateways went silent while busy (held at their scale).
    pub holding_without_signal: Gauge,
    replica_hours: Family<CostLabels, FloatGauge>,
    cost: Family<CostLabels, FloatGauge>,
    always_on_cost: Family<CostLabels, FloatGauge>,
    desired: Family<ReplicaLabels, Gauge>,
    ready: Family<ReplicaLabels, Gauge>,
    /// The replica series exported last, to remove those that went away
    /// (a workload gone, or its mode changed).
    replica_series: Arc<Mutex<HashMap<WorkloadRef, ReplicaLabels>>>,
}

impl AutoscalerMetrics {
    /// Creates the gauges and registers them with `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = AutoscalerMetrics::default();
        registry.register(
            "tandem_autoscaler_holding_without_signal",
            "Workloads held at their scale because a gateway went silent while busy",
            metrics.holding_without_signal.clone(),
        );
        registry.register(
            "tandem_workload_replica_hours",
            "Replica-hours a workload ran over the window (1h or 24h)",
            metrics.replica_hours.clone(),
        );
        registry.register(
            "tandem_workload_cost",
            "What those replica-hours cost at the configured prices",
            metrics.cost.clone(),
        );
        registry.register(
            "tandem_workload_always_on_cost",
            "What the same traffic would cost all-AlwaysOn at the workload's minimum",
            metrics.always_on_cost.clone(),
        );
        registry.register(
            "tandem_workload_desired_replicas",
            "Replicas a workload's Deployment asks for (set by Tandem's autoscaler, or the HPA for CPU)",
            metrics.desired.clone(),
        );
        registry.register(
            "tandem_workload_ready_replicas",
            "Ready replicas of a workload's Deployment",
            metrics.ready.clone(),
        );
        metrics
    }

    /// Sets the replica series of `now` and removes those of workloads no
    /// longer listed or listed under another mode.
    pub fn export_replicas(&self, now: &[Replicas]) {
        let mut series = self.replica_series.lock().unwrap();
        let mut next = HashMap::with_capacity(now.len());
        for r in now {
            let labels = ReplicaLabels {
                namespace: r.workload.namespace.clone(),
                app: r.workload.app.clone(),
                workload: r.workload.workload.clone(),
                mode: r.mode,
            };
            self.desired
                .get_or_create(&labels)
                .set(i64::from(r.desired));
            self.ready.get_or_create(&labels).set(i64::from(r.ready));
            next.insert(r.workload.clone(), labels);
        }
        for (workload, labels) in series.drain() {
            if next.get(&workload) != Some(&labels) {
                self.desired.remove(&labels);
                self.ready.remove(&labels);
            }
        }
        *series = next;
    }

    /// Sets every series from `costs`, and removes those of workloads gone.
    pub fn export(&self, costs: &Costs, gone: &[WorkloadRef]) {
        let labels = |w: &WorkloadRef, span: Span| CostLabels {
            namespace: w.namespace.clone(),
            app: w.app.clone(),
            workload: w.workload.clone(),
            window: span.label(),
        };
        for span in [Span::Hour, Span::Day] {
            for workload in gone {
                let labels = labels(workload, span);
                self.replica_hours.remove(&labels);
                self.cost.remove(&labels);
                self.always_on_cost.remove(&labels);
            }
            for workload in costs.workloads() {
                let Some(f) = costs.figures(workload, span) else {
                    continue;
                };
                let labels = labels(workload, span);
                self.replica_hours
                    .get_or_create(&labels)
                    .set(f.replica_hours);
                self.cost.get_or_create(&labels).set(f.cost);
                self.always_on_cost
                    .get_or_create(&labels)
                    .set(f.always_on_cost);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    fn replicas(workload: &str, mode: &'static str, desired: u32, ready: u32) -> Replicas {
        Replicas {
            workload: WorkloadRef {
                namespace: "ns".into(),
                app: "shop".into(),
                workload: workload.into(),
            },
            mode,
            desired,
            ready,
        }
    }

    #[test]
    fn replica_series_follow_the_workloads_and_their_mode() {
        let mut registry = Registry::default();
        let metrics = AutoscalerMetrics::register(&mut registry);
        metrics.export_replicas(&[
            replicas("fn", "Function", 2, 1),
            replicas("web", "AlwaysOn", 3, 3),
        ]);
        let text = encoded(&registry);
        assert!(
            text.contains(
                r#"tandem_workload_desired_replicas{namespace="ns",app="shop",workload="fn",mode="Function"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tandem_workload_ready_replicas{namespace="ns",app="shop",workload="fn",mode="Function"} 1"#
            ),
            "{text}"
        );
        // web is gone, fn became Auto: only fn's Auto series are left.
        metrics.export_replicas(&[replicas("fn", "Auto", 0, 0)]);
        let text = encoded(&registry);
        assert!(!text.contains(r#"workload="web""#), "{text}");
        assert!(!text.contains(r#"mode="Function""#), "{text}");
        assert!(
            text.contains(
                r#"tandem_workload_desired_replicas{namespace="ns",app="shop",workload="fn",mode="Auto"} 0"#
            ),
            "{text}"
        );
    }
}
