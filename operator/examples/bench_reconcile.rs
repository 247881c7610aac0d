//! `bench/reconcile`: how close the operator comes to the lower bound of
//! creating the same children by hand.
//!
//! Each round, in a fresh namespace each:
//! - **direct**: one client creates N HybridApps and server-side-applies
//!   their children (built by the same pure functions the operator uses)
//!   itself, 8 apps at a time.
//! - **operator**: the same client creates N HybridApps; a `tandem operator`
//!   process (8 concurrent reconciles, release build) creates the children and
//!   reports status. Done when every app is Ready with
//!   `observedGeneration == generation` (Ready needs all its Deployments seen).
//!   The operator's peak RSS and CPU seconds (from its start to convergence)
//!   are read from /proc.
//!
//! Requests are counted from the API server's audit log, per user.
//! Functions start at zero, so no pods run. Prints medians over the rounds and
//! `reconcile_vs_direct_apply=<operator time / direct time>` last.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use serde_json::json;
use tandem::api::HybridApp;
use tandem::controller::children;
use testenv::ControlPlane;
use testenv::controlplane::Options;

const CONCURRENCY: usize = 8;

struct Args {
    apps: usize,
    rounds: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        apps: 300,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().context("flag without value")?;
        match flag.as_str() {
            "--apps" => args.apps = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            other => bail!("unknown flag {other} (use --apps N --rounds R)"),
        }
    }
    Ok(args)
}

fn app(name: &str) -> HybridApp {
    let workload = |n: &str| {
        json!({"name": n, "mode": "Function", "port": 8080,
               "template": {"spec": {"containers": [{"name": "fn", "image": format!("example/{n}:1")}]}}})
    };
    serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": name},
        "spec": {
            "workloads": [workload("a"), workload("b"), workload("c")],
            "routes": [
                {"name": "a", "match": {"pathPrefix": "/a"}, "backends": [{"workload": "a"}]},
                {"name": "bc", "match": {"pathPrefix": "/bc"}, "backends": [{"workload": "b", "weight": 50}, {"workload": "c", "weight": 50}]}
            ]
        }
    }))
    .expect("app")
}

/// Requests by `user` in `namespace` recorded in the audit log.
fn count_requests(audit: &std::path::Path, user: &str, namespace: &str) -> Result<usize> {
    let text = std::fs::read_to_string(audit)?;
    let mut ids = BTreeSet::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if event["user"]["username"] == user && event["objectRef"]["namespace"] == namespace {
            ids.insert(event["auditID"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(ids.len())
}

async fn namespace(client: &kube::Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

async fn delete_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(name, &DeleteParams::default()).await?;
    let start = Instant::now();
    while namespaces.get_opt(name).await?.is_some() {
        if start.elapsed() > Duration::from_secs(300) {
            bail!("namespace {name} not deleted after 300s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// The lower bound: one client creates each app and applies its children.
async fn direct(client: &kube::Client, ns: &str, n: usize) -> Result<Duration> {
    let apps: Api<HybridApp> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let apps = apps.clone();
            let client = client.clone();
            async move {
                let created = apps
                    .create(&PostParams::default(), &app(&format!("app{i:04}")))
                    .await?;
                // The same objects the operator writes: a gateway port for
                // each workload reached through the gateways, no gateway live.
                let placement = children::Placement {
                    gateways: Vec::new(),
                    ports: created
                        .spec
                        .workloads
                        .iter()
                        .enumerate()
                        .map(|(j, w)| (w.name.clone(), 20000 + ((i * 16 + j) % 10000) as u16))
                        .collect(),
                };
                for child in children::build(&created, &placement) {
                    let mut deployment = child.deployment.clone();
                    deployment["spec"]["replicas"] = json!(child.initial_replicas);
                    let params = PatchParams::apply("bench-direct").force();
                    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), ns)
                        .patch(&child.name, &params, &Patch::Apply(&deployment))
                        .await?;
                    let services =
                        Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns);
                    services
                        .patch(&child.name, &params, &Patch::Apply(&child.service))
                        .await?;
                    services
                        .patch(
                            &child.private_name,
                            &params,
                            &Patch::Apply(&child.private_service),
                        )
                        .await?;
                    let slices = Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(
                        client.clone(),
                        ns,
                    );
                    for slice in &child.endpoint_slices {
                        let name = slice["metadata"]["name"].as_str().unwrap_or_default();
                        slices.patch(name, &params, &Patch::Apply(slice)).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(start.elapsed())
}

/// The operator: the client only creates the apps.
async fn operator(
    client: &kube::Client,
    ns: &str,
    n: usize,
    kubeconfig: &std::path::Path,
    logs: &std::path::Path,
) -> Result<OperatorRun> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let tandem = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("tandem"))
        .context("locate the tandem binary")?;
    let process = testenv::process::spawn(testenv::process::ProcessSpec {
        program: tandem.display().to_string(),
        args: vec![
            "operator".into(),
            format!("--watch-namespace={ns}"),
            format!("--lease-namespace={ns}"),
            format!("--admin-address=127.0.0.1:{port}"),
            "--autoscaler-address=127.0.0.1:0".into(),
            format!("--max-concurrent-reconciles={CONCURRENCY}"),
        ],
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        log: logs.join(format!("bench-operator-{ns}.log")),
        netns: None,
    })?;
    let ready_url = format!("http://127.0.0.1:{port}/readyz");
    let wait_start = Instant::now();
    while !matches!(testenv::http_client::get(&ready_url).await, Ok(a) if a.body.contains("leading, watches synced"))
    {
        if wait_start.elapsed() > Duration::from_secs(60) || !process.is_running() {
            bail!("the operator did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let apps: Api<HybridApp> = Api::namespaced(client.clone(), ns);
    // Converged apps are followed with one watch: polling with lists would
    // load the API server (the bottleneck here) far more than the operator.
    let (converged_tx, mut converged) = tokio::sync::mpsc::unbounded_channel::<String>();
    let follower = tokio::spawn({
        let apps = apps.clone();
        async move {
            let events = kube::runtime::watcher(apps, Default::default())
                .default_backoff()
                .applied_objects();
            let mut events = std::pin::pin!(events);
            while let Some(Ok(app)) = events.next().await {
                let status = app.status.as_ref();
                let done = status.and_then(|s| s.observed_generation) == app.metadata.generation
                    && status.is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    });
                if done
                    && converged_tx
                        .send(app.metadata.name.unwrap_or_default())
                        .is_err()
                {
                    return;
                }
            }
        }
    });
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let apps = apps.clone();
            async move {
                apps.create(&PostParams::default(), &app(&format!("app{i:04}")))
                    .await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let mut done = BTreeSet::new();
    while done.len() < n {
        let left = Duration::from_secs(900).saturating_sub(start.elapsed());
        match tokio::time::timeout(left, converged.recv()).await {
            Ok(Some(name)) => {
                done.insert(name);
            }
            _ => bail!("only {} of {n} apps converged after 900s", done.len()),
        }
    }
    follower.abort();
    let took = start.elapsed();
    let run = OperatorRun {
        took,
        peak_rss_mib: testenv::process::peak_rss_bytes(process.pid()).unwrap_or(0) as f64
            / (1024.0 * 1024.0),
        cpu_seconds: testenv::process::cpu_seconds(process.pid()).unwrap_or(0.0),
    };
    process.terminate(Duration::from_secs(10)).await;
    Ok(run)
}

/// One operator round: time to converge, and the process's peak resident
/// memory and CPU time (user + system) from its start to convergence.
struct OperatorRun {
    took: Duration,
    peak_rss_mib: f64,
    cpu_seconds: f64,
}

/// CPU seconds per control-plane process between two readings, as text.
fn cpu_since(before: &[(&str, f64)], after: &[(&str, f64)]) -> String {
    after
        .iter()
        .filter_map(|(name, cpu)| {
            let start = before.iter().find(|(n, _)| n == name)?.1;
            Some(format!("{name} {:.1}s", cpu - start))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let control_plane = ControlPlane::start_with(Options {
        audit_log: true,
        ..Options::default()
    })
    .await?;
    let client = control_plane.client().await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.patch(
        "hybridapps.tandem.dev",
        &PatchParams::apply("bench").force(),
        &Patch::Apply(HybridApp::crd()),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The operator runs as its own user so its requests can be told apart.
    namespace(&client, "bench-system").await?;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "operator"}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), "bench-system")
        .create(&PostParams::default(), &sa)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "bench-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": "bench-system"}]
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let token = testenv::service_account_token(&client, "bench-system", "operator", 7200).await?;
    let operator_user = "system:serviceaccount:bench-system:operator";
    let kubeconfig = control_plane.dir.join("bench-operator.kubeconfig");
    std::fs::write(
        &kubeconfig,
        control_plane.kubeconfig_for(operator_user, &token, "default"),
    )?;
    let logs = control_plane.dir.join("logs");

    println!(
        "bench/reconcile: {} HybridApps of 3 Function workloads (12 children each: per workload a Deployment, a public and a private Service, an EndpointSlice), {} rounds, {CONCURRENCY} at a time",
        args.apps, args.rounds
    );
    let (mut direct_times, mut operator_times, mut direct_requests, mut operator_requests) =
        (vec![], vec![], vec![], vec![]);
    let (mut rss, mut cpu) = (vec![], vec![]);
    for round in 0..args.rounds {
        let ns = format!("direct-{round}");
        namespace(&client, &ns).await?;
        let before = control_plane.cpu_seconds();
        let took = direct(&client, &ns, args.apps).await?;
        let direct_cpu = cpu_since(&before, &control_plane.cpu_seconds());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let requests = count_requests(&control_plane.audit_log(), "tandem-admin", &ns)?;
        println!(
            "round {round} direct:   {:>7.2}s  {requests:>6} requests  control plane CPU {direct_cpu}",
            took.as_secs_f64()
        );
        direct_times.push(took.as_secs_f64());
        direct_requests.push(requests as f64);
        delete_namespace(&client, &ns).await?;

        let ns = format!("operator-{round}");
        namespace(&client, &ns).await?;
        let before = control_plane.cpu_seconds();
        let run = operator(&client, &ns, args.apps, &kubeconfig, &logs).await?;
        let operator_cpu = cpu_since(&before, &control_plane.cpu_seconds());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let requests = count_requests(&control_plane.audit_log(), operator_user, &ns)?;
        println!(
            "round {round} operator: {:>7.2}s  {requests:>6} requests  control plane CPU {operator_cpu}  operator: peak RSS {:.1} MiB, CPU {:.2}s",
            run.took.as_secs_f64(),
            run.peak_rss_mib,
            run.cpu_seconds
        );
        operator_times.push(run.took.as_secs_f64());
        rss.push(run.peak_rss_mib);
        cpu.push(run.cpu_seconds);
        operator_requests.push(requests as f64);
        delete_namespace(&client, &ns).await?;
    }
    let (d, o) = (median(direct_times), median(operator_times));
    let (dr, or) = (median(direct_requests), median(operator_requests));
    println!(
        "direct apply:  median {d:.2}s, {dr:.0} requests ({:.1} per app)",
        dr / args.apps as f64
    );
    println!(
        "operator:      median {o:.2}s, {or:.0} requests ({:.1} per app)",
        or / args.apps as f64
    );
    println!("requests ratio {:.2}", or / dr);
    println!("operator_peak_rss_mib={:.1}", median(rss));
    println!("operator_cpu_seconds={:.2}", median(cpu));
    println!("reconcile_vs_direct_apply={:.2}", o / d);
    Ok(())
}
