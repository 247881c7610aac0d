//! The test API: one shared environment per test binary, a fresh namespace
//! per test, and waits that fail with a helpful message.
//!
//! The environment runs on its own thread and tokio runtime, because each
//! `#[tokio::test]` has a runtime that ends with the test, and clients or tasks
//! created there die with it. Tests therefore make their own clients
//! ([`Environment::client`]) from the shared kubeconfig.

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};

use crate::controlplane::{ControlPlane, client_from_kubeconfig, random_hex};
use crate::kubelet::{KubeletConfig, ProcessKubelet, RunningPod, service_account_token};

/// The shared control plane, pod network and process kubelet of a test binary.
pub struct Environment {
    /// The control plane.
    pub control_plane: ControlPlane,
    /// The process kubelet running every Pod.
    pub kubelet: ProcessKubelet,
    kubeconfig: String,
    /// Keeps the kubelet's tasks alive for the life of the test binary.
    _runtime: tokio::runtime::Runtime,
}

impl Environment {
    /// An admin client bound to the caller's runtime.
    pub async fn client(&self) -> kube::Client {
        client_from_kubeconfig(&self.kubeconfig)
            .await
            .expect("client from the testenv kubeconfig")
    }

    /// The admin kubeconfig text.
    pub fn kubeconfig(&self) -> &str {
        &self.kubeconfig
    }

    /// A client authenticated as ServiceAccount `namespace/account`, with a
    /// token from the TokenRequest API: it has exactly that account's RBAC.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        account: &str,
    ) -> Result<kube::Client> {
        let token = service_account_token(&self.client().await, namespace, account, 3600).await?;
        let user = format!("system:serviceaccount:{namespace}:{account}");
        client_from_kubeconfig(&self.control_plane.kubeconfig_for(&user, &token, namespace)).await
    }

    /// Pods of `namespace` that run as local processes now.
    pub fn running_pods(&self, namespace: &str) -> Vec<RunningPod> {
        let mut pods: Vec<RunningPod> = self
            .kubelet
            .pods()
            .into_iter()
            .filter(|p| p.namespace == namespace)
            .collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    }
}

/// Options of the control plane [`environment`] starts, if set before its
/// first call (a test binary that needs an audit log, say).
static OPTIONS: OnceLock<crate::controlplane::Options> = OnceLock::new();

/// Sets the options of this test binary's control plane; only the first
/// call counts, and only before [`environment`] starts it.
pub fn configure(options: crate::controlplane::Options) {
    let _ = OPTIONS.set(options);
}

/// The environment of this test binary, started on first use.
///
/// Panics with the reason if it cannot start (no Go, not root, ...).
pub fn environment() -> &'static Environment {
    static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        std::thread::spawn(start_environment)
            .join()
            .expect("environment thread")
            .unwrap_or_else(|error| panic!("testenv could not start: {error:#}"))
    })
}

fn start_environment() -> Result<Environment> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("testenv")
        .build()?;
    let echo = echo_program()?;
    let (control_plane, kubelet) = runtime.block_on(async {
        let options = OPTIONS.get().cloned().unwrap_or_default();
        let mut control_plane = ControlPlane::start_with(options).await?;
        // The kubelet's own log, for when a test needs to know why a pod
        // did not become ready.
        if let Ok(file) = std::fs::File::create(control_plane.dir.join("logs").join("kubelet.log"))
        {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info,testenv=debug")
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init();
        }
        let kubelet = ProcessKubelet::start(&control_plane, KubeletConfig::new(echo)).await?;
        // Like a node: Service cluster IPs work from the pod network.
        let node = kubelet.node_name().to_string();
        control_plane.start_kube_proxy(&node).await?;
        anyhow::Ok((control_plane, kubelet))
    })?;
    let kubeconfig = std::fs::read_to_string(&control_plane.kubeconfig)?;
    let binaries = &control_plane.binaries;
    eprintln!(
        "testenv: Kubernetes {} (etcd {}), first build {}, this build step {:.1}s, control plane ready in {:.1}s, kubeconfig {}",
        binaries.kubernetes_version,
        binaries.etcd_version,
        binaries
            .first_build_time
            .map(|d| format!("{}s", d.as_secs()))
            .unwrap_or_else(|| "not recorded".into()),
        binaries.build_time.as_secs_f64(),
        control_plane.startup_time.as_secs_f64(),
        control_plane.kubeconfig.display()
    );
    Ok(Environment {
        control_plane,
        kubelet,
        kubeconfig,
        _runtime: runtime,
    })
}

/// The `testenv` binary (the echo backend), next to the test executable;
/// built with cargo if it is not there yet.
pub fn echo_program() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // Test executables live in target/<profile>/deps; binaries one level up.
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .context("locate the target directory")?;
    let candidate = profile_dir.join("testenv");
    if candidate.exists() {
        return Ok(candidate);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "-p", "testenv", "--bin", "testenv"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .context("cargo build -p testenv")?;
    anyhow::ensure!(
        status.success() && candidate.exists(),
        "could not build {}",
        candidate.display()
    );
    Ok(candidate)
}

/// A namespace of one test.
pub struct TestNamespace {
    /// Its name: the prefix plus a random suffix.
    pub name: String,
    /// An admin client on the test's runtime.
    pub client: kube::Client,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` in the shared environment.
    pub async fn create(prefix: &str) -> Self {
        let client = environment().client().await;
        let name = format!("{prefix}-{}", random_hex(3).expect("random suffix"));
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"testenv.tandem.dev/test": prefix}}
        }))
        .expect("namespace");
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create test namespace");
        Self { name, client }
    }

    /// A typed API in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

/// Polls `check` every 50 ms until it returns `Ok(value)`, or panics after
/// `timeout` with `what` and the last reason `check` gave (`Err(reason)`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(reason) => {
                if start.elapsed() > timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last state: {reason}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to `timeout`) until the CRD `name` reports `Established`.
pub async fn wait_for_crd(client: &kube::Client, name: &str, timeout: Duration) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for(
        &format!("CRD {name} to be established"),
        timeout,
        || async {
            let crd = crds.get(name).await.map_err(|e| e.to_string())?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                Ok(())
            } else {
                Err("not established".into())
            }
        },
    )
    .await
}
