//! Acceptance tests of the local control plane: real Deployments, Pods,
//! EndpointSlices, garbage collection and RBAC, with real HTTP to pod IPs.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use testenv::{TestNamespace, environment, http_client, wait_for};

const WAIT: Duration = Duration::from_secs(60);

fn echo_deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "echo",
                        "image": "tandem.dev/echo:test",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "env": [{"name": "ECHO_STARTUP_DELAY_MS", "value": "200"}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}}
                    }]
                }
            }
        }
    }))
    .expect("deployment")
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    }))
    .expect("service")
}

async fn ready_pods(pods: &Api<Pod>, app: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect()
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_deployment_runs_as_pods_with_endpoints_and_stops_when_scaled_to_zero() {
    let ns = TestNamespace::create("pods").await;
    let deployments: Api<Deployment> = ns.api();
    let pods: Api<Pod> = ns.api();
    let slices: Api<EndpointSlice> = ns.api();
    ns.api::<Service>()
        .create(&PostParams::default(), &service("echo"))
        .await
        .unwrap();
    deployments
        .create(&PostParams::default(), &echo_deployment("echo", 2))
        .await
        .unwrap();

    let running = wait_for("2 ready echo pods", WAIT, || async {
        let ready = ready_pods(&pods, "echo").await;
        if ready.len() == 2 {
            Ok(ready)
        } else {
            Err(format!("{} ready", ready.len()))
        }
    })
    .await;
    let pod_ips: BTreeSet<String> = running
        .iter()
        .map(|p| p.status.as_ref().unwrap().pod_ip.clone().unwrap())
        .collect();
    assert_eq!(pod_ips.len(), 2, "each pod has its own IP: {pod_ips:?}");
    for pod in &running {
        assert_eq!(
            pod.status.as_ref().unwrap().phase.as_deref(),
            Some("Running")
        );
    }

    // The real EndpointSlice controller publishes both addresses as ready.
    wait_for("both pod IPs as ready endpoints", WAIT, || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=echo"))
            .await
            .map_err(|e| e.to_string())?;
        let ready: BTreeSet<String> = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        if ready == pod_ips {
            Ok(())
        } else {
            Err(format!("ready endpoints {ready:?}"))
        }
    })
    .await;

    // Each address answers with its own pod's name.
    for pod in &running {
        let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
        let name = pod.metadata.name.clone().unwrap();
        let answer = http_client::get(&format!("http://{ip}:8080/hello"))
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
        assert!(
            answer.body.contains(&format!("pod={name} ")),
            "{ip} answered {:?}",
            answer.body
        );
        assert!(answer.body.contains("path=/hello"), "{}", answer.body);
    }

    let pids: Vec<u32> = environment()
        .running_pods(&ns.name)
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(pids.len(), 2, "two local processes");
    assert!(pids.iter().all(|pid| process_exists(*pid)));

    deployments
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    wait_for("pods gone after scaling to 0", WAIT, || async {
        let left = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} pods left"))
        }
    })
    .await;
    wait_for("both processes gone", WAIT, || async {
        let alive: Vec<&u32> = pids.iter().filter(|p| process_exists(**p)).collect();
        if alive.is_empty() {
            Ok(())
        } else {
            Err(format!("still running: {alive:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_deployment_garbage_collects_replicasets_and_pods() {
    let ns = TestNamespace::create("gc").await;
    let deployments: Api<Deployment> = ns.api();
    let pods: Api<Pod> = ns.api();
    let replica_sets: Api<ReplicaSet> = ns.api();
    deployments
        .create(&PostParams::default(), &echo_deployment("doomed", 1))
        .await
        .unwrap();
    wait_for("1 ready pod", WAIT, || async {
        let n = ready_pods(&pods, "doomed").await.len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} ready"))
        }
    })
    .await;
    assert_eq!(
        replica_sets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    deployments
        .delete("doomed", &DeleteParams::background())
        .await
        .unwrap();
    wait_for("ReplicaSet and Pod collected", WAIT, || async {
        let sets = replica_sets
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        let left = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if sets == 0 && left == 0 {
            Ok(())
        } else {
            Err(format!("{sets} ReplicaSets, {left} Pods"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_gets_exactly_its_rbac() {
    let ns = TestNamespace::create("rbac").await;
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "reader"}})).unwrap();
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &account)
        .await
        .unwrap();

    let as_reader = environment()
        .service_account_client(&ns.name, "reader")
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(as_reader, &ns.name);
    match deployments.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 without RBAC, got {other:?}"),
    }

    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "deployment-reader"},
        "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list"]}]
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "deployment-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns.name}]
    }))
    .unwrap();
    ns.api::<Role>()
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    // The authorizer's cache follows RBAC objects within moments.
    wait_for("list allowed after the RoleBinding", WAIT, || async {
        deployments
            .list(&ListParams::default())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_build_start_and_memory_figures() {
    let env = environment();
    let cp = &env.control_plane;
    let version: serde_json::Value = serde_json::from_str(
        &env.client()
            .await
            .request_text(http::Request::get("/version").body(Vec::new()).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        version["gitVersion"],
        cp.binaries.kubernetes_version.as_str(),
        "/version is stamped"
    );
    eprintln!(
        "testenv figures: first build {}s; control plane ready {:.1}s after start (binaries cached: {}); peak memory of etcd + kube-apiserver + kube-controller-manager {:.0} MiB",
        cp.binaries
            .first_build_time
            .map(|d| d.as_secs())
            .unwrap_or(0),
        cp.startup_time.as_secs_f64(),
        cp.binaries.build_time.is_zero(),
        cp.peak_memory_bytes() as f64 / 1024.0 / 1024.0
    );
    for (name, pid) in cp.pids() {
        assert!(process_exists(pid), "{name} runs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_crds_install_on_request() {
    let client = environment().client().await;
    let names = testenv::gateway_api::install(&client)
        .await
        .expect("install Gateway API CRDs");
    assert!(
        names.contains(&"httproutes.gateway.networking.k8s.io".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"gateways.gateway.networking.k8s.io".to_string()),
        "{names:?}"
    );
    testenv::wait_for_crd(&client, "httproutes.gateway.networking.k8s.io", WAIT).await;
}
