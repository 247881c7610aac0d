//! `bench/services`: what Tandem's hop costs a caller of a Service.
//!
//! On the local control plane with the real kube-proxy, one HybridApp has
//! two workloads running the same echo pod, one replica each: `direct`
//! (AlwaysOn, scaled on CPU: its Service selects its pod, so kube-proxy
//! sends a caller straight to it) and `fn` (a Function, kept warm: its
//! Service points at the gateway's port for it, so kube-proxy sends a caller
//! to the gateway, which forwards to the pod). `wrk` runs inside the pod
//! network against each cluster IP in turn, `--rounds` times (default 3),
//! and the medians are compared. Last line:
//! `tandem_vs_direct_throughput=<x> tandem_vs_direct_p99=<y>`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::json;
use tandem::api::HybridApp;

// Each benchmark uses part of the shared module.
#[allow(dead_code)]
mod common;
use common::{Stack, wait};

const NAMESPACE: &str = "services";

/// Runs a command in the pod network and returns its stdout.
fn in_pod_network(netns: &str, program: &str, args: &[&str]) -> Result<String> {
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .output()
        .with_context(|| format!("run {program} in {netns}"))?;
    if !output.status.success() {
        bail!(
            "{program} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A wrk duration (`812.00us`, `1.20ms`, `2.01s`) in milliseconds.
fn millis(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

/// Requests per second, p50 and p99 in milliseconds, from `wrk --latency`.
fn parse_wrk(output: &str) -> Result<(f64, f64, f64)> {
    let field = |label: &str| {
        output
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(label))
            .map(str::trim)
            .with_context(|| format!("no {label} in wrk's output:\n{output}"))
    };
    let rps: f64 = field("Requests/sec:")?.parse()?;
    let p50 = millis(field("50%")?).context("p50")?;
    let p99 = millis(field("99%")?).context("p99")?;
    if output.contains("Non-2xx") {
        bail!("answers other than 2xx:\n{output}");
    }
    Ok((rps, p50, p99))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(3);
    let stack = Stack::start(NAMESPACE, true).await?;
    let client = stack.client.clone();
    let netns = stack.control_plane.network.namespace();
    let node_ip = stack.control_plane.network.node_ip().to_string();
    let logs = stack.logs.clone();

    let pod = json!({"spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "echo", "image": "example/echo:1",
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}}]}});
    let app: HybridApp = serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "svc"},
        "spec": {
            "workloads": [
                {"name": "direct", "mode": "AlwaysOn", "port": 8080, "template": pod,
                 "scaling": {"minReplicas": 1, "maxReplicas": 1, "metric": "cpu"}},
                {"name": "fn", "mode": "Function", "port": 8080, "template": pod,
                 "scaling": {"maxReplicas": 1, "scaleToZeroAfter": "1h"}}
            ],
            "routes": [{"name": "all", "match": {"pathPrefix": "/"}, "backends": [{"workload": "direct"}]}]
        }
    }))?;
    Api::<HybridApp>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &app)
        .await?;

    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    wait("the function's Service to point at the gateway", || async {
        slices
            .get_opt("svc-fn-gateways")
            .await
            .ok()
            .flatten()
            .is_some_and(|s| {
                s.endpoints
                    .iter()
                    .flatten()
                    .any(|e| e.addresses.contains(&node_ip))
            })
    })
    .await?;
    let mut targets = Vec::new();
    for (workload, path) in [("direct", "direct"), ("fn", "through Tandem")] {
        let name = format!("svc-{workload}");
        let ip = services
            .get(&name)
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .context("a cluster IP")?;
        let url = format!("http://{ip}/bench");
        let host = format!("Host: {name}.{NAMESPACE}");
        // Warm (the function wakes from zero on the first call).
        let start = Instant::now();
        while in_pod_network(
            &netns,
            "curl",
            &["-sf", "--max-time", "30", "-H", &host, &url],
        )
        .is_err()
        {
            if start.elapsed() > Duration::from_secs(90) {
                bail!(
                    "{name} does not answer on {url}; logs in {}",
                    logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        targets.push((path, url, host));
    }

    println!(
        "bench/services: wrk -t2 -c32 -d10s from the pod network to a Service's cluster IP (kube-proxy), {rounds} rounds, one echo pod behind each"
    );
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); 2];
    for round in 0..rounds {
        for (index, (path, url, host)) in targets.iter().enumerate() {
            stack.check()?;
            let output = in_pod_network(
                &netns,
                "wrk",
                &["-t2", "-c32", "-d10s", "--latency", "-H", host, url],
            )?;
            let (rps, p50, p99) = parse_wrk(&output)?;
            println!(
                "round {round}: {path:<14} {rps:>9.0} req/s, p50 {p50:>6.2} ms, p99 {p99:>6.2} ms"
            );
            results[index].0.push(rps);
            results[index].1.push(p50);
            results[index].2.push(p99);
        }
    }
    let summary: Vec<(f64, f64, f64)> = results
        .into_iter()
        .map(|(rps, p50, p99)| (median(rps), median(p50), median(p99)))
        .collect();
    for ((path, _, _), (rps, p50, p99)) in targets.iter().zip(&summary) {
        println!("median {path:<14} {rps:>9.0} req/s, p50 {p50:>6.2} ms, p99 {p99:>6.2} ms");
    }
    let (direct, through) = (summary[0], summary[1]);
    stack.stop().await;
    println!(
        "tandem_vs_direct_throughput={:.2} tandem_vs_direct_p99={:.2}",
        through.0 / direct.0,
        through.2 / direct.2
    );
    Ok(())
}
