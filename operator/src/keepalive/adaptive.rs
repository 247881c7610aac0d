//! Tandem's adaptive keep-alive policy.
//!
//! It learns from two things a workload shows: when its invocations arrive,
//! and how long it stays idle between them. Each time the workload falls
//! idle it picks one [`Window`], by the first rule that applies:
//!
//! 1. **Timer-like arrivals** (about a third of applications in the Azure
//!    trace are driven by timers). If most of the recent intervals between
//!    arrivals sit within a small tolerance of their median, or of a whole
//!    multiple of it (a beat that was skipped), the next arrival is expected
//!    one period after the last. The instance is unloaded at once, loaded
//!    again `margin + cold start` before the expected arrival, and kept a
//!    `margin` after it, where the margin follows the observed jitter.
//!    A histogram with minute bins cannot do this: it keeps the instance
//!    loaded for most of the minute around every beat, and more for long
//!    periods, where the hybrid policy's forecast keeps it for 30% of the
//!    period.
//! 2. **Learning**: with fewer than [`LEARN_AFTER`] idle times, keep the
//!    instance for twice the longest idle time seen, at least
//!    [`LEARNING_KEEP_ALIVE_S`]; when every idle time seen is over half the
//!    maximum, expect the last one again instead (pre-warm at 85% of it, keep to
//!    115%), which catches a slow timer on its second interval.
//! 3. **Priced idle time**: otherwise the window is the one that minimises,
//!    over the recent idle times `x` (the last [`HISTORY`]), the expected
//!    cost of one idle period
//!    `P(cold) + E[loaded idle time] / worth`,
//!    where `worth` is the idle instance time one cold start is worth
//!    (configured). With the window
//!    `[a, b]` (pre-warm `a`, unloaded at `b`), `P(cold) = P(x < a) +
//!    P(x > b)` and the loaded idle time is `min(x, b) - min(x, a)`, so the
//!    cost separates into a term in `b` and a term in `a`, each minimised by
//!    one pass over the sorted idle times (candidates: each idle time with a
//!    30% margin, and 90% of it for the pre-warm, which also counts one
//!    unseen shorter idle time so that a handful of samples never makes a
//!    pre-warm look free). This recognises bursts without a special case: the short
//!    gaps inside a burst are covered, and a long gap between bursts is
//!    covered only when it is cheap enough to wait for. It also adapts to
//!    change: only recent idle times count.
//!
//! When a timer's beat does not come, the next [`MISSES`] beats are
//! pre-warmed for too (timers skip beats); after that the instance stays
//! at zero until an invocation arrives. Every window is clipped to the
//! configured maximum keep-alive: a workload that stops being called goes
//! to zero and stays there.

use std::collections::VecDeque;

use super::{Explanation, KeepAlive, Window, quantile};

/// Idle times learned from.
pub const HISTORY: usize = 256;
/// Idle times needed before the priced rule applies.
pub const LEARN_AFTER: usize = 5;
/// Shortest keep-alive while learning.
pub const LEARNING_KEEP_ALIVE_S: f64 = 600.0;
/// Intervals between arrivals examined for a period.
const PERIOD_HISTORY: usize = 16;
/// Intervals needed to call arrivals timer-like.
const PERIOD_MIN: usize = 3;
/// Beats pre-warmed for after the last arrival before giving up.
const MISSES: u32 = 2;
/// Share of recent intervals that must fit the period.
const PERIOD_FIT: f64 = 0.75;

/// How the policy trades cold starts against idle time.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    /// No window keeps an instance loaded longer than this.
    pub max_keep_alive_s: f64,
    /// Time from scaling up to serving (measured); pre-warms start this
    /// much before the window opens. `tandem plan` uses 0, as the model
    /// of the paper does (loading is instant).
    pub cold_start_s: f64,
    /// Instance time loaded and idle that one cold start is worth: a
    /// window is widened while each cold start it avoids costs less idle
    /// time than this.
    pub cold_start_worth_s: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            max_keep_alive_s: 4.0 * 3600.0,
            cold_start_s: 0.0,
            cold_start_worth_s: 8.0 * 3600.0,
        }
    }
}

/// The policy's state for one workload.
#[derive(Debug, Clone)]
pub struct Adaptive {
    config: AdaptiveConfig,
    arrivals: VecDeque<f64>,
    idle: VecDeque<f64>,
    /// Sorted copy of `idle` and its prefix sums, rebuilt when stale.
    sorted: Vec<f64>,
    prefix: Vec<f64>,
    stale: usize,
    priced: Option<(f64, f64)>,
    misses: u32,
    last: Explanation,
}

/// A recognised period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Period {
    /// Median interval between arrivals.
    pub period_s: f64,
    /// Median distance of an interval from the period (or its multiple).
    pub jitter_s: f64,
}

impl Adaptive {
    /// A workload with no history.
    pub fn new(config: AdaptiveConfig) -> Self {
        Adaptive {
            config,
            arrivals: VecDeque::new(),
            idle: VecDeque::new(),
            sorted: Vec::new(),
            prefix: Vec::new(),
            stale: 0,
            priced: None,
            misses: 0,
            last: Explanation::default(),
        }
    }

    /// Changes the configuration, keeping what was learned.
    pub fn configure(&mut self, config: AdaptiveConfig) {
        self.config = config;
        self.priced = None;
    }

    /// The period of the recent arrivals, if they are timer-like.
    pub fn period(&self) -> Option<Period> {
        if self.arrivals.len() < PERIOD_MIN + 1 {
            return None;
        }
        let intervals: Vec<f64> = self
            .arrivals
            .iter()
            .zip(self.arrivals.iter().skip(1))
            .map(|(a, b)| b - a)
            .collect();
        let mut sorted = intervals.clone();
        sorted.sort_by(f64::total_cmp);
        let period = quantile(&sorted, 0.5)?;
        if period < 1.0 {
            return None;
        }
        let distance = |interval: f64| {
            let beats = (interval / period).round().max(1.0);
            (interval - beats * period).abs()
        };
        let mut distances: Vec<f64> = intervals.iter().map(|&i| distance(i)).collect();
        distances.sort_by(f64::total_cmp);
        let jitter = quantile(&distances, 0.5)?;
        // 1.5 s: arrivals reach the autoscaler with its stats, a second apart.
        let tolerance = (0.02 * period).max(1.5);
        if 4.0 * tolerance > period {
            // Too short to tell beats from multiples of beats.
            return None;
        }
        let fitting = intervals
            .iter()
            .filter(|&&i| distance(i) <= tolerance)
            .count();
        // The most recent interval must fit too: a timer that stopped or
        // changed is not pre-warmed for.
        let recent_fits = intervals.last().is_some_and(|&i| distance(i) <= tolerance);
        let needed = if intervals.len() < 2 * PERIOD_MIN {
            intervals.len() as f64
        } else {
            PERIOD_FIT * intervals.len() as f64
        };
        (recent_fits && fitting as f64 >= needed).then_some(Period {
            period_s: period,
            jitter_s: jitter,
        })
    }

    /// Rebuilds the sorted copy when `arrival` marked it stale (emptied it).
    fn refresh(&mut self) {
        if !self.sorted.is_empty() || self.idle.is_empty() {
            return;
        }
        self.sorted = self.idle.iter().copied().collect();
        self.sorted.sort_by(f64::total_cmp);
        self.prefix = std::iter::once(0.0)
            .chain(self.sorted.iter().scan(0.0, |sum, x| {
                *sum += x;
                Some(*sum)
            }))
            .collect();
        self.stale = 0;
        self.priced = None;
    }

    /// Samples at most `x` and their sum.
    fn at_most(&self, x: f64) -> (usize, f64) {
        let count = self.sorted.partition_point(|&v| v <= x);
        (count, self.prefix[count])
    }

    /// Samples below `x` and their sum.
    fn below(&self, x: f64) -> (usize, f64) {
        let count = self.sorted.partition_point(|&v| v < x);
        (count, self.prefix[count])
    }

    /// The priced window `(a, b)`.
    fn priced(&mut self) -> (f64, f64) {
        self.refresh();
        if let Some(window) = self.priced {
            return window;
        }
        let n = self.sorted.len() as f64;
        let price = 1.0 / self.config.cold_start_worth_s.max(1e-3);
        let max = self.config.max_keep_alive_s;
        // E[min(x, t)] over the samples.
        let clipped_mean = |count: usize, sum: f64, t: f64| (sum + (n - count as f64) * t) / n;
        let candidates =
            || std::iter::once(0.0).chain(self.sorted.iter().map(|&x| (x * 1.3 + 1.0).min(max)));
        let mut best_end = (0.0, f64::INFINITY);
        for b in candidates() {
            let (count, sum) = self.at_most(b);
            let cost = -(count as f64 / n) + price * clipped_mean(count, sum, b);
            if cost < best_end.1 - 1e-12 {
                best_end = (b, cost);
            }
        }
        let end = best_end.0;
        let mut best_start = (0.0, 0.0f64);
        for a in self.sorted.iter().map(|&x| x * 0.9) {
            if a >= end {
                break;
            }
            // A shorter idle time than any seen is always possible: count
            // one more below `a` (Laplace), so a pre-warm is chosen only
            // when what it saves outweighs that risk, not just because no
            // sample happened to fall below it.
            let (count, sum) = self.below(a);
            let cost = (count + 1) as f64 / (n + 1.0) - price * clipped_mean(count, sum, a);
            if cost < best_start.1 - 1e-12 {
                best_start = (a, cost);
            }
        }
        let window = (best_start.0, end);
        self.priced = Some(window);
        window
    }
}

impl Adaptive {
    /// The window for the next beat after `at`, if arrivals are timer-like:
    /// with the period and the expected arrival.
    fn beat_after(&self, at: f64) -> Option<(Window, Period, f64)> {
        let period = self.period()?;
        let last = *self.arrivals.back()?;
        let margin = (4.0 * period.jitter_s)
            .max(0.005 * period.period_s)
            .max(1.0);
        let mut next = last + period.period_s;
        while next + margin <= at {
            next += period.period_s;
        }
        let opens = next - margin - self.config.cold_start_s;
        let closes = next + margin;
        let max = self.config.max_keep_alive_s;
        let window = if opens - at <= self.config.cold_start_s + 1.0 {
            Window::keep((closes - at).min(max))
        } else {
            Window {
                prewarm_s: opens - at,
                keep_alive_s: (closes - opens).min(max),
            }
        };
        Some((window, period, next))
    }
}

impl KeepAlive for Adaptive {
    fn arrival(&mut self, at: f64, idle_since: Option<f64>) {
        self.arrivals.push_back(at);
        if self.arrivals.len() > PERIOD_HISTORY + 1 {
            self.arrivals.pop_front();
        }
        if let Some(since) = idle_since {
            self.idle.push_back((at - since).max(0.0));
            if self.idle.len() > HISTORY {
                self.idle.pop_front();
            }
            // Rebuild the sorted copy once 1/16 of it changed (until then
            // it is close enough, and rebuilding at every call would cost
            // a sort per invocation).
            self.stale += 1;
            if self.stale * 16 >= self.idle.len() {
                self.sorted.clear();
            }
        }
        self.misses = 0;
    }

    fn window(&mut self, at: f64) -> Window {
        let max = self.config.max_keep_alive_s;
        let mut explanation = Explanation {
            samples: self.idle.len(),
            ..Explanation::default()
        };
        let window = if let Some((window, period, next)) = self.beat_after(at) {
            explanation.rule = "periodic".into();
            explanation.period_s = Some(period.period_s);
            explanation.next_arrival_at = Some(next);
            window
        } else if self.idle.len() < LEARN_AFTER {
            explanation.rule = "learning".into();
            let longest = self.idle.iter().copied().fold(0.0, f64::max);
            match self.idle.back() {
                // Idle times too long to wait through: expect the last one
                // again, give or take 15% (a slow timer is caught on its
                // second interval).
                Some(&last)
                    if self.idle.iter().all(|&x| 2.0 * x > max)
                        && last * 0.85 > LEARNING_KEEP_ALIVE_S =>
                {
                    Window {
                        prewarm_s: last * 0.85,
                        keep_alive_s: (last * 0.3).min(max),
                    }
                }
                _ => Window::keep((2.0 * longest).max(LEARNING_KEEP_ALIVE_S).min(max)),
            }
        } else {
            explanation.rule = "priced".into();
            let (a, b) = self.priced();
            let prewarm = (a - self.config.cold_start_s).max(0.0);
            if prewarm <= self.config.cold_start_s + 1.0 {
                Window::keep(b.min(max))
            } else {
                Window {
                    prewarm_s: prewarm,
                    keep_alive_s: (b - prewarm).min(max),
                }
            }
        };
        if !self.idle.is_empty() {
            self.refresh();
            explanation.median_idle_s = quantile(&self.sorted, 0.5);
            explanation.p99_idle_s = quantile(&self.sorted, 0.99);
        }
        explanation.prewarm_s = window.prewarm_s;
        explanation.keep_alive_s = window.keep_alive_s;
        self.last = explanation;
        window
    }

    fn missed(&mut self, at: f64) -> Option<Window> {
        // A timer's beat that did not come: pre-warm for the next one, a
        // few times, then stay at zero until an arrival.
        if self.misses >= MISSES {
            return None;
        }
        let (window, _, next) = self.beat_after(at)?;
        self.misses += 1;
        self.last.next_arrival_at = Some(next);
        self.last.prewarm_s = window.prewarm_s;
        self.last.keep_alive_s = window.keep_alive_s;
        Some(window)
    }

    fn explain(&self) -> Explanation {
        self.last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Adaptive {
        Adaptive::new(AdaptiveConfig::default())
    }

    /// Feeds invocations at `starts`, each busy for `busy` seconds, and
    /// returns whether each found an instance loaded.
    fn replay(policy: &mut Adaptive, starts: &[f64], busy: f64) -> Vec<bool> {
        replay_with_waste(policy, starts, busy).0
    }

    /// [`replay`], with the idle time loaded from the 13th arrival on.
    fn replay_with_waste(policy: &mut Adaptive, starts: &[f64], busy: f64) -> (Vec<bool>, f64) {
        let mut idle_from: Option<f64> = None;
        let mut warm = Vec::new();
        let mut waste = 0.0;
        for (i, &start) in starts.iter().enumerate() {
            let was_warm = match idle_from {
                Some(from) => {
                    let (loaded, was_warm) =
                        crate::keepalive::simulate::idle_period(policy, from, start);
                    if i >= 12 {
                        waste += loaded;
                    }
                    was_warm
                }
                None => false,
            };
            warm.push(was_warm);
            policy.arrival(start, idle_from);
            idle_from = Some(start + busy);
        }
        (warm, waste)
    }

    #[test]
    fn a_timer_is_prewarmed_just_before_each_beat_after_learning() {
        let mut p = policy();
        let starts: Vec<f64> = (0..40).map(|i| 1000.0 + 300.0 * f64::from(i)).collect();
        let warm = replay(&mut p, &starts, 0.5);
        assert!(warm[10..].iter().all(|&w| w), "{warm:?}");
        let w = p.window(starts[39] + 0.5);
        assert_eq!(p.explain().rule, "periodic");
        // Unloaded nearly all the period, loaded a few seconds around the beat.
        assert!(w.prewarm_s > 290.0 && w.keep_alive_s < 5.0, "{w:?}");
    }

    #[test]
    fn a_prewarm_starts_a_cold_start_early() {
        let mut p = Adaptive::new(AdaptiveConfig {
            cold_start_s: 8.0,
            ..AdaptiveConfig::default()
        });
        let starts: Vec<f64> = (0..20).map(|i| 60.0 * f64::from(i)).collect();
        replay(&mut p, &starts, 0.1);
        let w = p.window(starts[19] + 0.1);
        // The beat is at 60 s after the last arrival: loading starts by 51 s.
        assert!(w.prewarm_s <= 60.0 - 0.1 - 8.0 - 1.0 + 1e-9, "{w:?}");
        assert!(w.warm_at(60.0 - 0.1 - 8.0 + 8.0));
    }

    #[test]
    fn a_skipped_beat_does_not_break_the_period() {
        let mut p = policy();
        let mut starts: Vec<f64> = (0..30).map(|i| 120.0 * f64::from(i)).collect();
        starts.remove(20);
        let warm = replay(&mut p, &starts, 0.2);
        assert!(warm[21..].iter().all(|&w| w), "{warm:?}");
    }

    #[test]
    fn bursts_keep_the_short_gaps_and_give_up_the_long_ones() {
        let mut p = policy();
        let mut starts = Vec::new();
        // Bursts of 20 calls 1 to 9 s apart, every 6 to 10 hours.
        let mut t = 0.0;
        for burst in 0..12 {
            let mut at = t;
            for i in 0..20 {
                starts.push(at);
                at += 1.0 + f64::from((i * 7 + burst) % 9);
            }
            t += 6.0 * 3600.0 + f64::from(burst % 5) * 3600.0;
        }
        let warm = replay(&mut p, &starts, 0.3);
        let w = p.window(*starts.last().unwrap() + 0.3);
        assert_eq!(p.explain().rule, "priced");
        assert!(w.keep_alive_s < 60.0, "{w:?}");
        let late: Vec<bool> = warm[100..].to_vec();
        let warm_share = late.iter().filter(|&&w| w).count() as f64 / late.len() as f64;
        assert!(warm_share > 0.9, "{warm_share}");
    }

    #[test]
    fn a_workload_that_stops_goes_to_zero_and_stays_there() {
        let mut p = policy();
        let starts: Vec<f64> = (0..50).map(|i| 30.0 * f64::from(i)).collect();
        replay(&mut p, &starts, 0.1);
        // The last call: the window is finite, and nothing reloads after it.
        let w = p.window(starts[49] + 0.1);
        assert!(w.end_s().is_finite() && w.end_s() < 4.0 * 3600.0);
        assert!(!w.warm_at(w.end_s() + 1.0));
    }

    proptest::proptest! {
        /// Whatever the arrivals, no window keeps an instance loaded longer
        /// than the maximum, windows are well formed, and after the last
        /// arrival at most `MISSES` more windows open.
        #[test]
        fn no_window_passes_the_maximum_and_a_stopped_workload_stays_at_zero(
            gaps in proptest::collection::vec(0.0f64..20_000.0, 1..200),
            busy in 0.0f64..30.0,
            max in 60.0f64..20_000.0,
            cold_start in 0.0f64..20.0,
        ) {
            let mut p = Adaptive::new(AdaptiveConfig {
                max_keep_alive_s: max,
                cold_start_s: cold_start,
                ..AdaptiveConfig::default()
            });
            let mut t = 0.0;
            let mut idle_since = None;
            for gap in gaps {
                t += gap;
                p.arrival(t, idle_since);
                let w = p.window(t + busy);
                proptest::prop_assert!(w.keep_alive_s <= max + 1e-9, "{w:?} > {max}");
                proptest::prop_assert!(w.prewarm_s >= 0.0 && w.keep_alive_s >= 0.0, "{w:?}");
                proptest::prop_assert!(w.end_s().is_finite());
                t += busy;
                idle_since = Some(t);
            }
            let mut at = t + p.window(t).end_s();
            let mut more = 0;
            while let Some(w) = p.missed(at) {
                proptest::prop_assert!(w.keep_alive_s <= max + 1e-9);
                at += w.end_s();
                more += 1;
                proptest::prop_assert!(more <= MISSES, "windows keep opening");
            }
        }

        /// A timer with jitter and skipped beats, at any period from a minute
        /// to a day, is warm on every beat after learning whose lateness,
        /// and its predecessor's, stay within the 1 s margin (the jitter is
        /// half-normal, so now and then a beat comes more than a second
        /// late: that one may be cold), and loaded for a small share of the
        /// time.
        #[test]
        fn a_timer_is_warm_after_learning_at_any_period(
            period in 60.0f64..86_400.0,
            seed in 0u64..1000,
        ) {
            let mut rng = crate::keepalive::rng::Rng::new(seed);
            let mut starts = Vec::new();
            let mut late = Vec::new();
            for beat in 0..60 {
                if rng.uniform() > 0.03 {
                    let jitter = 0.3 * rng.normal().abs();
                    starts.push(f64::from(beat) * period + jitter);
                    late.push(jitter);
                }
            }
            let (warm, waste) = replay_with_waste(&mut policy(), &starts, 0.5);
            let cold_late = (12..warm.len())
                .filter(|&i| !warm[i] && late[i] <= 0.8 && late[i - 1] <= 0.8)
                .count();
            proptest::prop_assert_eq!(cold_late, 0, "period {}: {:?} late {:?}", period, warm, late);
            // Outliers are rare: never more than two cold beats after learning.
            proptest::prop_assert!(warm[12..].iter().filter(|&&w| !w).count() <= 2, "{:?}", warm);
            let span = starts.last().unwrap() - starts[12];
            proptest::prop_assert!(waste < 0.05 * span, "{} loaded idle over {}", waste, span);
        }
    }
}
