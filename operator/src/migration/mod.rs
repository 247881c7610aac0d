//! Moving a route's traffic between workloads (between modes) in steps.
//!
//! `spec` holds the weights the user wants; the weights the gateways apply
//! are the *effective* ones, in `status.routes[]`. A route without a
//! `migration` has effective = desired at once. With one, a change of the
//! desired weights starts a migration from the effective weights (the
//! baseline) to the desired ones (the target), and [`advance`] walks it:
//!
//! 1. **Pre-warm** the destinations (the workloads that gain traffic) to the
//!    replicas the next step needs, written as a floor in the status that the
//!    autoscaler honours, and wait until they are ready (bounded by the
//!    progress deadline).
//! 2. **Shift** the step's share of the change.
//! 3. **Measure** the destinations on this route from the gateways' reports
//!    ([`meter`]); fail at once when enough requests break a limit, pass once
//!    the step interval is over with enough requests, hold with too few.
//! 4. After the last step, **Succeeded**; after a failed gate, **RolledBack**
//!    to the baseline with the destination kept warm for the rollback grace,
//!    and no new attempt until the spec changes.
//!
//! Everything is in the route's status, so a new leader resumes where the
//! last one was; what it did not measure itself it measures again (a step
//! never passes on figures nobody saw). [`advance`] is pure: time, readiness
//! and measurements come in as arguments.

pub mod meter;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{
    AnalysisStatus, HybridApp, Migration, MigrationPhase, MigrationStatus, Mode, Route,
    RouteStatus, Workload,
};
pub use meter::{Figures, Meter, RouteKey};

/// Prefix of the annotations that steer a route's migration:
/// `migration.tandem.dev/<route>: pause | resume | promote | abort`.
pub const COMMAND_PREFIX: &str = "migration.tandem.dev/";

/// Default time of one step.
pub const DEFAULT_STEP_INTERVAL: Duration = Duration::from_secs(60);
/// Default time a step may wait for replicas or requests.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
/// Default time the destination is kept warm after a rollback.
pub const DEFAULT_ROLLBACK_GRACE: Duration = Duration::from_secs(300);
/// Default highest error rate, in percent.
pub const DEFAULT_MAX_ERROR_RATE: f64 = 1.0;
/// Default fewest requests for a step to pass.
pub const DEFAULT_MIN_REQUESTS: u64 = 20;
/// How often a running step is looked at (a failing gate is caught within
/// this and one stats interval).
pub const RECHECK: Duration = Duration::from_secs(1);

/// A command given by annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Hold the current step until the annotation goes (or says `resume`).
    Pause,
    /// Go to the target now.
    Promote,
    /// Go back to the baseline now, as after a failed gate.
    Abort,
}

impl Command {
    /// The command an app's annotations give `route`, if any. `resume` (or
    /// anything unknown) is no command.
    pub fn of(app: &HybridApp, route: &str) -> Option<Command> {
        let value = app
            .metadata
            .annotations
            .as_ref()?
            .get(&format!("{COMMAND_PREFIX}{route}"))?;
        match value.trim() {
            "pause" => Some(Command::Pause),
            "promote" => Some(Command::Promote),
            "abort" => Some(Command::Abort),
            _ => None,
        }
    }

    /// Whether the operator removes the annotation once it acted on it.
    pub fn one_shot(self) -> bool {
        self != Command::Pause
    }
}

/// Settings of a migration with every default filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Percent of the change at each step.
    pub steps: Vec<i32>,
    /// Time of one step.
    pub step_interval: Duration,
    /// Time a step may wait for replicas or requests.
    pub progress_deadline: Duration,
    /// Time the destination stays warm after a rollback.
    pub rollback_grace: Duration,
    /// Highest error rate, percent.
    pub max_error_rate: f64,
    /// Highest p99 response time.
    pub max_p99_latency: Option<Duration>,
    /// Highest p99 cold wait.
    pub max_cold_wait: Option<Duration>,
    /// Fewest requests to pass.
    pub min_requests: u64,
}

impl Plan {
    /// The plan of `migration`, with defaults.
    pub fn of(migration: &Migration) -> Plan {
        let duration = |d: &Option<crate::api::Duration>, default: Duration| {
            d.as_ref().and_then(|d| d.to_std().ok()).unwrap_or(default)
        };
        let analysis = migration.analysis.clone().unwrap_or_default();
        let mut steps: Vec<i32> = migration
            .steps
            .iter()
            .copied()
            .filter(|s| (1..=100).contains(s))
            .collect();
        steps.sort_unstable();
        steps.dedup();
        if steps.last() != Some(&100) {
            steps.push(100);
        }
        Plan {
            steps,
            step_interval: duration(&migration.step_interval, DEFAULT_STEP_INTERVAL),
            progress_deadline: duration(&migration.progress_deadline, DEFAULT_PROGRESS_DEADLINE),
            rollback_grace: duration(&migration.rollback_grace, DEFAULT_ROLLBACK_GRACE),
            max_error_rate: analysis
                .max_error_rate
                .as_deref()
                .and_then(parse_percent)
                .unwrap_or(DEFAULT_MAX_ERROR_RATE),
            max_p99_latency: analysis.max_p99_latency.and_then(|d| d.to_std().ok()),
            max_cold_wait: analysis.max_cold_wait.and_then(|d| d.to_std().ok()),
            min_requests: analysis
                .min_requests
                .map(|n| n.max(1) as u64)
                .unwrap_or(DEFAULT_MIN_REQUESTS),
        }
    }
}

/// `1%` or `0.5%` as a number of percent.
pub fn parse_percent(text: &str) -> Option<f64> {
    let number: f64 = text.trim().strip_suffix('%')?.parse().ok()?;
    (0.0..=100.0).contains(&number).then_some(number)
}

/// What [`advance`] needs to know of the cluster.
pub trait Observed {
    /// Ready replicas of a workload.
    fn ready(&self, workload: &str) -> i32;
    /// What the gateways measured on this route for `workloads` since the
    /// current step's window opened. The window of a step opens the first
    /// time it is asked for (`step` names it).
    fn figures(&self, step: &StepId, workloads: &[String]) -> Figures;
    /// Requests in flight on the whole route, estimated from its recent
    /// rate and response time.
    fn route_concurrency(&self) -> f64;
}

/// Names the measuring window of one step of one migration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StepId {
    /// When the migration began.
    pub started: Timestamp,
    /// The step.
    pub step: i32,
    /// When the step began (a resumed step opens a new window).
    pub step_started: Timestamp,
}

/// Something to tell the user in an Event.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    /// A `Warning` rather than `Normal`.
    pub warning: bool,
    /// The Event's reason.
    pub reason: &'static str,
    /// The Event's action: Events with the same reason and action within a
    /// few minutes are one Event series, so each step has its own.
    pub action: String,
    /// The Event's text.
    pub message: String,
}

/// What [`advance`] decided for one route.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The route's next status.
    pub status: RouteStatus,
    /// Events to publish.
    pub notes: Vec<Note>,
    /// Look again after this long (a migration under way, or a warm hold
    /// that ends).
    pub recheck: Option<Duration>,
    /// The command annotation was acted on and should be removed.
    pub consumed: Option<Command>,
}

/// The next status of `route`, given its previous one.
pub fn advance(
    route: &Route,
    workloads: &[Workload],
    previous: Option<&RouteStatus>,
    command: Option<Command>,
    observed: &impl Observed,
    now: Timestamp,
) -> Outcome {
    // Status keeps times to the second: so does every time written here, or
    // a step read back from the API server would not be the step written.
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let desired = percent_shares(route);
    let steady = |notes| Outcome {
        status: RouteStatus {
            name: route.name.clone(),
            weights: desired.clone(),
            migration: None,
        },
        notes,
        recheck: None,
        consumed: None,
    };
    let (Some(migration), Some(previous)) = (&route.migration, previous) else {
        return steady(vec![]);
    };
    let plan = Plan::of(migration);
    let known = |w: &String| workloads.iter().any(|k| &k.name == w);
    let current = previous.migration.as_ref().filter(|m| m.target == desired);
    let mut state = match current {
        Some(state) => state.clone(),
        None => {
            // A new target: start from what the gateways apply now.
            let baseline = previous.weights.clone();
            if baseline == desired || baseline.values().sum::<i32>() == 0 {
                return steady(vec![]);
            }
            let step_weight = plan.steps[0];
            let started = Time(now);
            MigrationStatus {
                phase: MigrationPhase::PreWarming,
                step: 1,
                step_weight,
                applied: 0,
                step_started: started.clone(),
                started,
                baseline,
                target: desired.clone(),
                prewarm: BTreeMap::new(),
                warm_until: None,
                message: format!("pre-warming for step 1 ({step_weight}% of the change)"),
                last_analysis: None,
            }
        }
    };
    if let Some(gone) = state
        .target
        .keys()
        .chain(state.baseline.keys())
        .find(|w| !known(w))
    {
        // The target is the spec's, so only a workload that left the spec
        // since the migration began: nothing to migrate from.
        return steady(vec![Note {
            warning: true,
            reason: "MigrationSkipped",
            action: "Migrate".into(),
            message: format!(
                "route {}: workload {gone} is gone from the spec; the new weights apply at once",
                route.name
            ),
        }]);
    }
    let mut notes = Vec::new();
    if current.is_none() {
        notes.push(Note {
            warning: false,
            reason: "MigrationStarted",
            action: "Migrate".into(),
            message: format!(
                "route {}: moving from {} to {} in steps {:?}",
                route.name,
                show(&state.baseline),
                show(&state.target),
                plan.steps
            ),
        });
    }
    let mut consumed = None;
    let mut recheck = None;
    let ended = !running(state.phase);
    match command {
        Some(Command::Promote) if !ended => {
            consumed = Some(Command::Promote);
            succeed(&mut state, now, "promoted by annotation");
            notes.push(Note {
                warning: false,
                reason: "MigrationPromoted",
                action: "Migrate".into(),
                message: format!("route {}: promoted to {}", route.name, show(&state.target)),
            });
        }
        Some(Command::Abort) if !ended => {
            consumed = Some(Command::Abort);
            roll_back(
                &mut state,
                &plan,
                now,
                MigrationPhase::Aborted,
                "aborted by annotation".into(),
            );
            notes.push(Note {
                warning: true,
                reason: "MigrationAborted",
                action: "Migrate".into(),
                message: format!(
                    "route {}: aborted; back at {}",
                    route.name,
                    show(&state.baseline)
                ),
            });
        }
        Some(Command::Promote | Command::Abort) => consumed = command,
        Some(Command::Pause) if !ended => {
            if state.phase != MigrationPhase::Paused {
                state.phase = MigrationPhase::Paused;
                state.message = format!(
                    "paused by annotation at step {} ({}% of the change applied)",
                    state.step, state.applied
                );
                notes.push(Note {
                    warning: false,
                    reason: "MigrationPaused",
                    action: "Migrate".into(),
                    message: format!("route {}: {}", route.name, state.message),
                });
            }
        }
        _ => {
            if state.phase == MigrationPhase::Paused {
                // Resumed: the step starts over, with a new window.
                state.phase = if state.applied == state.step_weight {
                    MigrationPhase::Progressing
                } else {
                    MigrationPhase::PreWarming
                };
                state.step_started = Time(now);
                state.message = format!("resumed at step {}", state.step);
                notes.push(Note {
                    warning: false,
                    reason: "MigrationResumed",
                    action: "Migrate".into(),
                    message: format!("route {}: {}", route.name, state.message),
                });
            }
            walk(
                route,
                workloads,
                &plan,
                &mut state,
                observed,
                now,
                &mut notes,
                &mut recheck,
            );
        }
    }
    if let Some(until) = &state.warm_until {
        let left = until.0.duration_since(now);
        if left > SignedDuration::ZERO {
            recheck = Some(recheck.map_or(unsigned(left), |r: Duration| r.min(unsigned(left))));
        } else {
            state.prewarm.clear();
        }
    }
    Outcome {
        status: RouteStatus {
            name: route.name.clone(),
            weights: rounded(&effective_exact(&state)),
            migration: Some(state),
        },
        notes,
        recheck,
        consumed,
    }
}

/// One look at a migration that is not paused or ended: pre-warm, step,
/// judge.
#[allow(clippy::too_many_arguments)]
fn walk(
    route: &Route,
    workloads: &[Workload],
    plan: &Plan,
    state: &mut MigrationStatus,
    observed: &impl Observed,
    now: Timestamp,
    notes: &mut Vec<Note>,
    recheck: &mut Option<Duration>,
) {
    // Two passes at most: a step that passes may start the next at once.
    for _ in 0..2 {
        let since = unsigned(now.duration_since(state.step_started.0));
        match state.phase {
            MigrationPhase::PreWarming | MigrationPhase::Stalled
                if state.applied < state.step_weight =>
            {
                let wanted = step_replicas(workloads, state, observed);
                for (workload, replicas) in &wanted {
                    let floor = state.prewarm.entry(workload.clone()).or_insert(0);
                    *floor = (*floor).max(*replicas);
                }
                let waiting: Vec<String> = state
                    .prewarm
                    .iter()
                    .filter(|(w, n)| destinations(state).contains(w) && observed.ready(w) < **n)
                    .map(|(w, n)| format!("{w} {}/{n} ready", observed.ready(w)))
                    .collect();
                if waiting.is_empty() {
                    state.phase = MigrationPhase::Progressing;
                    state.applied = state.step_weight;
                    state.step_started = Time(now);
                    state.message = format!(
                        "step {} of {}: {}% of the change, measuring for {}s",
                        state.step,
                        plan.steps.len(),
                        state.step_weight,
                        plan.step_interval.as_secs()
                    );
                    notes.push(Note {
                        warning: false,
                        reason: "MigrationStep",
                        action: format!("MigrateStep{}", state.step),
                        message: format!(
                            "route {}: step {} of {}, weights {}",
                            route.name,
                            state.step,
                            plan.steps.len(),
                            show(&rounded(&effective_exact(state)))
                        ),
                    });
                    continue;
                }
                let message = format!(
                    "pre-warming for step {}: {}",
                    state.step,
                    waiting.join(", ")
                );
                if since >= plan.progress_deadline {
                    stall(
                        route,
                        state,
                        format!("{message} after {}s", since.as_secs()),
                        notes,
                    );
                } else {
                    state.message = message;
                }
                *recheck = Some(RECHECK);
                return;
            }
            MigrationPhase::Progressing | MigrationPhase::Stalled => {
                let id = StepId {
                    started: state.started.0,
                    step: state.step,
                    step_started: state.step_started.0,
                };
                let figures = observed.figures(&id, &destinations(state));
                let failure = gate(plan, &figures);
                let enough = figures.requests >= plan.min_requests;
                if enough && let Some(failure) = failure {
                    state.last_analysis = Some(analysis(state.step, &figures, now, "Failed"));
                    let message = format!("step {} failed: {failure}", state.step);
                    roll_back(
                        state,
                        plan,
                        now,
                        MigrationPhase::RolledBack,
                        message.clone(),
                    );
                    notes.push(Note {
                        warning: true,
                        reason: "RolledBack",
                        action: "Migrate".into(),
                        message: format!(
                            "route {}: {message}; back at {}",
                            route.name,
                            show(&state.baseline)
                        ),
                    });
                    return;
                }
                if since < plan.step_interval {
                    *recheck = Some(RECHECK.min(plan.step_interval - since));
                    return;
                }
                if !enough {
                    let stale = state.last_analysis.as_ref().is_none_or(|a| {
                        a.step != state.step
                            || unsigned(now.duration_since(a.time.0)) >= plan.step_interval
                    });
                    if stale {
                        state.last_analysis =
                            Some(analysis(state.step, &figures, now, "TooFewRequests"));
                    }
                    let message = format!(
                        "step {} holds: {} of {} requests in {}s",
                        state.step,
                        figures.requests,
                        plan.min_requests,
                        figures.window.as_secs()
                    );
                    if since >= plan.progress_deadline {
                        stall(route, state, message, notes);
                    } else if state.phase != MigrationPhase::Stalled {
                        state.message = message;
                    }
                    *recheck = Some(RECHECK);
                    return;
                }
                state.last_analysis = Some(analysis(state.step, &figures, now, "Passed"));
                let index = plan.steps.iter().position(|s| *s == state.step_weight);
                match index.and_then(|i| plan.steps.get(i + 1)) {
                    None => {
                        succeed(state, now, "all steps passed");
                        notes.push(Note {
                            warning: false,
                            reason: "Migrated",
                            action: "Migrate".into(),
                            message: format!(
                                "route {}: migrated to {}",
                                route.name,
                                show(&state.target)
                            ),
                        });
                        return;
                    }
                    Some(next) => {
                        state.step += 1;
                        state.step_weight = *next;
                        state.phase = MigrationPhase::PreWarming;
                        state.step_started = Time(now);
                        state.message = format!("pre-warming for step {}", state.step);
                    }
                }
            }
            _ => return,
        }
    }
    *recheck = Some(RECHECK);
}

fn stall(route: &Route, state: &mut MigrationStatus, message: String, notes: &mut Vec<Note>) {
    if state.phase != MigrationPhase::Stalled {
        notes.push(Note {
            warning: true,
            reason: "MigrationStalled",
            action: "Migrate".into(),
            message: format!("route {}: {message}", route.name),
        });
    }
    state.phase = MigrationPhase::Stalled;
    state.message = message;
}

fn succeed(state: &mut MigrationStatus, now: Timestamp, why: &str) {
    state.phase = MigrationPhase::Succeeded;
    state.applied = 100;
    state.step_weight = 100;
    state.step_started = Time(now);
    state.prewarm.clear();
    state.warm_until = None;
    state.message = format!("{why}; at {}", show(&state.target));
}

fn roll_back(
    state: &mut MigrationStatus,
    plan: &Plan,
    now: Timestamp,
    phase: MigrationPhase,
    message: String,
) {
    state.phase = phase;
    state.applied = 0;
    state.step_started = Time(now);
    let grace = SignedDuration::try_from(plan.rollback_grace).unwrap_or(SignedDuration::ZERO);
    state.warm_until = Some(Time(now.saturating_add(grace).unwrap_or(now)));
    state.message = format!("{message}; the spec must change for another attempt");
}

/// The first limit `figures` break, described with the numbers.
fn gate(plan: &Plan, figures: &Figures) -> Option<String> {
    if figures.requests == 0 {
        return None;
    }
    let rate = figures.error_rate();
    if rate > plan.max_error_rate {
        return Some(format!(
            "error rate {rate:.1}% ({} of {} requests) is above {}%",
            figures.errors, figures.requests, plan.max_error_rate
        ));
    }
    if let Some(limit) = plan.max_p99_latency {
        let p99 = figures.p99_latency();
        if p99 > limit {
            return Some(format!(
                "p99 latency {}ms is above {}ms",
                p99.as_millis(),
                limit.as_millis()
            ));
        }
    }
    if let Some(limit) = plan.max_cold_wait {
        let p99 = figures.p99_cold_wait();
        if p99 > limit {
            return Some(format!(
                "p99 cold wait {}ms ({} held requests) is above {}ms",
                p99.as_millis(),
                figures.cold_waits,
                limit.as_millis()
            ));
        }
    }
    None
}

fn analysis(step: i32, figures: &Figures, now: Timestamp, result: &str) -> AnalysisStatus {
    AnalysisStatus {
        step,
        time: Time(now),
        window_seconds: figures.window.as_secs() as i64,
        requests: figures.requests as i64,
        errors: figures.errors as i64,
        error_rate: format!("{:.2}%", figures.error_rate()),
        p99_latency_ms: figures.p99_latency().as_millis() as i64,
        cold_waits: figures.cold_waits as i64,
        p99_cold_wait_ms: figures.p99_cold_wait().as_millis() as i64,
        result: result.into(),
    }
}

/// The workloads that gain traffic in this migration.
fn destinations(state: &MigrationStatus) -> Vec<String> {
    state
        .target
        .iter()
        .filter(|(w, t)| **t > state.baseline.get(*w).copied().unwrap_or(0))
        .map(|(w, _)| w.clone())
        .collect()
}

/// Replicas each destination needs before the current step: the route's
/// concurrency times its share at the step, over its target per replica;
/// at least one, and at least an AlwaysOn workload's minimum.
fn step_replicas(
    workloads: &[Workload],
    state: &MigrationStatus,
    observed: &impl Observed,
) -> BTreeMap<String, i32> {
    let at_step = exact(state, state.step_weight);
    let concurrency = observed.route_concurrency();
    destinations(state)
        .into_iter()
        .filter_map(|name| {
            let workload = workloads.iter().find(|w| w.name == name)?;
            let scaling = workload.scaling();
            let share = at_step.get(&name).copied().unwrap_or(0) as f64 / 10_000.0;
            let needed =
                (concurrency * share / f64::from(scaling.target_concurrency.max(1))).ceil();
            let replicas = match (workload.mode, scaling.metric) {
                // A HorizontalPodAutoscaler owns its replicas: wait for its
                // minimum only.
                (Mode::AlwaysOn, crate::api::Metric::Cpu) => scaling.min_replicas.max(1),
                (Mode::AlwaysOn, _) => (needed as i32).max(scaling.min_replicas.max(1)),
                (Mode::Function | Mode::Auto, _) => (needed as i32).max(1),
            };
            let replicas = replicas.min(scaling.max_replicas.max(1));
            Some((name, replicas))
        })
        .collect()
}

/// The split at `applied` percent of the change, in hundredths of a percent
/// (exact: `baseline × (100 − applied) + target × applied`), so every weight
/// moves monotonically from its baseline to its target.
fn exact(state: &MigrationStatus, applied: i32) -> BTreeMap<String, i32> {
    let applied = applied.clamp(0, 100);
    let mut weights = BTreeMap::new();
    for name in state.baseline.keys().chain(state.target.keys()) {
        let from = state.baseline.get(name).copied().unwrap_or(0);
        let to = state.target.get(name).copied().unwrap_or(0);
        weights.insert(name.clone(), from * (100 - applied) + to * applied);
    }
    weights
}

/// The exact split the gateways apply for a migration's status, in
/// hundredths of a percent.
pub fn effective_exact(state: &MigrationStatus) -> BTreeMap<String, i32> {
    exact(state, state.applied)
}

/// Hundredths of a percent to whole percents that add up to 100.
fn rounded(exact: &BTreeMap<String, i32>) -> BTreeMap<String, i32> {
    let units: Vec<(String, u32)> = exact
        .iter()
        .map(|(name, w)| (name.clone(), (*w).max(0) as u32))
        .collect();
    largest_remainder(&units)
}

/// Percent of a route's requests per workload, by the largest-remainder
/// method so the shares add up to exactly 100.
pub fn percent_shares(route: &Route) -> BTreeMap<String, i32> {
    let weights: Vec<(String, u32)> = route
        .backends
        .iter()
        .map(|b| (b.workload.clone(), b.weight()))
        .collect();
    largest_remainder(&weights)
}

fn largest_remainder(weights: &[(String, u32)]) -> BTreeMap<String, i32> {
    let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return BTreeMap::new();
    }
    let exact: Vec<(u64, u64)> = weights
        .iter()
        .map(|(_, w)| {
            let scaled = u64::from(*w) * 100;
            (scaled / total, scaled % total)
        })
        .collect();
    let mut shares: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
    let mut left = 100 - shares.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..exact.len()).collect();
    order.sort_by(|a, b| exact[*b].1.cmp(&exact[*a].1).then(a.cmp(b)));
    for i in order {
        if left == 0 || exact[i].1 == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    weights
        .iter()
        .zip(shares)
        .map(|((name, _), share)| (name.clone(), share as i32))
        .collect()
}

/// Weights the gateways apply to `route` of `app`, as relative weights per
/// workload: the spec's for a route without a migration or without a status
/// yet; otherwise the effective ones in status, exact while a migration
/// runs. Workloads no longer in the spec are left out; if that leaves
/// nothing, the spec's weights apply.
pub fn gateway_weights(app: &HybridApp, route: &Route) -> Vec<(String, u32)> {
    let spec: Vec<(String, u32)> = route
        .backends
        .iter()
        .map(|b| (b.workload.clone(), b.weight()))
        .collect();
    if route.migration.is_none() {
        return spec;
    }
    let Some(status) = app
        .status
        .as_ref()
        .and_then(|s| s.routes.iter().find(|r| r.name == route.name))
    else {
        return spec;
    };
    let effective = match &status.migration {
        Some(migration) => effective_exact(migration),
        None => status.weights.clone(),
    };
    let known = |w: &String| app.spec.workloads.iter().any(|k| &k.name == w);
    let weights: Vec<(String, u32)> = effective
        .into_iter()
        .filter(|(w, weight)| known(w) && *weight > 0)
        .map(|(w, weight)| (w, weight as u32))
        .collect();
    if weights.is_empty() { spec } else { weights }
}

/// The floor each workload of `app` is held at by a migration now (the
/// autoscaler scales it to at least this).
pub fn floors(app: &HybridApp, now: Timestamp) -> BTreeMap<String, u32> {
    let mut floors = BTreeMap::new();
    let Some(status) = &app.status else {
        return floors;
    };
    for migration in status.routes.iter().filter_map(|r| r.migration.as_ref()) {
        let holding = match migration.phase {
            MigrationPhase::Succeeded => false,
            MigrationPhase::RolledBack | MigrationPhase::Aborted => {
                migration.warm_until.as_ref().is_some_and(|t| t.0 > now)
            }
            _ => true,
        };
        if holding {
            for (workload, replicas) in &migration.prewarm {
                let floor = floors.entry(workload.clone()).or_insert(0);
                *floor = (*floor).max((*replicas).max(0) as u32);
            }
        }
    }
    floors
}

/// Whether a migration's phase means it has not ended.
pub fn running(phase: MigrationPhase) -> bool {
    !matches!(
        phase,
        MigrationPhase::Succeeded | MigrationPhase::RolledBack | MigrationPhase::Aborted
    )
}

fn show(weights: &BTreeMap<String, i32>) -> String {
    weights
        .iter()
        .map(|(w, p)| format!("{w} {p}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn unsigned(d: SignedDuration) -> Duration {
    d.try_into().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests;
