//! The `tandem` command: operator, gateway and CRD generation.
#![forbid(unsafe_code)]

use anyhow::Result;
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
    /// Run the control plane: reconcile HybridApps into Deployments and
    /// Services, autoscale functions, and write status.
    ///
    /// Not implemented yet: this build only provides the API (`tandem crd`).
    Operator,
    /// Run the data plane: the HTTP gateway that routes, splits and holds
    /// requests for HybridApps.
    ///
    /// Not implemented yet: this build only provides the API (`tandem crd`).
    Gateway,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", tandem::api::crd_yaml());
            Ok(())
        }
        Command::Operator | Command::Gateway => {
            anyhow::bail!("this subcommand is not implemented yet; see the project's open issues")
        }
    }
}
