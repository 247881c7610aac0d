//! `scaleToZeroAfter: Auto`: the adaptive keep-alive policy
//! ([`crate::keepalive::adaptive`]) driven by what the gateways report.
//! Pure, time passed in (the autoscaler's clock).
//!
//! An *arrival* is the first report of activity (a request in flight, held
//! or started since the previous report) after the workload was idle; the
//! workload falls *idle* at the first report of none. Each idle period gets
//! a window from the policy: the replica may go to zero outside it (never
//! in the first [`MIN_IDLE`] of an idle period, the shortest fixed
//! `scaleToZeroAfter`, so bursts do not flap), and a Function at zero is
//! scaled up when the window opens (a pre-warm). The time requests wait at
//! zero, measured, becomes the cold-start estimate; a request still held
//! after a pre-warm measures the whole start, from the pre-warm on (the
//! pre-warm came that much too late). The estimate follows a slower start
//! at once and a faster one by halves, and pre-warms lead by twice it:
//! starts vary with the node's load, and starting early costs seconds of
//! an idle replica where starting late costs a cold request.

use std::time::Duration;

use crate::keepalive::adaptive::{Adaptive, AdaptiveConfig};
use crate::keepalive::{Explanation, KeepAlive, Window};

/// No replica goes to zero earlier in an idle period than this.
pub const MIN_IDLE: Duration = Duration::from_secs(10);
/// The cold-start estimate before one was measured.
pub const INITIAL_COLD_START: Duration = Duration::from_secs(3);
/// No start is counted as longer than this (a replica that never became
/// ready is not a cold start to plan for).
pub const MAX_COLD_START: Duration = Duration::from_secs(60);

/// What the learned keep-alive says at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Requests are active.
    Busy,
    /// Idle, inside the window: keep (or start) a replica.
    Loaded,
    /// Idle, outside the window: zero is allowed.
    Unloaded,
}

/// The learned keep-alive of one workload.
#[derive(Debug, Clone)]
pub struct Learned {
    policy: Adaptive,
    max: Duration,
    busy: bool,
    idle_since: Option<Duration>,
    window: Option<(Duration, Window)>,
    held_since: Option<Duration>,
    cold_start: Duration,
}

fn secs(at: Duration) -> f64 {
    at.as_secs_f64()
}

fn config(max: Duration, cold_start: Duration) -> AdaptiveConfig {
    AdaptiveConfig {
        max_keep_alive_s: secs(max),
        cold_start_s: 2.0 * secs(cold_start),
        ..AdaptiveConfig::default()
    }
}

impl Learned {
    /// Nothing learned yet; no idle replica kept longer than `max`.
    pub fn new(max: Duration) -> Self {
        Learned {
            policy: Adaptive::new(config(max, INITIAL_COLD_START)),
            max,
            busy: false,
            idle_since: None,
            window: None,
            held_since: None,
            cold_start: INITIAL_COLD_START,
        }
    }

    /// The maximum changed (the spec did): keep what was learned.
    pub fn set_max(&mut self, max: Duration) {
        if max != self.max {
            self.max = max;
            self.policy.configure(config(max, self.cold_start));
        }
    }

    /// The measured cold start (see the module docs).
    pub fn cold_start(&self) -> Duration {
        self.cold_start
    }

    /// What the gateways reported at `now`: `active` when any request was
    /// in flight, held or started; `held` when any is held.
    pub fn observe(&mut self, now: Duration, active: bool, held: bool) {
        if held {
            if self.held_since.is_none() {
                // Held inside an opened pre-warm window: the start began
                // when the window opened.
                let prewarmed = self.window().filter(|&(opens, _)| {
                    opens <= now && self.window.is_some_and(|(_, w)| w.prewarm_s > 0.0)
                });
                self.held_since = Some(prewarmed.map_or(now, |(opens, _)| opens));
            }
        } else if let Some(since) = self.held_since.take() {
            let took = now.saturating_sub(since).min(MAX_COLD_START);
            self.cold_start = took.max((self.cold_start + took) / 2);
            self.policy.configure(config(self.max, self.cold_start));
        }
        if active && !self.busy {
            self.busy = true;
            self.window = None;
            self.policy.arrival(secs(now), self.idle_since.map(secs));
        } else if !active && self.busy {
            self.busy = false;
            self.idle_since = Some(now);
            self.window = Some((now, self.policy.window(secs(now))));
        }
    }

    /// Whether a replica should be loaded at `now`.
    pub fn verdict(&mut self, now: Duration) -> Verdict {
        if self.busy {
            return Verdict::Busy;
        }
        // Bounded: a policy stops returning windows after a few misses.
        for _ in 0..16 {
            let Some((from, window)) = self.window else {
                return Verdict::Unloaded;
            };
            let idle = secs(now.saturating_sub(from));
            if idle <= window.end_s() {
                return if idle >= window.prewarm_s {
                    Verdict::Loaded
                } else {
                    Verdict::Unloaded
                };
            }
            let closed = from + Duration::from_secs_f64(window.end_s());
            self.window = self.policy.missed(secs(closed)).map(|next| (closed, next));
        }
        Verdict::Unloaded
    }

    /// When the current window opens and closes (autoscaler clock).
    pub fn window(&self) -> Option<(Duration, Duration)> {
        self.window.map(|(from, w)| {
            (
                from + Duration::from_secs_f64(w.prewarm_s),
                from + Duration::from_secs_f64(w.end_s()),
            )
        })
    }

    /// What the policy decided from.
    pub fn explain(&self) -> Explanation {
        self.policy.explain()
    }

    /// A sentence for status and Events, at `now`.
    pub fn describe(&self, now: Duration) -> String {
        let e = self.explain();
        let mut text = format!("keep-alive Auto ({}", e.rule);
        if let Some(period) = e.period_s {
            text.push_str(&format!(", every {period:.0}s"));
        }
        if let Some(median) = e.median_idle_s {
            text.push_str(&format!(", median idle {median:.0}s"));
        }
        text.push_str(&format!(", {} idle times", e.samples));
        if let Some((opens, closes)) = self.window() {
            let rel = |at: Duration| at.as_secs_f64() - now.as_secs_f64();
            text.push_str(&format!(
                "; warm from {:+.0}s to {:+.0}s",
                rel(opens),
                rel(closes)
            ));
        }
        if let Some(next) = e.next_arrival_at {
            text.push_str(&format!(
                "; next request expected in {:.0}s",
                next - now.as_secs_f64()
            ));
        }
        text.push_str(&format!(
            "; cold start {:.1}s)",
            self.cold_start.as_secs_f64()
        ));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `learned` with a short request every `period` for `beats`
    /// beats (reported once a second, as the gateways do), and returns
    /// the verdicts of each second.
    fn drive(learned: &mut Learned, period: u64, beats: u64) -> Vec<(u64, Verdict)> {
        let mut verdicts = Vec::new();
        for t in 0..period * beats {
            let active = t % period == 0;
            learned.observe(Duration::from_secs(t), active, false);
            verdicts.push((t, learned.verdict(Duration::from_secs(t))));
        }
        verdicts
    }

    #[test]
    fn a_timer_is_loaded_before_each_beat_and_unloaded_between_after_learning() {
        let mut learned = Learned::new(Duration::from_secs(4 * 3600));
        let verdicts = drive(&mut learned, 60, 12);
        // After learning (6 beats), the second before each beat is loaded
        // (twice the cold start, 3 s, is part of the lead) and the middle of the
        // period unloaded.
        for beat in 6..12 {
            let before = beat * 60 - 1;
            assert_eq!(verdicts[before as usize].1, Verdict::Loaded, "{before}");
            assert_eq!(
                verdicts[(before - 3) as usize].1,
                Verdict::Loaded,
                "{before}"
            );
            assert_eq!(verdicts[(beat * 60 - 30) as usize].1, Verdict::Unloaded);
        }
        assert_eq!(learned.explain().rule, "periodic");
        assert!(
            learned
                .describe(Duration::from_secs(720))
                .contains("every 60s")
        );
    }

    #[test]
    fn a_stopped_timer_goes_to_zero_and_stays_there() {
        let mut learned = Learned::new(Duration::from_secs(4 * 3600));
        drive(&mut learned, 30, 10);
        // No more requests: a few pre-warms for skipped beats, then none.
        let loaded: Vec<u64> = (300..3000)
            .filter(|&t| {
                learned.observe(Duration::from_secs(t), false, false);
                learned.verdict(Duration::from_secs(t)) == Verdict::Loaded
            })
            .collect();
        assert!(loaded.iter().all(|&t| t < 300 + 4 * 30), "{loaded:?}");
    }

    #[test]
    fn the_wait_at_zero_becomes_the_cold_start_estimate() {
        let mut learned = Learned::new(Duration::from_secs(3600));
        // Slower than the estimate: followed at once.
        learned.observe(Duration::from_secs(0), true, true);
        learned.observe(Duration::from_secs(7), true, false);
        assert_eq!(learned.cold_start(), Duration::from_secs(7));
        // Faster: by halves.
        learned.observe(Duration::from_secs(100), true, true);
        learned.observe(Duration::from_secs(101), true, false);
        assert_eq!(learned.cold_start(), Duration::from_secs(4));
    }

    #[test]
    fn a_request_held_after_a_late_prewarm_counts_the_start_from_the_prewarm() {
        let mut learned = Learned::new(Duration::from_secs(4 * 3600));
        drive(&mut learned, 60, 8);
        let t = |s: u64| Duration::from_secs(s);
        // Idle after the last beat (at 420 s); the next is due at 480 s.
        learned.observe(t(421), false, false);
        let (opens, _) = learned.window().expect("a pre-warm window");
        assert!(opens > t(421) && opens < t(480), "{opens:?}");
        assert_eq!(learned.verdict(t(479)), Verdict::Loaded);
        // The pre-warm did not make it: the request waits 5 s.
        learned.observe(t(480), true, true);
        learned.observe(t(485), true, false);
        assert_eq!(learned.cold_start(), t(485) - opens);
        // So the next pre-warm opens earlier before its beat.
        learned.observe(t(486), false, false);
        let (next_opens, _) = learned.window().unwrap();
        assert!(t(540) - next_opens > t(480) - opens, "{next_opens:?}");
    }
}
