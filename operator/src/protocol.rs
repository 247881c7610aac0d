//! The demand and stats protocol between gateways and the operator's
//! autoscaler: the one piece of code, besides the API types, that the data
//! plane and the control plane share.
//!
//! Both messages are small JSON bodies sent by each gateway replica over plain
//! HTTP to every ready operator endpoint (`POST /v1/demand`, `POST /v1/stats`).
//!
//! - **Demand** is sent the moment a request is held for a workload with no
//!   ready endpoint, and repeated every [`DEMAND_REPEAT`] while requests stay
//!   held, so an operator that restarts (or a new leader) learns of the demand
//!   within that interval. It carries the number of held requests.
//! - **Stats** are sent every [`STATS_INTERVAL`]: per workload, requests in
//!   flight and held, and requests started since the last report. A receiver
//!   treats a gateway whose stats are older than a few intervals as gone.
//!
//!   Stats also carry, per route and backend that a migration measures
//!   ([`RouteStats`]), counters since the gateway made them: requests,
//!   5xx answers, a histogram of response times and one of cold waits.
//!
//! Stats also say where the gateway serves workload ports (`address`),
//! whether it is draining, and which HybridApp generations its routing
//! table serves (`programmed`): the operator keeps the live gateways in the
//! EndpointSlices of public Services, and says whether an app is routable,
//! from them ([`crate::fleet`]). A gateway reports at once when its table
//! changes, so an app is routable within moments of being programmed.
//!
//! Messages are idempotent snapshots (no deltas except `requests`), so a lost
//! or duplicated message never corrupts the receiver's view. Route counters
//! only grow while their `series` stays the same: the receiver takes the
//! difference to the last snapshot it saw of the series (a lost message is
//! made up by the next, a repeated one adds nothing), and a new `series`
//! starts from zero.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often a gateway repeats demand while requests are held.
pub const DEMAND_REPEAT: Duration = Duration::from_millis(500);
/// How often a gateway reports stats.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Path of demand messages.
pub const DEMAND_PATH: &str = "/v1/demand";
/// Path of stats messages.
pub const STATS_PATH: &str = "/v1/stats";

/// Names one workload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct WorkloadRef {
    /// Namespace of the HybridApp.
    pub namespace: String,
    /// HybridApp name.
    pub app: String,
    /// Workload name.
    pub workload: String,
}

/// "Requests are waiting for this workload, which has no ready endpoint."
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    /// The reporting gateway replica (its pod name).
    pub gateway: String,
    /// The cold workload.
    pub workload: WorkloadRef,
    /// Requests held for it right now on this gateway.
    pub held: u64,
}

/// Load of one workload as seen by one gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WorkloadStats {
    /// Which workload.
    pub workload: WorkloadRef,
    /// Requests being served by its endpoints now.
    pub in_flight: u64,
    /// Requests held waiting for an endpoint now.
    pub held: u64,
    /// Requests started since the previous report.
    pub requests: u64,
}

/// Upper bounds, in milliseconds, of the buckets of [`RouteStats`]'
/// histograms; a last bucket holds everything slower.
pub const LATENCY_BUCKETS_MS: [u64; 20] = [
    1, 2, 5, 10, 25, 50, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000,
    60000,
];

/// Counters of one route and backend on one gateway since `series` began.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteStats {
    /// The backend.
    pub workload: WorkloadRef,
    /// The route's name.
    pub route: String,
    /// Names this run of the counters: a new value means they restarted
    /// from zero.
    pub series: u64,
    /// Milliseconds since the series began: a receiver that first hears of
    /// a series older than its own view takes its counts as history.
    pub age_ms: u64,
    /// Requests finished.
    pub requests: u64,
    /// Of which answered 5xx (by the backend or the gateway).
    pub errors: u64,
    /// Sum of their response times, in milliseconds.
    pub latency_sum_ms: u64,
    /// Requests per bucket of [`LATENCY_BUCKETS_MS`] (one more for the rest).
    pub latency: Vec<u64>,
    /// Requests that were held for a cold start.
    pub cold_waits: u64,
    /// Held requests per bucket of their wait.
    pub cold_wait: Vec<u64>,
}

/// A HybridApp generation a gateway's routing table holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Programmed {
    /// Namespace of the HybridApp.
    pub namespace: String,
    /// HybridApp name.
    pub app: String,
    /// Its `metadata.generation` in the table.
    pub generation: i64,
}

/// A gateway's periodic report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// The reporting gateway replica.
    pub gateway: String,
    /// Milliseconds covered by `requests`.
    pub interval_ms: u64,
    /// Every workload with traffic or held requests.
    pub workloads: Vec<WorkloadStats>,
    /// Routes with a migration whose counters changed since the last report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteStats>,
    /// Where this gateway serves workload ports (the address the operator
    /// lists in the EndpointSlices of public Services that point at the
    /// gateways); none when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
    /// The gateway is shutting down: take it out of those EndpointSlices.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Every HybridApp its routing table serves, with the generation: the
    /// operator's `RoutesProgrammed` condition is true once every live
    /// gateway serves the current one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programmed: Vec<Programmed>,
}

/// The bucket of [`LATENCY_BUCKETS_MS`] that `ms` falls in.
pub fn bucket_of(ms: u64) -> usize {
    LATENCY_BUCKETS_MS.partition_point(|bound| *bound < ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_json_shape() {
        let demand = Demand {
            gateway: "gw-1".into(),
            workload: WorkloadRef {
                namespace: "shop".into(),
                app: "web".into(),
                workload: "thumbs".into(),
            },
            held: 3,
        };
        let json = serde_json::to_value(&demand).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"gateway": "gw-1", "workload": {"namespace": "shop", "app": "web", "workload": "thumbs"}, "held": 3})
        );
        assert_eq!(serde_json::from_value::<Demand>(json).unwrap(), demand);
    }
}
