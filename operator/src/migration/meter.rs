//! The operator's view of what the gateways measured per route and backend
//! (the [`RouteStats`] in their stats), for migration gates.
//!
//! Each gateway's counters only grow within a series; the meter adds the
//! difference to the previous snapshot of the same gateway and series to the
//! route's totals (a new series counts from zero). A step's figures are the
//! totals now minus the totals when its window opened, which is the first
//! time the step is asked for: a new leader measures a step from its own
//! start and never passes it on figures it did not see.
//!
//! Bounded: one entry per route and backend the gateways report, dropped
//! after [`FORGET_AFTER`] without a report, and one open window per route.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::StepId;
use crate::protocol::{LATENCY_BUCKETS_MS, RouteStats, Stats};

/// A route's series is forgotten after this long without a report.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How often series are looked at for forgetting.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// A gateway's recent concurrency counts for this long after its last report.
const FRESH: Duration = Duration::from_secs(5);

/// One route and backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    /// Namespace of the app.
    pub namespace: String,
    /// The app.
    pub app: String,
    /// The route.
    pub route: String,
    /// The backend.
    pub workload: String,
}

/// What was measured over a window, summed over gateways and backends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// How long the window has been open.
    pub window: Duration,
    /// Requests finished.
    pub requests: u64,
    /// Of which 5xx.
    pub errors: u64,
    /// Response times per bucket of [`LATENCY_BUCKETS_MS`].
    pub latency: Vec<u64>,
    /// Requests held for a cold start.
    pub cold_waits: u64,
    /// Their waits per bucket.
    pub cold_wait: Vec<u64>,
}

impl Figures {
    /// Errors per request, in percent.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 * 100.0 / self.requests as f64
        }
    }

    /// 99th percentile response time (within its bucket, interpolated).
    pub fn p99_latency(&self) -> Duration {
        quantile(&self.latency, 0.99)
    }

    /// 99th percentile cold wait.
    pub fn p99_cold_wait(&self) -> Duration {
        quantile(&self.cold_wait, 0.99)
    }
}

/// The `q` quantile of a histogram over [`LATENCY_BUCKETS_MS`], linear
/// within the bucket it falls in (as Prometheus' `histogram_quantile`); in
/// the open last bucket, its lower bound.
pub fn quantile(buckets: &[u64], q: f64) -> Duration {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return Duration::ZERO;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, count) in buckets.iter().enumerate() {
        if *count > 0 && (below + count) as f64 >= rank {
            let low = if i == 0 { 0 } else { LATENCY_BUCKETS_MS[i - 1] };
            let Some(high) = LATENCY_BUCKETS_MS.get(i) else {
                return Duration::from_millis(low);
            };
            let within = ((rank - below as f64) / *count as f64).clamp(0.0, 1.0);
            let ms = low as f64 + (high - low) as f64 * within;
            return Duration::from_micros((ms * 1000.0) as u64);
        }
        below += count;
    }
    Duration::from_millis(*LATENCY_BUCKETS_MS.last().expect("buckets"))
}

/// Counters that only grow.
#[derive(Clone, Debug, Default, PartialEq)]
struct Counters {
    requests: u64,
    errors: u64,
    latency_sum_ms: u64,
    latency: Vec<u64>,
    cold_waits: u64,
    cold_wait: Vec<u64>,
}

impl Counters {
    fn of(stats: &RouteStats) -> Self {
        Self {
            requests: stats.requests,
            errors: stats.errors,
            latency_sum_ms: stats.latency_sum_ms,
            latency: stats.latency.clone(),
            cold_waits: stats.cold_waits,
            cold_wait: stats.cold_wait.clone(),
        }
    }

    /// `self − earlier`, or `None` if any counter went down (a restart
    /// under the same series: taken as a new series).
    fn since(&self, earlier: &Counters) -> Option<Counters> {
        let sub = |a: u64, b: u64| a.checked_sub(b);
        let subs = |a: &[u64], b: &[u64]| -> Option<Vec<u64>> {
            (0..a.len().max(b.len()))
                .map(|i| {
                    sub(
                        a.get(i).copied().unwrap_or(0),
                        b.get(i).copied().unwrap_or(0),
                    )
                })
                .collect()
        };
        Some(Counters {
            requests: sub(self.requests, earlier.requests)?,
            errors: sub(self.errors, earlier.errors)?,
            latency_sum_ms: sub(self.latency_sum_ms, earlier.latency_sum_ms)?,
            latency: subs(&self.latency, &earlier.latency)?,
            cold_waits: sub(self.cold_waits, earlier.cold_waits)?,
            cold_wait: subs(&self.cold_wait, &earlier.cold_wait)?,
        })
    }

    fn add(&mut self, more: &Counters) {
        let adds = |a: &mut Vec<u64>, b: &[u64]| {
            if a.len() < b.len() {
                a.resize(b.len(), 0);
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        };
        self.requests += more.requests;
        self.errors += more.errors;
        self.latency_sum_ms += more.latency_sum_ms;
        adds(&mut self.latency, &more.latency);
        self.cold_waits += more.cold_waits;
        adds(&mut self.cold_wait, &more.cold_wait);
    }
}

struct FromGateway {
    series: u64,
    last: Counters,
    seen: Instant,
    /// Requests in flight, averaged over recent reports (Little's law:
    /// time spent in requests per unit of time).
    concurrency: f64,
}

#[derive(Default)]
struct Series {
    totals: Counters,
    gateways: HashMap<String, FromGateway>,
    seen: Option<Instant>,
}

struct Window {
    step: StepId,
    opened: Instant,
    at_open: HashMap<String, Counters>,
}

/// What the gateways measured per route and backend.
pub struct Meter {
    started: Instant,
    inner: Mutex<Inner>,
}

impl Default for Meter {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            inner: Default::default(),
        }
    }
}

#[derive(Default)]
struct Inner {
    series: HashMap<RouteKey, Series>,
    /// Open window per (namespace, app, route).
    windows: HashMap<(String, String, String), Window>,
    /// When series were last looked at for forgetting.
    pruned: Option<Instant>,
}

impl Meter {
    /// Takes in the route counters of one gateway's stats.
    pub fn record(&self, stats: &Stats) {
        if stats.routes.is_empty() {
            return;
        }
        let now = Instant::now();
        let interval_ms = stats.interval_ms.max(1) as f64;
        let mut inner = self.inner.lock().expect("meter lock");
        for reported in &stats.routes {
            let key = RouteKey {
                namespace: reported.workload.namespace.clone(),
                app: reported.workload.app.clone(),
                route: reported.route.clone(),
                workload: reported.workload.workload.clone(),
            };
            let counters = Counters::of(reported);
            let series = inner.series.entry(key).or_default();
            series.seen = Some(now);
            let delta = match series.gateways.get(&stats.gateway) {
                Some(from) if from.series == reported.series => counters.since(&from.last),
                _ => None,
            }
            .unwrap_or_else(|| {
                // First sight of this series: new counts if it began after
                // this meter did, else history this meter did not see.
                let began = now.checked_sub(Duration::from_millis(reported.age_ms));
                if began.is_some_and(|b| b >= self.started) {
                    counters.clone()
                } else {
                    Counters::default()
                }
            });
            series.totals.add(&delta);
            let busy = delta.latency_sum_ms as f64 / interval_ms;
            let from = series
                .gateways
                .entry(stats.gateway.clone())
                .or_insert(FromGateway {
                    series: reported.series,
                    last: Counters::default(),
                    seen: now,
                    concurrency: busy,
                });
            from.series = reported.series;
            from.last = counters;
            from.seen = now;
            from.concurrency = 0.5 * from.concurrency + 0.5 * busy;
        }
        // Forgetting is a scan of every series: once a minute, not per report.
        if inner
            .pruned
            .is_none_or(|at| now.duration_since(at) >= PRUNE_EVERY)
        {
            inner.pruned = Some(now);
            inner.series.retain(|_, s| {
                s.gateways
                    .retain(|_, g| now.duration_since(g.seen) < FORGET_AFTER);
                s.seen
                    .is_some_and(|seen| now.duration_since(seen) < FORGET_AFTER)
            });
        }
    }

    /// Figures of `workloads` on `route` since the window of `step` opened
    /// (opening it now if another step's, or none, was open).
    pub fn figures(
        &self,
        namespace: &str,
        app: &str,
        route: &str,
        step: &StepId,
        workloads: &[String],
    ) -> Figures {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("meter lock");
        let totals = |inner: &Inner, workload: &str| {
            let key = RouteKey {
                namespace: namespace.into(),
                app: app.into(),
                route: route.into(),
                workload: workload.into(),
            };
            inner
                .series
                .get(&key)
                .map(|s| s.totals.clone())
                .unwrap_or_default()
        };
        let id = (namespace.to_string(), app.to_string(), route.to_string());
        if inner.windows.get(&id).is_none_or(|w| &w.step != step) {
            let at_open = workloads
                .iter()
                .map(|w| (w.clone(), totals(&inner, w)))
                .collect();
            inner.windows.insert(
                id.clone(),
                Window {
                    step: step.clone(),
                    opened: now,
                    at_open,
                },
            );
        }
        let window = &inner.windows[&id];
        let mut sum = Counters::default();
        for workload in workloads {
            let now_totals = totals(&inner, workload);
            let before = window.at_open.get(workload).cloned().unwrap_or_default();
            sum.add(&now_totals.since(&before).unwrap_or(now_totals.clone()));
        }
        Figures {
            window: now.duration_since(window.opened),
            requests: sum.requests,
            errors: sum.errors,
            latency: sum.latency,
            cold_waits: sum.cold_waits,
            cold_wait: sum.cold_wait,
        }
    }

    /// Requests in flight on `route` (all backends, all gateways that
    /// reported lately).
    pub fn route_concurrency(&self, namespace: &str, app: &str, route: &str) -> f64 {
        let now = Instant::now();
        let inner = self.inner.lock().expect("meter lock");
        inner
            .series
            .iter()
            .filter(|(k, _)| k.namespace == namespace && k.app == app && k.route == route)
            .flat_map(|(_, s)| s.gateways.values())
            .filter(|g| now.duration_since(g.seen) < FRESH)
            .map(|g| g.concurrency)
            .sum()
    }

    /// Forgets the window of a route (its migration ended or it is gone).
    pub fn close(&self, namespace: &str, app: &str, route: &str) {
        let mut inner = self.inner.lock().expect("meter lock");
        inner
            .windows
            .remove(&(namespace.to_string(), app.to_string(), route.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{WorkloadRef, bucket_of};

    fn report(gateway: &str, series: u64, requests: u64, errors: u64, ms: u64) -> Stats {
        let mut latency = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        latency[bucket_of(ms)] = requests;
        Stats {
            gateway: gateway.into(),
            interval_ms: 1000,
            workloads: vec![],
            routes: vec![RouteStats {
                workload: WorkloadRef {
                    namespace: "ns".into(),
                    app: "shop".into(),
                    workload: "fn".into(),
                },
                route: "search".into(),
                series,
                age_ms: 0,
                requests,
                errors,
                latency_sum_ms: requests * ms,
                latency,
                cold_waits: 0,
                cold_wait: vec![],
            }],
            ..Default::default()
        }
    }

    fn step(n: i32) -> StepId {
        StepId {
            started: k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            step: n,
            step_started: k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_counts_what_came_after_it_opened_once_whatever_is_repeated_or_lost() {
        let meter = Meter::default();
        let fns = vec!["fn".to_string()];
        meter.record(&report("gw-a", 7, 100, 0, 20));
        let opened = meter.figures("ns", "shop", "search", &step(1), &fns);
        assert_eq!(opened.requests, 0);

        meter.record(&report("gw-a", 7, 150, 5, 20));
        meter.record(&report("gw-a", 7, 150, 5, 20)); // repeated
        meter.record(&report("gw-b", 1, 30, 0, 20)); // a second gateway
        // gw-a's 200 is lost; 260 brings what it held.
        meter.record(&report("gw-a", 7, 260, 10, 20));
        tokio::time::advance(Duration::from_secs(3)).await;
        let figures = meter.figures("ns", "shop", "search", &step(1), &fns);
        assert_eq!((figures.requests, figures.errors), (190, 10));
        assert_eq!(figures.window, Duration::from_secs(3));
        assert!((figures.error_rate() - 10.0 * 100.0 / 190.0).abs() < 1e-9);

        // The gateway restarted: a new series counts from zero.
        meter.record(&report("gw-a", 8, 4, 4, 20));
        let figures = meter.figures("ns", "shop", "search", &step(1), &fns);
        assert_eq!((figures.requests, figures.errors), (194, 14));

        // A series older than the meter (a new leader hearing of it) is
        // history, not traffic of the window.
        let mut old = report("gw-c", 3, 1000, 1000, 20);
        old.routes[0].age_ms = 3_600_000;
        meter.record(&old);
        let figures = meter.figures("ns", "shop", "search", &step(1), &fns);
        assert_eq!((figures.requests, figures.errors), (194, 14));

        // The next step opens a new window.
        let next = meter.figures("ns", "shop", "search", &step(2), &fns);
        assert_eq!(next.requests, 0);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let mut buckets = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        buckets[bucket_of(40)] = 99; // 25 < 40 <= 50
        buckets[bucket_of(900)] = 1; // 750 < 900 <= 1000
        assert_eq!(quantile(&buckets, 0.99), Duration::from_millis(50));
        assert_eq!(quantile(&buckets, 1.0), Duration::from_millis(1000));
        assert_eq!(quantile(&buckets, 0.5).as_millis(), 37);
        assert_eq!(quantile(&[], 0.99), Duration::ZERO);
        let mut slow = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        slow[bucket_of(90_000)] = 3;
        assert_eq!(quantile(&slow, 0.99), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_time_in_requests_per_time_from_fresh_gateways() {
        let meter = Meter::default();
        meter.record(&report("gw-a", 1, 0, 0, 20));
        // 100 requests of 50 ms in one second: 5 in flight on average.
        meter.record(&report("gw-a", 1, 100, 0, 50));
        let c = meter.route_concurrency("ns", "shop", "search");
        assert!((c - 2.5).abs() < 1e-9, "{c}");
        meter.record(&report("gw-a", 1, 200, 0, 50));
        let c = meter.route_concurrency("ns", "shop", "search");
        assert!(c > 2.5 && c < 5.0, "{c}");
        tokio::time::advance(FRESH).await;
        assert_eq!(meter.route_concurrency("ns", "shop", "search"), 0.0);
    }
}
