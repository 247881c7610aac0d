use std::cell::RefCell;
use std::collections::HashMap;

use serde_json::json;

use super::*;

fn app(weights: (i32, i32), migration: serde_json::Value) -> HybridApp {
    let mut route = json!({"name": "search", "match": {"pathPrefix": "/search"},
        "backends": [{"workload": "web", "weight": weights.0}, {"workload": "fn", "weight": weights.1}]});
    if !migration.is_null() {
        route["migration"] = migration;
    }
    serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "shop", "namespace": "ns"},
        "spec": {
            "workloads": [
                {"name": "web", "mode": "AlwaysOn", "port": 80, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                 "scaling": {"minReplicas": 2}},
                {"name": "fn", "mode": "Function", "port": 80, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                 "scaling": {"targetConcurrency": 10, "maxReplicas": 5}}
            ],
            "routes": [route]
        }
    }))
    .unwrap()
}

fn plan() -> serde_json::Value {
    json!({"steps": [5, 25, 50, 100], "stepInterval": "10s", "progressDeadline": "60s",
           "rollbackGrace": "30s", "analysis": {"maxErrorRate": "1%", "minRequests": 50}})
}

/// A cluster whose readiness and measurements the test sets.
#[derive(Default)]
struct Fake {
    ready: HashMap<String, i32>,
    /// (requests, errors) measured in the current window.
    window: RefCell<(u64, u64)>,
    concurrency: f64,
    opened: RefCell<Vec<StepId>>,
}

impl Observed for Fake {
    fn ready(&self, workload: &str) -> i32 {
        self.ready.get(workload).copied().unwrap_or(0)
    }
    fn figures(&self, step: &StepId, workloads: &[String]) -> Figures {
        assert_eq!(
            workloads,
            ["fn".to_string()],
            "only the destination is judged"
        );
        let mut opened = self.opened.borrow_mut();
        if opened.last() != Some(step) {
            opened.push(step.clone());
        }
        let (requests, errors) = *self.window.borrow();
        let mut latency = vec![0; crate::protocol::LATENCY_BUCKETS_MS.len() + 1];
        latency[crate::protocol::bucket_of(20)] = requests;
        Figures {
            window: Duration::from_secs(10),
            requests,
            errors,
            latency,
            cold_waits: 0,
            cold_wait: vec![],
        }
    }
    fn route_concurrency(&self) -> f64 {
        self.concurrency
    }
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

/// Runs `advance` for the app's only route from `previous`.
fn step(
    app: &HybridApp,
    previous: &RouteStatus,
    command: Option<Command>,
    fake: &Fake,
    now: i64,
) -> Outcome {
    advance(
        &app.spec.routes[0],
        &app.spec.workloads,
        Some(previous),
        command,
        fake,
        at(now),
    )
}

fn steady(web: i32, fun: i32) -> RouteStatus {
    RouteStatus {
        name: "search".into(),
        weights: BTreeMap::from([("web".into(), web), ("fn".into(), fun)]),
        migration: None,
    }
}

fn phase(outcome: &Outcome) -> MigrationPhase {
    outcome.status.migration.as_ref().expect("migrating").phase
}

#[test]
fn without_a_migration_the_spec_applies_at_once() {
    let app = app((0, 100), serde_json::Value::Null);
    let outcome = step(&app, &steady(100, 0), None, &Fake::default(), 0);
    assert_eq!(outcome.status, steady(0, 100));
    assert_eq!(outcome.recheck, None);
    // A new route has no previous status: the spec, too.
    let app = super::tests::app((0, 100), plan());
    let first = advance(
        &app.spec.routes[0],
        &app.spec.workloads,
        None,
        None,
        &Fake::default(),
        at(0),
    );
    assert_eq!(first.status.weights, steady(0, 100).weights);
    assert_eq!(first.status.migration, None);
}

#[test]
fn a_healthy_migration_prewarms_then_walks_every_step_to_the_target() {
    let app = app((0, 100), plan());
    let mut fake = Fake {
        concurrency: 100.0,
        ..Default::default()
    };
    // Spec changed 100/0 -> 0/100: pre-warm before any traffic moves.
    let mut outcome = step(&app, &steady(100, 0), None, &fake, 0);
    let state = outcome.status.migration.clone().unwrap();
    assert_eq!(state.phase, MigrationPhase::PreWarming);
    assert_eq!(outcome.status.weights, steady(100, 0).weights);
    // Step 1 puts 5% of 100 in flight on fn: 5 at 10 per replica -> 1.
    assert_eq!(state.prewarm, BTreeMap::from([("fn".into(), 1)]));
    assert_eq!(outcome.notes[0].reason, "MigrationStarted");
    assert_eq!(outcome.recheck, Some(RECHECK));
    assert_eq!(
        floors(&with_status(&app, &outcome.status), at(0)),
        BTreeMap::from([("fn".into(), 1)])
    );

    fake.ready.insert("fn".into(), 1);
    let mut now = 1;
    let mut seen = vec![];
    let mut applied = vec![];
    for _ in 0..40 {
        let previous = outcome.status.clone();
        *fake.window.borrow_mut() = (60, 0);
        fake.ready.insert("fn".into(), 5);
        outcome = step(&app, &previous, None, &fake, now);
        let m = outcome.status.migration.clone().unwrap();
        applied.push(m.applied);
        if seen.last() != Some(&outcome.status.weights) {
            seen.push(outcome.status.weights.clone());
        }
        if m.phase == MigrationPhase::Succeeded {
            break;
        }
        now += 5;
    }
    assert_eq!(phase(&outcome), MigrationPhase::Succeeded);
    let fns: Vec<i32> = seen
        .iter()
        .map(|w| w.get("fn").copied().unwrap_or(0))
        .collect();
    assert_eq!(fns, vec![5, 25, 50, 100]);
    assert!(applied.windows(2).all(|w| w[0] <= w[1]), "{applied:?}");
    let done = outcome.status.migration.as_ref().unwrap();
    assert!(done.prewarm.is_empty());
    assert_eq!(done.last_analysis.as_ref().unwrap().result, "Passed");
    assert!(outcome.notes.iter().any(|n| n.reason == "Migrated"));
    assert_eq!(outcome.recheck, None);
    // Each step measured its own window.
    assert_eq!(fake.opened.borrow().len(), 4);
    // Stays put once done.
    let again = step(&app, &outcome.status, None, &fake, now + 100);
    assert_eq!(again.status, outcome.status);
    assert!(again.notes.is_empty());
}

fn with_status(app: &HybridApp, route: &RouteStatus) -> HybridApp {
    let mut app = app.clone();
    app.status = Some(crate::api::HybridAppStatus {
        routes: vec![route.clone()],
        ..Default::default()
    });
    app
}

/// Walks from 100/0 to the first step under way at time 1.
fn first_step(app: &HybridApp, fake: &mut Fake) -> Outcome {
    fake.ready.insert("fn".into(), 1);
    let prewarming = step(app, &steady(100, 0), None, fake, 0);
    let outcome = step(app, &prewarming.status, None, fake, 1);
    assert_eq!(phase(&outcome), MigrationPhase::Progressing);
    assert_eq!(outcome.status.weights, steady(95, 5).weights);
    outcome
}

#[test]
fn a_failing_gate_rolls_back_at_once_keeps_the_destination_warm_and_does_not_retry() {
    let app = app((0, 100), plan());
    let mut fake = Fake::default();
    let running = first_step(&app, &mut fake);
    // Not enough requests yet: 20% errors are not judged.
    *fake.window.borrow_mut() = (10, 2);
    let early = step(&app, &running.status, None, &fake, 3);
    assert_eq!(phase(&early), MigrationPhase::Progressing);
    // Enough, before the step's interval is over: rolled back now.
    *fake.window.borrow_mut() = (60, 12);
    let failed = step(&app, &early.status, None, &fake, 4);
    assert_eq!(phase(&failed), MigrationPhase::RolledBack);
    assert_eq!(failed.status.weights, steady(100, 0).weights);
    let m = failed.status.migration.as_ref().unwrap();
    let analysis = m.last_analysis.as_ref().unwrap();
    assert_eq!(
        (analysis.requests, analysis.errors, analysis.result.as_str()),
        (60, 12, "Failed")
    );
    assert_eq!(analysis.error_rate, "20.00%");
    assert!(
        m.message.contains("error rate 20.0% (12 of 60 requests)"),
        "{}",
        m.message
    );
    let note = failed
        .notes
        .iter()
        .find(|n| n.reason == "RolledBack")
        .unwrap();
    assert!(note.warning && note.message.contains("20.0%"), "{note:?}");
    // Warm for the grace, then released.
    let held = with_status(&app, &failed.status);
    assert_eq!(floors(&held, at(10)), BTreeMap::from([("fn".into(), 1)]));
    assert_eq!(failed.recheck, Some(Duration::from_secs(30)));
    let later = step(&app, &failed.status, None, &fake, 40);
    assert_eq!(phase(&later), MigrationPhase::RolledBack);
    assert_eq!(later.status.weights, steady(100, 0).weights);
    assert!(later.status.migration.as_ref().unwrap().prewarm.is_empty());
    assert!(floors(&with_status(&app, &later.status), at(40)).is_empty());
    // A changed spec tries again, from the baseline.
    let retry = super::tests::app((50, 50), plan());
    *fake.window.borrow_mut() = (0, 0);
    let again = step(&retry, &later.status, None, &fake, 50);
    assert_eq!(phase(&again), MigrationPhase::Progressing);
    assert_eq!(
        again.status.migration.as_ref().unwrap().baseline,
        steady(100, 0).weights
    );
}

#[test]
fn too_few_requests_hold_the_step_then_stall_it_and_traffic_resumes_it() {
    let app = app((0, 100), plan());
    let mut fake = Fake::default();
    let running = first_step(&app, &mut fake);
    *fake.window.borrow_mut() = (12, 0);
    let held = step(&app, &running.status, None, &fake, 20);
    assert_eq!(phase(&held), MigrationPhase::Progressing);
    assert_eq!(
        held.status.weights,
        steady(95, 5).weights,
        "never passed with too few"
    );
    let m = held.status.migration.as_ref().unwrap();
    assert!(m.message.contains("12 of 50 requests"), "{}", m.message);
    assert_eq!(m.last_analysis.as_ref().unwrap().result, "TooFewRequests");
    let stalled = step(&app, &held.status, None, &fake, 70);
    assert_eq!(phase(&stalled), MigrationPhase::Stalled);
    assert!(stalled.notes.iter().any(|n| n.reason == "MigrationStalled"));
    *fake.window.borrow_mut() = (80, 0);
    let resumed = step(&app, &stalled.status, None, &fake, 75);
    let m = resumed.status.migration.as_ref().unwrap();
    // fn is ready for step 2 too, so it is under way at once.
    assert_eq!((m.phase, m.step), (MigrationPhase::Progressing, 2), "{m:?}");
}

#[test]
fn a_destination_that_does_not_become_ready_stalls_the_migration_before_any_traffic_moves() {
    let app = app((0, 100), plan());
    let fake = Fake::default();
    let waiting = step(&app, &steady(100, 0), None, &fake, 0);
    let stalled = step(&app, &waiting.status, None, &fake, 61);
    assert_eq!(phase(&stalled), MigrationPhase::Stalled);
    assert_eq!(stalled.status.weights, steady(100, 0).weights);
    let m = stalled.status.migration.as_ref().unwrap();
    assert!(m.message.contains("fn 0/1 ready"), "{}", m.message);
}

#[test]
fn pause_resume_promote_and_abort_are_commands() {
    let app = app((0, 100), plan());
    let mut fake = Fake::default();
    let running = first_step(&app, &mut fake);
    *fake.window.borrow_mut() = (80, 0);
    let paused = step(&app, &running.status, Some(Command::Pause), &fake, 30);
    assert_eq!(phase(&paused), MigrationPhase::Paused);
    assert_eq!(paused.status.weights, steady(95, 5).weights);
    assert_eq!(paused.consumed, None);
    let resumed = step(&app, &paused.status, None, &fake, 31);
    let m = resumed.status.migration.as_ref().unwrap();
    assert_eq!(
        (m.phase, m.step),
        (MigrationPhase::Progressing, 1),
        "the step starts over"
    );
    assert_eq!(m.step_started, Time(at(31)));

    let promoted = step(&app, &resumed.status, Some(Command::Promote), &fake, 32);
    assert_eq!(phase(&promoted), MigrationPhase::Succeeded);
    assert_eq!(promoted.status.weights, steady(0, 100).weights);
    assert_eq!(promoted.consumed, Some(Command::Promote));

    let aborted = step(&app, &resumed.status, Some(Command::Abort), &fake, 32);
    assert_eq!(phase(&aborted), MigrationPhase::Aborted);
    assert_eq!(aborted.status.weights, steady(100, 0).weights);
    // A leftover command on an ended migration is only removed.
    let leftover = step(&app, &aborted.status, Some(Command::Promote), &fake, 33);
    assert_eq!(phase(&leftover), MigrationPhase::Aborted);
    assert_eq!(leftover.consumed, Some(Command::Promote));
}

#[test]
fn a_new_target_during_a_migration_starts_from_the_weights_in_force() {
    let app = app((0, 100), plan());
    let mut fake = Fake::default();
    let running = first_step(&app, &mut fake);
    let changed = super::tests::app((60, 40), plan());
    let next = step(&changed, &running.status, None, &fake, 5);
    let m = next.status.migration.as_ref().unwrap();
    assert_eq!(m.baseline, steady(95, 5).weights);
    assert_eq!(m.target, steady(60, 40).weights);
    // fn is ready, so its first step (5% of the change) applies at once.
    assert_eq!(next.status.weights, steady(93, 7).weights);
}

#[test]
fn the_gateways_split_exactly_by_the_applied_share() {
    let app = app((0, 100), plan());
    let mut fake = Fake::default();
    let running = first_step(&app, &mut fake);
    let live = with_status(&app, &running.status);
    let mut weights = gateway_weights(&live, &live.spec.routes[0]);
    weights.sort();
    assert_eq!(weights, vec![("fn".into(), 500), ("web".into(), 9500)]);
    // No status for the route yet: the spec.
    assert_eq!(
        gateway_weights(&app, &app.spec.routes[0]),
        vec![("web".into(), 0), ("fn".into(), 100)]
    );
    // Rounded shares add up to 100 and exact ones never move back.
    let state = running.status.migration.clone().unwrap();
    let three = MigrationStatus {
        baseline: BTreeMap::from([("a".into(), 34), ("b".into(), 33), ("c".into(), 33)]),
        target: BTreeMap::from([("a".into(), 0), ("b".into(), 50), ("c".into(), 50)]),
        ..state
    };
    let mut last: Option<BTreeMap<String, i32>> = None;
    for applied in 0..=100 {
        let split = exact(&three, applied);
        assert_eq!(rounded(&split).values().sum::<i32>(), 100);
        if let Some(last) = &last {
            assert!(split["a"] <= last["a"] && split["b"] >= last["b"] && split["c"] >= last["c"]);
        }
        last = Some(split);
    }
}

#[test]
fn plans_fill_in_defaults_and_parse_percents() {
    let migration: Migration = serde_json::from_value(json!({"steps": [50, 100]})).unwrap();
    let plan = Plan::of(&migration);
    assert_eq!(plan.steps, vec![50, 100]);
    assert_eq!(plan.step_interval, DEFAULT_STEP_INTERVAL);
    assert_eq!(plan.max_error_rate, DEFAULT_MAX_ERROR_RATE);
    assert_eq!(plan.min_requests, DEFAULT_MIN_REQUESTS);
    assert_eq!(parse_percent("0.5%"), Some(0.5));
    assert_eq!(parse_percent("101%"), None);
    assert_eq!(parse_percent("5"), None);
}
