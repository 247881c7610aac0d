//! `testenv`: start the local control plane by hand, or run the echo backend.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use testenv::kubelet::ImageProgram;
use testenv::{ControlPlane, KubeletConfig, ProcessKubelet};

#[derive(Parser)]
#[command(about = "Tandem's local Kubernetes control plane for tests and the demo")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start etcd, kube-apiserver, kube-controller-manager, the pod network
    /// and the process kubelet in the foreground; Ctrl-C tears everything down.
    Up {
        /// Run pods whose image (without tag) is IMAGE as the local PROGRAM,
        /// with the container's args and a ServiceAccount kubeconfig.
        #[arg(
            long = "image",
            value_name = "IMAGE=PROGRAM",
            env = "TESTENV_IMAGES",
            value_delimiter = ','
        )]
        images: Vec<String>,
        /// Like --image, and each such pod gets a network namespace of its
        /// own (for programs that listen on every address, like the
        /// Gateway API suite's echo-basic).
        #[arg(long = "own-network-image", value_name = "IMAGE=PROGRAM")]
        own_network_images: Vec<String>,
        /// Only run pods of these namespaces (default: all).
        #[arg(long = "namespace", env = "TESTENV_NAMESPACES", value_delimiter = ',')]
        namespaces: Vec<String>,
        /// Also copy the admin kubeconfig here.
        #[arg(long, env = "TESTENV_KUBECONFIG_OUT")]
        kubeconfig_out: Option<PathBuf>,
        /// Also install the Gateway API CRDs.
        #[arg(long)]
        gateway_api: bool,
    },
    /// Build (or find in the cache) the control-plane binaries and print where they are.
    Build,
    /// Run the echo backend (the default pod process), configured from env.
    Echo,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Echo => {
            runtime.block_on(testenv::echo::serve(testenv::echo::EchoConfig::from_env()?))
        }
        Command::Build => {
            let binaries = testenv::binaries::Binaries::ensure()?;
            println!(
                "Kubernetes {} and etcd {} in {} (built in {}s{})",
                binaries.kubernetes_version,
                binaries.etcd_version,
                binaries.dir.display(),
                binaries.first_build_time.map(|d| d.as_secs()).unwrap_or(0),
                if binaries.build_time.is_zero() {
                    ", cached"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::Up {
            images,
            own_network_images,
            namespaces,
            kubeconfig_out,
            gateway_api,
        } => runtime.block_on(up(
            images,
            own_network_images,
            namespaces,
            kubeconfig_out,
            gateway_api,
        )),
    }
}

async fn up(
    images: Vec<String>,
    own_network_images: Vec<String>,
    namespaces: Vec<String>,
    kubeconfig_out: Option<PathBuf>,
    gateway_api: bool,
) -> Result<()> {
    let mut config = KubeletConfig::new(std::env::current_exe()?);
    config.namespaces = namespaces;
    let mappings = images
        .iter()
        .map(|m| (m, false))
        .chain(own_network_images.iter().map(|m| (m, true)));
    for (mapping, own_network) in mappings {
        let (image, program) = mapping
            .split_once('=')
            .with_context(|| format!("--image {mapping}: expected IMAGE=PROGRAM"))?;
        let program =
            std::fs::canonicalize(program).with_context(|| format!("--image: {program}"))?;
        config.images.push(ImageProgram {
            image: image.into(),
            program,
            own_network,
        });
    }
    let mut control_plane = ControlPlane::start().await?;
    let kubelet = ProcessKubelet::start(&control_plane, config).await?;
    let node = kubelet.node_name().to_string();
    control_plane.start_kube_proxy(&node).await?;
    if gateway_api {
        let names = testenv::gateway_api::install(&control_plane.client().await?).await?;
        eprintln!(
            "installed Gateway API {} CRDs: {}",
            testenv::gateway_api::VERSION,
            names.join(", ")
        );
    }
    if let Some(out) = &kubeconfig_out {
        std::fs::copy(&control_plane.kubeconfig, out)
            .with_context(|| format!("copy kubeconfig to {}", out.display()))?;
    }
    println!("kubeconfig: {}", control_plane.kubeconfig.display());
    println!(
        "pod network: {} in network namespace {}",
        control_plane.network.cidr(),
        control_plane.network.namespace()
    );
    println!("logs: {}", control_plane.dir.join("logs").display());
    println!(
        "ready: Kubernetes {} at {} (started in {:.1}s); Ctrl-C to stop",
        control_plane.binaries.kubernetes_version,
        control_plane.server,
        control_plane.startup_time.as_secs_f64()
    );
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    eprintln!("stopping");
    drop(kubelet);
    drop(control_plane);
    if let Some(out) = kubeconfig_out {
        let _ = std::fs::remove_file(out);
    }
    Ok(())
}
