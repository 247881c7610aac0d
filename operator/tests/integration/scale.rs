//! Scale to and from zero end to end: the process kubelet, the operator and
//! the gateway as real processes, under their own RBAC.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, PostParams};
use serde_json::json;
use tandem::api::{HybridApp, WorkloadState};
use testenv::{TestNamespace, environment, wait_for};

use crate::gateway::GatewayHandle;
use crate::support::{OperatorProcess, install_crd, operator_kubeconfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_wakes_from_zero_loses_no_request_and_goes_back_to_zero() {
    install_crd().await;
    let ns = TestNamespace::create("wake").await;
    // The backend takes 1 s to start.
    let (operator, gateway) = function_behind_a_gateway(
        &ns,
        "fns",
        json!({"scaleToZeroAfter": "10s", "targetConcurrency": 100}),
        json!([{"name": "ECHO_STARTUP_DELAY_MS", "value": "1000"}]),
    )
    .await;
    let apps: Api<HybridApp> = ns.api();
    let state = || async {
        let app = apps.get("fns").await.map_err(|e| e.to_string())?;
        Ok::<_, String>(
            app.status
                .and_then(|s| s.workloads.first().map(|w| w.state)),
        )
    };
    wait_for(
        "the function to start at zero",
        Duration::from_secs(60),
        || async {
            match state().await? {
                Some(WorkloadState::ScaledToZero) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // 200 concurrent requests, GET and POST with bodies, each with its own id.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let replies: Vec<(String, u16, String)> = futures::stream::iter(0..200)
        .map(|i| {
            let client = client.clone();
            let id = format!("wake-{i}");
            let request = if i % 2 == 0 {
                http::Request::get(gateway.url(&format!("/thumb/{i}")))
                    .header("x-request-id", &id)
                    .body(Full::new(Bytes::new()))
            } else {
                http::Request::post(gateway.url("/upload"))
                    .header("x-request-id", &id)
                    .header("x-echo-body", "1")
                    .body(Full::new(Bytes::from(format!("body of {id}"))))
            }
            .unwrap();
            async move {
                let response = client.request(request).await.expect("an answer");
                let status = response.status().as_u16();
                let body = String::from_utf8_lossy(
                    &response.into_body().collect().await.unwrap().to_bytes(),
                )
                .into_owned();
                (id, status, body)
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let failed: Vec<_> = replies
        .iter()
        .filter(|(_, status, _)| *status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    for (id, _, body) in &replies {
        assert!(body.contains(&format!("request-id={id} ")), "{id}: {body}");
        if id.trim_start_matches("wake-").parse::<u32>().unwrap() % 2 == 1 {
            assert!(
                body.ends_with(&format!("body of {id}")),
                "{id}: body lost: {body}"
            );
        }
    }
    // Every id reached a backend exactly once.
    let pods = environment().running_pods(&ns.name);
    assert!(!pods.is_empty());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for pod in &pods {
        for line in std::fs::read_to_string(&pod.log).unwrap().lines() {
            if let Some(id) = line
                .strip_prefix("request id=")
                .and_then(|rest| rest.split(' ').next())
            {
                *seen.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    for (id, _, _) in &replies {
        assert_eq!(
            seen.get(id).copied(),
            Some(1),
            "{id} reached the backends {:?} times",
            seen.get(id)
        );
    }
    let pids: Vec<u32> = pods.iter().map(|p| p.pid).collect();

    // Idle for scaleToZeroAfter (10 s): back to zero, processes gone.
    let deployments: Api<Deployment> = ns.api();
    wait_for(
        "the function back at zero",
        Duration::from_secs(60),
        || async {
            let replicas = replicas(&deployments, "fns-fn").await?;
            let state = state().await?;
            if replicas == 0 && state == Some(WorkloadState::ScaledToZero) {
                Ok(())
            } else {
                Err(format!("replicas {replicas:?}, state {state:?}"))
            }
        },
    )
    .await;
    wait_for(
        "the function's processes to stop",
        Duration::from_secs(30),
        || async {
            let alive: Vec<&u32> = pids
                .iter()
                .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
                .collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("{alive:?}"))
            }
        },
    )
    .await;
    let log = operator.log_text();
    assert!(
        log.contains("ScaledFromZero") && log.contains("ScaledToZero"),
        "{log}"
    );
    // The status says what the autoscaler decided last, with the numbers.
    let message = wait_for_autoscaled(&apps, "fns", "True", "ScaledToZero").await;
    assert!(
        message.contains("fn: ScaledToZero") && message.contains("-> 0"),
        "{message}"
    );
    operator.assert_never_forbidden();

    // The operator restarts while the function is at zero: the next request
    // still wakes it (the gateway repeats its demand until someone listens).
    operator.kill().await;
    let restarted = OperatorProcess::start_at(
        &ns.name,
        &operator_kubeconfig_again(&ns.name).await,
        "op-2",
        &[],
        Some(operator.autoscaler),
    )
    .await;
    let request = http::Request::get(gateway.url("/after-restart"))
        .header("x-request-id", "after-restart")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("an answer");
    if response.status() != 200 {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = ns.api();
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = ns.api();
        for pod in pods.list(&Default::default()).await.unwrap() {
            eprintln!(
                "pod {} status {:?}",
                pod.metadata.name.unwrap(),
                pod.status.map(|s| (s.phase, s.pod_ip, s.conditions))
            );
        }
        for slice in slices.list(&Default::default()).await.unwrap() {
            eprintln!(
                "slice {} {:?}",
                slice.metadata.name.unwrap(),
                slice.endpoints
            );
        }
    }
    assert_eq!(response.status(), 200);
    restarted.assert_never_forbidden();
}

/// The `Autoscaled` condition of app `name`: status, reason, message.
async fn autoscaled(apps: &Api<HybridApp>, name: &str) -> Result<(String, String, String), String> {
    let app = apps.get(name).await.map_err(|e| e.to_string())?;
    let condition = app
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Autoscaled")
        .ok_or("no Autoscaled condition yet")?;
    Ok((condition.status, condition.reason, condition.message))
}

/// Waits until the `Autoscaled` condition of app `name` has this status and
/// reason (it is written at the autoscaler's tick after a decision); returns
/// its message.
async fn wait_for_autoscaled(
    apps: &Api<HybridApp>,
    name: &str,
    wanted_status: &str,
    wanted_reason: &str,
) -> String {
    wait_for(
        &format!("the Autoscaled condition of {name} to be {wanted_status} {wanted_reason}"),
        Duration::from_secs(60),
        || async {
            let (status, reason, message) = autoscaled(apps, name).await?;
            if status == wanted_status && reason == wanted_reason {
                Ok(message)
            } else {
                Err(format!("{status} {reason}: {message}"))
            }
        },
    )
    .await
}

/// Creates a one-Function app whose every path goes to workload `fn`, and
/// starts an operator and a gateway (sending demand and stats to it).
async fn function_behind_a_gateway(
    ns: &TestNamespace,
    name: &str,
    scaling: serde_json::Value,
    env: serde_json::Value,
) -> (OperatorProcess, GatewayHandle) {
    behind_a_gateway(
        ns,
        name,
        json!({"mode": "Function", "scaling": scaling}),
        env,
        &[],
    )
    .await
}

/// One workload `fn` of app `name` (mode and scaling from `fields`) with a
/// route to it, the operator (with `args`) and a gateway.
async fn behind_a_gateway(
    ns: &TestNamespace,
    name: &str,
    fields: serde_json::Value,
    env: serde_json::Value,
    args: &[&str],
) -> (OperatorProcess, GatewayHandle) {
    let operator =
        OperatorProcess::start(&ns.name, &operator_kubeconfig(&ns.name).await, "op-1", args).await;
    let mut workload = json!({"name": "fn", "port": 8080, "requestTimeout": "90s",
        "template": {"spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "fn", "image": "example/fn:1", "env": env,
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]}}});
    for (key, value) in fields.as_object().expect("fields") {
        workload[key] = value.clone();
    }
    let app: HybridApp = serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": name},
        "spec": {
            "workloads": [workload],
            "routes": [{"name": "all", "match": {"pathPrefix": "/"}, "backends": [{"workload": "fn"}]}]
        }
    }))
    .unwrap();
    let apps: Api<HybridApp> = ns.api();
    apps.create(&PostParams::default(), &app).await.unwrap();
    let gateway = GatewayHandle::for_operator(name, &ns.name, &operator).await;
    (operator, gateway)
}

async fn replicas(deployments: &Api<Deployment>, name: &str) -> Result<i32, String> {
    deployments
        .get(name)
        .await
        .map_err(|e| e.to_string())?
        .spec
        .and_then(|s| s.replicas)
        .ok_or_else(|| "no replicas".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_ramp_scales_up_to_load_over_target_and_back_down_when_it_stops() {
    install_crd().await;
    let ns = TestNamespace::create("ramp").await;
    // 8 requests in flight at a target of 2 per replica (aimed at 70%):
    // between 4 and 6 replicas.
    let (operator, gateway) = function_behind_a_gateway(
        &ns,
        "ramp",
        json!({"targetConcurrency": 2, "maxReplicas": 8, "scaleToZeroAfter": "10s"}),
        json!([]),
    )
    .await;
    let deployments: Api<Deployment> = ns.api();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    // Bounded: 8 workers, at most 240 requests of 250 ms each (60 s).
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let client = client.clone();
            let stop = stop.clone();
            let url = gateway.url(&format!("/work/{w}"));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..240 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let request = http::Request::get(&url)
                        .header("x-echo-delay-ms", "250")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let response = client.request(request).await.expect("an answer");
                    statuses.push(response.status().as_u16());
                    let _ = response.into_body().collect().await;
                }
                statuses
            })
        })
        .collect();
    let peak = wait_for(
        "replicas to rise to about load / target concurrency",
        Duration::from_secs(60),
        || async {
            let n = replicas(&deployments, "ramp-fn").await?;
            assert!(n <= 8, "above maxReplicas: {n}");
            if n >= 4 {
                Ok(n)
            } else {
                Err(format!("{n} replicas"))
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    for worker in workers {
        statuses.extend(worker.await.unwrap());
    }
    assert!(statuses.len() >= 8, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "requests failed while scaling up: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let apps: Api<HybridApp> = ns.api();
    wait_for(
        "the ramp to come back down to zero after the stable window",
        Duration::from_secs(180),
        || async {
            let n = replicas(&deployments, "ramp-fn").await?;
            assert!(n <= 8, "above maxReplicas: {n}");
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} replicas"))
            }
        },
    )
    .await;
    // The rise came from decisions (at once from zero, or in steps).
    let log = operator.log_text();
    assert!(
        log.contains("ScaledUp") || log.contains(&format!("to={peak}")),
        "no decision reached {peak} replicas:\n{log}"
    );
    wait_for_autoscaled(&apps, "ramp", "True", "ScaledToZero").await;
    operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_vanishes_while_busy_never_lets_its_workload_go_to_zero() {
    install_crd().await;
    let ns = TestNamespace::create("vanish").await;
    let (operator, gateway) = function_behind_a_gateway(
        &ns,
        "held",
        json!({"targetConcurrency": 10, "scaleToZeroAfter": "10s"}),
        json!([]),
    )
    .await;
    let deployments: Api<Deployment> = ns.api();
    let apps: Api<HybridApp> = ns.api();
    // Three slow requests keep the function busy...
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let slow: Vec<_> = (0..3)
        .map(|i| {
            let request = http::Request::get(gateway.url(&format!("/slow/{i}")))
                .header("x-echo-delay-ms", "60000")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let client = client.clone();
            tokio::spawn(async move { client.request(request).await.map(|r| r.status()) })
        })
        .collect();
    wait_for("the function to wake", Duration::from_secs(60), || async {
        let n = replicas(&deployments, "held-fn").await?;
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("{n} replicas"))
        }
    })
    .await;
    // ...until the gateway has reported them in flight...
    let running = || environment().running_pods(&ns.name);
    wait_for(
        "the slow requests to reach the backend",
        Duration::from_secs(60),
        || async {
            let lines: usize = running()
                .iter()
                .map(|p| {
                    std::fs::read_to_string(&p.log)
                        .unwrap_or_default()
                        .matches("path=/slow/")
                        .count()
                })
                .sum();
            if lines >= 3 {
                Ok(())
            } else {
                Err(format!("{lines} of 3"))
            }
        },
    )
    .await;
    // At least two stats reports carry them to the operator.
    tokio::time::sleep(tandem::protocol::STATS_INTERVAL * 3).await;
    // ...and then vanishes without a word (SIGKILL).
    drop(gateway);
    for request in slow {
        request.abort();
    }
    let message = wait_for_autoscaled(&apps, "held", "False", "HoldingWithoutSignal").await;
    assert!(
        message.contains("gw-test") && message.contains("holding fn at"),
        "{message}"
    );
    // Past scaleToZeroAfter (10 s), the busy workload is still up.
    for _ in 0..30 {
        assert!(
            replicas(&deployments, "held-fn").await.unwrap() >= 1,
            "scaled a busy workload down while its signal was stale"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Once the gateway is taken for gone, the idle workload goes to zero.
    wait_for(
        "the workload to go to zero once the gateway is forgotten",
        Duration::from_secs(120),
        || async {
            let n = replicas(&deployments, "held-fn").await?;
            let (status, reason, _) = autoscaled(&apps, "held").await?;
            if n == 0 && status == "True" {
                Ok(())
            } else {
                Err(format!("{n} replicas, {status} {reason}"))
            }
        },
    )
    .await;
    operator.assert_never_forbidden();
}

/// A fresh token for the operator's ServiceAccount (the account exists).
async fn operator_kubeconfig_again(namespace: &str) -> std::path::PathBuf {
    let env = environment();
    let client = env.client().await;
    let token = testenv::service_account_token(&client, namespace, "tandem-operator", 3600)
        .await
        .unwrap();
    let file = env
        .control_plane
        .dir
        .join(format!("tandem-operator-{namespace}-2.kubeconfig"));
    let user = format!("system:serviceaccount:{namespace}:tandem-operator");
    std::fs::write(
        &file,
        env.control_plane.kubeconfig_for(&user, &token, namespace),
    )
    .unwrap();
    file
}

/// Cold starts the gateway counted, over all workloads.
fn cold_starts(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("tandem_gateway_cold_starts"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keep_alive_prewarms_a_timer_like_function_before_each_call_and_is_at_zero_between() {
    install_crd().await;
    let ns = TestNamespace::create("timer").await;
    let (_operator, gateway) = function_behind_a_gateway(
        &ns,
        "tick",
        json!({"scaleToZeroAfter": "Auto"}),
        json!([{"name": "ECHO_STARTUP_DELAY_MS", "value": "300"}]),
    )
    .await;
    let deployments: Api<Deployment> = ns.api();
    let apps: Api<HybridApp> = ns.api();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    const PERIOD: Duration = Duration::from_secs(25);
    const CALLS: usize = 8;
    // Calls 1-4 teach the period (the first is cold; while learning the
    // replica is kept); from the 5th on each must find a replica started
    // before it, with zero replicas in between. The first pre-warm's lead
    // comes from one measured start; on a loaded machine the next start
    // can be slower, so the 5th call may find it still starting once: the
    // start it then measures moves the later pre-warms earlier.
    let mut next = tokio::time::Instant::now();
    let mut zero_between = Vec::new();
    let mut cold_per_call = Vec::new();
    for call in 1..=CALLS {
        let mut saw_zero = false;
        while tokio::time::Instant::now() < next {
            if replicas(&deployments, "tick-fn").await == Ok(0) {
                saw_zero = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        next += PERIOD;
        zero_between.push(saw_zero);
        let before = cold_starts(&gateway.metrics().await);
        let status = get(
            &client,
            &gateway.url(&format!("/tick/{call}")),
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(status, 200, "call {call}");
        let after = cold_starts(&gateway.metrics().await);
        cold_per_call.push(after - before);
    }
    let app = apps.get("tick").await.unwrap();
    let autoscaled = app
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Autoscaled"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    eprintln!(
        "cold starts per call {cold_per_call:?}; zero before each call {zero_between:?}; Autoscaled: {autoscaled}"
    );
    assert_eq!(cold_per_call[0], 1.0, "the first call finds zero");
    assert!(
        cold_per_call[5..].iter().all(|&c| c == 0.0) && cold_per_call[4] <= 1.0,
        "after learning, calls were cold: {cold_per_call:?}"
    );
    assert!(
        zero_between[5..].iter().all(|&z| z),
        "not at zero between calls: {zero_between:?}"
    );
    assert!(
        autoscaled.contains("keep-alive Auto (periodic, every 2"),
        "{autoscaled}"
    );
}

/// The status of a GET of `url`, answered within `within`.
async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    within: Duration,
) -> http::StatusCode {
    let request = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    tokio::time::timeout(within, client.request(request))
        .await
        .unwrap_or_else(|_| panic!("an answer within {within:?}"))
        .expect("an answer")
        .status()
}

/// The `fn` placement in `app`'s status.
fn placement_of(app: &HybridApp) -> Option<tandem::api::PlacementStatus> {
    app.status
        .as_ref()?
        .placements
        .iter()
        .find(|p| p.workload == "fn")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_keeps_a_replica_under_steady_load_and_becomes_a_function_at_zero_after_its_dwell()
 {
    use tandem::keepalive::placement::Placement;
    install_crd().await;
    let ns = TestNamespace::create("auto").await;
    let (operator, gateway) = behind_a_gateway(
        &ns,
        "auto",
        json!({"mode": "Auto", "scaling": {"scaleToZeroAfter": "10s"},
            "placement": {"minDwell": "30s", "coldStartBudget": "1%"}}),
        json!([]),
        &["--cost-refresh=5s"],
    )
    .await;
    let deployments: Api<Deployment> = ns.api();
    let apps: Api<HybridApp> = ns.api();
    // Placed AlwaysOn until the traffic is known: a replica from the start,
    // and the placement in status.
    wait_for(
        "a replica and the placement in status",
        Duration::from_secs(60),
        || async {
            let app = apps.get("auto").await.map_err(|e| e.to_string())?;
            let placement = placement_of(&app).ok_or("no placement")?;
            let ready = app
                .status
                .as_ref()
                .and_then(|s| s.workloads.first())
                .is_some_and(|w| w.state == WorkloadState::Ready && w.ready_replicas >= 1);
            if placement.placement == Placement::AlwaysOn && ready {
                Ok(())
            } else {
                Err(format!("{placement:?}, ready {ready}"))
            }
        },
    )
    .await;

    // Steady load: a request every 250 ms for 45 s (bounded: 180 requests),
    // never at zero, still AlwaysOn once a full window was judged.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut lowest = i32::MAX;
    for i in 0..180 {
        let status = get(
            &client,
            &gateway.url(&format!("/steady/{i}")),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(status, 200, "request {i}");
        if i % 8 == 0 {
            lowest = lowest.min(replicas(&deployments, "auto-fn").await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(lowest >= 1, "at zero under steady load");
    let under_load = placement_of(&apps.get("auto").await.unwrap()).expect("a placement");
    eprintln!("under load: {under_load:?}");
    assert_eq!(under_load.placement, Placement::AlwaysOn);
    assert_eq!(under_load.cold_start_percent, Some(0.0), "{under_load:?}");
    assert!(
        under_load.saving_percent.is_some_and(|s| s < 25.0),
        "{under_load:?}"
    );
    assert!(
        under_load.always_on_cost.is_some_and(|c| c > 0.0),
        "priced: {under_load:?}"
    );

    // The load stops: after the keep-alive and enough of a saving, the
    // placement becomes Function and the replica goes.
    let stopped = tokio::time::Instant::now();
    let mut placed_function_after = None;
    let mut zero_after = None;
    while stopped.elapsed() < Duration::from_secs(120) && zero_after.is_none() {
        let app = apps.get("auto").await.unwrap();
        if placed_function_after.is_none()
            && placement_of(&app).is_some_and(|p| p.placement == Placement::Function)
        {
            placed_function_after = Some(stopped.elapsed());
        }
        if replicas(&deployments, "auto-fn").await == Ok(0) {
            zero_after = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let placed = placement_of(&apps.get("auto").await.unwrap()).expect("a placement");
    eprintln!(
        "placed Function after {placed_function_after:?}, zero after {zero_after:?}: {placed:?}"
    );
    let zero_after = zero_after.expect("at zero within 120 s of the load stopping");
    assert_eq!(placed.placement, Placement::Function);
    assert!(placed.since > under_load.since, "the move is dated");
    assert!(
        placed
            .message
            .as_deref()
            .is_some_and(|m| m.contains("saves")),
        "{placed:?}"
    );
    // Not before the keep-alive (10 s) plus a quarter of the window.
    assert!(zero_after >= Duration::from_secs(15), "{zero_after:?}");

    // What it cost: a replica all along but for the time at zero, against
    // one replica all the time (written every 5 s here).
    wait_for(
        "costs in status with the time at zero",
        Duration::from_secs(30),
        || async {
            let app = apps.get("auto").await.map_err(|e| e.to_string())?;
            let status = app.status.ok_or("no status")?;
            let cost = status
                .costs
                .iter()
                .find(|c| c.workload == "fn")
                .ok_or_else(|| format!("no costs: {:?}", status.costs))?;
            let day = &cost.last_day;
            let at_zero = day.replica_hours < day.observed_hours
                && day.cost > 0.0
                && day.cost < day.always_on_cost
                && status
                    .saving
                    .as_deref()
                    .is_some_and(|s| s.ends_with('%') && s != "0%");
            eprintln!("costs: {cost:?}, saving {:?}", status.saving);
            if at_zero {
                Ok(())
            } else {
                Err(format!("{cost:?}, saving {:?}", status.saving))
            }
        },
    )
    .await;

    // At zero it is a Function: a request is held and answered.
    let status = get(&client, &gateway.url("/after"), Duration::from_secs(60)).await;
    assert_eq!(status, 200);

    // The same figures in the metrics.
    let metrics = operator.get("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tandem_workload_cost{")
                && l.contains("workload=\"fn\"")
                && l.contains("window=\"24h\"")),
        "{metrics}"
    );
}
