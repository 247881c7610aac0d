//! Placement: whether a workload should keep a replica (behave AlwaysOn)
//! or may go to zero (behave as a Function), from what each would cost and
//! the cold starts the user accepts. Pure; the basis of `mode: Auto`, and
//! printed by `tandem plan --placement`.
//!
//! A replica costs its pod's requests at the configured prices for every
//! hour it is loaded. As a Function, the workload pays for the hours it is
//! busy or kept warm by its keep-alive policy, and causes the cold starts
//! that policy lets through; always on, it pays every hour and causes none.
//! A Function is never dearer, so the choice is about cold starts: the
//! workload runs as a Function while its cold-start share stays within the
//! budget, and keeps a replica when it does not. To avoid flapping, a
//! Function moves to AlwaysOn when its share exceeds the budget, and back
//! only once the share has fallen below half of it, and no move happens
//! before the workload has spent the minimum dwell time in its mode.

/// Prices and pod size.
#[derive(Debug, Clone, PartialEq)]
pub struct Prices {
    /// Price of one vCPU for an hour.
    pub per_vcpu_hour: f64,
    /// Price of one GiB of memory for an hour.
    pub per_gib_hour: f64,
}

impl Default for Prices {
    /// Close to AWS Fargate's on-demand Linux/x86 prices in us-east-1
    /// (USD 0.04048 per vCPU-hour, 0.004445 per GB-hour, as published by
    /// AWS); change them to your own.
    fn default() -> Self {
        Prices {
            per_vcpu_hour: 0.04048,
            per_gib_hour: 0.004445,
        }
    }
}

impl Prices {
    /// What one replica with these requests costs per hour.
    pub fn replica_hour(&self, vcpu: f64, memory_gib: f64) -> f64 {
        vcpu.max(0.0) * self.per_vcpu_hour + memory_gib.max(0.0) * self.per_gib_hour
    }
}

/// Where a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Placement {
    /// May go to zero.
    Function,
    /// Keeps at least one replica.
    AlwaysOn,
}

impl Placement {
    /// Its name, as in `mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Function => "Function",
            Placement::AlwaysOn => "AlwaysOn",
        }
    }
}

/// What the recommendation was made from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    /// Where to run.
    pub placement: Placement,
    /// Cold starts as a Function, percent of requests.
    pub cold_pct: f64,
    /// The budget, percent of requests.
    pub budget_pct: f64,
    /// Cost as a Function over the period observed.
    pub function_cost: f64,
    /// Cost always on (one replica all the time) over the same period.
    pub always_on_cost: f64,
    /// Why, in a sentence.
    pub reason: String,
}

/// The recommendation for a workload observed for `hours`, loaded (busy or
/// kept warm) `loaded_hours` of them as a Function with `cold_pct` cold
/// starts, a replica costing `replica_hour`, currently placed at `current`.
pub fn recommend(
    current: Placement,
    cold_pct: f64,
    budget_pct: f64,
    loaded_hours: f64,
    hours: f64,
    replica_hour: f64,
) -> Recommendation {
    let function_cost = loaded_hours.min(hours) * replica_hour;
    let always_on_cost = hours * replica_hour;
    let (placement, reason) = match current {
        Placement::Function if cold_pct > budget_pct => (
            Placement::AlwaysOn,
            format!("{cold_pct:.2}% of requests cold as a Function, over the {budget_pct}% budget"),
        ),
        Placement::AlwaysOn if cold_pct < budget_pct / 2.0 => (
            Placement::Function,
            format!(
                "{cold_pct:.2}% cold as a Function, under half the {budget_pct}% budget; saves {:.0}%",
                saving_pct(function_cost, always_on_cost)
            ),
        ),
        _ => (
            current,
            format!("{cold_pct:.2}% cold as a Function against a {budget_pct}% budget"),
        ),
    };
    Recommendation {
        placement,
        cold_pct,
        budget_pct,
        function_cost,
        always_on_cost,
        reason,
    }
}

/// What `cost` saves against `reference`, percent.
pub fn saving_pct(cost: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        100.0 * (1.0 - cost / reference)
    } else {
        0.0
    }
}

/// A placement that moves only after a minimum dwell time in its mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Dwell {
    placement: Placement,
    since_s: f64,
    min_dwell_s: f64,
}

impl Dwell {
    /// Placed at `placement` since `now_s`.
    pub fn new(placement: Placement, now_s: f64, min_dwell_s: f64) -> Self {
        Dwell {
            placement,
            since_s: now_s,
            min_dwell_s,
        }
    }

    /// The placement in force.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Applies `wanted` at `now_s` if the dwell time has passed; returns
    /// whether the placement changed.
    pub fn offer(&mut self, wanted: Placement, now_s: f64) -> bool {
        if wanted != self.placement && now_s - self.since_s >= self.min_dwell_s {
            self.placement = wanted;
            self.since_s = now_s;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_costs_its_requests_at_the_prices() {
        let p = Prices::default();
        let hour = p.replica_hour(0.25, 0.5);
        assert!((hour - (0.25 * 0.04048 + 0.5 * 0.004445)).abs() < 1e-12);
    }

    #[test]
    fn over_budget_keeps_a_replica_and_back_only_under_half_of_it() {
        let r = recommend(Placement::Function, 3.0, 1.0, 20.0, 168.0, 0.01);
        assert_eq!(r.placement, Placement::AlwaysOn);
        assert!(r.reason.contains("over the 1% budget"), "{}", r.reason);
        // Between half the budget and the budget: stays where it is.
        for current in [Placement::Function, Placement::AlwaysOn] {
            assert_eq!(
                recommend(current, 0.8, 1.0, 20.0, 168.0, 0.01).placement,
                current
            );
        }
        let back = recommend(Placement::AlwaysOn, 0.3, 1.0, 20.0, 168.0, 0.01);
        assert_eq!(back.placement, Placement::Function);
        assert!(back.function_cost < back.always_on_cost);
        assert!(back.reason.contains("saves 88%"), "{}", back.reason);
    }

    #[test]
    fn no_move_before_the_dwell_time() {
        let mut d = Dwell::new(Placement::Function, 0.0, 600.0);
        assert!(!d.offer(Placement::AlwaysOn, 599.0));
        assert_eq!(d.placement(), Placement::Function);
        assert!(d.offer(Placement::AlwaysOn, 600.0));
        assert!(
            !d.offer(Placement::Function, 900.0),
            "dwell restarts at a move"
        );
        assert!(d.offer(Placement::Function, 1200.0));
    }
}
