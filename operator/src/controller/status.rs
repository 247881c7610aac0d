//! HybridApp status as a pure function of the spec and the observed children.
//!
//! Conditions follow the Kubernetes and kstatus conventions: `Ready`,
//! `Progressing` and `Degraded` are always present; `Reconciling` and
//! `Stalled` appear only while true, so `kubectl wait --for=condition=Ready`
//! and Flux's health checks work without custom code.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::contract::condition;
use crate::api::{
    HybridApp, HybridAppStatus, MigrationPhase, MigrationStatus, RouteStatus, Workload,
    WorkloadState, WorkloadStatus,
};

/// Whether the app's routes are served: by the Tandem gateways, and (with
/// `spec.gateway`) by the parents of its HTTPRoute.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// How many live gateways serve the app's generation.
    pub serving: crate::fleet::Serving,
    /// With `spec.gateway`: accepted by every parent (and how), or why not.
    pub http_route: Option<Result<String, String>>,
}

/// Something that kept the reconcile from converging.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// The spec cannot be applied as written (waits for a change).
    InvalidSpec(String),
    /// A write failed for a reason that may pass (retried with backoff).
    ApplyFailed(String),
}

/// Computes the status around `routes` (the effective weights, from
/// [`crate::migration::advance`]) and `serving` (how many live gateways
/// serve the app's generation). `previous` supplies condition transition
/// times, which change only when a condition's status changes.
///
/// `Ready` means routable: with gateways live, it also waits until every
/// one of them serves the current generation (`RoutesProgrammed`). With
/// none reporting to this operator, `RoutesProgrammed` says so and `Ready`
/// judges the workloads alone.
pub fn compute(
    app: &HybridApp,
    deployments: &BTreeMap<String, Deployment>,
    routes: Vec<RouteStatus>,
    routing: Routing,
    problem: Option<&Problem>,
    previous: Option<&HybridAppStatus>,
    now: Time,
) -> HybridAppStatus {
    let workloads: Vec<WorkloadStatus> = app
        .spec
        .workloads
        .iter()
        .map(|w| workload_status(w, deployments.get(&w.name)))
        .collect();
    let count = |function: bool| {
        workloads
            .iter()
            .filter(|w| w.mode.function_like() == function)
            .count() as i32
    };
    let at_zero = workloads
        .iter()
        .filter(|w| w.state == WorkloadState::ScaledToZero)
        .count() as i32;

    let degraded: Vec<&WorkloadStatus> = workloads
        .iter()
        .filter(|w| w.state == WorkloadState::Degraded)
        .collect();
    let starting: Vec<&WorkloadStatus> = workloads
        .iter()
        .filter(|w| w.state == WorkloadState::Starting)
        .collect();
    let describe = |list: &[&WorkloadStatus]| {
        list.iter()
            .map(|w| match &w.message {
                Some(m) => format!("{}: {m}", w.name),
                None => format!("{} ({}/{} ready)", w.name, w.ready_replicas, w.replicas),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };

    // (ready, progressing, degraded, reconciling, stalled), each (status, reason, message)
    type C = (bool, &'static str, String);
    let (ready, progressing, degraded_c, reconciling, mut stalled): (
        C,
        C,
        C,
        Option<C>,
        Option<C>,
    ) = match problem {
        Some(Problem::InvalidSpec(message)) => (
            (false, "InvalidSpec", message.clone()),
            (false, "InvalidSpec", "waiting for a corrected spec".into()),
            (true, "InvalidSpec", message.clone()),
            None,
            Some((true, "InvalidSpec", message.clone())),
        ),
        Some(Problem::ApplyFailed(message)) => (
            (false, "ApplyFailed", message.clone()),
            (true, "Retrying", message.clone()),
            (true, "ApplyFailed", message.clone()),
            Some((true, "ApplyFailed", message.clone())),
            None,
        ),
        None if !degraded.is_empty() => {
            let message = describe(&degraded);
            (
                (false, "WorkloadDegraded", message.clone()),
                (false, "WorkloadDegraded", message.clone()),
                (true, "WorkloadDegraded", message.clone()),
                None,
                Some((true, "WorkloadDegraded", message)),
            )
        }
        None if !starting.is_empty() => {
            let message = format!("waiting for {}", describe(&starting));
            (
                (false, "WorkloadsStarting", message.clone()),
                (true, "WorkloadsStarting", message.clone()),
                (false, "AsExpected", "no workload is degraded".into()),
                Some((true, "WorkloadsStarting", message)),
                None,
            )
        }
        None => {
            let total = workloads.len();
            let message = if at_zero > 0 {
                format!(
                    "{total} workloads ready ({at_zero} function(s) scaled to zero, woken on demand)"
                )
            } else {
                format!("{total} workloads ready")
            };
            (
                (true, "AllWorkloadsReady", message),
                (
                    false,
                    "Complete",
                    "all workloads are at their desired state".into(),
                ),
                (false, "AsExpected", "no workload is degraded".into()),
                None,
                None,
            )
        }
    };

    let generation = app.metadata.generation;
    let Routing {
        serving,
        http_route,
    } = routing;
    let programmed = routes_programmed(serving, generation.unwrap_or_default(), http_route);
    let waits = serving.gateways > 0 || programmed.1 == "HTTPRouteNotAccepted";
    let (ready, mut reconciling) = if ready.0 && !programmed.0 && waits {
        let waiting = (false, "RoutesNotProgrammed", programmed.2.clone());
        (
            waiting.clone(),
            reconciling.or(Some((true, waiting.1, waiting.2))),
        )
    } else {
        (ready, reconciling)
    };

    let (migrated, migrations) = migrations(&routes);
    if problem.is_none() && reconciling.is_none() && stalled.is_none() && !migrated.0 {
        // kstatus: in progress while a migration runs, stalled when one
        // cannot reach the spec's weights.
        match migrated.1 {
            "Stalled" | "RolledBack" | "Aborted" => {
                stalled = Some((true, migrated.1, migrated.2.clone()));
            }
            _ => reconciling = Some((true, "Migrating", migrated.2.clone())),
        }
    }

    let old = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let mut conditions = vec![
        condition(condition::READY, ready, generation, old, &now),
        condition(condition::PROGRESSING, progressing, generation, old, &now),
        condition(condition::DEGRADED, degraded_c, generation, old, &now),
        condition(condition::MIGRATED, migrated, generation, old, &now),
        condition(
            condition::ROUTES_PROGRAMMED,
            programmed,
            generation,
            old,
            &now,
        ),
    ];
    if let Some(c) = reconciling {
        conditions.push(condition(condition::RECONCILING, c, generation, old, &now));
    }
    if let Some(c) = stalled {
        conditions.push(condition(condition::STALLED, c, generation, old, &now));
    }

    HybridAppStatus {
        observed_generation: generation,
        conditions,
        routes,
        migrations,
        functions: Some(count(true)),
        functions_at_zero: Some(at_zero),
        always_on: Some(count(false)),
        route_count: Some(app.spec.routes.len() as i32),
        workloads,
        // The autoscaler's.
        placements: Vec::new(),
        costs: Vec::new(),
        saving: None,
    }
}

/// `RoutesProgrammed`: whether every live gateway serves `generation`.
fn routes_programmed(
    serving: crate::fleet::Serving,
    generation: i64,
    http_route: Option<Result<String, String>>,
) -> (bool, &'static str, String) {
    let crate::fleet::Serving { gateways, current } = serving;
    let accepted = match http_route {
        Some(Err(why)) => return (false, "HTTPRouteNotAccepted", why),
        Some(Ok(accepted)) => Some(accepted),
        None => None,
    };
    if let Some(accepted) = &accepted
        && (gateways == 0 || current == gateways)
    {
        let tandem = if gateways == 0 {
            String::new()
        } else {
            format!("; all {gateways} Tandem gateway(s) serve generation {generation}")
        };
        return (true, "Programmed", format!("{accepted}{tandem}"));
    }
    if gateways == 0 {
        return (
            false,
            "NoGateway",
            "no gateway reports to the operator yet".into(),
        );
    }
    if current < gateways {
        return (
            false,
            "Programming",
            format!("{current} of {gateways} gateway(s) serve generation {generation}"),
        );
    }
    (
        true,
        "Programmed",
        format!("all {gateways} gateway(s) serve generation {generation}"),
    )
}

fn condition(
    type_: &str,
    (status, reason, message): (bool, &'static str, String),
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn workload_status(workload: &Workload, deployment: Option<&Deployment>) -> WorkloadStatus {
    let mut status = WorkloadStatus {
        name: workload.name.clone(),
        mode: workload.mode,
        replicas: 0,
        ready_replicas: 0,
        state: WorkloadState::Starting,
        message: None,
    };
    let Some(deployment) = deployment else {
        status.message = Some("creating its Deployment".into());
        return status;
    };
    let spec_replicas = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let observed = deployment.status.clone().unwrap_or_default();
    status.replicas = spec_replicas;
    status.ready_replicas = observed.ready_replicas.unwrap_or(0);

    let conditions = observed.conditions.unwrap_or_default();
    let failing = conditions.iter().find(|c| {
        (c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            || (c.type_ == "ReplicaFailure" && c.status == "True")
    });
    if let Some(failing) = failing {
        status.state = WorkloadState::Degraded;
        status.message = failing
            .message
            .clone()
            .or_else(|| failing.reason.clone())
            .map(|m| format!("Deployment {}", m));
        return status;
    }

    let rolled_out = observed.observed_generation >= deployment.metadata.generation
        && observed.updated_replicas.unwrap_or(0) >= spec_replicas
        && observed.replicas.unwrap_or(0) <= spec_replicas
        && status.ready_replicas >= spec_replicas;
    status.state = match (workload.mode, spec_replicas) {
        (mode, 0) if mode.function_like() && observed.replicas.unwrap_or(0) == 0 => {
            WorkloadState::ScaledToZero
        }
        _ if rolled_out => WorkloadState::Ready,
        _ => WorkloadState::Starting,
    };
    status
}

/// The `Migrated` condition and the printer column's summary: True when
/// every route is at its spec's weights; else False with the phase of the
/// first route that is not, worst first.
fn migrations(routes: &[RouteStatus]) -> ((bool, &'static str, String), Option<String>) {
    let open: Vec<(&RouteStatus, &MigrationStatus)> = routes
        .iter()
        .filter_map(|r| r.migration.as_ref().map(|m| (r, m)))
        .filter(|(_, m)| m.phase != MigrationPhase::Succeeded)
        .collect();
    if open.is_empty() {
        let message = if routes.iter().any(|r| r.migration.is_some()) {
            "every migration succeeded"
        } else {
            "no route is migrating"
        };
        return ((true, "Migrated", message.into()), None);
    }
    let rank = |phase: MigrationPhase| match phase {
        MigrationPhase::RolledBack => 0,
        MigrationPhase::Aborted => 1,
        MigrationPhase::Stalled => 2,
        MigrationPhase::Paused => 3,
        _ => 4,
    };
    let (worst_route, worst) = open
        .iter()
        .min_by_key(|(_, m)| rank(m.phase))
        .expect("not empty");
    let reason = match worst.phase {
        MigrationPhase::RolledBack => "RolledBack",
        MigrationPhase::Aborted => "Aborted",
        MigrationPhase::Stalled => "Stalled",
        MigrationPhase::Paused => "Paused",
        MigrationPhase::PreWarming => "PreWarming",
        _ => "Progressing",
    };
    let summary = open
        .iter()
        .map(|(r, m)| match m.phase {
            MigrationPhase::RolledBack | MigrationPhase::Aborted => {
                format!("{} {:?}", r.name, m.phase)
            }
            _ => format!("{} {:?} {}%", r.name, m.phase, m.step_weight),
        })
        .collect::<Vec<_>>()
        .join(", ");
    (
        (
            false,
            reason,
            format!("route {}: {}", worst_route.name, worst.message),
        ),
        Some(summary),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Serving;
    use serde_json::json;

    fn app() -> HybridApp {
        let mut app: HybridApp = serde_yaml::from_str(
            r#"
apiVersion: tandem.dev/v1alpha1
kind: HybridApp
metadata: {name: shop, generation: 4}
spec:
  workloads:
    - {name: web, mode: AlwaysOn, port: 80, template: {spec: {containers: [{name: c, image: i}]}}}
    - {name: fn, mode: Function, port: 80, template: {spec: {containers: [{name: c, image: i}]}}}
  routes:
    - {name: split, match: {pathPrefix: /}, backends: [{workload: web, weight: 2}, {workload: fn, weight: 1}]}
"#,
        )
        .unwrap();
        app.metadata.generation = Some(4);
        app
    }

    fn deployment(replicas: i32, ready: i32) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"generation": 2},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {"observedGeneration": 2, "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": ready}
        }))
        .unwrap()
    }

    fn routes() -> Vec<RouteStatus> {
        app()
            .spec
            .routes
            .iter()
            .map(|r| RouteStatus {
                name: r.name.clone(),
                weights: crate::migration::percent_shares(r),
                migration: None,
            })
            .collect()
    }

    fn now() -> Time {
        Time("2026-01-01T00:00:00Z".parse().unwrap())
    }

    /// The status of a new app with `observed` Deployments, no gateway.
    fn first_status(observed: &BTreeMap<String, Deployment>) -> HybridAppStatus {
        compute(
            &app(),
            observed,
            routes(),
            Routing::default(),
            None,
            None,
            now(),
        )
    }

    /// web ready, fn at zero.
    fn all_ready() -> BTreeMap<String, Deployment> {
        BTreeMap::from([
            ("web".to_string(), deployment(1, 1)),
            ("fn".to_string(), deployment(0, 0)),
        ])
    }

    fn find<'a>(status: &'a HybridAppStatus, type_: &str) -> Option<&'a Condition> {
        status.conditions.iter().find(|c| c.type_ == type_)
    }

    #[test]
    fn ready_waits_for_every_live_gateway_to_serve_the_generation() {
        let observed = all_ready();
        let with = |gateways, current| {
            let serving = Serving { gateways, current };
            compute(
                &app(),
                &observed,
                routes(),
                Routing {
                    serving,
                    http_route: None,
                },
                None,
                None,
                now(),
            )
        };
        let lagging = with(2, 1);
        let ready = find(&lagging, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "RoutesNotProgrammed")
        );
        assert_eq!(
            find(&lagging, "Reconciling").unwrap().status,
            "True",
            "kstatus: in progress"
        );
        let programmed = find(&lagging, "RoutesProgrammed").unwrap();
        assert_eq!(programmed.reason, "Programming");
        assert!(
            programmed.message.starts_with("1 of 2 gateway(s)"),
            "{}",
            programmed.message
        );

        let served = with(2, 2);
        assert_eq!(find(&served, "Ready").unwrap().status, "True");
        assert_eq!(find(&served, "RoutesProgrammed").unwrap().status, "True");
        assert!(find(&served, "Reconciling").is_none());

        // No gateway reports to this operator: said so, Ready judges the
        // workloads alone.
        let alone = with(0, 0);
        assert_eq!(find(&alone, "Ready").unwrap().status, "True");
        assert_eq!(
            find(&alone, "RoutesProgrammed").unwrap().reason,
            "NoGateway"
        );
    }

    #[test]
    fn ready_when_always_on_is_ready_and_the_function_is_at_zero() {
        let observed = all_ready();
        let status = first_status(&observed);
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(find(&status, "Ready").unwrap().status, "True");
        assert_eq!(find(&status, "Ready").unwrap().reason, "AllWorkloadsReady");
        assert_eq!(find(&status, "Degraded").unwrap().status, "False");
        assert!(find(&status, "Reconciling").is_none());
        assert!(find(&status, "Stalled").is_none());
        assert_eq!(status.workloads[1].state, WorkloadState::ScaledToZero);
        assert_eq!(
            (status.functions, status.functions_at_zero, status.always_on),
            (Some(1), Some(1), Some(1))
        );
        assert_eq!(
            status.routes[0].weights,
            BTreeMap::from([("web".into(), 67), ("fn".into(), 33)])
        );
    }

    #[test]
    fn starting_workloads_keep_it_progressing_and_name_the_laggards() {
        let observed = BTreeMap::from([("web".to_string(), deployment(2, 1))]);
        let status = first_status(&observed);
        let ready = find(&status, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "WorkloadsStarting")
        );
        assert!(
            ready.message.contains("web (1/2 ready)"),
            "{}",
            ready.message
        );
        assert!(
            ready.message.contains("fn: creating its Deployment"),
            "{}",
            ready.message
        );
        assert_eq!(find(&status, "Progressing").unwrap().status, "True");
        assert_eq!(find(&status, "Reconciling").unwrap().status, "True");
    }

    #[test]
    fn invalid_spec_stalls_and_transition_times_only_move_on_change() {
        let first = compute(
            &app(),
            &BTreeMap::new(),
            routes(),
            Routing::default(),
            Some(&Problem::InvalidSpec("bad template".into())),
            None,
            now(),
        );
        assert_eq!(find(&first, "Stalled").unwrap().status, "True");
        assert_eq!(find(&first, "Ready").unwrap().reason, "InvalidSpec");
        let later = Time("2026-01-01T01:00:00Z".parse().unwrap());
        let again = compute(
            &app(),
            &BTreeMap::new(),
            routes(),
            Routing::default(),
            Some(&Problem::InvalidSpec("bad template".into())),
            Some(&first),
            later.clone(),
        );
        assert_eq!(first, again, "nothing changed, so nothing to write");
        let observed = all_ready();
        let fixed = compute(
            &app(),
            &observed,
            routes(),
            Routing::default(),
            None,
            Some(&again),
            later.clone(),
        );
        assert_eq!(find(&fixed, "Ready").unwrap().last_transition_time, later);
        assert!(find(&fixed, "Stalled").is_none());
    }

    #[test]
    fn route_shares_add_up_to_100() {
        for weights in [vec![1, 1, 1], vec![80, 20], vec![0, 5], vec![7, 11, 13, 17]] {
            let backends: Vec<_> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| json!({"workload": format!("w{i}"), "weight": w}))
                .collect();
            let route: crate::api::Route = serde_json::from_value(
                json!({"name": "r", "match": {"pathPrefix": "/"}, "backends": backends}),
            )
            .unwrap();
            let shares = crate::migration::percent_shares(&route);
            assert_eq!(
                shares.values().sum::<i32>(),
                100,
                "{weights:?} -> {shares:?}"
            );
        }
    }
}
