//! The hybrid-histogram keep-alive policy of Shahrad et al., "Serverless in
//! the Wild: Characterizing and Optimizing the Serverless Workload at a
//! Large Cloud Provider" (USENIX ATC 2020, section 4.2), implemented as
//! published, as the baseline that Tandem's own policy is measured against.
//!
//! Per application, idle times (from the end of one execution to the start
//! of the next) go into a histogram of 1-minute bins covering 4 hours.
//! - While the histogram is *representative* (the coefficient of variation
//!   of its bin counts is at least 2), the pre-warming window is the 5th
//!   percentile of idle time minus a 10% margin, and the instance is kept
//!   loaded until the 99th percentile plus 10%. Percentiles of a histogram
//!   are bin edges: the head is the lower edge of the bin where the
//!   cumulative count reaches 5%, the tail the upper edge of the bin where
//!   it reaches 99%. A head in the first bin means no pre-warm: the
//!   instance is not unloaded after the execution.
//! - While it is not (too few idle times, or spread evenly), it falls back
//!   to a standard keep-alive: no pre-warm, keep-alive for the histogram's
//!   range (4 hours).
//! - When most idle times fall outside the range (the paper's
//!   "out-of-bounds" applications), the paper forecasts the next idle time
//!   with ARIMA and pre-warms at the forecast minus 15%, keeping the
//!   instance for 15% either side. The paper does not give the ARIMA order;
//!   we fit an AR(1) to the logarithms of the last out-of-bounds idle times
//!   by least squares (an ARIMA(1,0,0)), which forecasts a constant for
//!   timers and the recent level otherwise.

use super::{Explanation, KeepAlive, Window};

/// Bins of one minute.
const BIN_S: f64 = 60.0;
/// Four hours of bins.
const BINS: usize = 240;
/// The head and tail percentiles.
const HEAD: f64 = 0.05;
const TAIL: f64 = 0.99;
/// Margins on head and tail.
const MARGIN: f64 = 0.10;
/// Bin-count CV from which the histogram is representative.
const CV_THRESHOLD: f64 = 2.0;
/// ARIMA's margin either side of the forecast.
const ARIMA_MARGIN: f64 = 0.15;
/// Out-of-bounds idle times kept for the forecast.
const OOB_HISTORY: usize = 20;

/// The policy's state for one application.
#[derive(Debug, Clone)]
pub struct HybridHistogram {
    bins: Vec<u64>,
    in_range: u64,
    out_of_bounds: Vec<f64>,
    out_of_bounds_count: u64,
    last: Explanation,
}

impl Default for HybridHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl HybridHistogram {
    /// An application with no history.
    pub fn new() -> Self {
        HybridHistogram {
            bins: vec![0; BINS],
            in_range: 0,
            out_of_bounds: Vec::new(),
            out_of_bounds_count: 0,
            last: Explanation::default(),
        }
    }

    fn bin_count_cv(&self) -> f64 {
        let n = BINS as f64;
        let mean = self.in_range as f64 / n;
        if mean == 0.0 {
            return 0.0;
        }
        let variance = self
            .bins
            .iter()
            .map(|&c| (c as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        variance.sqrt() / mean
    }

    /// The bin where the cumulative count first reaches `share`.
    fn percentile_bin(&self, share: f64) -> usize {
        let wanted = (share * self.in_range as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bin, &count) in self.bins.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return bin;
            }
        }
        BINS - 1
    }

    fn forecast_oob(&self) -> Option<f64> {
        let logs: Vec<f64> = self.out_of_bounds.iter().map(|it| it.ln()).collect();
        let last = *logs.last()?;
        if logs.len() < 3 {
            return Some(last.exp());
        }
        // AR(1) around the mean: x[t+1] - m = phi (x[t] - m).
        let mean = logs.iter().sum::<f64>() / logs.len() as f64;
        let (mut num, mut den) = (0.0, 0.0);
        for pair in logs.windows(2) {
            num += (pair[0] - mean) * (pair[1] - mean);
            den += (pair[0] - mean).powi(2);
        }
        let phi = if den > 0.0 {
            (num / den).clamp(-1.0, 1.0)
        } else {
            0.0
        };
        Some((mean + phi * (last - mean)).exp())
    }
}

impl KeepAlive for HybridHistogram {
    fn arrival(&mut self, at: f64, idle_since: Option<f64>) {
        let Some(since) = idle_since else { return };
        let idle = (at - since).max(0.0);
        let bin = (idle / BIN_S).floor() as usize;
        if bin < BINS {
            self.bins[bin] += 1;
            self.in_range += 1;
        } else {
            self.out_of_bounds_count += 1;
            self.out_of_bounds.push(idle);
            if self.out_of_bounds.len() > OOB_HISTORY {
                self.out_of_bounds.remove(0);
            }
        }
    }

    fn window(&mut self, _at: f64) -> Window {
        let total = self.in_range + self.out_of_bounds_count;
        let samples = total as usize;
        let (rule, window) = if self.out_of_bounds_count * 2 > total
            && let Some(forecast) = self.forecast_oob()
        {
            (
                "arima",
                Window {
                    prewarm_s: forecast * (1.0 - ARIMA_MARGIN),
                    keep_alive_s: forecast * 2.0 * ARIMA_MARGIN,
                },
            )
        } else if self.bin_count_cv() >= CV_THRESHOLD {
            let head = self.percentile_bin(HEAD) as f64 * BIN_S;
            let tail = (self.percentile_bin(TAIL) + 1) as f64 * BIN_S;
            let prewarm = head * (1.0 - MARGIN);
            let end = tail * (1.0 + MARGIN);
            (
                "histogram",
                Window {
                    prewarm_s: prewarm,
                    keep_alive_s: end - prewarm,
                },
            )
        } else {
            ("standard", Window::keep(BINS as f64 * BIN_S))
        };
        self.last = Explanation {
            rule: rule.into(),
            samples,
            median_idle_s: (self.in_range > 0)
                .then(|| (self.percentile_bin(0.5) as f64 + 0.5) * BIN_S),
            p99_idle_s: (self.in_range > 0).then(|| (self.percentile_bin(TAIL) + 1) as f64 * BIN_S),
            period_s: None,
            next_arrival_at: None,
            prewarm_s: window.prewarm_s,
            keep_alive_s: window.keep_alive_s,
        };
        window
    }

    fn explain(&self) -> Explanation {
        self.last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(idle_minutes: &[f64]) -> HybridHistogram {
        let mut policy = HybridHistogram::new();
        let mut t = 0.0;
        for &minutes in idle_minutes {
            let next = t + minutes * 60.0;
            policy.arrival(next, Some(t));
            t = next;
        }
        policy
    }

    #[test]
    fn without_history_it_keeps_alive_for_the_range() {
        let mut policy = HybridHistogram::new();
        assert_eq!(policy.window(0.0), Window::keep(4.0 * 3600.0));
        assert_eq!(policy.explain().rule, "standard");
    }

    #[test]
    fn a_concentrated_histogram_prewarms_at_the_head_and_keeps_to_the_tail() {
        // Idle 10.5 minutes every time: all in bin 10.
        let mut policy = fed(&[10.5; 50]);
        let window = policy.window(0.0);
        assert_eq!(policy.explain().rule, "histogram");
        assert!((window.prewarm_s - 600.0 * 0.9).abs() < 1e-9, "{window:?}");
        assert!((window.end_s() - 660.0 * 1.1).abs() < 1e-9, "{window:?}");
    }

    #[test]
    fn a_head_in_the_first_bin_means_no_prewarm() {
        let mut idle = vec![0.2; 60];
        idle.extend([30.5; 2]);
        let mut policy = fed(&idle);
        let window = policy.window(0.0);
        assert_eq!(window.prewarm_s, 0.0);
        // 99% of 62 is the 62nd: the tail is bin 30's upper edge.
        assert!((window.end_s() - 31.0 * 60.0 * 1.1).abs() < 1e-9);
    }

    #[test]
    fn an_even_spread_is_not_representative() {
        let idle: Vec<f64> = (0..240).map(|m| m as f64 + 0.5).collect();
        let mut policy = fed(&idle);
        assert_eq!(policy.window(0.0), Window::keep(4.0 * 3600.0));
    }

    #[test]
    fn mostly_out_of_bounds_forecasts_the_next_idle_time() {
        // A daily timer: every idle time is 24 hours.
        let mut policy = fed(&[1440.0; 6]);
        let window = policy.window(0.0);
        assert_eq!(policy.explain().rule, "arima");
        let day = 86_400.0;
        assert!((window.prewarm_s - day * 0.85).abs() < 1.0, "{window:?}");
        assert!((window.end_s() - day * 1.15).abs() < 1.0, "{window:?}");
    }
}
