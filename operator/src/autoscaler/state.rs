//! Everything the autoscaler decides, as a pure state type fed with time:
//! the gateways' demand and stats go in ([`ScalerState::on_demand`],
//! [`ScalerState::on_stats`]), and every tick ([`ScalerState::tick`]) says
//! which `replicas` to write and which `Autoscaled` condition to show. It
//! knows the cluster only through [`Cluster`] (policies from the HybridApps,
//! current replicas from the Deployments), and time only as the argument
//! `now` (time since the loop started), so it is tested with simulated time.
//!
//! - Each gateway's latest report per workload is kept; the observed
//!   concurrency is their sum, recorded (time-weighted) whenever a report
//!   changes it. A demand message updates that gateway's held count and
//!   keeps its in-flight count: it adds no zero samples.
//! - A demand for a workload at zero is answered at once with a write (no
//!   tick needed), unless a write for it is already on its way.
//! - A gateway that stops reporting while its last report was busy holds
//!   the workload at its scale for up to [`FORGET_BUSY_GATEWAY`]; one whose
//!   last report was idle is forgotten after [`SILENT_AFTER_INTERVALS`]
//!   stats intervals.
//! - One write per workload is in flight at a time; a newer decision waits
//!   for it ([`ScalerState::written`] reports the outcome).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::algorithm::{Autoscaler, Observation, Reason, ScalingPolicy};
use crate::protocol::{Demand, STATS_INTERVAL, Stats, WorkloadRef};

/// How long a gateway that went silent while it reported requests for a
/// workload keeps that workload at its current scale before it is taken for
/// gone.
pub const FORGET_BUSY_GATEWAY: Duration = Duration::from_secs(60);

/// A gateway is silent once it missed this many stats intervals.
pub const SILENT_AFTER_INTERVALS: u32 = 3;

/// What the autoscaler needs to know of the cluster.
pub trait Cluster {
    /// The scaling policy of a workload Tandem's autoscaler owns (`None`:
    /// not one, or gone).
    fn policy(&self, workload: &WorkloadRef) -> Option<ScalingPolicy>;
    /// Its Deployment's `spec.replicas` now (`None`: no Deployment yet).
    fn replicas(&self, workload: &WorkloadRef) -> Option<u32>;
    /// Workloads held at a floor by a migration: decided at every tick even
    /// before any gateway reports on them.
    fn held(&self) -> Vec<WorkloadRef> {
        Vec::new()
    }
}

/// A `replicas` write to make.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleWrite {
    /// Which workload.
    pub workload: WorkloadRef,
    /// Replicas now.
    pub from: u32,
    /// Replicas wanted.
    pub to: u32,
    /// Why.
    pub reason: Reason,
    /// The numbers behind it.
    pub message: String,
}

/// An app (namespace and name).
pub type AppRef = (String, String);

/// The `Autoscaled` condition: status, reason, message.
pub type ConditionText = (&'static str, String, String);

/// The placement of one `mode: Auto` workload, as status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementShown {
    /// Which workload.
    pub workload: String,
    /// Where it is placed.
    pub placement: crate::keepalive::placement::Placement,
    /// Since when, on the autoscaler's clock (seconds; negative: before
    /// the clock started).
    pub since_s: f64,
    /// The numbers of the latest decision (none before a full window).
    pub numbers: Option<crate::keepalive::placement::Recommendation>,
}

/// What the autoscaler shows in one app's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    /// The `Autoscaled` condition.
    pub condition: ConditionText,
    /// The placements of its `mode: Auto` workloads, by name.
    pub placements: Vec<PlacementShown>,
}

/// What a tick asks for.
#[derive(Debug, Default)]
pub struct TickOutcome {
    /// `replicas` to write.
    pub writes: Vec<ScaleWrite>,
    /// Statuses that changed since they were last shown.
    pub conditions: Vec<(AppRef, Shown)>,
}

/// A gateway's latest report on one workload.
#[derive(Debug, Clone, Copy)]
struct Report {
    at: Duration,
    in_flight: u64,
    held: u64,
    /// Requests started in the interval this report covers.
    requests: u64,
}

/// The last decision that changed a workload's scale.
#[derive(Debug, Clone)]
struct Decided {
    reason: Reason,
    from: u32,
    to: u32,
    message: String,
    at: Duration,
}

struct Tracked {
    autoscaler: Autoscaler,
    reports: HashMap<String, Report>,
    last: Option<Decided>,
    stale: Option<String>,
    /// The replicas of a write on its way.
    pending: Option<u32>,
}

impl Tracked {
    fn observation(&self) -> Observation {
        let (in_flight, held, requests) = self.reports.values().fold((0, 0, 0), |(f, h, n), r| {
            (f + r.in_flight, h + r.held, n + r.requests)
        });
        Observation {
            in_flight: in_flight as f64,
            held: held as f64,
            requests: requests as f64,
        }
    }

    fn record(&mut self, now: Duration) {
        let observation = self.observation();
        self.autoscaler.observe(now, observation);
    }
}

/// The autoscaler's state over every workload it has heard of.
#[derive(Default)]
pub struct ScalerState {
    workloads: HashMap<WorkloadRef, Tracked>,
    shown: HashMap<AppRef, Shown>,
}

impl ScalerState {
    /// Starts tracking `workload` if the cluster says it is ours.
    fn tracked(
        &mut self,
        workload: &WorkloadRef,
        now: Duration,
        cluster: &impl Cluster,
    ) -> Option<&mut Tracked> {
        if !self.workloads.contains_key(workload) {
            let policy = cluster.policy(workload)?;
            self.workloads.insert(
                workload.clone(),
                Tracked {
                    autoscaler: Autoscaler::new(policy, now),
                    reports: HashMap::new(),
                    last: None,
                    stale: None,
                    pending: None,
                },
            );
        }
        self.workloads.get_mut(workload)
    }

    /// A gateway holds requests for a workload with no ready endpoint. If
    /// the workload is at zero, the write that wakes it, at once.
    pub fn on_demand(
        &mut self,
        now: Duration,
        demand: &Demand,
        cluster: &impl Cluster,
    ) -> Option<ScaleWrite> {
        let current = cluster.replicas(&demand.workload);
        let tracked = self.tracked(&demand.workload, now, cluster)?;
        let report = tracked
            .reports
            .entry(demand.gateway.clone())
            .or_insert(Report {
                at: now,
                in_flight: 0,
                held: 0,
                requests: 0,
            });
        report.at = now;
        report.held = demand.held;
        tracked.record(now);
        if current != Some(0) || tracked.pending.is_some_and(|to| to > 0) {
            return None;
        }
        let decision = tracked.autoscaler.decide(now, 0, true);
        (decision.replicas > 0).then(|| {
            tracked.pending = Some(decision.replicas);
            ScaleWrite {
                workload: demand.workload.clone(),
                from: 0,
                to: decision.replicas,
                reason: decision.reason,
                message: decision.message,
            }
        })
    }

    /// A gateway's periodic report. It lists only workloads with traffic:
    /// every other workload it reported on before is idle there now.
    pub fn on_stats(&mut self, now: Duration, stats: &Stats, cluster: &impl Cluster) {
        let listed: HashMap<&WorkloadRef, (u64, u64, u64)> = stats
            .workloads
            .iter()
            .map(|w| (&w.workload, (w.in_flight, w.held, w.requests)))
            .collect();
        for (workload, tracked) in &mut self.workloads {
            if !listed.contains_key(workload)
                && let Some(report) = tracked.reports.get_mut(&stats.gateway)
            {
                let changed = report.in_flight + report.held + report.requests > 0;
                *report = Report {
                    at: now,
                    in_flight: 0,
                    held: 0,
                    requests: 0,
                };
                if changed {
                    tracked.record(now);
                }
            }
        }
        for (workload, (in_flight, held, requests)) in listed {
            if let Some(tracked) = self.tracked(workload, now, cluster) {
                tracked.autoscaler.started(now, requests);
                tracked.reports.insert(
                    stats.gateway.clone(),
                    Report {
                        at: now,
                        in_flight,
                        held,
                        requests,
                    },
                );
                tracked.record(now);
            }
        }
    }

    /// A write asked for earlier is done (`ok`) or failed (it will be
    /// decided again at the next tick).
    pub fn written(&mut self, now: Duration, write: &ScaleWrite, ok: bool) {
        if let Some(tracked) = self.workloads.get_mut(&write.workload) {
            tracked.pending = None;
            if ok {
                tracked.last = Some(Decided {
                    reason: write.reason,
                    from: write.from,
                    to: write.to,
                    message: write.message.clone(),
                    at: now,
                });
            }
        }
    }

    /// How many workloads are held at their scale for want of a signal.
    pub fn holding_without_signal(&self) -> usize {
        self.workloads
            .values()
            .filter(|t| t.stale.is_some())
            .count()
    }

    /// A condition returned by [`ScalerState::tick`] was written.
    pub fn shown(&mut self, app: AppRef, condition: Shown) {
        self.shown.insert(app, condition);
    }

    /// Decides every workload: the writes to make, and the conditions that
    /// changed.
    pub fn tick(&mut self, now: Duration, cluster: &impl Cluster) -> TickOutcome {
        let mut outcome = TickOutcome::default();
        for key in cluster.held() {
            self.tracked(&key, now, cluster);
        }
        self.workloads
            .retain(|key, _| cluster.policy(key).is_some());
        for (key, tracked) in &mut self.workloads {
            if let Some(policy) = cluster.policy(key) {
                tracked.autoscaler.set_policy(policy, now);
            }
            let current = cluster.replicas(key);
            let (stale, forgot) =
                silent_busy_gateways(&mut tracked.reports, now, &key.workload, current);
            tracked.stale = stale;
            if forgot {
                tracked.record(now);
            }
            let fresh = tracked.stale.is_none()
                && (!tracked.reports.is_empty() || now > STATS_INTERVAL * SILENT_AFTER_INTERVALS);
            let Some(current) = current else { continue };
            if tracked.pending.is_some() {
                continue;
            }
            let decision = tracked.autoscaler.decide(now, current, fresh);
            if decision.replicas != current {
                tracked.pending = Some(decision.replicas);
                outcome.writes.push(ScaleWrite {
                    workload: key.clone(),
                    from: current,
                    to: decision.replicas,
                    reason: decision.reason,
                    message: decision.message,
                });
            }
        }
        outcome.writes.sort_by(|a, b| a.workload.cmp(&b.workload));
        let wanted = self.conditions();
        self.shown.retain(|app, _| wanted.contains_key(app));
        for (app, condition) in wanted {
            if self.shown.get(&app) != Some(&condition) {
                outcome.conditions.push((app, condition));
            }
        }
        outcome
    }

    /// The `Autoscaled` condition of every app decided for: False while a
    /// signal is stale, else True with the latest decisions; and the
    /// placements of its `mode: Auto` workloads.
    fn conditions(&self) -> BTreeMap<AppRef, Shown> {
        let mut by_app: BTreeMap<AppRef, Vec<(&WorkloadRef, &Tracked)>> = BTreeMap::new();
        for (key, tracked) in &self.workloads {
            by_app
                .entry((key.namespace.clone(), key.app.clone()))
                .or_default()
                .push((key, tracked));
        }
        let mut out = BTreeMap::new();
        for (app, mut workloads) in by_app {
            workloads.sort_by(|a, b| a.0.workload.cmp(&b.0.workload));
            let placements: Vec<PlacementShown> = workloads
                .iter()
                .filter_map(|(k, t)| {
                    let (placement, since_s, numbers) = t.autoscaler.placed()?.shown();
                    Some(PlacementShown {
                        workload: k.workload.clone(),
                        placement,
                        since_s,
                        numbers: numbers.cloned(),
                    })
                })
                .collect();
            let stale: Vec<&str> = workloads
                .iter()
                .filter_map(|(_, t)| t.stale.as_deref())
                .collect();
            if !stale.is_empty() {
                let condition = (
                    "False",
                    Reason::HoldingWithoutSignal.as_str().to_string(),
                    stale.join("; "),
                );
                out.insert(
                    app,
                    Shown {
                        condition,
                        placements,
                    },
                );
                continue;
            }
            let decided: Vec<(&WorkloadRef, &Decided)> = workloads
                .iter()
                .filter_map(|(k, t)| t.last.as_ref().map(|d| (*k, d)))
                .collect();
            // The most recent decision names the reason; every workload's
            // last decision is in the message.
            let Some(latest) = decided.iter().max_by_key(|(_, d)| d.at) else {
                if !placements.is_empty() {
                    let condition = (
                        "True",
                        Reason::Steady.as_str().to_string(),
                        "no scaling decision yet".to_string(),
                    );
                    out.insert(
                        app,
                        Shown {
                            condition,
                            placements,
                        },
                    );
                }
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
            let condition = ("True", latest.1.reason.as_str().to_string(), message);
            out.insert(
                app,
                Shown {
                    condition,
                    placements,
                },
            );
        }
        out
    }
}

/// Drops gateways that went silent, except those that were busy with this
/// workload less than [`FORGET_BUSY_GATEWAY`] ago: while one is, the signal
/// is stale, and the first value says why. The second: whether a gateway
/// was forgotten.
fn silent_busy_gateways(
    reports: &mut HashMap<String, Report>,
    now: Duration,
    workload: &str,
    current: Option<u32>,
) -> (Option<String>, bool) {
    let silent_after = STATS_INTERVAL * SILENT_AFTER_INTERVALS;
    let mut stale = Vec::new();
    let before = reports.len();
    reports.retain(|gateway, report| {
        let silent = now.saturating_sub(report.at);
        if silent < silent_after {
            return true;
        }
        let busy = report.in_flight + report.held;
        if busy > 0 && silent < FORGET_BUSY_GATEWAY {
            // No count of seconds in it: the condition is written only
            // when its text changes.
            stale.push(format!(
                "gateway {gateway} went silent after reporting {busy} request(s) for {workload}"
            ));
            return true;
        }
        false
    });
    let forgot = reports.len() < before;
    if stale.is_empty() {
        return (None, forgot);
    }
    stale.sort();
    let holding = match current {
        Some(n) => format!(
            "holding {workload} at {n} replica(s) for up to {}s",
            FORGET_BUSY_GATEWAY.as_secs()
        ),
        None => format!("holding {workload}"),
    };
    (Some(format!("{}; {holding}", stale.join(", "))), forgot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::WorkloadStats;
    use proptest::prelude::*;
    use std::cell::RefCell;

    const TICK: Duration = Duration::from_secs(2);

    fn key(workload: &str) -> WorkloadRef {
        WorkloadRef {
            namespace: "ns".into(),
            app: "shop".into(),
            workload: workload.into(),
        }
    }

    /// A cluster whose Deployments follow the writes.
    struct Fake {
        policy: ScalingPolicy,
        replicas: RefCell<HashMap<WorkloadRef, u32>>,
        held: Vec<WorkloadRef>,
    }

    impl Fake {
        fn function(target: u32) -> Self {
            Self {
                policy: ScalingPolicy::defaults(0, 50, 1, target, Some(Duration::from_secs(60))),
                replicas: RefCell::new(HashMap::from([(key("fn"), 0)])),
                held: vec![],
            }
        }

        fn apply(&self, state: &mut ScalerState, now: Duration, writes: &[ScaleWrite]) {
            for write in writes {
                self.replicas
                    .borrow_mut()
                    .insert(write.workload.clone(), write.to);
                state.written(now, write, true);
            }
        }

        fn at(&self, workload: &str) -> u32 {
            self.replicas.borrow()[&key(workload)]
        }
    }

    impl Cluster for Fake {
        fn policy(&self, workload: &WorkloadRef) -> Option<ScalingPolicy> {
            self.replicas
                .borrow()
                .contains_key(workload)
                .then(|| self.policy.clone())
        }

        fn replicas(&self, workload: &WorkloadRef) -> Option<u32> {
            self.replicas.borrow().get(workload).copied()
        }

        fn held(&self) -> Vec<WorkloadRef> {
            self.held.clone()
        }
    }

    #[test]
    fn a_held_workload_no_gateway_reports_on_is_raised_to_its_minimum() {
        // A migration's floor, or an always-on workload below its minimum
        // (a Function at zero whose mode became AlwaysOn): no request will
        // ever wake it, so the tick must.
        let mut cluster = Fake::function(10);
        cluster.policy.min_replicas = 2;
        let mut state = ScalerState::default();
        let now = STATS_INTERVAL * (SILENT_AFTER_INTERVALS + 1);
        assert!(
            state.tick(now, &cluster).writes.is_empty(),
            "not ours to decide yet"
        );
        cluster.held = vec![key("fn")];
        let writes = state.tick(now + TICK, &cluster).writes;
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!((writes[0].from, writes[0].to), (0, 2));
    }

    fn demand(gateway: &str, workload: &str, held: u64) -> Demand {
        Demand {
            gateway: gateway.into(),
            workload: key(workload),
            held,
        }
    }

    fn stats(gateway: &str, loads: &[(&str, u64, u64)]) -> Stats {
        Stats {
            gateway: gateway.into(),
            interval_ms: 1000,
            workloads: loads
                .iter()
                .map(|(w, in_flight, held)| WorkloadStats {
                    workload: key(w),
                    in_flight: *in_flight,
                    held: *held,
                    requests: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_demand_for_a_workload_at_zero_is_one_write_at_once_and_not_repeated() {
        let cluster = Fake::function(10);
        let mut state = ScalerState::default();
        let now = Duration::from_secs(5);
        let write = state
            .on_demand(now, &demand("gw", "fn", 3), &cluster)
            .expect("a write at once, without a tick");
        assert_eq!(
            (write.from, write.to, write.reason),
            (0, 1, Reason::ScaledFromZero)
        );
        // The gateway repeats its demand every 500 ms while the write is
        // on its way, and a second gateway joins: no second write.
        for i in 1..6 {
            let later = now + Duration::from_millis(500 * i);
            assert!(
                state
                    .on_demand(later, &demand("gw", "fn", 3), &cluster)
                    .is_none()
            );
            assert!(
                state
                    .on_demand(later, &demand("gw-2", "fn", 1), &cluster)
                    .is_none()
            );
        }
        assert!(
            state.tick(now + TICK, &cluster).writes.is_empty(),
            "the tick waits for it too"
        );
        cluster.apply(&mut state, now + TICK, &[write]);
        assert_eq!(cluster.at("fn"), 1);
    }

    #[test]
    fn a_failed_write_is_decided_again_at_the_next_tick() {
        let cluster = Fake::function(10);
        let mut state = ScalerState::default();
        let write = state
            .on_demand(Duration::ZERO, &demand("gw", "fn", 1), &cluster)
            .unwrap();
        state.written(Duration::from_millis(100), &write, false);
        let retried = state.tick(TICK, &cluster).writes;
        assert_eq!(retried.len(), 1);
        assert_eq!((retried[0].from, retried[0].to), (0, 1));
    }

    #[test]
    fn repeated_demand_does_not_dilute_the_observed_concurrency() {
        let cluster = Fake::function(10);
        cluster.replicas.borrow_mut().insert(key("fn"), 4);
        let mut state = ScalerState::default();
        // Steady 40 in flight through one gateway; another gateway holds 2
        // requests (an endpoint list lagging) and repeats demand 20 times.
        let mut now = Duration::ZERO;
        for second in 0..60u64 {
            now = Duration::from_secs(second);
            state.on_stats(now, &stats("gw-a", &[("fn", 40, 0)]), &cluster);
            if second == 58 {
                for i in 0..20 {
                    state.on_demand(
                        now + Duration::from_millis(i * 10),
                        &demand("gw-b", "fn", 2),
                        &cluster,
                    );
                }
            }
        }
        let writes = state
            .tick(now + Duration::from_millis(500), &cluster)
            .writes;
        // 40-42 in flight at 7 per replica: 6 or 7 replicas, never fewer
        // (an average of message counts would have dragged it down).
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(writes[0].to >= 6, "{writes:?}");
    }

    #[test]
    fn a_busy_gateway_gone_silent_holds_the_scale_then_is_forgotten() {
        let cluster = Fake::function(10);
        cluster.replicas.borrow_mut().insert(key("fn"), 3);
        let mut state = ScalerState::default();
        state.on_stats(Duration::ZERO, &stats("gw", &[("fn", 20, 0)]), &cluster);
        // Silent from now on. After 3 missed intervals the signal is stale.
        let outcome = state.tick(Duration::from_secs(10), &cluster);
        assert!(outcome.writes.is_empty(), "held at its scale");
        let (
            app,
            Shown {
                condition: (status, reason, message),
                ..
            },
        ) = &outcome.conditions[0];
        assert_eq!(app, &("ns".to_string(), "shop".to_string()));
        assert_eq!(
            (*status, reason.as_str()),
            ("False", "HoldingWithoutSignal")
        );
        assert!(
            message.contains("gateway gw went silent after reporting 20 request(s) for fn")
                && message.contains("holding fn at 3 replica(s)"),
            "{message}"
        );
        let shown = outcome.conditions[0].clone();
        state.shown(shown.0, shown.1);
        assert!(
            state
                .tick(Duration::from_secs(12), &cluster)
                .conditions
                .is_empty(),
            "shown once"
        );
        // After FORGET_BUSY_GATEWAY it is taken for gone; the scale follows
        // what is left (nothing), down by at most half per decision.
        let outcome = state.tick(Duration::from_secs(61), &cluster);
        assert_eq!(outcome.writes.len(), 1);
        assert!(outcome.writes[0].to < 3, "{:?}", outcome.writes);
    }

    #[test]
    fn an_idle_function_goes_to_zero_after_its_grace_and_a_condition_says_so() {
        let cluster = Fake::function(10);
        let mut state = ScalerState::default();
        let write = state
            .on_demand(Duration::ZERO, &demand("gw", "fn", 1), &cluster)
            .unwrap();
        cluster.apply(&mut state, Duration::from_secs(1), &[write]);
        state.on_stats(
            Duration::from_secs(1),
            &stats("gw", &[("fn", 1, 0)]),
            &cluster,
        );
        let mut zero_at = None;
        let mut now = Duration::from_secs(2);
        while now < Duration::from_secs(200) {
            // Idle stats (nothing listed) every second.
            state.on_stats(now - Duration::from_secs(1), &stats("gw", &[]), &cluster);
            let outcome = state.tick(now, &cluster);
            for (app, condition) in outcome.conditions {
                state.shown(app, condition);
            }
            if outcome.writes.iter().any(|w| w.to == 0) && zero_at.is_none() {
                zero_at = Some(now);
            }
            cluster.apply(&mut state, now, &outcome.writes);
            now += TICK;
        }
        let zero_at = zero_at.expect("scaled to zero");
        // Busy until 1 s; idle from the report at 2 s - 1 s.
        assert!(
            zero_at >= Duration::from_secs(61) && zero_at <= Duration::from_secs(64),
            "{zero_at:?}"
        );
        assert_eq!(cluster.at("fn"), 0);
        let shown = &state.shown[&("ns".to_string(), "shop".to_string())];
        let (_, reason, message) = &shown.condition;
        assert_eq!(reason, "ScaledToZero");
        assert!(message.contains("fn: ScaledToZero 1 -> 0"), "{message}");
    }

    proptest! {
        #[test]
        fn never_zero_while_requests_are_reported_and_always_within_bounds(
            loads in prop::collection::vec((0u64..200, 0u64..20, any::<bool>()), 1..150),
        ) {
            let cluster = Fake::function(5);
            let mut state = ScalerState::default();
            let mut now = Duration::ZERO;
            for (in_flight, held, demand_too) in loads {
                now += Duration::from_secs(1);
                let at_zero = cluster.at("fn") == 0;
                let (in_flight, held) = if at_zero { (0, in_flight + held) } else { (in_flight, held) };
                state.on_stats(now, &stats("gw", &[("fn", in_flight, held)]), &cluster);
                if demand_too && held > 0 && let Some(write) = state.on_demand(now, &demand("gw", "fn", held), &cluster) {
                    cluster.apply(&mut state, now, &[write]);
                }
                let outcome = state.tick(now + Duration::from_millis(500), &cluster);
                cluster.apply(&mut state, now, &outcome.writes);
                let replicas = cluster.at("fn");
                prop_assert!(replicas <= 50);
                prop_assert!(!(in_flight + held > 0 && replicas == 0), "zero with {in_flight} in flight and {held} held");
            }
        }
    }

    proptest! {
        // Each case replays an hour of reports after the traffic.
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// `scaleToZeroAfter: Auto`, whatever the traffic (bursts, gaps,
        /// short requests seen only as started): never zero while a report
        /// shows activity, within bounds, and once the traffic stops, at
        /// zero for good well within an hour (maxKeepAlive 5 minutes).
        #[test]
        fn auto_is_never_zero_while_active_and_ends_at_zero_for_good(
            loads in prop::collection::vec((0u64..20, 0u64..3, 0u64..3, 0u64..40), 1..120),
        ) {
            let mut cluster = Fake::function(5);
            cluster.policy = cluster.policy.clone().with_adaptive_keep_alive(Some(Duration::from_secs(300)));
            let mut state = ScalerState::default();
            let mut now = Duration::ZERO;
            let report = |in_flight: u64, held: u64, requests: u64| Stats {
                gateway: "gw".into(),
                interval_ms: 1000,
                workloads: (in_flight + held + requests > 0)
                    .then(|| WorkloadStats { workload: key("fn"), in_flight, held, requests })
                    .into_iter()
                    .collect(),
                ..Default::default()
            };
            let step = |state: &mut ScalerState, now: Duration, in_flight: u64, held: u64, requests: u64| {
                // At zero nothing runs: every request there is held.
                let at_zero = cluster.at("fn") == 0;
                let (in_flight, held) = if at_zero {
                    (0, (in_flight + held).max(u64::from(requests > 0)))
                } else {
                    (in_flight, held)
                };
                state.on_stats(now, &report(in_flight, held, requests), &cluster);
                if held > 0 && let Some(write) = state.on_demand(now, &demand("gw", "fn", held), &cluster) {
                    cluster.apply(state, now, &[write]);
                }
                let outcome = state.tick(now + Duration::from_millis(500), &cluster);
                let prewarmed = outcome.writes.iter().any(|w| w.reason == Reason::PreWarmed);
                cluster.apply(state, now, &outcome.writes);
                (in_flight + held + requests > 0, cluster.at("fn"), prewarmed)
            };
            for (in_flight, held, requests, gap) in loads {
                // A burst of one report, then `gap` idle seconds.
                now += Duration::from_secs(1);
                let (active, replicas, _) = step(&mut state, now, in_flight % 3, held, requests);
                prop_assert!(replicas <= 50);
                prop_assert!(!(active && replicas == 0), "zero while active at {now:?}");
                for _ in 0..gap {
                    now += Duration::from_secs(1);
                    step(&mut state, now, 0, 0, 0);
                }
            }
            let stopped = now;
            for _ in 0..3600 {
                now += Duration::from_secs(1);
                let (_, replicas, prewarmed) = step(&mut state, now, 0, 0, 0);
                if now > stopped + Duration::from_secs(1800) {
                    prop_assert!(!prewarmed, "pre-warmed {:?} after the traffic stopped", now - stopped);
                    prop_assert_eq!(replicas, 0);
                }
            }
        }
    }
}
