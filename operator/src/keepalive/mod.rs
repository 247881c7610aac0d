//! Keep-alive and pre-warming policies for Functions: pure and
//! deterministic, time passed in (seconds on any monotonic clock).
//!
//! A policy sees a workload's invocations as they arrive and, each time
//! the workload falls idle, answers one question: for this idle period,
//! when should an instance be loaded? The answer is a [`Window`]: unload
//! now and load again after `prewarm_s` (zero keeps the instance loaded),
//! then keep it loaded for `keep_alive_s`. An invocation that arrives
//! inside the window is warm, one that arrives before it (while unloaded
//! for the pre-warm) or after it is cold. The autoscaler applies the window
//! to a real Deployment (scale to zero at once when `prewarm_s > 0`, scale
//! up `cold_start` before the window opens, scale to zero when it closes),
//! and `tandem plan` replays a trace through the same code ([`simulate`]).
//!
//! Three policies:
//! - [`Fixed`]: keep alive for a fixed time after the last invocation, what
//!   Knative's `scale-to-zero-grace-period`, AWS Lambda and Azure Functions
//!   do (10 and 20 minutes there).
//! - [`hybrid::HybridHistogram`]: the hybrid-histogram policy of Shahrad et
//!   al., "Serverless in the Wild" (USENIX ATC 2020), as published; the
//!   baseline.
//! - [`adaptive::Adaptive`]: Tandem's policy, which recognises timer-like
//!   arrivals and pre-warms just before each, and otherwise picks the
//!   window that minimises cold starts plus priced idle time over the
//!   workload's recent idle times (see its module docs).

pub mod adaptive;
pub mod cli;
pub mod hybrid;
pub mod placement;
pub mod rng;
pub mod simulate;
pub mod trace;

/// When an instance is loaded during one idle period, counted from the
/// moment the workload fell idle (its last invocation finished).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Unloaded for this long first (0: stays loaded from the start).
    pub prewarm_s: f64,
    /// Then loaded for this long.
    pub keep_alive_s: f64,
}

impl Window {
    /// Stay loaded for `keep_alive_s` after the last invocation.
    pub fn keep(keep_alive_s: f64) -> Self {
        Window {
            prewarm_s: 0.0,
            keep_alive_s: keep_alive_s.max(0.0),
        }
    }

    /// Whether an arrival `idle_s` after the workload fell idle finds an
    /// instance loaded.
    pub fn warm_at(&self, idle_s: f64) -> bool {
        idle_s >= self.prewarm_s && idle_s <= self.prewarm_s + self.keep_alive_s
    }

    /// Instance time loaded while idle, for an idle period of `idle_s`.
    pub fn waste(&self, idle_s: f64) -> f64 {
        (idle_s.min(self.prewarm_s + self.keep_alive_s) - self.prewarm_s).max(0.0)
    }

    /// When the instance is unloaded for good, counted from idle start.
    pub fn end_s(&self) -> f64 {
        self.prewarm_s + self.keep_alive_s
    }
}

/// A keep-alive policy for one workload.
pub trait KeepAlive: Send {
    /// An invocation arrived at `at`. `idle_since` is when the workload had
    /// fallen idle (its previous invocations all finished), or `None` when
    /// one was still running or this is the first.
    fn arrival(&mut self, at: f64, idle_since: Option<f64>);

    /// The workload fell idle at `at`: the window for this idle period.
    fn window(&mut self, at: f64) -> Window;

    /// The last window closed at `at` with no arrival in it: another
    /// window, counted from `at`, or `None` to stay unloaded until the next
    /// arrival. Policies that return windows here must stop after a few.
    fn missed(&mut self, _at: f64) -> Option<Window> {
        None
    }

    /// What the policy knows and why it chose its last window, for status,
    /// Events and `tandem plan`.
    fn explain(&self) -> Explanation {
        Explanation::default()
    }
}

/// What a policy decided from, in a form for people.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// Which rule chose the window (`learning`, `periodic`, `histogram`,
    /// `fixed`, ...).
    pub rule: String,
    /// Idle times learned from.
    pub samples: usize,
    /// Median idle time, seconds.
    pub median_idle_s: Option<f64>,
    /// 99th percentile idle time, seconds.
    pub p99_idle_s: Option<f64>,
    /// The recognised period of timer-like arrivals, seconds.
    pub period_s: Option<f64>,
    /// When the next invocation is expected (same clock as the calls).
    pub next_arrival_at: Option<f64>,
    /// The window chosen last.
    pub prewarm_s: f64,
    /// The window chosen last.
    pub keep_alive_s: f64,
}

/// A fixed keep-alive after the last invocation.
#[derive(Debug, Clone)]
pub struct Fixed {
    keep_alive_s: f64,
}

impl Fixed {
    /// Keep alive for `keep_alive_s`.
    pub fn new(keep_alive_s: f64) -> Self {
        Fixed { keep_alive_s }
    }
}

impl KeepAlive for Fixed {
    fn arrival(&mut self, _at: f64, _idle_since: Option<f64>) {}

    fn window(&mut self, _at: f64) -> Window {
        Window::keep(self.keep_alive_s)
    }

    fn explain(&self) -> Explanation {
        Explanation {
            rule: "fixed".into(),
            keep_alive_s: self.keep_alive_s,
            ..Explanation::default()
        }
    }
}

/// The nearest-rank `q`-quantile (0..=1) of sorted `values`.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_warm_inside_and_wastes_only_what_it_overlaps() {
        let w = Window {
            prewarm_s: 50.0,
            keep_alive_s: 20.0,
        };
        assert!(!w.warm_at(10.0));
        assert!(w.warm_at(50.0) && w.warm_at(60.0) && w.warm_at(70.0));
        assert!(!w.warm_at(71.0));
        assert_eq!(w.waste(10.0), 0.0);
        assert_eq!(w.waste(60.0), 10.0);
        assert_eq!(w.waste(1000.0), 20.0);
        assert_eq!(Window::keep(600.0).waste(30.0), 30.0);
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 0.5), Some(2.0));
        assert_eq!(quantile(&v, 0.75), Some(3.0));
        assert_eq!(quantile(&v, 1.0), Some(4.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
