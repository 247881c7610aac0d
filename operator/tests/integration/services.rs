//! Workloads reached through their Services, end to end: the operator, a
//! gateway that advertises the node address, the process kubelet's pods,
//! and the real kube-proxy programming iptables in the pod network. A
//! caller in the pod network reaches a Function's public Service by its
//! cluster IP (through the gateways, which wake it) and an always-on
//! workload's directly.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::json;
use tandem::api::HybridApp;
use testenv::{TestNamespace, environment, wait_for};

use crate::gateway::GatewayHandle;
use crate::support::{OperatorProcess, install_crd, operator_kubeconfig};

fn app() -> HybridApp {
    let container = |name: &str| {
        json!({"name": name, "image": format!("example/{name}:1"),
               "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}})
    };
    serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "HybridApp",
        "metadata": {"name": "shop"},
        "spec": {
            "hosts": ["shop.example.com"],
            "workloads": [
                {"name": "store", "mode": "AlwaysOn", "port": 8080,
                 "scaling": {"minReplicas": 1, "metric": "cpu"},
                 "template": {"spec": {"terminationGracePeriodSeconds": 1, "containers": [container("store")]}}},
                {"name": "thumbs", "mode": "Function", "port": 8080, "requestTimeout": "60s",
                 "scaling": {"scaleToZeroAfter": "10s"},
                 "template": {"spec": {"terminationGracePeriodSeconds": 1, "containers": [container("thumbs")]}}}
            ],
            "routes": [
                {"name": "checkout", "match": {"pathPrefix": "/checkout"}, "backends": [{"workload": "store"}]},
                {"name": "thumbs", "match": {"pathPrefix": "/thumbnail"}, "backends": [{"workload": "thumbs"}]}
            ]
        }
    }))
    .unwrap()
}

/// An HTTP GET from inside the pod network (curl in its namespace), with
/// `host` as Host header: status and body.
async fn from_a_pod(ip: &str, host: &str, path: &str) -> Result<(u16, String), String> {
    let netns = environment().control_plane.network.namespace();
    let output = tokio::process::Command::new("ip")
        .args(["netns", "exec", &netns, "curl", "-sS", "--max-time", "60"])
        .args(["-H", &format!("Host: {host}")])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://{ip}{path}"))
        .output()
        .await
        .map_err(|e| format!("run curl: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "curl failed ({}): {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status
        .trim()
        .parse()
        .map_err(|_| format!("no status in {text:?}"))?;
    Ok((status, body.to_string()))
}

/// Waits until a pod's call answers 200 and returns its body.
async fn answered(what: &str, ip: &str, host: &str, path: &str) -> String {
    wait_for(what, Duration::from_secs(90), || async {
        match from_a_pod(ip, host, path).await? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("{status}: {body}")),
        }
    })
    .await
}

fn cluster_ip(service: &Service) -> String {
    service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("a cluster IP")
}

#[tokio::test]
async fn a_pod_reaches_a_function_at_zero_and_an_always_on_workload_by_cluster_ip() {
    install_crd().await;
    let ns = TestNamespace::create("services").await;
    let kubeconfig = operator_kubeconfig(&ns.name).await;
    let operator = OperatorProcess::start(&ns.name, &kubeconfig, "op-1", &[]).await;
    let node_ip = environment().control_plane.network.node_ip().to_string();
    let gateway = GatewayHandle::for_operator_with(
        "services",
        &ns.name,
        &operator,
        &[format!("--advertise-address={node_ip}")],
    )
    .await;
    let apps: Api<HybridApp> = ns.api();
    apps.create(&PostParams::default(), &app()).await.unwrap();

    // The function's public Service has no selector; its slice lists the
    // gateway on the port its Service records.
    let services: Api<Service> = ns.api();
    let slices: Api<EndpointSlice> = ns.api();
    let (thumbs, port) = wait_for(
        "the function's Service to point at the gateway",
        Duration::from_secs(60),
        || async {
            let service = services
                .get("shop-thumbs")
                .await
                .map_err(|e| e.to_string())?;
            let spec = service.spec.clone().unwrap_or_default();
            if spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
                return Err("shop-thumbs still selects pods".to_string());
            }
            let slice = slices
                .get("shop-thumbs-gateways")
                .await
                .map_err(|e| e.to_string())?;
            let port = slice
                .ports
                .as_ref()
                .and_then(|p| p.first())
                .and_then(|p| p.port);
            let target = spec.ports.as_ref().and_then(|p| p.first()).and_then(|p| {
                match p.target_port.as_ref()? {
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => Some(*n),
                    _ => None,
                }
            });
            let addresses: Vec<String> = slice
                .endpoints
                .iter()
                .flatten()
                .flat_map(|e| e.addresses.clone())
                .collect();
            if addresses != [node_ip.clone()] || port.is_none() || port != target {
                return Err(format!(
                    "slice {addresses:?} port {port:?}, service target {target:?}"
                ));
            }
            Ok((service, port.unwrap()))
        },
    )
    .await;
    let private = services.get("shop-thumbs-private").await.unwrap();
    assert_eq!(
        private.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("None"),
        "the pods' Service is headless"
    );
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = ns.api();
    let replicas = |d: k8s_openapi::api::apps::v1::Deployment| d.spec.and_then(|s| s.replicas);
    assert_eq!(
        replicas(deployments.get("shop-thumbs").await.unwrap()),
        Some(0)
    );

    // A pod calls the function by cluster IP and in-cluster name: woken
    // from zero by the gateway, through the real kube-proxy.
    let ip = cluster_ip(&thumbs);
    let body = answered(
        "kube-proxy to route the function's cluster IP",
        &ip,
        &format!("shop-thumbs.{}", ns.name),
        "/hello",
    )
    .await;
    assert!(body.contains("pod=shop-thumbs-"), "answered by {body}");
    assert!(
        gateway
            .metrics()
            .await
            .contains("tandem_gateway_cold_starts_total{"),
        "the request was held for a cold start"
    );
    // Whatever Host an ingress forwards, the workload's port decides: by
    // cluster IP, and on the gateway port itself, as an ingress reading the
    // slice would call it.
    for (address, host) in [
        (ip.clone(), "shop.example.com"),
        (format!("{node_ip}:{port}"), "anything"),
    ] {
        let (status, body) = from_a_pod(&address, host, "/checkout/1").await.unwrap();
        assert_eq!(
            (status, body.contains("pod=shop-thumbs-")),
            (200, true),
            "{address} with Host {host}: {body}"
        );
    }

    // The always-on workload scaled on CPU: its Service selects its pods,
    // and the gateway never sees the request.
    let store = services.get("shop-store").await.unwrap();
    assert!(store.spec.as_ref().unwrap().selector.is_some());
    let ip = cluster_ip(&store);
    let body = answered(
        "the store to answer on its cluster IP",
        &ip,
        &format!("shop-store.{}.svc.cluster.local", ns.name),
        "/checkout",
    )
    .await;
    assert!(body.contains("pod=shop-store-"), "answered by {body}");
    let metrics = gateway.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("tandem_gateway_requests_total{")
                && l.contains("workload=\"store\"")),
        "the gateway counted a request for store:\n{metrics}"
    );
    operator.assert_never_forbidden();
}
