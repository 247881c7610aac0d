//! Replays a trace through keep-alive policies, as `tandem plan` does.
//!
//! The model is the one of Shahrad et al.: one instance per workload; an
//! invocation is cold when no instance is loaded at its arrival (loading is
//! instant), warm otherwise, and one that arrives while another is running
//! is warm. Wasted time is instance time loaded while no invocation runs.

use super::adaptive::{Adaptive, AdaptiveConfig};
use super::hybrid::HybridHistogram;
use super::trace::{Invocation, Trace};
use super::{Fixed, KeepAlive, quantile};

/// One workload's replay.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outcome {
    /// Invocations.
    pub invocations: u64,
    /// Of which cold.
    pub cold: u64,
    /// Instance seconds loaded and idle.
    pub waste_s: f64,
    /// Seconds with at least one invocation running.
    pub busy_s: f64,
}

impl Outcome {
    /// Cold invocations, percent.
    pub fn cold_pct(&self) -> f64 {
        if self.invocations == 0 {
            0.0
        } else {
            100.0 * self.cold as f64 / self.invocations as f64
        }
    }
}

/// Replays one workload's invocations (in arrival order) through `policy`,
/// counting idle time until `end_s`.
pub fn simulate(calls: &[Invocation], policy: &mut dyn KeepAlive, end_s: f64) -> Outcome {
    let mut outcome = Outcome::default();
    let mut busy_until = f64::NEG_INFINITY;
    let mut busy_from = 0.0;
    let mut started = false;
    for call in calls {
        outcome.invocations += 1;
        if started && call.start_s < busy_until {
            policy.arrival(call.start_s, None);
        } else {
            if started {
                outcome.busy_s += busy_until - busy_from;
            }
            busy_from = call.start_s;
            let idle_since = if started {
                // The workload fell idle at `busy_until`: the policy decides
                // then, before it sees this arrival.
                let (waste, warm) = idle_period(policy, busy_until, call.start_s);
                if !warm {
                    outcome.cold += 1;
                }
                outcome.waste_s += waste;
                Some(busy_until)
            } else {
                outcome.cold += 1;
                started = true;
                None
            };
            policy.arrival(call.start_s, idle_since);
        }
        busy_until = busy_until.max(call.start_s + call.duration_s);
    }
    if started {
        outcome.busy_s += busy_until - busy_from;
        if end_s > busy_until {
            outcome.waste_s += idle_period(policy, busy_until, end_s).0;
        }
    }
    outcome
}

/// Most windows one idle period may chain ([`KeepAlive::missed`]).
const CHAINED_WINDOWS: usize = 64;

/// One idle period from `from` to `until`: the idle time loaded, and
/// whether an arrival at `until` is warm.
pub(crate) fn idle_period(policy: &mut dyn KeepAlive, from: f64, until: f64) -> (f64, bool) {
    let mut opened = from;
    let mut window = policy.window(from);
    let mut waste = 0.0;
    for _ in 0..CHAINED_WINDOWS {
        let idle = until - opened;
        waste += window.waste(idle);
        if idle <= window.end_s() {
            return (waste, window.warm_at(idle));
        }
        opened += window.end_s();
        match policy.missed(opened) {
            Some(next) => window = next,
            None => return (waste, false),
        }
    }
    (waste, false)
}

/// A policy to replay.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySpec {
    /// Fixed keep-alive, seconds.
    Fixed(f64),
    /// The hybrid histogram.
    Hybrid,
    /// Tandem's adaptive policy.
    Adaptive(AdaptiveConfig),
}

impl PolicySpec {
    /// Its name in tables.
    pub fn name(&self) -> String {
        match self {
            PolicySpec::Fixed(s) => format!("fixed-{}m", (s / 60.0).round()),
            PolicySpec::Hybrid => "hybrid-histogram".into(),
            PolicySpec::Adaptive(_) => "tandem-adaptive".into(),
        }
    }

    /// A fresh instance for one workload.
    pub fn build(&self) -> Box<dyn KeepAlive> {
        match self {
            PolicySpec::Fixed(s) => Box::new(Fixed::new(*s)),
            PolicySpec::Hybrid => Box::new(HybridHistogram::new()),
            PolicySpec::Adaptive(config) => Box::new(Adaptive::new(config.clone())),
        }
    }

    /// The policies `tandem plan` compares, the adaptive one with `config`.
    pub fn standard(config: AdaptiveConfig) -> Vec<PolicySpec> {
        vec![
            PolicySpec::Fixed(60.0),
            PolicySpec::Fixed(600.0),
            PolicySpec::Fixed(3600.0),
            PolicySpec::Hybrid,
            PolicySpec::Adaptive(config),
        ]
    }
}

/// One row of the plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    /// Policy.
    pub name: String,
    /// Per-workload cold-start percentage at the median workload.
    pub p50_cold_pct: f64,
    /// ... at the 75th percentile of workloads.
    pub p75_cold_pct: f64,
    /// ... at the 90th percentile of workloads.
    pub p90_cold_pct: f64,
    /// Cold invocations among all, percent.
    pub all_cold_pct: f64,
    /// Wasted warm time relative to the fixed 10-minute policy.
    pub waste_vs_fixed_10m: f64,
    /// Wasted warm time, instance hours.
    pub waste_hours: f64,
}

/// The plan: every policy replayed over every workload.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Plan {
    /// Workloads in the trace.
    pub workloads: usize,
    /// Invocations in the trace.
    pub invocations: usize,
    /// Span of the trace, days.
    pub days: f64,
    /// One row per policy.
    pub policies: Vec<Row>,
    /// Per workload (in trace order), each policy's outcome (in the order
    /// of `policies`).
    #[serde(skip)]
    pub per_workload: Vec<(String, Vec<Outcome>)>,
}

/// Replays `trace` through each of `policies` (a fixed 10-minute policy is
/// always replayed too, as the waste reference), policies in parallel.
pub fn plan(trace: &Trace, policies: &[PolicySpec]) -> Plan {
    let reference = PolicySpec::Fixed(600.0);
    let mut all: Vec<PolicySpec> = policies.to_vec();
    if !all.contains(&reference) {
        all.push(reference.clone());
    }
    let outcomes: Vec<Vec<Outcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = all
            .iter()
            .map(|spec| {
                scope.spawn(move || {
                    trace
                        .workloads
                        .iter()
                        .map(|(_, calls)| simulate(calls, spec.build().as_mut(), trace.end_s))
                        .collect::<Vec<Outcome>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a replay panicked"))
            .collect()
    });
    let waste = |outcomes: &[Outcome]| outcomes.iter().map(|o| o.waste_s).sum::<f64>();
    let reference_waste = all
        .iter()
        .position(|p| *p == reference)
        .map(|i| waste(&outcomes[i]))
        .unwrap_or(0.0);
    let rows = policies
        .iter()
        .map(|spec| {
            let i = all.iter().position(|p| p == spec).expect("replayed");
            let per = &outcomes[i];
            let mut cold: Vec<f64> = per.iter().map(Outcome::cold_pct).collect();
            cold.sort_by(f64::total_cmp);
            let invocations: u64 = per.iter().map(|o| o.invocations).sum();
            let colds: u64 = per.iter().map(|o| o.cold).sum();
            let round = |x: f64| (x * 1000.0).round() / 1000.0;
            Row {
                name: spec.name(),
                p50_cold_pct: round(quantile(&cold, 0.50).unwrap_or(0.0)),
                p75_cold_pct: round(quantile(&cold, 0.75).unwrap_or(0.0)),
                p90_cold_pct: round(quantile(&cold, 0.90).unwrap_or(0.0)),
                all_cold_pct: round(if invocations == 0 {
                    0.0
                } else {
                    100.0 * colds as f64 / invocations as f64
                }),
                waste_vs_fixed_10m: round(if reference_waste > 0.0 {
                    waste(per) / reference_waste
                } else {
                    0.0
                }),
                waste_hours: round(waste(per) / 3600.0),
            }
        })
        .collect();
    Plan {
        workloads: trace.workloads.len(),
        invocations: trace.invocations(),
        days: ((trace.end_s - trace.start_s) / 86_400.0 * 100.0).round() / 100.0,
        policies: rows,
        per_workload: trace
            .workloads
            .iter()
            .enumerate()
            .map(|(w, (name, _))| {
                let row = policies
                    .iter()
                    .map(|spec| outcomes[all.iter().position(|p| p == spec).expect("replayed")][w])
                    .collect();
                (name.clone(), row)
            })
            .collect(),
    }
}

impl Plan {
    /// The table for people.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} workloads, {} invocations over {} days\n\n{:<18} {:>10} {:>10} {:>10} {:>10} {:>18}\n",
            self.workloads,
            self.invocations,
            self.days,
            "policy",
            "p50 cold%",
            "p75 cold%",
            "p90 cold%",
            "all cold%",
            "waste vs fixed-10m"
        );
        for row in &self.policies {
            out.push_str(&format!(
                "{:<18} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>18.3}\n",
                row.name,
                row.p50_cold_pct,
                row.p75_cold_pct,
                row.p90_cold_pct,
                row.all_cold_pct,
                row.waste_vs_fixed_10m
            ));
        }
        out
    }

    /// One line per workload: invocations, then each policy's cold
    /// percentage and wasted hours.
    pub fn workloads_text(&self) -> String {
        let mut out = format!("{:<24} {:>9}", "workload", "calls");
        for row in &self.policies {
            out.push_str(&format!(" {:>18}", format!("{} cold%/h", row.name)));
        }
        out.push('\n');
        for (name, outcomes) in &self.per_workload {
            let calls = outcomes.first().map(|o| o.invocations).unwrap_or(0);
            out.push_str(&format!("{name:<24} {calls:>9}"));
            for o in outcomes {
                out.push_str(&format!(
                    " {:>18}",
                    format!("{:.1}/{:.1}", o.cold_pct(), o.waste_s / 3600.0)
                ));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keepalive::Window;

    fn calls(starts: &[f64], duration: f64) -> Vec<Invocation> {
        starts
            .iter()
            .map(|&start_s| Invocation {
                start_s,
                duration_s: duration,
            })
            .collect()
    }

    #[test]
    fn a_fixed_keep_alive_is_cold_after_gaps_longer_than_it() {
        // Gaps (idle) of 59, 599, 59: 10 minutes keeps the first two warm.
        let c = calls(&[0.0, 60.0, 660.0, 720.0], 1.0);
        let o = simulate(&c, &mut Fixed::new(600.0), 721.0);
        assert_eq!((o.invocations, o.cold), (4, 1));
        assert!((o.busy_s - 4.0).abs() < 1e-9, "{o:?}");
        assert!((o.waste_s - (59.0 + 599.0 + 59.0)).abs() < 1e-9, "{o:?}");
        let o = simulate(&c, &mut Fixed::new(60.0), 2000.0);
        assert_eq!(o.cold, 2);
        // Wasted: 59 + 60 + 59 + the last 60 s after the end of the last call.
        assert!(
            (o.waste_s - (59.0 + 60.0 + 59.0 + 60.0)).abs() < 1e-9,
            "{o:?}"
        );
    }

    #[test]
    fn overlapping_calls_are_warm_and_idle_starts_when_the_last_ends() {
        struct Spy(Vec<f64>);
        impl KeepAlive for Spy {
            fn arrival(&mut self, _at: f64, _idle: Option<f64>) {}
            fn window(&mut self, at: f64) -> Window {
                self.0.push(at);
                Window::keep(0.0)
            }
        }
        let c = vec![
            Invocation {
                start_s: 0.0,
                duration_s: 10.0,
            },
            Invocation {
                start_s: 5.0,
                duration_s: 1.0,
            },
            Invocation {
                start_s: 20.0,
                duration_s: 1.0,
            },
        ];
        let mut spy = Spy(Vec::new());
        let o = simulate(&c, &mut spy, 21.0);
        assert_eq!(o.cold, 2);
        assert!((o.busy_s - 11.0).abs() < 1e-9, "{o:?}");
        assert_eq!(spy.0, vec![10.0]);
    }

    #[test]
    fn the_plan_names_every_policy_and_normalises_waste_to_fixed_10m() {
        let trace = super::super::trace::generate(&super::super::trace::Generator {
            workloads: 40,
            days: 2.0,
            seed: 5,
        });
        let plan = plan(&trace, &PolicySpec::standard(AdaptiveConfig::default()));
        let names: Vec<&str> = plan.policies.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "fixed-1m",
                "fixed-10m",
                "fixed-60m",
                "hybrid-histogram",
                "tandem-adaptive"
            ]
        );
        assert_eq!(plan.policies[1].waste_vs_fixed_10m, 1.0);
        // Longer keep-alive: fewer cold starts, more waste.
        assert!(plan.policies[0].all_cold_pct >= plan.policies[2].all_cold_pct);
        assert!(plan.policies[0].waste_vs_fixed_10m <= plan.policies[2].waste_vs_fixed_10m);
    }
}
