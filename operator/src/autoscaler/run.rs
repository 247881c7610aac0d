//! The autoscaler loop in the operator: receives demand and stats from the
//! gateways (see [`crate::protocol`]), decides every tick, and scales a
//! Function from zero the moment demand arrives instead of at the next tick.
//!
//! It owns `spec.replicas` of Functions and of AlwaysOn workloads scaled on
//! concurrency, and writes it with server-side apply under
//! [`AUTOSCALER_MANAGER`] only when the decision differs from the current
//! value.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{Autoscaler, Observation, Reason, ScalingPolicy};
use crate::api::{HybridApp, Metric, Mode, labels};
use crate::controller::AUTOSCALER_MANAGER;
use crate::controller::children::child_name;
use crate::protocol::{DEMAND_PATH, Demand, STATS_INTERVAL, STATS_PATH, Stats, WorkloadRef};

/// How often the autoscaler decides.
pub const TICK: Duration = Duration::from_secs(2);

enum Message {
    Demand(Demand),
    Stats(Stats),
}

struct Entry {
    autoscaler: Autoscaler,
    /// Latest report per gateway: when it came and what it said.
    reports: HashMap<String, (Instant, u64, u64)>,
}

/// Serves the demand/stats endpoint on `listener` and runs the loop until
/// the task is dropped.
pub async fn run(client: kube::Client, listener: TcpListener, namespace: Option<String>) {
    let (tx, mut rx) = mpsc::channel::<Message>(4096);
    tokio::spawn(serve(listener, tx));

    let scoped = |client: &kube::Client| -> (Api<HybridApp>, Api<Deployment>) {
        match namespace.as_deref() {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        }
    };
    let (apps_api, deployments_api) = scoped(&client);
    // Caches only: the loop reads them on demand and at every tick.
    let apps = crate::watch::spawn_cache(apps_api, watcher::Config::default(), |_| {
        std::future::ready(())
    });
    let deployments = crate::watch::spawn_cache(
        deployments_api,
        watcher::Config::default().labels(&labels::managed_selector()),
        |_| std::future::ready(()),
    );
    let recorder = Recorder::new(client.clone(), Reporter::from("tandem-autoscaler"));
    let started = Instant::now();
    let shared = Mutex::new(HashMap::<WorkloadRef, Entry>::new());
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            message = rx.recv() => {
                let Some(message) = message else { return };
                match message {
                    Message::Demand(demand) => {
                        let now = started.elapsed();
                        let decision = {
                            let mut entries = shared.lock().expect("entries lock");
                            let Some(entry) = entry_for(&mut entries, &apps, &demand.workload, now) else { continue };
                            entry.reports.insert(demand.gateway.clone(), (Instant::now(), 0, demand.held));
                            entry.autoscaler.observe(now, Observation { in_flight: 0.0, held: demand.held as f64 });
                            let current = current_replicas(&deployments, &demand.workload);
                            match current {
                                Some(0) => Some(entry.autoscaler.decide(now, 0, true)),
                                _ => None,
                            }
                        };
                        if let Some(decision) = decision {
                            scale(&client, &recorder, &apps, &demand.workload, 0, &decision).await;
                        }
                    }
                    Message::Stats(stats) => {
                        let now = started.elapsed();
                        let mut entries = shared.lock().expect("entries lock");
                        // A report lists only workloads with traffic: every
                        // other workload this gateway reported on is now idle
                        // there (including one it sent demand for).
                        for entry in entries.values_mut() {
                            if let Some(report) = entry.reports.get_mut(&stats.gateway) {
                                *report = (Instant::now(), 0, 0);
                            }
                        }
                        for workload in stats.workloads {
                            if let Some(entry) = entry_for(&mut entries, &apps, &workload.workload, now) {
                                entry.reports.insert(stats.gateway.clone(), (Instant::now(), workload.in_flight, workload.held));
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let now = started.elapsed();
                let decisions: Vec<(WorkloadRef, u32, super::ScaleDecision)> = {
                    let mut entries = shared.lock().expect("entries lock");
                    let mut decisions = Vec::new();
                    entries.retain(|key, _| policy_for(&apps, key).is_some());
                    for (key, entry) in entries.iter_mut() {
                        if let Some(policy) = policy_for(&apps, key) {
                            entry.autoscaler.set_policy(policy);
                        }
                        // A gateway silent for three intervals is gone.
                        entry.reports.retain(|_, (at, _, _)| at.elapsed() < STATS_INTERVAL * 3);
                        let fresh = !entry.reports.is_empty() || now > STATS_INTERVAL * 3;
                        let (in_flight, held) = entry.reports.values().fold((0, 0), |(f, h), (_, rf, rh)| (f + rf, h + rh));
                        entry.autoscaler.observe(now, Observation { in_flight: in_flight as f64, held: held as f64 });
                        let Some(current) = current_replicas(&deployments, key) else { continue };
                        let decision = entry.autoscaler.decide(now, current, fresh);
                        if decision.replicas != current {
                            decisions.push((key.clone(), current, decision));
                        }
                    }
                    decisions
                };
                for (key, current, decision) in decisions {
                    scale(&client, &recorder, &apps, &key, current, &decision).await;
                }
            }
        }
    }
}

/// The policy of a workload Tandem's autoscaler owns, from its HybridApp.
fn policy_for(apps: &Store<HybridApp>, key: &WorkloadRef) -> Option<ScalingPolicy> {
    let app = apps.get(&ObjectRef::new(&key.app).within(&key.namespace))?;
    let workload = app.spec.workloads.iter().find(|w| w.name == key.workload)?;
    let scaling = workload.scaling();
    if workload.mode == Mode::AlwaysOn && scaling.metric != Metric::Concurrency {
        return None;
    }
    Some(ScalingPolicy::defaults(
        scaling.min_replicas.max(0) as u32,
        scaling.max_replicas.max(1) as u32,
        scaling.initial_replicas.max(1) as u32,
        scaling.target_concurrency.max(1) as u32,
        scaling.scale_to_zero_after,
    ))
}

fn entry_for<'a>(
    entries: &'a mut HashMap<WorkloadRef, Entry>,
    apps: &Store<HybridApp>,
    key: &WorkloadRef,
    now: Duration,
) -> Option<&'a mut Entry> {
    if !entries.contains_key(key) {
        let policy = policy_for(apps, key)?;
        entries.insert(
            key.clone(),
            Entry {
                autoscaler: Autoscaler::new(policy, now),
                reports: HashMap::new(),
            },
        );
    }
    entries.get_mut(key)
}

fn current_replicas(deployments: &Store<Deployment>, key: &WorkloadRef) -> Option<u32> {
    let name = child_name(&key.app, &key.workload);
    let deployment = deployments.get(&ObjectRef::new(&name).within(&key.namespace))?;
    Some(
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1)
            .max(0) as u32,
    )
}

async fn scale(
    client: &kube::Client,
    recorder: &Recorder,
    apps: &Store<HybridApp>,
    key: &WorkloadRef,
    current: u32,
    decision: &super::ScaleDecision,
) {
    let name = child_name(&key.app, &key.workload);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &key.namespace);
    let patch = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": decision.replicas},
    });
    let params = PatchParams::apply(AUTOSCALER_MANAGER).force();
    match deployments
        .patch(&name, &params, &Patch::Apply(&patch))
        .await
    {
        Ok(_) => {
            tracing::info!(workload = %format!("{}/{}/{}", key.namespace, key.app, key.workload), from = current, to = decision.replicas, reason = decision.reason.as_str(), "{}", decision.message)
        }
        Err(error) => {
            tracing::warn!(%error, deployment = %name, "scale");
            return;
        }
    }
    if matches!(
        decision.reason,
        Reason::ScaledFromZero | Reason::ScaledToZero | Reason::ScaledUp | Reason::ScaledDown
    ) && let Some(app) = apps.get(&ObjectRef::new(&key.app).within(&key.namespace))
    {
        let event = Event {
            type_: EventType::Normal,
            reason: decision.reason.as_str().into(),
            note: Some(format!(
                "{}: {} -> {} replicas: {}",
                key.workload, current, decision.replicas, decision.message
            )),
            action: "Scale".into(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &app.object_ref(&())).await {
            tracing::debug!(%error, "publish scale event");
        }
    }
}

async fn serve(listener: TcpListener, tx: mpsc::Sender<Message>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move { Ok::<_, Infallible>(receive(request, tx).await) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn receive(
    request: Request<hyper::body::Incoming>,
    tx: mpsc::Sender<Message>,
) -> Response<Full<Bytes>> {
    let answer = |status: StatusCode, text: &'static str| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(text.as_bytes())))
            .expect("valid response")
    };
    let path = request.uri().path().to_string();
    let Ok(body) = http_body_util::Limited::new(request.into_body(), 1 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
    else {
        return answer(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n");
    };
    let message = match path.as_str() {
        DEMAND_PATH => serde_json::from_slice::<Demand>(&body).map(Message::Demand),
        STATS_PATH => serde_json::from_slice::<Stats>(&body).map(Message::Stats),
        _ => return answer(StatusCode::NOT_FOUND, "unknown path\n"),
    };
    match message {
        Ok(message) => match tx.try_send(message) {
            Ok(()) => answer(StatusCode::ACCEPTED, "accepted\n"),
            // Bounded: the gateway repeats demand and stats, so shedding is safe.
            Err(_) => answer(StatusCode::SERVICE_UNAVAILABLE, "busy\n"),
        },
        Err(_) => answer(StatusCode::BAD_REQUEST, "malformed message\n"),
    }
}
