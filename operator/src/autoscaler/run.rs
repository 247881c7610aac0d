//! The autoscaler loop in the operator: receives demand and stats from the
//! gateways (see [`crate::protocol`]), feeds them and the time to the pure
//! [`ScalerState`], and executes what it decides. Writes run concurrently,
//! one per workload at a time, each with a timeout: a demand for a
//! workload at zero is written at once, whatever other writes are pending,
//! and one hung API call freezes nothing else.
//!
//! It owns `spec.replicas` of Functions and of AlwaysOn workloads scaled on
//! concurrency, and writes it with server-side apply under
//! [`AUTOSCALER_MANAGER`] only when the decision differs from the current
//! value.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::ScalingPolicy;
use super::algorithm::Reason;
use super::costs::{Costs, Span};
use super::metrics::{AutoscalerMetrics, Replicas};
use super::placed::PlacementPolicy;
use super::state::{AppRef, Cluster, ScaleWrite, ScalerState, Shown};
use crate::api::contract::{AUTOSCALER_MANAGER, COSTS_MANAGER, apply_scale, child_name, condition};
use crate::api::{HybridApp, Metric, Mode, PlacementSpec, Workload, labels};
use crate::keepalive::placement::Prices;
use crate::protocol::{DEMAND_PATH, Demand, STATS_PATH, Stats, WorkloadRef};

/// How often the autoscaler decides.
pub const TICK: Duration = Duration::from_secs(2);
/// Longest time one write may take (the lease fence may cut it sooner).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Apps whose costs are written at the same time, at most.
const COST_WRITES: usize = 8;
/// Messages from gateways waiting to be fed to the state, at most; beyond
/// that the endpoint answers 503 (gateways repeat, so shedding is safe).
const QUEUE: usize = 4096;

enum Message {
    Demand(Demand),
    Stats(Stats),
}

/// The cluster as the caches see it.
struct View {
    apps: Store<HybridApp>,
    deployments: Store<Deployment>,
    prices: Prices,
}

/// How `mode: Auto` places `workload` of `app`: its spec, what one replica
/// costs (its pod's requests at `prices`), and the placement in status.
fn placement_policy(app: &HybridApp, workload: &Workload, prices: &Prices) -> PlacementPolicy {
    let (budget_pct, min_dwell) = PlacementSpec::resolve(workload.placement.as_ref());
    let (vcpu, memory_gib) = crate::keepalive::placement::pod_requests(&workload.template);
    let shown = app
        .status
        .as_ref()
        .and_then(|s| s.placements.iter().find(|p| p.workload == workload.name))
        .map(|p| {
            let age = Timestamp::now().duration_since(p.since.0);
            (p.placement, age.unsigned_abs())
        });
    PlacementPolicy {
        budget_pct,
        min_dwell,
        replica_hour: prices.replica_hour(vcpu, memory_gib),
        shown,
    }
}

impl View {
    /// Books every workload's replicas in `costs` at `now` and forgets
    /// those gone; returns them, and every workload's replicas.
    fn book_costs(&self, costs: &mut Costs, now: Duration) -> (Vec<WorkloadRef>, Vec<Replicas>) {
        let mut live = HashSet::new();
        // The Deployments' replicas, for the gauges.
        let mut replicas_now = Vec::new();
        for app in self.apps.state() {
            for workload in &app.spec.workloads {
                let key = WorkloadRef {
                    namespace: app.metadata.namespace.clone().unwrap_or_default(),
                    app: app.metadata.name.clone().unwrap_or_default(),
                    workload: workload.name.clone(),
                };
                let Some(replicas) = self.replicas(&key) else {
                    continue;
                };
                replicas_now.push(Replicas {
                    workload: key.clone(),
                    mode: workload.mode.as_str(),
                    desired: replicas,
                    ready: self.ready_replicas(&key),
                });
                let floor = workload.scaling().min_replicas.max(1) as u32;
                let (vcpu, memory_gib) =
                    crate::keepalive::placement::pod_requests(&workload.template);
                let replica_hour = self.prices.replica_hour(vcpu, memory_gib);
                costs.book(now, &key, replicas, floor, replica_hour);
                live.insert(key);
            }
        }
        let gone: Vec<WorkloadRef> = costs
            .workloads()
            .filter(|key| !live.contains(*key))
            .cloned()
            .collect();
        costs.retain(|key| live.contains(key));
        (gone, replicas_now)
    }

    /// The ready replicas of a workload's Deployment (0 if unknown).
    fn ready_replicas(&self, key: &WorkloadRef) -> u32 {
        let name = child_name(&key.app, &key.workload);
        self.deployments
            .get(&ObjectRef::new(&name).within(&key.namespace))
            .and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0)
            .max(0) as u32
    }
}

impl Cluster for View {
    fn policy(&self, key: &WorkloadRef) -> Option<ScalingPolicy> {
        let app = self
            .apps
            .get(&ObjectRef::new(&key.app).within(&key.namespace))?;
        let workload = app.spec.workloads.iter().find(|w| w.name == key.workload)?;
        let scaling = workload.scaling();
        if workload.mode == Mode::AlwaysOn && scaling.metric != Metric::Concurrency {
            return None;
        }
        // A migration holds its destination at the replicas its next step
        // needs (pre-warm), and after a rollback for the grace.
        let floor = crate::migration::floors(&app, Timestamp::now())
            .get(&key.workload)
            .copied()
            .unwrap_or(0);
        let min = (scaling.min_replicas.max(0) as u32).max(floor);
        Some(
            ScalingPolicy::defaults(
                min.min(scaling.max_replicas.max(1) as u32),
                scaling.max_replicas.max(1) as u32,
                scaling.initial_replicas.max(1) as u32,
                scaling.target_concurrency.max(1) as u32,
                scaling.scale_to_zero_after,
            )
            .with_adaptive_keep_alive(scaling.adaptive_keep_alive)
            .with_placement(
                (workload.mode == Mode::Auto)
                    .then(|| placement_policy(&app, workload, &self.prices)),
            ),
        )
    }

    /// Workloads held by a migration's floor, always-on workloads below
    /// their minimum (a Function at zero whose mode became AlwaysOn: the
    /// gateway answers 503 for it and sends no demand, so only a tick
    /// raises it), and every `mode: Auto` workload (its placement is
    /// decided with or without traffic).
    fn held(&self) -> Vec<WorkloadRef> {
        let now = Timestamp::now();
        let mut held = Vec::new();
        for app in self.apps.state() {
            let namespace = app.metadata.namespace.clone().unwrap_or_default();
            let name = app.metadata.name.clone().unwrap_or_default();
            let key = |workload: &str| WorkloadRef {
                namespace: namespace.clone(),
                app: name.clone(),
                workload: workload.to_string(),
            };
            let floors = crate::migration::floors(&app, now);
            held.extend(floors.keys().map(|w| key(w)));
            for workload in &app.spec.workloads {
                if workload.mode == Mode::Auto {
                    held.push(key(&workload.name));
                    continue;
                }
                let scaling = workload.scaling();
                let ours = workload.mode == Mode::AlwaysOn && scaling.metric == Metric::Concurrency;
                if ours
                    && !floors.contains_key(&workload.name)
                    && self
                        .replicas(&key(&workload.name))
                        .is_some_and(|r| r < scaling.min_replicas.max(1) as u32)
                {
                    held.push(key(&workload.name));
                }
            }
        }
        held
    }

    fn replicas(&self, key: &WorkloadRef) -> Option<u32> {
        let name = child_name(&key.app, &key.workload);
        let deployment = self
            .deployments
            .get(&ObjectRef::new(&name).within(&key.namespace))?;
        Some(
            deployment
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1)
                .max(0) as u32,
        )
    }
}

/// How replicas are priced and their costs shown.
pub struct Costing {
    /// What a replica costs.
    pub prices: Prices,
    /// How often `status.costs` is written.
    pub refresh: Duration,
    /// The gauges.
    pub metrics: AutoscalerMetrics,
}

/// Serves the demand/stats endpoint on `listener` and runs the loop. Ends
/// only if the endpoint fails; the operator exits then.
pub async fn run(
    client: kube::Client,
    listener: TcpListener,
    namespace: Option<String>,
    meter: Arc<crate::migration::Meter>,
    fleet: Arc<crate::fleet::Fleet>,
    costing: Costing,
) {
    let Costing {
        prices,
        refresh: cost_refresh,
        metrics: cost_metrics,
    } = costing;
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    let mut server = tokio::spawn(serve(listener, tx));

    let recorder = Recorder::new(client.clone(), Reporter::from("tandem-autoscaler"));
    // The reconciler reports unreadable apps (one Event each); the
    // autoscaler only skips them.
    let apps = crate::watch::spawn_tolerant_cache::<HybridApp, _, _>(
        &client,
        namespace.as_deref(),
        watcher::Config::default(),
        |_| std::future::ready(()),
        Arc::new(|_| {}),
    );
    let deployments = crate::watch::spawn_cache(
        crate::watch::scoped::<Deployment>(&client, namespace.as_deref()),
        watcher::Config::default().labels(&labels::managed_selector()),
        |_| std::future::ready(()),
    );
    let view = View {
        apps,
        deployments,
        prices,
    };
    let started = Instant::now();
    let now = || started.elapsed();
    let mut state = ScalerState::default();
    let mut writes: JoinSet<(ScaleWrite, bool)> = JoinSet::new();
    let mut conditions: JoinSet<(AppRef, Shown, bool)> = JoinSet::new();
    let mut conditions_in_flight: HashSet<AppRef> = HashSet::new();
    let mut costs = Costs::default();
    let mut costs_written = Instant::now();
    let mut cost_writes: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = rx.recv() => {
                let Some(message) = message else { return };
                match message {
                    Message::Demand(demand) => {
                        if let Some(write) = state.on_demand(now(), &demand, &view) {
                            writes.spawn(scale(client.clone(), recorder.clone(), view.apps.clone(), write));
                        }
                    }
                    Message::Stats(stats) => {
                        meter.record(&stats);
                        fleet.record(&stats, tokio::time::Instant::now());
                        state.on_stats(now(), &stats, &view);
                    }
                }
            }
            _ = tick.tick() => {
                let (gone, replicas) = view.book_costs(&mut costs, now());
                cost_metrics.export(&costs, &gone);
                cost_metrics.export_replicas(&replicas);
                if costs_written.elapsed() >= cost_refresh
                    && cost_writes.as_ref().is_none_or(|w| w.is_finished())
                {
                    costs_written = Instant::now();
                    let patches = cost_patches(&costs, &view.apps);
                    cost_writes = Some(tokio::spawn(write_costs(client.clone(), patches)));
                }
                let outcome = state.tick(now(), &view);
                cost_metrics
                    .holding_without_signal
                    .set(state.holding_without_signal() as i64);
                for write in outcome.writes {
                    writes.spawn(scale(client.clone(), recorder.clone(), view.apps.clone(), write));
                }
                for (app, text) in outcome.conditions {
                    if conditions_in_flight.insert(app.clone()) {
                        let since = placement_times(&text, now());
                        conditions.spawn(write_condition(client.clone(), view.apps.clone(), app, text, since));
                    }
                }
            }
            Some(done) = writes.join_next() => {
                if let Ok((write, ok)) = done {
                    state.written(now(), &write, ok);
                }
            }
            Some(done) = conditions.join_next() => {
                if let Ok((app, text, ok)) = done {
                    conditions_in_flight.remove(&app);
                    if ok {
                        state.shown(app, text);
                    }
                }
            }
            ended = &mut server => {
                tracing::error!(?ended, "the autoscaler endpoint stopped");
                return;
            }
        }
    }
}

/// Executes one decision: the `replicas` write (with a timeout), then an
/// Event for it. Returns the decision and whether the write succeeded.
async fn scale(
    client: kube::Client,
    recorder: Recorder,
    apps: Store<HybridApp>,
    write: ScaleWrite,
) -> (ScaleWrite, bool) {
    let key = &write.workload;
    let name = child_name(&key.app, &key.workload);
    let deployments: Api<Deployment> = Api::namespaced(client, &key.namespace);
    let applied = tokio::time::timeout(
        WRITE_TIMEOUT,
        apply_scale(&deployments, &name, write.to, true),
    )
    .await;
    match applied {
        Ok(Ok(())) => {
            tracing::info!(namespace = %key.namespace, app = %key.app, workload = %key.workload, from = write.from, to = write.to, reason = write.reason.as_str(), "{}", write.message)
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, namespace = %key.namespace, app = %key.app, workload = %key.workload, deployment = %name, "scale");
            return (write, false);
        }
        Err(_) => {
            tracing::warn!(namespace = %key.namespace, app = %key.app, workload = %key.workload, deployment = %name, timeout = ?WRITE_TIMEOUT, "scale timed out");
            return (write, false);
        }
    }
    if matches!(
        write.reason,
        Reason::ScaledFromZero
            | Reason::PreWarmed
            | Reason::Placed
            | Reason::ScaledToZero
            | Reason::ScaledUp
            | Reason::ScaledDown
    ) && let Some(app) = apps.get(&ObjectRef::new(&key.app).within(&key.namespace))
    {
        let event = Event {
            type_: EventType::Normal,
            reason: write.reason.as_str().into(),
            note: Some(format!(
                "{}: {} -> {} replicas: {}",
                key.workload, write.from, write.to, write.message
            )),
            action: "Scale".into(),
            secondary: None,
        };
        // The Event must not hold up the next decision for this workload.
        let reference = app.object_ref(&());
        tokio::spawn(async move {
            let published =
                tokio::time::timeout(WRITE_TIMEOUT, recorder.publish(&event, &reference)).await;
            if !matches!(published, Ok(Ok(()))) {
                tracing::debug!(?published, "publish scale event");
            }
        });
    }
    (write, true)
}

/// The costs part of every app's status, as apply patches.
fn cost_patches(costs: &Costs, apps: &Store<HybridApp>) -> Vec<(AppRef, serde_json::Value)> {
    let figures = |f: super::costs::Figures| {
        json!({
            "observedHours": rounded(f.observed_hours, 4),
            "replicaHours": rounded(f.replica_hours, 4),
            "cost": rounded(f.cost, 6),
            "alwaysOnCost": rounded(f.always_on_cost, 6),
        })
    };
    let mut patches = Vec::new();
    for app in apps.state() {
        let namespace = app.metadata.namespace.clone().unwrap_or_default();
        let name = app.metadata.name.clone().unwrap_or_default();
        let mut entries = Vec::new();
        for workload in &app.spec.workloads {
            let key = WorkloadRef {
                namespace: namespace.clone(),
                app: name.clone(),
                workload: workload.name.clone(),
            };
            if let (Some(hour), Some(day)) = (
                costs.figures(&key, Span::Hour),
                costs.figures(&key, Span::Day),
            ) {
                entries.push(json!({
                    "workload": workload.name,
                    "lastHour": figures(hour),
                    "lastDay": figures(day),
                }));
            }
        }
        if entries.is_empty() {
            continue;
        }
        let mut status = json!({"costs": entries});
        if let Some(saving) = costs.saving_pct((&namespace, &name), Span::Day) {
            status["saving"] = json!(format!("{saving:.0}%"));
        }
        patches.push((
            (namespace, name),
            json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp", "status": status}),
        ));
    }
    patches
}

/// Applies the cost patches under [`COSTS_MANAGER`], [`COST_WRITES`] at a
/// time, each within [`WRITE_TIMEOUT`].
async fn write_costs(client: kube::Client, patches: Vec<(AppRef, serde_json::Value)>) {
    use futures::StreamExt;
    futures::stream::iter(patches)
        .for_each_concurrent(COST_WRITES, |((namespace, name), patch)| {
            let api: Api<HybridApp> = Api::namespaced(client.clone(), &namespace);
            async move {
                let written = tokio::time::timeout(
                    WRITE_TIMEOUT,
                    api.patch_status(
                        &name,
                        &PatchParams::apply(COSTS_MANAGER).force(),
                        &Patch::Apply(&patch),
                    ),
                )
                .await;
                if !matches!(written, Ok(Ok(_))) {
                    tracing::debug!(app = %format!("{namespace}/{name}"), ?written, "write the costs");
                }
            }
        })
        .await;
}

/// When each placement of `shown` began, from the autoscaler's clock at
/// `now` to the wall clock (to the second, as status keeps it).
fn placement_times(shown: &Shown, now: Duration) -> Vec<Time> {
    let wall = Timestamp::now();
    shown
        .placements
        .iter()
        .map(|p| {
            let ago = (now.as_secs_f64() - p.since_s).max(0.0).round() as i64;
            Time(
                wall.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(ago))
                    .unwrap_or(wall),
            )
        })
        .collect()
}

/// Rounded for status: figures that differ only past this many decimals
/// are the same figure.
fn rounded(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// The `placements` of status for `shown`, begun at `since`.
fn placements_json(shown: &Shown, since: &[Time]) -> Vec<serde_json::Value> {
    shown
        .placements
        .iter()
        .zip(since)
        .map(|(p, since)| {
            let mut entry = json!({
                "workload": p.workload,
                "placement": p.placement,
                "since": since,
            });
            if let Some(n) = &p.numbers {
                entry["coldStartPercent"] = json!(rounded(n.cold_pct, 2));
                entry["coldStartBudgetPercent"] = json!(n.budget_pct);
                entry["observedHours"] = json!(rounded(n.hours, 4));
                entry["functionReplicaHours"] = json!(rounded(n.loaded_hours, 4));
                entry["functionCost"] = json!(rounded(n.function_cost, 6));
                entry["alwaysOnCost"] = json!(rounded(n.always_on_cost, 6));
                entry["savingPercent"] = json!(rounded(n.saving_pct, 1));
                entry["message"] = json!(n.reason);
            }
            entry
        })
        .collect()
}

/// Applies the `Autoscaled` condition and the placements to one app's
/// status under [`AUTOSCALER_MANAGER`]; returns whether it was written.
async fn write_condition(
    client: kube::Client,
    apps: Store<HybridApp>,
    app_ref: AppRef,
    text: Shown,
    placed_since: Vec<Time>,
) -> (AppRef, Shown, bool) {
    let (namespace, name) = &app_ref;
    let (status, reason, message) = &text.condition;
    let Some(app) = apps.get(&ObjectRef::new(name).within(namespace)) else {
        return (app_ref, text, false);
    };
    // The transition time moves only when the status does.
    let since = app
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == condition::AUTOSCALED)
        })
        .filter(|c| c.status == *status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    let patch = json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "HybridApp",
        "status": {"conditions": [{
            "type": condition::AUTOSCALED,
            "status": status,
            "reason": reason,
            "message": message.chars().take(32 * 1024).collect::<String>(),
            "lastTransitionTime": since,
            "observedGeneration": app.metadata.generation,
        }],
        "placements": placements_json(&text, &placed_since)},
    });
    let api: Api<HybridApp> = Api::namespaced(client, namespace);
    let written = tokio::time::timeout(
        WRITE_TIMEOUT,
        api.patch_status(
            name,
            &PatchParams::apply(AUTOSCALER_MANAGER).force(),
            &Patch::Apply(&patch),
        ),
    )
    .await;
    let ok = match written {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => {
            tracing::warn!(%error, app = %format!("{namespace}/{name}"), "write the Autoscaled condition");
            false
        }
        Err(_) => {
            tracing::warn!(app = %format!("{namespace}/{name}"), "writing the Autoscaled condition timed out");
            false
        }
    };
    (app_ref, text, ok)
}

async fn serve(listener: TcpListener, tx: mpsc::Sender<Message>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept on the autoscaler endpoint");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move { Ok::<_, Infallible>(receive(request, tx).await) }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            // A gateway keeps its connection; an idle one is closed.
            let _ = tokio::time::timeout(Duration::from_secs(300), connection).await;
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
    let body = tokio::time::timeout(
        Duration::from_secs(5),
        http_body_util::Limited::new(request.into_body(), 1 << 20).collect(),
    )
    .await;
    let Ok(Ok(body)) = body.map(|b| b.map(|b| b.to_bytes())) else {
        return answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large or too slow\n",
        );
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
