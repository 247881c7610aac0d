//! `tandem plan` and `tandem trace`.

use std::path::PathBuf;

use super::adaptive::AdaptiveConfig;
use super::simulate::{PolicySpec, plan};
use super::trace;

/// Output format of `tandem plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for people.
    Text,
    /// `{"policies": [{"name", "p50_cold_pct", ...}]}` for scripts.
    Json,
}

/// Arguments of `tandem plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// The trace: CSV with the header `workload,start_s,duration_s`, one
    /// invocation per line, sorted by start_s; gzip accepted.
    #[arg(long)]
    pub trace: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// The adaptive policy's longest keep-alive (the hybrid histogram's
    /// range is 4h).
    #[arg(long, default_value = "4h", value_parser = parse_seconds)]
    pub max_keep_alive: f64,
    /// The adaptive policy's exchange rate: idle instance time that one
    /// cold start is worth.
    #[arg(long, default_value = "8h", value_parser = parse_seconds)]
    pub cold_start_worth: f64,
    /// Also print the table for each group of workloads whose names share
    /// a prefix (the text before the first `-`), e.g. per team or per kind
    /// of trigger (text format only).
    #[arg(long)]
    pub by_prefix: bool,
    /// Also print one line per workload: its invocations, and per policy
    /// its cold-start percentage and wasted hours (text format only).
    #[arg(long)]
    pub per_workload: bool,
    /// Also recommend, per workload, Function or AlwaysOn (what `mode:
    /// Auto` decides): AlwaysOn when the adaptive policy leaves more cold
    /// starts than --cold-start-budget, with each placement's cost.
    #[arg(long)]
    pub placement: bool,
    /// Share of requests that may be cold, e.g. `1%`.
    #[arg(long, default_value = "1%", value_parser = parse_percent)]
    pub cold_start_budget: f64,
    /// vCPUs one replica requests.
    #[arg(long, default_value_t = 0.25)]
    pub cpu: f64,
    /// Memory one replica requests, GiB.
    #[arg(long, default_value_t = 0.5)]
    pub memory_gib: f64,
    /// Price of a vCPU-hour (default close to AWS Fargate, us-east-1).
    #[arg(long, default_value_t = super::placement::Prices::default().per_vcpu_hour)]
    pub price_vcpu_hour: f64,
    /// Price of a GiB-hour (default close to AWS Fargate, us-east-1).
    #[arg(long, default_value_t = super::placement::Prices::default().per_gib_hour)]
    pub price_gib_hour: f64,
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches('%');
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage such as 1% or 0.5%"))?;
    if !(0.0..=100.0).contains(&value) {
        return Err(format!("{text:?}: must be between 0% and 100%"));
    }
    Ok(value)
}

/// One workload's placement in `tandem plan --placement`.
#[derive(Debug, Clone, serde::Serialize)]
struct Placed {
    workload: String,
    placement: &'static str,
    cold_pct: f64,
    function_cost: f64,
    always_on_cost: f64,
}

fn placements(plan: &super::simulate::Plan, args: &PlanArgs, hours: f64) -> Vec<Placed> {
    use super::placement::{Placement, Prices, recommend};
    let prices = Prices {
        per_vcpu_hour: args.price_vcpu_hour,
        per_gib_hour: args.price_gib_hour,
    };
    let replica_hour = prices.replica_hour(args.cpu, args.memory_gib);
    let adaptive = plan
        .policies
        .iter()
        .position(|p| p.name == "tandem-adaptive")
        .expect("the adaptive policy is replayed");
    plan.per_workload
        .iter()
        .map(|(name, outcomes)| {
            let o = outcomes[adaptive];
            let loaded_hours = (o.busy_s + o.waste_s) / 3600.0;
            let r = recommend(
                Placement::Function,
                o.cold_pct(),
                args.cold_start_budget,
                loaded_hours,
                hours,
                replica_hour,
            );
            Placed {
                workload: name.clone(),
                placement: r.placement.as_str(),
                cold_pct: (r.cold_pct * 100.0).round() / 100.0,
                function_cost: (r.function_cost * 1e4).round() / 1e4,
                always_on_cost: (r.always_on_cost * 1e4).round() / 1e4,
            }
        })
        .collect()
}

/// The cost of the recommended placements, all as Functions, all always on.
fn placement_totals(placed: &[Placed]) -> (usize, f64, f64, f64) {
    let on = placed.iter().filter(|p| p.placement == "AlwaysOn").count();
    let chosen: f64 = placed
        .iter()
        .map(|p| {
            if p.placement == "AlwaysOn" {
                p.always_on_cost
            } else {
                p.function_cost
            }
        })
        .sum();
    let functions: f64 = placed.iter().map(|p| p.function_cost).sum();
    let always: f64 = placed.iter().map(|p| p.always_on_cost).sum();
    (on, chosen, functions, always)
}

/// Arguments of `tandem trace`.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Workloads to draw.
    #[arg(long, default_value_t = 400)]
    pub workloads: usize,
    /// Span in days.
    #[arg(long, default_value_t = 7.0)]
    pub days: f64,
    /// Seed (the same seed gives the same trace).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where to write it (gzip when the name ends in .gz).
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    crate::api::duration::Duration::parse(text)?
        .to_std()
        .map(|d| d.as_secs_f64())
}

/// Runs `tandem plan`.
pub fn run_plan(args: &PlanArgs) -> anyhow::Result<()> {
    let trace = trace::read(&args.trace)?;
    let config = AdaptiveConfig {
        max_keep_alive_s: args.max_keep_alive,
        cold_start_worth_s: args.cold_start_worth,
        ..AdaptiveConfig::default()
    };
    let plan = plan(&trace, &PolicySpec::standard(config.clone()));
    let hours = (trace.end_s - trace.start_s).max(0.0) / 3600.0;
    let placed = args.placement.then(|| placements(&plan, args, hours));
    match args.format {
        Format::Text => {
            print!("{}", plan.to_text());
            if let Some(placed) = &placed {
                let (on, chosen, functions, always) = placement_totals(placed);
                println!(
                    "\nplacement at a {}% cold-start budget: {} of {} workloads AlwaysOn; cost over the trace {:.2} (all Functions {:.2}, all AlwaysOn {:.2}: saves {:.0}%)",
                    args.cold_start_budget,
                    on,
                    placed.len(),
                    chosen,
                    functions,
                    always,
                    super::placement::saving_pct(chosen, always)
                );
                if args.per_workload {
                    println!(
                        "{:<24} {:>9} {:>8} {:>14} {:>14}",
                        "workload", "placement", "cold%", "function cost", "always-on cost"
                    );
                    for p in placed {
                        println!(
                            "{:<24} {:>9} {:>8.2} {:>14.4} {:>14.4}",
                            p.workload, p.placement, p.cold_pct, p.function_cost, p.always_on_cost
                        );
                    }
                }
            }
            if args.per_workload {
                print!("\n{}", plan.workloads_text());
            }
            if args.by_prefix {
                let mut groups: std::collections::BTreeMap<String, trace::Trace> =
                    Default::default();
                for (name, calls) in &trace.workloads {
                    let prefix = name.split('-').next().unwrap_or(name).to_string();
                    let group = groups.entry(prefix).or_insert_with(|| trace::Trace {
                        start_s: trace.start_s,
                        end_s: trace.end_s,
                        ..trace::Trace::default()
                    });
                    group.workloads.push((name.clone(), calls.clone()));
                }
                for (prefix, group) in &groups {
                    println!("\n{prefix}-*:");
                    print!(
                        "{}",
                        super::simulate::plan(group, &PolicySpec::standard(config.clone()))
                            .to_text()
                    );
                }
            }
        }
        Format::Json => {
            let mut value = serde_json::to_value(&plan)?;
            if let Some(placed) = &placed {
                let (on, chosen, functions, always) = placement_totals(placed);
                value["placement"] = serde_json::json!({
                    "coldStartBudgetPct": args.cold_start_budget,
                    "alwaysOn": on,
                    "cost": chosen,
                    "allFunctionsCost": functions,
                    "allAlwaysOnCost": always,
                    "workloads": placed,
                });
            }
            println!("{}", serde_json::to_string(&value)?)
        }
    }
    Ok(())
}

/// Runs `tandem trace`.
pub fn run_trace(args: &TraceArgs) -> anyhow::Result<()> {
    if !(args.days > 0.0 && args.days <= 366.0) {
        anyhow::bail!("--days must be above 0 and at most 366");
    }
    let trace = trace::generate(&trace::Generator {
        workloads: args.workloads,
        days: args.days,
        seed: args.seed,
    });
    trace::write(&trace, &args.out)?;
    eprintln!(
        "wrote {} workloads, {} invocations to {}",
        trace.workloads.len(),
        trace.invocations(),
        args.out.display()
    );
    Ok(())
}
