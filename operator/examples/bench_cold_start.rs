//! `bench/cold-start`: what Tandem adds on top of a Function's own start.
//!
//! The local control plane, the process kubelet, `tandem operator` and
//! `tandem gateway` (release builds) run as in production. A Function whose
//! backend takes 500 ms to start is put at zero, then one request is sent
//! through the gateway; the time to the response head minus those 500 ms is
//! the orchestration overhead (demand signal, scale write, Deployment and
//! ReplicaSet controllers, binding, process start, readiness, EndpointSlice,
//! forwarding). Repeated `--runs` times (default 30); prints p50, p90, p99 and
//! `cold_start_overhead_p50_ms=<x>`.
//!
//! In the same loop, the baseline: a plain Deployment of the same pod (no
//! Tandem), scaled 0→1 directly, its EndpointSlice watched until the pod is
//! ready, and the request sent straight to the pod. What Kubernetes itself
//! takes to start a pod is in both; Tandem's own share is the difference:
//! of the medians, and the p90 of the per-run differences. Prints
//! `cold_start_tandem_share_p50_ms=<x>` last.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tandem::api::HybridApp;

// Each benchmark uses part of the shared module.
#[allow(dead_code)]
mod common;
use common::{Stack, wait};

const STARTUP_MS: u64 = 500;
const NAMESPACE: &str = "cold";
/// The baseline's Deployment and Service (no Tandem).
const DIRECT: &str = "direct-fn";

/// Percentile `q` of sorted `values` (nearest rank).
fn at(values: &[f64], q: f64) -> f64 {
    values[((values.len() as f64 - 1.0) * q).round() as usize]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values
}

/// The baseline: a Deployment and Service of the same pod, without Tandem.
async fn create_direct(client: &kube::Client, pod_spec: &serde_json::Value) -> Result<()> {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": DIRECT},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": DIRECT}},
                 "template": {"metadata": {"labels": {"app": DIRECT}}, "spec": pod_spec}}
    }))?;
    Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &deployment)
        .await?;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": DIRECT},
        "spec": {"selector": {"app": DIRECT}, "ports": [{"port": 8080, "targetPort": 8080}]}
    }))?;
    Api::<Service>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &service)
        .await?;
    Ok(())
}

fn scale(replicas: i32) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"spec": {"replicas": replicas}}))
}

/// One cold start without Tandem: scale to one, wait for the EndpointSlice
/// to show a ready pod, request it directly. Returns the time from the scale
/// write to the response head.
async fn direct_cold_start(
    client: &kube::Client,
    http: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
) -> Result<Duration> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let config = watcher::Config::default().labels(&format!("kubernetes.io/service-name={DIRECT}"));
    // The last run's pod must be gone from the slice first.
    wait(
        "the baseline's EndpointSlice to show no ready pod",
        || async {
            slices
                .list(
                    &kube::api::ListParams::default()
                        .labels(&format!("kubernetes.io/service-name={DIRECT}")),
                )
                .await
                .is_ok_and(|list| {
                    list.items.iter().all(|slice| {
                        slice
                            .endpoints
                            .iter()
                            .flatten()
                            .all(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(true))
                    })
                })
        },
    )
    .await?;
    // Watching before the write, so no change is missed.
    let mut events = std::pin::pin!(watcher(slices, config).applied_objects());
    let start = Instant::now();
    Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .patch(DIRECT, &PatchParams::default(), &scale(1))
        .await?;
    let address = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(slice) = events.next().await {
            let ready = slice?.endpoints.into_iter().flatten().find_map(|e| {
                let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                ready.then(|| e.addresses.first().cloned()).flatten()
            });
            if let Some(address) = ready {
                return Ok(address);
            }
        }
        bail!("the EndpointSlice watch ended")
    })
    .await
    .context("no ready endpoint for the baseline after 60 s")??;
    let request =
        http::Request::get(format!("http://{address}:8080/work")).body(Full::new(Bytes::new()))?;
    let response = tokio::time::timeout(Duration::from_secs(30), http.request(request)).await??;
    let took = start.elapsed();
    if response.status() != 200 {
        bail!("baseline: status {}", response.status());
    }
    Ok(took)
}

#[tokio::main]
async fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(30);
    let stack = Stack::start(NAMESPACE, false).await?;
    let (client, kubelet) = (stack.client.clone(), &stack.kubelet);
    let gateway_port = stack.gateway_port;

    let pod_spec = json!({"terminationGracePeriodSeconds": 1, "containers": [{"name": "fn", "image": "example/fn:1",
        "env": [{"name": "ECHO_STARTUP_DELAY_MS", "value": STARTUP_MS.to_string()}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]});
    let app: HybridApp = serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "cold"},
        "spec": {
            "workloads": [{"name": "fn", "mode": "Function", "port": 8080, "requestTimeout": "30s",
                "template": {"spec": pod_spec}}],
            "routes": [{"name": "fn", "match": {"pathPrefix": "/"}, "backends": [{"workload": "fn"}]}]
        }
    }))?;
    create_direct(&client, &pod_spec).await?;
    Api::<HybridApp>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &app)
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    wait("the Function's Deployment", || async {
        deployments
            .get_opt("cold-fn")
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await?;
    let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://127.0.0.1:{gateway_port}/work");

    println!(
        "bench/cold-start: {runs} cold starts of a Function whose backend starts in {STARTUP_MS} ms"
    );
    let (mut overheads, mut direct, mut tandem_times) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // The baseline first: start one pod without Tandem, then stop it.
        let baseline = direct_cold_start(&client, &http).await?;
        deployments
            .patch(DIRECT, &PatchParams::default(), &scale(0))
            .await?;

        // Let the gateways' stats (every second) report the last request as
        // done before forcing zero, as the autoscaler itself would only scale
        // to zero after scaleToZeroAfter; otherwise a report still showing
        // that request held would wake the Function again.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // Put it at zero (as the autoscaler would) and wait until nothing runs.
        let zero = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "cold-fn"}, "spec": {"replicas": 0}});
        deployments
            .patch(
                "cold-fn",
                &PatchParams::apply(tandem::api::contract::AUTOSCALER_MANAGER).force(),
                &Patch::Apply(&zero),
            )
            .await?;
        wait("the Function and the baseline at zero", || async {
            kubelet.pods().iter().all(|p| p.namespace != NAMESPACE)
        })
        .await?;
        // Let the gateway see the endpoints go.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stack.check()?;
        let start = Instant::now();
        let request = http::Request::get(&url).body(Full::new(Bytes::new()))?;
        let response =
            tokio::time::timeout(Duration::from_secs(30), http.request(request)).await??;
        let took = start.elapsed();
        if response.status() != 200 {
            bail!("run {run}: status {}", response.status());
        }
        let overhead = took.as_secs_f64() * 1000.0 - STARTUP_MS as f64;
        let (ms, baseline_ms) = (took.as_secs_f64() * 1000.0, baseline.as_secs_f64() * 1000.0);
        println!(
            "run {run:>2}: first byte after {ms:>7.1} ms, overhead {overhead:>6.1} ms; baseline {baseline_ms:>7.1} ms; Tandem's share {:>6.1} ms",
            ms - baseline_ms
        );
        overheads.push(overhead);
        tandem_times.push(ms);
        direct.push(baseline_ms);
    }
    let shares = sorted(
        tandem_times
            .iter()
            .zip(&direct)
            .map(|(t, d)| t - d)
            .collect(),
    );
    let (overheads, direct, tandem_times) =
        (sorted(overheads), sorted(direct), sorted(tandem_times));
    println!(
        "overhead over the backend's own {STARTUP_MS} ms start: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms (max {:.1})",
        at(&overheads, 0.5),
        at(&overheads, 0.9),
        at(&overheads, 0.99),
        overheads[overheads.len() - 1]
    );
    println!(
        "baseline (Deployment scaled 0->1 directly, EndpointSlice watched, request to the pod): p50 {:.1} ms, p90 {:.1} ms",
        at(&direct, 0.5),
        at(&direct, 0.9)
    );
    println!(
        "through Tandem: p50 {:.1} ms, p90 {:.1} ms; Tandem's share: difference of medians {:.1} ms, p90 of per-run differences {:.1} ms",
        at(&tandem_times, 0.5),
        at(&tandem_times, 0.9),
        at(&tandem_times, 0.5) - at(&direct, 0.5),
        at(&shares, 0.9)
    );
    stack.stop().await;
    println!("cold_start_overhead_p50_ms={:.1}", at(&overheads, 0.5));
    println!(
        "cold_start_tandem_share_p50_ms={:.1}",
        at(&tandem_times, 0.5) - at(&direct, 0.5)
    );
    Ok(())
}
