//! `tandem operator`: the control-plane process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::ArgAction;
use futures::FutureExt;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::api::Duration as KubeDuration;
use crate::controller::{self, ControllerSettings, metrics::ControllerMetrics};
use crate::keepalive::placement::Prices;
use crate::leader::{self, Fence, FenceLayer, LeaseConfig};
use crate::telemetry::LogFormat;

/// Flags of `tandem operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "TANDEM_ADMIN_ADDRESS", default_value = "0.0.0.0:9090")]
    pub admin_address: SocketAddr,

    /// Address where gateways send demand and stats (`POST /v1/demand`,
    /// `POST /v1/stats`) for the autoscaler.
    #[arg(
        long,
        env = "TANDEM_AUTOSCALER_ADDRESS",
        default_value = "0.0.0.0:9092"
    )]
    pub autoscaler_address: SocketAddr,

    /// Log format.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,

    /// Trace export.
    #[command(flatten)]
    pub traces: crate::telemetry::TraceArgs,

    /// Most HybridApps reconciled at the same time.
    #[arg(long, env = "TANDEM_MAX_CONCURRENT_RECONCILES", default_value_t = 8)]
    pub max_concurrent_reconciles: u16,

    /// Watch and reconcile only this namespace (default: all namespaces).
    #[arg(long, env = "TANDEM_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Re-check every converged HybridApp this often, even without changes.
    #[arg(long, env = "TANDEM_RESYNC", default_value = "10m", value_parser = parse_duration)]
    pub resync: Duration,

    /// Ports of the gateway pods that the operator hands out, one per
    /// workload reached through the gateways (`FIRST-LAST`): the public
    /// Service's EndpointSlices point at the gateways on it.
    #[arg(long, env = "TANDEM_GATEWAY_PORTS", default_value = "20000-29999", value_parser = parse_port_range)]
    pub gateway_ports: std::ops::RangeInclusive<u16>,

    /// Elect a leader on a Lease so that several replicas can run: only the
    /// leader writes, the others wait to take over.
    #[arg(long, env = "TANDEM_LEADER_ELECTION", default_value_t = true, action = ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the Lease.
    #[arg(long, env = "TANDEM_LEASE_NAME", default_value = "tandem-operator")]
    pub lease_name: String,

    /// Namespace of the Lease (default: the pod's namespace from
    /// POD_NAMESPACE, else `default`).
    #[arg(long, env = "TANDEM_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long the lease lasts without renewal; a new leader takes over
    /// within this time after the old one dies.
    #[arg(long, env = "TANDEM_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// This replica's identity in the Lease (default: POD_NAME, else
    /// hostname and process id).
    #[arg(long, env = "TANDEM_IDENTITY")]
    pub identity: Option<String>,

    /// Price of one vCPU for an hour, for `mode: Auto` placement and the
    /// costs in status (default: AWS Fargate on-demand, us-east-1).
    #[arg(long, env = "TANDEM_PRICE_VCPU_HOUR", default_value_t = Prices::default().per_vcpu_hour, value_parser = parse_price)]
    pub price_vcpu_hour: f64,

    /// Price of one GiB of memory for an hour (default: as above).
    #[arg(long, env = "TANDEM_PRICE_GIB_HOUR", default_value_t = Prices::default().per_gib_hour, value_parser = parse_price)]
    pub price_gib_hour: f64,

    /// How often each HybridApp's `status.costs` is written (the metrics
    /// follow every autoscaler tick).
    #[arg(long, env = "TANDEM_COST_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub cost_refresh: Duration,
}

/// Parses a price flag: a finite number, not negative.
pub fn parse_price(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|p| p.is_finite() && *p >= 0.0)
        .ok_or_else(|| format!("{text}: expected a price, a number >= 0 such as 0.04"))
}

/// Parses a Kubernetes-style duration flag (`15s`, `5m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    KubeDuration::parse(text)?.to_std()
}

/// Parses a port range flag (`20000-29999`).
pub fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (first, last) = text
        .split_once('-')
        .ok_or_else(|| format!("{text}: expected FIRST-LAST, e.g. 20000-29999"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{text}: {p} is not a port (1-65535)"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("{text}: the first port is above the last"));
    }
    Ok(first..=last)
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(args: OperatorArgs) -> Result<()> {
    let config = kube::Config::infer()
        .await
        .context("find the Kubernetes API (KUBECONFIG or in-cluster)")?;
    // Lease calls go through a client of their own; every other write goes
    // through the lease's fence (see `leader`).
    let lease_client = kube::Client::try_from(config.clone()).context("a Kubernetes client")?;
    let fence = if args.leader_election {
        Fence::new()
    } else {
        Fence::unfenced(crate::autoscaler::run::WRITE_TIMEOUT)
    };
    let client = kube::client::ClientBuilder::try_from(config)
        .context("a Kubernetes client")?
        .with_layer(&FenceLayer(fence.clone()))
        .build();
    let mut registry = Registry::default();
    let metrics = ControllerMetrics::register(&mut registry);
    let cost_metrics = crate::autoscaler::metrics::AutoscalerMetrics::register(&mut registry);
    let leader = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    registry.register(
        "tandem_operator_leader",
        "1 while this replica holds the lease (writes and runs the autoscaler)",
        leader.clone(),
    );
    let admin_state = AdminState::new(registry);
    let listener = admin::bind(args.admin_address)
        .await
        .with_context(|| format!("bind the admin address {}", args.admin_address))?;
    tracing::info!(address = %listener.local_addr()?, "admin endpoint listening");
    tokio::spawn(admin::serve(listener, admin_state.clone()));

    // Bound at once; until this replica leads, it answers 503 so that a
    // gateway sending to every replica is never kept waiting by a standby.
    let autoscaler_listener = tokio::net::TcpListener::bind(args.autoscaler_address)
        .await
        .with_context(|| format!("bind the autoscaler address {}", args.autoscaler_address))?;
    let (lead_tx, lead_rx) = tokio::sync::oneshot::channel::<()>();
    let standby = tokio::spawn(answer_as_standby(autoscaler_listener, lead_rx));

    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let stop = stop.clone();
        move || {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        }
    };

    let mut lease = None;
    if args.leader_election {
        let config = LeaseConfig::new(
            args.lease_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into()),
            args.lease_name.clone(),
            identity(args.identity.clone()),
            args.lease_duration,
        );
        // A standby replica is healthy and ready to take over.
        admin_state.set_ready(true, "standby, waiting for the lease");
        tracing::info!(identity = %config.identity, lease = %config.name, duration = ?config.lease_duration, renew_deadline = ?config.renew_deadline, retry = ?config.renew_every, "waiting for leadership");
        tokio::select! {
            held = leader::acquire(lease_client, config, fence.clone()) => lease = Some(held),
            _ = stopped() => return Ok(()),
        }
        admin_state.set_ready(false, "leading, watches not synced yet");
    }
    leader.set(1);

    let settings = ControllerSettings {
        concurrency: args.max_concurrent_reconciles.max(1),
        resync: args.resync,
        namespace: args.watch_namespace.clone(),
        gateway_ports: args.gateway_ports.clone(),
    };
    let _ = lead_tx.send(());
    let autoscaler_listener = standby.await.context("standby autoscaler endpoint")?;
    // What the gateways measure per route: fed by the autoscaler endpoint,
    // read by the reconciler's migration gates.
    let meter = Arc::new(crate::migration::Meter::default());
    // The live gateways: fed by the same endpoint, read by the reconciler
    // for the EndpointSlices of public Services.
    let fleet = Arc::new(crate::fleet::Fleet::default());
    tokio::spawn(crate::fleet::expire_silent(Arc::downgrade(&fleet)));
    let mut autoscaler = tokio::spawn(crate::autoscaler::run::run(
        client.clone(),
        autoscaler_listener,
        args.watch_namespace.clone(),
        meter.clone(),
        fleet.clone(),
        crate::autoscaler::run::Costing {
            prices: Prices {
                per_vcpu_hour: args.price_vcpu_hour,
                per_gib_hour: args.price_gib_hour,
            },
            refresh: args.cost_refresh.max(Duration::from_secs(1)),
            metrics: cost_metrics,
        },
    ));
    let ready = admin_state.clone();
    let controller = controller::run(
        client,
        metrics,
        settings,
        meter,
        fleet,
        move || ready.set_ready(true, "leading, watches synced"),
        stopped(),
    );
    let lost = async {
        match lease.as_mut() {
            Some(held) => held.lost().await,
            None => std::future::pending().await,
        }
    };
    // Whatever ends first decides: a shutdown ends the controller; a lost
    // lease (its fence already closed) or a dead autoscaler ends the
    // process, so Kubernetes restarts it as a candidate.
    tokio::select! {
        _ = controller => {}
        () = lost => {
            tracing::error!("lost the leader lease; exiting");
            std::process::exit(1);
        }
        ended = &mut autoscaler => {
            tracing::error!(?ended, "the autoscaler stopped; exiting");
            std::process::exit(1);
        }
    }
    fence.close();
    if let Some(held) = lease {
        held.release().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Answers every autoscaler request with 503 until `lead` fires, then hands
/// the listener back for the leader's autoscaler.
async fn answer_as_standby(
    listener: tokio::net::TcpListener,
    mut lead: tokio::sync::oneshot::Receiver<()>,
) -> tokio::net::TcpListener {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        tokio::select! {
            _ = &mut lead => return listener,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_request| async {
                        hyper::Response::builder()
                            .status(hyper::StatusCode::SERVICE_UNAVAILABLE)
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                b"standby: this replica does not hold the leader lease\n",
                            )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

fn identity(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "tandem".into());
            format!("{host}-{}", std::process::id())
        })
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let interrupt = tokio::signal::ctrl_c().map(drop);
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt => {}
    }
}

/// Shared state of a running operator, for tests that embed it.
pub type Admin = Arc<AdminState>;
