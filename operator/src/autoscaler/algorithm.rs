//! The scaling algorithm: pure, no I/O, time passed in.
//!
//! Modelled on Knative's KPA. Observed concurrency (requests in flight plus
//! requests held, summed over every gateway) is averaged over a *stable*
//! window and a short *panic* window. The averages are weighted by time:
//! each observation holds until the next one, so ten reports in one second
//! weigh as much as one report that held for that second. Normally the stable average decides;
//! when the panic average reaches `panic_threshold` times what the current
//! replicas can take, the autoscaler panics: it follows the panic average
//! and does not scale down until the load has been calm for a stable window.
//! Outside panic it still scales *up* as soon as the panic average asks for
//! more replicas (so a step in load is met within the panic window), and
//! scales *down* only on the stable average (so it does not flap).
//! Steps are limited by a maximum scale-up and scale-down rate, results are
//! kept within `[min, max]`, and a Function goes to zero only after
//! `scale_to_zero_after` without any request in flight or held.
//! A `mode: Auto` workload is a Function whose floor is one replica while
//! it is placed AlwaysOn ([`super::placed`]); the placement is decided from
//! the keep-alive run in the shadow, whatever the placement.

use std::collections::VecDeque;
use std::time::Duration;

/// How one workload scales. See [`ScalingPolicy::defaults`] for the values
/// Tandem uses and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingPolicy {
    /// Fewest replicas (0 lets a Function scale to zero).
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// Replicas started at once when waking from zero.
    pub initial_replicas: u32,
    /// Requests in flight one replica is meant to take.
    pub target_concurrency: f64,
    /// Share of `target_concurrency` aimed for, leaving headroom for bursts.
    pub target_utilization: f64,
    /// Window of the stable average.
    pub stable_window: Duration,
    /// Window of the panic average.
    pub panic_window: Duration,
    /// Panic when the panic average needs this many times the current replicas.
    pub panic_threshold: f64,
    /// At most this factor more replicas per decision.
    pub max_scale_up_rate: f64,
    /// At most this factor fewer replicas per decision.
    pub max_scale_down_rate: f64,
    /// Idle time before zero; `None` never scales to zero (AlwaysOn).
    pub scale_to_zero_after: Option<Duration>,
    /// `scaleToZeroAfter: Auto`: the keep-alive (and pre-warm) is learned
    /// from the workload's arrivals ([`crate::keepalive::adaptive`]), never
    /// longer than this.
    pub adaptive_keep_alive: Option<Duration>,
    /// `mode: Auto`: how its placement is decided.
    pub placement: Option<super::placed::PlacementPolicy>,
}

impl ScalingPolicy {
    /// Knative's KPA defaults (stable window 60 s, panic window 10% of it,
    /// panic threshold 200%, utilisation 70%, scale up at most 1000× and down
    /// at most 2× per decision), which are well tried in production, for a
    /// workload with the given bounds and target.
    pub fn defaults(
        min: u32,
        max: u32,
        initial: u32,
        target_concurrency: u32,
        scale_to_zero_after: Option<Duration>,
    ) -> Self {
        Self {
            min_replicas: min,
            max_replicas: max.max(1),
            initial_replicas: initial.max(1),
            target_concurrency: f64::from(target_concurrency.max(1)),
            target_utilization: 0.7,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_to_zero_after,
            adaptive_keep_alive: None,
            placement: None,
        }
    }

    /// The same, placed by `mode: Auto` with `placement`.
    pub fn with_placement(mut self, placement: Option<super::placed::PlacementPolicy>) -> Self {
        self.placement = placement;
        self
    }

    /// The same, with the keep-alive learned, at most `max`.
    pub fn with_adaptive_keep_alive(mut self, max: Option<Duration>) -> Self {
        self.adaptive_keep_alive = max;
        self
    }

    fn per_replica(&self) -> f64 {
        (self.target_concurrency * self.target_utilization).max(0.01)
    }
}

/// Why the autoscaler chose a replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A request arrived for a workload at zero.
    ScaledFromZero,
    /// More load than the replicas can take.
    ScaledUp,
    /// Less load than the replicas can take.
    ScaledDown,
    /// Idle for `scale_to_zero_after`.
    ScaledToZero,
    /// At zero, started before an expected request (`scaleToZeroAfter: Auto`).
    PreWarmed,
    /// At zero, started because `mode: Auto` placed it AlwaysOn.
    Placed,
    /// Nothing to change.
    Steady,
    /// No fresh signal from the gateways: keep the current scale.
    HoldingWithoutSignal,
}

impl Reason {
    /// PascalCase name for events and conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ScaledFromZero => "ScaledFromZero",
            Reason::ScaledUp => "ScaledUp",
            Reason::ScaledDown => "ScaledDown",
            Reason::ScaledToZero => "ScaledToZero",
            Reason::PreWarmed => "PreWarmed",
            Reason::Placed => "Placed",
            Reason::Steady => "Steady",
            Reason::HoldingWithoutSignal => "HoldingWithoutSignal",
        }
    }
}

/// One decision, with its reason and the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleDecision {
    /// Replicas wanted.
    pub replicas: u32,
    /// Why.
    pub reason: Reason,
    /// Whether the autoscaler is in panic mode.
    pub panicking: bool,
    /// A sentence for status and events.
    pub message: String,
}

/// What the gateways reported at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Requests in flight to the workload's endpoints, all gateways together.
    pub in_flight: f64,
    /// Requests held waiting for an endpoint, all gateways together.
    pub held: f64,
    /// Requests started since the previous report (some may have finished
    /// already: a short request between two reports is activity too).
    pub requests: f64,
}

impl Observation {
    fn concurrency(&self) -> f64 {
        self.in_flight + self.held
    }

    fn busy(&self) -> bool {
        self.in_flight > 0.0 || self.held > 0.0
    }

    fn active(&self) -> bool {
        self.busy() || self.requests > 0.0
    }
}

/// The state of one workload's autoscaler.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    policy: ScalingPolicy,
    samples: VecDeque<(Duration, f64)>,
    latest: Option<Observation>,
    last_busy: Option<Duration>,
    panic_until: Option<Duration>,
    panic_floor: u32,
    learned: Option<super::learned::Learned>,
    placed: Option<super::placed::Placed>,
}

/// Whether a Function would keep its replica at this moment: while active,
/// inside the learned window (never unloaded in the first
/// [`super::learned::MIN_IDLE`] of idleness), or for the fixed grace.
fn function_keeps(
    active: bool,
    idle_for: Duration,
    verdict: Option<super::learned::Verdict>,
    scale_to_zero_after: Option<Duration>,
) -> bool {
    active
        || match verdict {
            Some(verdict) => {
                verdict != super::learned::Verdict::Unloaded || idle_for < super::learned::MIN_IDLE
            }
            None => scale_to_zero_after.is_none_or(|after| idle_for < after),
        }
}

impl Autoscaler {
    /// A fresh autoscaler; `now` counts as the last busy moment, so a
    /// restarted operator never scales a workload to zero before it has
    /// watched it idle for a full `scale_to_zero_after`.
    pub fn new(policy: ScalingPolicy, now: Duration) -> Self {
        Self {
            samples: VecDeque::new(),
            latest: None,
            last_busy: Some(now),
            panic_until: None,
            panic_floor: 0,
            learned: policy.adaptive_keep_alive.map(super::learned::Learned::new),
            placed: policy
                .placement
                .clone()
                .map(|p| super::placed::Placed::new(p, now)),
            policy,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &ScalingPolicy {
        &self.policy
    }

    /// Replaces the policy (the spec changed) at `now`, keeping the history.
    pub fn set_policy(&mut self, policy: ScalingPolicy, now: Duration) {
        match (policy.adaptive_keep_alive, &mut self.learned) {
            (Some(max), Some(learned)) => learned.set_max(max),
            (Some(max), None) => self.learned = Some(super::learned::Learned::new(max)),
            (None, _) => self.learned = None,
        }
        match (&policy.placement, &mut self.placed) {
            (Some(p), Some(placed)) => placed.set_policy(p.clone()),
            (Some(p), None) => self.placed = Some(super::placed::Placed::new(p.clone(), now)),
            (None, _) => self.placed = None,
        }
        self.policy = policy;
    }

    /// The learned keep-alive (`scaleToZeroAfter: Auto`), if any.
    pub fn learned(&self) -> Option<&super::learned::Learned> {
        self.learned.as_ref()
    }

    /// `mode: Auto`: the placement and its numbers.
    pub fn placed(&self) -> Option<&super::placed::Placed> {
        self.placed.as_ref()
    }

    /// `n` requests started at `now` (one gateway's report): booked for the
    /// placement of `mode: Auto`.
    pub fn started(&mut self, now: Duration, n: u64) {
        if let Some(placed) = &mut self.placed {
            placed.requests(now, n as f64, false);
        }
    }

    fn idle_for(&self, now: Duration) -> Duration {
        self.last_busy
            .map(|at| now.saturating_sub(at))
            .unwrap_or(Duration::MAX)
    }

    /// Whether a Function would keep a replica at `now` (for `mode: Auto`,
    /// what its placement is judged on).
    fn keeps(&mut self, now: Duration) -> bool {
        let active = self.latest.is_some_and(|o| o.active());
        let idle_for = self.idle_for(now);
        let verdict = self.learned.as_mut().map(|l| l.verdict(now));
        function_keeps(active, idle_for, verdict, self.policy.scale_to_zero_after)
    }

    /// Records what the gateways reported at `now`; it holds until the
    /// next observation.
    pub fn observe(&mut self, now: Duration, observation: Observation) {
        let arrival = observation.active() && !self.latest.is_some_and(|o| o.active());
        if arrival && self.placed.is_some() {
            // Before this observation counts: would a Function be at zero?
            let cold = !self.keeps(now);
            if let Some(placed) = &mut self.placed {
                placed.account(now, !cold);
                placed.requests(now, 0.0, cold);
            }
        }
        self.samples.push_back((now, observation.concurrency()));
        self.latest = Some(observation);
        if observation.active() {
            self.last_busy = Some(now);
        }
        if let Some(learned) = &mut self.learned {
            learned.observe(now, observation.active(), observation.held > 0.0);
        }
        // Keep the newest sample older than the stable window: it is the
        // value at the window's start.
        let horizon = now.saturating_sub(self.policy.stable_window);
        while self.samples.len() >= 2 && self.samples[1].0 <= horizon {
            self.samples.pop_front();
        }
    }

    /// The time-weighted average over the `window` before `now` (over the
    /// part of it observed so far; the latest value if no time has passed).
    fn average(&self, now: Duration, window: Duration) -> f64 {
        let since = now.saturating_sub(window);
        let (mut area, mut covered) = (0.0, 0.0);
        for (i, (at, value)) in self.samples.iter().enumerate() {
            let start = (*at).max(since);
            let end = self
                .samples
                .get(i + 1)
                .map_or(now, |(next, _)| *next)
                .min(now);
            if end > start {
                let span = (end - start).as_secs_f64();
                area += value * span;
                covered += span;
            }
        }
        if covered > 0.0 {
            area / covered
        } else {
            self.samples.back().map_or(0.0, |(_, v)| *v)
        }
    }

    /// Decides the replica count at `now`, given the `current` one. With
    /// `fresh == false` (no recent report from the gateways) it holds.
    pub fn decide(&mut self, now: Duration, current: u32, fresh: bool) -> ScaleDecision {
        let mut p = self.policy.clone();
        let keeps = self.keeps(now);
        let placed_always_on = self.placed.as_mut().is_some_and(|placed| {
            placed.account(now, keeps);
            placed.decide(now);
            placed.placement() == crate::keepalive::placement::Placement::AlwaysOn
        });
        if placed_always_on {
            p.min_replicas = p.min_replicas.max(1);
        }
        let busy = self.latest.is_some_and(|o| o.busy());
        if !fresh {
            return ScaleDecision {
                replicas: current,
                reason: Reason::HoldingWithoutSignal,
                panicking: self.panic_until.is_some(),
                message: format!("no recent stats from the gateways; holding {current} replica(s)"),
            };
        }
        let stable = self.average(now, p.stable_window);
        let panic = self.average(now, p.panic_window);
        let per_replica = p.per_replica();
        let want_stable = (stable / per_replica).ceil() as u32;
        let want_panic = (panic / per_replica).ceil() as u32;

        // Panic when the short window needs far more than we have.
        let capacity = f64::from(current.max(1)) * per_replica;
        if current > 0 && panic / capacity >= p.panic_threshold {
            if self.panic_until.is_none() {
                self.panic_floor = current;
            }
            self.panic_until = Some(now + p.stable_window);
        } else if self.panic_until.is_some_and(|until| now >= until) {
            self.panic_until = None;
            self.panic_floor = 0;
        }
        let panicking = self.panic_until.is_some();
        let mut wanted = if panicking {
            // Never scale down while panicking.
            let wanted = want_panic.max(want_stable).max(self.panic_floor);
            self.panic_floor = wanted;
            wanted
        } else {
            // Up as soon as the short window asks; down only when both agree.
            want_stable.max(want_panic)
        };

        // Rate limits, relative to the current count.
        if current > 0 {
            let up_limit = (f64::from(current) * p.max_scale_up_rate).ceil() as u32;
            let down_limit = (f64::from(current) / p.max_scale_down_rate).floor() as u32;
            wanted = wanted.min(up_limit).max(down_limit);
        }

        // Zero only for an idle Function after its grace; otherwise at least one.
        let idle_for = self.idle_for(now);
        let verdict = self.learned.as_mut().map(|l| l.verdict(now));
        let may_be_zero = p.min_replicas == 0 && !keeps;
        let prewarm = current == 0
            && !busy
            && p.min_replicas == 0
            && verdict == Some(super::learned::Verdict::Loaded);
        let wanted = if prewarm {
            p.initial_replicas
        } else if current == 0 && !busy {
            // Nothing is waiting: stay where the spec's minimum puts us.
            p.min_replicas
        } else {
            let mut wanted = wanted;
            if current == 0 {
                wanted = wanted.max(p.initial_replicas);
            }
            if may_be_zero {
                // Idle for the whole grace: zero, whatever the averages
                // still remember of older load.
                0
            } else {
                wanted.max(p.min_replicas.max(1))
            }
        };
        let wanted = wanted
            .min(p.max_replicas)
            .max(p.min_replicas.min(p.max_replicas));

        let reason = match (current, wanted) {
            (0, w) if w > 0 && prewarm => Reason::PreWarmed,
            (0, w) if w > 0 && placed_always_on && !busy => Reason::Placed,
            (0, w) if w > 0 => Reason::ScaledFromZero,
            (c, 0) if c > 0 => Reason::ScaledToZero,
            (c, w) if w > c => Reason::ScaledUp,
            (c, w) if w < c => Reason::ScaledDown,
            _ => Reason::Steady,
        };
        let message = match reason {
            Reason::ScaledFromZero => format!(
                "{} request(s) waiting; starting {wanted} replica(s)",
                self.latest.map(|o| o.held + o.in_flight).unwrap_or(0.0)
            ),
            Reason::ScaledToZero => match &self.learned {
                Some(learned) => format!(
                    "no request for {}s; scaled to zero; {}",
                    idle_for.as_secs(),
                    learned.describe(now)
                ),
                None => format!("no request for {}s; scaled to zero", idle_for.as_secs()),
            },
            Reason::Placed => format!(
                "placed AlwaysOn (mode: Auto): starting {wanted} replica(s){}",
                self.placed
                    .as_ref()
                    .and_then(|placed| placed.shown().2)
                    .map(|r| format!("; {}", r.reason))
                    .unwrap_or_default()
            ),
            Reason::PreWarmed => format!(
                "starting {wanted} replica(s) before the next expected request; {}",
                self.learned
                    .as_ref()
                    .map(|l| l.describe(now))
                    .unwrap_or_default()
            ),
            Reason::ScaledUp | Reason::ScaledDown | Reason::Steady => format!(
                "{wanted} replica(s) for average concurrency {stable:.1} (stable) / {panic:.1} (panic) at {per_replica:.1} per replica{}",
                if panicking { ", panicking" } else { "" }
            ),
            Reason::HoldingWithoutSignal => unreachable!(),
        };
        ScaleDecision {
            replicas: wanted,
            reason,
            panicking,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TICK: Duration = Duration::from_secs(2);

    fn function(max: u32, target: u32) -> ScalingPolicy {
        ScalingPolicy::defaults(0, max, 1, target, Some(Duration::from_secs(60)))
    }

    /// Runs `loads` (one concurrency per tick) and returns the replica count
    /// after each tick; replicas follow decisions at once.
    fn simulate(policy: ScalingPolicy, start: u32, loads: &[f64]) -> Vec<u32> {
        let mut autoscaler = Autoscaler::new(policy, Duration::ZERO);
        let mut replicas = start;
        let mut out = Vec::new();
        for (i, load) in loads.iter().enumerate() {
            let now = TICK * (i as u32 + 1);
            // The gateways report between decisions.
            autoscaler.observe(
                now - TICK / 2,
                Observation {
                    in_flight: *load,
                    held: 0.0,
                    requests: 0.0,
                },
            );
            replicas = autoscaler.decide(now, replicas, true).replicas;
            out.push(replicas);
        }
        out
    }

    #[test]
    fn auto_keeps_a_replica_under_steady_load_and_goes_to_zero_after_its_dwell_once_idle() {
        let placement = super::super::placed::PlacementPolicy {
            budget_pct: 1.0,
            min_dwell: Duration::from_secs(60),
            replica_hour: 0.05,
            shown: None,
        };
        let policy = ScalingPolicy::defaults(0, 10, 1, 10, Some(Duration::from_secs(10)))
            .with_placement(Some(placement));
        // Steady load for 200 s, then none for 200 s.
        let mut loads = vec![1.0; 100];
        loads.extend(vec![0.0; 100]);
        let replicas = simulate(policy, 0, &loads);
        // Placed AlwaysOn until known: a replica from the first tick.
        assert!(replicas[..100].iter().all(|&r| r >= 1), "{replicas:?}");
        // Idle: the replica stays through the keep-alive and until a
        // Function saves a quarter of the last minute, then goes.
        let zero = replicas[100..]
            .iter()
            .position(|&r| r == 0)
            .expect("to zero");
        let zero_s = (zero as u64 + 1) * TICK.as_secs();
        assert!((20..=40).contains(&zero_s), "{zero_s}");
        assert!(replicas[100 + zero..].iter().all(|&r| r == 0));
    }

    #[test]
    fn wakes_at_once_with_initial_replicas() {
        let mut policy = function(10, 10);
        policy.initial_replicas = 3;
        let mut a = Autoscaler::new(policy, Duration::ZERO);
        a.observe(
            TICK,
            Observation {
                in_flight: 0.0,
                held: 1.0,
                requests: 0.0,
            },
        );
        let decision = a.decide(TICK, 0, true);
        assert_eq!(
            (decision.replicas, decision.reason),
            (3, Reason::ScaledFromZero)
        );
    }

    #[test]
    fn scales_to_zero_only_after_the_idle_grace() {
        let mut loads = vec![5.0; 10];
        loads.extend(vec![0.0; 60]);
        let replicas = simulate(function(10, 10), 1, &loads);
        // Busy until 20 s; zero from 80 s (index 39), 60 s later.
        assert!(replicas[..39].iter().all(|r| *r >= 1), "{replicas:?}");
        assert_eq!(replicas[39], 0, "{replicas:?}");
        let mut a = Autoscaler::new(function(10, 10), Duration::ZERO);
        a.observe(
            Duration::from_secs(100),
            Observation {
                in_flight: 0.0,
                held: 0.0,
                requests: 0.0,
            },
        );
        assert_eq!(
            a.decide(Duration::from_secs(100), 2, false).reason,
            Reason::HoldingWithoutSignal
        );
    }

    /// `scaleToZeroAfter: Auto` on a timer: a short request every 60 s,
    /// reported a second apart as the gateways do, with the replicas
    /// following every decision. After learning, the replica is started
    /// before each request (no request finds zero) and is at zero between
    /// them; a request at zero waits and is answered when the replica is up.
    #[test]
    fn auto_prewarms_a_timer_before_each_request_and_is_at_zero_between() {
        let policy = function(10, 10).with_adaptive_keep_alive(Some(Duration::from_secs(4 * 3600)));
        let mut a = Autoscaler::new(policy, Duration::ZERO);
        let mut replicas = 0u32;
        let (mut cold_late, mut zero_between, mut prewarmed) = (0, 0, 0);
        for t in 0..(60 * 14) {
            let now = Duration::from_secs(t);
            let beat = t % 60 == 30;
            let held = if beat && replicas == 0 { 1.0 } else { 0.0 };
            if beat && replicas == 0 && t > 60 * 8 {
                cold_late += 1;
            }
            a.observe(
                now,
                Observation {
                    in_flight: 0.0,
                    held,
                    requests: if beat { 1.0 } else { 0.0 },
                },
            );
            let decision = a.decide(now, replicas, true);
            if decision.reason == Reason::PreWarmed {
                prewarmed += 1;
                assert!(
                    decision.message.contains("periodic, every 60s"),
                    "{}",
                    decision.message
                );
            }
            replicas = decision.replicas;
            if t > 60 * 8 && t % 60 == 0 && replicas == 0 {
                zero_between += 1;
            }
        }
        assert_eq!(cold_late, 0, "a request found zero after learning");
        assert!(prewarmed >= 5, "{prewarmed} pre-warms");
        assert!(
            zero_between >= 5,
            "at zero between requests {zero_between} times"
        );
    }

    #[test]
    fn a_restarted_autoscaler_waits_a_full_grace_before_zero() {
        let mut a = Autoscaler::new(function(10, 10), Duration::from_secs(1000));
        a.observe(
            Duration::from_secs(1010),
            Observation {
                in_flight: 0.0,
                held: 0.0,
                requests: 0.0,
            },
        );
        assert_eq!(a.decide(Duration::from_secs(1010), 1, true).replicas, 1);
        a.observe(
            Duration::from_secs(1061),
            Observation {
                in_flight: 0.0,
                held: 0.0,
                requests: 0.0,
            },
        );
        assert_eq!(a.decide(Duration::from_secs(1061), 1, true).replicas, 0);
    }

    #[test]
    fn averages_weigh_time_not_the_number_of_reports() {
        let mut a = Autoscaler::new(function(100, 10), Duration::ZERO);
        let at = Duration::from_secs;
        // 20 s at 10 in flight, then 40 reports of 0 within one second
        // (a gateway repeating demand), then 10 again for 39 s.
        a.observe(
            at(0),
            Observation {
                in_flight: 10.0,
                held: 0.0,
                requests: 0.0,
            },
        );
        for i in 0..40 {
            a.observe(
                at(20) + Duration::from_millis(i * 25),
                Observation {
                    in_flight: 0.0,
                    held: 0.0,
                    requests: 0.0,
                },
            );
        }
        a.observe(
            at(21),
            Observation {
                in_flight: 10.0,
                held: 0.0,
                requests: 0.0,
            },
        );
        let stable = a.average(at(60), Duration::from_secs(60));
        assert!((stable - 10.0 * 59.0 / 60.0).abs() < 1e-9, "{stable}");
        let panic = a.average(at(60), Duration::from_secs(6));
        assert!((panic - 10.0).abs() < 1e-9, "{panic}");
        // Averaging the reports instead would have said (2 * 10) / 42.
    }

    #[test]
    fn always_on_never_goes_below_its_minimum() {
        let policy = ScalingPolicy::defaults(2, 10, 1, 50, None);
        let replicas = simulate(policy, 2, &vec![0.0; 100]);
        assert!(replicas.iter().all(|r| *r == 2), "{replicas:?}");
    }

    proptest! {
        #[test]
        fn stays_within_bounds_and_never_zero_while_busy(
            loads in prop::collection::vec(0.0f64..500.0, 1..120),
            idle in prop::collection::vec(any::<bool>(), 1..120),
            min in 0u32..3, max in 1u32..40, target in 1u32..50,
        ) {
            let max = max.max(min).max(1);
            let policy = ScalingPolicy::defaults(min, max, 1, target, (min == 0).then_some(Duration::from_secs(20)));
            let mut a = Autoscaler::new(policy, Duration::ZERO);
            let mut replicas = min;
            for (i, load) in loads.iter().enumerate() {
                let load = if idle[i % idle.len()] { 0.0 } else { *load };
                let now = TICK * (i as u32 + 1);
                let held = if replicas == 0 { load } else { 0.0 };
                a.observe(now, Observation { in_flight: load - held, held, requests: 0.0 });
                let next = a.decide(now, replicas, true).replicas;
                prop_assert!(next <= max, "{next} > max {max}");
                prop_assert!(next >= min, "{next} < min {min}");
                prop_assert!(!(load > 0.0 && next == 0), "zero while {load} requests are in flight or held");
                replicas = next;
            }
        }

        #[test]
        fn constant_load_gives_a_constant_count(load in 1.0f64..400.0, target in 1u32..50) {
            let replicas = simulate(function(1000, target), 1, &vec![load; 150]);
            let settled = &replicas[60..];
            prop_assert!(settled.iter().all(|r| *r == settled[0]), "flapping: {settled:?}");
            let expected = (load / (f64::from(target) * 0.7)).ceil() as u32;
            prop_assert_eq!(settled[0], expected);
        }

        #[test]
        fn a_step_up_is_met_within_the_panic_window(low in 1.0f64..20.0, factor in 3.0f64..20.0, target in 1u32..20) {
            let high = low * factor;
            let mut loads = vec![low; 60];
            loads.extend(vec![high; 10]);
            let replicas = simulate(function(10_000, target), 1, &loads);
            let needed = (high / (f64::from(target) * 0.7)).ceil() as u32;
            // Panic window 6 s = 3 ticks, plus the tick that sees the step.
            prop_assert!(replicas[60 + 3] >= needed, "after the step: {:?}, needed {needed}", &replicas[58..]);
        }

        #[test]
        fn scale_down_is_no_faster_than_the_rate(high in 50.0f64..500.0, target in 1u32..10) {
            let mut loads = vec![high; 40];
            loads.extend(vec![0.5; 80]);
            let replicas = simulate(function(10_000, target), 1, &loads);
            for pair in replicas.windows(2) {
                prop_assert!(f64::from(pair[1]) >= (f64::from(pair[0]) / 2.0).floor(), "{} -> {}", pair[0], pair[1]);
            }
        }
    }
}
