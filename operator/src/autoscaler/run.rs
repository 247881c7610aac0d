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

/// Name of the HybridApp condition the autoscaler writes (under its own
/// field manager; the reconciler leaves it alone).
pub const CONDITION: &str = "Autoscaled";

/// How long a gateway that went silent while it reported requests for a
/// workload keeps that workload at its current scale before it is taken for
/// gone. A gateway whose last report was idle is forgotten at once.
pub const FORGET_BUSY_GATEWAY: Duration = Duration::from_secs(60);

/// A gateway is silent once it missed this many stats intervals.
const SILENT_AFTER_INTERVALS: u32 = 3;

/// A gateway's latest report on one workload.
#[derive(Debug, Clone, Copy)]
struct Report {
    at: Instant,
    in_flight: u64,
    held: u64,
}

/// The last scale decision of a workload, for the `Autoscaled` condition.
#[derive(Debug, Clone)]
struct Decided {
    reason: Reason,
    from: u32,
    to: u32,
    message: String,
    at: Instant,
}

struct Entry {
    autoscaler: Autoscaler,
    /// Latest report per gateway.
    reports: HashMap<String, Report>,
    /// The last decision that changed the scale.
    last: Option<Decided>,
    /// Why the signal is stale, while it is.
    stale: Option<String>,
}

/// What the `Autoscaled` condition says: status, reason, message.
type ConditionText = (&'static str, String, String);

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
    // What the Autoscaled condition of each app says now (written on change).
    let mut written = HashMap::<(String, String), ConditionText>::new();
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
                            entry.reports.insert(demand.gateway.clone(), Report { at: Instant::now(), in_flight: 0, held: demand.held });
                            entry.autoscaler.observe(now, Observation { in_flight: 0.0, held: demand.held as f64 });
                            let current = current_replicas(&deployments, &demand.workload);
                            match current {
                                Some(0) => Some(entry.autoscaler.decide(now, 0, true)),
                                _ => None,
                            }
                        };
                        if let Some(decision) = decision
                            && scale(&client, &recorder, &apps, &demand.workload, 0, &decision).await
                            && let Some(entry) = shared.lock().expect("entries lock").get_mut(&demand.workload)
                        {
                            entry.last = Some(Decided { reason: decision.reason, from: 0, to: decision.replicas, message: decision.message, at: Instant::now() });
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
                                *report = Report { at: Instant::now(), in_flight: 0, held: 0 };
                            }
                        }
                        for workload in stats.workloads {
                            if let Some(entry) = entry_for(&mut entries, &apps, &workload.workload, now) {
                                entry.reports.insert(stats.gateway.clone(), Report { at: Instant::now(), in_flight: workload.in_flight, held: workload.held });
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
                        let current = current_replicas(&deployments, key);
                        entry.stale = silent_busy_gateways(&mut entry.reports, &key.workload, current);
                        let fresh = entry.stale.is_none()
                            && (!entry.reports.is_empty() || now > STATS_INTERVAL * SILENT_AFTER_INTERVALS);
                        let (in_flight, held) = entry.reports.values().fold((0, 0), |(f, h), r| (f + r.in_flight, h + r.held));
                        entry.autoscaler.observe(now, Observation { in_flight: in_flight as f64, held: held as f64 });
                        let Some(current) = current else { continue };
                        let decision = entry.autoscaler.decide(now, current, fresh);
                        if decision.replicas != current {
                            decisions.push((key.clone(), current, decision));
                        }
                    }
                    decisions
                };
                for (key, current, decision) in decisions {
                    if scale(&client, &recorder, &apps, &key, current, &decision).await
                        && let Some(entry) = shared.lock().expect("entries lock").get_mut(&key)
                    {
                        entry.last = Some(Decided { reason: decision.reason, from: current, to: decision.replicas, message: decision.message, at: Instant::now() });
                    }
                }
                let wanted = conditions(&shared.lock().expect("entries lock"));
                written.retain(|app, _| wanted.contains_key(app));
                for (app, text) in wanted {
                    if written.get(&app) != Some(&text) && write_condition(&client, &apps, &app, &text).await {
                        written.insert(app, text);
                    }
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
                last: None,
                stale: None,
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
) -> bool {
    let name = child_name(&key.app, &key.workload);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &key.namespace);
    match apply_scale(&deployments, &name, decision.replicas, true).await {
        Ok(()) => {
            tracing::info!(workload = %format!("{}/{}/{}", key.namespace, key.app, key.workload), from = current, to = decision.replicas, reason = decision.reason.as_str(), "{}", decision.message)
        }
        Err(error) => {
            tracing::warn!(%error, deployment = %name, "scale");
            return false;
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
    true
}

/// Sets `replicas` of Deployment `name` through its `scale` subresource,
/// with server-side apply under [`AUTOSCALER_MANAGER`]. Without `force`, a
/// conflict with another owner fails instead of taking the field.
pub async fn apply_scale(
    deployments: &Api<Deployment>,
    name: &str,
    replicas: u32,
    force: bool,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    let mut params = PatchParams::apply(AUTOSCALER_MANAGER);
    params.force = force;
    deployments
        .patch_scale(name, &params, &Patch::Apply(&patch))
        .await
        .map(drop)
}

/// Drops gateways that went silent, except those that were busy with this
/// workload less than [`FORGET_BUSY_GATEWAY`] ago: while one is, the
/// signal is stale, and this says why.
fn silent_busy_gateways(
    reports: &mut HashMap<String, Report>,
    workload: &str,
    current: Option<u32>,
) -> Option<String> {
    let silent_after = STATS_INTERVAL * SILENT_AFTER_INTERVALS;
    let mut stale = Vec::new();
    reports.retain(|gateway, report| {
        let silent = report.at.elapsed();
        if silent < silent_after {
            return true;
        }
        let busy = report.in_flight + report.held;
        if busy > 0 && silent < FORGET_BUSY_GATEWAY {
            stale.push(format!(
                "no stats from gateway {gateway} for {}s (it last reported {busy} request(s) for {workload})",
                silent.as_secs()
            ));
            return true;
        }
        false
    });
    if stale.is_empty() {
        return None;
    }
    stale.sort();
    let holding = match current {
        Some(n) => format!("holding {workload} at {n} replica(s)"),
        None => format!("holding {workload}"),
    };
    Some(format!("{}; {holding}", stale.join(", ")))
}

/// The `Autoscaled` condition of every app the autoscaler has decided for:
/// False while a signal is stale, else True with the latest decisions.
fn conditions(entries: &HashMap<WorkloadRef, Entry>) -> HashMap<(String, String), ConditionText> {
    let mut by_app: HashMap<(String, String), Vec<(&WorkloadRef, &Entry)>> = HashMap::new();
    for (key, entry) in entries {
        by_app
            .entry((key.namespace.clone(), key.app.clone()))
            .or_default()
            .push((key, entry));
    }
    let mut out = HashMap::new();
    for (app, mut workloads) in by_app {
        workloads.sort_by(|a, b| a.0.workload.cmp(&b.0.workload));
        let stale: Vec<&str> = workloads
            .iter()
            .filter_map(|(_, e)| e.stale.as_deref())
            .collect();
        if !stale.is_empty() {
            out.insert(
                app,
                (
                    "False",
                    Reason::HoldingWithoutSignal.as_str().to_string(),
                    stale.join("; "),
                ),
            );
            continue;
        }
        let decided: Vec<(&WorkloadRef, &Decided)> = workloads
            .iter()
            .filter_map(|(k, e)| e.last.as_ref().map(|d| (*k, d)))
            .collect();
        // The most recent decision names the reason; every workload's last
        // decision is in the message.
        let Some(latest) = decided.iter().max_by_key(|(_, d)| d.at) else {
            continue;
        };
        let message = decided
            .iter()
            .map(|(k, d)| {
                format!(
                    "{}: {} {} -> {} ({})",
                    k.workload,
                    d.reason.as_str(),
                    d.from,
                    d.to,
                    d.message
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.insert(app, ("True", latest.1.reason.as_str().to_string(), message));
    }
    out
}

/// Applies the `Autoscaled` condition to one app's status under
/// [`AUTOSCALER_MANAGER`]; returns whether it was written.
async fn write_condition(
    client: &kube::Client,
    apps: &Store<HybridApp>,
    (namespace, name): &(String, String),
    (status, reason, message): &ConditionText,
) -> bool {
    let Some(app) = apps.get(&ObjectRef::new(name).within(namespace)) else {
        return false;
    };
    // The transition time moves only when the status does.
    let since = app
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION))
        .filter(|c| c.status == *status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    let patch = json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "HybridApp",
        "status": {"conditions": [{
            "type": CONDITION,
            "status": status,
            "reason": reason,
            "message": message.chars().take(32 * 1024).collect::<String>(),
            "lastTransitionTime": since,
            "observedGeneration": app.metadata.generation,
        }]},
    });
    let api: Api<HybridApp> = Api::namespaced(client.clone(), namespace);
    match api
        .patch_status(
            name,
            &PatchParams::apply(AUTOSCALER_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(%error, app = %format!("{namespace}/{name}"), "write the Autoscaled condition");
            false
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(silent_for: Duration, in_flight: u64) -> Report {
        Report {
            at: Instant::now() - silent_for,
            in_flight,
            held: 0,
        }
    }

    #[test]
    fn a_silent_gateway_holds_the_scale_only_while_it_was_busy_and_not_for_ever() {
        let mut reports: HashMap<String, Report> = [
            ("talking".to_string(), report(Duration::ZERO, 4)),
            (
                "idle-and-gone".to_string(),
                report(Duration::from_secs(5), 0),
            ),
            (
                "busy-and-silent".to_string(),
                report(Duration::from_secs(5), 3),
            ),
            ("busy-long-gone".to_string(), report(FORGET_BUSY_GATEWAY, 3)),
        ]
        .into_iter()
        .collect();
        let stale = silent_busy_gateways(&mut reports, "fn", Some(2)).expect("stale");
        assert!(stale.contains("gateway busy-and-silent for 5s"), "{stale}");
        assert!(stale.contains("3 request(s) for fn"), "{stale}");
        assert!(stale.ends_with("holding fn at 2 replica(s)"), "{stale}");
        let mut left: Vec<&str> = reports.keys().map(String::as_str).collect();
        left.sort();
        assert_eq!(left, ["busy-and-silent", "talking"]);

        let mut fresh: HashMap<String, Report> =
            [("talking".to_string(), report(Duration::ZERO, 4))]
                .into_iter()
                .collect();
        assert_eq!(silent_busy_gateways(&mut fresh, "fn", Some(2)), None);
    }
}
