//! `mode: Auto`: where a workload is placed, decided from its own traffic
//! with [`crate::keepalive::placement::recommend`]. Pure, time passed in
//! (the autoscaler's clock).
//!
//! The workload always runs the Function's way (reached through the
//! gateways, held and woken at zero); its placement only sets whether it
//! keeps a replica. So a change of placement is the safe kind by
//! construction: to AlwaysOn it raises the floor to one replica (a
//! pre-warm: the autoscaler starts it before anything depends on it), to
//! Function it lets the keep-alive take the replica away once idle, and
//! requests arriving at zero are held as for any Function.
//!
//! The numbers are those of the workload *as a Function*, whatever its
//! placement: the autoscaler runs the workload's keep-alive (fixed or
//! learned) in the shadow and books, per bucket of time, the seconds the
//! replica would have been loaded, the requests, and the arrivals that
//! would have found it at zero (one cold request each, the model of
//! `tandem plan`). Each decision looks at the last `minDwell` of traffic
//! (so it needs that much observed; a new leader observes afresh), and a
//! change waits for `minDwell` in the current placement.

use std::time::Duration;

use super::window::Buckets;

use crate::keepalive::placement::{Dwell, Placement, Recommendation, recommend};

/// Buckets per window: the window slides by 1/BUCKETS of itself.
const BUCKETS: u32 = 30;
/// The numbers shown are refreshed at most this often (a placement change
/// shows at once), so status is written at a bounded rate.
pub const REFRESH: Duration = Duration::from_secs(30);

/// How one `mode: Auto` workload is placed.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementPolicy {
    /// Highest share of cold requests, percent.
    pub budget_pct: f64,
    /// Least time in a placement, and the traffic each decision looks at.
    pub min_dwell: Duration,
    /// What one replica costs per hour.
    pub replica_hour: f64,
    /// The placement in status and how long ago it began (a new leader
    /// resumes it).
    pub shown: Option<(Placement, Duration)>,
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    seconds: f64,
    loaded: f64,
    requests: f64,
    cold: f64,
}

/// The placement of one workload and the traffic it is decided on.
#[derive(Debug, Clone)]
pub struct Placed {
    policy: PlacementPolicy,
    dwell: Dwell,
    buckets: Buckets<Bucket>,
    accounted: Duration,
    shown: Option<(Duration, Recommendation)>,
}

fn secs(at: Duration) -> f64 {
    at.as_secs_f64()
}

impl Placed {
    /// Placed as `policy.shown` says, else AlwaysOn (a replica until the
    /// traffic says otherwise), at `now`.
    pub fn new(policy: PlacementPolicy, now: Duration) -> Self {
        let (placement, since) = match policy.shown {
            Some((placement, age)) => (placement, secs(now) - secs(age)),
            None => (Placement::AlwaysOn, secs(now)),
        };
        Placed {
            dwell: Dwell::new(placement, since, secs(policy.min_dwell)),
            policy,
            buckets: Buckets::default(),
            accounted: now,
            shown: None,
        }
    }

    /// The spec changed: keep the placement and the traffic booked.
    pub fn set_policy(&mut self, policy: PlacementPolicy) {
        if policy.min_dwell != self.policy.min_dwell {
            self.dwell = Dwell::new(
                self.dwell.placement(),
                self.dwell.since_s(),
                secs(policy.min_dwell),
            );
        }
        self.policy = policy;
    }

    /// The placement in force.
    pub fn placement(&self) -> Placement {
        self.dwell.placement()
    }

    fn bucket(&mut self, now: Duration) -> &mut Bucket {
        let width = (self.policy.min_dwell / BUCKETS).max(Duration::from_secs(1));
        self.buckets.at(now, self.policy.min_dwell, width)
    }

    /// Books the time since the last call: loaded as a Function or not.
    pub fn account(&mut self, now: Duration, loaded: bool) {
        let seconds = secs(now.saturating_sub(self.accounted));
        self.accounted = self.accounted.max(now);
        let bucket = self.bucket(now);
        bucket.seconds += seconds;
        if loaded {
            bucket.loaded += seconds;
        }
    }

    /// Books `n` requests started; `cold` when they arrived while a
    /// Function would have been at zero (one of them met the cold start).
    pub fn requests(&mut self, now: Duration, n: f64, cold: bool) {
        let bucket = self.bucket(now);
        bucket.requests += n;
        if cold {
            bucket.cold += 1.0;
        }
    }

    /// The recommendation over the window before `now`, once a full window
    /// has been observed.
    fn recommendation(&self) -> Option<Recommendation> {
        let (mut seconds, mut loaded, mut requests, mut cold) = (0.0, 0.0, 0.0, 0.0);
        for b in self.buckets.iter() {
            seconds += b.seconds;
            loaded += b.loaded;
            requests += b.requests;
            cold += b.cold;
        }
        // A window less one bucket: the oldest is partly outside it.
        let full = secs(self.policy.min_dwell) * f64::from(BUCKETS - 1) / f64::from(BUCKETS);
        if seconds < full {
            return None;
        }
        let cold_pct = if requests > 0.0 {
            100.0 * cold.min(requests) / requests
        } else {
            0.0
        };
        Some(recommend(
            self.placement(),
            cold_pct,
            self.policy.budget_pct,
            loaded / 3600.0,
            seconds / 3600.0,
            self.policy.replica_hour,
        ))
    }

    /// Decides at `now`: moves when the recommendation says so and the
    /// dwell allows. Returns whether the placement changed.
    pub fn decide(&mut self, now: Duration) -> bool {
        let Some(recommendation) = self.recommendation() else {
            return false;
        };
        let changed = self.dwell.offer(recommendation.placement, secs(now));
        let stale = self
            .shown
            .as_ref()
            .is_none_or(|(at, _)| now >= *at + REFRESH);
        if changed || stale {
            // After a move the reason still explains it.
            self.shown = Some((now, recommendation));
        }
        changed
    }

    /// What status shows: the placement, when it began (autoscaler clock,
    /// may be before the clock started) and the numbers last refreshed.
    pub fn shown(&self) -> (Placement, f64, Option<&Recommendation>) {
        (
            self.placement(),
            self.dwell.since_s(),
            self.shown.as_ref().map(|(_, r)| r),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dwell: u64) -> PlacementPolicy {
        PlacementPolicy {
            budget_pct: 1.0,
            min_dwell: Duration::from_secs(dwell),
            replica_hour: 0.05,
            shown: None,
        }
    }

    /// Drives `placed` for `seconds` from `from`, a second at a time,
    /// loaded while `loaded`, with `rate` requests a second; returns the
    /// placement after each second.
    fn drive(
        placed: &mut Placed,
        from: u64,
        seconds: u64,
        loaded: bool,
        rate: f64,
    ) -> Vec<Placement> {
        (from..from + seconds)
            .map(|t| {
                let now = Duration::from_secs(t);
                placed.requests(now, rate, false);
                placed.account(now, loaded);
                placed.decide(now);
                placed.placement()
            })
            .collect()
    }

    #[test]
    fn steady_traffic_keeps_a_replica_and_once_it_stops_becomes_a_function_after_the_dwell() {
        let mut placed = Placed::new(policy(60), Duration::ZERO);
        assert_eq!(placed.placement(), Placement::AlwaysOn, "until known");
        let busy = drive(&mut placed, 1, 300, true, 5.0);
        assert!(busy.iter().all(|&p| p == Placement::AlwaysOn));
        // The load stops; the shadow keep-alive unloads after 10 s.
        drive(&mut placed, 301, 10, true, 0.0);
        let idle = drive(&mut placed, 311, 120, false, 0.0);
        let moved = idle
            .iter()
            .position(|&p| p == Placement::Function)
            .expect("becomes a Function");
        // Saving reaches 25% of the last 60 s after 15 s unloaded.
        assert!((10..=20).contains(&moved), "{moved}");
        let (_, since, numbers) = placed.shown();
        assert_eq!(since, (311 + moved) as f64);
        assert!(numbers.unwrap().reason.contains("saves"), "{numbers:?}");
    }

    #[test]
    fn cold_starts_over_budget_bring_a_replica_back_but_not_before_the_dwell() {
        let shown = Some((Placement::Function, Duration::from_secs(0)));
        let mut placed = Placed::new(
            PlacementPolicy {
                shown,
                ..policy(60)
            },
            Duration::ZERO,
        );
        let mut moved = None;
        for t in 1..200u64 {
            let now = Duration::from_secs(t);
            // A request every 20 s, each finding a Function at zero.
            if t % 20 == 0 {
                placed.requests(now, 1.0, true);
            }
            placed.account(now, t % 20 < 5);
            if placed.decide(now) {
                let reason = placed.shown().2.unwrap().reason.clone();
                moved.get_or_insert((t, placed.placement(), reason));
            }
        }
        let (at, placement, reason) = moved.expect("moves");
        assert_eq!(placement, Placement::AlwaysOn);
        // It needs a full window of traffic first.
        assert!((58..=62).contains(&at), "{at}");
        assert!(reason.contains("over the 1% budget"), "{reason}");
        assert_eq!(placed.placement(), Placement::AlwaysOn, "and stays");
    }

    #[test]
    fn a_new_leader_resumes_the_placement_and_its_dwell() {
        let shown = Some((Placement::Function, Duration::from_secs(50)));
        let placed = Placed::new(
            PlacementPolicy {
                shown,
                ..policy(60)
            },
            Duration::from_secs(5),
        );
        assert_eq!(placed.placement(), Placement::Function);
        assert_eq!(placed.shown().1, -45.0);
    }

    #[test]
    fn the_numbers_are_refreshed_at_a_bounded_rate() {
        let mut placed = Placed::new(policy(60), Duration::ZERO);
        let mut refreshed = Vec::new();
        let mut last = None;
        for t in 1..400u64 {
            let now = Duration::from_secs(t);
            placed.requests(now, 1.0, false);
            placed.account(now, true);
            placed.decide(now);
            let numbers = placed.shown().2.cloned();
            if numbers != last {
                refreshed.push(t);
                last = numbers;
            }
        }
        assert!(!refreshed.is_empty());
        assert!(
            refreshed
                .windows(2)
                .all(|w| w[1] - w[0] >= REFRESH.as_secs()),
            "{refreshed:?}"
        );
    }
}
