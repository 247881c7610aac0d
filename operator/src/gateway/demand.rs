//! Sends demand and stats to the operator's autoscaler (see [`crate::protocol`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::sync::watch;

use super::state::Gateway;
use super::table::{RoutingTable, WorkloadKey};
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

/// Where demand and stats go: the autoscaler base URLs, kept current.
pub type Targets = watch::Receiver<Arc<Vec<String>>>;

/// Fixed autoscaler URLs (`--operator-url`).
pub fn fixed_targets(urls: Vec<String>) -> Targets {
    watch::channel(Arc::new(urls)).1
}

/// The ready endpoints of the operator's Service (`--operator-service`),
/// followed through its EndpointSlices. Only the leader acts on what it
/// receives; a standby replica answers 503 at once, so sending to every
/// ready replica costs nothing and survives a failover without a lookup.
pub fn service_targets(client: kube::Client, namespace: &str, service: &str) -> Targets {
    let (sender, receiver) = watch::channel(Arc::new(Vec::new()));
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let changed = Arc::new(tokio::sync::Notify::new());
    let notify = changed.clone();
    let store: Store<EndpointSlice> = crate::watch::spawn_cache(api, config, move |_| {
        notify.notify_one();
        std::future::ready(())
    });
    let service = service.to_string();
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            let urls = autoscaler_urls(&store.state());
            if **sender.borrow() != urls {
                tracing::info!(service = %service, ?urls, "autoscaler endpoints changed");
                sender.send_replace(Arc::new(urls));
            }
        }
    });
    receiver
}

/// `http://ip:port` of every ready endpoint, on the port named
/// [`AUTOSCALER_PORT_NAME`] (or the slice's only port).
pub fn autoscaler_urls(slices: &[Arc<EndpointSlice>]) -> Vec<String> {
    let mut urls = Vec::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(AUTOSCALER_PORT_NAME))
            .or(if ports.len() == 1 {
                ports.first()
            } else {
                None
            })
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready);
            if ready == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                let host = if address.contains(':') {
                    format!("[{address}]")
                } else {
                    address.clone()
                };
                urls.push(format!("http://{host}:{port}"));
            }
        }
    }
    urls.sort();
    urls.dedup();
    urls
}

/// Name of the operator Service's port that the autoscaler listens on.
pub const AUTOSCALER_PORT_NAME: &str = "autoscaler";

/// Runs forever: demand at once when a request is held (and again every
/// [`DEMAND_REPEAT`] while any is), stats every [`STATS_INTERVAL`].
pub async fn run(gateway: Arc<Gateway>, targets: Option<Targets>) {
    let Some(targets) = targets else {
        tracing::info!(
            "neither --operator-url nor --operator-service: demand and stats are not sent (functions are not woken by this gateway)"
        );
        return;
    };
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(500)));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut last_stats = Instant::now();
    let mut told_draining = false;
    let mut tables = gateway.tables.clone();
    // What the last report said was programmed: a new table is reported at
    // once, so the operator learns it serves an app within moments.
    let mut told_programmed: Option<Arc<RoutingTable>> = None;
    loop {
        tokio::select! {
            _ = gateway.demand.notified() => {}
            Ok(()) = tables.changed() => {}
            _ = tokio::time::sleep(DEMAND_REPEAT.min(STATS_INTERVAL)) => {}
        }
        let table = tables.borrow_and_update().clone();
        let new_table = told_programmed
            .as_ref()
            .is_none_or(|told| told.programmed() != table.programmed());
        let targets = targets.borrow().clone();
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
        let draining = gateway.draining.load(Ordering::Relaxed);
        if last_stats.elapsed() >= STATS_INTERVAL || (draining && !told_draining) || new_table {
            told_draining = draining;
            let interval = last_stats.elapsed();
            last_stats = Instant::now();
            let (mut workloads, mut routes) = (Vec::new(), Vec::new());
            for (key, load) in gateway.loads() {
                let workload = reference(&key);
                for (route, meter) in load.routes.read().expect("routes lock").iter() {
                    routes.extend(meter.report(workload.clone(), route));
                }
                let stats = WorkloadStats {
                    workload,
                    in_flight: load.in_flight.load(Ordering::Relaxed),
                    held: load.held.load(Ordering::Relaxed),
                    requests: load.requests.swap(0, Ordering::Relaxed),
                };
                if stats.in_flight > 0 || stats.held > 0 || stats.requests > 0 {
                    workloads.push(stats);
                }
            }
            let stats = Stats {
                gateway: gateway.id.clone(),
                interval_ms: interval.as_millis() as u64,
                workloads,
                routes,
                address: gateway.advertise,
                draining,
                programmed: table.programmed().to_vec(),
            };
            told_programmed = Some(table);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(value: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_value(value).expect("an EndpointSlice"))
    }

    #[test]
    fn autoscaler_urls_are_the_ready_endpoints_on_the_named_port() {
        let slices = [
            slice(serde_json::json!({
                "metadata": {"name": "a"}, "addressType": "IPv4",
                "ports": [{"name": "metrics", "port": 9090}, {"name": "autoscaler", "port": 9092}],
                "endpoints": [
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                    {"addresses": ["10.0.0.4"]},
                ],
            })),
            slice(serde_json::json!({
                "metadata": {"name": "b"}, "addressType": "IPv6",
                "ports": [{"port": 7000}],
                "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": true}}],
            })),
            // Two ports, neither named autoscaler: not a guess.
            slice(serde_json::json!({
                "metadata": {"name": "c"}, "addressType": "IPv4",
                "ports": [{"name": "x", "port": 1}, {"name": "y", "port": 2}],
                "endpoints": [{"addresses": ["10.0.0.9"]}],
            })),
        ];
        assert_eq!(
            autoscaler_urls(&slices),
            [
                "http://10.0.0.2:9092",
                "http://10.0.0.4:9092",
                "http://[fd00::5]:7000"
            ]
        );
    }
}
