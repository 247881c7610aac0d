//! The reconciler: turns each HybridApp into Deployments, Services and HPAs
//! and reports status.
//!
//! Reconcile is a pipeline: dereference → validate → build (pure, in
//! [`children`]) → apply → update status (pure, in [`status`]). Writes are
//! server-side apply under [`MANAGER`]; a child already holding what Tandem
//! wants is not written at all, and status is written only when it changed.

pub mod children;
pub mod httproute;
pub mod metrics;
pub mod ports;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::api::contract::{self, MANAGER, condition};
use crate::api::{HybridApp, HybridAppStatus, labels};
use crate::watch::{Unreadable, scoped};
use children::WorkloadChildren;
use metrics::ControllerMetrics;
use status::Problem;

/// Why a reconcile failed; the label is used in metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec cannot be applied as written; retried only after a change.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The API server failed a request (retried with backoff).
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// The object lacks a namespace or name (never for a real HybridApp).
    #[error("object without {0}")]
    MissingField(&'static str),
    /// Every gateway port of the operator's range is handed out.
    #[error("no free gateway port for {0} (every port of --gateway-ports is taken)")]
    NoGatewayPort(String),
}

impl Error {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Kube(kube::Error::Api(status)) if status.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Error::Kube(_) => "api",
            Error::MissingField(_) => "missing_field",
            Error::NoGatewayPort(_) => "no_gateway_port",
        }
    }
}

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// Most HybridApps reconciled at the same time.
    pub concurrency: u16,
    /// Periodic re-check of a converged app (level-triggered safety net).
    pub resync: Duration,
    /// Only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// Ports of the gateway pods handed out to workloads (see [`ports`]).
    pub gateway_ports: std::ops::RangeInclusive<u16>,
}

/// Shared by every reconcile.
pub struct Context {
    /// Client with the operator's identity.
    pub client: kube::Client,
    /// Publishes Events on HybridApps.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: ControllerMetrics,
    /// Settings.
    pub settings: ControllerSettings,
    deployments: Store<Deployment>,
    services: Store<Service>,
    hpas: Store<HorizontalPodAutoscaler>,
    /// The EndpointSlices Tandem writes (of public Services that point at
    /// the gateways).
    slices: Store<EndpointSlice>,
    /// The HTTPRoutes Tandem owns; `None` when the API server does not
    /// serve Gateway API HTTPRoutes (checked at start).
    http_routes: Option<Store<httproute::HttpRoute>>,
    /// HTTPRoutes this process applied, until the watch shows them.
    applied_routes: Recent<Arc<serde_json::Value>>,
    /// The live gateways.
    fleet: Arc<crate::fleet::Fleet>,
    /// Gateway ports of workloads.
    ports: ports::Ports,
    /// Set once every watch has listed its objects.
    synced: Arc<std::sync::atomic::AtomicBool>,
    /// Deployments this process created, as the API server returned them,
    /// until the watch shows them.
    created: Recent<Arc<Deployment>>,
    /// Services this process applied, as it applied them, until the watch
    /// shows them (so a reconcile that comes before the watch event does not
    /// apply them again).
    applied_services: Recent<Arc<serde_json::Value>>,
    /// EndpointSlices this process applied, likewise.
    applied_slices: Recent<Arc<serde_json::Value>>,
    /// Statuses this process wrote, with the resourceVersion of the app they
    /// were computed from: while the cache still shows that version, the
    /// write is not visible yet and must not be made again.
    written_status: Recent<(String, Arc<HybridAppStatus>)>,
    /// The generation of each app whose orphaned children were last looked
    /// for (in the last minute).
    swept: Recent<i64>,
    /// What the gateways measured per route (for migration gates).
    meter: Arc<crate::migration::Meter>,
    /// Events being published; beyond [`EVENTS_IN_FLIGHT`] an Event is
    /// dropped (and logged) rather than queued without bound.
    events: Arc<tokio::sync::Semaphore>,
}

/// Events published at once at most.
const EVENTS_IN_FLIGHT: usize = 64;

/// Children written in the last minute that the caches may not show yet,
/// by namespace and name.
struct Recent<T> {
    entries: std::sync::Mutex<RecentEntries<T>>,
}

struct RecentEntries<T> {
    by_name: BTreeMap<(String, String), (Instant, T)>,
    pruned: Instant,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            entries: std::sync::Mutex::new(RecentEntries {
                by_name: BTreeMap::new(),
                pruned: Instant::now(),
            }),
        }
    }
}

impl<T: Clone> Recent<T> {
    const KEPT: Duration = Duration::from_secs(60);

    fn remember(&self, namespace: &str, name: &str, value: T) {
        let mut entries = self.entries.lock().expect("recent lock");
        // Expired entries are ignored by `get`; dropping them every few
        // seconds keeps the map at about a minute's writes.
        if entries.pruned.elapsed() > Duration::from_secs(5) {
            entries
                .by_name
                .retain(|_, (at, _)| at.elapsed() < Self::KEPT);
            entries.pruned = Instant::now();
        }
        entries
            .by_name
            .insert((namespace.into(), name.into()), (Instant::now(), value));
    }

    fn get(&self, namespace: &str, name: &str) -> Option<T> {
        let entries = self.entries.lock().expect("recent lock");
        entries
            .by_name
            .get(&(namespace.to_string(), name.to_string()))
            .filter(|(at, _)| at.elapsed() < Self::KEPT)
            .map(|(_, value)| value.clone())
    }

    /// Called once the cache shows the object.
    fn forget(&self, namespace: &str, name: &str) {
        let mut entries = self.entries.lock().expect("recent lock");
        if !entries.by_name.is_empty() {
            entries
                .by_name
                .remove(&(namespace.to_string(), name.to_string()));
        }
    }
}

impl Context {
    /// The Deployment as the cache has it, or as it was created a moment
    /// ago if the cache does not have it yet.
    fn deployment(&self, namespace: &str, name: &str) -> Option<Arc<Deployment>> {
        self.deployments
            .get(&ObjectRef::new(name).within(namespace))
            .or_else(|| self.created.get(namespace, name))
    }
}

/// Watches one kind of child into a cache, in its own task, and sends the
/// owning HybridApp of every changed or deleted child to `owners`.
fn spawn_child_cache<K>(
    client: &kube::Client,
    namespace: Option<&str>,
    config: &watcher::Config,
    owners: tokio::sync::mpsc::Sender<ObjectRef<HybridApp>>,
) -> Store<K>
where
    K: crate::watch::Watched + kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    // Owners of a relist's children are asked for at its end, once the
    // cache holds the new list (asked at each InitApply, the reconcile could
    // read the old list), together with the owners known before it: a child
    // deleted while the watch was down vanishes in the relist without an
    // event of its own.
    let mut listing: HashSet<ObjectRef<HybridApp>> = HashSet::new();
    let mut known: HashSet<ObjectRef<HybridApp>> = HashSet::new();
    crate::watch::spawn_cache(
        scoped::<K>(client, namespace),
        config.clone(),
        move |event| {
            let owners_of = |child: &K| -> Vec<ObjectRef<HybridApp>> {
                let namespace = child.meta().namespace.clone().unwrap_or_default();
                child
                    .owner_references()
                    .iter()
                    .filter(|o| o.kind == "HybridApp" && o.controller == Some(true))
                    .map(|o| ObjectRef::new(&o.name).within(&namespace))
                    .collect()
            };
            let send: Vec<ObjectRef<HybridApp>> = match &event {
                watcher::Event::Apply(child) | watcher::Event::Delete(child) => {
                    let owners = owners_of(child);
                    known.extend(owners.iter().cloned());
                    owners
                }
                watcher::Event::Init => {
                    listing.clear();
                    Vec::new()
                }
                watcher::Event::InitApply(child) => {
                    listing.extend(owners_of(child));
                    Vec::new()
                }
                watcher::Event::InitDone => {
                    let before = std::mem::replace(&mut known, std::mem::take(&mut listing));
                    known
                        .iter()
                        .cloned()
                        .chain(before)
                        .collect::<HashSet<_>>()
                        .into_iter()
                        .collect()
                }
            };
            let owners = owners.clone();
            async move {
                for owner in send {
                    // Fails only once the controller is gone (shutdown).
                    let _ = owners.send(owner).await;
                }
            }
        },
    )
}

/// Runs the reconciler until `shutdown` completes. Calls `on_synced` once
/// every watch has listed its objects.
pub async fn run(
    client: kube::Client,
    metrics: ControllerMetrics,
    settings: ControllerSettings,
    meter: Arc<crate::migration::Meter>,
    fleet: Arc<crate::fleet::Fleet>,
    on_synced: impl FnOnce() + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let managed = watcher::Config::default().labels(&labels::managed_selector());
    let namespace = settings.namespace.clone();
    let namespace = namespace.as_deref();
    // Child caches run in their own tasks, so they keep up whatever the
    // controller is doing; each child event asks for its owner's reconcile.
    let (owners_tx, owners_rx) = tokio::sync::mpsc::channel::<ObjectRef<HybridApp>>(1024);
    let deployments =
        spawn_child_cache::<Deployment>(&client, namespace, &managed, owners_tx.clone());
    let services = spawn_child_cache::<Service>(&client, namespace, &managed, owners_tx.clone());
    let hpas = spawn_child_cache::<HorizontalPodAutoscaler>(
        &client,
        namespace,
        &managed,
        owners_tx.clone(),
    );
    let ours = watcher::Config::default().labels(&format!(
        "{},{}={}",
        labels::managed_selector(),
        labels::SLICE_MANAGED_BY,
        labels::SLICE_MANAGER
    ));
    let slices = spawn_child_cache::<EndpointSlice>(&client, namespace, &ours, owners_tx.clone());
    // HTTPRoutes only where the API server has them (the Gateway API CRDs
    // installed before the operator started).
    let http_routes = match scoped::<httproute::HttpRoute>(&client, namespace)
        .list(&kube::api::ListParams::default().limit(1))
        .await
    {
        Ok(_) => Some(spawn_child_cache::<httproute::HttpRoute>(
            &client, namespace, &managed, owners_tx,
        )),
        Err(error) => {
            tracing::info!(%error, "HTTPRoutes are not served here: spec.gateway cannot be honoured until the Gateway API CRDs are installed and the operator restarted");
            None
        }
    };
    // When gateways come or go, every app's public Services follow.
    let gateways_changed = futures::stream::unfold(fleet.subscribe(), |mut rx| async move {
        rx.changed().await.ok().map(|()| ((), rx))
    });
    // When the generations the gateways serve change, those apps' status
    // follows (RoutesProgrammed, and so Ready).
    let programmed_changed = futures::stream::unfold(fleet.clone(), |fleet| async move {
        let apps = fleet.changed_apps().await;
        Some((apps, fleet))
    })
    .flat_map(|apps| {
        futures::stream::iter(
            apps.into_iter()
                .map(|(namespace, name)| ObjectRef::new(&name).within(&namespace)),
        )
    });
    let gateway_ports = ports::Ports::new(settings.gateway_ports.clone());
    let owner_events = futures::stream::unfold(owners_rx, |mut rx| async move {
        rx.recv().await.map(|owner| (owner, rx))
    });

    let recorder = Recorder::new(client.clone(), Reporter::from("tandem-operator"));
    // HybridApps are read through untyped objects: one that cannot be read
    // (stored before a schema change, or by a newer Tandem) is skipped with
    // a Warning Event, and every other app syncs and reconciles.
    let (apps, writer) = reflector::store();
    let warn = recorder.clone();
    let on_unreadable: crate::watch::OnUnreadable = Arc::new(move |unreadable: &Unreadable| {
        let (recorder, unreadable) = (warn.clone(), unreadable.clone());
        tokio::spawn(async move { report_unreadable(&recorder, &unreadable).await });
    });
    let app_events = crate::watch::stored_objects(
        crate::watch::tolerant_events::<HybridApp>(
            &client,
            namespace,
            watcher::Config::default(),
            apps.clone(),
            on_unreadable,
        )
        .reflect(writer),
    );
    let controller = Controller::for_stream(app_events, apps.clone())
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .reconcile_on(owner_events)
        .reconcile_on(programmed_changed)
        .reconcile_all_on(gateways_changed);
    let context = Arc::new(Context {
        recorder,
        client,
        metrics,
        settings,
        deployments: deployments.clone(),
        services: services.clone(),
        hpas: hpas.clone(),
        slices: slices.clone(),
        http_routes: http_routes.clone(),
        applied_routes: Default::default(),
        ports: gateway_ports,
        fleet,
        created: Default::default(),
        applied_services: Default::default(),
        applied_slices: Default::default(),
        written_status: Default::default(),
        swept: Default::default(),
        meter,
        events: Arc::new(tokio::sync::Semaphore::new(EVENTS_IN_FLIGHT)),
        synced: Default::default(),
    });
    let synced_flag = context.synced.clone();
    tokio::spawn(async move {
        use crate::watch::listed;
        loop {
            if listed(&apps).await
                && listed(&deployments).await
                && listed(&services).await
                && listed(&hpas).await
                && listed(&slices).await
                && match &http_routes {
                    Some(store) => listed(store).await,
                    None => true,
                }
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!("watches synced");
        synced_flag.store(true, std::sync::atomic::Ordering::SeqCst);
        on_synced();
    });
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile outcome");
            }
        })
        .await;
}

/// A Warning Event on an app that cannot be read.
async fn report_unreadable(recorder: &Recorder, unreadable: &Unreadable) {
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("tandem.dev/v1alpha1".into()),
        kind: Some("HybridApp".into()),
        name: Some(unreadable.name.clone()),
        namespace: unreadable.namespace.clone(),
        uid: unreadable.uid.clone(),
        resource_version: unreadable.resource_version.clone(),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "Unreadable".into(),
        note: Some(
            format!(
                "Tandem cannot read this HybridApp ({}); it is skipped, and the last version it could read (if any) stays in force",
                unreadable.error
            )
            .chars()
            .take(1000)
            .collect(),
        ),
        action: "Reconcile".into(),
        secondary: None,
    };
    let published = tokio::time::timeout(
        Duration::from_secs(10),
        recorder.publish(&event, &reference),
    )
    .await;
    if !matches!(published, Ok(Ok(()))) {
        tracing::warn!(?published, name = %unreadable.name, "publish the Unreadable event");
    }
}

fn error_policy(app: Arc<HybridApp>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.failure(error.metric_label());
    match error {
        Error::InvalidSpec(_) => Action::await_change(),
        _ => {
            tracing::warn!(app = %app.name_any(), namespace = ?app.namespace(), %error, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

async fn reconcile(app: Arc<HybridApp>, context: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    // Every line logged while reconciling carries the app (in JSON logs,
    // the span's fields).
    // With trace export on, the span is a trace of its own, marked an
    // error when the reconcile fails.
    let span = tracing::info_span!(
        "reconcile",
        namespace = %app.namespace().unwrap_or_default(),
        app = %app.name_any(),
        generation = app.metadata.generation.unwrap_or_default(),
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    let result = reconcile_app(&app, &context).instrument(span.clone()).await;
    if let Err(error) = &result {
        span.record("otel.status_code", "error");
        span.record("error.type", error.metric_label());
    }
    context
        .metrics
        .reconciled(result.is_ok(), started.elapsed());
    result
}

async fn reconcile_app(app: &HybridApp, context: &Context) -> Result<Action, Error> {
    // The child caches must be complete before they can say "absent"; after
    // that, absent means absent (or created by us a moment ago). Awaiting
    // them here would stall the controller that drives them, so requeue.
    tracing::debug!(app = %app.name_any(), "reconcile");
    if !context.synced.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }

    // Dereference.
    let namespace = app.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = app
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingField("name"))?;
    if app.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the children.
        return Ok(Action::await_change());
    }

    // Validate what the schema could not.
    if let Err(message) = validate(app) {
        return fail_invalid(app, context, message).await;
    }

    // Build.
    let placement = place(app, context, &namespace, &name)?;
    let wanted = children::build(app, &placement);

    // Apply, one workload after the other: the API server serialises much
    // of a Service's creation, so writing a reconcile's Services side by side
    // lowers the throughput of all reconciles (bench/reconcile measured it).
    let mut changed = Vec::new();
    for child in &wanted {
        match apply_workload(context, &namespace, child).await {
            Ok(Some(change)) => changed.push(change),
            Ok(None) => {}
            Err(Error::Kube(kube::Error::Api(status))) if status.code == 422 => {
                let message = format!("workload {}: {}", child.workload, status.message);
                return fail_invalid(app, context, message).await;
            }
            Err(error) => {
                let message = format!("workload {}: {error}", child.workload);
                update_status(app, context, Some(&Problem::ApplyFailed(message))).await?;
                return Err(error);
            }
        }
    }
    match apply_http_route(app, context, &namespace, &name).await {
        Ok(change) => changed.extend(change),
        Err(Error::InvalidSpec(message)) => return fail_invalid(app, context, message).await,
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 422 => {
            let message = format!(
                "spec.gateway: the HTTPRoute was refused: {}",
                status.message
            );
            return fail_invalid(app, context, message).await;
        }
        Err(error) => {
            let message = match &error {
                Error::Kube(kube::Error::Api(status)) if status.code == 404 => "spec.gateway: this cluster does not serve Gateway API HTTPRoutes (install the Gateway API CRDs, then restart the operator)".to_string(),
                other => format!("spec.gateway: {other}"),
            };
            update_status(app, context, Some(&Problem::ApplyFailed(message))).await?;
            return Err(error);
        }
    }
    // Children of workloads that left the spec: looked for when the spec
    // changed, and at most once a minute otherwise (each look scans every
    // cached child, so not on every reconcile).
    let generation = app.metadata.generation.unwrap_or_default();
    let removed = if context.swept.get(&namespace, &name) == Some(generation) {
        Vec::new()
    } else {
        let removed = remove_unwanted(app, context, &namespace, &name, &wanted).await?;
        context.swept.remember(&namespace, &name, generation);
        removed
    };
    // One Event per kind of change, naming every workload it touched.
    let mut by_reason: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (reason, note) in changed.into_iter().chain(removed) {
        by_reason.entry(reason).or_default().push(note);
    }
    for (reason, notes) in by_reason {
        publish(context, app, EventType::Normal, reason, notes.join("; ")).await;
    }

    // Update status; a Deployment created in this pass is judged as the API
    // server returned it, so a new app is reported on at once, not one
    // watch event later.
    let recheck = update_status(app, context, None).await?;
    Ok(Action::requeue(
        recheck.map_or(context.settings.resync, |r| r.min(context.settings.resync)),
    ))
}

/// Where the gateways are and the gateway port of each workload reached
/// through them.
fn place(
    app: &HybridApp,
    context: &Context,
    namespace: &str,
    name: &str,
) -> Result<children::Placement, Error> {
    let mut ports = BTreeMap::new();
    let through: Vec<_> = app
        .spec
        .workloads
        .iter()
        .filter(|w| w.through_gateway())
        .collect();
    if !through.is_empty() {
        let services = context.services.state();
        for workload in through {
            let child = contract::child_name(name, &workload.name);
            let port = context
                .ports
                .port_of(
                    namespace,
                    &child,
                    services.iter().map(|s| &**s),
                    Instant::now(),
                )
                .ok_or_else(|| Error::NoGatewayPort(format!("{namespace}/{child}")))?;
            ports.insert(workload.name.clone(), port);
        }
    }
    Ok(children::Placement {
        gateways: context.fleet.addresses().to_vec(),
        ports,
    })
}

/// Checks the rules the CRD schema cannot express.
pub fn validate(app: &HybridApp) -> Result<(), String> {
    for workload in &app.spec.workloads {
        let labels = workload
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref());
        for key in [
            labels::APP,
            labels::WORKLOAD,
            labels::MODE,
            labels::MANAGED_BY,
        ] {
            if labels.is_some_and(|l| l.contains_key(key)) {
                return Err(format!(
                    "spec.workloads[{}].template.metadata.labels: {key} is set by Tandem; remove it",
                    workload.name
                ));
            }
        }
        let restart = workload
            .template
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref());
        if restart.is_some_and(|r| r != "Always") {
            return Err(format!(
                "spec.workloads[{}].template.spec.restartPolicy: workloads serve requests, so only Always is allowed",
                workload.name
            ));
        }
    }
    Ok(())
}

async fn fail_invalid(
    app: &HybridApp,
    context: &Context,
    message: String,
) -> Result<Action, Error> {
    publish(
        context,
        app,
        EventType::Warning,
        "InvalidSpec",
        message.clone(),
    )
    .await;
    update_status(app, context, Some(&Problem::InvalidSpec(message.clone()))).await?;
    Err(Error::InvalidSpec(message))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Applies one workload's children; returns an event to publish if anything
/// was created or changed.
async fn apply_workload(
    context: &Context,
    namespace: &str,
    child: &WorkloadChildren,
) -> Result<Option<(&'static str, String)>, Error> {
    let deployments: Api<Deployment> = Api::namespaced(context.client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(context.client.clone(), namespace);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(context.client.clone(), namespace);
    let key = |kind_name: &str| (namespace.to_string(), kind_name.to_string());
    let (ns, name) = key(&child.name);

    let mut event = None;
    let live = context.deployments.get(&ObjectRef::new(&name).within(&ns));
    match live {
        Some(live) => {
            context.created.forget(&ns, &name);
            if !children::up_to_date(&child.deployment, &comparable(&*live)) {
                if owns_replicas(&live) {
                    hand_over_replicas(&deployments, &live).await?;
                }
                deployments
                    .patch(&name, &apply_params(), &Patch::Apply(&child.deployment))
                    .await?;
                context.metrics.write("deployment");
                event = Some((
                    "WorkloadUpdated",
                    format!("{} (Deployment {name})", child.workload),
                ));
            }
        }
        // Created by us a moment ago; the watch has not delivered it yet.
        None if context.created.get(&ns, &name).is_some() => {}
        None => {
            let created = create_deployment(context, &deployments, child).await?;
            context.created.remember(&ns, &name, Arc::new(created));
            event = Some((
                "WorkloadCreated",
                format!(
                    "{} (Deployment and Service {name}, {} replica(s))",
                    child.workload, child.initial_replicas
                ),
            ));
        }
    }

    apply_service(context, &services, &ns, &name, &child.service).await?;
    apply_service(
        context,
        &services,
        &ns,
        &child.private_name,
        &child.private_service,
    )
    .await?;
    apply_slices(context, &ns, child).await?;

    let live_hpa = context.hpas.get(&ObjectRef::new(&name).within(&ns));
    match (&child.hpa, live_hpa) {
        (Some(hpa), live)
            if !live
                .as_ref()
                .is_some_and(|l| children::up_to_date(hpa, &comparable(&**l))) =>
        {
            hpas.patch(&name, &apply_params(), &Patch::Apply(hpa))
                .await?;
            context.metrics.write("hpa");
        }
        (None, Some(_)) => {
            delete_ignoring_missing(&hpas, &name).await?;
            context.metrics.write("hpa");
        }
        _ => {}
    }
    Ok(event)
}

/// Applies a Service unless the cache (or this process's last write, while
/// the cache does not show it yet) already has it as wanted.
async fn apply_service(
    context: &Context,
    services: &Api<Service>,
    namespace: &str,
    name: &str,
    desired: &Value,
) -> Result<(), Error> {
    let known = (&context.services, &context.applied_services);
    apply_known(
        context, services, known, "service", namespace, name, desired,
    )
    .await
}

/// Applies `desired` under `name` unless `store` (or `applied`, this
/// process's last write, while the store does not show it yet) already
/// has it as wanted; counts the write under `kind`.
async fn apply_known<K>(
    context: &Context,
    api: &Api<K>,
    (store, applied): (&Store<K>, &Recent<Arc<Value>>),
    kind: &'static str,
    namespace: &str,
    name: &str,
    desired: &Value,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let up_to_date = match store.get(&ObjectRef::new(name).within(namespace)) {
        Some(live) => {
            applied.forget(namespace, name);
            children::up_to_date(desired, &comparable(&*live))
        }
        None => applied
            .get(namespace, name)
            .is_some_and(|last| *last == *desired),
    };
    if !up_to_date {
        api.patch(name, &apply_params(), &Patch::Apply(desired))
            .await?;
        context.metrics.write(kind);
        applied.remember(namespace, name, Arc::new(desired.clone()));
    }
    Ok(())
}

/// Applies the EndpointSlices of a public Service that points at the
/// gateways, and deletes those it no longer has (no gateway of a family
/// left, or callers now reach the pods directly).
async fn apply_slices(
    context: &Context,
    namespace: &str,
    child: &WorkloadChildren,
) -> Result<(), Error> {
    // A new leader has not heard from every gateway yet: the slices stay
    // as they are (it is told when the warm-up ends).
    if !context.fleet.is_warm(Instant::now()) {
        return Ok(());
    }
    let api: Api<EndpointSlice> = Api::namespaced(context.client.clone(), namespace);
    let known = (&context.slices, &context.applied_slices);
    for desired in &child.endpoint_slices {
        let name = desired["metadata"]["name"].as_str().unwrap_or_default();
        apply_known(
            context,
            &api,
            known,
            "endpointslice",
            namespace,
            name,
            desired,
        )
        .await?;
    }
    for name in children::slice_names(&child.name) {
        let wanted = child
            .endpoint_slices
            .iter()
            .any(|s| s["metadata"]["name"] == name.as_str());
        let present = context
            .slices
            .get(&ObjectRef::new(&name).within(namespace))
            .is_some()
            || context.applied_slices.get(namespace, &name).is_some();
        if !wanted && present {
            delete_ignoring_missing(&api, &name).await?;
            context.applied_slices.forget(namespace, &name);
            context.metrics.write("endpointslice");
        }
    }
    Ok(())
}

/// Applies the app's HTTPRoute (spec.gateway), or deletes the one Tandem
/// made for it once spec.gateway is gone.
async fn apply_http_route(
    app: &HybridApp,
    context: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<(&'static str, String)>, Error> {
    let api: Api<httproute::HttpRoute> = Api::namespaced(context.client.clone(), namespace);
    let desired = httproute::build(app);
    let live = context
        .http_routes
        .as_ref()
        .and_then(|store| store.get(&ObjectRef::new(name).within(namespace)));
    match (desired, context.http_routes.as_ref()) {
        (Some(desired), Some(store)) => {
            let known = (store, &context.applied_routes);
            let fresh = live.is_none() && context.applied_routes.get(namespace, name).is_none();
            // Never take over a route someone else made (the cache holds
            // only Tandem's): one look before the first write.
            if fresh && let Some(other) = api.get_opt(name).await? {
                let owner = other
                    .owner_references()
                    .iter()
                    .any(|o| Some(o.uid.as_str()) == app.metadata.uid.as_deref());
                if !owner {
                    return Err(Error::InvalidSpec(format!(
                        "spec.gateway: an HTTPRoute {name} that Tandem did not create exists in {namespace}; Tandem writes its own route under the app's name, so rename or remove that one"
                    )));
                }
            }
            apply_known(context, &api, known, "httproute", namespace, name, &desired).await?;
            Ok(fresh.then(|| {
                (
                    "HTTPRouteCreated",
                    format!("HTTPRoute {name} for spec.gateway"),
                )
            }))
        }
        // Without a watch there is no cache to compare with: the apply
        // tells whether the cluster serves HTTPRoutes at all.
        (Some(desired), None) => {
            api.patch(name, &apply_params(), &Patch::Apply(&desired))
                .await?;
            context.metrics.write("httproute");
            Ok(None)
        }
        (None, _) => {
            let ours = live.is_some_and(|route| {
                route.owner_references().iter().any(|o| {
                    o.controller == Some(true)
                        && Some(o.uid.as_str()) == app.metadata.uid.as_deref()
                })
            });
            if !ours {
                return Ok(None);
            }
            delete_ignoring_missing(&api, name).await?;
            context.applied_routes.forget(namespace, name);
            context.metrics.write("httproute");
            Ok(Some((
                "HTTPRouteRemoved",
                format!("deleted HTTPRoute {name}: spec.gateway is gone"),
            )))
        }
    }
}

/// Creates the Deployment with its initial replicas. Tandem owns `replicas`
/// only until its next apply, which hands it over first (see
/// [`hand_over_replicas`]); a write by the autoscaler (forced apply) or the HPA
/// (update) takes it over earlier. So the field never falls back to its
/// default, and after creation exactly one writer changes it.
async fn create_deployment(
    context: &Context,
    deployments: &Api<Deployment>,
    child: &WorkloadChildren,
) -> Result<Deployment, Error> {
    let mut first = child.deployment.clone();
    first["spec"]["replicas"] = json!(child.initial_replicas);
    let created = deployments
        .patch(&child.name, &apply_params(), &Patch::Apply(&first))
        .await?;
    context.metrics.write("deployment");
    Ok(created)
}

/// Whether Tandem's own apply still owns `spec.replicas` (set at creation).
fn owns_replicas(deployment: &Deployment) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| {
            m.manager.as_deref() == Some(MANAGER)
                && m.operation.as_deref() == Some("Apply")
                && m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
}

/// Before an apply that omits `replicas` releases Tandem's ownership, the
/// autoscaler's manager applies the current value, so the field stays.
async fn hand_over_replicas(deployments: &Api<Deployment>, live: &Deployment) -> Result<(), Error> {
    let replicas = live.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    contract::apply_scale(
        deployments,
        live.metadata.name.as_deref().unwrap_or_default(),
        replicas.max(0) as u32,
        false,
    )
    .await?;
    Ok(())
}

/// Deletes children of workloads that are no longer in the spec.
async fn remove_unwanted(
    app: &HybridApp,
    context: &Context,
    namespace: &str,
    name: &str,
    wanted: &[WorkloadChildren],
) -> Result<Vec<(&'static str, String)>, Error> {
    let keep: BTreeSet<String> = wanted
        .iter()
        .flat_map(|c| {
            [c.name.clone(), c.private_name.clone()]
                .into_iter()
                .chain(children::slice_names(&c.name))
        })
        .collect();
    let uid = app.metadata.uid.as_deref();
    let orphan = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.namespace.as_deref() == Some(namespace)
            && meta
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::APP))
                .map(String::as_str)
                == Some(name)
            && !keep.contains(meta.name.as_deref().unwrap_or_default())
            && meta
                .owner_references
                .iter()
                .flatten()
                .any(|o| Some(o.uid.as_str()) == uid)
    };
    let mut events = Vec::new();
    for child in delete_orphans(
        context,
        namespace,
        &context.deployments,
        "deployment",
        &orphan,
    )
    .await?
    {
        events.push((
            "WorkloadRemoved",
            format!("deleted Deployment {child}: its workload left the spec"),
        ));
    }
    delete_orphans(context, namespace, &context.services, "service", &orphan).await?;
    delete_orphans(
        context,
        namespace,
        &context.slices,
        "endpointslice",
        &orphan,
    )
    .await?;
    delete_orphans(context, namespace, &context.hpas, "hpa", &orphan).await?;
    Ok(events)
}

/// Deletes the objects of `store` that `orphan` picks; returns their names.
async fn delete_orphans<K>(
    context: &Context,
    namespace: &str,
    store: &Store<K>,
    kind: &'static str,
    orphan: &impl Fn(&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool,
) -> Result<Vec<String>, Error>
where
    K: crate::watch::Watched + Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let api: Api<K> = Api::namespaced(context.client.clone(), namespace);
    let mut deleted = Vec::new();
    for object in store.state() {
        if orphan(object.meta()) {
            let name = object.name_any();
            delete_ignoring_missing(&api, &name).await?;
            context.metrics.write(kind);
            deleted.push(name);
        }
    }
    Ok(deleted)
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Writes the status if it changed. Returns when to look again for a
/// migration under way.
async fn update_status(
    app: &HybridApp,
    context: &Context,
    problem: Option<&Problem>,
) -> Result<Option<Duration>, Error> {
    let namespace = app.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = app.name_any();
    let deployments: BTreeMap<String, Deployment> = app
        .spec
        .workloads
        .iter()
        .filter_map(|w| {
            let child = contract::child_name(&name, &w.name);
            context
                .deployment(&namespace, &child)
                .map(|d| (w.name.clone(), (*d).clone()))
        })
        .collect();
    // The status this process wrote last, while the cache does not show it
    // yet (it still has the version the write was computed from); else the
    // cached one.
    let version = app.resource_version().unwrap_or_default();
    let recent = context
        .written_status
        .get(&namespace, &name)
        .filter(|(seen, _)| *seen == version)
        .map(|(_, written)| written);
    let previous = recent.as_deref().or(app.status.as_ref());
    let now = Timestamp::now();
    let routes = migrate(app, context, &namespace, &deployments, previous, now);
    let serving = context.fleet.serving(
        &(namespace.clone(), name.clone()),
        app.metadata.generation.unwrap_or_default(),
    );
    let http_route = app.spec.gateway.as_ref().map(|output| {
        let live = context
            .http_routes
            .as_ref()
            .and_then(|store| store.get(&ObjectRef::new(&name).within(&namespace)));
        httproute::accepted(live.as_deref(), &output.parent_refs, &namespace)
    });
    let next = status::compute(
        app,
        &deployments,
        routes.statuses,
        status::Routing {
            serving,
            http_route,
        },
        problem,
        previous,
        Time(now),
    );
    // The autoscaler's condition is its own (another field manager): it
    // is neither compared nor written here.
    let mine = previous.map(|p| {
        let mut p = p.clone();
        p.conditions.retain(|c| c.type_ != condition::AUTOSCALED);
        p
    });
    if mine.as_ref() == Some(&next) {
        return Ok(routes.recheck);
    }
    let was_ready = is_ready(previous);
    let patch = json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "HybridApp",
        "status": next,
    });
    let written = Api::<HybridApp>::namespaced(context.client.clone(), &namespace)
        .patch_status(&name, &apply_params(), &Patch::Apply(&patch))
        .await;
    match written {
        Ok(_) => {
            context
                .written_status
                .remember(&namespace, &name, (version, Arc::new(next.clone())))
        }
        // Deleted while we reconciled: nothing left to report on.
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    context.metrics.write("status");
    for (route, note) in routes.notes {
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let span = tracing::info_span!("route", route = %route);
        publish_as(context, app, type_, note.reason, &note.action, note.message)
            .instrument(span)
            .await;
    }
    if !routes.consumed.is_empty() {
        consume_commands(context, &namespace, &name, &routes.consumed).await;
    }
    // A Ready Event marks a recovery (from degraded or an invalid spec); a
    // new app's first Ready is its WorkloadCreated Event's sequel and says
    // nothing the condition does not (one request fewer per app).
    if is_ready(Some(&next)) && !was_ready && recovering(previous) {
        let message = next
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        publish(context, app, EventType::Normal, "Ready", message).await;
    }
    Ok(routes.recheck)
}

/// The routes' next statuses, from [`crate::migration::advance`].
struct Routes {
    statuses: Vec<crate::api::RouteStatus>,
    /// Each route's Events to publish, with the route's name.
    notes: Vec<(String, crate::migration::Note)>,
    recheck: Option<Duration>,
    /// Routes whose one-shot command annotation was acted on.
    consumed: Vec<String>,
}

fn migrate(
    app: &HybridApp,
    context: &Context,
    namespace: &str,
    deployments: &BTreeMap<String, Deployment>,
    previous: Option<&HybridAppStatus>,
    now: Timestamp,
) -> Routes {
    let name = app.name_any();
    let mut routes = Routes {
        statuses: Vec::new(),
        notes: Vec::new(),
        recheck: None,
        consumed: Vec::new(),
    };
    for route in &app.spec.routes {
        let before = previous.and_then(|p| p.routes.iter().find(|r| r.name == route.name));
        let observed = Observed {
            deployments,
            meter: &context.meter,
            namespace,
            app: &name,
            route: &route.name,
        };
        let command = crate::migration::Command::of(app, &route.name);
        let outcome =
            crate::migration::advance(route, &app.spec.workloads, before, command, &observed, now);
        // Routes that never had a migration cost nothing more here.
        if before.is_some_and(|b| b.migration.is_some()) || outcome.status.migration.is_some() {
            let state = outcome.status.migration.as_ref();
            if state.is_none_or(|m| !crate::migration::running(m.phase)) {
                context.meter.close(namespace, &name, &route.name);
            }
            context
                .metrics
                .migration(namespace, &name, &route.name, state);
        }
        if outcome.consumed.is_some_and(|c| c.one_shot()) {
            routes.consumed.push(route.name.clone());
        }
        routes
            .notes
            .extend(outcome.notes.into_iter().map(|n| (route.name.clone(), n)));
        routes.recheck = match (routes.recheck, outcome.recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        routes.statuses.push(outcome.status);
    }
    routes
}

/// The cluster as a migration sees it.
struct Observed<'a> {
    deployments: &'a BTreeMap<String, Deployment>,
    meter: &'a crate::migration::Meter,
    namespace: &'a str,
    app: &'a str,
    route: &'a str,
}

impl crate::migration::Observed for Observed<'_> {
    fn ready(&self, workload: &str) -> i32 {
        self.deployments
            .get(workload)
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    }

    fn figures(
        &self,
        step: &crate::migration::StepId,
        workloads: &[String],
    ) -> crate::migration::Figures {
        self.meter
            .figures(self.namespace, self.app, self.route, step, workloads)
    }

    fn route_concurrency(&self) -> f64 {
        self.meter
            .route_concurrency(self.namespace, self.app, self.route)
    }
}

/// Removes the `promote`/`abort`/`resume` annotations acted on (a JSON merge
/// patch of metadata, as `kubectl annotate ...-` does).
async fn consume_commands(context: &Context, namespace: &str, name: &str, routes: &[String]) {
    let annotations: serde_json::Map<String, Value> = routes
        .iter()
        .map(|r| {
            (
                format!("{}{r}", crate::migration::COMMAND_PREFIX),
                Value::Null,
            )
        })
        .collect();
    let patch = json!({"metadata": {"annotations": annotations}});
    let api = Api::<HybridApp>::namespaced(context.client.clone(), namespace);
    let patched = tokio::time::timeout(
        Duration::from_secs(10),
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await;
    if !matches!(patched, Ok(Ok(_))) {
        tracing::warn!(
            ?patched,
            app = name,
            "remove the migration command annotations"
        );
    }
}

/// Whether the app was Ready once and then not (degraded, invalid spec).
fn recovering(status: Option<&HybridAppStatus>) -> bool {
    status.is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == condition::READY && c.status == "False" && c.reason != "WorkloadsStarting"
        })
    })
}

fn is_ready(status: Option<&HybridAppStatus>) -> bool {
    status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == condition::READY && c.status == "True")
    })
}

/// Publishes an Event on `app` without holding up the reconcile (an Event
/// is a record for people; it must not slow the work it records), with a
/// 10 s timeout and at most [`EVENTS_IN_FLIGHT`] at once.
async fn publish(context: &Context, app: &HybridApp, type_: EventType, reason: &str, note: String) {
    publish_as(context, app, type_, reason, "Reconcile", note).await;
}

/// [`publish`] with an action of its own.
async fn publish_as(
    context: &Context,
    app: &HybridApp,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    tracing::info!(
        reason,
        action,
        warning = type_ == EventType::Warning,
        "{note}"
    );
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    let Ok(permit) = context.events.clone().try_acquire_owned() else {
        tracing::warn!(
            reason,
            app = %app.name_any(),
            "{EVENTS_IN_FLIGHT} Events are being published already; this one is dropped"
        );
        return;
    };
    let recorder = context.recorder.clone();
    let reference = app.object_ref(&());
    let reason = reason.to_string();
    tokio::spawn(async move {
        let _permit = permit;
        let published = tokio::time::timeout(
            Duration::from_secs(10),
            recorder.publish(&event, &reference),
        )
        .await;
        if !matches!(published, Ok(Ok(()))) {
            tracing::warn!(?published, reason, "publish event");
        }
    });
}

/// A child as JSON for [`children::up_to_date`], without its managed fields
/// (the largest part, and irrelevant to the comparison).
fn comparable<K: Resource + Clone + serde::Serialize>(object: &K) -> Value {
    let mut object = object.clone();
    object.meta_mut().managed_fields = None;
    to_value(&object)
}

fn to_value<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn recent_writes_are_kept_for_a_minute_or_until_forgotten() {
        let recent: Recent<u32> = Recent::default();
        recent.remember("ns", "a", 1);
        recent.remember("ns", "b", 2);
        assert_eq!(recent.get("ns", "a"), Some(1));
        assert_eq!(recent.get("other", "a"), None);
        recent.forget("ns", "a");
        assert_eq!(recent.get("ns", "a"), None);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(recent.get("ns", "b"), Some(2));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(recent.get("ns", "b"), None, "expired after a minute");
        // The next write drops expired entries from the map.
        recent.remember("ns", "c", 3);
        let entries = recent.entries.lock().unwrap();
        assert_eq!(
            entries.by_name.keys().cloned().collect::<Vec<_>>(),
            [("ns".to_string(), "c".to_string())]
        );
    }
}
