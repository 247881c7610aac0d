//! What each workload costs: replica-hours booked from its Deployment's
//! `spec.replicas` at every autoscaler tick, over the last hour and the
//! last day, priced with the pod's requests, beside what the same traffic
//! would cost all-AlwaysOn at its minimum (never under `max(1,
//! minReplicas)` replicas, and as many as it had above that). Pure, time
//! passed in; [`super::metrics::AutoscalerMetrics`] exports the same figures.
//!
//! The windows are rings of buckets (60 of a minute, 24 of an hour), so a
//! workload's history is bounded whatever its age. A new leader starts
//! from nothing: its figures cover the time it has watched
//! (`observedHours` says how much).

use std::collections::HashMap;
use std::time::Duration;

use super::window::Buckets;
use crate::protocol::WorkloadRef;

/// One window: its length and its buckets' width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// The last hour, by minute.
    Hour,
    /// The last day, by hour.
    Day,
}

impl Span {
    fn length(self) -> Duration {
        match self {
            Span::Hour => Duration::from_secs(3600),
            Span::Day => Duration::from_secs(24 * 3600),
        }
    }

    fn bucket(self) -> Duration {
        self.length() / self.buckets()
    }

    fn buckets(self) -> u32 {
        match self {
            Span::Hour => 60,
            Span::Day => 24,
        }
    }

    /// Its label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Span::Hour => "1h",
            Span::Day => "24h",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Bucket {
    seconds: f64,
    replica_seconds: f64,
    always_on_seconds: f64,
}

#[derive(Debug, Clone, Default)]
struct Ring {
    buckets: Buckets<Bucket>,
}

impl Ring {
    fn book(&mut self, span: Span, now: Duration, seconds: f64, replicas: f64, floor: f64) {
        let bucket = self.buckets.at(now, span.length(), span.bucket());
        bucket.seconds += seconds;
        bucket.replica_seconds += seconds * replicas;
        bucket.always_on_seconds += seconds * replicas.max(floor);
    }

    fn total(&self) -> Bucket {
        self.buckets.iter().fold(Bucket::default(), |t, b| Bucket {
            seconds: t.seconds + b.seconds,
            replica_seconds: t.replica_seconds + b.replica_seconds,
            always_on_seconds: t.always_on_seconds + b.always_on_seconds,
        })
    }
}

/// A workload's figures over one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Hours of it watched (at most the window).
    pub observed_hours: f64,
    /// Replica-hours run.
    pub replica_hours: f64,
    /// Their cost.
    pub cost: f64,
    /// Replica-hours all-AlwaysOn at its minimum.
    pub always_on_replica_hours: f64,
    /// Their cost.
    pub always_on_cost: f64,
}

#[derive(Debug, Clone)]
struct Booked {
    at: Duration,
    replicas: u32,
    floor: u32,
    replica_hour: f64,
    hour: Ring,
    day: Ring,
}

/// The replica-hours of every workload booked.
#[derive(Debug, Default)]
pub struct Costs {
    workloads: HashMap<WorkloadRef, Booked>,
}

impl Costs {
    /// Books `workload` at `now`: the time since the previous booking at what
    /// that booking said (its first booking only starts the clock); from
    /// now on `replicas`, at least `floor` always on, one replica costing
    /// `replica_hour`.
    pub fn book(
        &mut self,
        now: Duration,
        workload: &WorkloadRef,
        replicas: u32,
        floor: u32,
        replica_hour: f64,
    ) {
        let booked = self
            .workloads
            .entry(workload.clone())
            .or_insert_with(|| Booked {
                at: now,
                replicas,
                floor,
                replica_hour,
                hour: Ring::default(),
                day: Ring::default(),
            });
        let seconds = now.saturating_sub(booked.at).as_secs_f64();
        let (was, was_floor) = (f64::from(booked.replicas), f64::from(booked.floor.max(1)));
        booked.hour.book(Span::Hour, now, seconds, was, was_floor);
        booked.day.book(Span::Day, now, seconds, was, was_floor);
        booked.at = booked.at.max(now);
        booked.replicas = replicas;
        booked.floor = floor;
        booked.replica_hour = replica_hour;
    }

    /// Forgets workloads not in `live`.
    pub fn retain(&mut self, live: impl Fn(&WorkloadRef) -> bool) {
        self.workloads.retain(|key, _| live(key));
    }

    /// The figures of `workload` over `span`.
    pub fn figures(&self, workload: &WorkloadRef, span: Span) -> Option<Figures> {
        let booked = self.workloads.get(workload)?;
        let total = match span {
            Span::Hour => booked.hour.total(),
            Span::Day => booked.day.total(),
        };
        let hours = |seconds: f64| seconds / 3600.0;
        Some(Figures {
            observed_hours: hours(total.seconds),
            replica_hours: hours(total.replica_seconds),
            cost: hours(total.replica_seconds) * booked.replica_hour,
            always_on_replica_hours: hours(total.always_on_seconds),
            always_on_cost: hours(total.always_on_seconds) * booked.replica_hour,
        })
    }

    /// What the workloads of `app` (namespace, name) cost less than
    /// all-AlwaysOn over `span`, percent: by cost, or by replica-hours
    /// when nothing has a price. `None` before anything was watched.
    pub fn saving_pct(&self, app: (&str, &str), span: Span) -> Option<f64> {
        let figures: Vec<Figures> = self
            .workloads
            .keys()
            .filter(|w| (w.namespace.as_str(), w.app.as_str()) == app)
            .filter_map(|w| self.figures(w, span))
            .collect();
        let sum = |f: fn(&Figures) -> f64| figures.iter().map(f).sum::<f64>();
        let (run, always_on) = if sum(|f| f.always_on_cost) > 0.0 {
            (sum(|f| f.cost), sum(|f| f.always_on_cost))
        } else {
            (sum(|f| f.replica_hours), sum(|f| f.always_on_replica_hours))
        };
        (always_on > 0.0).then(|| 100.0 * (1.0 - run / always_on))
    }

    /// Every workload booked.
    pub fn workloads(&self) -> impl Iterator<Item = &WorkloadRef> {
        self.workloads.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(workload: &str) -> WorkloadRef {
        WorkloadRef {
            namespace: "ns".into(),
            app: "shop".into(),
            workload: workload.into(),
        }
    }

    #[test]
    fn replica_hours_over_the_hour_and_the_day_against_always_on() {
        let mut costs = Costs::default();
        let fun = key("fn");
        // Two hours: a replica for the first 30 minutes of each, then zero.
        for minute in 0..=120u64 {
            let replicas = if minute % 60 < 30 { 1 } else { 0 };
            costs.book(Duration::from_secs(minute * 60), &fun, replicas, 0, 0.5);
        }
        let hour = costs.figures(&fun, Span::Hour).unwrap();
        assert!((hour.observed_hours - 1.0).abs() < 0.02, "{hour:?}");
        assert!((hour.replica_hours - 0.5).abs() < 0.02, "{hour:?}");
        assert!((hour.cost - 0.25).abs() < 0.01, "{hour:?}");
        assert!((hour.always_on_cost - 0.5).abs() < 0.01, "{hour:?}");
        let day = costs.figures(&fun, Span::Day).unwrap();
        assert!((day.observed_hours - 2.0).abs() < 1e-9, "{day:?}");
        assert!((day.replica_hours - 1.0).abs() < 1e-9, "{day:?}");
        assert!((day.always_on_cost - 1.0).abs() < 1e-9, "{day:?}");
        assert_eq!(costs.saving_pct(("ns", "shop"), Span::Day), Some(50.0));
        assert_eq!(costs.saving_pct(("ns", "other"), Span::Day), None);
    }

    #[test]
    fn always_on_counts_the_minimum_and_every_replica_above_it() {
        let mut costs = Costs::default();
        let api = key("api");
        // 3 replicas for an hour, then 1 for an hour (under its minimum 2).
        costs.book(Duration::ZERO, &api, 3, 2, 1.0);
        costs.book(Duration::from_secs(3600), &api, 1, 2, 1.0);
        costs.book(Duration::from_secs(7200), &api, 1, 2, 1.0);
        let day = costs.figures(&api, Span::Day).unwrap();
        assert!((day.replica_hours - 4.0).abs() < 1e-9);
        assert!((day.always_on_cost - 5.0).abs() < 1e-9);
    }

    #[test]
    fn the_history_is_bounded_and_forgotten_with_the_workload() {
        let mut costs = Costs::default();
        let fun = key("fn");
        for tick in 0..(3 * 24 * 3600 / 2) as u64 {
            costs.book(Duration::from_secs(tick * 2), &fun, 1, 0, 1.0);
        }
        let booked = &costs.workloads[&fun];
        assert!(
            booked.hour.buckets.iter().count() <= 61 && booked.day.buckets.iter().count() <= 25
        );
        let day = costs.figures(&fun, Span::Day).unwrap();
        assert!((day.observed_hours - 24.0).abs() < 1.01, "{day:?}");
        costs.retain(|_| false);
        assert!(costs.figures(&fun, Span::Day).is_none());
    }
}
