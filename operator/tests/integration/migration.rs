//! Moving a route between an always-on workload and a function, end to end:
//! the process kubelet, the operator and the gateway as real processes, real
//! HTTP traffic through the gateway, time scaled down to seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tandem::api::{HybridApp, MigrationPhase};
use testenv::{TestNamespace, environment, wait_for};
use tokio::time::Instant;

use crate::gateway::GatewayHandle;
use crate::support::{OperatorProcess, install_crd, operator_kubeconfig};

/// A route `search` on `web` (AlwaysOn) at 100, `fn` (a Function at zero)
/// at 0, with `migration`; `fn_env` goes into the function's container.
fn app(migration: Value, fn_env: Value) -> HybridApp {
    let container = |name: &str, env: &Value| {
        json!({"name": name, "image": format!("example/{name}:1"), "env": env,
               "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}})
    };
    serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "shop"},
        "spec": {
            "workloads": [
                {"name": "web", "mode": "AlwaysOn", "port": 8080,
                 "template": {"spec": {"terminationGracePeriodSeconds": 1, "containers": [container("web", &json!([]))]}}},
                {"name": "fn", "mode": "Function", "port": 8080, "requestTimeout": "60s",
                 "scaling": {"scaleToZeroAfter": "10s", "targetConcurrency": 20},
                 "template": {"spec": {"terminationGracePeriodSeconds": 1, "containers": [container("fn", &fn_env)]}}}
            ],
            "routes": [{"name": "search", "match": {"pathPrefix": "/search"}, "migration": migration,
                        "backends": [{"workload": "web", "weight": 100}, {"workload": "fn", "weight": 0}]}]
        }
    }))
    .unwrap()
}

struct Setup {
    ns: TestNamespace,
    operator: OperatorProcess,
    kubeconfig: std::path::PathBuf,
    gateway: GatewayHandle,
    apps: Api<HybridApp>,
}

/// Creates the app, an operator and a gateway, and waits until `web` is
/// ready, `fn` is at zero and the gateway sends `/search` to `web`.
async fn setup(name: &str, migration: Value, fn_env: Value) -> Setup {
    setup_with(name, migration, fn_env, &[]).await
}

/// [`setup`] with arguments for the operator.
async fn setup_with(name: &str, migration: Value, fn_env: Value, operator_args: &[&str]) -> Setup {
    install_crd().await;
    let ns = TestNamespace::create(name).await;
    let kubeconfig = operator_kubeconfig(&ns.name).await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", operator_args).await;
    let apps: Api<HybridApp> = ns.api();
    apps.create(&PostParams::default(), &app(migration, fn_env))
        .await
        .unwrap();
    let gateway = GatewayHandle::for_operator("migration", &ns.name, &operator).await;
    wait_for(
        "web to answer through the gateway",
        Duration::from_secs(90),
        || async {
            let answer = testenv::http_client::get(&gateway.url("/search/ready"))
                .await
                .map_err(|e| e.to_string())?;
            if answer.status == 200 && answer.body.contains("pod=shop-web-") {
                Ok(())
            } else {
                Err(format!("{} {}", answer.status, answer.body))
            }
        },
    )
    .await;
    Setup {
        ns,
        operator,
        kubeconfig,
        gateway,
        apps,
    }
}

/// Sets the route's weights (what Git would do), without a resourceVersion
/// (the operator writes status meanwhile).
async fn set_weights(apps: &Api<HybridApp>, web: i32, fun: i32) {
    let mut routes = apps.get("shop").await.unwrap().spec.routes;
    routes[0].backends[0].weight = Some(web);
    routes[0].backends[1].weight = Some(fun);
    let patch = json!({"spec": {"routes": routes}});
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// One answered request: when, which workload, status.
#[derive(Clone, Debug)]
struct Answer {
    at: Instant,
    workload: String,
    status: u16,
}

/// Steady load on `/search` from `clients` connections until `stop` (or
/// at most `limit` requests or 150 s).
fn load(
    gateway: &GatewayHandle,
    clients: usize,
    limit: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Answer>> {
    let url = gateway.url("/search/q");
    tokio::spawn(async move {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let deadline = Instant::now() + Duration::from_secs(150);
        let per_client = limit / clients;
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    while answers.len() < per_client
                        && !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        let request = http::Request::get(&url)
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        let (status, workload) = match tokio::time::timeout(
                            Duration::from_secs(30),
                            client.request(request),
                        )
                        .await
                        {
                            Ok(Ok(response)) => {
                                let pod = response
                                    .headers()
                                    .get("x-pod-name")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                let status = response.status().as_u16();
                                let _ = response.into_body().collect().await;
                                let workload = if pod.starts_with("shop-fn-") {
                                    "fn"
                                } else if pod.starts_with("shop-web-") {
                                    "web"
                                } else {
                                    "?"
                                };
                                (status, workload.to_string())
                            }
                            _ => (0, "?".to_string()),
                        };
                        answers.push(Answer {
                            at: Instant::now(),
                            workload,
                            status,
                        });
                    }
                    answers
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_by_key(|a| a.at);
        all
    })
}

/// The route's migration as the API server has it: when it began, its
/// phase, the applied share and fn's effective weight.
type Seen = (String, MigrationPhase, i32, i32);

async fn seen(apps: &Api<HybridApp>) -> Option<Seen> {
    seen_in(apps.get("shop").await.ok()?)
}

fn seen_in(app: HybridApp) -> Option<Seen> {
    let route = app
        .status?
        .routes
        .into_iter()
        .find(|r| r.name == "search")?;
    let fn_weight = route.weights.get("fn").copied().unwrap_or(0);
    let m = route.migration?;
    Some((m.started.0.to_string(), m.phase, m.applied, fn_weight))
}

/// (phase, applied, effective weight of fn), or `None` before a migration.
async fn migration_state(apps: &Api<HybridApp>) -> Option<(MigrationPhase, i32, i32)> {
    seen(apps)
        .await
        .map(|(_, phase, applied, weight)| (phase, applied, weight))
}

/// The migration as seen at each change of its start, phase or applied share.
type History = Vec<(Instant, Option<Seen>)>;

/// Records every change of the migration with the time it was seen, until
/// `stop` (at most 15 minutes).
fn follow(apps: Api<HybridApp>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<History> {
    tokio::spawn(async move {
        let mut history: History = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(900);
        let key = |s: &Option<Seen>| s.as_ref().map(|(t, p, a, _)| (t.clone(), *p, *a));
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            // A failed read is no news; a read without a migration is.
            if let Ok(app) = apps.get("shop").await {
                let now = seen_in(app);
                if history
                    .last()
                    .is_none_or(|(_, last)| key(last) != key(&now))
                {
                    history.push((Instant::now(), now));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        history
    })
}

/// Steady load from `clients` connections while the route's weights change
/// from 100/0 to 0/100, until the migration is in `phase` and `after` more.
/// Returns the answers and each state the migration went through (time
/// seen, phase, applied share, fn's effective weight).
async fn migrate_under_load(
    setup: &Setup,
    clients: usize,
    phase: MigrationPhase,
    timeout: Duration,
    after: Duration,
) -> (Vec<Answer>, Vec<(Instant, MigrationPhase, i32, i32)>) {
    let apps = &setup.apps;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&setup.gateway, clients, 400_000, stop.clone());
    let history = follow(apps.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    set_weights(apps, 0, 100).await;
    wait_for(
        &format!("the migration to be {phase:?}"),
        timeout,
        || async {
            match migration_state(apps).await {
                Some((now, ..)) if now == phase => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    tokio::time::sleep(after).await;
    stop.store(true, Ordering::Relaxed);
    let answers = traffic.await.unwrap();
    let states: Vec<_> = history
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(at, seen)| {
            seen.map(|(_, phase, applied, weight)| (at, phase, applied, weight))
        })
        .collect();
    eprintln!("states: {states:?}");
    (answers, states)
}

async fn condition(apps: &Api<HybridApp>, type_: &str) -> Option<(String, String, String)> {
    let app = apps.get("shop").await.ok()?;
    app.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason, c.message))
}

async fn events(ns: &TestNamespace, reason: &str) -> Vec<String> {
    let events: Api<Event> = ns.api();
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}

/// Cold starts the gateway counted for `fn`.
async fn cold_starts(gateway: &GatewayHandle) -> f64 {
    gateway
        .metrics()
        .await
        .lines()
        .filter(|l| {
            l.starts_with("tandem_gateway_cold_starts_total") && l.contains("workload=\"fn\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_migration_walks_its_steps_with_the_traffic_it_says() {
    let setup = setup(
        "migrate",
        json!({"steps": [5, 25, 50, 100], "stepInterval": "4s", "progressDeadline": "60s",
               "analysis": {"maxErrorRate": "1%", "minRequests": 20}}),
        json!([{"name": "ECHO_STARTUP_DELAY_MS", "value": "500"}]),
    )
    .await;
    let apps = setup.apps.clone();
    let (answers, states) = migrate_under_load(
        &setup,
        8,
        MigrationPhase::Succeeded,
        Duration::from_secs(120),
        Duration::from_secs(2),
    )
    .await;

    let failed: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed, first {:?}",
        failed.len(),
        answers.len(),
        failed.first()
    );
    assert_eq!(
        cold_starts(&setup.gateway).await,
        0.0,
        "a client met a cold start"
    );

    // Each step's share of requests, away from its edges (the gateway
    // applies a change a moment after the API server has it).
    let applied: Vec<i32> = states.iter().map(|(_, _, a, _)| *a).collect();
    assert!(
        applied.windows(2).all(|w| w[0] <= w[1]),
        "effective weights went back: {states:?}"
    );
    let mut steps = BTreeMap::new();
    for (i, (from, phase, _, weight)) in states.iter().enumerate() {
        if *phase != MigrationPhase::Progressing {
            continue;
        }
        let until = states.get(i + 1).map(|s| s.0).unwrap_or_else(Instant::now);
        let (from, until) = (
            *from + Duration::from_millis(500),
            until - Duration::from_millis(300),
        );
        let inside: Vec<&Answer> = answers
            .iter()
            .filter(|a| a.at > from && a.at < until)
            .collect();
        let to_fn = inside.iter().filter(|a| a.workload == "fn").count();
        let share = to_fn as f64 * 100.0 / inside.len().max(1) as f64;
        eprintln!(
            "step at {weight}%: {to_fn} of {} requests to fn ({share:.2}%)",
            inside.len()
        );
        assert!(
            inside.len() >= 1000,
            "too few requests measured at {weight}%: {}",
            inside.len()
        );
        assert!(
            (share - f64::from(*weight)).abs() <= 2.0,
            "at {weight}% fn got {share:.2}% of {} requests",
            inside.len()
        );
        steps.insert(*weight, share);
    }
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        vec![5, 25, 50, 100],
        "{states:?}"
    );
    let (status, reason, _) = condition(&apps, "Migrated").await.unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Migrated"));
    let metrics = setup.operator.get("/metrics").await.unwrap();
    for (name, value) in [
        ("tandem_route_migration_step", "4"),
        ("tandem_route_migration_applied_percent", "100"),
        ("tandem_route_migration_running", "0"),
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("route=\"search\""))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
        assert!(line.ends_with(&format!(" {value}")), "{line}");
    }
    assert!(
        metrics.contains("tandem_route_migration_analysis_requests{"),
        "{metrics}"
    );
    wait_for("the step events", Duration::from_secs(20), || async {
        let steps = events(&setup.ns, "MigrationStep").await;
        let done = events(&setup.ns, "Migrated").await;
        if steps.len() >= 4 && done.len() == 1 {
            Ok(())
        } else {
            Err(format!("{steps:?} {done:?}"))
        }
    })
    .await;
    setup.operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_fails_is_rolled_back_at_its_first_gate() {
    let setup = setup(
        "rollback",
        json!({"steps": [10, 50, 100], "stepInterval": "5s", "rollbackGrace": "20s",
               "analysis": {"maxErrorRate": "1%", "minRequests": 50}}),
        json!([{"name": "ECHO_FAIL_PERCENT", "value": "20"}]),
    )
    .await;
    let apps = setup.apps.clone();
    // Traffic goes on for a while at the baseline after the rollback.
    let (answers, states) = migrate_under_load(
        &setup,
        4,
        MigrationPhase::RolledBack,
        Duration::from_secs(90),
        Duration::from_secs(3),
    )
    .await;

    let started = states
        .iter()
        .find(|s| s.1 == MigrationPhase::Progressing)
        .expect("a step ran")
        .0;
    let rolled_back = states
        .iter()
        .find(|s| s.1 == MigrationPhase::RolledBack)
        .expect("rolled back")
        .0;
    // Within one stats interval (1 s) and the gateway's reaction, nothing
    // more reaches fn.
    let late: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.workload == "fn" && a.at > rolled_back + Duration::from_millis(1500))
        .collect();
    assert!(
        late.is_empty(),
        "{} requests reached fn after the rollback",
        late.len()
    );
    let exposed = answers.iter().filter(|a| a.workload == "fn").count();
    let window = rolled_back.duration_since(started).as_secs_f64().max(0.001);
    let rate = answers
        .iter()
        .filter(|a| a.at >= started && a.at <= rolled_back)
        .count() as f64
        / window;
    // At most step weight × interval × rate.
    let bound = 0.10 * 5.0 * rate;
    eprintln!(
        "exposed {exposed} requests to fn in {window:.1}s at {rate:.0} req/s (bound {bound:.0})"
    );
    assert!(
        exposed as f64 <= bound,
        "{exposed} requests reached fn (bound {bound:.0})"
    );
    assert!(exposed >= 50, "the gate needs 50 requests: {exposed}");
    let errors = answers.iter().filter(|a| a.status != 200).count();
    assert!(
        errors as f64 <= exposed as f64 * 0.25,
        "{errors} errors of {exposed} to fn"
    );

    let app = apps.get("shop").await.unwrap();
    let route = &app.status.as_ref().unwrap().routes[0];
    assert_eq!(
        route.weights,
        BTreeMap::from([("fn".into(), 0), ("web".into(), 100)])
    );
    let m = route.migration.as_ref().unwrap();
    let analysis = m.last_analysis.as_ref().unwrap();
    assert_eq!(analysis.result, "Failed");
    let rate: f64 = analysis.error_rate.trim_end_matches('%').parse().unwrap();
    assert!((15.0..=25.0).contains(&rate), "{analysis:?}");
    let (status, reason, message) = condition(&apps, "Migrated").await.unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "RolledBack"));
    assert!(message.contains("error rate"), "{message}");
    let (stalled, reason, _) = condition(&apps, "Stalled").await.unwrap();
    assert_eq!((stalled.as_str(), reason.as_str()), ("True", "RolledBack"));
    wait_for("the RolledBack event", Duration::from_secs(20), || async {
        let notes = events(&setup.ns, "RolledBack").await;
        if notes.iter().any(|n| n.contains("error rate")) {
            Ok(())
        } else {
            Err(format!("{notes:?}"))
        }
    })
    .await;
    // Not retried while the spec stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(
        migration_state(&apps).await,
        Some((MigrationPhase::RolledBack, 0, 0))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_traffic_holds_then_stalls_with_the_reason() {
    let setup = setup(
        "stall",
        json!({"steps": [50, 100], "stepInterval": "1s", "progressDeadline": "6s",
               "analysis": {"minRequests": 50}}),
        json!([]),
    )
    .await;
    let apps = setup.apps.clone();
    let helper = crate::support::health_helper();
    set_weights(&apps, 0, 100).await;
    // What Flux (kstatus) and Argo CD say all along.
    let seen = std::sync::Mutex::new(Vec::new());
    wait_for(
        "the migration to stall",
        Duration::from_secs(90),
        || async {
            let app = apps.get("shop").await.map_err(|e| e.to_string())?;
            let verdict = crate::support::health(&helper, &app);
            let phase = migration_state(&apps).await;
            let mut seen = seen.lock().unwrap();
            if seen.last().map(|(p, v)| (p, v)) != Some((&phase, &verdict)) {
                seen.push((phase, verdict));
            }
            match phase {
                Some((MigrationPhase::Stalled, 50, 50)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let seen = seen.into_inner().unwrap();
    eprintln!("health through the migration: {seen:?}");
    let running: Vec<_> = seen
        .iter()
        .filter(|(phase, _)| matches!(phase, Some((MigrationPhase::Progressing, _, _))))
        .collect();
    assert!(!running.is_empty(), "{seen:?}");
    for (_, ((kstatus, _), (argo, _))) in &running {
        assert_eq!(
            (kstatus.as_str(), argo.as_str()),
            ("InProgress", "Progressing"),
            "{seen:?}"
        );
    }
    let app = apps.get("shop").await.unwrap();
    let ((kstatus, _), (argo, message)) = crate::support::health(&helper, &app);
    assert_eq!(
        (kstatus.as_str(), argo.as_str()),
        ("Failed", "Degraded"),
        "{message}"
    );
    assert!(message.contains("of 50 requests"), "{message}");
    let (status, reason, message) = condition(&apps, "Stalled").await.unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Stalled"));
    assert!(message.contains("of 50 requests"), "{message}");
    // Promote is one command; the annotation is removed once acted on.
    let patch = json!({"metadata": {"annotations": {"migration.tandem.dev/search": "promote"}}});
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for("the promotion", Duration::from_secs(30), || async {
        let app = apps.get("shop").await.map_err(|e| e.to_string())?;
        let left = app
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("migration.tandem.dev/search");
        match migration_state(&apps).await {
            Some((MigrationPhase::Succeeded, 100, 100)) if !left => Ok(()),
            other => Err(format!("{other:?}, annotation left: {left}")),
        }
    })
    .await;
    setup.operator.assert_never_forbidden();
}

/// Sets `workload`'s mode (a merge patch of the whole list, no
/// resourceVersion).
async fn set_mode(apps: &Api<HybridApp>, workload: &str, mode: tandem::api::Mode) {
    let mut workloads = apps.get("shop").await.unwrap().spec.workloads;
    for w in workloads.iter_mut().filter(|w| w.name == workload) {
        w.mode = mode;
        if mode == tandem::api::Mode::AlwaysOn
            && let Some(scaling) = w.scaling.as_mut()
        {
            // Function-only fields go, as the schema asks.
            scaling.scale_to_zero_after = None;
            scaling.keep_warm = None;
        }
    }
    let patch = json!({"spec": {"workloads": workloads}});
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn wait_for_mode(apps: &Api<HybridApp>, workload: &str, mode: tandem::api::Mode) {
    wait_for(
        "the new mode in status",
        Duration::from_secs(30),
        || async {
            let app = apps.get("shop").await.map_err(|e| e.to_string())?;
            let seen = app
                .status
                .and_then(|s| s.workloads.into_iter().find(|w| w.name == workload))
                .map(|w| (w.mode, w.state));
            match seen {
                Some((m, tandem::api::WorkloadState::Ready)) if m == mode => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_whose_mode_flips_in_place_under_load_fails_no_request() {
    use tandem::api::Mode;
    let setup = setup("flip", json!({"steps": [100]}), json!([])).await;
    let apps = setup.apps.clone();
    let pods_before: Vec<String> = environment()
        .running_pods(&setup.ns.name)
        .into_iter()
        .map(|p| p.name)
        .filter(|n| n.starts_with("shop-web-"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&setup.gateway, 4, 400_000, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    set_mode(&apps, "web", Mode::Function).await;
    wait_for_mode(&apps, "web", Mode::Function).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    set_mode(&apps, "web", Mode::AlwaysOn).await;
    wait_for_mode(&apps, "web", Mode::AlwaysOn).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = traffic.await.unwrap();
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    eprintln!("{} requests, {} failed", answers.len(), failed.len());
    assert!(answers.len() > 1000, "{} requests", answers.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed, first {:?}",
        failed.len(),
        answers.len(),
        failed.first()
    );
    // The same pods served throughout: a mode is not a reason to restart.
    let pods_after: Vec<String> = environment()
        .running_pods(&setup.ns.name)
        .into_iter()
        .map(|p| p.name)
        .filter(|n| n.starts_with("shop-web-"))
        .collect();
    assert_eq!(pods_before, pods_after);
    setup.operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_survive_20_sigkills_of_the_operator_at_random_points() {
    let lease = ["--lease-duration=3s"];
    let mut setup = setup_with(
        "sigkill",
        json!({"steps": [10, 30, 60, 100], "stepInterval": "2s", "progressDeadline": "120s",
               "analysis": {"maxErrorRate": "5%", "minRequests": 20}}),
        json!([]),
        &lease,
    )
    .await;
    let apps = setup.apps.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&setup.gateway, 4, 1_000_000, stop.clone());
    let states = follow(apps.clone(), stop.clone());
    let mut kills = 0;
    let mut targets = vec![];
    let mut restarts = 1;
    // Back and forth between the two workloads until 20 kills.
    while kills < 20 {
        let to_fn = targets.len() % 2 == 0;
        let (web, fun) = if to_fn { (0, 100) } else { (100, 0) };
        targets.push(fun);
        set_weights(&apps, web, fun).await;
        loop {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(300..2500))).await;
            let now = migration_state(&apps).await;
            if matches!(now, Some((MigrationPhase::Succeeded, ..))) && now.map(|n| n.2) == Some(fun)
            {
                break;
            }
            assert!(
                !matches!(
                    now,
                    Some((MigrationPhase::RolledBack | MigrationPhase::Stalled, ..))
                ),
                "{now:?}"
            );
            setup.operator.kill().await;
            kills += 1;
            restarts += 1;
            setup.operator = OperatorProcess::start_at(
                &setup.ns.name,
                &setup.kubeconfig,
                &format!("op-{restarts}"),
                &lease,
                Some(setup.operator.autoscaler),
            )
            .await;
            if kills >= 20 {
                break;
            }
        }
        wait_for(
            "the migration to converge",
            Duration::from_secs(120),
            || async {
                match migration_state(&apps).await {
                    Some((MigrationPhase::Succeeded, 100, weight)) if weight == fun => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let answers = traffic.await.unwrap();
    let history = states.await.unwrap();
    eprintln!(
        "{kills} kills over {} migrations; {} requests",
        targets.len(),
        answers.len()
    );
    // Per migration (by its start), the applied share never went back and
    // its status was never lost once it began.
    let mut by_start: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    let mut began = false;
    for (_, seen) in &history {
        match seen {
            Some((started, _, applied, _)) => {
                began = true;
                by_start.entry(started.clone()).or_default().push(*applied);
            }
            None => assert!(!began, "the migration status was lost: {history:?}"),
        }
    }
    assert_eq!(by_start.len(), targets.len(), "{by_start:?}");
    for (started, applied) in &by_start {
        assert!(
            applied.windows(2).all(|w| w[0] <= w[1]),
            "{started}: {applied:?}"
        );
        assert_eq!(applied.last(), Some(&100), "{started}: {applied:?}");
    }
    let failed = answers.iter().filter(|a| a.status != 200).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed", answers.len());
    setup.operator.assert_never_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_at_zero_made_always_on_gets_its_replica_without_a_request() {
    use k8s_openapi::api::apps::v1::Deployment;
    let setup = setup("flip-zero", json!({"steps": [100]}), json!([])).await;
    let deployments: Api<Deployment> = setup.ns.api();
    let replicas = || async {
        deployments
            .get("shop-fn")
            .await
            .map_err(|e| e.to_string())
            .map(|d| d.spec.and_then(|s| s.replicas).unwrap_or(-1))
    };
    assert_eq!(replicas().await.unwrap(), 0, "the function starts at zero");
    set_mode(&setup.apps, "fn", tandem::api::Mode::AlwaysOn).await;
    wait_for(
        "fn at its minimum of 1",
        Duration::from_secs(30),
        || async {
            match replicas().await? {
                n if n >= 1 => Ok(()),
                n => Err(format!("{n} replicas")),
            }
        },
    )
    .await;
    wait_for_mode(&setup.apps, "fn", tandem::api::Mode::AlwaysOn).await;
    setup.operator.assert_never_forbidden();
}
