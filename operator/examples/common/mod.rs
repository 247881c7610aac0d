//! What the benchmarks that run the whole stack share: the local control
//! plane, the process kubelet, the CRD, a namespace, and `tandem operator`
//! and `tandem gateway` (release builds) as child processes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::CustomResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tandem::api::HybridApp;
use testenv::process::{ChildProcess, ProcessSpec, spawn};
use testenv::{ControlPlane, KubeletConfig, ProcessKubelet};

/// A port on loopback that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `check` every 20 ms until it holds, for at most 90 s.
pub async fn wait<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > Duration::from_secs(90) {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The running stack.
pub struct Stack {
    pub control_plane: ControlPlane,
    pub kubelet: ProcessKubelet,
    pub client: kube::Client,
    pub operator: ChildProcess,
    pub gateway: ChildProcess,
    /// The gateway's main port on loopback.
    pub gateway_port: u16,
    pub logs: PathBuf,
}

impl Stack {
    /// Starts everything for HybridApps of `namespace` (created here); with
    /// `kube_proxy`, kube-proxy too, and the gateway advertises the node
    /// address (workload ports for public Services).
    pub async fn start(namespace: &str, kube_proxy: bool) -> Result<Stack> {
        let exe_dir = std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .context("target dir")?
            .to_path_buf();
        let tandem = exe_dir.join("tandem").display().to_string();
        let echo = exe_dir.join("testenv");

        let mut control_plane = ControlPlane::start().await?;
        let kubelet = ProcessKubelet::start(&control_plane, KubeletConfig::new(echo)).await?;
        if kube_proxy {
            control_plane.start_kube_proxy(kubelet.node_name()).await?;
        }
        let client = control_plane.client().await?;
        Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(client.clone())
            .patch("hybridapps.tandem.dev", &PatchParams::apply("bench").force(), &Patch::Apply(HybridApp::crd()))
            .await?;
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;

        let logs = control_plane.dir.join("logs");
        let (admin, autoscaler, gateway_port, gateway_admin) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let kubeconfig = control_plane.kubeconfig.display().to_string();
        let operator = spawn(ProcessSpec {
            program: tandem.clone(),
            args: vec![
                "operator".into(),
                format!("--watch-namespace={namespace}"),
                format!("--lease-namespace={namespace}"),
                format!("--admin-address=127.0.0.1:{admin}"),
                format!("--autoscaler-address=127.0.0.1:{autoscaler}"),
            ],
            env: vec![("KUBECONFIG".into(), kubeconfig.clone())],
            log: logs.join("bench-operator.log"),
            netns: None,
        })?;
        let mut gateway_args = vec![
            "gateway".into(),
            format!("--namespace={namespace}"),
            format!("--listen=127.0.0.1:{gateway_port}"),
            format!("--admin-address=127.0.0.1:{gateway_admin}"),
            format!("--operator-url=http://127.0.0.1:{autoscaler}"),
        ];
        if kube_proxy {
            gateway_args.push(format!(
                "--advertise-address={}",
                control_plane.network.node_ip()
            ));
        }
        let gateway = spawn(ProcessSpec {
            program: tandem,
            args: gateway_args,
            env: vec![("KUBECONFIG".into(), kubeconfig)],
            log: logs.join("bench-gateway.log"),
            netns: None,
        })?;
        Ok(Stack {
            control_plane,
            kubelet,
            client,
            operator,
            gateway,
            gateway_port,
            logs,
        })
    }

    /// Fails if the operator or the gateway exited.
    pub fn check(&self) -> Result<()> {
        if !self.operator.is_running() || !self.gateway.is_running() {
            bail!(
                "the operator or the gateway exited; see {}",
                self.logs.display()
            );
        }
        Ok(())
    }

    /// Stops the operator, the gateway and the kubelet.
    pub async fn stop(self) {
        self.operator.terminate(Duration::from_secs(5)).await;
        self.gateway.terminate(Duration::from_secs(5)).await;
        drop(self.kubelet);
    }
}
