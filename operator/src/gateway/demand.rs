//! Sends demand and stats to the operator's autoscaler (see [`crate::protocol`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::proxy::Gateway;
use super::table::WorkloadKey;
use crate::protocol::{
    DEMAND_PATH, DEMAND_REPEAT, Demand, STATS_INTERVAL, STATS_PATH, Stats, WorkloadRef,
    WorkloadStats,
};

fn reference(key: &WorkloadKey) -> WorkloadRef {
    WorkloadRef {
        namespace: key.namespace.clone(),
        app: key.app.clone(),
        workload: key.workload.clone(),
    }
}

/// Runs forever: demand at once when a request is held (and again every
/// [`DEMAND_REPEAT`] while any is), stats every [`STATS_INTERVAL`].
pub async fn run(gateway: Arc<Gateway>, targets: Vec<String>) {
    if targets.is_empty() {
        tracing::info!(
            "no --operator-url: demand and stats are not sent (functions are not woken by this gateway)"
        );
        return;
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(500)));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut last_stats = Instant::now();
    loop {
        tokio::select! {
            _ = gateway.demand.notified() => {}
            _ = tokio::time::sleep(DEMAND_REPEAT.min(STATS_INTERVAL)) => {}
        }
        for (key, load) in gateway.loads() {
            let held = load.held.load(Ordering::Relaxed);
            if held > 0 {
                let demand = Demand {
                    gateway: gateway.id.clone(),
                    workload: reference(&key),
                    held,
                };
                post_all(&client, &targets, DEMAND_PATH, &demand).await;
            }
        }
        if last_stats.elapsed() >= STATS_INTERVAL {
            let interval = last_stats.elapsed();
            last_stats = Instant::now();
            let workloads = gateway
                .loads()
                .into_iter()
                .map(|(key, load)| WorkloadStats {
                    workload: reference(&key),
                    in_flight: load.in_flight.load(Ordering::Relaxed),
                    held: load.held.load(Ordering::Relaxed),
                    requests: load.requests.swap(0, Ordering::Relaxed),
                })
                .filter(|w| w.in_flight > 0 || w.held > 0 || w.requests > 0)
                .collect();
            let stats = Stats {
                gateway: gateway.id.clone(),
                interval_ms: interval.as_millis() as u64,
                workloads,
            };
            post_all(&client, &targets, STATS_PATH, &stats).await;
        }
    }
}

async fn post_all<T: serde::Serialize>(
    client: &Client<HttpConnector, Full<Bytes>>,
    targets: &[String],
    path: &str,
    message: &T,
) {
    let Ok(body) = serde_json::to_vec(message) else {
        return;
    };
    let sends = targets.iter().map(|target| {
        let request = http::Request::post(format!("{}{path}", target.trim_end_matches('/')))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.clone())));
        async move {
            let Ok(request) = request else { return };
            match tokio::time::timeout(Duration::from_secs(1), client.request(request)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::debug!(%error, path, "send to the autoscaler"),
                Err(_) => tracing::debug!(path, "send to the autoscaler timed out"),
            }
        }
    });
    futures::future::join_all(sends).await;
}
