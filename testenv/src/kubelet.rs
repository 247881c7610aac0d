//! The process kubelet: plays a node of the local control plane.
//!
//! It registers a Node and keeps its Lease renewed, binds pending Pods that it
//! is told to run, and runs each Pod as one local process on its own pod IP in
//! the pod network. It honours a startup delay (via the process) and an HTTP
//! readiness probe, reports Running and Ready with the pod IP (so the real
//! EndpointSlice controller publishes it), and on deletion sends SIGTERM,
//! waits out the grace period, kills, and removes the Pod.
//!
//! A Pod's first container decides what runs: an image that matches an
//! [`ImageProgram`] runs that local program with the container's args, the
//! Pod's env and a kubeconfig carrying a token of the Pod's ServiceAccount;
//! any other image runs the echo backend (`testenv echo`).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Node, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::oneshot;

use crate::controlplane::ControlPlane;
use crate::network::PodNetwork;
use crate::process::{ChildProcess, ProcessSpec, spawn};

/// Field manager of the kubelet's writes.
const MANAGER: &str = "testenv-kubelet";

/// Maps a container image to a local program.
#[derive(Debug, Clone)]
pub struct ImageProgram {
    /// Images whose name (before the tag) equals this run `program`.
    pub image: String,
    /// The local program.
    pub program: PathBuf,
    /// Runs in a network namespace of its own (for programs that listen
    /// on every address, which would clash in the shared one).
    pub own_network: bool,
}

/// Which Pods this kubelet runs, and how.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Node name to register.
    pub node_name: String,
    /// Only Pods in these namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// Only Pods matching this label selector (all when `None`).
    pub label_selector: Option<String>,
    /// Images run as local programs instead of the echo backend.
    pub images: Vec<ImageProgram>,
    /// The `testenv` binary, which runs the echo backend.
    pub echo_program: PathBuf,
    /// How often readiness probes are tried.
    pub probe_interval: Duration,
}

impl KubeletConfig {
    /// Runs every Pod, with the echo backend from `echo_program`.
    pub fn new(echo_program: PathBuf) -> Self {
        Self {
            node_name: "testenv-node".into(),
            namespaces: Vec::new(),
            label_selector: None,
            images: Vec::new(),
            echo_program,
            probe_interval: Duration::from_millis(20),
        }
    }
}

/// A Pod that runs as a local process.
#[derive(Debug, Clone)]
pub struct RunningPod {
    /// Namespace of the Pod.
    pub namespace: String,
    /// Name of the Pod.
    pub name: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Process id of its process.
    pub pid: u32,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

struct PodRuntime {
    pod: RunningPod,
    stop: Option<oneshot::Sender<Duration>>,
}

struct Shared {
    client: kube::Client,
    config: KubeletConfig,
    network: Arc<PodNetwork>,
    server: String,
    ca_pem: Vec<u8>,
    logs: PathBuf,
    host_ip: Ipv4Addr,
    pods: Mutex<HashMap<String, PodRuntime>>,
    images: Mutex<Vec<ImageProgram>>,
    free_ips: Mutex<Vec<u8>>,
}

/// A handle on a running process kubelet; stops it (and its pods) when dropped.
pub struct ProcessKubelet {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl ProcessKubelet {
    /// Registers the node and starts running Pods on `control_plane`.
    pub async fn start(control_plane: &ControlPlane, config: KubeletConfig) -> Result<Self> {
        let client = control_plane.client().await?;
        let logs = control_plane.dir.join("logs").join("pods");
        std::fs::create_dir_all(&logs)?;
        let shared = Arc::new(Shared {
            client,
            network: control_plane.network.clone(),
            server: control_plane.server.clone(),
            ca_pem: control_plane.ca_pem.clone(),
            logs,
            host_ip: control_plane.network.node_ip(),
            free_ips: Mutex::new((0..control_plane.network.capacity()).rev().collect()),
            pods: Mutex::new(HashMap::new()),
            images: Mutex::new(config.images.clone()),
            config,
        });
        register_node(&shared).await?;
        let task = tokio::spawn(run(shared.clone()));
        Ok(Self { shared, task })
    }

    /// The Pods running now.
    pub fn pods(&self) -> Vec<RunningPod> {
        let pods = self.shared.pods.lock().expect("pods lock");
        pods.values().map(|p| p.pod.clone()).collect()
    }

    /// From now on, runs Pods whose image is `mapping.image` as its program
    /// (replacing an earlier mapping of the same image).
    pub fn map_image(&self, mapping: ImageProgram) {
        let mut images = self.shared.images.lock().expect("images lock");
        images.retain(|m| m.image != mapping.image);
        images.push(mapping);
    }

    /// The node name.
    pub fn node_name(&self) -> &str {
        &self.shared.config.node_name
    }
}

impl Drop for ProcessKubelet {
    fn drop(&mut self) {
        self.task.abort();
        let mut pods = self.shared.pods.lock().expect("pods lock");
        for (_, runtime) in pods.iter_mut() {
            if let Some(stop) = runtime.stop.take() {
                let _ = stop.send(Duration::ZERO);
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(runtime.pod.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn register_node(shared: &Shared) -> Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let name = &shared.config.node_name;
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "testenv.tandem.dev/process-kubelet": "true"}},
        "spec": {"podCIDR": shared.network.cidr(), "podCIDRs": [shared.network.cidr()]},
    });
    let params = PatchParams::apply(MANAGER).force();
    nodes.patch(name, &params, &Patch::Apply(&node)).await?;
    nodes
        .patch_status(name, &params, &Patch::Apply(&node_status(shared)))
        .await?;
    renew_lease(shared).await
}

fn node_status(shared: &Shared) -> serde_json::Value {
    let now = Timestamp::now().to_string();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "status": {
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "250"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "250"},
            "addresses": [{"type": "InternalIP", "address": shared.host_ip.to_string()},
                          {"type": "Hostname", "address": shared.config.node_name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "testenv process kubelet is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                         "kubeletVersion": "testenv", "kubeProxyVersion": "", "bootID": "",
                         "containerRuntimeVersion": "process://testenv", "kernelVersion": "",
                         "machineID": "", "osImage": "testenv", "systemUUID": ""}
        }
    })
}

async fn renew_lease(shared: &Shared) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": shared.config.node_name},
        "spec": {"holderIdentity": shared.config.node_name, "leaseDurationSeconds": 40,
                 "renewTime": MicroTime(Timestamp::now())},
    });
    leases
        .patch(
            &shared.config.node_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

async fn run(shared: Arc<Shared>) {
    let heartbeat = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                if let Err(error) = renew_lease(&shared).await {
                    tracing::warn!(%error, "renew node lease");
                }
            }
        })
    };
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let mut config = watcher::Config::default();
    if let Some(selector) = &shared.config.label_selector {
        config = config.labels(selector);
    }
    let mut events = watcher(pods, config).boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                handle(&shared, pod).await
            }
            Ok(watcher::Event::Delete(pod)) => stop_pod(&shared, &pod, Duration::ZERO),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "pod watch");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    heartbeat.abort();
}

fn selected(shared: &Shared, pod: &Pod) -> bool {
    let namespaces = &shared.config.namespaces;
    namespaces.is_empty()
        || namespaces
            .iter()
            .any(|n| Some(n) == pod.metadata.namespace.as_ref())
}

async fn handle(shared: &Arc<Shared>, pod: Pod) {
    if !selected(shared, &pod) {
        return;
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    if let Some(grace) = deletion_grace(&pod) {
        if node.as_deref() == Some(shared.config.node_name.as_str()) {
            if shared.pods.lock().expect("pods lock").contains_key(&uid) {
                stop_pod(shared, &pod, grace);
            } else if !is_finished(&pod) {
                // Deleted before it ever ran here (or after a kubelet restart).
                remove_pod(shared, &pod).await;
            } else {
                remove_pod(shared, &pod).await;
            }
        }
        return;
    }
    match node {
        None => {
            if let Err(error) = bind(shared, &pod).await {
                tracing::warn!(%error, pod = ?pod.metadata.name, "bind pod");
            }
        }
        Some(node) if node == shared.config.node_name => {
            let known = shared.pods.lock().expect("pods lock").contains_key(&uid);
            if !known && !is_finished(&pod) {
                start_pod(shared.clone(), pod).await;
            }
        }
        Some(_) => {}
    }
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn deletion_grace(pod: &Pod) -> Option<Duration> {
    pod.metadata.deletion_timestamp.as_ref()?;
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .unwrap_or(30)
        .clamp(0, 60);
    Some(Duration::from_secs(seconds as u64))
}

async fn bind(shared: &Shared, pod: &Pod) -> Result<()> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), namespace);
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "uid": pod.metadata.uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": shared.config.node_name},
    });
    let result: Result<serde_json::Value, kube::Error> = pods
        .create_subresource("binding", name, &PostParams::default(), &binding)
        .await;
    match result {
        Ok(_) => Ok(()),
        // Already bound (a repeated event) or gone: nothing to do.
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn stop_pod(shared: &Shared, pod: &Pod, grace: Duration) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut pods = shared.pods.lock().expect("pods lock");
    if let Some(runtime) = pods.get_mut(&uid)
        && let Some(stop) = runtime.stop.take()
    {
        let _ = stop.send(grace);
    }
}

async fn remove_pod(shared: &Shared, pod: &Pod) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(error) => tracing::warn!(%error, pod = name, "remove pod"),
    }
}

async fn start_pod(shared: Arc<Shared>, pod: Pod) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(index) = shared.free_ips.lock().expect("ips lock").pop() else {
        tracing::warn!(pod = %name, "no free pod IP");
        return;
    };
    let ip = shared.network.pod_ip(index);
    let (stop_tx, stop_rx) = oneshot::channel();
    let log = shared.logs.join(format!("{namespace}_{name}.log"));
    let own_network = mapping_of(&shared, &pod).is_some_and(|m| m.own_network);
    let remove_ip = move |network: &PodNetwork| {
        if own_network {
            network.remove_own_pod(ip)
        } else {
            network.remove_pod_ip(ip)
        }
    };
    let started = async {
        let network = shared.network.clone();
        let netns = tokio::task::spawn_blocking(move || {
            if own_network {
                network.add_own_pod(ip).map(Some)
            } else {
                network.add_pod_ip(ip).map(|()| None)
            }
        })
        .await??;
        let mut spec = process_spec(&shared, &pod, ip, &log).await?;
        if let Some(netns) = netns {
            spec.netns = Some(netns);
        }
        spawn(spec)
    }
    .await;
    let process = match started {
        Ok(process) => process,
        Err(error) => {
            tracing::warn!(%error, pod = %name, "start pod");
            let _ = remove_ip(&shared.network);
            shared.free_ips.lock().expect("ips lock").push(index);
            let _ = patch_pod_status(&shared, &pod, ip, false, Some(&error.to_string())).await;
            return;
        }
    };
    shared.pods.lock().expect("pods lock").insert(
        uid.clone(),
        PodRuntime {
            pod: RunningPod {
                namespace,
                name: name.clone(),
                ip,
                pid: process.pid(),
                log,
            },
            stop: Some(stop_tx),
        },
    );
    tokio::spawn(async move {
        supervise_pod(&shared, &pod, ip, process, stop_rx).await;
        let _ = tokio::task::spawn_blocking({
            let network = shared.network.clone();
            move || remove_ip(&network)
        })
        .await;
        shared.free_ips.lock().expect("ips lock").push(index);
        shared.pods.lock().expect("pods lock").remove(&uid);
        remove_pod(&shared, &pod).await;
    });
}

/// Reports the Pod's progress until it is stopped, restarting its process if
/// it exits on its own.
async fn supervise_pod(
    shared: &Shared,
    pod: &Pod,
    ip: Ipv4Addr,
    mut process: ChildProcess,
    mut stop: oneshot::Receiver<Duration>,
) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    loop {
        if let Err(error) = patch_pod_status(shared, pod, ip, false, None).await {
            tracing::warn!(%error, pod = %name, "report running");
        }
        tokio::select! {
            ready = wait_ready(shared, pod, ip, &process) => {
                tracing::debug!(pod = %name, %ip, ready, "readiness probe finished");
                if ready && let Err(error) = patch_pod_status(shared, pod, ip, true, None).await {
                    tracing::warn!(%error, pod = %name, "report ready");
                }
            }
            grace = &mut stop => {
                process.terminate(grace.unwrap_or(Duration::ZERO)).await;
                return;
            }
        }
        tokio::select! {
            status = process.wait() => {
                tracing::info!(pod = %name, %status, "pod process exited; restarting");
                let message = format!("process exited: {status}");
                let _ = patch_pod_status(shared, pod, ip, false, Some(&message)).await;
            }
            grace = &mut stop => {
                process.terminate(grace.unwrap_or(Duration::ZERO)).await;
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut stop => return,
        }
        let log = shared.logs.join(format!(
            "{}_{name}.log",
            pod.metadata.namespace.as_deref().unwrap_or_default()
        ));
        match process_spec(shared, pod, ip, &log).await.and_then(spawn) {
            Ok(next) => {
                if let Some(runtime) = shared
                    .pods
                    .lock()
                    .expect("pods lock")
                    .get_mut(pod.metadata.uid.as_deref().unwrap_or_default())
                {
                    runtime.pod.pid = next.pid();
                }
                process = next;
            }
            Err(error) => {
                tracing::warn!(%error, pod = %name, "restart pod");
                let _ = stop.await;
                return;
            }
        }
    }
}

/// Waits until the readiness probe passes; returns false if the process exits first.
async fn wait_ready(shared: &Shared, pod: &Pod, ip: Ipv4Addr, process: &ChildProcess) -> bool {
    let container = first_container(pod);
    let probe = container
        .and_then(|c| c.readiness_probe.as_ref())
        .and_then(|p| p.http_get.as_ref());
    let target = match probe {
        Some(get) => container
            .and_then(|c| resolve_port(c, &get.port))
            .map(|port| (port, Some(get.path.clone().unwrap_or_else(|| "/".into())))),
        None => container
            .and_then(|c| c.ports.as_ref()?.first().map(|p| p.container_port as u16))
            .map(|port| (port, None)),
    };
    let Some((port, path)) = target else {
        return process.is_running();
    };
    let client = reqwest_like::Client::new();
    loop {
        if !process.is_running() {
            return false;
        }
        let ok = match &path {
            Some(path) => client.get_ok(ip, port, path).await,
            None => tokio::net::TcpStream::connect((ip, port)).await.is_ok(),
        };
        if ok {
            return true;
        }
        tokio::time::sleep(shared.config.probe_interval).await;
    }
}

fn resolve_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port as u16),
    }
}

fn first_container(pod: &Pod) -> Option<&Container> {
    pod.spec.as_ref()?.containers.first()
}

async fn patch_pod_status(
    shared: &Shared,
    pod: &Pod,
    ip: Ipv4Addr,
    ready: bool,
    failure: Option<&str>,
) -> Result<()> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let now = Timestamp::now().to_string();
    let ready_str = if ready { "True" } else { "False" };
    let containers: Vec<serde_json::Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let state = match failure {
                Some(message) => json!({"waiting": {"reason": "Error", "message": message}}),
                None => json!({"running": {"startedAt": now}}),
            };
            json!({"name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                   "ready": ready, "started": failure.is_none(), "restartCount": 0, "state": state})
        })
        .collect();
    let status = json!({
        "apiVersion": "v1", "kind": "Pod",
        "status": {
            "phase": "Running",
            "hostIP": shared.host_ip.to_string(),
            "hostIPs": [{"ip": shared.host_ip.to_string()}],
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).map(|t| t.0.to_string()).unwrap_or(now.clone()),
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready_str, "lastTransitionTime": now},
                {"type": "Ready", "status": ready_str, "lastTransitionTime": now},
            ],
            "containerStatuses": containers,
        }
    });
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), namespace);
    pods.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&status),
    )
    .await?;
    Ok(())
}

/// The program mapped to `pod`'s image, if any.
fn mapping_of(shared: &Shared, pod: &Pod) -> Option<ImageProgram> {
    let image = first_container(pod)?.image.clone().unwrap_or_default();
    let image_name = image_without_tag(&image);
    shared
        .images
        .lock()
        .expect("images lock")
        .iter()
        .find(|m| m.image == image_name)
        .cloned()
}

/// Builds what runs for `pod`: a mapped program or the echo backend.
async fn process_spec(
    shared: &Shared,
    pod: &Pod,
    ip: Ipv4Addr,
    log: &std::path::Path,
) -> Result<ProcessSpec> {
    let container = first_container(pod).ok_or_else(|| anyhow!("pod has no container"))?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => from
                .field_ref
                .as_ref()
                .map(|f| field_value(pod, &f.field_path, ip))
                .unwrap_or_default(),
            (None, None) => String::new(),
        };
        // Like the kubelet: $(NAME) refers to a variable defined before.
        let value = expand(&value, &env);
        env.insert(var.name.clone(), value);
    }
    let port = container
        .ports
        .as_ref()
        .and_then(|p| p.first())
        .map(|p| p.container_port)
        .unwrap_or(8080);

    let mapped = mapping_of(shared, pod);
    let (program, args) = match mapped {
        Some(mapped) => {
            let kubeconfig = service_account_kubeconfig(shared, pod).await?;
            let path = shared.logs.join(format!("{namespace}_{name}.kubeconfig"));
            std::fs::write(&path, kubeconfig)?;
            env.insert("KUBECONFIG".into(), path.display().to_string());
            // Secret and ConfigMap volumes become folders of files; paths
            // under a mount in env values and args point at them.
            let mounts = materialize_volumes(shared, pod, container).await?;
            for value in env.values_mut() {
                *value = remount(value, &mounts);
            }
            let mut args: Vec<String> = container
                .command
                .iter()
                .flatten()
                .skip(1)
                .cloned()
                .collect();
            args.extend(container.args.iter().flatten().cloned());
            let args = args
                .iter()
                .map(|a| remount(&expand(a, &env), &mounts))
                .collect();
            (mapped.program.display().to_string(), args)
        }
        None => {
            env.entry("PORT".into()).or_insert(port.to_string());
            (
                shared.config.echo_program.display().to_string(),
                vec!["echo".to_string()],
            )
        }
    };
    env.insert("POD_NAME".into(), name.clone());
    env.insert("POD_NAMESPACE".into(), namespace.clone());
    env.insert("POD_IP".into(), ip.to_string());
    Ok(ProcessSpec {
        program,
        args,
        env: env.into_iter().collect(),
        log: log.to_path_buf(),
        netns: Some(shared.network.namespace()),
    })
}

/// Kubernetes variable expansion in command, args and env values: `$(NAME)`
/// becomes the variable's value when it is defined (left as written when
/// not), and `$$` is an escaped `$`.
pub fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
        {
            let name = &inner[..close];
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn image_without_tag(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

fn field_value(pod: &Pod, path: &str, ip: Ipv4Addr) -> String {
    let spec = pod.spec.as_ref();
    match path {
        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => ip.to_string(),
        _ => String::new(),
    }
}

/// Writes the Secret and ConfigMap volumes `container` mounts into a
/// folder per volume (the keys, or the `items` asked for, as files) and
/// returns each mount path with its folder, longest first. Processes here
/// share the host's file system, so a path under a mount is rewritten to
/// the folder (see [`remount`]).
async fn materialize_volumes(
    shared: &Shared,
    pod: &Pod,
    container: &k8s_openapi::api::core::v1::Container,
) -> Result<Vec<(String, PathBuf)>> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let Some(volume) = volumes.iter().find(|v| v.name == mount.name) else {
            continue;
        };
        let (data, items): (BTreeMap<String, Vec<u8>>, _) = if let Some(secret) = &volume.secret {
            let secret_name = secret.secret_name.clone().unwrap_or_default();
            let api: Api<Secret> = Api::namespaced(shared.client.clone(), &namespace);
            let found = get_eventually(&api, &secret_name)
                .await
                .with_context(|| format!("secret volume {}: Secret {secret_name}", volume.name))?;
            let data = found
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            (data, secret.items.clone())
        } else if let Some(config_map) = &volume.config_map {
            let api: Api<ConfigMap> = Api::namespaced(shared.client.clone(), &namespace);
            let found = get_eventually(&api, &config_map.name)
                .await
                .with_context(|| {
                    format!(
                        "configMap volume {}: ConfigMap {}",
                        volume.name, config_map.name
                    )
                })?;
            let data = found
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            (data, config_map.items.clone())
        } else {
            continue;
        };
        let dir = shared
            .logs
            .join(format!("{namespace}_{name}.volumes"))
            .join(&volume.name);
        std::fs::create_dir_all(&dir)?;
        let files: Vec<(String, String)> = match items {
            Some(items) => items.into_iter().map(|i| (i.key, i.path)).collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (key, path) in files {
            if path.split('/').any(|part| part == ".." || part.is_empty()) {
                anyhow::bail!("volume {}: item path {path} is not allowed", volume.name);
            }
            let Some(bytes) = data.get(&key) else {
                anyhow::bail!("volume {}: no key {key}", volume.name);
            };
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&file, bytes)?;
        }
        let base = match &mount.sub_path {
            Some(sub) if !sub.is_empty() => dir.join(sub),
            _ => dir,
        };
        mounts.push((mount.mount_path.trim_end_matches('/').to_string(), base));
    }
    mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
    Ok(mounts)
}

/// How long a pod start waits for the Secret or ConfigMap of a volume to
/// appear (the real kubelet keeps the pod in ContainerCreating meanwhile).
const VOLUME_SOURCE_WAIT: std::time::Duration = std::time::Duration::from_secs(180);

/// `name`, waiting up to [`VOLUME_SOURCE_WAIT`] while it does not exist.
async fn get_eventually<K>(api: &Api<K>, name: &str) -> Result<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + VOLUME_SOURCE_WAIT;
    loop {
        match api.get_opt(name).await? {
            Some(found) => return Ok(found),
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await
            }
            None => anyhow::bail!("not found after {VOLUME_SOURCE_WAIT:?}"),
        }
    }
}

/// `value` with a leading mount path (`/etc/secret-volume/crt`) replaced by
/// its folder.
fn remount(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (path, dir) in mounts {
        if let Some(rest) = value.strip_prefix(path.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{}{rest}", dir.display());
        }
    }
    value.to_string()
}

/// A kubeconfig with a bound token of the Pod's ServiceAccount, as the real
/// kubelet would mount it (reaching the API server on the node address).
async fn service_account_kubeconfig(shared: &Shared, pod: &Pod) -> Result<String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let token = service_account_token(&shared.client, &namespace, &account, 3600).await?;
    Ok(crate::kubeconfig(
        &shared.server,
        &shared.ca_pem,
        &format!("system:serviceaccount:{namespace}:{account}"),
        &token,
        &namespace,
    ))
}

/// A token for a ServiceAccount, from the TokenRequest API.
pub async fn service_account_token(
    client: &kube::Client,
    namespace: &str,
    account: &str,
    seconds: i64,
) -> Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(seconds),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let response = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {namespace}/{account}"))?;
    response
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow!("TokenRequest for {namespace}/{account} returned no token"))
}

/// A tiny HTTP GET for readiness probes (plain HTTP/1.1, short timeouts).
mod reqwest_like {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub struct Client;

    impl Client {
        pub fn new() -> Self {
            Self
        }

        /// True when `GET path` answers 2xx or 3xx within a second.
        pub async fn get_ok(&self, ip: Ipv4Addr, port: u16, path: &str) -> bool {
            let attempt = async {
                let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: testenv-kubelet\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).await.ok()?;
                let mut head = [0u8; 16];
                let n = stream.read(&mut head).await.ok()?;
                let line = std::str::from_utf8(&head[..n]).ok()?;
                let code: u16 = line.get(9..12)?.parse().ok()?;
                Some((200..400).contains(&code))
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(1), attempt).await,
                Ok(Some(true))
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("POD_IP".to_string(), "10.244.1.7".to_string())]
            .into_iter()
            .collect();
        assert_eq!(
            expand("--listen=$(POD_IP):8080", &env),
            "--listen=10.244.1.7:8080"
        );
        assert_eq!(expand("$(MISSING)/x", &env), "$(MISSING)/x");
        assert_eq!(expand("$$(POD_IP) $5 $(", &env), "$(POD_IP) $5 $(");
        assert_eq!(expand("plain", &env), "plain");
    }

    #[test]
    fn paths_under_a_mount_point_at_its_folder() {
        let mounts = vec![
            (
                "/etc/secret-volume/inner".to_string(),
                PathBuf::from("/v/b"),
            ),
            ("/etc/secret-volume".to_string(), PathBuf::from("/v/a")),
        ];
        assert_eq!(remount("/etc/secret-volume/crt", &mounts), "/v/a/crt");
        assert_eq!(remount("/etc/secret-volume/inner/k", &mounts), "/v/b/k");
        assert_eq!(
            remount("/etc/secret-volumes", &mounts),
            "/etc/secret-volumes"
        );
        assert_eq!(remount("1", &mounts), "1");
    }

    #[test]
    fn image_names_lose_tag_and_digest_only() {
        assert_eq!(image_without_tag("ghcr.io/a/b:1.2"), "ghcr.io/a/b");
        assert_eq!(image_without_tag("localhost:5000/b"), "localhost:5000/b");
        assert_eq!(image_without_tag("b@sha256:abc"), "b");
    }
}
