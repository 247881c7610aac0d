//! Placement: whether a workload should keep a replica (behave AlwaysOn)
//! or may go to zero (behave as a Function), from what each would cost and
//! the cold starts the user accepts. Pure; the basis of `mode: Auto`, and
//! printed by `tandem plan --placement`.
//!
//! A replica costs its pod's requests at the configured prices for every
//! hour it is loaded. As a Function, the workload pays for the hours it is
//! busy or kept warm by its keep-alive policy, and causes the cold starts
//! that policy lets through; always on, it pays every hour and causes none.
//! A Function is never dearer, so the choice weighs what going to zero
//! saves against the cold starts it causes: the workload runs as a
//! Function while its cold-start share stays within the budget and going
//! to zero saves a real share of the replica's cost; it keeps a replica
//! when the share exceeds the budget, or when a Function would be loaded
//! nearly all the time anyway (steady traffic: every lull would risk a
//! cold start for a saving of next to nothing). To avoid flapping, each
//! threshold has two levels: a Function moves to AlwaysOn when its share
//! exceeds the budget or it would save under [`KEEP_BELOW_SAVING_PCT`],
//! and back only once the share is under half the budget and the saving
//! at least [`MOVE_FROM_SAVING_PCT`]; and no move happens before the
//! workload has spent the minimum dwell time in its mode.

/// A Function saving less than this (percent of the always-on cost) keeps
/// a replica instead.
pub const KEEP_BELOW_SAVING_PCT: f64 = 10.0;
/// An always-on workload becomes a Function only when that saves this much.
pub const MOVE_FROM_SAVING_PCT: f64 = 25.0;

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

/// A Kubernetes quantity (`250m`, `1.5`, `512Mi`, `1G`, `1e3`) as a
/// number; `None` when it is not one.
pub fn quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (number, scale) = suffixes
        .iter()
        .find_map(|(suffix, scale)| text.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((text, 1.0));
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value * scale)
}

/// What one pod of `template` requests: vCPUs and GiB of memory, summed
/// over its containers (a container's limit stands in for a request it
/// does not give, as Kubernetes defaults it).
pub fn pod_requests(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> (f64, f64) {
    let containers = template.spec.iter().flat_map(|s| s.containers.iter());
    let mut total = (0.0, 0.0);
    for container in containers {
        let resources = container.resources.as_ref();
        let amount = |name: &str| {
            let from =
                |map: Option<
                    &std::collections::BTreeMap<
                        String,
                        k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                    >,
                >| { map.and_then(|m| m.get(name)).and_then(|q| quantity(&q.0)) };
            from(resources.and_then(|r| r.requests.as_ref()))
                .or_else(|| from(resources.and_then(|r| r.limits.as_ref())))
                .unwrap_or(0.0)
        };
        total.0 += amount("cpu");
        total.1 += amount("memory") / 1024f64.powi(3);
    }
    total
}

/// Where a workload runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
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
    /// Hours observed.
    pub hours: f64,
    /// Of them, hours a Function would have been loaded.
    pub loaded_hours: f64,
    /// The budget, percent of requests.
    pub budget_pct: f64,
    /// Cost as a Function over the period observed.
    pub function_cost: f64,
    /// Cost always on (one replica all the time) over the same period.
    pub always_on_cost: f64,
    /// What a Function saves against always on, percent of the time (and
    /// so of the cost).
    pub saving_pct: f64,
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
    // From the hours, so a pod without requests (costing 0) is judged too.
    let saving = saving_pct(loaded_hours.min(hours), hours);
    let cold = format!("{cold_pct:.2}% of requests cold as a Function");
    let (placement, reason) = match current {
        Placement::Function if cold_pct > budget_pct => (
            Placement::AlwaysOn,
            format!("{cold}, over the {budget_pct}% budget"),
        ),
        Placement::Function if saving < KEEP_BELOW_SAVING_PCT => (
            Placement::AlwaysOn,
            format!("a Function would save only {saving:.0}% (loaded nearly all the time); {cold}"),
        ),
        Placement::AlwaysOn if cold_pct < budget_pct / 2.0 && saving >= MOVE_FROM_SAVING_PCT => (
            Placement::Function,
            format!("{cold}, under half the {budget_pct}% budget; saves {saving:.0}%"),
        ),
        _ => (
            current,
            format!("{cold} against a {budget_pct}% budget; a Function saves {saving:.0}%"),
        ),
    };
    Recommendation {
        placement,
        cold_pct,
        hours,
        loaded_hours: loaded_hours.min(hours),
        budget_pct,
        function_cost,
        always_on_cost,
        saving_pct: saving,
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

    /// Since when (the time given to [`Dwell::new`] or the last move).
    pub fn since_s(&self) -> f64 {
        self.since_s
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
    fn loaded_nearly_all_the_time_keeps_a_replica_and_moves_back_only_for_a_real_saving() {
        // No cold start, but a Function would be loaded 95% of the time.
        let busy = recommend(Placement::Function, 0.0, 1.0, 0.95, 1.0, 0.01);
        assert_eq!(busy.placement, Placement::AlwaysOn);
        assert!(busy.reason.contains("save only 5%"), "{}", busy.reason);
        // Between the two saving levels: stays where it is.
        for current in [Placement::Function, Placement::AlwaysOn] {
            assert_eq!(
                recommend(current, 0.0, 1.0, 0.8, 1.0, 0.01).placement,
                current
            );
        }
        let idle = recommend(Placement::AlwaysOn, 0.0, 1.0, 0.7, 1.0, 0.0);
        assert_eq!(idle.placement, Placement::Function, "judged without prices");
        assert!((idle.saving_pct - 30.0).abs() < 1e-9);
    }

    #[test]
    fn quantities_and_pod_requests_read_as_kubernetes_writes_them() {
        assert_eq!(quantity("250m"), Some(0.25));
        assert_eq!(quantity("2"), Some(2.0));
        assert_eq!(quantity("512Mi"), Some(512.0 * 1024.0 * 1024.0));
        assert_eq!(quantity("1G"), Some(1e9));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("lots"), None);
        assert_eq!(quantity("-1"), None);
        let template: k8s_openapi::api::core::v1::PodTemplateSpec =
            serde_json::from_value(serde_json::json!({"spec": {"containers": [
                {"name": "a", "image": "i", "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}}},
                {"name": "b", "image": "i", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
                {"name": "c", "image": "i"},
            ]}}))
            .unwrap();
        assert_eq!(pod_requests(&template), (1.25, 1.25));
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
