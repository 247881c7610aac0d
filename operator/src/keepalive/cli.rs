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
    match args.format {
        Format::Text => {
            print!("{}", plan.to_text());
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
        Format::Json => println!("{}", serde_json::to_string(&plan)?),
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
