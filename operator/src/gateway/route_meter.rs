//! Counters of one route and backend, for the operator's migration gates
//! (see [`crate::protocol::RouteStats`]): kept only for routes with a
//! migration, cumulative, and reported when they changed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{LATENCY_BUCKETS_MS, RouteStats, WorkloadRef, bucket_of};

const BUCKETS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// Times the last counts are sent again after they stopped changing (a
/// lost report is made up for while the route is quiet).
const REPEATS: u64 = 3;

/// Counters since this meter was made (its `series`).
pub struct RouteMeter {
    series: u64,
    made: Instant,
    requests: AtomicU64,
    errors: AtomicU64,
    latency_sum_ms: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    cold_waits: AtomicU64,
    cold_wait: [AtomicU64; BUCKETS],
    /// `requests` at the last report.
    reported: AtomicU64,
    /// Reports since `requests` last changed.
    quiet: AtomicU64,
}

impl Default for RouteMeter {
    fn default() -> Self {
        Self {
            // Unique across restarts of a gateway with the same name.
            series: fastrand::u64(1..),
            made: Instant::now(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_sum_ms: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            cold_waits: AtomicU64::new(0),
            cold_wait: std::array::from_fn(|_| AtomicU64::new(0)),
            reported: AtomicU64::new(0),
            quiet: AtomicU64::new(REPEATS),
        }
    }
}

impl RouteMeter {
    /// Counts a finished request: its status, its time, and how long it was
    /// held for a cold start, if it was.
    pub fn record(&self, status: u16, took: Duration, cold_wait: Option<Duration>) {
        let ms = took.as_millis() as u64;
        self.latency_sum_ms.fetch_add(ms, Ordering::Relaxed);
        self.latency[bucket_of(ms)].fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(waited) = cold_wait {
            self.cold_wait[bucket_of(waited.as_millis() as u64)].fetch_add(1, Ordering::Relaxed);
            self.cold_waits.fetch_add(1, Ordering::Relaxed);
        }
        // Last, so a report that sees the count sees the rest.
        self.requests.fetch_add(1, Ordering::Release);
    }

    /// The counters, if they changed in the last few reports.
    pub fn report(&self, workload: WorkloadRef, route: &str) -> Option<RouteStats> {
        let requests = self.requests.load(Ordering::Acquire);
        if self.reported.swap(requests, Ordering::Relaxed) != requests {
            self.quiet.store(0, Ordering::Relaxed);
        } else if self.quiet.fetch_add(1, Ordering::Relaxed) >= REPEATS {
            return None;
        }
        let read = |counters: &[AtomicU64; BUCKETS]| {
            counters.iter().map(|c| c.load(Ordering::Relaxed)).collect()
        };
        Some(RouteStats {
            workload,
            route: route.to_string(),
            series: self.series,
            age_ms: self.made.elapsed().as_millis() as u64,
            requests,
            errors: self.errors.load(Ordering::Relaxed),
            latency_sum_ms: self.latency_sum_ms.load(Ordering::Relaxed),
            latency: read(&self.latency),
            cold_waits: self.cold_waits.load(Ordering::Relaxed),
            cold_wait: read(&self.cold_wait),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_grow_and_are_reported_once_per_change() {
        let meter = RouteMeter::default();
        let fns = WorkloadRef::default();
        assert_eq!(meter.report(fns.clone(), "r"), None);
        meter.record(200, Duration::from_millis(3), None);
        meter.record(
            503,
            Duration::from_millis(40),
            Some(Duration::from_millis(30)),
        );
        let first = meter.report(fns.clone(), "r").expect("changed");
        assert_eq!((first.requests, first.errors, first.cold_waits), (2, 1, 1));
        assert_eq!(first.latency_sum_ms, 43);
        assert_eq!(first.latency[bucket_of(3)], 1);
        assert_eq!(first.latency[bucket_of(40)], 1);
        assert_eq!(first.cold_wait[bucket_of(30)], 1);
        for _ in 0..REPEATS {
            let again = meter
                .report(fns.clone(), "r")
                .expect("repeated while quiet");
            assert_eq!(again.requests, 2);
        }
        assert_eq!(meter.report(fns.clone(), "r"), None, "nothing new");
        meter.record(200, Duration::from_millis(3), None);
        let second = meter.report(fns, "r").expect("changed");
        assert_eq!((second.series, second.requests), (first.series, 3));
    }
}
