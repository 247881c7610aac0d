//! The `tandem` command: operator, gateway and CRD generation.
#![forbid(unsafe_code)]

use anyhow::Result;

// The gateway allocates a little for every request; mimalloc is markedly
// cheaper than glibc's malloc for that pattern (measured with bench/gateway).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Kubernetes operator and gateway for hybrid apps: scale-to-zero functions and always-on deployments behind one set of routes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the HybridApp CustomResourceDefinition as YAML.
    ///
    /// The output is what `crds/hybridapp.yaml` and the Helm chart hold; apply
    /// it with `kubectl apply -f -` or regenerate the checked-in file with
    /// `cargo run -p tandem -- crd > crds/hybridapp.yaml`.
    Crd,
    /// Run the control plane: reconcile HybridApps into Deployments,
    /// Services and HorizontalPodAutoscalers, and write their status.
    ///
    /// Uses KUBECONFIG or the in-cluster ServiceAccount. With leader election
    /// (the default) several replicas can run; only the Lease holder writes.
    /// Serves /healthz, /readyz (ready once the watches have synced) and
    /// /metrics on --admin-address. SIGTERM stops it gracefully.
    Operator(Box<tandem::operator::OperatorArgs>),
    /// Run the data plane: the HTTP gateway that routes by host and path,
    /// splits by weight, and holds requests while a function starts.
    ///
    /// Routes and endpoints come from the Kubernetes API (HybridApps and
    /// EndpointSlices) or, with --static-config, from a file. Serves
    /// /healthz, /readyz and /metrics on --admin-address. SIGTERM stops
    /// accepting and lets in-flight requests finish within --shutdown-grace.
    Gateway(Box<tandem::gateway::GatewayArgs>),
    /// Replay an invocation trace through keep-alive policies (fixed 1, 10
    /// and 60 minutes, the hybrid histogram, Tandem's adaptive policy) and
    /// print, per policy, the per-workload cold-start percentage at p50,
    /// p75 and p90 of workloads, the share of all invocations that were
    /// cold, and wasted warm time relative to the fixed 10-minute policy.
    ///
    /// The trace is CSV with the header `workload,start_s,duration_s`, one
    /// invocation per line, sorted by start_s (gzip accepted).
    Plan(tandem::keepalive::cli::PlanArgs),
    /// Generate a synthetic invocation trace shaped like the Azure
    /// Functions trace (rates, timers, bursts, daily cycles), from a seed.
    Trace(tandem::keepalive::cli::TraceArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", tandem::api::crd_yaml());
            Ok(())
        }
        Command::Operator(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let _telemetry = tandem::telemetry::init(
                args.log_format,
                &args.traces,
                "tandem-operator",
                runtime.handle(),
            )?;
            runtime.block_on(tandem::operator::run(*args))
        }
        Command::Gateway(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let _telemetry = tandem::telemetry::init(
                args.log_format,
                &args.traces,
                "tandem-gateway",
                runtime.handle(),
            )?;
            runtime.block_on(tandem::gateway::run(*args))
        }
        Command::Plan(args) => tandem::keepalive::cli::run_plan(&args),
        Command::Trace(args) => tandem::keepalive::cli::run_trace(&args),
    }
}
