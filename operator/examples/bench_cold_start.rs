//! `bench/cold-start`: what Tandem adds on top of a Function's own start.
//!
//! The local control plane, the process kubelet, `tandem operator` and
//! `tandem gateway` (release builds) run as in production. A Function whose
//! backend takes 500 ms to start is put at zero, then one request is sent
//! through the gateway; the time to the response head minus those 500 ms is
//! the orchestration overhead (demand signal, scale write, Deployment and
//! ReplicaSet controllers, binding, process start, readiness, EndpointSlice,
//! forwarding). Repeated `--runs` times (default 30); prints p50, p90, p99 and
//! `cold_start_overhead_p50_ms=<x>` last.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::CustomResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tandem::api::HybridApp;
use testenv::process::{ProcessSpec, spawn};
use testenv::{ControlPlane, KubeletConfig, ProcessKubelet};

const STARTUP_MS: u64 = 500;
const NAMESPACE: &str = "cold";

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(30);
    let exe_dir = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .context("target dir")?
        .to_path_buf();
    let tandem = exe_dir.join("tandem");
    let echo = exe_dir.join("testenv");

    let control_plane = ControlPlane::start().await?;
    let kubelet = ProcessKubelet::start(&control_plane, KubeletConfig::new(echo)).await?;
    let client = control_plane.client().await?;
    Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(client.clone())
        .patch("hybridapps.tandem.dev", &PatchParams::apply("bench").force(), &Patch::Apply(HybridApp::crd()))
        .await?;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let logs = control_plane.dir.join("logs");
    let (admin, autoscaler, gateway_port, gateway_admin) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let kubeconfig = control_plane.kubeconfig.display().to_string();
    let operator = spawn(ProcessSpec {
        program: tandem.display().to_string(),
        args: vec![
            "operator".into(),
            format!("--watch-namespace={NAMESPACE}"),
            format!("--lease-namespace={NAMESPACE}"),
            format!("--admin-address=127.0.0.1:{admin}"),
            format!("--autoscaler-address=127.0.0.1:{autoscaler}"),
        ],
        env: vec![("KUBECONFIG".into(), kubeconfig.clone())],
        log: logs.join("bench-operator.log"),
        netns: None,
    })?;
    let gateway = spawn(ProcessSpec {
        program: tandem.display().to_string(),
        args: vec![
            "gateway".into(),
            format!("--namespace={NAMESPACE}"),
            format!("--listen=127.0.0.1:{gateway_port}"),
            format!("--admin-address=127.0.0.1:{gateway_admin}"),
            format!("--operator-url=http://127.0.0.1:{autoscaler}"),
        ],
        env: vec![("KUBECONFIG".into(), kubeconfig)],
        log: logs.join("bench-gateway.log"),
        netns: None,
    })?;

    let app: HybridApp = serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "cold"},
        "spec": {
            "workloads": [{"name": "fn", "mode": "Function", "port": 8080, "requestTimeout": "30s",
                "template": {"spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "fn", "image": "example/fn:1",
                    "env": [{"name": "ECHO_STARTUP_DELAY_MS", "value": STARTUP_MS.to_string()}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]}}}],
            "routes": [{"name": "fn", "match": {"pathPrefix": "/"}, "backends": [{"workload": "fn"}]}]
        }
    }))?;
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
    let mut overheads = Vec::new();
    for run in 0..runs {
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
        wait("the Function at zero", || async {
            kubelet.pods().iter().all(|p| p.namespace != NAMESPACE)
        })
        .await?;
        // Let the gateway see the endpoints go.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !operator.is_running() || !gateway.is_running() {
            bail!("the operator or the gateway exited; see {}", logs.display());
        }
        let start = Instant::now();
        let request = http::Request::get(&url).body(Full::new(Bytes::new()))?;
        let response =
            tokio::time::timeout(Duration::from_secs(30), http.request(request)).await??;
        let took = start.elapsed();
        if response.status() != 200 {
            bail!("run {run}: status {}", response.status());
        }
        let overhead = took.as_secs_f64() * 1000.0 - STARTUP_MS as f64;
        println!(
            "run {run:>2}: first byte after {:>7.1} ms, overhead {overhead:>6.1} ms",
            took.as_secs_f64() * 1000.0
        );
        overheads.push(overhead);
    }
    overheads.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| overheads[((overheads.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "overhead over the backend's own {STARTUP_MS} ms start: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms (max {:.1})",
        at(0.5),
        at(0.9),
        at(0.99),
        overheads[overheads.len() - 1]
    );
    operator.terminate(Duration::from_secs(5)).await;
    gateway.terminate(Duration::from_secs(5)).await;
    drop(kubelet);
    println!("cold_start_overhead_p50_ms={:.1}", at(0.5));
    Ok(())
}
